"""Multi-layer perceptrons from a list of widths and one activation per weight layer."""

from __future__ import annotations

from collections.abc import Sequence

from engine.layers import Dense, activation
from engine.model import Model


def mlp(sizes: Sequence[int], activations: Sequence[str] | str, loss: str, weight_decay: float = 0.0,
        name: str = "mlp") -> Model:
    """Dense layers sizes[0] -> sizes[1] -> ... each followed by its activation.

    ``activations`` has one entry per weight layer (``len(sizes) - 1``), e.g. the MNIST
    autoencoder's ``relu, relu, relu, linear, relu, relu, relu, linear``; a single string is
    used for every hidden layer with a linear output layer.
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"an MLP needs at least two positive widths, got {sizes}")
    n_weight = len(sizes) - 1
    if isinstance(activations, str):
        activations = [activations] * (n_weight - 1) + ["linear"]
    activations = list(activations)
    if len(activations) != n_weight:
        raise ValueError(f"{n_weight} weight layers need {n_weight} activations, got {len(activations)}")
    layers = []
    for d_in, d_out, act in zip(sizes[:-1], sizes[1:], activations):
        layers.append(Dense(d_in, d_out))
        if act.lower() not in ("linear", "identity"):
            layers.append(activation(act))
    return Model(layers, loss, weight_decay=weight_decay, input_shape=(sizes[0],), name=name)


def autoencoder(encoder: Sequence[int], loss: str, hidden: str = "relu", weight_decay: float = 0.0,
                name: str = "autoencoder") -> Model:
    """A symmetric deep autoencoder: encoder widths mirrored into the decoder.

    Hidden layers use ``hidden``, the code layer and the output layer are linear, as in the
    K-BFGS reference models (docs/kbfgs.md section 3.1).
    """
    enc = list(encoder)
    sizes = enc + enc[-2::-1]
    half = len(enc) - 1
    acts = [hidden] * (half - 1) + ["linear"] + [hidden] * (half - 1) + ["linear"]
    return mlp(sizes, acts, loss, weight_decay=weight_decay, name=name)
