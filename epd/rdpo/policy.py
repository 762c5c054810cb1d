"""The RDPO policy: a distribution over solver tables, a residual over the distilled one.

Per step n, with K intermediate points:

    segments s ~ Dirichlet(α_pos),  α_pos = exp(log(c · s̄_n) + Δ_pos(n))      positions r = cumsum(s)[:K]
    weights  λ ~ Dirichlet(α_w),    α_w   = exp(log(c · λ̄_n) + Δ_w(n))
    scales (optional) log c_k, log a_k ~ N(μ_n + Δ_μ(n), (σ₀ · exp(Δ_σ(n)))²)    μ_n = log(scale) − σ₀²/2

s̄, λ̄ and the scales come from the distilled table, c is the Dirichlet concentration (how far samples stray), Δ a
small MLP on the step index whose output layer starts at zero. A Dirichlet's mean is α / Σα, so at Δ = 0 the
policy mean is exactly the distilled table whatever c is (and μ is chosen so the log-normal mean is the scale).
Everything is float64: log-densities of concentrated Dirichlets lose digits in float32.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..solvers import SolverTable


@dataclass
class PolicyParams:
    """Distribution parameters for all S steps: α_pos [S, K+1], α_w [S, K]; scales [2, S, K] (dir, time) or None."""

    alpha_pos: torch.Tensor
    alpha_weight: torch.Tensor
    scale_loc: torch.Tensor | None = None
    scale_std: torch.Tensor | None = None


@dataclass
class Action:
    """B tables drawn from the policy: segments [B, S, K+1], weights [B, S, K], log-scales [B, 2, S, K] or None."""

    segments: torch.Tensor
    weights: torch.Tensor
    log_scales: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.segments.shape[0]

    def select(self, idx: torch.Tensor | slice) -> "Action":
        return Action(*(None if t is None else t[idx] for t in (self.segments, self.weights, self.log_scales)))


def dirichlet_log_prob(alpha: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log Dir(x; α) = log Γ(Σα) − Σ log Γ(α) + Σ (α − 1) log x over the last dim (α broadcasts against x)."""
    x = x.clamp_min(torch.finfo(x.dtype).tiny)  # a draw can underflow to 0 when some α is small
    return torch.lgamma(alpha.sum(-1)) - torch.lgamma(alpha).sum(-1) + ((alpha - 1) * x.log()).sum(-1)


def log_prob(params: PolicyParams, action: Action) -> torch.Tensor:
    """log π(table) for each of the B tables, summed over steps (and points): [B]."""
    lp = dirichlet_log_prob(params.alpha_pos, action.segments) + dirichlet_log_prob(params.alpha_weight,
                                                                                    action.weights)
    if params.scale_loc is not None:
        z = (action.log_scales - params.scale_loc) / params.scale_std
        # density of the scale itself (log-normal), not of its log: −log scale − log σ − log √(2π) − z²/2
        lognormal = -action.log_scales - params.scale_std.log() - 0.5 * math.log(2 * math.pi) - z**2 / 2
        lp = lp + lognormal.sum((1, -1))
    return lp.sum(-1)


def _dirichlets(params: PolicyParams) -> tuple[torch.distributions.Dirichlet, torch.distributions.Dirichlet]:
    return torch.distributions.Dirichlet(params.alpha_pos), torch.distributions.Dirichlet(params.alpha_weight)


def _lognormal(params: PolicyParams) -> torch.distributions.LogNormal:
    return torch.distributions.LogNormal(params.scale_loc, params.scale_std)


def entropy(params: PolicyParams) -> torch.Tensor:
    """Differential entropy of one whole table (sum over steps)."""
    total = sum(d.entropy().sum() for d in _dirichlets(params))
    if params.scale_loc is not None:
        total = total + _lognormal(params).entropy().sum()
    return total


def kl_divergence(params: PolicyParams, prior: PolicyParams) -> torch.Tensor:
    """KL(π ‖ prior) of one whole table, analytic (sum over steps)."""
    kl = torch.distributions.kl_divergence
    total = sum(kl(p, q).sum() for p, q in zip(_dirichlets(params), _dirichlets(prior)))
    if params.scale_loc is not None:
        total = total + kl(_lognormal(params), _lognormal(prior)).sum()
    return total


def sample(params: PolicyParams, n: int, seed: int) -> Action:
    """Draw n tables. Dirichlet sampling has no generator argument, so it runs on a forked global RNG seeded from
    ``seed``: the draws depend on the seed alone and the caller's RNG is left as it was."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pos, w = _dirichlets(params)
        segments, weights = pos.sample((n,)), w.sample((n,))
        log_scales = None
        if params.scale_loc is not None:
            eps = torch.randn((n, *params.scale_loc.shape), dtype=params.scale_loc.dtype)
            log_scales = params.scale_loc + params.scale_std * eps
    return Action(segments, weights, log_scales)


class DirichletPolicy(nn.Module):
    """Residual Dirichlet policy around a distilled table (module docstring). Call it to get :class:`PolicyParams`.

    The MLP sees only the step index (an embedding), so every sample of a batch shares one distribution; the batch
    dimension lives in the actions, not here.
    """

    def __init__(self, start: SolverTable, concentration: float = 20.0, *, scales: bool = False,
                 scale_std: float = 0.05, hidden_dim: int = 256, num_layers: int = 3):
        super().__init__()
        if start.positions.ndim != 2:
            raise ValueError("the policy starts from one table [S, K], not a per-sample table")
        if concentration <= 0:
            raise ValueError(f"dirichlet_concentration must be > 0, got {concentration}")
        if scales and not (0 < scale_std and start.meta.scale_bound > 0):
            raise ValueError("learned scales need scale_std > 0 and a table with scale_bound > 0")
        self.meta = start.meta
        self.scales = scales
        steps, k = start.positions.shape
        r = start.positions.double()
        segments = torch.diff(r, prepend=r.new_zeros(steps, 1), append=r.new_ones(steps, 1))
        self.register_buffer("base_log_alpha_pos", (concentration * segments).log())
        self.register_buffer("base_log_alpha_weight", (concentration * start.weights.double()).log())
        # the table's own scales, used as they are unless the policy learns them
        self.register_buffer("fixed_scales", torch.stack([start.scale_dir, start.scale_time]).double())
        out_dim = (k + 1) + k
        if scales:
            std = torch.tensor(float(scale_std), dtype=torch.float64)
            log_scale = torch.stack([start.scale_dir, start.scale_time]).double().log()
            self.register_buffer("base_scale_loc", log_scale - std**2 / 2)   # log-normal mean = the table's scale
            self.register_buffer("base_scale_log_std", std.log().expand(2, steps, k).clone())
            out_dim += 4 * k
        self.embed = nn.Embedding(steps, hidden_dim, dtype=torch.float64)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden_dim, dtype=torch.float64), nn.SiLU(),
                                                  nn.Linear(hidden_dim, hidden_dim, dtype=torch.float64))
                                    for _ in range(num_layers))
        self.out = nn.Linear(hidden_dim, out_dim, dtype=torch.float64)
        nn.init.zeros_(self.out.weight)   # Δ = 0 at the start: the policy mean is the distilled table
        nn.init.zeros_(self.out.bias)

    @property
    def num_steps(self) -> int:
        return self.base_log_alpha_pos.shape[0]

    def residual(self) -> torch.Tensor:
        """Δ for every step, [S, out_dim]."""
        h = self.embed(torch.arange(self.num_steps))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)

    def forward(self) -> PolicyParams:
        return self._params(self.residual())

    def prior(self) -> PolicyParams:
        """The cold-start distribution (Δ = 0), the reference of the KL penalty."""
        with torch.no_grad():
            return self._params(torch.zeros_like(self.residual()))

    def _params(self, delta: torch.Tensor) -> PolicyParams:
        k = self.base_log_alpha_weight.shape[-1]
        d_pos, d_w, d_scale = delta[:, :k + 1], delta[:, k + 1:2 * k + 1], delta[:, 2 * k + 1:]
        params = PolicyParams((self.base_log_alpha_pos + d_pos).exp(), (self.base_log_alpha_weight + d_w).exp())
        if self.scales:
            d_loc, d_std = d_scale.reshape(self.num_steps, 2, 2, k).permute(1, 2, 0, 3)   # [2 (loc, std), 2, S, K]
            params.scale_loc = self.base_scale_loc + d_loc
            params.scale_std = (self.base_scale_log_std + d_std).exp()
        return params

    def tables(self, action: Action) -> SolverTable:
        """One table per drawn sample, [B, S, K] tensors, ready for ``sample_epd``."""
        return self._table(action.segments, action.weights, action.log_scales)

    def mean_table(self) -> SolverTable:
        """The policy mean as one [S, K] float32 table: Dirichlet means α/Σα, log-normal means exp(μ + σ²/2)."""
        with torch.no_grad():
            p = self()
            log_scales = None if p.scale_loc is None else p.scale_loc + p.scale_std**2 / 2
            table = self._table(p.alpha_pos / p.alpha_pos.sum(-1, keepdim=True),
                                p.alpha_weight / p.alpha_weight.sum(-1, keepdim=True), log_scales)
        return dataclasses.replace(table, **{k: v.float() for k, v in table.tensors().items()})

    def _table(self, segments: torch.Tensor, weights: torch.Tensor, log_scales: torch.Tensor | None) -> SolverTable:
        positions = segments.cumsum(-1)[..., :-1]
        if log_scales is None:
            scale_dir, scale_time = self.fixed_scales.expand(*weights.shape[:-2], -1, -1, -1).unbind(-3)
        else:
            # Scales outside the table's bound are clipped (the PPO ratio still uses the unclipped draw, as
            # clipped continuous actions are usually handled), so every table the policy emits is a valid one.
            b = self.meta.scale_bound
            scale_dir, scale_time = log_scales.exp().clamp(1 - b, 1 + b).unbind(-3)
        return SolverTable(positions=positions, weights=weights, scale_dir=scale_dir, scale_time=scale_time,
                           meta=self.meta)


__all__ = ["Action", "DirichletPolicy", "PolicyParams", "dirichlet_log_prob", "entropy", "kl_divergence",
           "log_prob", "sample"]
