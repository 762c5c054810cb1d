"""FLUX.1 through diffusers' ``FluxPipeline``: ``flux`` (e.g. FLUX.1-dev at 1024²).

A rectified flow like SD3 (x_t = (1 − t)·x0 + t·ε, the transformer predicts v = ε − x0, D = x − t·v, "σ" is the flow
time t ∈ (0, 1]), with three differences the backbone hides from the solvers:

- the transformer reads 2×2 patches of the latents packed into a sequence (``FluxPipeline._pack_latents``), with
  positional ids for the patches and the text tokens; the solver state stays the unpacked [B, C, H, W] latents;
- guidance is embedded: FLUX.1-dev was distilled to take the guidance scale as an input of the transformer, so one
  call per row at scale ``guidance`` (FluxPipeline's ``guidance_scale``, 3.5 by default), not a conditional and an
  unconditional call; the unconditional denoiser is the empty prompt at the same scale. Models without a guidance
  embedding (FLUX.1-schnell) ignore the scale;
- the timestep is t itself (FluxPipeline passes ``timestep / 1000``), and the scheduler shifts its grid by the image
  size (``use_dynamic_shifting``): μ = ``calculate_shift`` of the number of packed tokens (1.15 at 1024²). Grids
  come from ``schedules.flow_match(n, **backbone.schedule_args("flow_match"))`` = ``set_timesteps(n, mu=μ)``.

Loading, text encoding, chunking (``max_batch``), noise and VAE decoding are :class:`~.sd.DiffusersBackbone`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch

from .. import schedules
from ..options import Field
from .sd import DiffusersOptions, DiffusersBackbone


@dataclass(frozen=True)
class FluxOptions(DiffusersOptions):
    """Options of flux."""

    guidance: Annotated[float, Field(ge=0, description="embedded guidance scale (a transformer input, not "
                                                       "classifier-free guidance)")] = 3.5
    max_sequence_length: Annotated[int, Field(ge=1, description="T5 tokens of a prompt")] = 512
    mu: Annotated[float | None, Field(description="the grid's dynamic shift (none: from the resolution, as "
                                                  "FluxPipeline)")] = None


class Flux(DiffusersBackbone):
    """FLUX.1 (``FluxPipeline``): a flow-matching transformer on packed latents with embedded guidance.

    ``max_sequence_length`` caps the T5 prompt tokens (FluxPipeline's default 512); ``mu`` overrides the dynamic
    shift the resolution gives (the grid's ``schedule_args``)."""

    name = "flux"
    Options = FluxOptions
    schedules = ("flow_match",)
    pipeline_class = "FluxPipeline"
    cond_keys = ("prompt_embeds", "pooled_prompt_embeds")
    guidance = 3.5
    sigma_max = 1.0

    def __init__(self, model_path: str | Path | None = None, *, max_sequence_length: int = 512,
                 mu: float | None = None, **options: Any):
        super().__init__(model_path, **options)
        self.max_sequence_length = max_sequence_length
        cfg = self.pipe.scheduler.config
        num_train_timesteps = cfg.get("num_train_timesteps", 1000)
        if cfg.get("use_dynamic_shifting", False) or mu is not None:
            if mu is None:
                from diffusers.pipelines.flux.pipeline_flux import calculate_shift

                tokens = (self.shape[1] // 2) * (self.shape[2] // 2)
                mu = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                     cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
            self.flow_args = {"mu": float(mu), "num_train_timesteps": num_train_timesteps}
        else:
            self.flow_args = {"shift": float(cfg.get("shift", 1.0)), "num_train_timesteps": num_train_timesteps}
        self.sigma_min = float(schedules.flow_match(2, **self.flow_args)[-1])

    def schedule_args(self, schedule: str) -> dict[str, Any]:
        return dict(self.flow_args) if schedule == "flow_match" else {}

    def _check_pipeline(self, pipe):
        if not all(hasattr(pipe, a) for a in ("transformer", "vae", "text_encoder", "text_encoder_2", "encode_prompt",
                                               "_pack_latents", "_unpack_latents")):
            raise TypeError(f"flux needs a FluxPipeline-like object (transformer, vae, CLIP and T5 text encoders), "
                            f"got {type(pipe).__name__}")

    @property
    def network(self):
        return self.pipe.transformer

    def _state_shape(self, resolution) -> tuple[int, int, int]:
        return (self.network.config.in_channels // 4, *self._latent_size(resolution))   # 2×2 patches packed

    def _latent_size(self, resolution) -> tuple[int, int]:
        f = self.pipe.vae_scale_factor
        if resolution is None:
            resolution = self.pipe.default_sample_size * f
        h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if h % (2 * f) or w % (2 * f):
            raise ValueError(f"{self.name}: resolution {h}x{w} must be a multiple of {2 * f} (latents are packed "
                             f"in 2x2 patches)")
        return h // f, w // f

    def encode(self, labels=None, prompts=None, *, negative_prompts=None):
        if negative_prompts is not None:
            raise ValueError("flux uses embedded guidance: there is no unconditional branch for negative prompts")
        return super().encode(labels, prompts)

    def _encode_text(self, prompts):
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, None, device=self.device, num_images_per_prompt=1,
                                                    max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        c = self._network_cond(x, sigma, cond)
        return self.denoise_rows(x, sigma, self.unconditional(x.shape[0]) if c is None else c)

    def _denoise(self, x, sigma, cond):
        B, C, H, W = x.shape
        pipe, f = self.pipe, self.pipe.vae_scale_factor
        packed = pipe._pack_latents(x.to(self.device, self.dtype), B, C, H, W)
        embeds = cond["prompt_embeds"].to(self.device, self.dtype)
        guidance = (torch.full((B,), self.guidance, device=self.device, dtype=torch.float32)
                    if self.network.config.guidance_embeds else None)
        v = pipe.transformer(
            hidden_states=packed,
            timestep=sigma.to(self.device, self.dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"].to(self.device, self.dtype),
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype),
            img_ids=pipe._prepare_latent_image_ids(B, H // 2, W // 2, self.device, self.dtype),
            return_dict=False,
        )[0]
        v = pipe._unpack_latents(v, H * f, W * f, f)
        return x - sigma.to(x.dtype).view(-1, 1, 1, 1) * v.to(x)
