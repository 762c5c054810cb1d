"""Rewards: ``score(images, prompts) -> Tensor[B]``, higher is better. RDPO uses them as black boxes. The six
text-to-image scorers (``hpsv2``, ``pickscore``, ``imagereward``, ``clip``, ``aesthetic``, ``mps``) live in
``epd.rewards.t2i`` behind the same protocol; they take ``weights=`` (their path, or the config's mapping of every
path, ``evaluate.weights``).

Embedded rewards (digit classifier, ``epd.metrics.digits``), each with a documented range:

- ``label_logprob``: log p(requested digit | image), in (−∞, 0]; for a prompt naming no digit, the log-probability
  of the most likely digit (how clearly the image is *some* digit).
- ``realism``: −(distance in the classifier's feature space to the nearest training digit) / d_ref, in (−∞, 0];
  d_ref is the median of that distance over the held-out digits, so held-out digits score −1 at the median and
  training digits 0. Chosen over the likelihood of a Gaussian fitted to the training features because that
  Gaussian rewards blur: few-step samples averaged towards a class mean score *better* than real digits (measured
  on gmm-digits with 2-step Euler), while the nearest-neighbour distance doubles for blurred digits and triples for
  noise. Its failure mode, rewarding copies of training digits, is out of reach of a solver table.

``MultiReward({"label_logprob": 1.0, "realism": 0.5})`` is their weighted sum, like upstream's
``reward.multi.weights``; ``load_reward`` takes a name or such a weights mapping (from config).
"""
from __future__ import annotations

from typing import Callable, Mapping, Protocol, runtime_checkable

import torch

from .digits import LabelLogProb, Realism
from .t2i import SCORERS, load_scorer


@runtime_checkable
class Reward(Protocol):
    """Scores images [B, C, H, W] (pixels in [0, 1], what ``Backbone.to_pixels`` returns) for their prompts [B]."""

    name: str
    range: tuple[float, float]   # documented bounds of every score (−inf / inf where open)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


def _digit_reward(cls: type) -> Callable[..., Reward]:
    def load(**options) -> Reward:
        return cls(**{k: v for k, v in options.items() if k not in T2I_OPTIONS})

    return load


def _t2i_reward(name: str) -> Callable[..., Reward]:
    def load(**options) -> Reward:
        return load_scorer(name, **{k: v for k, v in options.items() if k in T2I_OPTIONS})

    return load


T2I_OPTIONS = ("weights", "device", "batch_size")   # what the text-to-image scorers take (and digits do not)

# Every reward by name → its loader. Adding a reward is its class in its own module plus one line here.
REWARDS: dict[str, Callable[..., Reward]] = {
    "label_logprob": _digit_reward(LabelLogProb),
    "realism": _digit_reward(Realism),
    **{name: _t2i_reward(name) for name in SCORERS},
}


class MultiReward:
    """Σ_name weight · reward_name(images, prompts); ``components`` gives each term for logging."""

    name = "multi"

    def __init__(self, weights: Mapping[str, float], /, **options):  # options may hold weights= (paths)
        if not weights:
            raise ValueError("MultiReward needs at least one named reward with a weight")
        bad = {k: w for k, w in weights.items() if not isinstance(w, (int, float)) or isinstance(w, bool)}
        if bad:
            raise ValueError(f"reward weights must be numbers, got {bad}")
        self.weights = {k: float(w) for k, w in weights.items()}
        self.rewards = {k: load_reward(k, **options) for k in self.weights}
        lo = sum(w * (r.range[0] if w >= 0 else r.range[1]) for w, r in zip(self.weights.values(),
                                                                             self.rewards.values()))
        hi = sum(w * (r.range[1] if w >= 0 else r.range[0]) for w, r in zip(self.weights.values(),
                                                                             self.rewards.values()))
        self.range = (lo, hi)

    def components(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {k: r.score(images, prompts) for k, r in self.rewards.items()}

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = torch.zeros(len(images), dtype=torch.float64)
        for k, v in self.components(images, prompts).items():
            total = total + self.weights[k] * v
        return total


def load_reward(spec: str | Mapping[str, float], **options) -> Reward:
    """A reward by name (``"label_logprob"``, ``"realism"``, ``"hpsv2"``, …) or a weighted combination
    ``{name: weight}``.

    ``options`` go to every reward that takes them: ``classifier_path`` to the embedded ones; ``weights`` (a path,
    or a ``{name: path}`` mapping for mixes), ``device`` and ``batch_size`` to the text-to-image scorers.
    """
    if isinstance(spec, Mapping):
        return MultiReward(spec, **options)
    if spec not in REWARDS:
        raise ValueError(f"unknown reward {spec!r}; expected one of {sorted(REWARDS)} or a {{name: weight}} mapping")
    return REWARDS[spec](**options)


__all__ = ["MultiReward", "REWARDS", "Reward", "load_reward"]
