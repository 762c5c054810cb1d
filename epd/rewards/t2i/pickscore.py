"""PickScore (Kirstain et al. 2023): CLIP-H (transformers) fine-tuned on Pick-a-Pic preferences.

As in its usage snippet: CLIP-H image and text embeddings, each L2-normalised, score = exp(logit_scale) · cos,
≈ 18–23 for good images. The snippet scores many images against one prompt (``text_embs @ image_embs.T``); here
each image is scored against its own prompt (the diagonal), so one batch may mix prompts.
"""
from __future__ import annotations

import os

import torch

from ...io import require, require_hf_folder
from .common import Scorer, clip_embeddings, load_clip

SOURCE = ("https://huggingface.co/yuvalkirstain/PickScore_v1 (model) with the processor files of "
          "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K")


class PickScore(Scorer):
    name = "pickscore"
    range = (-100.0, 100.0)   # exp(logit_scale) · cos; CLIP training caps exp(logit_scale) at 100

    def __init__(self, weights: str | os.PathLike | None = None, *, processor: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, batch_size: int = 16):
        """``weights``: the PickScore_v1 folder (config.json + weights); ``processor``: a folder with the CLIP-H
        processor and tokenizer files (default: the same folder)."""
        super().__init__(device, batch_size)
        folder = require_hf_folder(weights, "pickscore", SOURCE)
        proc = require(processor, "pickscore processor", SOURCE) if processor else None
        self.model, self.proc = load_clip(folder, "pickscore", proc)
        self.model.to(self.device)

    def _score(self, images, prompts):
        img, txt = clip_embeddings(self.model, self.proc, images, prompts, self.device)
        return self.model.logit_scale.exp().float() * (img * txt).sum(-1)
