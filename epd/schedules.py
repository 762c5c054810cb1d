"""Time grids for the ODE solvers, in the σ-parametrisation of EDM (x_σ = x_0 + σ·ε).

Every builder returns a strictly decreasing float64 tensor ``[σ_0 > … > σ_{N-1}]`` of length N = num_steps. The grid
is built in float64 (as EDM's ``generate.py`` does) because ρ-th powers and logarithms of σ near 0.002 lose digits
in float32; solvers cast it to the state's dtype. A solver never knows which schedule made its grid.

Flow-matching backbones (SD3, FLUX) use the same solvers with σ read as the flow time t ∈ (0, 1] (``x_t = (1−t)·x_0 +
t·ε``, ``D = x − t·v``); :func:`flow_match` returns that t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from .options import Field

__all__ = [
    "SCHEDULES",
    "append_zero",
    "discrete",
    "discrete_sigmas",
    "flow_match",
    "get_sigmas",
    "logsnr",
    "polynomial",
    "time_uniform",
]

# The VP-SDE of Song et al. that EDM calls "vp": σ(t) = sqrt(exp(½·β_d·t² + β_min·t) − 1).
VP_BETA_MIN = 0.1
VP_BETA_D = 19.9


def _check(num_steps: int, sigma_min: float, sigma_max: float) -> None:
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (a grid needs two ends), got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def polynomial(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's grid: uniform in σ^(1/ρ) (diffusers: ``use_karras_sigmas`` / ``sigma_schedule="karras"``)."""
    _check(num_steps, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def logsnr(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """Uniform in log σ, i.e. in logSNR = −2 log σ (diffusers: ``sigma_schedule="exponential"``)."""
    _check(num_steps, sigma_min, sigma_max)
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=torch.float64).exp()


def _vp_sigma(t: torch.Tensor) -> torch.Tensor:
    return torch.expm1(0.5 * VP_BETA_D * t**2 + VP_BETA_MIN * t).sqrt()


def _vp_t(sigma: float) -> float:
    # Inverse of _vp_sigma: root of ½·β_d·t² + β_min·t − log(1 + σ²) = 0.
    c = math.log1p(sigma**2)
    return (math.sqrt(VP_BETA_MIN**2 + 2 * VP_BETA_D * c) - VP_BETA_MIN) / VP_BETA_D


def time_uniform(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """Uniform in the VP-SDE time t (DPM-Solver's ``time_uniform``), mapped to σ(t)."""
    _check(num_steps, sigma_min, sigma_max)
    t = torch.linspace(_vp_t(sigma_max), _vp_t(sigma_min), num_steps, dtype=torch.float64)
    sigmas = _vp_sigma(t)
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # pin the ends exactly against round-off in the inversion
    return sigmas


def discrete_sigmas(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """σ of each of SD1.5's training timesteps (scaled-linear DDPM betas), index = timestep, increasing."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def discrete(
    num_steps: int,
    spacing: str = "leading",
    steps_offset: int = 1,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """SD1.5's grid: σ at ``num_steps`` of the 1000 training timesteps, chosen as diffusers' ``timestep_spacing``.

    ``spacing`` is ``"leading"`` (SD1.5's scheduler config, with ``steps_offset=1``), ``"trailing"`` or
    ``"linspace"``; the last one interpolates σ between training timesteps, as diffusers' Euler scheduler does.
    """
    if num_steps < 2 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in [2, {num_train_timesteps}], got {num_steps}")
    T = num_train_timesteps
    if spacing == "leading":
        ratio = T // num_steps
        t = torch.arange(num_steps, dtype=torch.float64).flip(0) * ratio + steps_offset
    elif spacing == "trailing":
        ratio = T / num_steps
        t = (torch.arange(T, 0, -ratio, dtype=torch.float64).round() - 1)[:num_steps]
    elif spacing == "linspace":
        t = torch.linspace(0, T - 1, num_steps, dtype=torch.float64).flip(0)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected 'leading', 'trailing' or 'linspace'")
    table = discrete_sigmas(beta_start, beta_end, T)
    # Linear interpolation in σ between neighbouring training timesteps (diffusers' np.interp).
    lo = t.floor().long().clamp(0, T - 1)
    hi = (lo + 1).clamp(max=T - 1)
    w = t - lo
    return (1 - w) * table[lo] + w * table[hi]


def flow_match(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000, mu: float | None = None
               ) -> torch.Tensor:
    """Flow-matching grids of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps)``, without its
    trailing 0: flow times t uniform in [t_min, 1], then shifted.

    - SD3 (a fixed ``shift``): t' = shift·t / (1 + (shift − 1)·t), with t_min the shifted smallest training t
      (1/num_train_timesteps), so that end is shifted twice, as in diffusers.
    - FLUX (``mu``, the resolution-dependent shift of ``use_dynamic_shifting``; FLUX.1 at 1024² has μ = 1.15):
      t' = e^μ / (e^μ + 1/t − 1), with t_min = 1/num_train_timesteps unshifted; ``shift`` is then unused, as in
      diffusers. (FluxPipeline itself passes its own t = linspace(1, 1/num_steps) instead.)
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if mu is not None:
        if not math.isfinite(mu):
            raise ValueError(f"mu must be finite, got {mu}")
        t = torch.linspace(1.0, 1.0 / num_train_timesteps, num_steps, dtype=torch.float64)
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")

    def shifted(t: torch.Tensor | float):
        return shift * t / (1 + (shift - 1) * t)

    t_min = shifted(1.0 / num_train_timesteps)
    t = torch.linspace(1.0, t_min, num_steps, dtype=torch.float64)
    return shifted(t)


SCHEDULES = {
    "polynomial": polynomial,
    "logsnr": logsnr,
    "time_uniform": time_uniform,
    "discrete": discrete,
    "flow_match": flow_match,
}


@dataclass(frozen=True)
class ScheduleOptions:
    """The time grid (config section ``schedule``) of the teacher, the distilled tables and the baselines; its σ
    range (and, for flow matching, the shift) comes from the backbone."""

    name: Annotated[Literal[tuple(SCHEDULES)], Field(description="grid family", json_schema_extra={"flag": "--schedule"})] = "polynomial"
    rho: Annotated[float, Field(gt=0, description="exponent of the polynomial schedule")] = 7.0


def get_sigmas(
    schedule: str,
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    **kwargs,
) -> torch.Tensor:
    """Build a grid by name. ``sigma_min``/``sigma_max`` apply to the continuous schedules; ``rho`` to polynomial."""
    if schedule == "polynomial":
        return polynomial(num_steps, sigma_min, sigma_max, rho)
    if schedule in ("logsnr", "time_uniform"):
        return SCHEDULES[schedule](num_steps, sigma_min, sigma_max)
    if schedule in ("discrete", "flow_match"):
        return SCHEDULES[schedule](num_steps, **kwargs)
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {sorted(SCHEDULES)}")


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """Add σ = 0 at the end: the solvers then finish with a plain denoise (first-order step into 0)."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])
