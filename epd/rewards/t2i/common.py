"""What the text-to-image scorers share (besides epd.io's weight-file lookup and safe checkpoint loading):
turning pixels into the PIL images every released preprocessing starts from, and the linear MLP head that
ImageReward and the LAION aesthetic predictor both use."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ...io import MissingWeightsError

# OpenAI CLIP's pixel statistics: HPSv2, ImageReward, the aesthetic predictor and the CLIP processors all use them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Load ``state`` into ``module``, naming missing / unexpected keys and mismatched shapes on failure."""
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in want.items()
             if k in state and state[k].shape != v.shape]
    if missing or extra or wrong:
        raise ValueError(f"{what}: {path} does not fit the architecture: missing {missing[:4]}, unexpected "
                         f"{extra[:4]}, wrong shapes {wrong[:3]}")
    module.load_state_dict(state)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Pixels in [0, 1] (float [B, 3, H, W], what ``Backbone.to_pixels`` returns) or uint8 [B, 3, H, W] (``decode``)
    → RGB PIL images. The released scorers all preprocess PIL images; going through 8-bit pixels is what they saw."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"expected float pixels in [0, 1] or uint8, got {images.dtype}")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-4 or hi > 1 + 1e-4:
            raise ValueError(f"pixels must lie in [0, 1] (use Backbone.to_pixels), got range [{lo:.3f}, {hi:.3f}]")
        images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = np.ascontiguousarray(images.cpu().permute(0, 2, 3, 1).numpy())
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB") for a in arr]


def check_prompts(images: torch.Tensor, prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, one per image")
    if len(prompts) != len(images):
        raise ValueError(f"need one prompt per image, got {len(prompts)} prompts for {len(images)} images")
    return list(prompts)


def default_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class LinearHead(nn.Module):
    """768 → 1024 → 128 → 64 → 16 → 1, linear throughout: the released improved-aesthetic-predictor MLP and
    ImageReward's head (both have their ReLUs commented out; the dropouts are inert at evaluation). Keys
    ``layers.{0,2,4,6,7}`` as in both checkpoints."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Scorer:
    """Base of the text-to-image scorers: batching, no_grad, device handling; subclasses implement ``_score``
    (a list of PIL images and their prompts → float tensor [b])."""

    name = ""
    range = (float("-inf"), float("inf"))

    def __init__(self, device: str | torch.device | None = None, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = default_device(device)
        self.batch_size = batch_size

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """One score per image, float64 [B] on the CPU, higher is better."""
        prompts = check_prompts(images, prompts)
        pil = to_pil(images)
        out = []
        with torch.no_grad():
            for s in range(0, len(pil), self.batch_size):
                out.append(self._score(pil[s:s + self.batch_size], prompts[s:s + self.batch_size]).double().cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def _score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


def load_clip(folder: Path, what: str, processor: Path | None = None):
    """A transformers CLIPModel (eval, gradients off) and its processor from ``save_pretrained`` folders."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().requires_grad_(False)
    return model, load_clip_processor(processor or folder, what)


def load_clip_processor(folder: Path, what: str):
    """A transformers CLIPProcessor (image processor + tokenizer) from a ``save_pretrained`` folder."""
    from transformers import CLIPProcessor

    try:
        return CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise MissingWeightsError(f"{what}: no CLIP processor (preprocessor_config.json + tokenizer files) in "
                                  f"{folder}: {e}") from None


def clip_embeddings(model, proc, images, prompts, device) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised projected image and text embeddings [b, d] of a transformers CLIPModel. Computed from the
    towers' pooled outputs, so the same in transformers 4 (tensors) and 5 (``get_*_features`` return outputs)."""
    pixels = proc(images=images, return_tensors="pt")["pixel_values"].to(device, model.dtype)
    img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    tokens = proc(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
    txt = model.text_projection(model.text_model(input_ids=tokens["input_ids"],
                                                 attention_mask=tokens["attention_mask"]).pooler_output)
    return nn.functional.normalize(img.float(), dim=-1), nn.functional.normalize(txt.float(), dim=-1)

