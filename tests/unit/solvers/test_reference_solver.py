"""The reference solver: what configure builds, that sampling runs it unchanged, and that its error estimate is
the error it has."""
import pytest
import torch

from epd import schedules
from epd.backbones import GMMDigits
from epd.sample import generate
from epd.solvers import reference_error, sample_dpmpp_3m, solve_reference
from epd.solvers.plan import configure


def _solve(g, x, steps, cond=None, **kw):
    return solve_reference(g, x, steps, sigma_min=g.sigma_min, sigma_max=g.sigma_max, cond=cond, **kw)


def test_configure_builds_the_reference_grid():
    run = configure("reference", backbone="gmm-digits")
    assert len(run.sigmas) == GMMDigits.reference_steps == 512 and not run.afs
    assert torch.allclose(run.sigmas, schedules.logsnr(512, 0.002, 80.0), rtol=0, atol=0)
    assert run.nfe == 511                          # one call per step, the grid ends at σ_min
    assert len(configure("reference", backbone="unet-digits").sigmas) == 128
    run = configure("reference", steps=64, sigma_min=0.01, sigma_max=10.0, schedule="logsnr")
    assert len(run.sigmas) == 64 and float(run.sigmas[0]) == pytest.approx(10.0)
    assert float(run.sigmas[-1]) == pytest.approx(0.01)


@pytest.mark.parametrize("kwargs, message", [
    ({"nfe": 5}, "set by steps"),
    ({"schedule": "polynomial"}, "uniform in log σ"),
    ({"steps": 8}, "at least 16"),
])
def test_configure_refuses_what_the_reference_does_not_take(kwargs, message):
    nfe = kwargs.pop("nfe", None)
    with pytest.raises(ValueError, match=message):
        configure("reference", nfe, **kwargs)


def test_steps_are_for_the_reference_only():
    with pytest.raises(ValueError, match="steps= sets the reference"):
        configure("euler", 5, steps=64)
    assert len(configure("euler", 5).sigmas) == 6    # the others keep their default (polynomial) grid


def test_reference_is_float64_dpmpp_3m_and_its_step_into_zero(gmm):
    """At σ_min: DPM-Solver++(3M) on the logSNR grid in float64; at 0: that grid with a trailing 0 (one more call,
    first order), whatever the batching."""
    x = gmm.noise(range(12))                       # float32 start states: the solve promotes them
    cond = torch.arange(12) % 10
    grid = schedules.append_zero(schedules.logsnr(32, gmm.sigma_min, gmm.sigma_max))
    states = {}

    def keep(info):
        if info["i"] == len(grid) - 3:
            states["min"] = info["x"]

    at_zero = sample_dpmpp_3m(gmm, x.double(), grid, cond=cond, callback=keep)
    ours_min, ours_zero = _solve(gmm, x, 32, cond, batch_size=5, at_zero=True)
    assert ours_min.dtype == torch.float64
    assert torch.allclose(ours_min, states["min"], rtol=0, atol=1e-12)
    assert torch.allclose(ours_zero, at_zero, rtol=0, atol=1e-12)


def test_generate_runs_the_reference_unchanged(gmm):
    run = configure("reference", steps=32, sigma_min=gmm.sigma_min, sigma_max=gmm.sigma_max)
    seeds, labels = [3, 4, 5, 6, 7], [1, 2]
    batches = list(generate(gmm, run, seeds, labels=labels, batch_size=2, progress=False))
    assert [b for b, _ in batches] == [[3, 4], [5, 6], [7]]
    images = torch.cat([img for _, img in batches])
    # generate starts from float32 noise and returns float32 states; the solve itself is float64
    expected = gmm.decode(_solve(gmm, gmm.noise(seeds), 32, torch.tensor([1, 2, 1, 2, 1])).float())
    assert images.dtype == torch.uint8 and images.shape == expected.shape
    assert (images.int() - expected.int()).abs().max() <= 1 and (images == expected).double().mean() > 0.99


def test_error_estimate_is_the_error(gmm):
    """Against twice the steps, the estimate is within a factor 2 of the error against a 16× finer run, falls
    about 4× per doubling (the 3M update is second order), and counts samples that change mode."""
    x = gmm.noise(range(100, 116), dtype=torch.float64)
    cond = torch.arange(16) % 10
    best = _solve(gmm, x, 1024, cond)
    errors = []
    for steps in (32, 64):
        coarse = _solve(gmm, x, steps, cond)
        est = reference_error(gmm, x, steps, sigma_min=gmm.sigma_min, sigma_max=gmm.sigma_max, cond=cond,
                              data=gmm.data, solved=coarse)
        true = float(((coarse - best) ** 2).mean().sqrt())
        assert true / 2 < est.rms < 2 * true
        assert est.samples == 16 and est.steps == steps and est.finer.shape == x.shape
        assert est.same_mode == float((gmm.data.nearest(coarse) == gmm.data.nearest(est.finer)).double().mean())
        errors.append(est.rms)
    assert errors[0] / errors[1] > 3
    fresh = reference_error(gmm, x, 64, sigma_min=gmm.sigma_min, sigma_max=gmm.sigma_max, cond=cond)
    assert fresh.rms == pytest.approx(errors[1], rel=1e-12) and fresh.same_mode is None
    with pytest.raises(ValueError, match="solved has shape"):
        reference_error(gmm, x, 64, sigma_min=gmm.sigma_min, sigma_max=gmm.sigma_max, solved=x[:3])
