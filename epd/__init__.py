"""epd: learned parallel diffusion ODE solvers (EPD-Solver), their baselines, backbones and workflow."""
__version__ = "0.1.0"
