"""Our baseline solvers against diffusers' schedulers: same denoiser, same grid, same answer.

Each test builds a diffusers scheduler, calls ``set_timesteps``, reads its σ grid from ``scheduler.sigmas`` and runs
our solver on exactly that grid (cast to float64). The diffusers loop is driven by the same analytic denoiser, whose
output is converted into the ``model_output`` the scheduler expects (ε for the VP/discrete schedulers, EDM's F_θ for
the EDM ones). States are compared after every step, in max-abs error relative to the reference state's max-abs.

The denoiser is the exact posterior mean of a per-pixel 1-D mixture of three Gaussians, so it is nonlinear in x and
the multistep histories (differences of past D outputs) carry real information.

Precision: our solvers and the denoiser run in float64. diffusers keeps its σ grid in float32 (we run on that very
grid, so grids agree exactly), and EDMEuler/DPMSolverMultistep also do their state update in float32; the observed
disagreement is ~1e-7, well inside the 1e-5 tolerance, while using a wrong solver order gives ~1e-3 or more (see
``test_oracles_tell_methods_apart``).
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from epd.solvers import (  # noqa: E402
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_euler,
    sample_heun,
    sample_unipc,
)

diffusers_logging.set_verbosity_error()
# diffusers' set_timesteps calls np.array(tensor, copy=False) on torch tensors; numpy 2 warns about it, harmlessly.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

TOL = 1e-5
# Stable Diffusion 1.5's noise schedule, as in its scheduler_config.json.
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# Per-pixel data distribution: mixture of N(MU_k, S_k²) with weights W_k.
MU = torch.tensor([-0.6, 0.1, 0.7], dtype=torch.float64)
S = torch.tensor([0.1, 0.2, 0.15], dtype=torch.float64)
W = torch.tensor([0.3, 0.45, 0.25], dtype=torch.float64)


def mixture_denoiser(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
    """Exact E[x0 | x0 + σ·ε = x] for i.i.d. pixels drawn from the Gaussian mixture (MU, S, W)."""
    x = x.to(torch.float64)
    sig = sigma.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))[..., None]
    xe = x[..., None]
    var = S**2 + sig**2
    log_resp = torch.log(W) - 0.5 * torch.log(2 * math.pi * var) - 0.5 * (xe - MU) ** 2 / var
    resp = torch.softmax(log_resp, dim=-1)
    return (resp * (MU + S**2 / var * (xe - MU))).sum(-1)


def D(x: torch.Tensor, sigma) -> torch.Tensor:
    """The denoiser at a scalar σ (a diffusers 0-d tensor, cast to float64) for the whole batch."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return mixture_denoiser(x, sigma.expand(x.shape[0]))


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def ours_trajectory(solver, x: torch.Tensor, sigmas: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """Our state at sigmas[1:], one per step, from the solver's callback."""
    states: list[torch.Tensor] = []
    with torch.no_grad():
        solver(mixture_denoiser, x, sigmas, callback=lambda info: states.append(info["x"]), **kwargs)
    return states


def assert_trajectories_match(ours: list[torch.Tensor], ref: list[torch.Tensor], tol: float = TOL) -> None:
    assert len(ours) == len(ref), f"{len(ours)} steps vs diffusers' {len(ref)}"
    errs = [rel_err(o, r) for o, r in zip(ours, ref)]
    assert all(torch.isfinite(o).all() for o in ours), "our trajectory has non-finite values"
    assert max(errs) <= tol, f"relative error per step {['%.1e' % e for e in errs]} exceeds {tol}"


# --- diffusers loops ---------------------------------------------------------------------------------------------


def edm_loop(scheduler, x: torch.Tensor) -> list[torch.Tensor]:
    """Drive an EDM scheduler (VE samples, σ-space). Returns the state after each step.

    EDM schedulers expect the raw network output F with D = c_skip·x + c_out·F (``precondition_outputs``); we read
    c_skip and c_out from the scheduler itself at its own (float32) σ and invert that relation.
    """
    states = []
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)  # the network's input c_in·x; our D reads the raw sample instead
        sigma = scheduler.sigmas[scheduler.step_index]
        one = torch.ones((), dtype=torch.float64)
        c_skip = scheduler.precondition_outputs(one, torch.zeros_like(one), sigma)
        c_out = scheduler.precondition_outputs(torch.zeros_like(one), one, sigma)
        model_output = (D(x, sigma) - c_skip * x) / c_out
        x = scheduler.step(model_output, t, x).prev_sample
        states.append(x)
    return states


def discrete_ve_loop(scheduler, x: torch.Tensor) -> list[torch.Tensor]:
    """Drive Euler/Heun *Discrete* schedulers: their ``sample`` is VE (k-diffusion-scaled, x = x0 + σ·ε); the UNet
    sees x/sqrt(σ²+1) and predicts ε, which we supply as (x − D(x, σ))/σ at the scheduler's current σ."""
    states = []
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)
        sigma = scheduler.sigmas[scheduler.step_index]
        eps = (x - D(x, sigma)) / sigma.double()
        x = scheduler.step(eps, t, x).prev_sample
        states.append(x)
    return states


def vp_loop(scheduler, x_ve: torch.Tensor) -> list[torch.Tensor]:
    """Drive a VP multistep scheduler (DPMSolverMultistep, UniPC): its sample is x_vp = x_ve / sqrt(1 + σ²) with
    σ = sqrt((1 − ᾱ)/ᾱ) (``scheduler.sigmas``). The model output is ε = (x_ve − D(x_ve, σ)) / σ. States are returned
    converted back to VE so they compare with ours directly."""
    sig = scheduler.sigmas.double()
    x = x_ve / (1 + sig[0] ** 2).sqrt()
    states = []
    for i, t in enumerate(scheduler.timesteps):
        x_ve = x * (1 + sig[i] ** 2).sqrt()
        eps = (x_ve - D(x_ve, sig[i])) / sig[i]
        x = scheduler.step(eps, t, x).prev_sample
        states.append(x * (1 + sig[i + 1] ** 2).sqrt())
    return states


# --- Euler -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [4, 10])
@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential"])
def test_euler_matches_edm_euler(noise, sigma_schedule, num_steps):
    """EDMEulerScheduler(sigma_min=0.002, sigma_max=80, sigma_data=0.5, sigma_schedule=karras|exponential,
    prediction_type="epsilon", final_sigmas_type="zero"), s_churn=0: deterministic Euler in σ into σ = 0.

    Not num_steps=2: EDMEuler casts the state to float32 inside ``step``, and a single Euler step 80 → 0.002 cancels
    a state of size ~80 down to ~0.03, leaving diffusers ~6e-5 off in relative terms (its rounding, not a mismatch).
    """
    scheduler = EDMEulerScheduler(sigma_schedule=sigma_schedule, final_sigmas_type="zero")
    scheduler.set_timesteps(num_steps)
    sigmas = scheduler.sigmas.double()
    assert len(sigmas) == num_steps + 1 and sigmas[-1] == 0
    x = noise * sigmas[0]
    assert_trajectories_match(ours_trajectory(sample_euler, x, sigmas), edm_loop(scheduler, x))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_matches_euler_discrete(noise, spacing):
    """EulerDiscreteScheduler(SD1.5 scaled_linear betas 0.00085→0.012, timestep_spacing=leading (steps_offset=1) |
    trailing | linspace, prediction_type="epsilon", final_sigmas_type="zero"), 10 steps."""
    scheduler = EulerDiscreteScheduler(**SD15, timestep_spacing=spacing, steps_offset=int(spacing == "leading"))
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas.double()
    x = noise * sigmas[0]
    assert_trajectories_match(ours_trajectory(sample_euler, x, sigmas), discrete_ve_loop(scheduler, x))


# --- Heun --------------------------------------------------------------------------------------------------------


def heun_grid(scheduler) -> torch.Tensor:
    """HeunDiscrete stores [σ_0, σ_1, σ_1, …, σ_{N-1}, σ_{N-1}, 0] (each inner σ twice, once per stage)."""
    s = scheduler.sigmas.double()
    grid = torch.cat([s[:1], s[1:-1:2], s[-1:]])
    assert torch.equal(s[1:-1:2], s[2:-1:2]), "unexpected HeunDiscrete sigma layout"
    return grid


@pytest.mark.parametrize("num_steps", [2, 10])
@pytest.mark.parametrize("variant", ["linspace", "leading", "trailing", "karras"])
def test_heun_matches_heun_discrete(noise, variant, num_steps):
    """HeunDiscreteScheduler(SD1.5 scaled_linear betas, prediction_type="epsilon", timestep_spacing=linspace |
    leading (steps_offset=1) | trailing, or linspace with use_karras_sigmas=True). It ends with an Euler step into
    σ = 0, as ours does (EDM Algorithm 1)."""
    kwargs = dict(timestep_spacing="linspace" if variant == "karras" else variant,
                  steps_offset=int(variant == "leading"), use_karras_sigmas=variant == "karras")
    scheduler = HeunDiscreteScheduler(**SD15, **kwargs)
    scheduler.set_timesteps(num_steps)
    sigmas = heun_grid(scheduler)
    assert len(sigmas) == num_steps + 1
    x = noise * sigmas[0]
    ref = discrete_ve_loop(scheduler, x)
    # diffusers takes two scheduler steps per Heun step (one for the last, Euler, step into 0): keep the states at
    # grid points, i.e. after each completed second stage and after the final step.
    ref_at_grid = [ref[i] for i in range(1, len(ref) - 1, 2)] + [ref[-1]]
    assert_trajectories_match(ours_trajectory(sample_heun, x, sigmas), ref_at_grid)


# --- DPM-Solver++ multistep --------------------------------------------------------------------------------------

DPMPP = {2: sample_dpmpp_2m, 3: sample_dpmpp_3m}


@pytest.mark.parametrize("num_steps", [2, 3, 10, 20])
@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential"])
@pytest.mark.parametrize("lower_order_final", [False, True])
@pytest.mark.parametrize("order", [2, 3])
def test_dpmpp_matches_edm_dpmsolver(noise, order, lower_order_final, sigma_schedule, num_steps):
    """EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80, sigma_data=0.5, sigma_schedule=karras |
    exponential, solver_order=2|3, algorithm_type="dpmsolver++", solver_type="midpoint", prediction_type="epsilon",
    lower_order_final=False|True, final_sigmas_type="zero"). The step into σ = 0 is first order in both; with
    lower_order_final (on grids of < 15 steps) the last steps fall to the number of steps left."""
    scheduler = EDMDPMSolverMultistepScheduler(
        sigma_schedule=sigma_schedule, solver_order=order, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=lower_order_final, final_sigmas_type="zero",
    )
    scheduler.set_timesteps(num_steps)
    sigmas = scheduler.sigmas.double()
    x = noise * sigmas[0]
    ours = ours_trajectory(DPMPP[order], x, sigmas, lower_order_final=lower_order_final)
    assert_trajectories_match(ours, edm_loop(scheduler, x))


# Karras σ with final_sigmas_type="sigma_min" repeats σ_min at the end of diffusers' grid (a zero-length last step),
# which our grid check rightly rejects; that combination is left out.
VP_GRIDS = [(v, f) for v in ("linspace", "leading", "trailing", "karras") for f in ("zero", "sigma_min")
            if (v, f) != ("karras", "sigma_min")]


@pytest.mark.parametrize("num_steps", [3, 10])
@pytest.mark.parametrize("variant,final_sigmas_type", VP_GRIDS)
@pytest.mark.parametrize("lower_order_final", [False, True])
@pytest.mark.parametrize("order", [2, 3])
def test_dpmpp_matches_dpmsolver_multistep(noise, order, lower_order_final, variant, final_sigmas_type, num_steps):
    """DPMSolverMultistepScheduler(SD1.5 scaled_linear betas, solver_order=2|3, algorithm_type="dpmsolver++",
    solver_type="midpoint", prediction_type="epsilon", lower_order_final=False|True,
    final_sigmas_type=zero|sigma_min, timestep_spacing=linspace | leading (steps_offset=1) | trailing, or linspace
    with use_karras_sigmas=True). VP form: x_vp = x_ve / sqrt(1 + σ²); the DPM-Solver++ update is the same in
    λ = −log σ. With sigma_min the grid ends at σ(t=0) ≈ 0.029 and the last step is a full multistep step (unless
    lower_order_final lowers it)."""
    scheduler = DPMSolverMultistepScheduler(
        **SD15, solver_order=order, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=lower_order_final, final_sigmas_type=final_sigmas_type,
        timestep_spacing="linspace" if variant == "karras" else variant, steps_offset=int(variant == "leading"),
        use_karras_sigmas=variant == "karras",
    )
    scheduler.set_timesteps(num_steps)
    sigmas = scheduler.sigmas.double()
    x = noise * sigmas[0]
    ours = ours_trajectory(DPMPP[order], x, sigmas, lower_order_final=lower_order_final)
    assert_trajectories_match(ours, vp_loop(scheduler, x))


# --- UniPC -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [2, 3, 10])
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh2", "bh1"])
def test_unipc_matches_unipc_multistep(noise, variant, order, final_sigmas_type, num_steps):
    """UniPCMultistepScheduler(SD1.5 scaled_linear betas, solver_order=1|2|3, solver_type=bh2|bh1, predict_x0=True,
    prediction_type="epsilon", lower_order_final=True, disable_corrector=[], timestep_spacing="linspace",
    final_sigmas_type=zero|sigma_min). Ours = UniP-p + UniC on every state but the last, orders 1 → p → 1.

    diffusers bh1 with final_sigmas_type="zero" returns NaN for its last state (B(h) = h = −∞ times a 0 residual in
    its UniP-1 step into σ = 0). There we check every earlier state, and the last one against what that step is
    meant to return: the denoised estimate at the (uncorrected) last state, diffusers' ``model_outputs[-1]``.
    """
    scheduler = UniPCMultistepScheduler(
        **SD15, solver_order=order, solver_type=variant, predict_x0=True, lower_order_final=True,
        final_sigmas_type=final_sigmas_type,
    )
    scheduler.set_timesteps(num_steps)
    sigmas = scheduler.sigmas.double()
    x = noise * sigmas[0]
    ours = ours_trajectory(sample_unipc, x, sigmas, order=order, variant=variant)
    ref = vp_loop(scheduler, x)
    if variant == "bh1" and final_sigmas_type == "zero" and not torch.isfinite(ref[-1]).all():
        ref[-1] = scheduler.model_outputs[-1]  # D at the last (uncorrected) state: what σ_t = 0 makes UniP-1 return
    assert_trajectories_match(ours, ref)


# --- the comparisons can fail ------------------------------------------------------------------------------------


def test_oracles_tell_methods_apart(noise):
    """Negative control: a neighbouring method misses each oracle by far more than TOL, so agreement means something.

    Checked pairs: our 2M vs diffusers' 3M, our UniPC-2 vs diffusers' UniPC-3, Euler vs Heun, UniPC bh1 vs bh2.
    """
    def final(states):
        return states[-1]

    edm3 = EDMDPMSolverMultistepScheduler(solver_order=3, lower_order_final=False, final_sigmas_type="zero")
    edm3.set_timesteps(10)
    sigmas = edm3.sigmas.double()
    x = noise * sigmas[0]
    ours_2m = ours_trajectory(sample_dpmpp_2m, x, sigmas, lower_order_final=False)
    assert rel_err(final(ours_2m), final(edm_loop(edm3, x))) > 100 * TOL

    uni3 = UniPCMultistepScheduler(**SD15, solver_order=3)
    uni3.set_timesteps(10)
    sigmas = uni3.sigmas.double()
    x = noise * sigmas[0]
    ref = final(vp_loop(uni3, x))
    assert rel_err(final(ours_trajectory(sample_unipc, x, sigmas, order=2)), ref) > 100 * TOL
    assert rel_err(final(ours_trajectory(sample_unipc, x, sigmas, order=3, variant="bh1")), ref) > 100 * TOL

    heun = HeunDiscreteScheduler(**SD15)
    heun.set_timesteps(10)
    sigmas = heun_grid(heun)
    x = noise * sigmas[0]
    assert rel_err(final(ours_trajectory(sample_euler, x, sigmas)), final(discrete_ve_loop(heun, x))) > 100 * TOL
