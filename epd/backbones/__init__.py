"""Models behind one denoiser protocol. Embedded CPU backbones here; diffusers backbones load from path or hub id."""
from __future__ import annotations

from typing import Any

from .base import Backbone, CallCounter
from .gmm import GMMDigits

BACKBONES = {"gmm-digits": GMMDigits}


def load_backbone(name: str, **options: Any) -> Backbone:
    """Build a backbone by name with its options (e.g. ``component_std`` for gmm-digits)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name](**options)


__all__ = ["BACKBONES", "Backbone", "CallCounter", "GMMDigits", "load_backbone"]
