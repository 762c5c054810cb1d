"""The reward interface ``score(images, prompts) -> Tensor[B]`` and the embedded rewards: each stays in its documented
range, orders what it should (real > blurred > noise; the named digit > another), and combines by config weights."""
from __future__ import annotations

import math

import pytest
import torch

from epd.metrics.digits import data_pixels
from epd.rewards import MultiReward, Reward, load_reward
from epd.rewards.digits import LabelLogProb, Realism


@pytest.fixture(scope="module")
def rewards():
    return {"label_logprob": load_reward("label_logprob"), "realism": load_reward("realism")}


@pytest.fixture(scope="module")
def sets():
    """Image sets from real to meaningless, each with prompts naming its digits."""
    g = torch.Generator().manual_seed(0)
    held, labels = data_pixels("held_out")
    train, train_labels = data_pixels("train")
    blurred = torch.nn.functional.avg_pool2d(held, 3, 1, 1, count_include_pad=False)
    noise = torch.rand(200, 1, 8, 8, generator=g)
    prompts = [f"a handwritten {int(v)}" for v in labels]
    return {
        "held": (held, prompts),
        "train": (train[:300], [f"the digit {int(v)}" for v in train_labels[:300]]),
        "blurred": (blurred, prompts),
        "noise": (noise, [f"a handwritten {i % 10}" for i in range(200)]),
        "black": (torch.zeros(10, 1, 8, 8), ["a handwritten 1"] * 10),
        "white": (torch.ones(10, 1, 8, 8), ["a handwritten 1"] * 10),
        "held_uncond": (held, [""] * len(held)),
        "noise_uncond": (noise, ["a digit"] * 200),
    }


def test_protocol(rewards):
    for name, r in rewards.items():
        assert isinstance(r, Reward) and r.name == name
    assert isinstance(load_reward({"realism": 1.0}), Reward)


@pytest.mark.parametrize("name", ["label_logprob", "realism"])
def test_scores_in_documented_range(rewards, sets, name):
    r = rewards[name]
    lo, hi = r.range
    assert (lo, hi) == (-math.inf, 0.0)
    for key, (images, prompts) in sets.items():
        s = r.score(images, prompts)
        assert s.shape == (len(images),) and s.dtype == torch.float64, key
        assert bool(torch.isfinite(s).all()) and bool(((s >= lo) & (s <= hi)).all()), key


def test_label_logprob(rewards, sets):
    r = rewards["label_logprob"]
    held, prompts = sets["held"]
    right = r.score(held, prompts)
    wrong = r.score(held, [p.replace(p[-1], str((int(p[-1]) + 1) % 10)) for p in prompts])
    assert right.median() > -0.01 and wrong.median() < -5
    assert float((right > wrong).double().mean()) >= 0.97
    # unconditional prompts: the most likely digit's log-probability, so within [−ln 10, 0]
    uncond = r.score(*sets["noise_uncond"])
    assert bool((uncond >= -math.log(10) - 1e-9).all())
    assert bool((r.score(*sets["held_uncond"]) >= right - 1e-12).all())
    assert torch.equal(r.score(held[:4], ["a handwritten seven"] * 4), r.score(held[:4], ["7"] * 4))


def test_realism_scale_and_order(rewards, sets):
    r = rewards["realism"]
    held = r.score(*sets["held"])
    assert float(held.median()) == pytest.approx(-1.0)                    # d_ref: the held-out median
    assert float(r.score(*sets["train"]).abs().max()) < 1e-6               # a training digit is its own neighbour
    blurred, noise = r.score(*sets["blurred"]).median(), r.score(*sets["noise"]).median()
    print(f"realism medians: held-out {held.median():.2f}, blurred {blurred:.2f}, noise {noise:.2f}")
    assert noise < blurred < -1.5 < held.median()
    # the prompt does not matter
    images, prompts = sets["held"]
    assert torch.equal(r.score(images[:8], prompts[:8]), r.score(images[:8], [""] * 8))


def test_multi_reward_is_the_weighted_sum(rewards, sets):
    weights = {"label_logprob": 1.0, "realism": 0.25}
    m = load_reward(weights)
    assert isinstance(m, MultiReward) and m.range == (-math.inf, 0.0)
    images, prompts = sets["held"]
    parts = m.components(images, prompts)
    assert set(parts) == set(weights)
    expected = rewards["label_logprob"].score(images, prompts) + 0.25 * rewards["realism"].score(images, prompts)
    assert torch.allclose(m.score(images, prompts), expected)
    assert torch.allclose(load_reward({"realism": 2.0}).score(images, prompts), 2 * parts["realism"])
    # a negative weight turns the range around
    assert load_reward({"realism": -1.0}).range == (0.0, math.inf)


def test_bad_specs_and_inputs(sets):
    with pytest.raises(ValueError, match="unknown reward 'hps'"):
        load_reward("hps")
    with pytest.raises(FileNotFoundError, match="aesthetic: no weights path given"):  # a t2i scorer needs weights
        load_reward({"realism": 1.0, "aesthetic": 0.5})
    with pytest.raises(ValueError, match="at least one named reward"):
        MultiReward({})
    with pytest.raises(ValueError, match="weights must be numbers"):
        MultiReward({"realism": "1"})
    images, prompts = sets["held"]
    r = LabelLogProb()
    with pytest.raises(ValueError, match="one prompt per image"):
        r.score(images, prompts[:3])
    with pytest.raises(ValueError, match="a list of strings"):
        r.score(images[:1], "a handwritten 1")
    with pytest.raises(ValueError, match="names several digits"):
        r.score(images[:1], ["a 1 or a 2"])
    with pytest.raises(ValueError, match=r"pixels must lie in \[0, 1\]"):
        Realism().score(images * 2 - 1, prompts)


def test_scores_are_deterministic_and_batch_independent(rewards, sets):
    images, prompts = sets["held"]
    for r in rewards.values():
        full = r.score(images, prompts)
        assert torch.equal(full, r.score(images, prompts))
        assert torch.allclose(full[:7], r.score(images[:7], prompts[:7]), atol=1e-5)
