"""HPSv2.1: open_clip ViT-H-14 fine-tuned on human preferences (Wu et al. 2023), built on open-clip-torch.

The hpsv2 package pins versions that break this environment, so its scoring is rebuilt here from its parts:
the model is open_clip's ViT-H-14 with the HPS v2.1 state dict, images go through hpsv2's validation transform
(resize the longest side to 224, bicubic, pad to a square with black, CLIP mean/std: open_clip's
``resize_mode="longest"``), and the score is the cosine of the normalised image and text features, without logit
scale (hpsv2's ``diagonal(image_features @ text_features.T)``), in [−1, 1]; good images score ≈ 0.25–0.35.
"""
from __future__ import annotations

import os

import torch

from ...io import load_checkpoint, require
from .common import Scorer, load_strict

SOURCE = "HPS_v2.1_compressed.pt at https://huggingface.co/xswu/HPSv2"


class HPSv2(Scorer):
    name = "hpsv2"
    range = (-1.0, 1.0)

    def __init__(self, weights: str | os.PathLike | None = None, *, model_name: str = "ViT-H-14",
                 device: str | torch.device | None = None, batch_size: int = 16):
        """``weights``: the HPS v2.1 checkpoint (.pt read with weights_only=True, or .safetensors);
        ``model_name``: the open_clip architecture (ViT-H-14; the tests register a tiny one)."""
        import open_clip

        super().__init__(device, batch_size)
        path = require(weights, "hpsv2", SOURCE)
        self.model = open_clip.create_model(model_name, pretrained=None, device="cpu")
        load_strict(self.model, load_checkpoint(path, "hpsv2"), path, "hpsv2")
        self.model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.preprocess = open_clip.image_transform(self.model.visual.image_size, is_train=False,
                                                    resize_mode="longest")

    def _score(self, images, prompts):
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        img = self.model.encode_image(pixels, normalize=True)
        txt = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        return (img * txt).sum(-1)
