"""LD3 (a baseline's learned grid) and EPD with a learned grid, on a tiny class-conditional gmm-digits teacher:
both follow the teacher better than the hand-set grids they start from, on held-out seeds."""
import json

import pytest
import torch

from epd.backbones import load_backbone
from epd import options
from epd.distill import DistillConfig, DistillOptions, distill
from epd.ld3 import LD3Config, LD3Options, learn_grid
from epd.options import OptionsError
from epd.solvers import BASELINES, handset_table, load_grid, load_table, sample_epd
from epd.solvers.plan import configure, grid_for, plan_for_nfe
from epd.teacher import TeacherConfig, run_teacher, write_teacher

LABELS = list(range(10))
TEACHER = TeacherConfig(schedule="logsnr", num_steps=4, inserted_steps=3, seeds="1000-1255", labels=LABELS,
                        batch_size=128, shard_size=1000)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "t"
    assert write_teacher(TEACHER, out, progress=False)
    return out


@pytest.fixture(scope="module")
def held_out():
    """Noise, labels and the teacher's solution for seeds the teacher never saw."""
    g = load_backbone("gmm-digits")
    seeds = range(5000, 5256)
    x = g.noise(seeds, dtype=torch.float64)
    labels = torch.tensor([LABELS[j % 10] for j in range(len(seeds))])
    target = run_teacher(g, TeacherConfig(**{**TEACHER.to_json(), "seeds": "5000-5255"}), x, labels)[:, -1]
    return g, x, labels, target.double()


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


@pytest.mark.parametrize("solver", ["ipndm", "unipc"])
def test_ld3_beats_its_start_on_held_out_seeds(teacher_dir, held_out, tmp_path, solver):
    g, x, labels, target = held_out
    cfg = LD3Config(solver=solver, nfe=4, iterations=30, batch=32, lr=0.1)
    grid = learn_grid(teacher_dir, tmp_path / "g", cfg, progress=False)
    assert load_grid(tmp_path / "g.json", expect={"solver": solver, "nfe": 4, "backbone": "gmm-digits",
                                                   "schedule": "logsnr", "conditions": LABELS}) == grid
    header = json.loads((tmp_path / "g.json").read_text())
    assert header["provenance"]["start_schedule"] == "logsnr"
    assert header["provenance"]["val_loss"] < header["provenance"]["start_val_loss"]
    assert (tmp_path / "g.loss.csv").exists() and (tmp_path / "g.loss.png").exists()
    start = grid_for(plan_for_nfe(solver, 4), "logsnr", 0.002, 80.0)
    learned = grid.sigmas()
    assert learned[0] == start[0] and learned[-1] == start[-1] and bool((learned[:-1] > learned[1:]).all())
    assert not torch.allclose(learned, start, rtol=1e-3), "the grid did not move"
    with torch.no_grad():
        err = {"learned": rms(configure(solver, grid=grid)(g, x, labels), target),
               "start": rms(BASELINES[solver](g, x, start, cond=labels), target)}
    assert err["learned"] < 0.7 * err["start"], err


def test_ld3_keeps_the_best_grid_it_saw(teacher_dir, held_out, tmp_path):
    """At a learning rate far too large the grid wanders off; the grid kept is the best on the held-out teacher
    samples, so never worse than the start there."""
    cfg = LD3Config(solver="ipndm", nfe=4, iterations=20, batch=32, lr=20.0, eval_every=5)
    learn_grid(teacher_dir, tmp_path / "g", cfg, progress=False)
    prov = json.loads((tmp_path / "g.json").read_text())["provenance"]
    assert prov["val_loss"] <= prov["start_val_loss"] and prov["best_iteration"] in (0, 5, 10, 15, 20)


def test_ld3_refuses_a_solver_that_ends_at_zero():
    with pytest.raises(ValueError, match="heun steps into σ = 0"):
        LD3Config(solver="heun", nfe=5)
    with pytest.raises(OptionsError, match="ld3.solver"):
        options.validate(LD3Options, {"solver": "heun"}, "ld3")


def test_epd_with_a_learned_grid_beats_its_start(teacher_dir, held_out, tmp_path):
    """The table and its grid fitted together: the grid moves (ends fixed), the table carries it in meta.grid, and on
    held-out seeds it follows the teacher better than the hand-set table on the start grid."""
    g, x, labels, target = held_out
    cfg = DistillConfig(nfe=5, iterations=60, batch=64, lr=0.05, learn_grid=True, checkpoint_every=20)
    table = distill(teacher_dir, tmp_path / "epd", cfg, progress=False)
    loaded = load_table(tmp_path / "epd.json", expect={"nfe": 5, "schedule": "logsnr"})
    start_grid = handset_table(4, 2, schedule="logsnr").meta.sigmas()
    learned = loaded.meta.sigmas()
    assert loaded.meta.grid == table.meta.grid and len(learned) == 4
    assert learned[0] == start_grid[0] and learned[-1] == start_grid[-1]
    assert bool((learned[:-1] > learned[1:]).all())
    assert not torch.allclose(learned, start_grid, rtol=1e-3), "the grid did not move"
    start = handset_table(4, 2, afs=True, schedule="logsnr", backbone="gmm-digits")
    with torch.no_grad():
        err = {"learned": rms(configure("epd", table=loaded)(g, x.float(), labels).double(), target),
               "start": rms(sample_epd(g, x, start_grid, start, cond=labels), target)}
    assert err["learned"] < 0.5 * err["start"], err


def test_learned_grid_resumes_exactly(teacher_dir, tmp_path):
    """The grid's parameters and their optimiser state are in the checkpoint: an interrupted run, resumed, ends
    where an uninterrupted one does (the interruption falls after the grid started moving)."""
    cfg = DistillConfig(nfe=5, iterations=30, batch=32, lr=0.05, learn_grid=True, grid_warmup=0.3,
                        checkpoint_every=5)
    full = distill(teacher_dir, tmp_path / "full", cfg, progress=False)
    assert distill(teacher_dir, tmp_path / "cut", cfg, progress=False, stop_after=20) is None
    resumed = distill(teacher_dir, tmp_path / "cut", cfg, progress=False)
    assert resumed.meta.grid == pytest.approx(full.meta.grid, rel=1e-9)
    for name, t in full.tensors().items():
        assert (t - resumed.tensors()[name]).abs().max() <= 1e-6, name


def test_grid_options_checked():
    with pytest.raises(OptionsError, match="grid_warmup"):
        options.validate(DistillOptions, {"learn_grid": True, "grid_warmup": 1.0}, "distill")
    with pytest.raises(OptionsError, match="grid_lr_scale"):
        options.validate(DistillOptions, {"grid_lr_scale": 0.0}, "distill")


def test_cli_ld3_then_sample_its_grid(teacher_dir, tmp_path, capsys):
    """`epd ld3` writes a grid file; `epd sample --table` samples it (its solver on its grid, as the library does);
    a schedule other than the teacher's, by flag or by config, is refused before anything is written."""
    from epd.cli import main
    from epd.evaluate import load_images, read_manifest
    from epd.sample import generate
    from epd.solvers.plan import configure_for

    cfg = tmp_path / "c.yaml"
    cfg.write_text("schedule: {name: logsnr}\nld3: {iterations: 6, batch: 16, eval_every: 3}\n"
                   "sample: {seeds: '0-7', labels: '3,4'}\n")
    stem = tmp_path / "tables" / "ld3-nfe4"
    assert main(["ld3", "--config", str(cfg), "--nfe", "4", "--teacher", str(teacher_dir), "--out", str(stem),
                 "--no-progress"]) == 0
    grid = load_grid(f"{stem}.json", expect={"solver": "ipndm", "nfe": 4, "schedule": "logsnr"})
    assert (tmp_path / "tables" / "ld3-nfe4.loss.csv").is_file()
    out = tmp_path / "s"
    assert main(["sample", "--config", str(cfg), "--table", f"{stem}.json", "--outdir", str(out), "--no-progress"]) == 0
    assert "solver=ipndm nfe=4" in capsys.readouterr().out
    g = load_backbone("gmm-digits")
    want = torch.cat([im for _, im in generate(g, configure_for(g, "ipndm", grid=grid), list(range(8)),
                                                labels=[3, 4], batch_size=8, progress=False)])
    assert torch.equal(load_images(out, read_manifest(out)).reshape(want.shape), want)

    (tmp_path / "other.yaml").write_text("schedule: {name: time_uniform}\n")
    for argv in (["--schedule", "polynomial"], ["--config", str(tmp_path / "other.yaml")]):
        assert main(["sample", "--table", f"{stem}.json", "--outdir", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err
        assert "carries its own grid, learned on schedule 'logsnr'" in err and "Traceback" not in err
        assert not (tmp_path / "x").exists()
