"""Two scorers on OpenAI CLIP ViT-L/14 (transformers):

- ``clip``: CLIP score, 100 · cos(image, prompt), in [−100, 100]; ≈ 25–35 for matching pairs. torchmetrics'
  ``CLIPScore`` is the same but clamps at 0, which only changes unrelated pairs and would flatten a reward there.
- ``aesthetic``: the LAION improved-aesthetic-predictor (``sac+logos+ava1-l14-linearMSE.pth``), a linear MLP
  768 → 1024 → 128 → 64 → 16 → 1 on the L2-normalised CLIP ViT-L/14 image embedding; ≈ 1–10 (AVA's scale). The
  prompt is ignored.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ...io import load_checkpoint, require, require_hf_folder
from .common import LinearHead, Scorer, clip_embeddings, load_clip, load_strict

CLIP_SOURCE = "https://huggingface.co/openai/clip-vit-large-patch14 (save_pretrained folder)"
AESTHETIC_SOURCE = ("sac+logos+ava1-l14-linearMSE.pth at "
                    "https://github.com/christophschuhmann/improved-aesthetic-predictor")


class CLIPScore(Scorer):
    name = "clip"
    range = (-100.0, 100.0)

    def __init__(self, weights: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                 batch_size: int = 16):
        """``weights``: the CLIP ViT-L/14 folder (config, weights, processor and tokenizer files)."""
        super().__init__(device, batch_size)
        folder = require_hf_folder(weights, "clip", CLIP_SOURCE)
        self.model, self.proc = load_clip(folder, "clip", None)
        self.model.to(self.device)

    def _score(self, images, prompts):
        img, txt = clip_embeddings(self.model, self.proc, images, prompts, self.device)
        return 100 * (img * txt).sum(-1)


class Aesthetic(Scorer):
    name = "aesthetic"
    range = (float("-inf"), float("inf"))

    def __init__(self, weights: str | os.PathLike | None = None, *, clip: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, batch_size: int = 16):
        """``weights``: the predictor's MLP (.pth read with weights_only=True, or .safetensors); ``clip``: the CLIP
        ViT-L/14 folder it was trained on."""
        super().__init__(device, batch_size)
        path = require(weights, "aesthetic", AESTHETIC_SOURCE)
        folder = require_hf_folder(clip, "aesthetic (its CLIP ViT-L/14)", CLIP_SOURCE)
        self.model, self.proc = load_clip(folder, "aesthetic", None)
        self.head = LinearHead(self.model.config.projection_dim)
        load_strict(self.head, load_checkpoint(path, "aesthetic"), path, "aesthetic")
        self.model.to(self.device)
        self.head.eval().requires_grad_(False).to(self.device)

    def _score(self, images, prompts):
        pixels = self.proc(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
        emb = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output).float()
        return self.head(nn.functional.normalize(emb, dim=-1))[:, 0]
