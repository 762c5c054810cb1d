"""Hand-designed ODE solvers, one pure function each, in the shape of k-diffusion's ``sampling.py``.

All take ``(denoiser, x, sigmas, *, cond=None, callback=None, afs=False)``: ``x`` is the start state at
``sigmas[0]`` (noise already scaled by σ_0), ``sigmas`` a decreasing grid that may end in 0. Into σ = 0
every solver but iPNDM takes a first-order step (it returns the denoised estimate), because the higher-order formulas
divide by σ or log σ there; iPNDM keeps extrapolating its multistep direction into 0. Gradients are left on: wrap calls in ``torch.no_grad()`` to sample.

NFE (sequential denoiser calls) for a grid of N points, ``z`` = 1 if it ends in 0, ``a`` = 1 with AFS:
euler, dpmpp_2m, dpmpp_3m, unipc, ipndm: N − 1 − a;  heun, dpm2: 2(N − 1) − z − a.  See :func:`nfe`.
"""
from __future__ import annotations

import torch

from .common import Callback, Cond, Denoiser, denoise, denoise_first, geometric_point, notify, prepare, to_d


def sample_euler(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    callback: Callback | None = None, afs: bool = False,
) -> torch.Tensor:
    """Euler in σ (= DDIM, deterministic)."""
    sigmas = prepare(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_first(denoiser, x, sigma, cond, afs and i == 0)
        x = x + (sigma_next - sigma) * to_d(x, sigma, denoised)
        notify(callback, i, x, sigma, sigma_next, denoised)
    return x


def sample_heun(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    callback: Callback | None = None, afs: bool = False,
) -> torch.Tensor:
    """EDM's Heun (trapezoidal) second-order method; a step into σ = 0 is Euler, as in EDM Algorithm 1."""
    sigmas = prepare(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_first(denoiser, x, sigma, cond, afs and i == 0)
        d = to_d(x, sigma, denoised)
        x_next = x + (sigma_next - sigma) * d
        if sigma_next > 0:
            d_next = to_d(x_next, sigma_next, denoise(denoiser, x_next, sigma_next, cond))
            x_next = x + (sigma_next - sigma) * (d + d_next) / 2
        x = x_next
        notify(callback, i, x, sigma, sigma_next, denoised)
    return x


def sample_dpm2(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    callback: Callback | None = None, afs: bool = False,
) -> torch.Tensor:
    """DPM-Solver-2 in σ-space: Euler to the geometric midpoint, then the full step with the midpoint direction."""
    sigmas = prepare(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_first(denoiser, x, sigma, cond, afs and i == 0)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + (sigma_next - sigma) * d
        else:
            sigma_mid = geometric_point(sigma, sigma_next, sigma.new_tensor(0.5))  # EPD's τ at r = ½
            x_mid = x + (sigma_mid - sigma) * d
            d_mid = to_d(x_mid, sigma_mid, denoise(denoiser, x_mid, sigma_mid, cond))
            x = x + (sigma_next - sigma) * d_mid
        notify(callback, i, x, sigma, sigma_next, denoised)
    return x


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half the log-SNR, λ = −log σ (∞ at σ = 0)."""
    return -sigma.log()


def sample_dpmpp_2m(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    callback: Callback | None = None, afs: bool = False, lower_order_final: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(2M), data prediction, midpoint form (Lu et al. 2022, Alg. 2).

    ``lower_order_final`` (diffusers' default): on grids of fewer than 15 steps the order falls to the number of
    steps left, which keeps the last, long steps of short grids stable.
    """
    return _dpmpp_multistep(denoiser, x, sigmas, 2, cond, callback, afs, lower_order_final)


def sample_dpmpp_3m(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    callback: Callback | None = None, afs: bool = False, lower_order_final: bool = True,
    corrected: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(3M), data prediction (Lu et al. 2022, App. B).

    ``lower_order_final`` as in :func:`sample_dpmpp_2m`. By default this is the update of diffusers and the
    DPM-Solver reference code (k-diffusion's ``sample_dpmpp_3m_sde`` at η = 0 differs: its second step adds φ₂·D1
    instead of the midpoint term), whose second-difference term carries half its Taylor coefficient (D2 ≈ h²·D''/2,
    but the exact term is 2·φ₃·D2), so it converges at order 2 (tests/unit/solvers/test_convergence.py).
    ``corrected=True`` doubles that term and is third order.
    """
    return _dpmpp_multistep(denoiser, x, sigmas, 3, cond, callback, afs, lower_order_final, 2.0 if corrected else 1.0)


def _dpmpp_multistep(denoiser, x, sigmas, order, cond, callback, afs, lower_order_final, d2_factor=1.0):
    sigmas = prepare(x, sigmas)
    steps = len(sigmas) - 1
    history: list[torch.Tensor] = []  # past D outputs, newest last
    lambdas = _lambda(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_first(denoiser, x, sigma, cond, afs and i == 0)
        history = (history + [denoised])[-order:]
        # Warm up through lower orders; the step into σ = 0 is first order (h = ∞ there).
        p = 1 if sigma_next == 0 else min(order, len(history))
        if lower_order_final and steps < 15:
            p = min(p, steps - i)
        if p == 1:
            x = denoised if sigma_next == 0 else (sigma_next / sigma) * x - torch.expm1(lambdas[i] - lambdas[i + 1]) * denoised
        else:
            h = lambdas[i + 1] - lambdas[i]
            phi_1 = torch.expm1(-h)  # e^{−h} − 1
            r0 = (lambdas[i] - lambdas[i - 1]) / h
            d1_0 = (history[-1] - history[-2]) / r0
            if p == 2:
                x = (sigma_next / sigma) * x - phi_1 * denoised - 0.5 * phi_1 * d1_0
            else:
                r1 = (lambdas[i - 1] - lambdas[i - 2]) / h
                d1_1 = (history[-2] - history[-3]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = phi_1 / h + 1
                phi_3 = (phi_1 + h) / h**2 - 0.5
                x = (sigma_next / sigma) * x - phi_1 * denoised + phi_2 * d1 - d2_factor * phi_3 * d2
        notify(callback, i, x, sigma, sigma_next, denoised)
    return x


def _unipc_update(x, m0, history_diffs, h, rks, order, variant, model_t=None):
    """One UniP (predictor, ``model_t`` None) or UniC (corrector) update of Zhao et al. 2023, data prediction.

    ``x`` is the state at the step's start s0, ``m0`` = D(x), ``history_diffs`` the D_k = (m_k − m0) / r_k of older
    points with ``rks`` their r_k = (λ_k − λ_s0) / h; ``model_t`` = D at the step's end for the corrector.
    """
    hh = -h
    h_phi_1 = torch.expm1(hh)
    B_h = hh if variant == "bh1" else h_phi_1
    # b_i = i! · φ_{i+1}(hh) · hh / B(h), built by the recursion φ_{k+1} = (φ_k − 1/k!) / hh.
    rks_all = torch.cat([rks, rks.new_ones(1)])
    R, b = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        R.append(rks_all**(i - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(R), torch.stack(b)
    x_t = torch.exp(hh) * x - h_phi_1 * m0  # σ_t / σ_s0 = e^{−h}
    if model_t is None:  # predictor UniP-p uses the p − 1 older points
        if order == 1:
            return x_t
        rhos = x.new_tensor([0.5]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        return x_t - B_h * sum(rho * d for rho, d in zip(rhos, history_diffs))
    rhos = x.new_tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)
    res = sum((rho * d for rho, d in zip(rhos[:-1], history_diffs)), torch.zeros_like(x))
    return x_t - B_h * (res + rhos[-1] * (model_t - m0))


def sample_unipc(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    callback: Callback | None = None, afs: bool = False, order: int = 2, variant: str = "bh2",
) -> torch.Tensor:
    """UniPC-p: UniP-p predictor plus the UniC corrector, which reuses the next step's model output (no extra NFE).

    As in diffusers with ``lower_order_final=True``: orders warm up from 1 and fall to the number of steps left, and
    the final state is not corrected (no model call follows it).
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; expected 'bh1' or 'bh2'")
    sigmas = prepare(x, sigmas)
    lambdas = _lambda(sigmas)
    steps = len(sigmas) - 1
    outputs: list[torch.Tensor] = []
    x_last = p_last = None
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_first(denoiser, x, sigma, cond, afs and i == 0)
        if i > 0:  # UniC: correct x_i with D(x_i), using the previous step's start point and history
            h = lambdas[i] - lambdas[i - 1]
            rks = torch.stack([(lambdas[i - 1 - k] - lambdas[i - 1]) / h for k in range(1, p_last)]) if p_last > 1 else h.new_zeros(0)
            diffs = [(outputs[-1 - k] - outputs[-1]) / rk for k, rk in zip(range(1, p_last), rks)]
            x = _unipc_update(x_last, outputs[-1], diffs, h, rks, p_last, variant, model_t=denoised)
        outputs = (outputs + [denoised])[-order:]
        p = min(order, steps - i, i + 1)
        h = lambdas[i + 1] - lambdas[i]
        if sigma_next == 0:
            x_last, x = x, denoised  # UniP-1 into σ = 0 is the denoised estimate
        else:
            rks = torch.stack([(lambdas[i - k] - lambdas[i]) / h for k in range(1, p)]) if p > 1 else h.new_zeros(0)
            diffs = [(outputs[-1 - k] - outputs[-1]) / rk for k, rk in zip(range(1, p), rks)]
            x_last, x = x, _unipc_update(x, denoised, diffs, h, rks, p, variant)
        p_last = p
        notify(callback, i, x, sigma, sigma_next, denoised)
    return x


# Adams–Bashforth coefficients on equal steps, newest direction first (iPNDM, Zhang & Chen 2023).
AB_COEFFS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ab_direction(history: list[torch.Tensor], max_order: int) -> torch.Tensor:
    """The iPNDM multistep direction from past directions (newest last), warming up through lower orders."""
    order = min(max_order, len(history))
    return sum(c * d for c, d in zip(AB_COEFFS[order], reversed(history)))


def sample_ipndm(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    callback: Callback | None = None, afs: bool = False, order: int = 4,
) -> torch.Tensor:
    """iPNDM: Adams–Bashforth of order ≤ 4 on the directions d, fixed coefficients (equal-step form)."""
    if order not in AB_COEFFS:
        raise ValueError(f"iPNDM order must be 1-4, got {order}")
    sigmas = prepare(x, sigmas)
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_first(denoiser, x, sigma, cond, afs and i == 0)
        history = (history + [to_d(x, sigma, denoised)])[-order:]
        x = x + (sigma_next - sigma) * ab_direction(history, order)
        notify(callback, i, x, sigma, sigma_next, denoised)
    return x
