"""ImageReward (Xu et al. 2023): BLIP (ViT-L/16 image encoder, BERT-base text encoder with cross-attention to the
image) and a linear MLP head on the [CLS] state, standardised by the release's mean and std.

The image-reward package pins timm 0.6.13 and fairscale 0.4.13, which do not sit beside this environment, so the
released checkpoint (``ImageReward.pt``) is loaded into the same BLIP built from transformers' ``BlipVisionModel``
and ``BlipTextModel``: the vision keys are renamed from BLIP's timm ViT (``blocks.N.attn.qkv`` →
``encoder.layers.N.self_attn.qkv`` …), the text encoder's BERT keys match as they are. As in the release: prompts
tokenised by bert-base-uncased (plus BLIP's [DEC]/[ENC] tokens) padded to 35 tokens, images resized (shortest
side 224, bicubic), centre-cropped, CLIP-normalised; score = (MLP(text state[CLS]) − 0.1672) / 1.0333, so
generated images score ≈ N(0, 1).

``weights`` is a folder with ``ImageReward.pt`` (or ``ImageReward.safetensors``) and ``med_config.json`` from
huggingface.co/THUDM/ImageReward, and ``vocab.txt`` of bert-base-uncased.
"""
from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from ...io import load_checkpoint, require
from .common import CLIP_MEAN, CLIP_STD, LinearHead, Scorer, load_strict

SOURCE = ("https://huggingface.co/THUDM/ImageReward (ImageReward.pt, med_config.json) and vocab.txt of "
          "https://huggingface.co/google-bert/bert-base-uncased")
MEAN, STD = 0.16717362830052426, 1.0333394966054072   # the release's standardisation of the MLP output
VISION = {"large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)}

# BLIP's timm ViT → transformers' BlipVisionModel
_VISION_KEYS = [(r"^cls_token$", "embeddings.class_embedding"), (r"^pos_embed$", "embeddings.position_embedding"),
                (r"^patch_embed\.proj\.", "embeddings.patch_embedding."), (r"^blocks\.", "encoder.layers."),
                (r"\.norm1\.", ".layer_norm1."), (r"\.norm2\.", ".layer_norm2."), (r"\.attn\.qkv\.", ".self_attn.qkv."),
                (r"\.attn\.proj\.", ".self_attn.projection."), (r"^norm\.", "post_layernorm.")]


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's keys (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``) → ours
    (``vision.*``, ``text.*``, ``mlp.layers.*``). BLIP's contrastive projections and position-id buffer are unused."""
    out = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            k = key[len("blip.visual_encoder."):]
            for pattern, repl in _VISION_KEYS:
                k = re.sub(pattern, repl, k)
            out["vision." + k] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            out["text." + key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp."):
            out[key] = value
    return out


class ImageRewardModel(nn.Module):
    """BLIP's image encoder and image-grounded text encoder, and the reward head."""

    def __init__(self, med_config: dict, vision: dict | None = None):
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        super().__init__()
        # BLIP's ViT: patch 16, exact GELU, LayerNorm eps 1e-6; ViT-L at 224 for ImageReward.
        vcfg = BlipVisionConfig(**{**VISION["large"], "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6,
                                   "hidden_act": "gelu", **(vision or {})})
        med = {k: v for k, v in med_config.items() if k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "max_position_embeddings", "layer_norm_eps", "pad_token_id")}
        # is_decoder=True builds the cross-attention layers; the forward runs bidirectionally (is_decoder=False).
        tcfg = BlipTextConfig(**med, encoder_hidden_size=vcfg.hidden_size, is_decoder=True)
        self.vision = BlipVisionModel(vcfg)
        self.text = BlipTextModel(tcfg, add_pooling_layer=False)
        self.mlp = LinearHead(tcfg.hidden_size)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        state = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                          encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        return (self.mlp(state[:, 0].float())[:, 0] - MEAN) / STD


def blip_tokenizer(folder):
    """bert-base-uncased with BLIP's extra tokens ([DEC] as bos, [ENC]): vocabulary 30524, as the checkpoint."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


class ImageReward(Scorer):
    name = "imagereward"
    range = (float("-inf"), float("inf"))

    def __init__(self, weights: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                 batch_size: int = 16):
        from torchvision import transforms as T

        super().__init__(device, batch_size)
        folder = require(weights, "imagereward", SOURCE)
        ckpt = next((folder / n for n in ("ImageReward.safetensors", "ImageReward.pt") if (folder / n).exists()),
                    folder / "ImageReward.pt")
        require(ckpt, "imagereward", SOURCE)
        med = json.loads(require(folder / "med_config.json", "imagereward", SOURCE).read_text())
        require(folder / "vocab.txt", "imagereward tokenizer", SOURCE)
        vision = folder / "vision_config.json"   # optional: another BLIP ViT than ImageReward's ViT-L/16 at 224
        self.model = ImageRewardModel(med, json.loads(vision.read_text()) if vision.exists() else None)
        load_strict(self.model, convert_state_dict(load_checkpoint(ckpt, "imagereward")), ckpt, "imagereward")
        self.model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = blip_tokenizer(folder)
        size = self.model.vision.config.image_size
        self.preprocess = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                                     T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])

    def _score(self, images, prompts):
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                return_tensors="pt").to(self.device)
        return self.model(pixels, tokens["input_ids"], tokens["attention_mask"])
