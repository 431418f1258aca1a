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
from .fuse import device_arange, fused

__all__ = ["Loss", "SigmoidCrossEntropy", "HalfSquaredError", "SoftmaxCrossEntropy", "get_loss", "keyed_uniform"]


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

    def sample_targets_keyed(self, out, key: int, first_row: int = 0):
        """The same distribution drawn on the arrays' device from the counter-based generator
        :func:`keyed_uniform` with the 64-bit ``key``: no host draw and no copy; the same numbers on
        NumPy and CuPy (integer hashing, exact). Row n of ``out`` draws with counter row
        ``first_row + n``: a data-parallel shard starting at global row ``first_row`` draws what one
        process draws for those rows."""
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
        if ops.first_order(out):  # inside a complex-step pass: first-order terms, real transcendentals
            terms, grad = _sigmoid_xent_terms_first_order(out.real, out.imag, target, n)
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

    def sample_targets_keyed(self, out, key, first_row=0):
        zr = out.real
        return _bernoulli_targets(*_counter_grid(zr, key, first_row), zr)


@fused
def _sigmoid_xent_terms(xp, z, target, n):
    """(softplus(z) - x z, (sigmoid(z) - x) / n) for a real z: the per-unit loss terms and the gradient.

    The operations of :func:`engine.ops.softplus_real_formula` and :func:`engine.ops.sigmoid_formula`
    with their common e = exp(-|z|) computed once (the same values: both exponentiate -z where
    z >= 0 and z elsewhere), which saves an exponential and three passes on NumPy."""
    pos = z >= 0
    e = xp.exp(xp.where(pos, -z, z))
    return xp.where(pos, z, 0) + xp.log1p(e) - target * z, (xp.where(pos, 1, e) / (1 + e) - target) / n


@fused
def _sigmoid_xent_terms_first_order(xp, zr, zi, target, n):
    """The same for z = a + i b in a complex-step pass (ops' module docstring): the terms
    softplus(a) - x a + i b (s(a) - x) and the gradient (s(a) - x + i b s'(a)) / n, with the real
    s, s' of :func:`engine.ops.sigmoid_parts_formula`; the dropped terms are O(b^2)."""
    e, s, ds = ops.sigmoid_parts_formula(xp, zr)
    d = s - target
    terms = (xp.where(zr >= 0, zr, 0) + xp.log1p(e) - target * zr) + 1j * (zi * d)
    return terms, (d + 1j * (zi * ds)) / n


# --- a counter-based generator for device-side sampling ---------------------------------------------
#: SplitMix64 (Steele, Lea, Flood, OOPSLA 2014): the golden gamma and the two finaliser multipliers
_GAMMA, _MIX1, _MIX2 = numpy.uint64(0x9E3779B97F4A7C15), numpy.uint64(0xBF58476D1CE4E5B9), numpy.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11, _ONE = (numpy.uint64(v) for v in (30, 27, 31, 11, 1))


def _counter_grid(like, key, first_row: int = 0):
    """(row counters (N, 1), column counters (1, D), row width, key): the arguments of :func:`keyed_uniform`
    for an (N, D) draw whose first row is global row ``first_row``; the counters are cached device
    constants (no launch, no copy per draw; one addition for a shard that does not start at row 0)."""
    xp = array_module(like)
    n, d = like.shape
    rows = device_arange(xp, n, numpy.uint64)[:, None]
    if first_row:
        rows = rows + numpy.uint64(first_row)
    return rows, device_arange(xp, d, numpy.uint64)[None, :], numpy.uint64(d), numpy.uint64(key)


def _splitmix(xp, rows, cols, width, key, stream):
    # counter i = 2 (row * width + col) + stream (two streams for Box-Muller); z = key + (i + 1) gamma
    z = key + ((rows * width + cols) * (_ONE + _ONE) + stream + _ONE) * _GAMMA
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def keyed_uniform_formula(xp, rows, cols, width, key, stream=numpy.uint64(0)):
    """Uniforms in [0, 1) with 53 random bits: SplitMix64 of (key, counter), exact integer arithmetic."""
    return (_splitmix(xp, rows, cols, width, key, stream) >> _S11) * (1.0 / 9007199254740992.0)


keyed_uniform = fused(keyed_uniform_formula)


@fused
def _bernoulli_targets(xp, rows, cols, width, key, zr):
    u = keyed_uniform_formula(xp, rows, cols, width, key)
    return (u < ops.sigmoid_formula(xp, zr, zr)).astype(zr.dtype)


@fused
def _gaussian_targets(xp, rows, cols, width, key, zr):
    # Box-Muller from the counter's two streams; 1 - u1 lies in (0, 1]
    u1 = keyed_uniform_formula(xp, rows, cols, width, key, _ONE - _ONE)
    u2 = keyed_uniform_formula(xp, rows, cols, width, key, _ONE)
    noise = xp.sqrt(-2.0 * xp.log(1.0 - u1)) * xp.cos(6.283185307179586 * u2)
    return zr + noise.astype(zr.dtype)


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

    def sample_targets_keyed(self, out, key, first_row=0):
        zr = out.real
        return _gaussian_targets(*_counter_grid(zr, key, first_row), zr)


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
        grad = ops.exp(logp)  # first-order inside a complex-step pass
        xp.put_along_axis(grad, idx, xp.take_along_axis(grad, idx, axis=1) - 1, axis=1)
        grad /= n
        return value, grad

    def hessian_vp(self, out, target, v):
        p = ops.softmax(out, axis=1)
        pv = p * v
        return (pv - p * pv.sum(axis=1, keepdims=True)) / out.shape[0]

    def sample_targets(self, out, rng):
        xp = array_module(out)
        u = to_device(rng.random((out.shape[0], 1)), xp, dtype=out.real.dtype)
        return self._labels(out, u)

    def sample_targets_keyed(self, out, key, first_row=0):
        zr = out.real[:, :1]  # one uniform per example
        return self._labels(out, keyed_uniform(*_counter_grid(zr, key, first_row)))

    @staticmethod
    def _labels(out, u):
        """The first class whose cumulative probability reaches u (one uniform per row)."""
        xp = array_module(out)
        p = ops.softmax(out.real, axis=1)
        cdf = xp.cumsum(p, axis=1)
        labels = (cdf < u.astype(cdf.dtype, copy=False)).sum(axis=1)
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
