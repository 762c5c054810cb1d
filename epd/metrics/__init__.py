"""Quality measures. Fréchet distance on any features; the text-to-image scorers join here later."""
from .frechet import frechet_distance, gaussian_stats

__all__ = ["frechet_distance", "gaussian_stats"]
