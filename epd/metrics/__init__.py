"""Quality measures: Fréchet distance on any features, FD-digits (``digits``), FID (``fid``, Inception features), and
solver accuracy against the reference solution of the same seeds (``reference``). The per-image text-to-image
scorers are rewards: ``epd.rewards.t2i``."""
from .frechet import frechet_distance, gaussian_stats

__all__ = ["frechet_distance", "gaussian_stats"]
