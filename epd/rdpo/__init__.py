"""Stage 2, RDPO: the solver table as a residual Dirichlet policy, fine-tuned by PPO + RLOO against a reward."""
from .policy import Action, DirichletPolicy, PolicyParams, dirichlet_log_prob, entropy, kl_divergence, log_prob, sample
from .ppo import ppo_loss, rloo_advantages
from .train import RDPOConfig, rdpo

__all__ = ["Action", "DirichletPolicy", "PolicyParams", "RDPOConfig", "dirichlet_log_prob", "entropy",
           "kl_divergence", "log_prob", "ppo_loss", "rdpo", "rloo_advantages", "sample"]
