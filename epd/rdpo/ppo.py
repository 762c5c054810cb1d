"""PPO pieces for RDPO: RLOO advantages and the clipped surrogate loss, as pure functions on tensors."""
from __future__ import annotations

import torch

GROUPINGS = ("prompt", "strided")


def rloo_advantages(rewards: torch.Tensor, k: int, *, grouping: str = "prompt",
                    normalize: bool = True) -> torch.Tensor:
    """REINFORCE-leave-one-out advantages: each reward minus the mean of the other k − 1 rewards of its group.

    Rewards are prompt-major (rows i·k … i·k + k − 1 share prompt i). ``grouping="prompt"`` forms the groups from
    those rows, so a baseline compares tables on the same prompt. ``"strided"`` reproduces the upstream code, which
    reshapes the same rewards as [k, B/k] and so groups rows i, i + B/k, …: k *different* prompts, whose reward
    differences then leak into the advantage. ``normalize`` rescales the advantages of the batch to mean 0, std 1.
    """
    if rewards.ndim != 1 or k < 2 or len(rewards) % k:
        raise ValueError(f"need 1-D rewards in groups of k >= 2, got shape {tuple(rewards.shape)} and k={k}")
    if grouping not in GROUPINGS:
        raise ValueError(f"rloo grouping must be one of {GROUPINGS}, got {grouping!r}")
    groups, dim = (rewards.view(-1, k), 1) if grouping == "prompt" else (rewards.view(k, -1), 0)
    baseline = (groups.sum(dim, keepdim=True) - groups) / (k - 1)
    adv = (groups - baseline).reshape(-1)
    if normalize:
        adv = (adv - adv.mean()) / adv.std(unbiased=False).clamp_min(1e-8)
    return adv


def ppo_loss(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
             clip_range: float, *, denominator: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate −mean(min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A)), ρ = π_new / π_old of the drawn tables.

    Also returns the fraction of samples whose ratio was clipped and the approximate KL(π_old ‖ π_new) by the
    low-variance estimator mean((ρ − 1) − log ρ). ``denominator`` replaces the number of samples in these means:
    a process's share of a minibatch (possibly empty) divided by the minibatch size, so that the shares of all
    processes add up to the minibatch's loss and statistics.
    """
    n = len(new_log_prob) if denominator is None else denominator
    log_ratio = new_log_prob - old_log_prob
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = -torch.min(ratio * advantages, clipped * advantages).sum() / n
    with torch.no_grad():
        stats = {"clip_fraction": float(((ratio - 1).abs() > clip_range).double().sum() / n),
                 "approx_kl": float(((ratio - 1) - log_ratio).sum() / n)}
    return loss, stats


__all__ = ["GROUPINGS", "ppo_loss", "rloo_advantages"]
