"""σ grids of epd.schedules: basic invariants, agreement with diffusers where it has the same schedule, bad input.

diffusers keeps its final grids in float32, so "same grid" means a relative difference at float32 rounding (≲ 3e-7).
The one exception is the discrete SD1.5 grid, where diffusers also builds the 1000-entry β/ᾱ table in float32; see
``test_discrete_matches_euler_discrete``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from epd import schedules
from epd.schedules import (
    SCHEDULES,
    append_zero,
    discrete,
    discrete_sigmas,
    flow_match,
    get_sigmas,
    logsnr,
    polynomial,
    time_uniform,
)

# diffusers' set_timesteps calls np.array(tensor, copy=False) on torch tensors; numpy 2 warns about it, harmlessly.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SD15_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
STEPS = [2, 3, 10, 18, 50]
FLOAT32_REL = 1e-6  # relative difference allowed against a float32 diffusers grid

# name -> builder(num_steps); covers every schedule and non-default arguments.
BUILDERS = {
    "polynomial": lambda n: polynomial(n),
    "polynomial-custom": lambda n: polynomial(n, sigma_min=0.01, sigma_max=50.0, rho=5.0),
    "logsnr": lambda n: logsnr(n),
    "logsnr-custom": lambda n: logsnr(n, sigma_min=0.03, sigma_max=14.6),
    "time_uniform": lambda n: time_uniform(n),
    "time_uniform-custom": lambda n: time_uniform(n, sigma_min=0.02, sigma_max=150.0),
    "discrete-leading": lambda n: discrete(n, "leading"),
    "discrete-trailing": lambda n: discrete(n, "trailing"),
    "discrete-linspace": lambda n: discrete(n, "linspace"),
    "flow_match": lambda n: flow_match(n),
    "flow_match-shift1": lambda n: flow_match(n, shift=1.0),
}


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()) / b.double()).abs().max().item()


def test_every_schedule_is_covered():
    assert {name.split("-")[0] for name in BUILDERS} == set(SCHEDULES)


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_grid_invariants(name, num_steps):
    """Shape (N,), float64, finite, positive, strictly decreasing."""
    sigmas = BUILDERS[name](num_steps)
    assert sigmas.shape == (num_steps,)
    assert sigmas.dtype == torch.float64
    assert torch.isfinite(sigmas).all() and (sigmas > 0).all()
    assert (sigmas[:-1] > sigmas[1:]).all(), f"{name} is not strictly decreasing: {sigmas}"


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("builder,smin,smax", [
    (lambda n: polynomial(n), 0.002, 80.0),
    (lambda n: polynomial(n, 0.01, 50.0, 5.0), 0.01, 50.0),
    (lambda n: logsnr(n), 0.002, 80.0),
    (lambda n: logsnr(n, 0.03, 14.6), 0.03, 14.6),
    (lambda n: time_uniform(n), 0.002, 80.0),
    (lambda n: time_uniform(n, 0.02, 150.0), 0.02, 150.0),
])
def test_continuous_endpoints(builder, smin, smax, num_steps):
    sigmas = builder(num_steps)
    assert math.isclose(sigmas[0].item(), smax, rel_tol=1e-12)
    assert math.isclose(sigmas[-1].item(), smin, rel_tol=1e-12)


@pytest.mark.parametrize("num_steps", STEPS)
def test_discrete_endpoints(num_steps):
    """Each spacing picks (or, for linspace, interpolates) SD1.5's training σ at its first and last timestep."""
    table = discrete_sigmas()
    ratio = 1000 // num_steps
    leading = discrete(num_steps, "leading", steps_offset=1)
    assert leading[0] == table[(num_steps - 1) * ratio + 1] and leading[-1] == table[1]
    trailing = discrete(num_steps, "trailing")
    assert trailing[0] == table[999] and trailing[-1] == table[round(1000 / num_steps) - 1]
    linspace = discrete(num_steps, "linspace")
    assert linspace[0] == table[999] and linspace[-1] == table[0]


def test_discrete_sigmas_table():
    """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) for scaled-linear β, in float64: increasing, from ≈0.0292 to ≈14.61."""
    table = discrete_sigmas()
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(table.numpy(), np.sqrt((1 - abar) / abar), rtol=1e-12)
    assert table.dtype == torch.float64 and (table[1:] > table[:-1]).all()
    assert math.isclose(table[0].item(), 0.0292, rel_tol=1e-2) and math.isclose(table[-1].item(), 14.61, rel_tol=1e-3)


@pytest.mark.parametrize("num_steps", STEPS)
def test_flow_match_endpoints(num_steps):
    """From t = 1 to diffusers' smallest t: the shift applied to the already-shifted 1/1000 (diffusers shifts the
    linspace between its own shifted σ_max and σ_min once more; we reproduce that)."""
    shift = 3.0

    def shifted(t):
        return shift * t / (1 + (shift - 1) * t)

    sigmas = flow_match(num_steps, shift=shift)
    assert sigmas[0] == 1.0
    assert math.isclose(sigmas[-1].item(), shifted(shifted(1 / 1000)), rel_tol=1e-12)


# --- against diffusers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("config", [{}, dict(sigma_min=0.01, sigma_max=50.0, rho=5.0)])
def test_polynomial_matches_edm_karras(config, num_steps):
    """polynomial == EDMEulerScheduler(sigma_schedule="karras") and EDMDPMSolverMultistepScheduler's karras σ.

    EDMEuler builds the grid in float64 and rounds it to float32 once. EDMDPMSolverMultistep does all of it in
    float32 (a float32 ramp raised to the ρ-th power, which multiplies the ramp's rounding by ~ρ), hence 5e-6.
    """
    diffusers = pytest.importorskip("diffusers")
    ours = polynomial(num_steps, **config)
    for cls, tol in ((diffusers.EDMEulerScheduler, FLOAT32_REL), (diffusers.EDMDPMSolverMultistepScheduler, 5e-6)):
        scheduler = cls(sigma_schedule="karras", **config)
        scheduler.set_timesteps(num_steps)
        assert scheduler.sigmas[-1] == 0
        assert max_rel(ours, scheduler.sigmas[:-1]) < tol, cls.__name__


@pytest.mark.parametrize("num_steps", STEPS)
def test_polynomial_matches_use_karras_sigmas(num_steps):
    """polynomial between SD1.5's σ_min and σ_max == EulerDiscreteScheduler(use_karras_sigmas=True) (ρ = 7)."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.EulerDiscreteScheduler(**SD15_BETAS, use_karras_sigmas=True)
    scheduler.set_timesteps(num_steps)
    # diffusers takes the ends from its own float32 ᾱ table; use exactly those ends.
    table = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().double()
    ours = polynomial(num_steps, sigma_min=table[0].item(), sigma_max=table[-1].item())
    assert max_rel(ours, scheduler.sigmas[:-1]) < FLOAT32_REL


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("config", [{}, dict(sigma_min=0.03, sigma_max=14.6)])
def test_logsnr_matches_edm_exponential(config, num_steps):
    """logsnr == EDMEulerScheduler(sigma_schedule="exponential") (its linspace of log σ is float32: ~3e-7)."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.EDMEulerScheduler(sigma_schedule="exponential", **config)
    scheduler.set_timesteps(num_steps)
    assert max_rel(logsnr(num_steps, **config), scheduler.sigmas[:-1]) < FLOAT32_REL


SPACINGS = [("leading", 1), ("trailing", 0), ("linspace", 0)]


@pytest.mark.parametrize("num_steps", [2, 3, 7, 10, 25, 50, 999, 1000])
@pytest.mark.parametrize("spacing,steps_offset", SPACINGS)
def test_discrete_matches_euler_discrete(spacing, steps_offset, num_steps):
    """discrete == EulerDiscreteScheduler(SD1.5 scaled_linear betas, timestep_spacing, steps_offset).sigmas[:-1].

    diffusers computes β and ᾱ = cumprod(1 − β) in float32; near t = 0, σ = sqrt((1 − ᾱ)/ᾱ) with 1 − ᾱ ≈ 8.5e-4
    turns float32 rounding of ᾱ into a relative σ error of up to ~1.3e-5. So: (1) with the scheduler's ᾱ table
    replaced by the float64 one (everything else diffusers' own code), the grids agree to float32 rounding; (2) the
    stock scheduler agrees to 2e-5, its float32 table's accuracy.
    """
    diffusers = pytest.importorskip("diffusers")
    ours = discrete(num_steps, spacing, steps_offset=steps_offset)

    scheduler = diffusers.EulerDiscreteScheduler(**SD15_BETAS, timestep_spacing=spacing, steps_offset=steps_offset)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    scheduler.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    scheduler.set_timesteps(num_steps)
    assert scheduler.sigmas[-1] == 0
    assert max_rel(ours, scheduler.sigmas[:-1]) < FLOAT32_REL

    stock = diffusers.EulerDiscreteScheduler(**SD15_BETAS, timestep_spacing=spacing, steps_offset=steps_offset)
    stock.set_timesteps(num_steps)
    assert max_rel(ours, stock.sigmas[:-1]) < 2e-5


@pytest.mark.parametrize("num_steps", [2, 3, 10, 28, 50])
@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_flow_match_matches_diffusers(shift, num_steps):
    """flow_match == FlowMatchEulerDiscreteScheduler(shift).set_timesteps(n).sigmas[:-1] (SD3 uses shift=3)."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    assert scheduler.sigmas[-1] == 0
    assert max_rel(flow_match(num_steps, shift=shift), scheduler.sigmas[:-1]) < FLOAT32_REL


# FLUX.1-dev's scheduler_config.json: dynamic (resolution-dependent) shifting; its shift 3.0 is then unused.
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


@pytest.mark.parametrize("num_steps", [2, 3, 9, 28, 50])
@pytest.mark.parametrize("mu", [1.15, 0.5, 0.0])
def test_flow_match_mu_matches_diffusers_flux_scheduler(mu, num_steps):
    """flow_match(n, mu=μ) == FLUX's FlowMatchEulerDiscreteScheduler.set_timesteps(n, mu=μ).sigmas[:-1]: t from 1 to
    1/1000 (the scheduler's unshifted range), then t' = e^μ / (e^μ + 1/t − 1)."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    scheduler.set_timesteps(num_steps, mu=mu)
    assert scheduler.sigmas[-1] == 0
    ours = flow_match(num_steps, mu=mu)
    assert max_rel(ours, scheduler.sigmas[:-1]) < FLOAT32_REL
    t = np.linspace(1.0, 1e-3, num_steps)
    np.testing.assert_allclose(ours.numpy(), np.exp(mu) / (np.exp(mu) + 1 / t - 1), rtol=1e-12)
    assert torch.equal(flow_match(num_steps, shift=7.0, mu=mu), ours)       # shift is unused with mu
    assert torch.equal(get_sigmas("flow_match", num_steps, mu=mu), ours)


# --- time_uniform against the VP-SDE formula -------------------------------------------------------------------

BETA_D, BETA_MIN = 19.9, 0.1


def vp_sigma(t: np.ndarray) -> np.ndarray:
    return np.sqrt(np.exp(0.5 * BETA_D * t**2 + BETA_MIN * t) - 1)


def vp_t(sigma: float) -> float:
    """Inverse of vp_sigma by bisection (independent of the closed form in epd.schedules)."""
    lo, hi = 0.0, 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if vp_sigma(np.float64(mid)) < sigma else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("smin,smax", [(0.002, 80.0), (0.02, 150.0)])
def test_time_uniform_is_vp_sde_uniform_in_t(smin, smax, num_steps):
    """σ(t) = sqrt(exp(½·19.9·t² + 0.1·t) − 1) at t uniform between t(σ_max) and t(σ_min)."""
    t = np.linspace(vp_t(smax), vp_t(smin), num_steps)
    np.testing.assert_allclose(time_uniform(num_steps, smin, smax).numpy(), vp_sigma(t), rtol=1e-10)


@pytest.mark.parametrize("num_steps", [2, 18, 50])
def test_time_uniform_is_edm_vp_discretization(num_steps):
    """EDM's generate.py 'vp' grid: t_i = 1 + i/(N − 1)·(ε_s − 1), ε_s = 1e-3, σ_i = vp_sigma(t_i)."""
    eps_s = 1e-3
    t = 1 + np.arange(num_steps) / (num_steps - 1) * (eps_s - 1)
    sigma_min, sigma_max = float(vp_sigma(np.float64(eps_s))), float(vp_sigma(np.float64(1.0)))
    ours = time_uniform(num_steps, sigma_min=sigma_min, sigma_max=sigma_max)
    np.testing.assert_allclose(ours.numpy(), vp_sigma(t), rtol=1e-10)


# --- get_sigmas, append_zero --------------------------------------------------------------------------------------


def test_get_sigmas_dispatches():
    assert torch.equal(get_sigmas("polynomial", 10), polynomial(10))
    assert torch.equal(get_sigmas("polynomial", 10, 0.01, 50.0, 5.0), polynomial(10, 0.01, 50.0, 5.0))
    assert torch.equal(get_sigmas("logsnr", 10, 0.03, 14.6), logsnr(10, 0.03, 14.6))
    assert torch.equal(get_sigmas("time_uniform", 10), time_uniform(10))
    assert torch.equal(get_sigmas("discrete", 10, spacing="trailing"), discrete(10, "trailing"))
    assert torch.equal(get_sigmas("flow_match", 10, shift=2.0), flow_match(10, shift=2.0))


def test_append_zero():
    sigmas = polynomial(5)
    out = append_zero(sigmas)
    assert out.shape == (6,) and out.dtype == torch.float64 and out[-1] == 0 and torch.equal(out[:-1], sigmas)


# --- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call,match", [
    (lambda: polynomial(1), "num_steps"),
    (lambda: polynomial(0), "num_steps"),
    (lambda: logsnr(1), "num_steps"),
    (lambda: time_uniform(1), "num_steps"),
    (lambda: discrete(1), "num_steps"),
    (lambda: discrete(1001), "num_steps"),
    (lambda: flow_match(1), "num_steps"),
    (lambda: flow_match(5, mu=float("nan")), "mu"),
    (lambda: get_sigmas("polynomial", 1), "num_steps"),
    (lambda: polynomial(10, sigma_min=80.0, sigma_max=80.0), "sigma_min"),
    (lambda: polynomial(10, sigma_min=1.0, sigma_max=0.5), "sigma_min"),
    (lambda: polynomial(10, sigma_min=0.0), "sigma_min"),
    (lambda: logsnr(10, sigma_min=-1.0), "sigma_min"),
    (lambda: logsnr(10, sigma_min=5.0, sigma_max=1.0), "sigma_min"),
    (lambda: time_uniform(10, sigma_min=80.0, sigma_max=0.002), "sigma_min"),
    (lambda: time_uniform(10, sigma_min=float("nan")), "sigma_min"),
    (lambda: discrete(10, spacing="uniform"), "spacing"),
    (lambda: flow_match(10, shift=0.0), "shift"),
    (lambda: get_sigmas("karras", 10), "karras"),
    (lambda: get_sigmas("unknown", 10), "unknown schedule"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_schedules_module_exports():
    assert set(schedules.__all__) >= {"polynomial", "logsnr", "time_uniform", "discrete", "flow_match", "get_sigmas"}
