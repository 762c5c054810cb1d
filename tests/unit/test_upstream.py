"""Importing the EPD authors' solver tables (epd.upstream): read without running them, refused when malformed, and
the same sampler as theirs.

The snapshots are written by the tests in upstream's persistence layout (tests/upstream_pickles.py) with the
attributes the published files carry. The oracle for the sampler is written here from upstream's equations
(``EPD_predictor.forward`` and ``epd_sampler`` / ``ipndm_sampler`` of github.com/BeierZhu/EPD, branch EPD-Solver):
one point at a time, the raw parameters mapped in place, positions unsorted, the Adams–Bashforth buffer kept as they
keep it; it calls nothing of epd's solvers. Grids of the text-to-image tables are checked against diffusers'
schedulers with the settings of the published models.
"""
from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from epd import schedules
from epd.solvers import TableError, load_table, sample_epd
from epd.solvers.plan import check_table_use, configure
from epd.upstream import UpstreamError, import_table, read_snapshot, write_imported_table
from upstream_pickles import PIXEL_ATTRS, PLUSPLUS_ATTRS, Persistent, dump, module_state, raw_params, write_snapshot

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

T_STEPS = schedules.polynomial(5).float()   # a float32 training grid, as the snapshots carry


def pixel_snapshot(tmp_path, name="snap.pkl", t_steps=T_STEPS, seed=0, **attrs):
    attrs = {"num_steps": len(t_steps), **attrs}
    params = raw_params(attrs["num_steps"], attrs.get("num_points", PIXEL_ATTRS["num_points"]), seed)
    return write_snapshot(tmp_path / name, attrs, params, t_steps=t_steps), params


# --- the oracle: upstream's sampler from its equations -------------------------------------------------------------

def upstream_sample(net, latents, params, attrs, t_steps):
    """``x = latents·t_0``, then per step: d_cur (AFS: x / sqrt(1 + t²)); for each point j: t_mid = t_next^r · t_cur^(1−r),
    x_mid from d_cur (EPD) or the Adams–Bashforth combination of d_cur and the buffer (iPNDM), D at scale_time·t_mid,
    x_next += w·scale_dir·(t_next − t_cur)·(x_mid − D)/t_mid; the buffer keeps the last max_order − 1 values of d_cur."""
    p = {k: v.double() for k, v in params.items()}
    r = torch.sigmoid(p["r_params"])
    w = torch.softmax(p["weight_s"], dim=-1)

    def bounded(raw, b):
        return 2 * torch.sigmoid(0.5 * raw) * b + (1 - b) if b else torch.ones_like(raw)

    sd, st = bounded(p["scale_dir_params"], attrs["scale_dir"]), bounded(p["scale_time_params"], attrs["scale_time"])
    t = t_steps.double()
    x_next = latents * t[0]
    buffer = []
    for i in range(len(t) - 1):
        x_cur, t_cur, t_next = x_next, t[i], t[i + 1]
        if attrs["afs"] and i == 0:
            d_cur = x_cur / (1 + t_cur**2).sqrt()
        else:
            d_cur = (x_cur - net(x_cur, t_cur.expand(len(x_cur)))) / t_cur
        x_next = x_cur
        for j in range(attrs["num_points"]):
            scale_dir = 1.0 if attrs["fcn"] and i == len(t) - 2 else sd[i, j]
            t_mid = t_next ** r[i, j] * t_cur ** (1 - r[i, j])
            order = min(attrs["max_order"], len(buffer) + 1) if attrs["sampler_stu"] == "ipndm" else 1
            if order == 1:
                direction = d_cur
            elif order == 2:
                direction = (3 * d_cur - buffer[-1]) / 2
            elif order == 3:
                direction = (23 * d_cur - 16 * buffer[-1] + 5 * buffer[-2]) / 12
            else:
                direction = (55 * d_cur - 59 * buffer[-1] + 37 * buffer[-2] - 9 * buffer[-3]) / 24
            x_mid = x_cur + (t_mid - t_cur) * direction
            d_mid = (x_mid - net(x_mid, (st[i, j] * t_mid).expand(len(x_cur)))) / t_mid
            x_next = x_next + w[i, j] * scale_dir * (t_next - t_cur) * d_mid
        if attrs["sampler_stu"] == "ipndm":
            buffer = (buffer + [d_cur])[-(attrs["max_order"] - 1):] if attrs["max_order"] > 1 else []
    return x_next


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


CASES = [
    dict(sampler_stu="epd", afs=True),
    dict(sampler_stu="epd", afs=False, num_points=3),
    dict(sampler_stu="epd", afs=True, scale_dir=0.1, scale_time=0.0, fcn=True),
    dict(sampler_stu="epd", afs=False, scale_dir=0.0, scale_time=0.2),
    dict(sampler_stu="ipndm", afs=True, max_order=3, scale_time=0.2),
    dict(sampler_stu="ipndm", afs=False, max_order=3, num_points=3),
    dict(sampler_stu="ipndm", afs=True, max_order=4),
    dict(sampler_stu="ipndm", afs=False, max_order=2, scale_dir=0.0, scale_time=0.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sample_epd_equals_upstreams_sampler(case, tmp_path, gmm):
    """float64 on gmm-digits: epd's sampler with the imported table (upstream conventions) = upstream's equations."""
    path, params = pixel_snapshot(tmp_path, t_steps=schedules.polynomial(6).float(), seed=3, **case)
    attrs = {**PIXEL_ATTRS, **case}
    table, provenance = import_table(path)
    assert table.meta.plugin == (case["sampler_stu"] == "ipndm") and table.meta.afs == case["afs"]
    assert provenance["sorted_steps"]                      # the raw positions were out of order: sorting is exercised
    latents = torch.randn(16, *gmm.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs = upstream_sample(gmm, latents, params, attrs, schedules.polynomial(6).float())
    with torch.no_grad():
        ours = sample_epd(gmm, latents * table.meta.sigmas()[0], table.meta.sigmas(), table)
    assert _rel(ours, theirs) < 1e-10
    if case["afs"]:   # the convention matters: epd's own AFS gives another sample
        other, _ = import_table(path, afs_convention="epd")
        with torch.no_grad():
            assert _rel(sample_epd(gmm, latents * 80.0, other.meta.sigmas(), other), theirs) > 1e-6


def test_plugin_order_is_max_order(tmp_path, gmm):
    """The plugin's Adams–Bashforth order is the snapshot's max_order, not epd's default 4 (which samples otherwise)."""
    path, params = pixel_snapshot(tmp_path, t_steps=schedules.polynomial(6).float(), sampler_stu="ipndm", max_order=3)
    table, _ = import_table(path)
    assert table.meta.plugin_order == 3
    latents = torch.randn(8, *gmm.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    theirs = upstream_sample(gmm, latents, params, {**PIXEL_ATTRS, "sampler_stu": "ipndm", "max_order": 3},
                             schedules.polynomial(6).float())
    sig = table.meta.sigmas()
    order4 = type(table)(**{**table.tensors(), "meta": type(table.meta)(**{**table.meta.__dict__, "plugin_order": 4})})
    with torch.no_grad():
        assert _rel(sample_epd(gmm, latents * sig[0], sig, table), theirs) < 1e-10
        assert _rel(sample_epd(gmm, latents * sig[0], sig, order4), theirs) > 1e-4


def test_sorting_unordered_positions_is_exact(tmp_path, gmm):
    """Sorting a step's points by position (with their weights and scales) gives the same samples."""
    path, params = pixel_snapshot(tmp_path, seed=5)
    table, provenance = import_table(path)
    assert provenance["sorted_steps"]
    raw_r = torch.sigmoid(params["r_params"].double())
    assert bool((raw_r[:, 1:] < raw_r[:, :-1]).any()) and bool((table.positions[:, 1:] > table.positions[:, :-1]).all())
    undo = raw_r.argsort(-1).argsort(-1)          # sorted order → the snapshot's order
    unsorted = type(table)(**{n: t.gather(-1, undo) for n, t in table.tensors().items()}, meta=table.meta)
    assert torch.equal(unsorted.positions, raw_r)
    x = torch.randn(8, *gmm.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    with torch.no_grad():
        assert _rel(sample_epd(gmm, x, table.meta.sigmas(), unsorted), sample_epd(gmm, x, table.meta.sigmas(), table)) < 1e-13


# --- inert reading ---------------------------------------------------------------------------------------------------

def test_import_runs_nothing_from_the_pickle(tmp_path):
    """A snapshot whose module source writes a file, with a state that calls os.system: imported, nothing ran."""
    by_source, by_system = tmp_path / "ran-source", tmp_path / "ran-system"
    source = f"import os\nopen({str(by_source)!r}, 'w').write('ran')\nclass EPD_predictor:\n    pass\n"

    class Payload:
        def __reduce__(self):
            import os
            return os.system, (f"touch {by_system}",)

    params = raw_params(5, 2)
    path = write_snapshot(tmp_path / "evil.pkl", {"num_steps": 5}, params, t_steps=T_STEPS, module_src=source,
                          extra_state={"hook": Payload()})
    table, provenance = import_table(path)
    assert not by_source.exists() and not by_system.exists()
    raw = read_snapshot(path)
    assert torch.equal(raw["r_params"], params["r_params"]) and torch.equal(raw["t_steps"], T_STEPS)
    assert "hook" not in raw and raw["loss_fn"]["num_steps_teacher"] == 9
    assert table.meta.nfe == 7 and table.meta.backbone == "" and table.meta.schedule == "explicit"
    assert table.meta.grid == T_STEPS.double().tolist() and table.meta.afs_convention == "upstream"
    assert provenance["dataset"] == "cifar10" and provenance["source"]["file"] == "evil.pkl"


def test_round_trip_through_save_and_load(tmp_path, gmm):
    path, _ = pixel_snapshot(tmp_path, scale_time=0.2, sampler_stu="ipndm")
    table, _ = import_table(path)
    json_path = write_imported_table(path, tmp_path / "out" / "cifar10-nfe7")
    loaded = load_table(json_path)
    assert loaded.meta == table.meta
    for name, t in table.tensors().items():
        assert torch.equal(getattr(loaded, name), t.float())
    header = json.loads(json_path.read_text())
    prov = header["provenance"]
    assert prov["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["scale_bounds"] == {"scale_dir": 0.05, "scale_time": 0.2} and header["meta"]["scale_bound"] == 0.2
    assert prov["unused_attributes"]["sampler_tea"] == "heun" and prov["loss_fn"]["sigma_max"] == 80.0
    x = torch.randn(8, *gmm.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    with torch.no_grad():   # float32 storage of the tensors: float32-rounding differences only
        assert _rel(sample_epd(gmm, x, loaded.meta.sigmas(), loaded), sample_epd(gmm, x, table.meta.sigmas(), table)) < 1e-5


# --- the text-to-image tables' grids -------------------------------------------------------------------------------

def test_sd15_table_grid_is_diffusers_linspace(tmp_path):
    """SD1.5's scheduler (scaled-linear betas 0.00085–0.012, 1000 steps) with timestep_spacing="linspace"."""
    diffusers = pytest.importorskip("diffusers")
    path = write_snapshot(tmp_path / "sd15.pkl", PLUSPLUS_ATTRS["sd15"])
    table, prov = import_table(path)
    m = table.meta
    assert (m.backbone, m.schedule, m.schedule_args, m.guidance, m.afs, m.plugin) == (
        "sd15", "discrete", {"spacing": "linspace"}, 7.5, False, False)
    assert m.nfe == 20 and prov["backend"] == "ldm" and prov["backend_config"] == {"resolution": 1024}
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 num_train_timesteps=1000, timestep_spacing="linspace")
    scheduler.set_timesteps(11)
    torch.testing.assert_close(m.sigmas(), scheduler.sigmas[:-1].double(), rtol=2e-5, atol=0)
    assert m.sigma_max == pytest.approx(float(scheduler.sigmas[0]), rel=1e-5)


def test_sd3_table_grid_is_diffusers_flow_match_shift_3(tmp_path):
    """SD3-Medium's FlowMatchEulerDiscreteScheduler(shift=3.0), set_timesteps(num_steps), without the trailing 0."""
    diffusers = pytest.importorskip("diffusers")
    table, prov = import_table(write_snapshot(tmp_path / "sd3.pkl", PLUSPLUS_ATTRS["sd3"]))
    m = table.meta
    assert (m.backbone, m.schedule, m.schedule_args, m.guidance) == (
        "sd3", "flow_match", {"shift": 3.0, "num_train_timesteps": 1000}, 4.5)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(11)
    torch.testing.assert_close(m.sigmas(), scheduler.sigmas[:-1].double(), rtol=1e-6, atol=0)
    assert prov["backend_config"]["sigma_min"] == pytest.approx(scheduler.config.shift / 1000 / (1 + 2 / 1000))


def test_flux_table_grid_is_diffusers_dynamic_shift(tmp_path):
    """FLUX.1-dev's scheduler (use_dynamic_shifting, base/max shift 0.5/1.15 over 256/4096 tokens) at the recorded
    μ = 1.15 (1024², 4096 tokens): set_timesteps(num_steps, mu=1.15), t from 1 to 1/1000 before the shift."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    table, _ = import_table(write_snapshot(tmp_path / "flux.pkl", PLUSPLUS_ATTRS["flux"]))
    m = table.meta
    assert (m.backbone, m.schedule, m.guidance, m.nfe) == ("flux", "flow_match", 3.5, 16)
    assert m.schedule_args == {"mu": 1.15, "num_train_timesteps": 1000}
    assert calculate_shift(64 * 64) == pytest.approx(1.15)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    scheduler.set_timesteps(9, mu=1.15)
    torch.testing.assert_close(m.sigmas(), scheduler.sigmas[:-1].double(), rtol=1e-6, atol=0)
    # Without a recorded μ, the resolution's (as upstream and FluxPipeline derive it).
    attrs = {k: v for k, v in PLUSPLUS_ATTRS["flux"].items() if k != "flowmatch_mu"}
    attrs["backend_config"] = {k: v for k, v in attrs["backend_config"].items() if k != "flowmatch_mu"}
    again, _ = import_table(write_snapshot(tmp_path / "flux2.pkl", attrs))
    assert again.meta.schedule_args["mu"] == pytest.approx(1.15)


# --- refusals ------------------------------------------------------------------------------------------------------

def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


def _refusals(tmp_path):
    ok = raw_params(5, 2)
    state = module_state(ok, **{**PIXEL_ATTRS, "num_steps": 5})
    t = T_STEPS
    yield "text", lambda p: p.write_text("hello"), r"not a pickle"
    yield "zip", lambda p: torch.save({"model": 1}, p), r"is a torch zip archive"
    yield "no model", lambda p: dump({"ema": Persistent("EDMPrecond", {})}, p), r"expected a dict with a 'model' entry"
    yield "plain model", lambda p: dump({"model": {"r_params": 1}}, p), r"'model' is not a torch_utils.persistence"
    yield "foreign", lambda p: dump({"model": Persistent("SongUNet", state)}, p), r"'SongUNet', not an 'EPD_predictor'"
    yield "attribute", lambda p: dump({"model": Persistent("EPD_predictor", _without(state, "sampler_stu"))}, p), \
        r"lacks attribute\(s\) \['sampler_stu'\]"
    yield "parameter", lambda p: write_snapshot(p, {"num_steps": 5}, _without(ok, "weight_s"), t_steps=t), \
        r"lacks parameter\(s\) \['weight_s'\]"
    yield "shape", lambda p: write_snapshot(p, {"num_steps": 4}, ok, t_steps=t[:4]), \
        r"r_params has shape \(4, 2\), expected \[num_steps - 1, num_points\] = \[3, 2\]"
    yield "nan", lambda p: write_snapshot(p, {"num_steps": 5}, {**ok, "weight_s": ok["weight_s"] * math.nan},
                                          t_steps=t), r"weight_s contains NaN"
    yield "steps", lambda p: write_snapshot(p, {"num_steps": 1.5}, ok, t_steps=t), r"num_steps=1.5 is not an integer"
    yield "sampler", lambda p: write_snapshot(p, {"num_steps": 5, "sampler_stu": "heun"}, ok, t_steps=t), \
        r"sampler_stu='heun' is neither 'epd'"
    yield "order", lambda p: write_snapshot(p, {"num_steps": 5, "sampler_stu": "ipndm", "max_order": 7}, ok,
                                            t_steps=t), r"max_order=7 is not an iPNDM order"
    yield "bound", lambda p: write_snapshot(p, {"num_steps": 5, "scale_time": 1.5}, ok, t_steps=t), \
        r"scale_time=1.5 is not a scale bound"
    yield "no grid", lambda p: write_snapshot(p, {"num_steps": 5}, ok), r"without its training grid \(loss_fn.t_steps\)"
    yield "bad grid", lambda p: write_snapshot(p, {"num_steps": 5}, ok, t_steps=t.flip(0)), \
        r"t_steps must be finite, positive and strictly decreasing"
    yield "backend", lambda p: write_snapshot(p, {**PLUSPLUS_ATTRS["sd3"], "backend": "pixart"}), \
        r"unknown backend 'pixart'"
    yield "sd3 shift", lambda p: write_snapshot(p, {**PLUSPLUS_ATTRS["sd3"], "backend_config": {"sigma_min": 0.001}}), \
        r"sd3 table records sigma_min=0.001"
    yield "ldm rho", lambda p: write_snapshot(p, {**PLUSPLUS_ATTRS["sd15"], "schedule_rho": 7.0}), \
        r"schedule_type 'discrete' with schedule_rho 1"
    same = {**ok, "r_params": torch.zeros(4, 2)}
    yield "same r", lambda p: write_snapshot(p, {"num_steps": 5}, same, t_steps=t), r"two points at the same position"


@pytest.mark.parametrize("case", [c[0] for c in _refusals(None)])
def test_malformed_and_foreign_snapshots_are_refused(case, tmp_path):
    _, write, match = next(c for c in _refusals(tmp_path) if c[0] == case)
    path = tmp_path / "bad.pkl"
    write(path)
    with pytest.raises(UpstreamError, match=match):
        write_imported_table(path, tmp_path / "out")
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out.safetensors").exists()


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(UpstreamError, match="no-such.pkl"):
        import_table(tmp_path / "no-such.pkl")


# --- using imported tables -----------------------------------------------------------------------------------------

def test_imported_tables_fit_any_backbone_of_their_range(tmp_path, gmm):
    table, _ = import_table(pixel_snapshot(tmp_path)[0])
    check_table_use(table, backbone="gmm-digits", sigma_max=gmm.sigma_max)
    check_table_use(table, backbone="unet-digits", sigma_max=80.0, schedule="explicit")
    run = configure("epd", table=table)
    assert torch.equal(run.sigmas, T_STEPS.double()) and run.nfe == 7
    with pytest.raises(TableError, match=r"carries its own grid .* asked for schedule 'polynomial'"):
        check_table_use(table, schedule="polynomial")
    with pytest.raises(TableError, match=r"grid starts at sigma=83.8.*sigma_max=80"):
        lsun, _ = import_table(pixel_snapshot(tmp_path, "lsun.pkl", t_steps=schedules.polynomial(5, 0.0388, 83.8))[0])
        check_table_use(lsun, backbone="gmm-digits", sigma_max=80.0)
    sd3, _ = import_table(write_snapshot(tmp_path / "sd3.pkl", PLUSPLUS_ATTRS["sd3"]))
    with pytest.raises(TableError, match=r"made for backbone 'sd3', not 'gmm-digits'"):
        check_table_use(sd3, backbone="gmm-digits")
    with pytest.raises(TableError, match=r"made on schedule 'flow_match'.*asked for schedule 'discrete'"):
        check_table_use(sd3, schedule="discrete")
    check_table_use(sd3, backbone="sd3", sigma_max=1.0, schedule="flow_match")


def test_benchmark_measures_an_imported_table(tmp_path):
    import csv

    from epd.benchmark import BenchConfig, main

    json_path = write_imported_table(pixel_snapshot(tmp_path)[0], tmp_path / "imported")
    cfg = BenchConfig(solvers=["euler"], schedules=["logsnr"], nfes=[7], num_samples=100, reference_steps=64,
                      batch_size=100, tables=[f"upstream={json_path}"])
    main(cfg, tmp_path / "bench", progress=False)
    rows = [r for r in csv.DictReader((tmp_path / "bench" / "benchmark.csv").open()) if r["solver"] == "upstream"]
    assert {(r["schedule"], r["nfe"]) for r in rows} == {("explicit", "7")} and len(rows) == 2
    assert all(math.isfinite(float(r["rms"])) for r in rows)


def test_import_table_then_sample_from_the_command_line(tmp_path, capsys):
    """The two commands of the README: import a published snapshot, sample with it (here on gmm-digits, whose σ range
    the pixel-space tables share); an explicit --schedule that is not the table's own grid is refused."""
    from epd.cli import main

    snapshot = pixel_snapshot(tmp_path)[0]
    assert main(["import-table", str(snapshot), "--out", str(tmp_path / "t")]) == 0
    assert "NFE 7, K=2, EPD, backbone any, its own grid" in capsys.readouterr().out
    assert main(["sample", "--table", str(tmp_path / "t.json"), "--labels", "3", "--seeds", "0-3",
                 "--outdir", str(tmp_path / "s"), "--no-progress"]) == 0
    assert len(list((tmp_path / "s").rglob("*.png"))) == 4
    assert main(["sample", "--table", str(tmp_path / "t.json"), "--schedule", "time_uniform", "--seeds", "0-3",
                 "--outdir", str(tmp_path / "s2"), "--no-progress"]) == 2
    assert "carries its own grid" in capsys.readouterr().err and not (tmp_path / "s2").exists()
    (tmp_path / "x.pkl").write_bytes(b"not a pickle")
    assert main(["import-table", str(tmp_path / "x.pkl"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x.json").exists()
