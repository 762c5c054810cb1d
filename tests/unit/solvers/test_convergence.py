"""Observed order of accuracy of every solver on a probability-flow ODE with a known solution.

Data: independent Gaussians per coordinate, x0 ~ N(MU_j, S_j²). Then D(x, σ) = MU + S²/(S² + σ²)·(x − MU) and the
ODE dx/dσ = (x − D)/σ has the solution x(σ) = MU + (x_T − MU)·sqrt(S² + σ²)/sqrt(S² + σ_T²). Each solver runs from
σ_max to σ_min > 0 (no step into 0, which every solver takes at first order by design) with N steps, and the order
is the least-squares slope of log(max-abs error at σ_min) against log N. Everything is float64; the N ranges are
where the local slopes have settled and the errors are far above round-off (checked).

What the theory gives, and what shows (the table in ``CASES``):

* Single-step methods show their textbook orders: Euler 1, Heun 2, DPM-Solver-2 2, EPD with the hand-set table
  (K = 1 is DPM-Solver-2; K = 2 Gauss–Legendre nodes: the intermediate points are Euler predictions, so still 2)
  and EPD-Plugin (iPNDM direction for the intermediate points, same two-point quadrature: 2).
* Multistep methods start with lower-order steps (and UniPC ends with an uncorrected first-order step), whose
  one-off local errors cap the global order at 2 as N → ∞. On diffusion grids those steps sit where they are nearly
  exact (at σ ≫ S the solution is almost linear in σ; at σ_min ≪ S, D(x) ≈ x), so over any practical N the body
  of the method shows: DPM-Solver++(2M) 2, UniPC-2 3, UniPC-3 4, iPNDM 4. Two tests below move σ_max or σ_min next
  to S and watch the cap appear, which is how we know the explanation is right.
* DPM-Solver++(3M) shows 2, not 3. That is its formula, the one in diffusers, k-diffusion and the DPM-Solver
  reference code, which ours reproduces bit-for-bit (tests/test_diffusers_equality.py): with D2 ≈ h²·D''/2 from
  the divided differences, the term −φ₃·D2 carries half of the third-order Taylor term h³·φ₃·D'' it should. See
  ``test_dpmpp_3m_second_order_comes_from_its_d2_term``: the same update with that term doubled converges at 3.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import functools

import torch

from epd import schedules
from epd.solvers import (
    handset_table,
    sample_dpm2,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_epd,
    sample_euler,
    sample_heun,
    sample_ipndm,
    sample_unipc,
)
from epd.solvers.common import prepare

MU = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
S = torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64)
NOISE = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
TOL = 0.3


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
    sig = sigma.reshape(-1, 1)
    return MU + S**2 / (S**2 + sig**2) * (x - MU)


def exact_solution(x_T: torch.Tensor, sigma_T, sigma) -> torch.Tensor:
    return MU + (x_T - MU) * torch.sqrt(S**2 + sigma**2) / torch.sqrt(S**2 + sigma_T**2)


def edm_grid(points: int) -> torch.Tensor:
    """EDM's grid, σ 80 → 0.002, ρ = 7."""
    return schedules.polynomial(points)


def uniform_grid(sigma_max: float, sigma_min: float = 0.002):
    return lambda points: torch.linspace(sigma_max, sigma_min, points, dtype=torch.float64)


def final_error(sampler, sigmas: torch.Tensor) -> float:
    x_T = NOISE * sigmas[0]
    with torch.no_grad():
        out = sampler(gaussian_denoiser, x_T, sigmas)
    return (out - exact_solution(x_T, sigmas[0], sigmas[-1])).abs().max().item()


def observed_order(sampler, grid, steps: list[int]) -> tuple[float, list[float]]:
    """Least-squares slope of −log(error) against log(steps); N steps means a grid of N + 1 points."""
    errors = [final_error(sampler, grid(n + 1)) for n in steps]
    assert min(errors) > 1e-11, f"errors {errors} reach the round-off floor; use fewer steps"
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return -slope, errors


def describe(steps, errors) -> str:
    local = [math.log(errors[i] / errors[i + 1]) / math.log(steps[i + 1] / steps[i]) for i in range(len(steps) - 1)]
    return f"steps {steps}, errors {['%.2e' % e for e in errors]}, local slopes {['%.2f' % s for s in local]}"


def epd(num_points: int, plugin: bool = False):
    def sampler(denoiser, x, sigmas):
        return sample_epd(denoiser, x, sigmas, handset_table(len(sigmas), num_points, plugin=plugin, afs=False))
    return sampler


def unipc(order: int, variant: str = "bh2"):
    return lambda denoiser, x, sigmas: sample_unipc(denoiser, x, sigmas, order=order, variant=variant)


STEPS = [32, 64, 128, 256]

# id, sampler, grid, steps, expected order, why
CASES = [
    ("euler", sample_euler, edm_grid, STEPS, 1, "first order"),
    ("heun", sample_heun, edm_grid, STEPS, 2, "trapezoidal rule"),
    ("dpm2", sample_dpm2, edm_grid, STEPS, 2, "midpoint in log σ"),
    ("dpmpp_2m", sample_dpmpp_2m, edm_grid, STEPS, 2, "2-step exponential AB"),
    # Slower to settle (local slopes 1.88, 1.94 over 128..512): its O(h²) and O(h³) error terms have opposite signs.
    ("dpmpp_3m", sample_dpmpp_3m, edm_grid, [128, 256, 512], 2,
     "the reference 3M update is second order: see the module docstring"),
    ("unipc-1", unipc(1), edm_grid, STEPS, 2, "UniP-1 (DDIM) + UniC-1"),
    ("unipc-2", unipc(2), edm_grid, STEPS, 3, "UniP-2 + UniC-2"),
    ("unipc-2-bh1", unipc(2, "bh1"), edm_grid, STEPS, 3, "UniP-2 + UniC-2, B(h) = h"),
    ("unipc-3", unipc(3), edm_grid, [32, 48, 64, 96, 128, 192], 4, "UniP-3 + UniC-3"),
    # iPNDM's fixed Adams–Bashforth coefficients assume equal steps: uniform in σ, where its theory holds. The AB4
    # body shows from σ_max = 10 (≫ S); its Euler/AB2/AB3 warm-up is visible only for σ_max ~ S, see below.
    ("ipndm", sample_ipndm, uniform_grid(10.0), [512, 1024, 2048], 4, "Adams–Bashforth 4 on equal steps"),
    ("epd-k1", epd(1), edm_grid, STEPS, 2, "hand-set K = 1: DPM-Solver-2"),
    ("epd-k2", epd(2), edm_grid, STEPS, 2, "hand-set K = 2: Gauss–Legendre nodes, Euler-predicted points"),
    ("epd-plugin-k2", epd(2, plugin=True), edm_grid, STEPS, 2, "hand-set K = 2 from the iPNDM direction"),
]


@pytest.mark.parametrize("name,sampler,grid,steps,expected,why", CASES, ids=[c[0] for c in CASES])
def test_observed_order(name, sampler, grid, steps, expected, why):
    order, errors = observed_order(sampler, grid, steps)
    assert abs(order - expected) <= TOL, (
        f"{name}: observed order {order:.2f}, expected {expected} ({why}); {describe(steps, errors)}"
    )


# --- where the lower-order steps of multistep methods show -------------------------------------------------------


def test_ipndm_warm_up_caps_the_order_at_two():
    """iPNDM's first step is Euler (local error O(h²), never made up for later), then AB2 and AB3: globally O(h²).

    From σ_max = 10 that error is tiny (the solution is nearly linear in σ far above S) and AB4's O(h⁴) dominates;
    from σ_max = 2, next to S ≤ 1, the warm-up dominates and the observed order is 2.
    """
    steps = [256, 512, 1024]
    order, errors = observed_order(sample_ipndm, uniform_grid(2.0), steps)
    assert abs(order - 2) <= TOL, f"observed {order:.2f}; {describe(steps, errors)}"


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_uncorrected_last_step_caps_the_order_at_two(order):
    """UniPC (as diffusers, lower_order_final) ends with UniP-1 and no corrector: local error O(h²·dD/dλ) there.

    At σ_min = 0.002 ≪ S, dD/dλ ≈ σ²/S·(…) makes it negligible and UniPC-p shows p + 1; stopping at σ_min = 0.5,
    inside the data scale, that last step dominates and both UniPC-2 and UniPC-3 show 2.
    """
    steps = [32, 64, 128, 256]
    grid = lambda points: schedules.polynomial(points, sigma_min=0.5)  # noqa: E731
    observed, errors = observed_order(unipc(order), grid, steps)
    assert abs(observed - 2) <= TOL, f"observed {observed:.2f}; {describe(steps, errors)}"


# --- DPM-Solver++(3M) ----------------------------------------------------------------------------------------------


def dpmpp_3m_with_d2_factor(factor: float):
    """Our DPM-Solver++(3M) update written out, with the D2 term scaled by ``factor`` (1 = ours/diffusers)."""
    def sampler(denoiser, x, sigmas):
        sigmas = prepare(x, sigmas)
        lam = -sigmas.log()
        history: list[torch.Tensor] = []
        for i in range(len(sigmas) - 1):
            denoised = denoiser(x, sigmas[i].expand(x.shape[0]))
            history = (history + [denoised])[-3:]
            h = lam[i + 1] - lam[i]
            phi_1 = torch.expm1(-h)
            x_lin = (sigmas[i + 1] / sigmas[i]) * x - phi_1 * denoised
            if len(history) == 1:
                x = x_lin
                continue
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = (history[-1] - history[-2]) / r0
            if len(history) == 2:
                x = x_lin - 0.5 * phi_1 * d1_0
                continue
            r1 = (lam[i - 1] - lam[i - 2]) / h
            d1_1 = (history[-2] - history[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)          # ≈ h²·D''/2
            phi_2 = phi_1 / h + 1                   # h·φ₂(h)
            phi_3 = (phi_1 + h) / h**2 - 0.5        # −h·φ₃(h); the exact term is h³·φ₃·D'' ≈ −2·phi_3·d2
            x = x_lin + phi_2 * d1 - factor * phi_3 * d2
        return x
    return sampler


def test_dpmpp_3m_second_order_comes_from_its_d2_term():
    """The write-out with factor 1 is our sample_dpmpp_3m; with factor 2 (``corrected=True``) it is third order."""
    sigmas = edm_grid(41)
    x_T = NOISE * sigmas[0]
    with torch.no_grad():
        ours = sample_dpmpp_3m(gaussian_denoiser, x_T, sigmas)
        written_out = dpmpp_3m_with_d2_factor(1.0)(gaussian_denoiser, x_T, sigmas)
    torch.testing.assert_close(written_out, ours, rtol=1e-12, atol=1e-12)

    with torch.no_grad():
        torch.testing.assert_close(dpmpp_3m_with_d2_factor(2.0)(gaussian_denoiser, x_T, sigmas),
                                   sample_dpmpp_3m(gaussian_denoiser, x_T, sigmas, corrected=True),
                                   rtol=1e-12, atol=1e-12)
    steps = [64, 128, 256]
    corrected = functools.partial(sample_dpmpp_3m, corrected=True)
    order, errors = observed_order(corrected, edm_grid, steps)
    assert abs(order - 3) <= TOL, f"corrected 3M: observed {order:.2f}; {describe(steps, errors)}"


# --- EPD with K = 1 ---------------------------------------------------------------------------------------------


def test_epd_handset_k1_is_dpm_solver_2():
    """The hand-set K = 1 table (r = ½, λ = 1, unit scales) is DPM-Solver-2 step for step."""
    sigmas = edm_grid(11)
    x_T = NOISE * sigmas[0]
    with torch.no_grad():
        torch.testing.assert_close(epd(1)(gaussian_denoiser, x_T, sigmas),
                                   sample_dpm2(gaussian_denoiser, x_T, sigmas), rtol=1e-12, atol=1e-12)
