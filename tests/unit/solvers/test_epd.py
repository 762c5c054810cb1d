"""EPD-Solver / EPD-Plugin (``epd.solvers.sample_epd``) against DPM-Solver-2, a looped reference, call counts,
gradients, per-sample tables and its errors. The denoiser is the exact, nonlinear ``GMMDigits`` posterior mean."""
from __future__ import annotations

import copy

import pytest
import torch

from epd import schedules
from epd.backbones import CallCounter
from epd.solvers import (
    BASELINES,
    SolverTable,
    TableError,
    TableMeta,
    handset_table,
    nfe,
    sample_dpm2,
    sample_epd,
)

F64 = torch.float64


@pytest.fixture(scope="module")
def guided(gmm):
    g = copy.copy(gmm)  # shares the component arrays, only the guidance differs
    g.guidance = 2.0
    return g


def start(model, batch: int, dtype=F64, seed0: int = 0) -> torch.Tensor:
    return model.noise(range(seed0, seed0 + batch), dtype=dtype)


def random_table(num_steps: int, K: int, *, afs: bool, plugin: bool = False, plugin_order: int = 4,
                 batch: int | None = None, seed: int = 0, dtype=F64, requires_grad: bool = False,
                 **meta_args) -> SolverTable:
    """A random valid table: sorted positions in (0, 1), softmax weights, scales in [0.95, 1.05]."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_steps - 1, K) if batch is None else (batch, num_steps - 1, K)
    positions = (0.02 + 0.96 * torch.rand(shape, generator=gen, dtype=dtype)).sort(-1).values
    weights = torch.softmax(torch.randn(shape, generator=gen, dtype=dtype), -1)
    scale_dir = 0.95 + 0.1 * torch.rand(shape, generator=gen, dtype=dtype)
    scale_time = 0.95 + 0.1 * torch.rand(shape, generator=gen, dtype=dtype)
    meta = TableMeta(num_steps=num_steps, num_points=K, afs=afs, plugin=plugin, plugin_order=plugin_order,
                     **meta_args)
    table = SolverTable(positions, weights, scale_dir, scale_time, meta).validate()
    if requires_grad:
        for t in table.tensors().values():
            t.requires_grad_(True)
    return table


# ---------------------------------------------------------------------------------------------------------------
# Independent references, written from the equations (not from sample_epd).

AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def reference_epd(D, x, sigmas, table: SolverTable, cond=None) -> torch.Tensor:
    """EPD step by step with K separate denoiser calls of B rows each (no repeat of rows, no flattening)."""
    meta = table.meta
    sig = sigmas.to(x)
    B, K = x.shape[0], meta.num_points

    def per_row(t: torch.Tensor, n: int) -> torch.Tensor:  # -> [B, K]
        t = t.to(x)
        return t[n].expand(B, K) if t.ndim == 2 else t[:, n, :]

    def col(v: torch.Tensor) -> torch.Tensor:  # [B] -> [B, 1, 1, 1]
        return v.reshape(B, *([1] * (x.ndim - 1)))

    past: list[torch.Tensor] = []
    for n in range(len(sig) - 1):
        s, s_next = sig[n], sig[n + 1]
        if meta.afs and n == 0:  # d_0 = x_0/σ_0 (epd) or x_0/sqrt(1 + σ_0²) (upstream)
            x0_hat = torch.zeros_like(x) if meta.afs_convention == "epd" else x - s * x / (1 + s**2).sqrt()
        else:
            x0_hat = D(x, s.repeat(B), cond)
        d = (x - x0_hat) / s
        if meta.plugin:
            past = (past + [d])[-meta.plugin_order:]
            coeffs = AB[len(past)]
            direction = sum(c * p for c, p in zip(coeffs, past[::-1]))
        else:
            direction = d
        r, lam, c, a = (per_row(t, n) for t in (table.positions, table.weights, table.scale_dir, table.scale_time))
        total = torch.zeros_like(x)
        for k in range(K):
            tau = s_next ** r[:, k] * s ** (1 - r[:, k])           # [B]
            x_k = x + col(tau - s) * direction
            g_k = (x_k - D(x_k, a[:, k] * tau, cond)) / col(tau)
            total = total + col(lam[:, k] * c[:, k]) * g_k
        x = x + (s_next - s) * total
    return x


GRIDS = [("polynomial", 3), ("polynomial", 4), ("polynomial", 6), ("polynomial", 8),
         ("logsnr", 3), ("logsnr", 5), ("time_uniform", 4), ("time_uniform", 6)]


# ---------------------------------------------------------------------------------------------------------------
# K = 1, r = 1/2, λ = 1, unit scales is DPM-Solver-2.

@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("schedule,num_steps", GRIDS)
def test_k1_midpoint_is_dpm2(gmm, schedule, num_steps, afs):
    table = handset_table(num_steps, 1, afs=afs, schedule=schedule)
    assert float(table.positions.unique()) == 0.5 and float(table.weights.unique()) == 1.0
    sigmas = table.meta.sigmas()
    x = start(gmm, 6)
    # Bit for bit: both spell the midpoint σ_{n+1}^{1/2}·σ_n^{1/2} (a sqrt(σ_n·σ_{n+1}) can differ by one ulp, which
    # the GMM ODE amplifies ~1e4-fold on a 3-point grid).
    assert torch.equal(sample_epd(gmm, x, sigmas, table), sample_dpm2(gmm, x, sigmas, afs=afs))


def test_k1_midpoint_same_calls_as_dpm2(gmm):
    """The two solvers make the same denoiser calls: same rows, same σ, same inputs."""
    for afs in (False, True):
        table = handset_table(5, 1, afs=afs)
        sigmas, x = table.meta.sigmas(), start(gmm, 3)
        logs = []
        for run in (lambda D: sample_epd(D, x, sigmas, table), lambda D: sample_dpm2(D, x, sigmas, afs=afs)):
            log = []
            run(lambda y, s, c=None, log=log: log.append((y.clone(), s.clone())) or gmm(y, s, c))
            logs.append(log)
        (epd_log, dpm_log) = logs
        assert len(epd_log) == len(dpm_log) == 2 * 4 - afs
        for (xe, se), (xd, sd) in zip(epd_log, dpm_log):
            assert xe.shape == xd.shape
            assert torch.equal(se, sd)
            assert torch.equal(xe, xd)


# ---------------------------------------------------------------------------------------------------------------
# Batched sample_epd equals the looped reference.

PLUGIN = [(False, 4), (True, 4), (True, 2)]


@pytest.mark.parametrize("with_cond", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("plugin,order", PLUGIN)
@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("K", [2, 3])
def test_batched_equals_looped_reference(gmm, guided, K, afs, plugin, order, per_sample, with_cond):
    B, N = 3, 5
    model = guided if with_cond else gmm
    cond = torch.tensor([3, -1, 7]) if with_cond else None
    table = random_table(N, K, afs=afs, plugin=plugin, plugin_order=order, batch=B if per_sample else None,
                         seed=17 * K + 3 * afs + order + 100 * plugin)
    sigmas = schedules.polynomial(N)
    x = start(model, B)
    got = sample_epd(model, x, sigmas, table, cond=cond)
    want = reference_epd(model, x, sigmas, table, cond=cond)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= 1e-6
    # Relative to the state: the batched call only reorders identical float64 arithmetic.
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-10


@pytest.mark.parametrize("plugin", [False, True])
def test_upstream_afs_convention(gmm, plugin):
    """``afs_convention="upstream"``: d_0 = x_0 / sqrt(1 + σ_0²), as the EPD authors' tables were trained with; on a
    short grid from σ_0 = 80 it moves the sample by a small but clear amount."""
    tables = {c: random_table(4, 2, afs=True, plugin=plugin, seed=3, afs_convention=c) for c in ("epd", "upstream")}
    x = start(gmm, 5)
    out = {c: sample_epd(gmm, x, t.meta.sigmas(), t) for c, t in tables.items()}
    ref = reference_epd(gmm, x, tables["upstream"].meta.sigmas(), tables["upstream"])
    torch.testing.assert_close(out["upstream"], ref, rtol=1e-10, atol=1e-10)
    gap = ((out["upstream"] - out["epd"]).norm() / out["epd"].norm()).item()
    assert 1e-6 < gap < 0.1


def test_reference_is_sensitive(gmm, guided):
    """The comparisons above have power: plugin, row order of cond and per-sample rows all change the result."""
    B, N, K = 3, 5, 2
    sigmas, x = schedules.polynomial(N), start(gmm, B)
    plain = random_table(N, K, afs=True, seed=1)
    plug = SolverTable(**plain.tensors(), meta=TableMeta(num_steps=N, num_points=K, afs=True, plugin=True))
    a, b = sample_epd(gmm, x, sigmas, plain), sample_epd(gmm, x, sigmas, plug)
    assert (a - b).abs().max() > 1e-3
    cond = torch.tensor([3, -1, 7])
    c1 = sample_epd(guided, x, sigmas, plain, cond=cond)
    c2 = reference_epd(guided, x, sigmas, plain, cond=cond.flip(0))
    assert (c1 - c2).abs().max() > 1e-3
    # K = 1 reference reproduces DPM-Solver-2 (a check of the reference itself).
    table = handset_table(N, 1, afs=False)
    assert (reference_epd(gmm, x, sigmas, table) - sample_dpm2(gmm, x, sigmas)).abs().max() <= 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Sequential calls and NFE.

@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("plugin", [False, True])
def test_epd_call_pattern(gmm, K, afs, plugin):
    B = 2
    for N in (2, 3, 6):
        table = random_table(N, K, afs=afs, plugin=plugin, seed=N)
        counter = CallCounter(gmm)
        sample_epd(counter, start(gmm, B), schedules.polynomial(N), table, cond=torch.tensor([1, -1]))
        expected = []
        for n in range(N - 1):
            if not (afs and n == 0):
                expected.append(B)          # d_n at the step's start
            expected.append(B * K)          # the K points, one batched call
        assert counter.rows == expected
        assert counter.calls == 2 * (N - 1) - afs == nfe("epd", N, afs=afs) == table.meta.nfe


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_nfe_formula(gmm, name):
    B = 2
    x = start(gmm, B)
    for N in (2, 3, 4, 7):
        for zero in (False, True):
            sigmas = schedules.polynomial(N)
            if zero:
                sigmas = schedules.append_zero(sigmas)
            for afs in (False, True):
                counter = CallCounter(gmm)
                with torch.no_grad():
                    out = BASELINES[name](counter, x, sigmas, afs=afs)
                assert torch.isfinite(out).all()
                assert counter.calls == nfe(name, len(sigmas), ends_at_zero=zero, afs=afs), (name, N, zero, afs)
                assert all(rows == B for rows in counter.rows)


def test_nfe_unknown_solver():
    with pytest.raises(ValueError):
        nfe("rk45", 5)


# ---------------------------------------------------------------------------------------------------------------
# Gradients into the table (distillation).

@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("plugin", [False, True])
def test_gradients_reach_table(gmm, plugin, per_sample):
    B, N, K = 2, 4, 2
    table = random_table(N, K, afs=True, plugin=plugin, batch=B if per_sample else None, seed=5,
                         requires_grad=True)
    x = start(gmm, B)
    target = sample_dpm2(gmm, x, schedules.polynomial(12)).detach()
    out = sample_epd(gmm, x, schedules.polynomial(N), table, cond=torch.tensor([2, -1]))
    loss = (out - target).square().mean()
    loss.backward()
    for name, t in table.tensors().items():
        assert t.grad is not None, name
        assert torch.isfinite(t.grad).all(), name
        assert t.grad.abs().sum() > 0, name
        # every step's row moves the output
        per_step = t.grad.abs().sum(-1) if t.grad.ndim == 2 else t.grad.abs().sum((0, -1))
        assert (per_step > 0).all(), name


def test_gradients_match_finite_differences(gmm):
    """Autograd through the batched call is the true derivative (float64 gradcheck, tiny, smooth setting)."""
    N, K = 3, 2
    base = random_table(N, K, afs=True, seed=9)
    sigmas = schedules.logsnr(N, sigma_min=0.5, sigma_max=10.0)
    x = start(gmm, 2) / gmm.sigma_max * 10.0

    def run(positions, weights, scale_dir, scale_time):
        return sample_epd(gmm, x, sigmas, SolverTable(positions, weights, scale_dir, scale_time, base.meta))

    inputs = tuple(t.clone().requires_grad_(True) for t in base.tensors().values())
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Per-sample tables.

@pytest.mark.parametrize("plugin", [False, True])
def test_per_sample_tables_equal_separate_runs(guided, plugin):
    B, N, K = 3, 5, 3
    table = random_table(N, K, afs=True, plugin=plugin, batch=B, seed=23)
    cond = torch.tensor([4, -1, 9])
    x, sigmas = start(guided, B), schedules.polynomial(N)
    together = sample_epd(guided, x, sigmas, table, cond=cond)
    for b in range(B):
        own = SolverTable(**{k: v[b] for k, v in table.tensors().items()}, meta=table.meta)  # shared [S, K] form
        alone = sample_epd(guided, x[b:b + 1], sigmas, own, cond=cond[b:b + 1])
        assert (together[b:b + 1] - alone).abs().max().item() <= 1e-10
    # the tables differ, so the rows really used different tables
    first = SolverTable(**{k: v[0] for k, v in table.tensors().items()}, meta=table.meta)
    assert (sample_epd(guided, x, sigmas, first, cond=cond)[1:] - together[1:]).abs().max() > 1e-4


def test_per_sample_table_of_batch_one_broadcasts(gmm):
    N, K = 4, 2
    table = random_table(N, K, afs=False, seed=2)
    one = SolverTable(**{k: v.unsqueeze(0) for k, v in table.tensors().items()}, meta=table.meta)
    x, sigmas = start(gmm, 3), schedules.polynomial(N)
    assert (sample_epd(gmm, x, sigmas, one) - sample_epd(gmm, x, sigmas, table)).abs().max() <= 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Errors.

def test_grid_length_mismatch_raises_table_error(gmm):
    table = handset_table(5, 2)
    x = start(gmm, 2)
    for N in (4, 6):
        with pytest.raises(TableError, match="num_steps=5"):
            sample_epd(gmm, x, schedules.polynomial(N), table)


def test_grid_ending_at_zero_raises_value_error(gmm):
    table = handset_table(5, 2)
    sigmas = schedules.append_zero(schedules.polynomial(4))  # 5 points, so the length check passes
    with pytest.raises(ValueError, match="sigma_min > 0") as info:
        sample_epd(gmm, start(gmm, 2), sigmas, table)
    assert not isinstance(info.value, TableError)


def test_per_sample_table_batch_mismatch_raises(gmm):
    table = random_table(4, 2, afs=False, batch=3)
    with pytest.raises(TableError):
        sample_epd(gmm, start(gmm, 2), schedules.polynomial(4), table)
