"""Learned grids: the parametrisation keeps every iterate valid, the grid file round-trips and refuses malformed input
with its own message, and a solver (baseline on a SolverGrid, EPD on a table with its own grid) steps on exactly the
grid it was given.

Malformed files are written by hand with plain ``json``, bypassing ``save_grid``'s validation. Nothing here
unpickles: pickles are only written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pickle

import pytest
import torch

from epd.solvers import (BASELINES, GridError, SolverGrid, TableError, handset_table, load_grid, load_table, nfe,
                         save_grid, save_table)
from epd.solvers.grid import GridParams
from epd.solvers.plan import check_grid_use, check_table_use, configure
from epd.solvers.table import EXPLICIT

GRID = (80.0, 9.5, 1.25, 0.31, 0.002)   # not any named schedule


def good_header() -> dict:
    return {"format": "epd-solver-grid", "format_version": 1, "solver": "ipndm", "grid": list(GRID), "afs": False,
            "nfe": 4, "backbone": "gmm-digits", "schedule": "time_uniform", "conditions": list(range(10)),
            "provenance": {"by": "hand"}}


def write(path, header) -> None:
    path.write_text(json.dumps(header))


# ------------------------------------------------------------------------------------------------ the parametrisation
def test_grid_params_start_where_they_are_told():
    start = torch.tensor(GRID, dtype=torch.float64)
    got = GridParams(start)()
    assert torch.allclose(got, start, rtol=1e-12)
    assert got[0].item() == GRID[0] and got[-1].item() == GRID[-1]   # the ends to the last bit


@pytest.mark.parametrize("objective", ["collide", "overtake", "random"])
def test_grid_params_stay_strictly_decreasing_under_a_large_lr(objective):
    """Adam at lr 5 for 400 steps on objectives that push points together, past their neighbours, or anywhere:
    every iterate is strictly decreasing (also in float32, the solvers' state dtype) with the ends fixed."""
    start = torch.tensor(GRID, dtype=torch.float64)
    params = GridParams(start)
    opt = torch.optim.Adam(params.parameters(), lr=5.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        s = params()
        if objective == "collide":      # pull σ_1 onto σ_2 and σ_3 onto σ_4 = σ_min
            loss = (s[1].log() - s[2].log()) ** 2 + (s[3].log() - s[4].log()) ** 2
        elif objective == "overtake":   # push σ_1 above σ_0 and σ_3 below σ_min
            loss = -s[1] + s[3]
        else:
            loss = (torch.randn(len(s), generator=gen, dtype=torch.float64) * 100 * s.log()).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        s = params().detach()
        assert s[0].item() == GRID[0] and s[-1].item() == GRID[-1]
        assert bool((s[:-1] > s[1:]).all()), s
        assert bool((s.float()[:-1] > s.float()[1:]).all()), s
    assert not torch.allclose(params().detach(), start), "the objective never moved the grid"


def test_grid_params_refuse_a_bad_start():
    with pytest.raises(ValueError, match="strictly decreasing"):
        GridParams(torch.tensor([80.0, 1.0, 1.0, 0.002]))
    with pytest.raises(ValueError, match="positive"):
        GridParams(torch.tensor([80.0, 1.0, 0.0]))


# ------------------------------------------------------------------------------------------------ the file
def test_grid_round_trip(tmp_path):
    grid = SolverGrid("unipc", GRID, backbone="gmm-digits", conditions=tuple(range(10)))
    path = save_grid(grid, tmp_path / "g", provenance={"ld3": {"iterations": 3}})
    assert path == tmp_path / "g.json" and sorted(p.name for p in tmp_path.iterdir()) == ["g.json"]
    header = json.loads(path.read_text())
    assert header["format"] == "epd-solver-grid" and header["nfe"] == 4 and header["provenance"]["ld3"]
    for p in (tmp_path / "g", tmp_path / "g.json"):
        assert load_grid(p) == grid
    assert load_grid(path, expect={"nfe": 4, "solver": "unipc", "conditions": list(range(10))}) == grid
    assert torch.equal(grid.sigmas(), torch.tensor(GRID, dtype=torch.float64))


def test_learned_grid_table_round_trip(tmp_path):
    """An EPD table with its own grid keeps it through its files, and its sigmas are that grid."""
    own = [80.0, 3.0, 0.11, 0.002]
    table = handset_table(4, 2, schedule="time_uniform", backbone="gmm-digits")
    table.meta = dataclasses.replace(table.meta, grid=own)
    save_table(table, tmp_path / "t")
    loaded = load_table(tmp_path / "t.json")
    assert loaded.meta.grid == own and loaded.meta.schedule == "time_uniform"
    assert torch.equal(loaded.meta.sigmas(), torch.tensor(own, dtype=torch.float64))


@pytest.mark.parametrize("change, message", [
    ({"format": "epd-solver-table"}, "is not an epd solver grid"),
    ({"format_version": 2}, "unsupported format_version 2"),
    ({"extra": 1}, r"unknown keys \['extra'\]"),
    ({"solver": "epd"}, "unknown solver 'epd'"),
    ({"grid": [80.0]}, "grid must list at least 2 numbers"),
    ({"grid": [80.0, "1.0", 0.002]}, "grid must list at least 2 numbers"),
    ({"grid": [80.0, 1.0, float("nan"), 0.002], "nfe": 3}, "grid must be finite"),
    ({"grid": [80.0, -1.0, 0.002], "nfe": 2}, "grid must be positive"),
    ({"grid": [80.0, 1.0, 2.0, 0.3, 0.002]}, "grid must be strictly decreasing"),
    ({"nfe": 5}, "nfe=5 but a ipndm grid of 5 points"),
    ({"afs": "no"}, "afs must be true or false"),
    ({"backbone": 3}, "backbone must be a string"),
    ({"schedule": "cosine"}, "schedule must be one of"),
    ({"conditions": []}, "conditions must be null or a non-empty list"),
])
def test_malformed_grid_refused_with_its_own_message(tmp_path, change, message):
    path = tmp_path / "g.json"
    write(path, {**good_header(), **change})
    with pytest.raises(GridError, match=message) as e:
        load_grid(path)
    assert str(path) in str(e.value)


def test_missing_keys_and_files_refused(tmp_path):
    header = good_header()
    del header["grid"]
    write(tmp_path / "g.json", header)
    with pytest.raises(GridError, match=r"lacks \['grid'\]"):
        load_grid(tmp_path / "g.json")
    with pytest.raises(GridError, match="grid file missing"):
        load_grid(tmp_path / "nowhere.json")
    (tmp_path / "bad.json").write_text('{"format": "epd-solver-grid", ')
    with pytest.raises(GridError, match="not valid JSON"):
        load_grid(tmp_path / "bad.json")
    write(tmp_path / "ok.json", good_header())
    with pytest.raises(GridError, match="grid has nfe=4, expected 5"):
        load_grid(tmp_path / "ok.json", expect={"nfe": 5})


def test_pickles_refused_unread(tmp_path):
    (tmp_path / "g.pt").write_bytes(pickle.dumps(good_header()))
    with pytest.raises(GridError, match="looks like a pickle"):
        load_grid(tmp_path / "g.pt")
    (tmp_path / "h.json").write_bytes(pickle.dumps(good_header()))
    with pytest.raises(GridError, match="is a pickle"):
        load_grid(tmp_path / "h.json")
    (tmp_path / "g.txt").write_text("{}")
    with pytest.raises(GridError, match="a grid is a NAME.json file"):
        load_grid(tmp_path / "g.txt")


def test_own_grid_refuses_another_schedule():
    """A grid file, or a table carrying a grid learned on a schedule, belongs to that schedule's configs: asking for
    another one is refused, naming both; asking for its own passes."""
    grid = SolverGrid("ipndm", GRID, schedule="time_uniform")
    check_grid_use(grid, schedule="time_uniform")
    with pytest.raises(GridError, match="g.json carries its own grid, learned on schedule 'time_uniform'; asked for "
                                        "schedule 'polynomial'"):
        check_grid_use(grid, schedule="polynomial", source="g.json")
    table = handset_table(4, 2, schedule="time_uniform", backbone="gmm-digits")
    table.meta = dataclasses.replace(table.meta, grid=[80.0, 3.0, 0.11, 0.002])
    check_table_use(table, schedule="time_uniform")
    with pytest.raises(TableError, match="learned on schedule 'time_uniform'; asked for schedule 'logsnr'"):
        check_table_use(table, schedule="logsnr")
    with pytest.raises(GridError, match="made for backbone 'gmm-digits', not 'sd15'"):
        check_grid_use(dataclasses.replace(grid, backbone="gmm-digits"), backbone="sd15")


def test_save_refuses_an_invalid_grid(tmp_path):
    with pytest.raises(GridError, match="strictly decreasing"):
        save_grid(SolverGrid("ipndm", (80.0, 1.0, 1.0, 0.002)), tmp_path / "g")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ sampling on it
class Recorder:
    """A linear denoiser (D = x / (1 + σ²), the posterior mean of N(0, I) data) that records every σ it is asked."""

    def __init__(self):
        self.sigmas: list[list[float]] = []

    def __call__(self, x, sigma, cond=None):
        self.sigmas.append(sigma.tolist())
        return x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2)


@pytest.mark.parametrize("solver", sorted(BASELINES))
def test_baseline_steps_on_its_grid(solver):
    grid = SolverGrid(solver, GRID, afs=solver == "dpm2")
    run = configure(solver, grid=grid)
    assert run.nfe == grid.nfe == nfe(solver, len(GRID), afs=grid.afs)
    rec = Recorder()
    run(rec, torch.randn(3, 1, 2, 2, dtype=torch.float64) * 80)
    starts = [s[0] for s in rec.sigmas]
    assert len(rec.sigmas) == run.nfe
    for point in GRID[int(grid.afs):-1]:   # each step starts with a call at its own grid point
        assert any(math.isclose(s, point, rel_tol=1e-12) for s in starts), (point, starts)
    with pytest.raises(GridError, match="the grid is for 'ipndm'"):
        configure("unipc", grid=SolverGrid("ipndm", GRID))
    with pytest.raises(GridError, match="the grid is for nfe=4"):
        configure("ipndm", 5, grid=SolverGrid("ipndm", GRID))


def test_table_with_its_own_grid_is_sampled_on_it():
    """configure() takes a table's own grid (not its schedule's), and EPD's calls sit at that grid's points:
    step n calls D at σ_n (not on step 0 with AFS) and at a_k·τ_k, τ_k = σ_{n+1}^{r_k}·σ_n^{1−r_k}."""
    own = [80.0, 3.0, 0.11, 0.002]
    table = handset_table(4, 2, schedule="logsnr", backbone="gmm-digits")
    table.meta = dataclasses.replace(table.meta, grid=own)
    run = configure("epd", table=table)
    assert run.sigmas.tolist() == own
    rec = Recorder()
    run(rec, torch.randn(2, 1, 2, 2, dtype=torch.float64) * 80)
    r = table.positions[0].double()
    expected = []
    for n in range(3):
        if n > 0:
            expected.append([own[n]] * 2)
        tau = own[n + 1] ** r * own[n] ** (1 - r)
        expected.append(tau.repeat(2).tolist())   # rows b·K + k: both samples' K points
    assert len(rec.sigmas) == len(expected) == table.meta.nfe
    for got, want in zip(rec.sigmas, expected):
        assert sorted(got) == pytest.approx(sorted(want), rel=1e-12)
    explicit = dataclasses.replace(table.meta, schedule=EXPLICIT)
    assert explicit.sigmas().tolist() == own


def test_benchmark_measures_grids_beside_tables(tmp_path):
    """A grid file is a benchmark row of its own; a grid equal to a schedule's measures exactly as that schedule."""
    from epd.benchmark import BenchConfig, run_benchmark
    from epd.solvers.plan import grid_for, plan_for_nfe

    same = SolverGrid("ipndm", tuple(grid_for(plan_for_nfe("ipndm", 4), "logsnr", 0.002, 80.0).tolist()),
                      backbone="gmm-digits")
    moved = SolverGrid("ipndm", GRID, backbone="gmm-digits")
    own = handset_table(4, 2, schedule="logsnr", backbone="gmm-digits")
    own.meta = dataclasses.replace(own.meta, grid=[80.0, 3.0, 0.11, 0.002])
    cfg = BenchConfig(solvers=["ipndm"], schedules=["logsnr"], nfes=[4, 5], num_samples=100, batch_size=100,
                      reference_steps=32, reference_check=10, seed_sets=1,
                      grids=[f"same={save_grid(same, tmp_path / 'same')}", str(save_grid(moved, tmp_path / 'moved'))],
                      tables=[f"own={save_table(own, tmp_path / 'own')}"])
    rows, _ = run_benchmark(cfg, progress=False)
    by = {(r["solver"], r["schedule"], r["nfe"]): r for r in rows}
    assert by[("same", "learned", 4)]["rms"] == by[("ipndm", "logsnr", 4)]["rms"]
    assert by[("ld3-ipndm", "learned", 4)]["rms"] != by[("ipndm", "logsnr", 4)]["rms"]
    assert ("own", "learned", 5) in by and all(r["measured_nfe"] == r["nfe"] for r in rows)
