"""Text-to-image backbones through diffusers: ``sd15`` (Stable Diffusion 1.5) and ``sd3`` (SD3-Medium).

Both load a diffusers pipeline from a local folder or a hub id (``model_path``), or take a pipeline object, and
put its network behind the one denoiser protocol ``D(x, sigma[B], cond) -> x0``:

- ``sd15``: VP, ε-prediction, 1000 discrete training steps. The solvers run in EDM's σ-space (x = x0 + σ·ε); the
  UNet sees ``x / sqrt(1 + σ²)`` (the VP state) at the continuous timestep t(σ) interpolated in log σ between the
  training σ (k-diffusion's ``DiscreteEpsDDPMDenoiser``), and D = x − σ·ε̂.
- ``sd3``: rectified flow, x_t = (1 − t)·x0 + t·ε. The solvers run in the flow's own time: "σ" is t ∈ (0, 1], the
  transformer sees timestep 1000·t and predicts v = dx/dt = ε − x0, and D = x − t·v. The flow ODE
  dx/dt = (x − D)/t has the same form as EDM's, so every solver applies unchanged; grids come from
  ``epd.schedules.flow_match(n, shift)`` (``backbone.schedule_args("flow_match")``).

``cond`` is what :meth:`encode` returns for a batch of prompts: a dict of tensors with the batch first
(``prompt_embeds``, and ``pooled_prompt_embeds`` for SD3), so the solvers can repeat its rows for EPD's K points.
The unconditional (negative-prompt) embedding is computed once and kept in the backbone; an ``encode`` call with
``negative_prompts`` adds per-row ``negative_*`` entries instead. Classifier-free guidance with scale w is one
batched call over [unconditional; conditional] rows, D = D_u + w·(D_c − D_u) (w = 1: conditional rows only);
``max_batch`` splits every network call into chunks of at most that many rows, with the same result.

diffusers (and transformers for the text encoders) are imported only when a backbone is built.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import torch

from .. import schedules
from ..options import Field
from .base import SIGMA_GRIDS, Backbone

# A hub id: "name" or "org/name" (letters, digits, "-", "_", "."), not starting with "." or "~".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_MUST_BE = ("model_path must be a diffusers pipeline folder (written by save_pretrained, with model_index.json) "
            "or a hub id")


def resolve_model_path(model_path: str | Path) -> tuple[str, dict[str, Any]]:
    """``model_path`` → (what to pass to ``from_pretrained``, extra loading options).

    An existing folder must hold a diffusers pipeline; components its ``model_index.json`` lists as null (e.g. an
    SD3 saved without T5) are loaded as None. A string that names no folder is taken as a hub id if it looks like
    one (``org/name``; write ``./org/name`` to mean a local folder), otherwise it is a missing path.
    """
    p = Path(model_path).expanduser()
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{p} has no model_index.json: {_MUST_BE}")
        nulls = {k: None for k, v in json.loads(index.read_text()).items() if v == [None, None]}
        return str(p), nulls
    if p.exists():
        raise FileNotFoundError(f"{p} is a file, not a folder (single-file checkpoints are not supported): {_MUST_BE}")
    s = str(model_path)
    if not _HUB_ID.match(s):
        raise FileNotFoundError(f"model path {s!r} does not exist: {_MUST_BE}")
    return s, {}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"float16"``, ``"fp16"``, ``"bfloat16"``, ``torch.float32`` … → a torch floating dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}.get(
        str(dtype), str(dtype))
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}; expected e.g. float32, float16 or bfloat16")
    return value


def sigma_to_t(sigma: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous DDPM timestep of each σ: linear interpolation of log σ between the training σ (increasing, index =
    timestep), as k-diffusion's ``sigma_to_t``. Exact integers at the training σ; clamped to [0, T − 1] outside."""
    log_train = train_sigmas.to(sigma.device, torch.float64).log()
    log_sigma = sigma.to(torch.float64).log()
    lo = (torch.searchsorted(log_train, log_sigma, right=True) - 1).clamp(0, len(log_train) - 2)
    w = ((log_sigma - log_train[lo]) / (log_train[lo + 1] - log_train[lo])).clamp(0, 1)
    return lo + w


def _rows(cond: dict[str, torch.Tensor], sl: slice) -> dict[str, torch.Tensor]:
    return {k: v[sl] for k, v in cond.items()}


@dataclass(frozen=True)
class DiffusersOptions:
    """Options of the diffusers backbones."""

    model_path: Annotated[str | None, Field(description="local diffusers pipeline folder (save_pretrained) or hub id; "
                                                        "required")] = None
    dtype: Annotated[Literal["float32", "float16", "bfloat16", "float64"] | None,
                     Field(description="network dtype (none: float32)")] = None
    device: Annotated[str | None, Field(description="device (none: cuda if there is one, else cpu)")] = None
    cpu_offload: Annotated[bool, Field(description="keep each network on the CPU until it runs (needs a GPU)")] = False
    max_batch: Annotated[int | None, Field(ge=1, description="most rows in one network call, for memory (none: "
                                                             "all)")] = None
    resolution: Annotated[int | None, Field(ge=8, description="image side (none: the model's own)")] = None
    guidance: Annotated[float, Field(ge=0, description="classifier-free guidance scale (1 = none)")] = 1.0
    negative_prompt: Annotated[str, Field(description="the unconditional prompt of guidance")] = ""
    local_files_only: Annotated[bool, Field(description="never download, even for a hub id")] = False
    load_options: Annotated[dict[str, Any], Field(description="extra from_pretrained options, e.g. "
                                                              '{"variant": "fp16"}')] = field(default_factory=dict)


@dataclass(frozen=True)
class SD15Options(DiffusersOptions):
    """Options of sd15."""

    guidance: Annotated[float, Field(ge=0, description="classifier-free guidance scale (1 = none)")] = 7.5


@dataclass(frozen=True)
class SD3Options(DiffusersOptions):
    """Options of sd3."""

    guidance: Annotated[float, Field(ge=0, description="classifier-free guidance scale (1 = none)")] = 4.5
    max_sequence_length: Annotated[int, Field(ge=1, description="T5 tokens of a prompt")] = 256


class DiffusersBackbone(Backbone):
    """What SD1.5 and SD3 share: loading, text encoding, guidance batching, chunking, noise and VAE decoding.

    Subclasses name their pipeline class and network, and implement ``_denoise`` (one chunk of rows, no guidance),
    ``_encode_text`` (prompts → dict of embeddings) and ``_check_pipeline``.
    """

    pipeline_class = ""            # diffusers pipeline class used to load model_path
    cond_keys: tuple[str, ...] = ()  # entries of cond the network reads
    gpu = True

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        pipeline: Any = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        cpu_offload: bool = False,
        guidance: float | None = None,
        max_batch: int | None = None,
        resolution: int | Sequence[int] | None = None,
        negative_prompt: str = "",
        local_files_only: bool = False,
        load_options: dict[str, Any] | None = None,
    ):
        """``model_path``: diffusers folder or hub id (or give ``pipeline``, a loaded diffusers pipeline object).
        ``dtype`` of the networks (the solver state keeps its own, float32 by default); ``device`` defaults to
        cuda when there is one; ``cpu_offload`` keeps each network on the CPU until it runs (needs an
        accelerator). ``max_batch`` caps the rows of one network call (after guidance doubling) and of one VAE
        decode. ``resolution`` is the image side (or (height, width)), default the network's native size.
        ``load_options`` go to ``from_pretrained`` (e.g. ``variant="fp16"``, ``text_encoder_3=None``); a hub id
        is downloaded unless cached or ``local_files_only``."""
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        dtype = parse_dtype(dtype)
        if pipeline is None:
            if model_path is None:
                raise ValueError(f"{self.name}: give model_path (a diffusers folder or hub id) or a pipeline object")
            pipeline = self._load(model_path, dtype, local_files_only, load_options or {})
        elif model_path is not None:
            raise ValueError(f"{self.name}: give model_path or pipeline, not both")
        elif dtype is not None:
            pipeline.to(dtype=dtype)
        self._check_pipeline(pipeline)
        if cpu_offload:
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            if device.type == "cpu":
                raise ValueError(f"{self.name}: cpu_offload moves each network to an accelerator when it runs; "
                                 f"there is none here (device {device}). Run without cpu_offload on the CPU.")
            pipeline.enable_model_cpu_offload(device=device)
        elif device is not None or model_path is not None:
            pipeline.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.pipe = pipeline
        self.guidance = float(self.guidance if guidance is None else guidance)
        self.max_batch = max_batch
        self.negative_prompt = negative_prompt
        self._uncond: dict[str, torch.Tensor] | None = None
        self.shape = self._state_shape(resolution)

    # --- loading -------------------------------------------------------------------------------------------------

    def _load(self, model_path, dtype, local_files_only, load_options):
        import diffusers

        source, nulls = resolve_model_path(model_path)
        options = {**nulls, **self._default_load_options(), **load_options}
        if dtype is not None:
            options["torch_dtype"] = dtype
        cls = getattr(diffusers, self.pipeline_class)
        try:
            with warnings.catch_warnings():  # newer diffusers prefer dtype=; torch_dtype= works in every version
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = cls.from_pretrained(source, local_files_only=local_files_only, **options)
        except (OSError, ValueError) as e:
            where = "the folder" if Path(source).is_dir() else "the hub id (not a local folder either)"
            raise ValueError(f"{self.name}: could not load {source!r} as a {self.pipeline_class} from {where}: {e}. "
                             f"{_MUST_BE}.") from e
        for name, module in pipe.components.items():
            if not isinstance(module, torch.nn.Module):
                continue
            module.requires_grad_(False)
            # diffusers 0.42 without accelerate leaves SD3's transformer in float32 whatever torch_dtype says. Only
            # diffusers' own models are cast: transformers' T5 keeps some layers in float32 on purpose.
            if dtype is not None and name in ("unet", "transformer", "vae") and module.dtype != dtype:
                module.to(dtype)
        return pipe

    def _default_load_options(self) -> dict[str, Any]:
        return {}

    def _check_pipeline(self, pipe) -> None:
        raise NotImplementedError

    @property
    def network(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where the networks run (the accelerator under cpu_offload)."""
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    def _state_shape(self, resolution) -> tuple[int, int, int]:
        """(C, H, W) of the solver state: the network's latents."""
        return (self.network.config.in_channels, *self._latent_size(resolution))

    def _latent_size(self, resolution) -> tuple[int, int]:
        f = self.pipe.vae_scale_factor
        multiple = f * getattr(self.network.config, "patch_size", 1)
        if resolution is None:
            sample = self.network.config.sample_size
            return (sample, sample) if isinstance(sample, int) else tuple(sample)
        h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if h % multiple or w % multiple:
            raise ValueError(f"{self.name}: resolution {h}x{w} must be a multiple of {multiple}")
        return h // f, w // f

    @property
    def resolution(self) -> tuple[int, int]:
        """(height, width) of the decoded images."""
        return self.shape[1] * self.pipe.vae_scale_factor, self.shape[2] * self.pipe.vae_scale_factor

    # --- conditioning --------------------------------------------------------------------------------------------

    def encode(self, labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None, *,
               negative_prompts: Sequence[str] | None = None) -> dict[str, torch.Tensor] | None:
        """Text embeddings for a batch of prompts, computed once: a dict of [B, …] tensors; None if no prompts
        (unconditional). ``negative_prompts`` (one per prompt) replace the backbone's ``negative_prompt``."""
        if labels is not None:
            raise ValueError(f"{self.name} is a text-to-image backbone: give prompts, not labels")
        if prompts is None:
            return None
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with torch.no_grad():
            cond = self._encode_text(prompts)
            if negative_prompts is not None:
                if len(negative_prompts) != len(prompts):
                    raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
                cond.update({f"negative_{k}": v for k, v in self._encode_text(list(negative_prompts)).items()})
        return cond

    def unconditional(self, batch: int) -> dict[str, torch.Tensor]:
        """The negative-prompt embeddings (computed on first use, then kept), expanded to ``batch`` rows."""
        if self._uncond is None:
            with torch.no_grad():
                self._uncond = self._encode_text([self.negative_prompt])
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._uncond.items()}

    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- the denoiser --------------------------------------------------------------------------------------------

    def _network_cond(self, x: torch.Tensor, sigma: torch.Tensor,
                      cond: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """Check a call's shapes; the entries of ``cond`` the network reads (None: unconditional)."""
        B = x.shape[0]
        if sigma.shape != (B,):
            raise ValueError(f"sigma must have one value per row, shape ({B},), got {tuple(sigma.shape)}")
        if cond is None:
            return None
        missing = [k for k in self.cond_keys if k not in cond]
        if missing or any(v.shape[0] != B for v in cond.values()):
            raise ValueError(f"{self.name}: cond must be encode(prompts=...) for the same {B} rows (keys "
                             f"{list(self.cond_keys)}), got { {k: tuple(v.shape) for k, v in cond.items()} }")
        return {k: cond[k] for k in self.cond_keys}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        B = x.shape[0]
        c = self._network_cond(x, sigma, cond)
        if c is None:  # unconditional: the negative prompt for every row, no guidance
            return self.denoise_rows(x, sigma, self.unconditional(B))
        if self.guidance == 1.0:
            return self.denoise_rows(x, sigma, c)
        u = ({k: cond[f"negative_{k}"] for k in self.cond_keys} if f"negative_{self.cond_keys[0]}" in cond
             else self.unconditional(B))
        both = {k: torch.cat([u[k].to(c[k]), c[k]]) for k in self.cond_keys}
        d_u, d_c = self.denoise_rows(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        return d_u + self.guidance * (d_c - d_u)

    def denoise_rows(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """D for every row with its own embeddings (no guidance), in chunks of at most ``max_batch`` rows."""
        step = self.max_batch or x.shape[0]
        out = [self._denoise(x[s:s + step], sigma[s:s + step], _rows(cond, slice(s, s + step)))
               for s in range(0, x.shape[0], step)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # --- noise and pixels ----------------------------------------------------------------------------------------

    def noise(self, seeds: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """σ_max · ε per seed (drawn on the CPU, so the same on every device), on the backbone's device."""
        return super().noise(seeds, dtype).to(self.device)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Latents → VAE decode → float32 pixels [B, 3, H, W] in [0, 1] (on the CPU)."""
        vae = self.pipe.vae
        latents = x / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        step = self.max_batch or x.shape[0]
        images = [vae.decode(latents[s:s + step].to(self.device, vae.dtype)).sample.float().cpu()
                  for s in range(0, x.shape[0], step)]
        return ((torch.cat(images) + 1) / 2).clamp(0, 1)


class StableDiffusion15(DiffusersBackbone):
    """Stable Diffusion 1.5 (``StableDiffusionPipeline``): ε-prediction on SD's discrete VP schedule, as an EDM
    denoiser. Default grid range: the first and last training σ (≈ 0.0292 and ≈ 14.6146); use
    ``epd.schedules.discrete`` or any continuous schedule between them."""

    name = "sd15"
    Options = SD15Options
    schedules = ("discrete", *SIGMA_GRIDS)   # SD's own steps, or any continuous grid on its σ range
    pipeline_class = "StableDiffusionPipeline"
    cond_keys = ("prompt_embeds",)
    guidance = 7.5

    def __init__(self, model_path: str | Path | None = None, **options: Any):
        super().__init__(model_path, **options)
        cfg = self.pipe.scheduler.config
        if cfg.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"sd15: only ε-prediction models are supported, the scheduler says "
                             f"prediction_type={cfg['prediction_type']!r}")
        if cfg.get("beta_schedule") != "scaled_linear":
            raise ValueError(f"sd15: expected SD's scaled_linear betas, the scheduler has {cfg.get('beta_schedule')!r}")
        self.train_sigmas = schedules.discrete_sigmas(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"])
        self.sigma_min, self.sigma_max = float(self.train_sigmas[0]), float(self.train_sigmas[-1])

    def _default_load_options(self):
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def _check_pipeline(self, pipe):
        if not all(hasattr(pipe, a) for a in ("unet", "vae", "text_encoder", "encode_prompt")):
            raise TypeError(f"sd15 needs a StableDiffusionPipeline-like object (unet, vae, text_encoder), got "
                            f"{type(pipe).__name__}")

    @property
    def network(self):
        return self.pipe.unet

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma_to_t(sigma, self.train_sigmas)

    def _encode_text(self, prompts):
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"prompt_embeds": embeds}

    def _denoise(self, x, sigma, cond):
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        x_in = (x / (s**2 + 1).sqrt()).to(self.device, self.dtype)
        t = self.sigma_to_t(sigma).to(self.device, torch.float32)
        eps = self.pipe.unet(x_in, t, encoder_hidden_states=cond["prompt_embeds"].to(self.device, self.dtype)).sample
        return x - s * eps.to(x)


class StableDiffusion3(DiffusersBackbone):
    """Stable Diffusion 3 (``StableDiffusion3Pipeline``, e.g. SD3-Medium at 512 or 1024): velocity v = dx/dt of the
    rectified flow x_t = (1 − t)·x0 + t·ε, as D = x − t·v. σ is the flow time t: σ_max = 1, σ_min the smallest
    shifted training t; grids from ``epd.schedules.flow_match(n, **backbone.schedule_args("flow_match"))``."""

    name = "sd3"
    Options = SD3Options
    schedules = ("flow_match",)
    pipeline_class = "StableDiffusion3Pipeline"
    cond_keys = ("prompt_embeds", "pooled_prompt_embeds")
    guidance = 4.5
    sigma_max = 1.0

    def __init__(self, model_path: str | Path | None = None, *, max_sequence_length: int = 256, **options: Any):
        super().__init__(model_path, **options)
        self.max_sequence_length = max_sequence_length
        cfg = self.pipe.scheduler.config
        self.num_train_timesteps = cfg.get("num_train_timesteps", 1000)
        self.flow_args = {"shift": float(cfg.get("shift", 1.0)), "num_train_timesteps": self.num_train_timesteps}
        self.sigma_min = float(schedules.flow_match(2, **self.flow_args)[-1])

    def schedule_args(self, schedule: str) -> dict[str, Any]:
        return dict(self.flow_args) if schedule == "flow_match" else {}

    def _check_pipeline(self, pipe):
        if not all(hasattr(pipe, a) for a in ("transformer", "vae", "text_encoder", "encode_prompt")):
            raise TypeError(f"sd3 needs a StableDiffusion3Pipeline-like object (transformer, vae, text encoders), "
                            f"got {type(pipe).__name__}")

    @property
    def network(self):
        return self.pipe.transformer

    def _encode_text(self, prompts):
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _denoise(self, x, sigma, cond):
        t = sigma.to(x.dtype).view(-1, 1, 1, 1)
        v = self.pipe.transformer(
            hidden_states=x.to(self.device, self.dtype),
            timestep=(sigma * self.num_train_timesteps).to(self.device, torch.float32),
            encoder_hidden_states=cond["prompt_embeds"].to(self.device, self.dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(self.device, self.dtype),
        ).sample
        return x - t * v.to(x)
