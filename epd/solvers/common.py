"""Small pieces every solver shares: the denoiser protocol, the direction, per-row σ, callbacks."""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

Cond = Any  # a tensor, a dict/tuple of tensors with the batch first, or None
StepInfo = dict[str, Any]
Callback = Callable[[StepInfo], None]


class Denoiser(Protocol):
    """``D(x, sigma, cond) -> x0``: x is [B, ...], sigma is [B] (one noise level per row), cond has B rows."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor: ...


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append singleton dims so a [B] (or scalar) tensor broadcasts against a [B, ...] state."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE direction dx/dσ = (x − D(x, σ)) / σ."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def geometric_point(sigma: torch.Tensor, sigma_next: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """τ = σ_next^r · σ^(1−r): the point a fraction r of the way from σ to σ_next in log σ."""
    return sigma_next**r * sigma ** (1 - r)


def denoise(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
    """Call the denoiser with one σ per row (a scalar σ is broadcast to the batch)."""
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return denoiser(x, sigma, cond)


def denoise_first(
    denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, afs: bool, convention: str = "epd"
) -> torch.Tensor:
    """D(x, σ) at a step's start; with ``afs`` (analytic first step, step 0 only) an estimate that needs no call.

    AFS assumes centred data: at σ_max the posterior mean is the data mean, so D = 0 and d_0 = x_0 / σ_0
    (``convention="epd"``, exact as σ → ∞ and at t = 1 for flow matching). ``convention="upstream"`` reproduces the
    EPD authors' d_0 = x_0 / sqrt(1 + σ_0²), i.e. D = x_0 − σ_0 · x_0 / sqrt(1 + σ_0²).
    """
    if not afs:
        return denoise(denoiser, x, sigma, cond)
    if convention == "epd":
        return torch.zeros_like(x)
    if convention == "upstream":
        return x - sigma * x / torch.sqrt(1 + sigma**2)
    raise ValueError(f"unknown AFS convention {convention!r}; expected 'epd' or 'upstream'")


def repeat_rows(cond: Cond, k: int) -> Cond:
    """Repeat each row of ``cond`` k times (row b → rows b·k … b·k + k − 1), through dicts, tuples and lists."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond.repeat_interleave(k, dim=0)
    if isinstance(cond, dict):
        return {key: repeat_rows(v, k) for key, v in cond.items()}
    if isinstance(cond, (tuple, list)):
        return type(cond)(repeat_rows(v, k) for v in cond)
    raise TypeError(f"cannot repeat conditioning of type {type(cond).__name__}; use tensors, dicts or tuples")


def select_rows(cond: Cond, idx: torch.Tensor) -> Cond:
    """Rows ``idx`` of ``cond`` (tensors, or dicts/tuples/lists of them, batch first), e.g. one encoded prompt per
    sample from a table of encoded prompts."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[idx.to(cond.device)]
    if isinstance(cond, dict):
        return {key: select_rows(v, idx) for key, v in cond.items()}
    if isinstance(cond, (tuple, list)):
        return type(cond)(select_rows(v, idx) for v in cond)
    raise TypeError(f"cannot index conditioning of type {type(cond).__name__}; use tensors, dicts or tuples")


def notify(callback: Callback | None, i: int, x: torch.Tensor, sigma, sigma_next, denoised: torch.Tensor) -> None:
    """Report the state after step i: ``x`` is at ``sigma_next``; ``denoised`` is the step's first D output."""
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


def prepare(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Validate the grid and cast it to the state's dtype/device."""
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 points, got shape {tuple(sigmas.shape)}")
    if not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise ValueError("sigmas must be strictly decreasing")
    if bool((sigmas[:-1] <= 0).any()):
        raise ValueError("only the last sigma may be 0")
    return sigmas.to(device=x.device, dtype=x.dtype)
