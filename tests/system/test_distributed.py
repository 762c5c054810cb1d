"""Multi-process RDPO and sampling: real torchrun launches on the CPU (gloo) against single-process references.

One torchrun launch (2 processes) runs every distributed task of the fast tests (tests/system/dist_runner.py); the tests
then compare its outputs with the same tasks run in this process.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_runner
from epd import distributed
from epd.rdpo import RDPOConfig, ppo_loss
from epd.solvers import load_table

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).resolve().parent / "dist_runner.py"
TINY = dict(steps=4, save_interval=2, hidden_dim=32, num_layers=1, learning_rate=1e-3)
CONFIGS = {
    # one minibatch per step, shared noise
    "plain": dict(TINY, rollout_batch_size=8, rloo_k=4, minibatch_size=8),
    # two epochs of minibatches of 3 (shares of 2 + 1 and 1 + 1 on two ranks), KL and entropy terms, learned scales,
    # gradient clipping that binds, a noise per sample
    "epochs": dict(TINY, rollout_batch_size=8, rloo_k=2, ppo_epochs=2, minibatch_size=3, kl_coef=0.5,
                   entropy_coef=0.01, scales=True, max_grad_norm=0.05, shared_noise=False),
}
TABLE = dist_runner.DISTILLED
SAMPLES = {
    # 11 seeds out of order (one in another thousand-folder), batches of 4: 3 batches on rank 0, 1 on rank 1 …
    "prompts": dict(seeds=[5, 3, 1001, 7, 8, 9, 10, 11, 12, 13, 14], batch_size=4, solver="epd", table=TABLE,
                    prompts=["a handwritten 3", "the digit seven", "a handwritten 0"]),
    # … 7 seeds in batches of 3 with labels and a baseline solver: 2 batches on rank 0, 1 on rank 1 …
    "labels": dict(seeds=list(range(20, 27)), batch_size=3, solver="euler", nfe=4, labels=[1, 2, 3, 4]),
    # … and fewer batches than ranks: rank 1 has nothing to do
    "idle": dict(seeds=[40, 41, 42], batch_size=8, solver="heun", nfe=5),
}
REFUSED = dict(TINY, rollout_batch_size=9, rloo_k=3, minibatch_size=3)


def torchrun(spec: dict, folder: Path, nproc: int = 2, timeout: float = 600) -> list[dict]:
    """Launch dist_runner on ``nproc`` CPU processes (``--standalone``: a free port of its own); the ranks' reports."""
    spec_path = folder / "spec.json"
    reports = folder.with_name(folder.name + "-reports")
    reports.mkdir()
    spec_path.write_text(json.dumps({**spec, "reports": str(reports)}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), str(RUNNER), str(spec_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((reports / f"{rank}.json").read_text()) for rank in range(nproc)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One 2-process launch: both RDPO configs, the plain one cut after 3 steps, a batch that does not split, the
    sample folders, and an error raised in the session at the end."""
    root = tmp_path_factory.mktemp("two_ranks")
    tasks = [{"kind": "rdpo", "out": str(root / name / "rd"), "cfg": cfg} for name, cfg in CONFIGS.items()]
    tasks.append({"kind": "rdpo", "out": str(root / "cut" / "rd"), "cfg": CONFIGS["plain"], "stop_after": 3})
    tasks.append({"kind": "rdpo", "out": str(root / "refused" / "rd"), "cfg": REFUSED, "expect_error": True})
    tasks += [{"kind": "sample", "outdir": str(root / f"s-{name}"), **task} for name, task in SAMPLES.items()]
    reports = torchrun({"root": str(root), "tasks": tasks, "raise_at_end": True}, root)
    return root, reports


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same RDPO runs in this process, one at a time, on first use."""
    root = tmp_path_factory.mktemp("one_process")
    done = {}

    def get(name: str) -> Path:
        if name not in done:
            dist_runner.run_task({"kind": "rdpo", "out": str(root / name / "rd"), "cfg": CONFIGS[name]})
            done[name] = root / name
        return done[name]

    return get


def _metrics(path: Path) -> tuple[list[str], torch.Tensor]:
    lines = path.read_text().splitlines()
    return lines[0].split(","), torch.tensor([[float(v) for v in line.split(",")] for line in lines[1:]],
                                             dtype=torch.float64)


def assert_same_run(a: Path, b: Path, tol: float = 1e-6) -> None:
    """Exported tables and metric curves of two runs agree to ``tol``."""
    ta, tb = load_table(a / "rd.json"), load_table(b / "rd.json")
    for name, t in ta.tensors().items():
        assert torch.allclose(t, getattr(tb, name), rtol=0, atol=tol), (name, (t - getattr(tb, name)).abs().max())
    (head_a, ma), (head_b, mb) = _metrics(a / "rd.metrics.csv"), _metrics(b / "rd.metrics.csv")
    assert head_a == head_b and ma.shape == mb.shape == (CONFIGS["plain"]["steps"], len(head_a))
    assert torch.allclose(ma, mb, rtol=tol, atol=tol), (ma - mb).abs().max(0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_follow_the_single_process_trajectory(launched, single, name):
    root, reports = launched
    assert [(r["rank"], r["world"]) for r in reports] == [(0, 2), (1, 2)]
    assert_same_run(root / name, single(name))
    start, tuned = load_table(TABLE), load_table(root / name / "rd.json")
    assert (tuned.positions - start.positions).abs().max() > 1e-3   # the runs did move the table
    head, m = _metrics(root / name / "rd.metrics.csv")
    if name == "epochs":   # the clipping bound was hit (grad_norm is the summed gradient's norm before clipping)
        assert bool((m[:, head.index("grad_norm")] > CONFIGS[name]["max_grad_norm"]).all())
        assert not torch.equal(tuned.scale_dir, start.scale_dir)


def test_a_two_process_run_resumes_on_one_process(launched, single, tmp_path):
    root, _ = launched
    cut = tmp_path / "cut"
    shutil.copytree(root / "cut", cut)
    head, m = _metrics(cut / "rd.metrics.csv")
    assert m[:, 0].tolist() == [1.0, 2.0]   # stopped after step 3, saved at step 2
    dist_runner.run_task({"kind": "rdpo", "out": str(cut / "rd"), "cfg": CONFIGS["plain"]})
    assert_same_run(cut, single("plain"))


def test_only_rank_zero_writes_rdpo_outputs(launched):
    root, (rank0, rank1) = launched
    outputs = ["rd.ckpt.safetensors", "rd.json", "rd.metrics.csv", "rd.metrics.png", "rd.safetensors"]
    for name in [*CONFIGS, "cut"]:
        assert sorted(p.name for p in (root / name).iterdir()) == outputs, name   # no stray temporaries
        assert f"{name}/rd.json" in rank0["writes"]
    assert not (root / "refused").exists()
    # sample folders are filled under a temporary name (.s-NAME.partial) and moved into place by rank 0
    assert [w for w in rank1["writes"] if not w.startswith(".s-")] == []
    # rank 1 wrote only its own PNGs (and their folders), rank 0 the manifests
    assert all(w.endswith(".png") or w.endswith(".png.tmp") or w.count("/") == 1 for w in rank1["writes"])
    assert not any(w.endswith("samples.csv") for w in rank1["writes"])
    assert all(f".s-{name}.partial/samples.csv" in rank0["writes"] for name in SAMPLES)


def test_two_processes_write_the_same_sample_files(launched, gmm, tmp_path):
    from epd.sample import write_samples
    from epd.solvers.plan import configure

    root, (rank0, rank1) = launched
    for name, task in SAMPLES.items():
        table = load_table(task["table"]) if "table" in task else None
        solver = configure(task["solver"], task.get("nfe"), table=table, schedule="time_uniform")
        manifest = write_samples(gmm, solver, task["seeds"], tmp_path / name, labels=task.get("labels"),
                                 prompts=task.get("prompts"), batch_size=task["batch_size"],
                                 progress=False) / "samples.csv"
        one = {p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name).rglob("*") if p.is_file()}
        two = {p.relative_to(root / f"s-{name}"): p.read_bytes() for p in (root / f"s-{name}").rglob("*")
               if p.is_file()}
        assert sorted(one) == sorted(two) and len(one) == len(task["seeds"]) + 1, name
        assert all(one[k] == two[k] for k in one), [str(k) for k in one if one[k] != two[k]]
        assert manifest.read_text().count("\n") == len(task["seeds"]) + 1
        pngs = [w for w in rank1["writes"] if w.startswith(f".s-{name}.partial/") and w.endswith(".png")]
        assert len(pngs) == {"prompts": 4, "labels": 3, "idle": 0}[name], (name, pngs)   # the second batch


def test_the_session_leaves_the_group_also_on_error_and_refuses_to_rejoin(launched):
    _, reports = launched
    for r in reports:
        assert r["raised"] == "deliberate" and r["group_left"]
        assert "cannot join it again" in r["rejoin"]


def test_a_rollout_batch_that_does_not_split_is_refused_on_every_rank(launched):
    _, reports = launched
    for r in reports:
        assert len(r["errors"]) == 1
        assert "rollout_batch_size 9 does not split over 2 processes (9 % 2 = 1)" in r["errors"][0], r["errors"]
        assert "multiple of 6" in r["errors"][0]


# -- single-process pieces ------------------------------------------------------------------------------------------

def test_without_torchrun_nothing_is_initialised_and_collectives_are_identities(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with distributed.session() as several:
        assert not several and not distributed.is_initialized()
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
        t = torch.arange(3.0)
        assert distributed.all_gather(t) is t and distributed.all_reduce_sum([t])[0] is t
        assert distributed.broadcast_bytes(b"abc") == b"abc"
        distributed.barrier()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    # launched but not (yet) in the group: the rank is torchrun's, and collectives fail rather than do nothing
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (1, 2, False)
    with pytest.raises(ValueError, match="not been initialized"):
        distributed.all_gather(torch.arange(3.0))
    with pytest.raises(ValueError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT unset: launch the processes with"):
        distributed.init()
    assert not distributed.is_initialized()


def test_check_world_size_names_the_numbers():
    cfg = RDPOConfig(rollout_batch_size=8, rloo_k=4)
    for n in (1, 2, 4, 8):
        cfg.check_world_size(n)
    with pytest.raises(ValueError, match=r"rollout_batch_size 8 does not split over 3 processes \(8 % 3 = 2\); "
                                         r"use a multiple of 12"):
        cfg.check_world_size(3)


def test_ppo_loss_shares_add_up_to_the_minibatch_loss_and_gradient():
    gen = torch.Generator().manual_seed(0)
    new = (torch.randn(7, generator=gen, dtype=torch.float64) * 0.3).requires_grad_(True)
    old, adv = torch.zeros(7, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)
    whole, stats = ppo_loss(new, old, adv, 0.2)
    (g_whole,) = torch.autograd.grad(whole, new)
    parts = [ppo_loss(new[i], old[i], adv[i], 0.2, denominator=7) for i in torch.arange(7).tensor_split(3)]
    parts.append(ppo_loss(new[:0], old[:0], adv[:0], 0.2, denominator=7))   # an empty share adds nothing
    total = sum(p[0] for p in parts)
    (g_parts,) = torch.autograd.grad(total, new)
    assert torch.allclose(total, whole, rtol=1e-14) and torch.allclose(g_parts, g_whole, rtol=1e-14)
    for key in stats:
        assert sum(p[1][key] for p in parts) == pytest.approx(stats[key], rel=1e-14, abs=1e-15)
    assert 0 < stats["clip_fraction"] < 1   # some ratios clipped, some not: both branches are in the sum


def test_write_samples_refuses_bad_input_before_writing(gmm, tmp_path):
    from epd.sample import write_samples
    from epd.solvers.plan import configure

    solver = configure("euler", 2)
    for kwargs, message in (({"seeds": [1, 2, 1]}, "a seed appears more than once"),
                            ({"seeds": [1], "labels": [1], "prompts": ["a 1"]}, "labels or prompts, not both"),
                            ({"seeds": [1], "labels": []}, "the label/prompt list is empty"),
                            ({"seeds": []}, "no seeds")):
        with pytest.raises(ValueError, match=message):
            write_samples(gmm, solver, outdir=tmp_path / "s", progress=False, **kwargs)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_a_tracked_two_process_run_is_one_mlflow_run(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    task = {"kind": "track", "uri": uri, "out": str(tmp_path / "rd" / "rd"), "cfg": CONFIGS["plain"]}
    reports = torchrun({"root": str(tmp_path), "tasks": [task]}, tmp_path)
    assert [r["world"] for r in reports] == [2, 2]
    assert not any("mlruns" in w for w in reports[1]["writes"])
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("dist").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "reward_mean")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    _, m = _metrics(tmp_path / "rd" / "rd.metrics.csv")
    assert [m_.value for m_ in sorted(history, key=lambda h: h.step)] == pytest.approx(m[:, 1].tolist(), rel=1e-8)


def test_the_commands_under_torchrun_equal_one_process(tmp_path):
    """`rdpo.processes: 2` makes `epd rdpo` run itself under torchrun (2 CPU processes, gloo): the same table as one
    process; `epd sample` launched by torchrun writes the same files as one process."""
    from epd.cli import main

    prompts = Path(TABLE).parents[2] / "data" / "prompts" / "digits.txt"
    base = ("rdpo: {prompts: PROMPTS, ppo: {steps: 3, rollout_batch_size: 4, rloo_k: 2, minibatch_size: 2, "
            "hidden_dim: 16, num_layers: 1, learning_rate: 0.001}").replace("PROMPTS", str(prompts))
    for n in (1, 2):
        (tmp_path / f"c{n}.yaml").write_text(base + f", processes: {n}}}\n")
        assert main(["rdpo", "--config", str(tmp_path / f"c{n}.yaml"), "--table", TABLE, "--out",
                     str(tmp_path / f"r{n}"), "--no-progress"]) == 0
    one, two = load_table(tmp_path / "r1.json"), load_table(tmp_path / "r2.json")
    for name in one.tensors():
        torch.testing.assert_close(getattr(two, name), getattr(one, name), rtol=0, atol=1e-6)
    assert not torch.equal(one.positions, load_table(TABLE).positions)

    args = ["sample", "--solver", "dpmpp_2m", "--nfe", "4", "--labels", "1,2,3", "--seeds", "0-12", "--batch", "4",
            "--no-progress"]
    assert main([*args, "--outdir", str(tmp_path / "s1")]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "epd.cli", *args, "--outdir", str(tmp_path / "s2")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.relative_to(tmp_path / "s1") for p in (tmp_path / "s1").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "s2") for p in (tmp_path / "s2").rglob("*") if p.is_file())
    assert all((tmp_path / "s1" / f).read_bytes() == (tmp_path / "s2" / f).read_bytes() for f in files)
