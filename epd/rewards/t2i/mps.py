"""MPS, Multi-dimensional Preference Score (Zhang et al., CVPR 2024, Kwai-Kolors/MPS), overall-preference model.

CLIP-H (transformers) with condition-aware cross-attention, as in the release's ``trainer/models``:

- text tokens T = text_projection(final text states) [b, 77, d], the prompt embedding t = text_projection(EOS);
  image tokens I = visual_projection(vision states before the post-LayerNorm) [b, 257, d]; condition tokens C
  for the fixed condition sentence (``CONDITION``, the release's "overall" condition).
- mask: a text token is visible where its largest similarity to any condition token, divided by the maximum, is
  > 0.01. The release divides by the maximum over the whole batch (with its one prompt per call); here by each
  row's own maximum, so a score does not depend on what else is in the batch (identical for one prompt).
- four blocks of [cross-attention of image tokens to visible text tokens (multi-query, parallel SwiGLU
  feed-forward), parallel self-attention + feed-forward block with rotary embeddings], each residual; the image
  feature is the first (CLS) token. Score = exp(logit_scale) · cos(image feature, t), ≈ the PickScore scale.

Weights: the release's ``MPS_overall_checkpoint.pth`` is a whole pickled model (``torch.save(model)``), which
``torch.load(weights_only=True)`` refuses. It is read with :func:`epd.pickled.pickled_module_state_dict`, which
executes nothing from the file: every class the pickle names becomes an inert stand-in that only records its
state, and the tensors are rebuilt from the archive's storages. A state dict (.pt/.pth, or .safetensors) with the
same keys loads directly. The architecture config, processor and tokenizer come from the CLIP-H folder
(``processor``: laion/CLIP-ViT-H-14-laion2B-s32B-b79K's config.json, preprocessor and tokenizer files).
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

from ...io import load_checkpoint, require
from ...pickled import pickled_module_state_dict
from .common import Scorer, load_clip_processor, load_strict

SOURCE = "MPS_overall_checkpoint.pth from https://github.com/Kwai-Kolors/MPS (its README's Google Drive link)"
PROCESSOR_SOURCE = ("config.json, preprocessor_config.json and tokenizer files of "
                    "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
             "instance, texture, quantity, attributes, position, number, location, word, things.")


class LayerNorm(nn.Module):
    """LayerNorm without a learned bias (a zero buffer, as the release's, so the checkpoint keys match)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args):
        return self.fn(x, *args) + x


class SwiGLU(nn.Module):
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


def _rotate_half(x):
    x1, x2 = x.unflatten(-1, (2, -1)).unbind(-2)
    return torch.cat((-x2, x1), dim=-1)


def _heads(x, h):  # [b, n, h·d] → [b, h, n, d]
    return x.unflatten(-1, (h, -1)).transpose(1, 2)


class ParallelTransformerBlock(nn.Module):
    """PaLM-style block: one fused projection to q (multi-head), k and v (one head), and a SwiGLU feed-forward;
    rotary position embeddings on q and k."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.heads, self.scale = heads, dim_head ** -0.5
        self.fused_dims = (dim_head * heads, dim_head, dim_head, dim * ff_mult * 2)
        self.rotary_emb = nn.Module()
        self.rotary_emb.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim_head, 2).float() / dim_head)))
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(dim_head * heads, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(dim * ff_mult, dim, bias=False))

    def forward(self, x):
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)
        q = _heads(q, self.heads)
        freqs = torch.outer(torch.arange(x.shape[1], device=x.device, dtype=self.rotary_emb.inv_freq.dtype),
                            self.rotary_emb.inv_freq)
        pos = torch.cat((freqs, freqs), dim=-1)
        q, k = (t * pos.cos() + _rotate_half(t) * pos.sin() for t in (q, k))
        sim = torch.einsum("bhid,bjd->bhij", q * self.scale, k)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).flatten(2)
        return self.attn_out(out) + self.ff_out(ff)


class CrossAttention(nn.Module):
    """Multi-query cross-attention of x to a context under an additive mask, with a parallel SwiGLU feed-forward."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, dim * ff_mult * 2, bias=False), SwiGLU(),
                                nn.Linear(dim * ff_mult, dim, bias=False))

    def forward(self, x, context, mask):
        x = self.norm(x)
        q = _heads(self.to_q(x), self.heads) * self.scale
        k, v = self.to_kv(context).chunk(2, dim=-1)
        sim = torch.einsum("bhid,bjd->bhij", q, k) + mask[:, None]
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).flatten(2)
        return self.to_out(out) + self.ff(x)


class CrossModel(nn.Module):
    def __init__(self, dim: int, layer_num: int = 4, dim_head: int = 64, heads: int = 16, ff_mult: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleList([
            Residual(CrossAttention(dim, dim_head, heads, ff_mult)),
            Residual(ParallelTransformerBlock(dim, dim_head, heads, ff_mult))]) for _ in range(layer_num))

    def forward(self, query, context, mask):
        for cross_attn, block in self.layers:
            query = block(cross_attn(query, context, mask))
        return query


class MPSModel(nn.Module):
    """``model`` (a transformers CLIPModel) + ``cross_model``: the release's module layout and checkpoint keys."""

    def __init__(self, clip_config):
        from transformers import CLIPModel

        super().__init__()
        self.model = CLIPModel(clip_config)
        dim = clip_config.projection_dim
        self.cross_model = CrossModel(dim, layer_num=4, dim_head=64, heads=dim // 64)  # CLIP-H: 1024 = 16 × 64

    def text_tokens(self, input_ids):
        out = self.model.text_model(input_ids=input_ids)
        return self.model.text_projection(out.last_hidden_state), self.model.text_projection(out.pooler_output)

    def forward(self, pixels, input_ids, condition_ids):
        text, text_eos = self.text_tokens(input_ids)
        condition, _ = self.text_tokens(condition_ids)
        image = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).last_hidden_state)
        sim = torch.einsum("bid,bjd->bji", text, condition).amax(dim=1, keepdim=True)        # [b, 1, 77]
        sim = sim / sim.amax(dim=(1, 2), keepdim=True)
        mask = torch.zeros_like(sim).masked_fill(sim <= 0.01, float("-inf")).expand(-1, image.shape[1], -1)
        image_feature = self.cross_model(image, text, mask)[:, 0]
        cos = (F.normalize(image_feature, dim=-1) * F.normalize(text_eos, dim=-1)).sum(-1)
        return self.model.logit_scale.exp() * cos


class MPS(Scorer):
    name = "mps"
    range = (-100.0, 100.0)   # exp(logit_scale) · cos

    def __init__(self, weights: str | os.PathLike | None = None, *, processor: str | os.PathLike | None = None,
                 condition: str = CONDITION, device: str | torch.device | None = None, batch_size: int = 16):
        """``weights``: the MPS checkpoint (the released pickled model, or a state dict); ``processor``: the CLIP-H
        folder with config.json, preprocessor and tokenizer files."""
        from transformers import CLIPConfig

        super().__init__(device, batch_size)
        path = require(weights, "mps", SOURCE)
        folder = require(processor, "mps processor (CLIP-H)", PROCESSOR_SOURCE)
        require(folder / "config.json", "mps processor (CLIP-H)", PROCESSOR_SOURCE)
        proc = load_clip_processor(folder, "mps")
        self.image_processor, self.tokenizer = proc.image_processor, proc.tokenizer
        self.model = MPSModel(CLIPConfig.from_pretrained(str(folder), local_files_only=True))
        try:
            state = load_checkpoint(path, "mps")
        except ValueError:   # the released whole-model pickle: read its tensors without executing it
            state = pickled_module_state_dict(path)
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        load_strict(self.model, state, path, "mps")
        self.model.float().eval().requires_grad_(False).to(self.device)
        self.condition = condition

    def _tokens(self, texts):
        # the release pads to tokenizer.model_max_length, 77 for CLIP-H: the text tower's context
        length = self.model.model.config.text_config.max_position_embeddings
        return self.tokenizer(texts, max_length=length, padding="max_length",
                              truncation=True, return_tensors="pt")["input_ids"].to(self.device)

    def _score(self, images, prompts):
        pixels = self.image_processor(images, return_tensors="pt")["pixel_values"].to(self.device)
        return self.model(pixels, self._tokens(prompts), self._tokens([self.condition] * len(prompts)))
