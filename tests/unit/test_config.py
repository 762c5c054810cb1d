"""The one config: every shipped file loads and lists what DVC needs; the committed schema and key table are the ones
the option classes generate; every CLI default is the schema's; bad values are refused naming their key; stamps move
only when their section changes."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import yaml

from epd import options
from epd.cli import COMMANDS, build_parser
from epd.config import STAGE_SECTIONS, Config, ConfigError, from_mapping, load_config, schema, section, stamp
from epd.stages import common
from epd.stages.config import TABLE_BEGIN, TABLE_END, key_table

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "config").glob("*.yaml")) + [REPO / "tests" / "system" / "workflow_tiny.yaml"]
READ_BY_STAGES = sorted({s for sections in STAGE_SECTIONS.values() for s in sections})


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_name_every_section_dvc_reads(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    # dvc.yaml's params and foreach read these keys from the file itself, so they must be written out
    assert {"experiment", "pipeline", *READ_BY_STAGES} <= set(raw), sorted(set(READ_BY_STAGES) - set(raw))
    assert {"nfe", "baselines", "baseline_nfe", "peers"} <= set(raw["pipeline"])   # dvc.yaml's matrices
    assert cfg.experiment == raw["experiment"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_committed_schema_accepts_the_shipped_configs(path):
    jsonschema = pytest.importorskip("jsonschema")
    committed = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    jsonschema.validate(yaml.safe_load(path.read_text()), committed)


def test_committed_schema_and_key_table_are_the_generated_ones():
    committed = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert committed == json.loads(json.dumps(schema())), \
        "workflow/schemas/config.schema.yaml is stale: epd config schema --out workflow/schemas/config.schema.yaml"
    readme = (REPO / "config" / "README.md").read_text()
    table = readme.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip()
    assert table == key_table().strip(), "config/README.md's key table is stale: epd config docs --update config/README.md"


def test_schema_carries_every_default_and_description():
    s = schema()
    for name in ("teacher", "distill", "sample", "evaluate"):
        ref = s["properties"][name]["$ref"].split("/")[-1]
        for key, prop in s["$defs"][ref]["properties"].items():
            assert "default" in prop, (name, key)
            assert prop.get("description"), (name, key)


def _section_defaults_from_schema(name: str):
    return json.loads(json.dumps(schema()["properties"][name]["default"]))


# Minimal job flags of each stage that reads config sections (the rest are the sections' own flags).
REQUIRED = {
    "teacher": ["--out", "o", "--nfe", "3"],
    "distill": ["--teacher", "t", "--out", "o", "--nfe", "3"],
    "rdpo": ["--table", "t", "--out", "o"],
    "sample": ["--outdir", "o"],
    "evaluate": ["--samples", "s", "--out", "o"],
    "report": ["--results", "r", "--out", "o"],
}


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_cli_defaults_are_the_schema_defaults(command):
    """Without --config, what a stage runs with is exactly the schema's defaults, section by section, and its
    --help shows each of them."""
    parser = build_parser()
    args = parser.parse_args([command, *REQUIRED[command]])
    cfg = common.resolve(args, COMMANDS[command].SECTIONS)
    for name in COMMANDS[command].SECTIONS:
        assert json.loads(json.dumps(section(cfg, name))) == _section_defaults_from_schema(name), name
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        if action.dest.startswith(tuple(f"{s}." for s in COMMANDS[command].SECTIONS)):
            assert "(default: " in action.help, action.option_strings


def test_flags_override_the_file_key_by_key(tmp_path):
    (tmp_path / "c.yaml").write_text("rdpo: {ppo: {steps: 7, kl_coef: 2.0}}\n")
    args = build_parser().parse_args(["rdpo", "--table", "t", "--out", "o", "--config", str(tmp_path / "c.yaml"),
                                      "--kl-coef", "0.5", "--reward", "realism"])
    cfg = common.resolve(args, STAGE_SECTIONS["rdpo"])
    assert cfg.rdpo.ppo.steps == 7 and cfg.rdpo.ppo.kl_coef == 0.5 and cfg.rdpo.reward == {"realism": 1.0}


def test_another_backbone_by_flag_drops_the_files_options(tmp_path):
    (tmp_path / "c.yaml").write_text("backbone: {name: gmm-digits, options: {component_std: 0.3}}\n")
    args = build_parser().parse_args(["sample", "--outdir", "o", "--config", str(tmp_path / "c.yaml"),
                                      "--backbone", "unet-digits"])
    cfg = common.resolve(args, STAGE_SECTIONS["sample"])
    assert cfg.backbone.name == "unet-digits" and cfg.backbone.options == options.defaults(type(cfg.backbone.options))


@pytest.mark.parametrize("data, message", [
    ({"distill": {"iterations": -3}}, "distill.iterations: Input should be greater than or equal to 1 (got -3)"),
    ({"distill": {"iters": 5}}, "distill.iters: unknown key (got 5)"),
    ({"distill": {"iterations": "5"}}, "distill.iterations: Input should be a valid integer"),
    ({"distill": {"plugin": 1}}, "distill.plugin: Input should be a valid boolean"),
    ({"pipeline": {"baselines": ["euler", "rk45"]}}, "pipeline.baselines.1: Input should be"),
    ({"pipeline": {"nfe": [3, 3]}}, "pipeline: nfe lists a value twice"),
    ({"sample": {"seeds": "0..9"}}, "sample.seeds: String should match pattern"),
    ({"teacher": {"seeds": "5-1"}}, "teacher: seed range '5-1' runs backwards"),
    ({"sample": {"labels": "1", "prompts": "p.txt"}}, "sample: give labels or prompts, not both"),
    ({"rdpo": {"reward": {"realsim": 1.0}}}, "rdpo.reward: Input should be 'label_logprob', 'realism'"),
    ({"rdpo": {"ppo": {"rollout_batch_size": 6}}}, "rdpo.ppo: rollout_batch_size (6) must be a multiple of rloo_k"),
    ({"schedule": {"name": "flow_match"}}, "schedule 'flow_match' does not fit backbone 'gmm-digits'"),
    ({"backbone": {"name": "sd15", "options": {"component_std": 0.1}}}, "backbone.sd15.options.component_std: unknown key"),
    ({"backbone": {"name": "sd3"}, "schedule": {"name": "time_uniform"}}, "schedule 'time_uniform' does not fit backbone 'sd3'"),
    ({"experiment": "a b"}, "experiment: String should match pattern"),
    ({"evaluate": {"metrics": ["realism", "realism"]}}, "evaluate: metrics lists a metric twice"),
])
def test_bad_values_are_refused_naming_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        from_mapping(data)
    assert message in str(e.value), str(e.value)


def test_a_config_file_that_is_not_yaml_or_missing_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("distill: {iterations: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match=r"nothing\.yaml does not exist"):
        load_config(tmp_path / "nothing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(tmp_path / "list.yaml")


def test_stamps_move_only_when_their_section_changes(tmp_path):
    cfg = from_mapping({"experiment": "x"})
    paths = {p.stem: p for p in stamp(cfg, root=tmp_path)}
    assert set(paths) == {f for f in Config.__dataclass_fields__}
    for p in paths.values():
        os.utime(p, ns=(1, 1))
    stamp(from_mapping({"experiment": "x", "rdpo": {"ppo": {"kl_coef": 2.0}}}), root=tmp_path)
    moved = {name for name, p in paths.items() if p.stat().st_mtime_ns != 1}
    assert moved == {"rdpo"}
    assert json.loads(paths["rdpo"].read_text())["ppo"]["kl_coef"] == 2.0
