"""Named network presets.

The three deep autoencoders are those of Goldfarb, Ren, Bahamou (NeurIPS 2020) as their code
builds them (docs/kbfgs.md section 3.1): ReLU hidden layers, a linear code layer, a linear output,
every weight layer with a bias, weight decay tau = 1e-5 on all parameters.

| preset | widths | loss | parameters |
|---|---|---|---|
| mnist-ae | 784-1000-500-250-30-250-500-1000-784 | sigmoid cross-entropy | 2,837,314 |
| faces-ae | 625-2000-1000-500-30-500-1000-2000-625 | half squared error | 7,537,655 |
| curves-ae | 784-400-200-100-50-25-6-25-50-100-200-400-784 | sigmoid cross-entropy | 842,340 |
"""

from __future__ import annotations

from collections.abc import Callable

from engine.model import Model

from .mlp import autoencoder

#: The reference protocol's L2 weight decay (docs/kbfgs.md section 3.2).
PAPER_WEIGHT_DECAY = 1e-5

#: name -> (builder(weight_decay) -> Model, default dataset name, one-line description)
PRESETS: dict[str, tuple[Callable[..., Model], str, str]] = {}


def register(name: str, dataset: str, description: str):
    """Decorator adding a builder ``f(weight_decay=...) -> Model`` to :data:`PRESETS`."""
    def deco(f):
        PRESETS[name] = (f, dataset, description)
        return f
    return deco


@register("mnist-ae", "mnist", "MNIST deep autoencoder 784-1000-500-250-30 (mirrored), sigmoid cross-entropy")
def mnist_ae(weight_decay: float = PAPER_WEIGHT_DECAY) -> Model:
    return autoencoder([784, 1000, 500, 250, 30], "sigmoid_xent", weight_decay=weight_decay, name="mnist-ae")


@register("faces-ae", "faces", "FACES deep autoencoder 625-2000-1000-500-30 (mirrored), half squared error")
def faces_ae(weight_decay: float = PAPER_WEIGHT_DECAY) -> Model:
    return autoencoder([625, 2000, 1000, 500, 30], "half_mse", weight_decay=weight_decay, name="faces-ae")


@register("curves-ae", "curves", "CURVES deep autoencoder 784-400-200-100-50-25-6 (mirrored), sigmoid cross-entropy")
def curves_ae(weight_decay: float = PAPER_WEIGHT_DECAY) -> Model:
    return autoencoder([784, 400, 200, 100, 50, 25, 6], "sigmoid_xent", weight_decay=weight_decay, name="curves-ae")


def preset_names() -> list[str]:
    return sorted(PRESETS)


def build(name: str, **kwargs) -> Model:
    """The preset ``name`` (see :data:`PRESETS`); keyword arguments go to its builder."""
    try:
        builder = PRESETS[name][0]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; choose one of {', '.join(preset_names())}") from None
    return builder(**kwargs)
