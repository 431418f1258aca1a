"""Network builders and the K-BFGS paper's presets (kbfgs.md section 3.1)."""

from .mlp import mlp, autoencoder
from .presets import PRESETS, build, preset_names

__all__ = ["mlp", "autoencoder", "PRESETS", "build", "preset_names"]
