"""Losses on the network output, complex-safe, each returning value and d(value)/d(output).

All losses are means over the batch of a per-example loss, as in the K-BFGS reference code
(docs/kbfgs.md section 3.2): the autoencoder losses sum over the output units first. Targets stay
real (integer class labels for softmax cross-entropy). Each loss also provides what curvature
needs: the Hessian of the mean loss with respect to the output applied to a direction (for
Gauss-Newton and the R-operator), and targets sampled from the model's predictive distribution
(for the true Fisher).
"""

from __future__ import annotations

import numpy

from . import ops
from .backend import array_module, to_device
from .fuse import fused

__all__ = ["Loss", "SigmoidCrossEntropy", "HalfSquaredError", "SoftmaxCrossEntropy", "get_loss"]


class Loss:
    """Base class; ``name`` is the key used in configs and run files."""

    name = "loss"
    #: True when targets are class indices rather than arrays shaped like the output.
    classification = False

    def per_example(self, out, target):
        """Per-example loss, shape (N,)."""
        raise NotImplementedError

    def value(self, out, target):
        """Mean loss over the batch (0-d array; complex when ``out`` is complex)."""
        return self.per_example(out, target).mean()

    def value_and_grad(self, out, target):
        """(mean loss, d mean loss / d out)."""
        raise NotImplementedError

    def hessian_vp(self, out, target, v):
        """d^2 (mean loss) / d out^2 applied to ``v`` (same shape as ``out``), per example."""
        raise NotImplementedError

    def sample_targets(self, out, rng: numpy.random.Generator):
        """Targets drawn from the predictive distribution at real ``out`` (host RNG ``rng``)."""
        raise NotImplementedError

    def check_target(self, out, target) -> None:
        if tuple(target.shape) != tuple(out.shape):
            raise ValueError(f"{self.name} needs targets shaped like the output {tuple(out.shape)}, got {tuple(target.shape)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SigmoidCrossEntropy(Loss):
    """BCE with logits summed over outputs, mean over the batch: sum_j softplus(z_j) - x_j z_j.

    The autoencoder loss of the MNIST and CURVES benchmarks (initial value about 784 ln 2).
    Stable and complex-safe through :func:`engine.ops.softplus`. Gradient (sigmoid(z) - x) / N.
    """

    name = "sigmoid_xent"

    def per_example(self, out, target):
        return (ops.softplus(out) - target * out).sum(axis=1)

    def value_and_grad(self, out, target):
        n = out.shape[0]
        xp = array_module(out)
        if not xp.iscomplexobj(out):  # one fused pass for the terms and the gradient
            terms, grad = _sigmoid_xent_terms(out, target, n)
            return terms.sum(axis=1).mean(), grad
        value = self.per_example(out, target).mean()
        grad = ops.sigmoid(out)
        grad -= target
        grad /= n
        return value, grad

    def hessian_vp(self, out, target, v):
        s = ops.sigmoid(out)
        return s * (1 - s) * v / out.shape[0]

    def sample_targets(self, out, rng):
        xp = array_module(out)
        u = to_device(rng.random(out.shape), xp, dtype=out.real.dtype)
        return (u < ops.sigmoid(out.real)).astype(out.real.dtype)


@fused
def _sigmoid_xent_terms(xp, z, target, n):
    """(softplus(z) - x z, (sigmoid(z) - x) / n) for a real z: the per-unit loss terms and the gradient."""
    return ops.softplus_real_formula(xp, z) - target * z, (ops.sigmoid_formula(xp, z, z) - target) / n


class HalfSquaredError(Loss):
    """0.5 sum_j (z_j - x_j)^2, mean over the batch (the FACES autoencoder loss)."""

    name = "half_mse"

    def per_example(self, out, target):
        d = out - target
        return 0.5 * (d * d).sum(axis=1)

    def value_and_grad(self, out, target):
        n = out.shape[0]
        d = out - target
        value = 0.5 * (d * d).sum() / n
        d /= n
        return value, d

    def hessian_vp(self, out, target, v):
        return v / out.shape[0]

    def sample_targets(self, out, rng):
        xp = array_module(out)
        noise = to_device(rng.standard_normal(out.shape), xp, dtype=out.real.dtype)
        return out.real + noise


class SoftmaxCrossEntropy(Loss):
    """-log softmax(z)[label], mean over the batch; labels are integer class indices.

    Log-softmax is shifted by the max of the real parts (complex-safe, no overflow).
    Gradient (softmax(z) - onehot(label)) / N.
    """

    name = "softmax_xent"
    classification = True

    def check_target(self, out, target):
        if target.ndim != 1 or target.shape[0] != out.shape[0]:
            raise ValueError(f"softmax cross-entropy needs integer labels of shape ({out.shape[0]},), got {tuple(target.shape)}")

    def per_example(self, out, target):
        xp = array_module(out)
        logp = ops.log_softmax(out, axis=1)
        return -xp.take_along_axis(logp, target[:, None].astype(xp.intp, copy=False), axis=1)[:, 0]

    def value_and_grad(self, out, target):
        xp = array_module(out)
        n = out.shape[0]
        logp = ops.log_softmax(out, axis=1)
        idx = target[:, None].astype(xp.intp, copy=False)
        value = -xp.take_along_axis(logp, idx, axis=1).mean()
        grad = xp.exp(logp)
        xp.put_along_axis(grad, idx, xp.take_along_axis(grad, idx, axis=1) - 1, axis=1)
        grad /= n
        return value, grad

    def hessian_vp(self, out, target, v):
        p = ops.softmax(out, axis=1)
        pv = p * v
        return (pv - p * pv.sum(axis=1, keepdims=True)) / out.shape[0]

    def sample_targets(self, out, rng):
        xp = array_module(out)
        p = ops.softmax(out.real, axis=1)
        cdf = xp.cumsum(p, axis=1)
        u = to_device(rng.random((out.shape[0], 1)), xp, dtype=cdf.dtype)
        labels = (cdf < u).sum(axis=1)
        return xp.minimum(labels, out.shape[1] - 1).astype(xp.int64)  # real integers only

    def accuracy(self, out, target):
        """Fraction of argmax(Re out) == label (0-d array)."""
        xp = array_module(out)
        return (xp.argmax(out.real, axis=1) == target).mean()


_LOSSES = {cls.name: cls for cls in (SigmoidCrossEntropy, HalfSquaredError, SoftmaxCrossEntropy)}
_ALIASES = {"bce": "sigmoid_xent", "sigmoid": "sigmoid_xent", "mse": "half_mse", "half_sse": "half_mse",
            "xent": "softmax_xent", "softmax": "softmax_xent", "cross_entropy": "softmax_xent"}


def get_loss(name: str | Loss) -> Loss:
    """A loss by name (sigmoid_xent, half_mse, softmax_xent; aliases bce, mse, xent)."""
    if isinstance(name, Loss):
        return name
    key = _ALIASES.get(name.lower(), name.lower())
    try:
        return _LOSSES[key]()
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(sorted(_LOSSES))}") from None
