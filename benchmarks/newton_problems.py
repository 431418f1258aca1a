"""The deterministic Newton problem suite: small smooth networks, full (or large) batches, tight targets.

The regime where Newton methods are expected to win (docs/newton-krylov.md section 10): each
problem is a tanh network, a fixed data set generated from a seed, and one batch that is the whole
training set. ``problem(name, dtype, scale)`` returns a :class:`Problem`; ``scale`` multiplies the
number of samples (the tests use the small version, ``scale < 1``; the float32 "large batch"
variants use ``scale = 10``).

========================  =====================================================================
name                      what
========================  =====================================================================
``teacher``               3-8-2 tanh regression of a 3-8-2 tanh teacher plus noise, tau = 0
``teacher-wd``            the same with weight decay tau = 1e-3
``smooth``                2-5-1 tanh regression   of sin(2 x1) cos(x2) plus noise, tau = 0
``smooth-wd``             the same with tau = 1e-3
``classifier``            4-8-3 tanh softmax classifier of three overlapping Gaussian clusters,
                          tau = 1e-4
``autoencoder``           8-3-8 tanh autoencoder (linear output) of points near a curved
                          2-manifold in R^8, tau = 1e-4
========================  =====================================================================

The target is ||g|| <= 1e-8 in float64. In float32 the gradient is only resolved to about
1e-5 relative, so the float32 target is the loss: within 1e-4 (relative) of the best loss any
solver reaches on that problem in float64 (``loss_target``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from nets import mlp

PROBLEMS = ("teacher", "teacher-wd", "smooth", "smooth-wd", "classifier", "autoencoder")

#: samples of each problem at scale 1
N_SAMPLES = 200


@dataclass
class Problem:
    name: str
    model: object
    x: object
    y: object
    dtype: object
    init_seed: int

    def init(self, xp=numpy, seed: int | None = None):
        """The starting parameters (the same for every solver)."""
        return self.model.init(seed=self.init_seed if seed is None else seed, dtype=self.dtype, xp=xp)


def _teacher(rng, n, tau):
    model = mlp([3, 8, 2], "tanh", "half_mse", weight_decay=tau, name="teacher")
    x = rng.standard_normal((n, 3))
    teacher = [1.5 * p for p in mlp([3, 8, 2], "tanh", "half_mse").init(seed=1234, xp=numpy)]
    y = model.predict(teacher, x) + 0.05 * rng.standard_normal((n, 2))
    return model, x, y


def _smooth(rng, n, tau):
    model = mlp([2, 5, 1], "tanh", "half_mse", weight_decay=tau, name="smooth")
    x = rng.uniform(-2, 2, size=(n, 2))
    # the noise keeps the infimum finite: without it the tau = 0 fit improves for ever as the
    # weights grow (measured: ||w|| 8.6 -> 38 and the loss 8e-5 -> 5e-8 over 600 steps)
    y = (numpy.sin(2 * x[:, 0]) * numpy.cos(x[:, 1]))[:, None] + 0.05 * rng.standard_normal((n, 1))
    return model, x, y


def _classifier(rng, n, tau):
    model = mlp([4, 8, 3], "tanh", "softmax_xent", weight_decay=tau, name="classifier")
    centres = numpy.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=float) * 1.5
    labels = numpy.arange(n) % 3
    x = centres[labels] + rng.standard_normal((n, 4))
    return model, x, labels


def _autoencoder(rng, n, tau):
    model = mlp([8, 3, 8], "tanh", "half_mse", weight_decay=tau, name="autoencoder")
    t = rng.uniform(-1, 1, size=(n, 2))
    basis = rng.standard_normal((5, 8)) / numpy.sqrt(5)
    feats = numpy.stack([t[:, 0], t[:, 1], t[:, 0] * t[:, 1], t[:, 0] ** 2, numpy.sin(2 * t[:, 1])], axis=1)
    x = feats @ basis + 0.01 * rng.standard_normal((n, 8))
    return model, x, x.copy()


_BUILDERS = {"teacher": (_teacher, 0.0), "teacher-wd": (_teacher, 1e-3), "smooth": (_smooth, 0.0),
             "smooth-wd": (_smooth, 1e-3), "classifier": (_classifier, 1e-4), "autoencoder": (_autoencoder, 1e-4)}


def problem(name: str, dtype=numpy.float64, scale: float = 1.0, seed: int = 0, xp=numpy) -> Problem:
    """Problem ``name`` with round(scale * 200) samples of ``dtype``, data from ``seed``."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown problem {name!r}; choose one of {', '.join(PROBLEMS)}")
    build, tau = _BUILDERS[name]
    n = max(int(round(scale * N_SAMPLES)), 12)
    rng = numpy.random.default_rng((seed, PROBLEMS.index(name)))
    model, x, y = build(rng, n, tau)
    dtype = numpy.dtype(dtype)
    x = xp.asarray(x, dtype=dtype)
    y = xp.asarray(y) if y.dtype.kind == "i" else xp.asarray(y, dtype=dtype)
    return Problem(name, model, x, y, dtype, init_seed=100 + seed)
