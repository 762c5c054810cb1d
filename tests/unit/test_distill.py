"""Stage 1: teacher trajectories and distillation, on configs small enough to run in seconds."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from epd.backbones import load_backbone
from epd.distill import DistillConfig, distill
from epd.solvers import handset_table, load_table, sample_epd
from epd.teacher import TeacherConfig, TeacherError, load_teacher, run_teacher, write_teacher

TEACHER = TeacherConfig(schedule="logsnr", num_steps=3, inserted_steps=3, seeds="1000-1255", batch_size=64,
                        shard_size=128)
SMALL = DistillConfig(nfe=3, iterations=60, batch=64, lr=0.05, checkpoint_every=10)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "t"
    assert write_teacher(TEACHER, out, progress=False)
    return out


def test_teacher_layout_and_rerun(teacher_dir):
    manifest = json.loads((teacher_dir / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [128, 128]  # one file per shard_size seeds
    data = load_teacher(teacher_dir)
    assert data["states"].shape == (256, 3, 1, 8, 8)
    assert data["seeds"].tolist() == list(range(1000, 1256))
    g = load_backbone("gmm-digits")
    assert torch.allclose(data["states"][:, 0].double(), g.noise(range(1000, 1256), dtype=torch.float64).float().double())
    # A second run with the same config writes nothing.
    mtimes = {p.name: p.stat().st_mtime_ns for p in teacher_dir.iterdir()}
    assert not write_teacher(TEACHER, teacher_dir, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in teacher_dir.iterdir()} == mtimes


def test_teacher_changed_config_writes_anew(tmp_path):
    out = tmp_path / "t"
    small = TeacherConfig(num_steps=3, inserted_steps=1, seeds="0-9", batch_size=10)
    assert write_teacher(small, out, progress=False)
    first = json.loads((out / "manifest.json").read_text())["config_hash"]
    changed = TeacherConfig(num_steps=3, inserted_steps=1, seeds="0-19", batch_size=10)
    assert write_teacher(changed, out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config_hash"] != first and manifest["num_samples"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"], "temporary directories left behind"


def test_teacher_is_accurate():
    """The teacher's final states are close to a much finer solve from the same noise."""
    g = load_backbone("gmm-digits")
    x = g.noise(range(32), dtype=torch.float64)
    coarse = run_teacher(g, TeacherConfig(schedule="logsnr", num_steps=4, inserted_steps=15), x, None)
    fine = run_teacher(g, TeacherConfig(schedule="logsnr", num_steps=4, inserted_steps=63), x, None)
    assert float(((coarse - fine) ** 2).mean().sqrt()) < 0.05


def test_distill_loss_falls_and_beats_handset(teacher_dir, tmp_path):
    table = distill(teacher_dir, tmp_path / "epd", SMALL, progress=False)
    losses = [float(line.split(",")[1]) for line in (tmp_path / "epd.loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == SMALL.iterations
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert (tmp_path / "epd.loss.png").stat().st_size > 0
    assert not list(tmp_path.glob("*.ckpt*")), "checkpoint left after a finished run"
    loaded = load_table(tmp_path / "epd.json", expect={"nfe": 3, "schedule": "logsnr", "backbone": "gmm-digits"})
    assert torch.equal(loaded.positions, table.positions)

    # Held-out seeds: the distilled table follows the teacher better than the hand-set table it started from.
    g = load_backbone("gmm-digits")
    held_out = TeacherConfig(**{**TEACHER.to_json(), "seeds": "5000-5255"})
    x = g.noise(range(5000, 5256), dtype=torch.float64)
    target = run_teacher(g, held_out, x, None)[:, -1]
    sigmas = loaded.meta.sigmas()
    start = handset_table(3, 2, afs=True, schedule="logsnr", backbone="gmm-digits")
    with torch.no_grad():
        err = {name: float(((sample_epd(g, x, sigmas, t) - target) ** 2).mean().sqrt())
               for name, t in (("distilled", loaded), ("handset", start))}
    assert err["distilled"] < 0.5 * err["handset"], err


def test_resume_equals_uninterrupted(teacher_dir, tmp_path):
    full = distill(teacher_dir, tmp_path / "full", SMALL, progress=False)
    assert distill(teacher_dir, tmp_path / "cut", SMALL, progress=False, stop_after=25) is None
    assert (tmp_path / "cut.ckpt.safetensors").exists() and not (tmp_path / "cut.json").exists()
    resumed = distill(teacher_dir, tmp_path / "cut", SMALL, progress=False)
    for name, t in full.tensors().items():
        assert (t - resumed.tensors()[name]).abs().max() <= 1e-6, name
    assert (tmp_path / "full.loss.csv").read_text() == (tmp_path / "cut.loss.csv").read_text()


def test_kill_9_then_resume(teacher_dir, tmp_path):
    """A real SIGKILL in the middle of `epd distill`; rerunning the same command finishes with the same table."""
    args = [sys.executable, "-m", "epd.cli", "distill", "--teacher", str(teacher_dir), "--nfe", "3",
            "--iterations", "400", "--batch", "64", "--lr", "0.05", "--checkpoint-every", "5", "--no-progress"]
    subprocess.run(args + ["--out", str(tmp_path / "ref")], check=True, capture_output=True)
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "run")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "run.ckpt.json"
    deadline = time.time() + 60
    while time.time() < deadline and not (ckpt.exists() and json.loads(ckpt.read_text())["iteration"] >= 20):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run.json").exists(), "the run finished before it could be killed"
    subprocess.run(args + ["--out", str(tmp_path / "run")], check=True, capture_output=True)
    ref, run = load_table(tmp_path / "ref.json"), load_table(tmp_path / "run.json")
    for name, t in ref.tensors().items():
        assert (t - run.tensors()[name]).abs().max() <= 1e-6, name


def test_teacher_refusals_write_nothing(teacher_dir, tmp_path):
    with pytest.raises(TeacherError, match="teacher missing"):
        distill(tmp_path / "nowhere", tmp_path / "a", SMALL, progress=False)
    with pytest.raises(TeacherError, match="schedule: teacher has 'logsnr', expected 'polynomial'"):
        distill(teacher_dir, tmp_path / "b", SMALL, expect={"schedule": "polynomial"}, progress=False)
    with pytest.raises(TeacherError, match="backbone"):
        distill(teacher_dir, tmp_path / "c", SMALL, expect={"backbone": "unet-digits"}, progress=False)
    with pytest.raises(TeacherError, match="num_steps: teacher has 3, expected 4"):  # grid of another NFE
        distill(teacher_dir, tmp_path / "d", DistillConfig(nfe=5, iterations=5), progress=False)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in teacher_dir.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    shard = corrupt / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(TeacherError, match="corrupt"):
        distill(corrupt, tmp_path / "e", SMALL, progress=False)
    (corrupt / "manifest.json").write_text("{not json")
    with pytest.raises(TeacherError, match="corrupt"):
        distill(corrupt, tmp_path / "f", SMALL, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt"], "a refused run wrote something"


def test_unet_digits_teacher_and_distill(tmp_path):
    """Stage 1 on the learned backbone: a class-conditional teacher, and a distilled table that follows it better
    than the hand-set table it starts from, on held-out seeds."""
    cfg = TeacherConfig(backbone="unet-digits", schedule="time_uniform", num_steps=3, inserted_steps=3,
                        seeds="2000-2127", labels=list(range(10)), batch_size=128)
    assert write_teacher(cfg, tmp_path / "t", progress=False)
    data = load_teacher(tmp_path / "t", expect={"backbone": "unet-digits"})
    assert data["labels"].tolist() == [j % 10 for j in range(128)]
    small = DistillConfig(nfe=3, iterations=25, batch=32, lr=0.05, checkpoint_every=20)
    table = distill(tmp_path / "t", tmp_path / "epd", small, expect={"backbone": "unet-digits"}, progress=False)
    assert table.meta.backbone == "unet-digits" and table.meta.schedule == "time_uniform"
    losses = [float(line.split(",")[1]) for line in (tmp_path / "epd.loss.csv").read_text().splitlines()[1:]]
    assert sum(losses[-5:]) < sum(losses[:5])

    u = load_backbone("unet-digits")
    held_out = TeacherConfig(**{**cfg.to_json(), "seeds": "6000-6063"})
    x, labels = u.noise(range(6000, 6064)), torch.arange(64) % 10
    target = run_teacher(u, held_out, x, labels)[:, -1]
    loaded = load_table(tmp_path / "epd.json", expect={"backbone": "unet-digits"})
    start = handset_table(3, 2, afs=True, schedule="time_uniform", backbone="unet-digits")
    with torch.no_grad():
        err = {name: float(((sample_epd(u, x, t.meta.sigmas(), t, cond=labels) - target) ** 2).mean().sqrt())
               for name, t in (("distilled", loaded), ("handset", start))}
    assert err["distilled"] < 0.5 * err["handset"], err


def test_teacher_on_prompts_equals_teacher_on_their_labels(tmp_path):
    """Prompts are encoded by the backbone like the samples' prompts: on gmm-digits "a handwritten 3" is label 3."""
    base = dict(num_steps=3, inserted_steps=2, seeds="0-5", batch_size=4, shard_size=100)
    on_labels, on_prompts = tmp_path / "labels", tmp_path / "prompts"
    write_teacher(TeacherConfig(labels=[3, 7], **base), on_labels, progress=False)
    write_teacher(TeacherConfig(prompts=["a handwritten 3", "the digit seven"], **base), on_prompts, progress=False)
    a, b = load_teacher(on_labels), load_teacher(on_prompts)
    assert torch.equal(a["states"], b["states"]) and torch.equal(a["cond_ids"], b["cond_ids"])
    assert b["labels"].tolist() == [-1] * 6 and a["labels"].tolist() == [3, 7] * 3
    with pytest.raises(ValueError, match="labels or prompts, not both"):
        TeacherConfig(labels=[3], prompts=["a 3"], **base)


def test_a_start_table_instead_of_a_distillation(tmp_path, capsys):
    """distill.start_tables: the NFE's table is a finished one (an epd table, or an EPD authors' snapshot), checked
    and written as the distilled table, without reading any teacher; a table of another NFE is refused."""
    import torch

    from epd.cli import main
    from upstream_pickles import write_snapshot

    shipped = "data/tables/epd-time_uniform-nfe3.json"
    root = __import__("pathlib").Path(__file__).parents[2]
    snapshot = write_snapshot(tmp_path / "up.pkl", {"num_steps": 4}, t_steps=torch.tensor([80.0, 5.0, 0.3, 0.002]))
    (tmp_path / "c.yaml").write_text(f"distill: {{start_tables: {{3: {root / shipped}, 5: {snapshot}, 7: {snapshot}}}}}\n")
    args = ["distill", "--config", str(tmp_path / "c.yaml"), "--teacher", str(tmp_path / "no-teacher"), "--no-progress"]
    assert main([*args, "--nfe", "3", "--out", str(tmp_path / "t3")]) == 0
    a, b = load_table(root / shipped), load_table(tmp_path / "t3.json")
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in a.tensors()) and a.meta == b.meta
    assert (tmp_path / "t3.loss.csv").read_text() == "iteration,loss\n"
    assert main([*args, "--nfe", "5", "--out", str(tmp_path / "t5")]) == 0
    assert load_table(tmp_path / "t5.json").meta.afs_convention == "upstream"
    assert main([*args, "--nfe", "7", "--out", str(tmp_path / "t7")]) == 2
    assert "is a table for NFE 5, not 7" in capsys.readouterr().err and not (tmp_path / "t7.json").exists()


def test_shipped_tables_were_distilled_on_teachers_conditioned_as_samples_are():
    """The pipeline and the benchmark sample with labels 0-9 cycled over the seeds; a table distilled on
    unconditional trajectories does no better than the baselines there, so none may ship."""
    from pathlib import Path

    from epd.data import parse_seeds

    root = Path(__file__).parents[2] / "data" / "tables"
    tables = sorted(root.rglob("*.json"))
    assert tables
    for path in tables:
        provenance = json.loads(path.read_text())["provenance"]
        teacher = provenance["teacher_config"]
        assert teacher["labels"] == list(range(10)), path
        assert teacher["backbone"] == load_table(path).meta.backbone, path
        assert min(parse_seeds(teacher["seeds"])) >= 100_000, path   # apart from every sampling seed
