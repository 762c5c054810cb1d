"""``unet-digits``: a small trained UNet on the scikit-learn digits, EDM-preconditioned, class-conditional with a
null label for classifier-free guidance. Its weights ship in ``data/weights/unet-digits.*`` (``epd train-backbone
--what unet`` remakes them).

Unlike ``gmm-digits`` (the exact denoiser of a mixture centred on every digit) this is a learned denoiser with an
approximation error, like the text-to-image backbones, but small enough to sample thousands of images on a CPU.

Preconditioning (Karras et al. 2022, Table 1), σ_data the std of the centred training pixels:

    D(x, σ) = c_skip(σ) · x + c_out(σ) · F(c_in(σ) · x, c_noise(σ), label)
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ · σ_d / sqrt(σ² + σ_d²),  c_in = 1 / sqrt(σ² + σ_d²),  c_noise = ln(σ) / 4
"""
from __future__ import annotations

import math
import os
from functools import cached_property
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..data import WEIGHTS_DIR, digit_split, labels_from_prompts
from ..io import WeightsError, check_state_dict, load_weights
from ..options import Field
from .base import Backbone, DataPoints

KIND = "unet-digits"
MAKE = "epd train-backbone --what unet"
NULL_LABEL = 10  # embedding row of the unconditional (dropped) label; cond −1 maps here


@dataclass(frozen=True)
class UNetConfig:
    """The architecture; with it the state dict's names and shapes are fixed (the weights' JSON stores it)."""

    resolution: int = 8
    channels: tuple[int, ...] = (32, 64, 64)     # per resolution level: 8×8, 4×4, 2×2
    blocks_per_level: int = 2
    emb_dim: int = 128
    noise_freqs: int = 8                          # Fourier features of c_noise: π·2^k, k = −1 … noise_freqs − 2
    num_classes: int = 10
    dropout: float = 0.1
    sigma_data: float = 0.5

    @classmethod
    def from_json(cls, data: dict) -> "UNetConfig":
        try:
            cfg = cls(**{**data, "channels": tuple(data["channels"])})
            ok = all(isinstance(c, int) and c > 0 for c in cfg.channels) and cfg.blocks_per_level >= 1
        except (TypeError, KeyError) as e:
            raise WeightsError(f"unet-digits architecture config is malformed: {e}") from None
        if not ok:
            raise WeightsError(f"unet-digits architecture config is malformed: {data}")
        return cfg

    def to_json(self) -> dict:
        return {**asdict(self), "channels": list(self.channels)}


def _groups(ch: int) -> int:
    return math.gcd(ch, 16)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, then the embedding as a per-channel scale and shift, → SiLU → dropout → conv."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)   # each block starts as the identity: a deep net trains from step 0
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return (self.skip(x) + self.conv2(self.dropout(h))) * math.sqrt(0.5)


class DigitUNet(nn.Module):
    """The raw network F(x_in, c_noise, label) of the preconditioned denoiser (DDPM-style UNet, no attention:
    at 2×2 a 3×3 convolution already sees the whole image)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, e = cfg.channels, cfg.emb_dim
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(-1, cfg.noise_freqs - 1, dtype=torch.float32),
                             persistent=False)
        self.noise_mlp = nn.Sequential(nn.Linear(2 * cfg.noise_freqs + 1, e), nn.SiLU(), nn.Linear(e, e))
        self.label_emb = nn.Embedding(cfg.num_classes + 1, e)
        self.conv_in = nn.Conv2d(1, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [ch[0]]
        cin = ch[0]
        for i, c in enumerate(ch):
            for _ in range(cfg.blocks_per_level):
                self.down.append(ResBlock(cin, c, e, cfg.dropout))
                cin = c
                skips.append(c)
            if i < len(ch) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(cin, cin, e, cfg.dropout), ResBlock(cin, cin, e, cfg.dropout)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, c in reversed(list(enumerate(ch))):
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(ResBlock(cin + skips.pop(), c, e, cfg.dropout))
                cin = c
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = nn.GroupNorm(_groups(cin), cin)
        self.conv_out = nn.Conv2d(cin, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        arg = c_noise[:, None] * self.freqs
        noise = self.noise_mlp(torch.cat([c_noise[:, None], arg.sin(), arg.cos()], dim=1))
        return F.silu(noise + self.label_emb(torch.where(labels < 0, NULL_LABEL, labels)))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.embed(c_noise, labels)
        levels, nb = len(self.cfg.channels), self.cfg.blocks_per_level
        h = self.conv_in(x)
        hs = [h]
        for i in range(levels):
            for j in range(nb):
                h = self.down[i * nb + j](h, emb)
                hs.append(h)
            if i < levels - 1:
                h = self.downsample[i](h)
                hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for k in range(levels):
            for j in range(nb + 1):
                h = self.up[k * (nb + 1) + j](torch.cat([h, hs.pop()], dim=1), emb)
            if k < levels - 1:
                h = self.upsample[k](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class EDMDenoiser(nn.Module):
    """D(x, σ, label) = c_skip·x + c_out·F(c_in·x, ln σ / 4, label), per-row σ; labels −1 mean the null label."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.net = DigitUNet(cfg)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sd = self.cfg.sigma_data
        s = sigma.reshape(-1, 1, 1, 1)
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        return c_skip * x + c_out * self.net(c_in * x, sigma.log() / 4, labels)


def default_weights() -> Path:

    return WEIGHTS_DIR / "unet-digits"


def load_unet(path: str | os.PathLike | None = None) -> tuple[EDMDenoiser, torch.Tensor, dict]:
    """The trained denoiser (eval mode), the data mean image [1, 8, 8] it was centred by, and the JSON header."""
    tensors, header = load_weights(path or default_weights(), kind=KIND, make=MAKE)
    source = Path(path or default_weights())
    cfg = UNetConfig.from_json(header["config"])
    model = EDMDenoiser(cfg)
    mean = tensors.pop("data_mean", None)
    if mean is None or tuple(mean.shape) != (1, cfg.resolution, cfg.resolution):
        raise WeightsError(f"{source}: data_mean missing or not [1, {cfg.resolution}, {cfg.resolution}]")
    check_state_dict(tensors, model, source)
    model.load_state_dict(tensors)
    return model.eval().requires_grad_(False), mean.float(), header


@dataclass(frozen=True)
class UNetOptions:
    """Options of unet-digits."""

    weight_file: Annotated[str | None, Field(description="weight file stem (NAME.safetensors + NAME.json); none: "
                                                         "the shipped data/weights/unet-digits")] = None
    guidance: Annotated[float, Field(ge=0, description="classifier-free guidance scale (1 = none)")] = 1.0


class UNetDigits(Backbone):
    """The trained digit UNet behind the denoiser protocol; ``cond`` as for gmm-digits (labels, −1 = null label).

    With ``guidance`` w ≠ 1, D = D_u + w · (D_c − D_u) from ONE batched call over [unconditional; conditional] rows;
    rows whose label is −1 stay unconditional.
    """

    name = "unet-digits"
    Options = UNetOptions
    sigma_min = 0.002
    sigma_max = 80.0

    def __init__(self, weight_file: str | os.PathLike | None = None, guidance: float = 1.0):
        self.model, self.data_mean, self.header = load_unet(weight_file)
        res = self.model.cfg.resolution
        self.shape = (1, res, res)
        self.guidance = float(guidance)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must have one value per row, shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        labels = torch.full((x.shape[0],), -1, dtype=torch.long) if cond is None else cond.long()
        if bool((labels > 9).any() | (labels < -1).any()):
            raise ValueError("labels must be digits 0-9, or -1 for unconditional")
        xf, sf = x.float(), sigma.float()
        if self.guidance == 1.0 or cond is None:
            return self.model(xf, sf, labels).to(x.dtype)
        both = self.model(torch.cat([xf, xf]), torch.cat([sf, sf]), torch.cat([torch.full_like(labels, -1), labels]))
        d_u, d_c = both.chunk(2)
        w = torch.where(labels >= 0, self.guidance, 1.0).view(-1, 1, 1, 1)
        return (d_u + w * (d_c - d_u)).to(x.dtype)

    def encode(self, labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None) -> torch.Tensor | None:
        """Conditioning for a batch: labels as given, or parsed from prompts; None if neither (unconditional)."""
        if prompts is not None:
            return labels_from_prompts(list(prompts))
        if labels is not None:
            return torch.as_tensor(labels, dtype=torch.long)
        return None

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float().cpu() + self.data_mean).clamp(-1, 1) + 1) / 2

    @cached_property
    def data(self) -> DataPoints:
        """The training digits, centred by the same mean image: what the network learnt to sample."""

        split = digit_split()
        return DataPoints(split.train_images - self.data_mean.double(), split.train_labels)
