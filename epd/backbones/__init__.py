"""Models behind one denoiser protocol ``D(x, sigma[B], cond) -> x0``: the embedded CPU backbones, and diffusers
backbones that load from a local path or hub id. Adding a backbone is its module (the class with its ``Options``
dataclass) plus one line in :data:`BACKBONES`."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..options import validate
from .base import Backbone, CallCounter
from .flux import Flux  # diffusers is imported only when one is built
from .gmm import GMMDigits
from .sd import StableDiffusion3, StableDiffusion15  # diffusers is imported only when one is built
from .unet import UNetDigits

BACKBONES: dict[str, type[Backbone]] = {cls.name: cls for cls in (GMMDigits, UNetDigits, StableDiffusion15,
                                                                  StableDiffusion3, Flux)}


def backbone_class(name: str) -> type[Backbone]:
    """The class registered as ``name``, or an error listing the known backbones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name]


def load_backbone(name: str, **options: Any) -> Backbone:
    """Build a backbone by name; ``options`` are checked against its ``Options`` dataclass first (an unknown or
    out-of-range option is refused naming it, before any weights load)."""
    cls = backbone_class(name)
    opts = validate(cls.Options, options, where=f"backbone {name} options")
    return cls(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)})


__all__ = ["BACKBONES", "Backbone", "CallCounter", "Flux", "GMMDigits", "StableDiffusion15", "StableDiffusion3", "UNetDigits",
           "backbone_class", "load_backbone"]
