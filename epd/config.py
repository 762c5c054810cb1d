"""The pipeline configuration: one YAML file is the truth for every ``epd`` stage, Snakemake, DVC and MLflow.

``config/config.yaml`` (the embedded default) and each experiment's ``config/NAME.yaml`` have one section per stage
plus the shared ones. Each section is an options dataclass of the module that uses it, where its keys, defaults,
bounds and descriptions live (``epd.options``); this module composes them into :class:`Config` and checks what
spans sections (the schedule fits the backbone; metrics and rewards fit its images).

- ``epd <stage> --config FILE`` reads the sections :data:`STAGE_SECTIONS` names for that stage; a flag overrides
  one key. Without ``--config`` the defaults apply.
- Snakemake and DVC run the same commands (one line each); DVC's ``params`` and Snakemake's section stamps
  (:func:`stamp`) list the same sections per stage, so a changed value reruns exactly the stages that read it.
- ``epd config schema`` writes the JSON schema (``workflow/schemas/config.schema.yaml``) and ``epd config docs``
  the key table of ``config/README.md``, both generated from the dataclasses.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

import yaml

from . import options
from .backbones import BACKBONES
from .data import read_prompts
from .distill import DistillOptions
from .evaluate import EvaluateOptions
from .io import atomic_write
from .ld3 import LD3Options
from .options import Field, OptionsError
from .rdpo.train import RDPOOptions
from .sample import SampleOptions
from .schedules import ScheduleOptions
from .solvers import BASELINES
from .teacher import TeacherOptions
from .tracking import TrackingOptions

__all__ = ["Config", "ConfigError", "STAGE_SECTIONS", "check_inputs", "load_config", "from_mapping", "schema",
           "section", "stamp"]

ConfigError = OptionsError


@dataclass(frozen=True)
class PipelineOptions:
    """What the main job compares (config section ``pipeline``). No stage reads it: it says which jobs exist, so
    adding an NFE adds jobs and reruns none."""

    nfe: Annotated[list[Annotated[int, Field(ge=2)]], Field(min_length=1, description="NFEs of the learned solvers: "
                                                        "one teacher, distillation, RDPO run and sample set each")] = \
        field(default_factory=lambda: [3, 5])
    baselines: Annotated[list[Literal[tuple(BASELINES)]], Field(description="hand-designed solvers sampled on the "
                                                                            "schedule's grid")] = \
        field(default_factory=lambda: ["euler", "dpmpp_2m", "unipc", "ipndm"])
    baseline_nfe: Annotated[list[Annotated[int, Field(ge=1)]], Field(description="NFEs of the baselines")] = \
        field(default_factory=lambda: [3, 5, 7, 9])
    peers: Annotated[list[Literal["ld3"]], Field(description="learned peers at every nfe, on EPD's teacher (ld3: "
                                                             "the ld3.solver on a learned grid)")] = \
        field(default_factory=list)

    def __post_init__(self):
        for key in ("nfe", "baselines", "baseline_nfe", "peers"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"{key} lists a value twice: {values}")


def _backbone_section(name: str, cls: type) -> type:
    return make_dataclass(f"Backbone[{name}]", [("name", Literal[name], field(default=name)),
                                                ("options", cls.Options, field(default_factory=cls.Options))],
                          frozen=True)


# backbone: {name, options}, the options checked against that backbone's Options dataclass.
_BACKBONE_SECTIONS = {n: _backbone_section(n, c) for n, c in BACKBONES.items()}
BackboneSection = Annotated[Union[tuple(_BACKBONE_SECTIONS.values())],
                            Field(discriminator="name", description="the denoiser every stage uses")]


@dataclass(frozen=True)
class Config:
    """A whole pipeline configuration (every section, defaults filled in)."""

    experiment: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="MLflow experiment; "
                                     "outputs go to results/<experiment>/")] = "epd"
    backbone: BackboneSection = field(default_factory=lambda: _BACKBONE_SECTIONS["gmm-digits"]())
    schedule: ScheduleOptions = field(default_factory=ScheduleOptions)
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    teacher: TeacherOptions = field(default_factory=TeacherOptions)
    distill: DistillOptions = field(default_factory=DistillOptions)
    ld3: LD3Options = field(default_factory=LD3Options)
    rdpo: RDPOOptions = field(default_factory=RDPOOptions)
    sample: SampleOptions = field(default_factory=SampleOptions)
    evaluate: EvaluateOptions = field(default_factory=EvaluateOptions)
    weights: Annotated[dict[str, str], Field(description="local weights of hub models by key (the text-to-image "
                                                         "scorers, Inception): evaluate and the RDPO reward read "
                                                         "them")] = field(default_factory=dict)
    tracking: TrackingOptions = field(default_factory=TrackingOptions)

    def __post_init__(self):
        backbone = BACKBONES[self.backbone.name]
        backbone.check_schedule(self.schedule.name)

    @property
    def results(self) -> Path:
        """Where the pipeline writes: ``results/<experiment>`` (relative to the project root)."""
        return Path("results") / self.experiment


# The sections each stage reads (its MLflow params; its DVC params; the stamps its Snakemake rule depends on).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "teacher": ("backbone", "schedule", "teacher"),
    "distill": ("distill",),
    "ld3": ("ld3",),
    "rdpo": ("backbone", "rdpo", "weights"),
    "sample": ("backbone", "schedule", "sample"),
    "evaluate": ("evaluate", "weights"),
    "report": (),
}


def from_mapping(data: Mapping[str, Any] | None, where: str = "") -> Config:
    """A :class:`Config` from plain data (a parsed YAML file); every key checked, defaults filled in."""
    return options.validate(Config, data or {}, where)


def check_inputs(cfg: Config, sections: tuple[str, ...] | None = None) -> None:
    """Read the prompt files the config's sections name (``prompts``; in ``sections``, default all): a missing, empty
    or non-UTF-8 file is refused before any job runs, naming its key, the file and the line."""
    for name in (f.name for f in dataclasses.fields(Config)) if sections is None else sections:
        path = getattr(getattr(cfg, name), "prompts", None)
        if path is not None:
            try:
                read_prompts(path)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{name}.prompts: {e}") from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A config file's plain data, or an error naming the file (missing, not YAML, not a mapping)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} {'is a folder' if p.is_dir() else 'does not exist'}")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike) -> Config:
    """Read and check a config file; errors name the file and the key."""
    try:
        return from_mapping(read_yaml(path))
    except OptionsError as e:
        raise ConfigError(f"{path}: {e}") from None


def section(cfg: Config, name: str) -> Any:
    """A section as plain data (nested mappings), as MLflow params and stamps record it."""
    value = getattr(cfg, name)
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def stamp(cfg: Config, names: tuple[str, ...] | None = None, root: str | os.PathLike = ".") -> list[Path]:
    """Write ``results/<experiment>/config/<section>.json`` for each section whose content differs from what the
    stamp holds (or that has none yet); returns the stamps' paths.

    A stamp's time is when its section last changed. Snakemake rules take the stamps of the sections they read as
    inputs, and every stage run with ``--config`` (by Snakemake, DVC or a person) stamps the sections it read, so
    an edited value reruns exactly the stages that read it, whichever tool ran them before."""
    folder = Path(root) / cfg.results / "config"
    paths = []
    for name in tuple(f.name for f in dataclasses.fields(Config)) if names is None else names:
        path = folder / f"{name}.json"
        text = json.dumps(section(cfg, name), sort_keys=True, indent=1) + "\n"
        if not path.is_file() or path.read_text() != text:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(path, text.encode())
        paths.append(path)
    return paths


def schema() -> dict[str, Any]:
    """The JSON schema of a config file, generated from the dataclasses (every key's type, bounds, default and
    description)."""
    out = options.model(Config).model_json_schema()
    out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    out["title"] = "epd pipeline config"
    return out
