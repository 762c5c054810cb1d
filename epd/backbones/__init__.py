"""Models behind one denoiser protocol. Embedded CPU backbones here; diffusers backbones load from path or hub id."""
from __future__ import annotations

from typing import Any

from .base import Backbone, CallCounter
from .flux import Flux  # diffusers is imported only when one is built
from .gmm import GMMDigits
from .sd import StableDiffusion3, StableDiffusion15  # diffusers is imported only when one is built
from .unet import UNetDigits

BACKBONES = {"gmm-digits": GMMDigits, "unet-digits": UNetDigits, "sd15": StableDiffusion15, "sd3": StableDiffusion3,
             "flux": Flux}


def load_backbone(name: str, **options: Any) -> Backbone:
    """Build a backbone by name with its options (``component_std`` for gmm-digits, ``weights`` for unet-digits,
    ``model_path``, ``dtype``, ``device``, ``max_batch`` … for sd15, sd3 and flux)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name](**options)


__all__ = ["BACKBONES", "Backbone", "CallCounter", "Flux", "GMMDigits", "StableDiffusion15", "StableDiffusion3",
           "UNetDigits", "load_backbone"]
