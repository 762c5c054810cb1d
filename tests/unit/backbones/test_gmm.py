"""``gmm-digits`` (``epd.backbones.GMMDigits``): the exact posterior mean of the digit mixture, its limits,
guidance, prompts, input checks, decoding and seeded noise."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from epd import schedules
from epd.backbones import GMMDigits
from epd.solvers import sample_heun

F64 = torch.float64


@pytest.fixture(scope="module")
def digits():
    """The data, read straight from scikit-learn (independently of epd): raw 0..16 images, centred comps, labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float64) / 8.0 - 1.0          # [M, 8, 8] in [-1, 1]
    mean = images.mean(0)
    comps = (images - mean).reshape(len(images), -1)           # [M, 64]
    return {"raw": d.images, "mean": mean, "comps": comps, "labels": d.target}


def with_guidance(model: GMMDigits, w: float) -> GMMDigits:
    g = copy.copy(model)
    g.guidance = w
    return g


def brute_force_posterior_mean(x: np.ndarray, sigma: np.ndarray, comps: np.ndarray, comp_labels: np.ndarray,
                               s2: float, labels: np.ndarray | None) -> np.ndarray:
    """E[y | x] from Bayes' rule, one row and one component at a time.

    y ~ Σ_i π_i N(μ_i, s² I), x = y + σ ε.  p(i | x) ∝ π_i N(x; μ_i, (s² + σ²) I) and
    E[y | x, i] = (σ² μ_i + s² x) / (s² + σ²).  π is uniform over the allowed components (a label's, or all).
    """
    out = np.empty_like(x)
    dim = x.shape[1]
    for b in range(x.shape[0]):
        var = s2 + sigma[b] ** 2
        allowed = np.arange(len(comps)) if labels is None or labels[b] < 0 else np.flatnonzero(comp_labels == labels[b])
        log_joint = np.empty(len(allowed))
        cond_means = np.empty((len(allowed), dim))
        for j, i in enumerate(allowed):
            diff = x[b] - comps[i]
            log_joint[j] = -np.log(len(allowed)) - 0.5 * dim * np.log(2 * np.pi * var) - diff @ diff / (2 * var)
            cond_means[j] = (sigma[b] ** 2 * comps[i] + s2 * x[b]) / var
        post = np.exp(log_joint - logsumexp(log_joint))
        out[b] = post @ cond_means
    return out


# ---------------------------------------------------------------------------------------------------------------
# Exact posterior mean.

def test_components_are_the_centred_digits(gmm, digits):
    assert gmm.components.shape == (1797, 64)
    np.testing.assert_allclose(gmm.components.numpy(), digits["comps"], atol=1e-12)
    assert np.array_equal(gmm.component_labels.numpy(), digits["labels"])
    assert gmm.components.mean(0).abs().max() < 1e-12   # centred: the mixture mean is 0


@pytest.mark.parametrize("sigma", [0.002, 0.03, 0.1, 0.4, 1.5, 10.0, 80.0])
@pytest.mark.parametrize("conditional", [False, True])
def test_matches_brute_force_bayes(gmm, digits, sigma, conditional):
    rng = np.random.default_rng(int(sigma * 1000) + conditional)
    B = 3
    idx = rng.choice(len(digits["comps"]), B, replace=False)
    y = digits["comps"][idx] + gmm.component_var**0.5 * rng.standard_normal((B, 64))
    x = y + sigma * rng.standard_normal((B, 64))
    sig = np.full(B, sigma)
    # a label that matches the row's digit, one that does not, and an unconditional row
    labels = np.array([digits["labels"][idx[0]], (digits["labels"][idx[1]] + 5) % 10, -1]) if conditional else None
    want = brute_force_posterior_mean(x, sig, digits["comps"], digits["labels"], gmm.component_var, labels)
    got = gmm(torch.tensor(x).view(B, 1, 8, 8), torch.tensor(sig),
              None if labels is None else torch.tensor(labels)).view(B, 64).numpy()
    assert np.abs(got - want).max() <= 1e-8


def test_float32_input_gives_float32_close_to_float64(gmm):
    x = gmm.noise(range(4), dtype=F64) / 80 * 0.3 + gmm.components[:4].view(4, 1, 8, 8)
    s = torch.full((4,), 0.3, dtype=F64)
    d64 = gmm(x, s)
    d32 = gmm(x.float(), s.float())
    assert d32.dtype == torch.float32 and d64.dtype == F64
    assert (d32.double() - d64).abs().max() < 1e-5


def _mc_draw(gmm, n, sigma, label, seed):
    gen = torch.Generator().manual_seed(seed)
    pool = torch.arange(len(gmm.components)) if label is None else torch.nonzero(gmm.component_labels == label)[:, 0]
    i = pool[torch.randint(len(pool), (n,), generator=gen)]
    y = gmm.components[i] + gmm.component_var**0.5 * torch.randn(n, 64, generator=gen, dtype=F64)
    x = y + sigma * torch.randn(n, 64, generator=gen, dtype=F64)
    return y, x.view(n, 1, 8, 8)


def _z(samples: torch.Tensor) -> float:
    """Mean over iid per-sample values in units of its standard error."""
    return (samples.mean() / (samples.std() / len(samples) ** 0.5)).item()


@pytest.mark.parametrize("sigma,label", [(0.3, None), (1.0, None), (0.3, 4), (2.0, 8)])
def test_monte_carlo_posterior_mean_minimises_mse(gmm, sigma, label):
    """Sample (y, x) from the model itself. D = E[y | x] iff it minimises E|y − f(x)|² over f, so:

    * along any direction h(x), the MSE of D + δh is stationary at δ = 0: E[(y − D)·h] = 0 (a z-test, |z| < 4);
    * D beats perturbed denoisers on the paired per-sample difference |y − f|² − |y − D|² (mean > −4 SE);
    * a slightly wrong denoiser (D at 1.15 σ) fails both, which shows the test has power.
    """
    n = 4000
    y, x = _mc_draw(gmm, n, sigma, label, seed=int(100 * sigma) + (label or 0))
    cond = None if label is None else torch.full((n,), label)

    def D(s):
        return gmm(x, torch.full((n,), s, dtype=F64), cond).view(n, 64)

    d, d_hi, d_lo = D(sigma), D(1.15 * sigma), D(sigma / 1.15)
    flat_x = x.view(n, 64)
    directions = {"x": flat_x, "D(1.15σ)-D": d_hi - d, "D(σ/1.15)-D": d_lo - d, "D": d}
    for name, h in directions.items():
        z = _z(((y - d) * h).sum(1))
        assert abs(z) < 4, (name, z)
    for f in (d_hi, d_lo, d + 0.2 * (d_hi - d), d - 0.2 * (d_hi - d), 0.98 * d + 0.02 * flat_x):
        delta = ((y - f) ** 2).sum(1) - ((y - d) ** 2).sum(1)
        assert _z(delta) > -4
    # power: the wrong denoiser D(1.15σ) is detected by both statistics
    assert abs(_z(((y - d_hi) * (d_hi - d)).sum(1))) > 6
    assert _z(((y - d_hi) ** 2).sum(1) - ((y - d) ** 2).sum(1)) > 6


# ---------------------------------------------------------------------------------------------------------------
# Limits.

def test_small_sigma_picks_the_nearest_component(gmm):
    """σ → 0: the responsibilities become one-hot on the component nearest x, and D(x) → x (rate σ²/s²)."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 500, 1000, 1500])
    x = gmm.components[idx] + 0.03 * torch.randn(4, 64, generator=gen, dtype=F64)
    nearest = torch.cdist(x, gmm.components).argmin(1)
    assert torch.equal(nearest, idx)
    xs = x.view(4, 1, 8, 8)
    errs = []
    for sigma in (1e-2, 1e-3, 1e-4):
        s = torch.full((4,), sigma, dtype=F64)
        w = gmm.responsibilities(xs, s)
        assert (w[torch.arange(4), nearest] > 1 - 1e-9).all()
        errs.append((gmm(xs, s) - xs).abs().max().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-6


def test_small_sigma_with_narrow_components_tends_to_nearest_component(digits):
    """With narrow components (s ≪ σ ≪ spacing of the digits) D(x) is the nearest digit itself."""
    narrow = GMMDigits(component_std=1e-3)
    gen = torch.Generator().manual_seed(1)
    idx = torch.tensor([3, 333, 1333])
    mu = narrow.components[idx]
    for sigma in (0.05, 0.02):
        x = (mu + sigma * torch.randn(3, 64, generator=gen, dtype=F64)).view(3, 1, 8, 8)
        d = narrow(x, torch.full((3,), sigma, dtype=F64)).view(3, 64)
        assert (d - mu).abs().max() < 1e-3
        assert torch.equal(torch.cdist(d, narrow.components).argmin(1), idx)


def test_large_sigma_gives_mixture_mean_and_class_mean(gmm):
    """σ → ∞: the prior mean, 0 after centring (or the class mean of the label)."""
    gen = torch.Generator().manual_seed(2)
    class_means = torch.stack([gmm.components[gmm.component_labels == k].mean(0) for k in range(10)])
    labels = torch.tensor([-1, 0, 3, 9])
    target = torch.stack([torch.zeros(64, dtype=F64) if k < 0 else class_means[k] for k in labels])
    errs = []
    for sigma in (1e2, 1e4, 1e6):
        x = sigma * torch.randn(4, 1, 8, 8, generator=gen, dtype=F64)  # a state at that noise level
        d = gmm(x, torch.full((4,), sigma, dtype=F64), labels).view(4, 64)
        errs.append((d - target).abs().max().item())
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-4                                   # the deviation shrinks like 1/σ
    fixed = torch.randn(4, 1, 8, 8, generator=gen, dtype=F64)  # and for a fixed x like 1/σ²
    d = gmm(fixed, torch.full((4,), 1e4, dtype=F64), labels).view(4, 64)
    assert (d - target).abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Guidance.

def test_guidance_one_is_conditional(gmm):
    x = gmm.noise(range(4), dtype=F64) / 80
    s = torch.full((4,), 1.0, dtype=F64)
    cond = torch.tensor([2, 5, -1, 8])
    assert torch.equal(with_guidance(gmm, 1.0)(x, s, cond), gmm.posterior_mean(x, s, cond))


def test_guidance_formula(gmm):
    w = 3.0
    guided = with_guidance(gmm, w)
    x = gmm.noise(range(4), dtype=F64) / 80 * 1.2
    s = torch.tensor([2.0, 1.2, 3.0, 1.5], dtype=F64)
    cond = torch.tensor([2, 5, -1, 8])
    d_u = gmm(x, s, torch.full((4,), -1))
    d_c = gmm(x, s, cond)
    got = guided(x, s, cond)
    labelled = cond >= 0
    assert (got[labelled] - (d_u + w * (d_c - d_u))[labelled]).abs().max() < 1e-12
    assert ((got - d_c).flatten(1).abs().amax(1)[labelled] > 1e-3).all()   # guidance changes labelled rows
    assert torch.equal(got[~labelled], d_u[~labelled])                      # and leaves label −1 alone
    assert torch.equal(guided(x, s, None), gmm(x, s, None))                  # no cond: unconditional
    assert torch.equal(gmm(x, s, None), gmm(x, s, torch.full((4,), -1)))


@pytest.mark.parametrize("w", [1.0, 2.0])
def test_labelled_samples_land_on_their_digit(gmm, w):
    model = with_guidance(gmm, w)
    seeds = list(range(40))
    labels = torch.tensor([s % 10 for s in seeds])
    sigmas = schedules.append_zero(schedules.polynomial(20, model.sigma_min, model.sigma_max))
    with torch.no_grad():
        out = sample_heun(model, model.noise(seeds, dtype=F64), sigmas, cond=labels)
    nearest = torch.cdist(out.view(len(seeds), 64), gmm.components).argmin(1)
    hit = (gmm.component_labels[nearest] == labels).double().mean().item()
    assert hit >= 0.95


# ---------------------------------------------------------------------------------------------------------------
# Prompts, input checks, decoding, noise.

def test_encode(gmm):
    assert gmm.encode() is None
    assert gmm.encode(labels=[1, -1]).tolist() == [1, -1]
    assert gmm.encode(prompts=["a 4", ""]).tolist() == [4, -1]


def test_bad_sigma_shape_raises(gmm):
    x = gmm.noise(range(3), dtype=F64)
    for bad in (torch.tensor(1.0, dtype=F64), torch.ones(3, 1, dtype=F64), torch.ones(2, dtype=F64),
                torch.ones(4, dtype=F64)):
        with pytest.raises(ValueError, match="sigma"):
            gmm(x, bad)


@pytest.mark.parametrize("w", [1.0, 2.0])
def test_labels_out_of_range_raise(gmm, w):
    model = with_guidance(gmm, w)
    x, s = gmm.noise(range(2), dtype=F64), torch.full((2,), 1.0, dtype=F64)
    for bad in ([10, 1], [3, -2]):
        with pytest.raises(ValueError, match="labels"):
            model(x, s, torch.tensor(bad))


def test_decode(gmm, digits):
    img = gmm.decode(gmm.components[:5].view(5, 1, 8, 8))
    assert img.dtype == torch.uint8 and img.shape == (5, 8, 8)
    original = np.round(digits["raw"][:5] * 255 / 16).astype(int)   # the digit's 0..16 grey scale as 8-bit
    assert np.abs(img.numpy().astype(int) - original).max() <= 1
    # zero (the mixture mean) decodes to the data mean image; far-out values are clipped, not wrapped
    mean_img = gmm.decode(torch.zeros(1, 1, 8, 8, dtype=F64))[0].numpy().astype(int)
    assert np.abs(mean_img - np.round((digits["mean"] + 1) * 127.5)).max() <= 1
    extreme = gmm.decode(torch.tensor([-5.0, 5.0], dtype=F64).view(2, 1, 1, 1).expand(2, 1, 8, 8))
    assert (extreme[0] == 0).all() and (extreme[1] == 255).all()
    as_f32 = gmm.decode(gmm.components[:5].view(5, 1, 8, 8).float())   # half-grey ties may round either way
    assert (as_f32.int() - img.int()).abs().max() <= 1


def test_noise_depends_on_each_seed_alone(gmm):
    a = gmm.noise([7, 1, 2])
    b = gmm.noise([2, 9, 7, 7])
    assert a.shape == (3, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a[0], b[2]) and torch.equal(a[0], b[3]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    assert torch.equal(gmm.noise([5], dtype=F64).float(), gmm.noise([5]))
    big = gmm.noise(range(64), dtype=F64)
    assert abs(big.std().item() / gmm.sigma_max - 1) < 0.05   # σ_max · ε
