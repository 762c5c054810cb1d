"""`epd profiles`: the repository's Snakemake profiles linked where `snakemake --profile NAME` finds them, without
touching a profile of the user's own."""
import os

import pytest

from epd.cli import main
from epd.stages.profiles import PROFILES, install, user_profile_dir


def test_links_every_profile_and_is_idempotent(tmp_path, capsys):
    dest = tmp_path / "snakemake"
    assert main(["profiles", "--dest", str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["default", "slurm"]
    for name in ("default", "slurm"):
        assert (dest / name).resolve() == (PROFILES / name).resolve()
        assert (dest / name / "config.yaml").read_text() == (PROFILES / name / "config.yaml").read_text()
    assert main(["profiles", "--dest", str(dest)]) == 0
    assert "(already there)" in capsys.readouterr().out


def test_a_link_to_another_checkout_is_replaced_a_users_profile_is_not(tmp_path):
    other = tmp_path / "old-clone" / "workflow" / "profiles" / "default"
    other.mkdir(parents=True)
    dest = tmp_path / "snakemake"
    dest.mkdir()
    os.symlink(other, dest / "default")
    install(PROFILES, dest)
    assert (dest / "default").resolve() == (PROFILES / "default").resolve()
    (dest / "slurm").unlink()
    (dest / "slurm").mkdir()
    (dest / "slurm" / "config.yaml").write_text("executor: slurm\n")
    with pytest.raises(ValueError, match="exists and is not a link to an epd profile"):
        install(PROFILES, dest)
    assert (dest / "slurm" / "config.yaml").read_text() == "executor: slurm\n"


def test_the_user_folder_is_where_snakemake_looks(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    from snakemake.common import get_appdirs

    assert user_profile_dir() == tmp_path / "snakemake" == __import__("pathlib").Path(get_appdirs().user_config_dir)


def test_the_slurm_profile_sets_resources_for_every_rule_that_runs_on_a_node():
    """A rule missing from set-resources would go to the CPU partition with the default time and memory."""
    import re

    import yaml
    rules_dir = PROFILES.parents[1] / "workflow" / "rules"
    text = "\n".join(p.read_text() for p in sorted(rules_dir.glob("*.smk")))
    blocks = re.split(r"^\s*rule (\w+):\n", text, flags=re.M)[1:]
    on_nodes = {name for name, body in zip(blocks[::2], blocks[1::2])
                if "localrule: True" not in body.split("\nrule ")[0]}
    assert {"teacher", "teacher_shard", "distill", "rdpo", "evaluate"} <= on_nodes
    profile = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    assert on_nodes - set(profile["set-resources"]) == set()
