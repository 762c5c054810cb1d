"""Quality measures: Fréchet distance on any features, FD-digits (``digits``), FID (``fid``, Inception features).
The per-image text-to-image scorers are rewards: ``epd.rewards.t2i``."""
from .frechet import frechet_distance, gaussian_stats

__all__ = ["frechet_distance", "gaussian_stats"]
