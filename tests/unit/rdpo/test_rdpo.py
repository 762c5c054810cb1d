"""Stage 2, RDPO: the Dirichlet policy, RLOO, the clipped PPO loss, a run on a reward whose best table is known,
and exact resume."""
import dataclasses
import json

import pytest
import torch

from epd.backbones import Backbone, load_backbone
from epd.cli import main
from epd.rdpo import (DirichletPolicy, PolicyParams, RDPOConfig, log_prob, ppo_loss, rdpo, rloo_advantages,
                      sample)
from epd.rdpo.train import ckpt_path
from epd.rewards import load_reward
from epd.solvers import handset_table, load_table, sample_epd, save_table

DISTILLED = "data/tables/epd-time_uniform-nfe5.json"
PROMPTS = ["a handwritten 3", "the digit seven", "a handwritten 0", "the number one, handwritten"]


@pytest.mark.parametrize("scales", [False, True])
def test_zero_residual_gives_the_distilled_table(scales):
    start = load_table(DISTILLED)
    assert not torch.allclose(start.scale_dir, torch.ones_like(start.scale_dir))  # the scales are not trivially 1
    policy = DirichletPolicy(start, 20.0, scales=scales)
    mean = policy.mean_table()
    for name, t in start.tensors().items():
        assert torch.allclose(getattr(mean, name), t, rtol=0, atol=1e-7), name
    # The residual is what moves it: a non-zero output layer changes the mean.
    with torch.no_grad():
        policy.out.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    assert (policy.mean_table().positions - start.positions).abs().max() > 1e-3


@pytest.mark.parametrize("scales", [False, True])
def test_log_prob_equals_torch_distributions(scales):
    gen = torch.Generator().manual_seed(0)
    S, K, B = 3, 2, 5
    params = PolicyParams(torch.rand(S, K + 1, generator=gen, dtype=torch.float64) * 30 + 0.5,
                          torch.rand(S, K, generator=gen, dtype=torch.float64) * 30 + 0.5)
    if scales:
        params.scale_loc = torch.randn(2, S, K, generator=gen, dtype=torch.float64) * 0.1
        params.scale_std = torch.rand(2, S, K, generator=gen, dtype=torch.float64) * 0.1 + 0.01
    action = sample(params, B, seed=1)
    expected = (torch.distributions.Dirichlet(params.alpha_pos).log_prob(action.segments).sum(-1)
                + torch.distributions.Dirichlet(params.alpha_weight).log_prob(action.weights).sum(-1))
    if scales:
        lognormal = torch.distributions.LogNormal(params.scale_loc, params.scale_std)
        expected = expected + lognormal.log_prob(action.log_scales.exp()).sum((1, 2, 3))
    assert torch.allclose(log_prob(params, action), expected, rtol=1e-10, atol=1e-9)
    # sample() depends on its seed alone and leaves the global RNG alone
    state = torch.random.get_rng_state()
    assert torch.equal(sample(params, B, seed=1).segments, action.segments)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(sample(params, B, seed=2).segments, action.segments)


def test_rloo_advantages_are_taken_within_prompt_groups():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, 10.0, 10.0, 14.0], dtype=torch.float64)  # 2 prompts × k = 4
    adv = rloo_advantages(rewards, 4, normalize=False)
    # each reward minus the mean of the other three of its prompt
    assert torch.allclose(adv, torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2, 10 - 34 / 3, 10 - 34 / 3,
                                             10 - 34 / 3, 14 - 10], dtype=torch.float64))
    # A prompt that is simply easier (a constant added to its rewards) changes nothing within prompt groups …
    shifted = rewards + torch.tensor([0.0] * 4 + [100.0] * 4, dtype=torch.float64)
    assert torch.allclose(rloo_advantages(shifted, 4, normalize=False), adv)
    # … but leaks into upstream's strided groups, which pair rows i and i + B/k (different prompts)
    strided = rloo_advantages(rewards, 4, grouping="strided", normalize=False)
    assert torch.allclose(strided, torch.tensor([1 - 23 / 3, 2 - 10, 3 - 7, 6 - 26 / 3, 10 - 14 / 3, 10 - 22 / 3,
                                                 10 - 14 / 3, 14 - 6], dtype=torch.float64))
    assert not torch.allclose(rloo_advantages(shifted, 4, grouping="strided", normalize=False), strided)
    norm = rloo_advantages(rewards, 4)
    assert abs(float(norm.mean())) < 1e-12 and abs(float(norm.std(unbiased=False)) - 1) < 1e-12
    with pytest.raises(ValueError, match="groups of k"):
        rloo_advantages(rewards[:7], 4)


def test_ppo_loss_clips_on_hand_made_examples():
    # ratio 1.5 / 0.5, advantage ±1, clip range 0.2: the objective takes the pessimistic of ratio·A and clip·A
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    new = ratio.log().requires_grad_(True)
    old = torch.zeros(5, dtype=torch.float64)
    per_sample = []
    for i in range(5):
        loss, _ = ppo_loss(new[i:i + 1], old[i:i + 1], adv[i:i + 1], 0.2)
        per_sample.append(loss.item())
    assert per_sample == pytest.approx([-1.2, 1.5, -0.5, 0.8, -1.1])
    loss, stats = ppo_loss(new, old, adv, 0.2)
    loss.backward()
    # clipped terms carry no gradient; unclipped ones −A·ρ/n
    assert torch.allclose(new.grad, torch.tensor([0.0, 1.5, -0.5, 0.0, -1.1], dtype=torch.float64) / 5)
    assert stats["clip_fraction"] == pytest.approx(4 / 5)
    assert stats["approx_kl"] == pytest.approx(float(((ratio - 1) - ratio.log()).mean()))


class GaussianData(Backbone):
    """Gaussian data with per-pixel variances s²: D(x, σ) = x·s²/(s² + σ²), exact. The start state is fixed
    (every seed gives σ_max·1), so the result is a deterministic function of the table."""

    name = "gaussian"
    shape = (1, 1, 6)
    sigma_min, sigma_max = 0.3, 10.0
    variances = torch.tensor([0.01, 0.1, 1.0, 5.0, 30.0, 200.0], dtype=torch.float64).view(1, 1, 1, 6)

    def __call__(self, x, sigma, cond=None):
        v = self.variances.to(x)
        return x * v / (v + sigma.view(-1, 1, 1, 1) ** 2)

    def encode(self, labels=None, prompts=None):
        return None

    def noise(self, seeds, dtype=torch.float32):
        return torch.full((len(seeds), *self.shape), self.sigma_max, dtype=dtype)

    def to_pixels(self, x):
        return x.double()


class DistanceToTarget:
    """Reward −|x₁ − x₁(table*)|² / scale: highest, 0, exactly for the target table's output."""

    name = "distance_to_target"
    range = (float("-inf"), 0.0)

    def __init__(self, backbone, target):
        x = backbone.noise([0], torch.float64)
        self.goal = sample_epd(backbone, x, target.meta.sigmas(), target)

    def score(self, images, prompts):
        return -((images - self.goal) ** 2).flatten(1).sum(1) / 0.01


def _gaussian_tables(tmp_path):
    """K = 1 on two steps: each step's result is monotone in its position, so the target table is the one best."""
    meta = dict(afs=False, sigma_min=GaussianData.sigma_min, sigma_max=GaussianData.sigma_max, backbone="gaussian")
    start = handset_table(3, 1, **meta)                                   # positions ½, ½
    target = dataclasses.replace(start, positions=torch.tensor([[0.25], [0.7]]))
    save_table(start, tmp_path / "start")
    return start, target.validate()


def test_tiny_run_raises_a_known_reward_and_moves_toward_its_best_table(tmp_path):
    backbone = GaussianData()
    start, target = _gaussian_tables(tmp_path)
    reward = DistanceToTarget(backbone, target)
    cfg = RDPOConfig(steps=80, rollout_batch_size=16, rloo_k=4, minibatch_size=8, learning_rate=2e-3,
                     dirichlet_concentration=50, hidden_dim=32, num_layers=1, save_interval=80)
    tuned = rdpo(tmp_path / "start.json", tmp_path / "tuned", cfg, backbone=backbone, reward=reward,
                 prompts=["x"], progress=False)

    def gap(t):
        return float((t.positions - target.positions).abs().sum())

    def score(t):
        return float(reward.score(sample_epd(backbone, backbone.noise([0]), t.meta.sigmas(), t), ["x"])[0])

    assert gap(tuned) < 0.5 * gap(start), (tuned.positions, tuned.weights)
    assert score(tuned) > score(start) + 0.5 * abs(score(start))
    rows = [line.split(",") for line in (tmp_path / "tuned.metrics.csv").read_text().splitlines()]
    reward_mean = [float(r[rows[0].index("reward_mean")]) for r in rows[1:]]
    assert len(reward_mean) == 80 and sum(reward_mean[-10:]) > sum(reward_mean[:10])
    assert load_table(tmp_path / "tuned.json").meta == start.meta  # a table for the same grid and NFE


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    backbone = load_backbone("gmm-digits")
    reward = load_reward({"label_logprob": 1.0, "realism": 0.5})
    cfg = RDPOConfig(steps=5, save_interval=2, hidden_dim=32, num_layers=1, learning_rate=1e-3)
    kw = dict(backbone=backbone, reward=reward, prompts=PROMPTS, progress=False)
    rdpo(DISTILLED, tmp_path / "straight", cfg, **kw)
    assert rdpo(DISTILLED, tmp_path / "cut", cfg, stop_after=3, **kw) is None   # step 3 is lost: saved at 2
    assert ckpt_path(tmp_path / "cut").exists()
    rdpo(DISTILLED, tmp_path / "cut", cfg, **kw)
    a, b = load_table(tmp_path / "straight.json"), load_table(tmp_path / "cut.json")
    for name in a.tensors():
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (tmp_path / "straight.metrics.csv").read_text() == (tmp_path / "cut.metrics.csv").read_text()
    assert not torch.equal(a.positions, load_table(DISTILLED).positions)  # the run did move the table
    # Fewer steps than the checkpoint holds: the run starts over (the old checkpoint kept under another name) and
    # gives the table of that many steps, equal to a run that was asked for 3 steps from the start.
    fewer = dataclasses.replace(cfg, steps=3)
    rdpo(DISTILLED, tmp_path / "cut", fewer, **kw)
    rdpo(DISTILLED, tmp_path / "three", fewer, **kw)
    c, d = load_table(tmp_path / "cut.json"), load_table(tmp_path / "three.json")
    assert all(torch.equal(getattr(c, n), getattr(d, n)) for n in c.tensors())
    assert not torch.equal(c.positions, a.positions)
    kept = sorted(p.name for p in tmp_path.glob("cut.ckpt-*-step5.safetensors"))
    assert len(kept) == 1 and ckpt_path(tmp_path / "cut").exists()


def test_a_checkpoint_of_other_code_is_not_resumed(tmp_path, monkeypatch, capsys):
    """A rerun after a code change retrains (never re-exports the old checkpoint), keeping the old one aside."""
    from epd.rdpo import train

    backbone = load_backbone("gmm-digits")
    cfg = RDPOConfig(steps=2, save_interval=1, hidden_dim=16, num_layers=1)
    kw = dict(backbone=backbone, reward=load_reward("realism"), prompts=PROMPTS, progress=False)
    rdpo(DISTILLED, tmp_path / "r", cfg, **kw)
    rdpo(DISTILLED, tmp_path / "r", cfg, **kw)
    assert "finished: exporting its table, nothing to train" in capsys.readouterr().out
    monkeypatch.setattr(train, "code_version", lambda: "other code")
    rdpo(DISTILLED, tmp_path / "r", cfg, **kw)
    out = capsys.readouterr().out
    assert "another config, start table or code version" in out and "starting over" in out
    assert len(list(tmp_path.glob("r.ckpt-*-step2.safetensors"))) == 1


def test_cli_writes_a_table_epd_sample_reads_and_compares_on_held_out_seeds(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "rd"
    assert main(["rdpo", "--table", DISTILLED, "--out", str(out), "--prompt-file", str(prompts), "--steps", "3",
                 "--save-interval", "2", "--hidden-dim", "16", "--eval-samples", "40", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "held-out seeds 0-39" in printed and "(paired)" in printed
    for suffix in (".json", ".safetensors", ".metrics.csv", ".metrics.png", ".eval.json", ".ckpt.safetensors"):
        assert (tmp_path / f"rd{suffix}").stat().st_size > 0, suffix
    assert len((tmp_path / "rd.metrics.csv").read_text().splitlines()) == 4
    ev = json.loads((tmp_path / "rd.eval.json").read_text())
    assert {"before_reward_mean", "after_reward_mean", "reward_diff_mean", "fd_digits_change_value"} <= set(ev)
    assert main(["sample", "--table", f"{out}.json", "--seeds", "0-3", "--prompt", "a handwritten 3", "--outdir",
                 str(tmp_path / "s"), "--grid", "--no-progress"]) == 0


def test_cli_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("a 3 next to a 7\n")
    assert main(["rdpo", "--table", DISTILLED, "--out", str(tmp_path / "x"), "--prompt-file", str(bad),
                 "--no-progress"]) == 2
    assert "names several digits" in capsys.readouterr().err
    assert main(["rdpo", "--table", DISTILLED, "--out", str(tmp_path / "x"), "--backbone", "unet-digits",
                 "--no-progress"]) == 2
    assert "made for backbone 'gmm-digits'" in capsys.readouterr().err
    assert main(["rdpo", "--table", DISTILLED, "--out", str(tmp_path / "x"), "--rollout-batch-size", "6",
                 "--no-progress"]) == 2
    assert "multiple of rloo_k" in capsys.readouterr().err
    # a text-to-image reward gets its scorer's weights through --weights; a missing file is named
    missing = tmp_path / "HPS_v2.1_compressed.pt"
    assert main(["rdpo", "--table", DISTILLED, "--out", str(tmp_path / "x"), "--reward", "hpsv2",
                 "--weights", f"hpsv2={missing}", "--no-progress"]) == 2
    assert f"weights file missing: {missing}" in capsys.readouterr().err
    assert main(["rdpo", "--table", DISTILLED, "--out", str(tmp_path / "x"), "--weights", "hpsv2",
                 "--no-progress"]) == 2
    assert "--weights takes KEY=PATH" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt"]
