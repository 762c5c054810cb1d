"""The six text-to-image scorers behind the reward protocol ``score(images, prompts) -> Tensor[B]``:

====================  ==========================================================  =====================================
name                  model                                                       weights (``evaluate.weights`` keys)
====================  ==========================================================  =====================================
``hpsv2``             HPSv2.1: open_clip ViT-H-14 + HPS v2.1 checkpoint            ``hpsv2``: HPS_v2.1_compressed.pt
``pickscore``         PickScore: CLIP-H (transformers)                             ``pickscore``: folder; ``clip_h``
``imagereward``       ImageReward: BLIP (transformers) + MLP head                  ``imagereward``: folder
``clip``              CLIP score: CLIP ViT-L/14                                    ``clip``: folder
``aesthetic``         LAION improved-aesthetic MLP on CLIP ViT-L/14                ``aesthetic``: .pth; ``clip``
``mps``               MPS: CLIP-H + condition-aware cross-attention                ``mps``: .pth; ``clip_h``
====================  ==========================================================  =====================================

Every weight comes from a local path (nothing is downloaded); a missing one raises
:class:`~.common.MissingWeightsError` naming the file and where to get it. Third-party ``.pt``/``.pth`` files are
read with ``torch.load(weights_only=True)`` (``.safetensors`` also work); MPS's whole-model pickle is read by an
inert unpickler (``mps.py`` says how). Images are pixels in [0, 1] ``[B, 3, H, W]`` or uint8; each scorer applies
its release's preprocessing to the 8-bit PIL images.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from ...io import MissingWeightsError

# scorer name → (module, class, {constructor option: key of the weights mapping it reads besides its own})
SCORERS: dict[str, tuple[str, str, dict[str, str]]] = {
    "hpsv2": ("hpsv2", "HPSv2", {}),
    "pickscore": ("pickscore", "PickScore", {"processor": "clip_h"}),
    "imagereward": ("imagereward", "ImageReward", {}),
    "clip": ("clip", "CLIPScore", {}),
    "aesthetic": ("clip", "Aesthetic", {"clip": "clip"}),
    "mps": ("mps", "MPS", {"processor": "clip_h"}),
}


def load_scorer(name: str, weights: str | os.PathLike | Mapping[str, Any] | None = None, **options: Any):
    """A text-to-image scorer by name. ``weights`` is its own path, or the mapping of every path by key (config's
    ``evaluate.weights``), from which a scorer also takes the extra folders it needs (see the table above)."""
    import importlib

    module, cls, extra = SCORERS[name]
    if isinstance(weights, Mapping):
        options = {**{opt: weights[key] for opt, key in extra.items() if key in weights}, **options}
        weights = weights.get(name)
    return getattr(importlib.import_module(f".{module}", __name__), cls)(weights, **options)


__all__ = ["MissingWeightsError", "SCORERS", "load_scorer"]
