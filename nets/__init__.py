"""Network builders and the K-BFGS paper's presets (docs/kbfgs.md section 3.1), plus the CNN presets."""

from .mlp import mlp, autoencoder
from .presets import PRESETS, build, preset_names
from . import cnn  # noqa: F401  (registers mnist-cnn, mnist-mlp, mnist-conv-ae)
from .cnn import lenet, conv_autoencoder

__all__ = ["mlp", "autoencoder", "lenet", "conv_autoencoder", "PRESETS", "build", "preset_names"]
