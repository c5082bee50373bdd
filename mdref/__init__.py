"""mdref: a readable NumPy golden reference for one-step text-to-image diffusion (MobileDiffusion family)."""

__version__ = "0.1.0"
