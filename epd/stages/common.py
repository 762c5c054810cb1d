"""What the stage commands share: the config file and its flags, backbone flags, weights, output folders."""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from .. import options
from ..backbones import BACKBONES, Backbone, load_backbone
from ..config import Config, ConfigError, check_inputs, from_mapping, read_yaml, stamp
from ..options import flag_name


# -- the config file and its flags ---------------------------------------------------------------------------------

def add_config(p: argparse.ArgumentParser, sections: tuple[str, ...]) -> None:
    """``--config FILE`` and one flag per key of each section the stage reads (a flag overrides the file)."""
    p.add_argument("--config", metavar="FILE",
                   help="pipeline config (YAML, e.g. config/config.yaml): the stage reads its sections from it; "
                        "flags override single keys; without it, the defaults shown apply")
    for name in sections:
        group = p.add_argument_group(f"config section {name} (overrides)")
        if name == "backbone":
            _add_backbone_flags(group)
        elif name == "weights":
            group.add_argument("--weights", dest="weights", nargs="+", action="extend", metavar="KEY=PATH",
                               default=argparse.SUPPRESS,
                               help="local weights of hub models by key (hpsv2, pickscore, clip_h, imagereward, clip, "
                                    "aesthetic, mps, inception)")
        else:
            options.add_flags(group, _section_class(name), dest=name)


def _section_class(name: str) -> type:
    return options.strip(options.hints(Config)[name])[0]


def _add_backbone_flags(group) -> None:
    group.add_argument("--backbone", dest="backbone.name", choices=sorted(BACKBONES), default=argparse.SUPPRESS,
                       help="backbone name (default: gmm-digits)")
    seen: dict[str, list[str]] = {}
    for name, cls in BACKBONES.items():
        for f in dataclasses.fields(cls.Options):
            seen.setdefault(f.name, []).append(name)
    for key, owners in seen.items():
        cls = BACKBONES[owners[0]].Options
        kind = options.flag_kwargs(options.strip(options.hints(cls)[key])[0])
        if "action" not in kind and "choices" not in kind:
            kind.setdefault("metavar", key.upper())
        default = {n: getattr(options.defaults(BACKBONES[n].Options), key) for n in owners}
        shown = ", ".join(f"{n} {d}" for n, d in default.items())
        group.add_argument(flag_name(cls, key), dest=f"backbone.options.{key}", default=argparse.SUPPRESS,
                           help=f"{'/'.join(owners)}: {options.description(options.hints(cls)[key])} "
                                f"(default: {shown})", **kind)


def key_paths(items: list[str], flag: str) -> dict[str, str]:
    """["hpsv2=models/HPS_v2.1_compressed.pt", …] -> {"hpsv2": "models/HPS_v2.1_compressed.pt", …}."""
    out = {}
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise ConfigError(f"{flag} takes KEY=PATH (e.g. hpsv2=models/HPS_v2.1_compressed.pt), got {item!r}")
        out[key] = path
    return out


def resolve(args: argparse.Namespace, sections: tuple[str, ...]) -> Config:
    """The config the stage runs with: the file's (whole, checked), the given flags on top of its sections.

    With ``--config``, the sections are stamped from the file's own content (:func:`epd.config.stamp`), so a
    pipeline sees which values changed since its outputs were made, whoever ran the stage."""
    data = read_yaml(args.config) if args.config else {}
    if args.config:
        try:
            file_cfg = from_mapping(data)
        except ConfigError as e:
            raise ConfigError(f"{args.config}: {e}") from None
    for name in sections:
        given = options.given_flags(args, name)
        if name == "backbone":
            file_part = data.get("backbone") or {"name": Config().backbone.name}
            if "name" in given and given["name"] != file_part.get("name"):
                file_part = {}   # another backbone: the file's options belong to the file's backbone
            given = options.merge(file_part, given)
        elif name == "weights":
            given = {**(data.get("weights") or {}), **key_paths(getattr(args, "weights", []), "--weights")}
        else:
            given = options.merge(data.get(name) or {}, given)
        if given:
            data[name] = given
    try:
        cfg = from_mapping(data)
        check_inputs(cfg, sections)
    except ConfigError as e:
        raise ConfigError(f"{args.config + ': ' if args.config else ''}{e}") from None
    if args.config:   # only once the inputs are known good: a refused run leaves no trace
        stamp(file_cfg, sections)
    return cfg


def backbone_options(cfg: Config) -> dict[str, Any]:
    """The backbone's options as plain keyword arguments (what manifests and tables record)."""
    return dataclasses.asdict(cfg.backbone.options)


def load(cfg: Config) -> Backbone:
    """The config's backbone; under torchrun a GPU backbone without a device runs on this process's GPU."""
    from .. import distributed

    opts = backbone_options(cfg)
    if BACKBONES[cfg.backbone.name].gpu and opts.get("device") is None and distributed.launched():
        opts["device"] = str(distributed.device())
    return load_backbone(cfg.backbone.name, **opts)


# -- outputs -------------------------------------------------------------------------------------------------------

def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` can become (or is) a folder we may write in: not a file, its existing ancestor writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {p} is a file, not a folder")
    existing = next(a for a in (p, *p.parents) if a.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {p}: {existing} is not writable")
    return p


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` can be written as a file: not a folder, its folder creatable and writable."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a folder, not a file")
    check_writable_dir(p.parent if str(p.parent) else Path("."), f"the folder of {what}")
    return p
