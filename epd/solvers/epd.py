"""EPD-Solver and EPD-Plugin (Zhu et al., ICCV 2025, "Distilling Parallel Gradients for Fast ODE Solvers of
Diffusion Models").

Step n, grid σ_n > σ_{n+1} > 0, table row (r, λ, c, a) with K entries:

    d_n   = (x_n − D(x_n, σ_n)) / σ_n              (AFS on step 0: D ≈ 0, no call)
    τ_k   = σ_{n+1}^{r_k} · σ_n^{1 − r_k}
    x̃_k  = x_n + (τ_k − σ_n) · d̂_n                 d̂_n = d_n, or the iPNDM direction for EPD-Plugin
    g_k   = (x̃_k − D(x̃_k, a_k · τ_k)) / τ_k         ONE denoiser call over all B·K rows, per-row σ
    x_n+1 = x_n + (σ_{n+1} − σ_n) · Σ_k λ_k · c_k · g_k

As in the upstream code, g_k divides by τ_k, not by a_k · τ_k: a_k only shifts the noise level the denoiser is told.
"""
from __future__ import annotations

import torch

from .baselines import ab_direction
from .common import (Callback, Cond, Denoiser, append_dims, denoise, denoise_first, geometric_point, notify,
                     prepare, repeat_rows, to_d)
from .table import SolverTable, TableError


def sample_epd(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, table: SolverTable, *,
    cond: Cond = None, callback: Callback | None = None,
) -> torch.Tensor:
    """EPD-Solver (or EPD-Plugin when ``table.meta.plugin``): K directions per step from one batched call.

    ``table`` tensors are [S, K] (shared) or [B, S, K] (one table per sample); gradients flow into them, so the
    same function serves sampling, distillation and RL. Splitting a large parallel call for memory is the
    denoiser's business (backbones take a max-batch option), not the solver's.
    """
    sigmas = prepare(x, sigmas)
    if len(sigmas) != table.meta.num_steps:
        raise TableError(f"table is for num_steps={table.meta.num_steps}, the grid has {len(sigmas)} points")
    if sigmas[-1] <= 0:
        raise ValueError("EPD needs a grid ending at sigma_min > 0 (its points τ_k are geometric means of σ)")
    if table.positions.ndim == 3 and table.positions.shape[0] not in (1, x.shape[0]):
        raise TableError(f"per-sample table has batch {table.positions.shape[0]}, the state has {x.shape[0]}")
    B, K = x.shape[0], table.meta.num_points
    cond_k = repeat_rows(cond, K)  # the K points' conditioning, the same at every step
    history: list[torch.Tensor] = []
    for n in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[n], sigmas[n + 1]
        denoised = denoise_first(denoiser, x, sigma, cond, table.meta.afs and n == 0, table.meta.afs_convention)
        d = to_d(x, sigma, denoised)
        if table.meta.plugin:
            history = (history + [d])[-table.meta.plugin_order:]
            d = ab_direction(history, table.meta.plugin_order)
        r, lam, c, a = (t.to(x) for t in table.step(n))                      # each [B or 1, K]
        tau = geometric_point(sigma, sigma_next, r)                             # [B or 1, K]
        x_k = x.unsqueeze(1) + append_dims(tau - sigma, x.ndim + 1) * d.unsqueeze(1)   # [B, K, ...]
        rows = x_k.flatten(0, 1)                                                # row b·K + k
        sigma_rows = (a * tau).expand(B, K).reshape(-1)
        denoised_k = denoise(denoiser, rows, sigma_rows, cond_k).view_as(x_k)
        g = (x_k - denoised_k) / append_dims(tau, x.ndim + 1)
        x = x + (sigma_next - sigma) * (append_dims(lam * c, x.ndim + 1) * g).sum(1)
        notify(callback, n, x, sigma, sigma_next, denoised)
    return x
