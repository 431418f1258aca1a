"""Initial weights: the fan-in uniform rule of ``nn.Linear`` / ``nn.Conv2d``, from two generators.

Every weight layer draws ``W`` then ``b``, both ~ U(-1/sqrt(fan_in), +1/sqrt(fan_in)), layer by
layer (docs/kbfgs.md section 3.3). Two sources of those numbers are supported:

* ``"numpy"`` (the default of :meth:`engine.model.Model.init` and :class:`engine.train.Trainer`):
  ``numpy.random.default_rng(seed)`` (PCG64), in double precision, cast to the run's dtype;
* ``"torch"``: **the exact float32 values** PyTorch draws for the same layers after
  ``torch.manual_seed(seed)`` on the CPU, without PyTorch. This puts a run at the reference
  code's own initial point (its seed 9999), which matters for methods whose early iterations
  are sensitive to the initial weights (K-BFGS at the Demo's alpha = 0.3, lambda = 0.3: see
  ``benchmarks/reproduce_kbfgs.py``). The command line uses it by default.

How PyTorch draws them (CPU generator; checked bit for bit against PyTorch 2.13 in the tests'
reference values): ``torch.manual_seed(s)`` seeds a 32-bit Mersenne Twister (MT19937) with the
classic ``init_genrand(s)`` recurrence; ``Tensor.uniform_(lo, hi)`` on a float32 tensor takes
one 32-bit output per element, in memory order, keeps its low 24 bits ``v`` and returns
``float32((v * 2**-24) * (float32(hi) - float32(lo)) + float32(lo))``, the arithmetic in
double. ``nn.Linear``/``nn.Conv2d`` call ``kaiming_uniform_(W, a=sqrt(5))``, whose bound is
``sqrt(3) * (sqrt(2 / (1 + 5)) / sqrt(fan_in))`` in Python floats (equal to 1/sqrt(fan_in) up
to rounding), then ``uniform_(b, -1/sqrt(fan_in), 1/sqrt(fan_in))``. In float64 runs the
float32 values are widened exactly (the reference model is float32).
"""

from __future__ import annotations

import math

import numpy

__all__ = ["INIT_SCHEMES", "TorchGenerator", "make_generator", "fan_in_uniform"]

#: The names :meth:`engine.model.Model.init` accepts for ``init``.
INIT_SCHEMES = ("numpy", "torch")

_MT_N = 624


def _init_genrand(seed: int) -> numpy.ndarray:
    """The MT19937 state ``init_genrand(seed)`` makes (Matsumoto & Nishimura's reference seeding)."""
    key = numpy.empty(_MT_N, dtype=numpy.uint32)
    x = seed & 0xFFFFFFFF
    key[0] = x
    for j in range(1, _MT_N):
        x = (1812433253 * (x ^ (x >> 30)) + j) & 0xFFFFFFFF
        key[j] = x
    return key


class TorchGenerator:
    """PyTorch's CPU random generator after ``torch.manual_seed(seed)``, for ``uniform_`` on
    float32 tensors (the only draw the default layer initialisation makes)."""

    def __init__(self, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, (int, numpy.integer)) or not 0 <= seed < 2**64:
            raise ValueError(f"a PyTorch seed is an integer in [0, 2**64), got {seed!r}")
        self.seed = int(seed)
        # torch keeps a 64-bit seed but seeds MT19937 with its low 32 bits
        self._bits = numpy.random.MT19937(0)
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": _init_genrand(self.seed), "pos": _MT_N}}

    def uniform(self, low: float, high: float, size) -> numpy.ndarray:
        """``torch.empty(size).uniform_(low, high)`` as a float32 array (memory order = C order)."""
        shape = (size,) if isinstance(size, (int, numpy.integer)) else tuple(size)
        n = math.prod(shape)
        words = self._bits.random_raw(n).astype(numpy.uint64) & numpy.uint64((1 << 24) - 1)
        lo, hi = numpy.float32(low), numpy.float32(high)
        x = words.astype(numpy.float64) * (1.0 / (1 << 24))
        return (x * numpy.float64(hi - lo) + numpy.float64(lo)).astype(numpy.float32).reshape(shape)

    def __repr__(self) -> str:
        return f"TorchGenerator(seed={self.seed})"


def make_generator(init: str, seed: int):
    """The generator of scheme ``init`` (one of :data:`INIT_SCHEMES`) seeded with ``seed``."""
    if init == "numpy":
        return numpy.random.default_rng(seed)
    if init == "torch":
        return TorchGenerator(seed)
    raise ValueError(f"unknown initialisation {init!r}; choose one of {', '.join(INIT_SCHEMES)}")


def fan_in_uniform(rng, weight_shape: tuple[int, ...], fan_in: int, dtype) -> list[numpy.ndarray]:
    """``[W, b]`` of a weight layer: W of ``weight_shape`` then b of ``weight_shape[0]``, both
    ~ U(-1/sqrt(fan_in), +1/sqrt(fan_in)), drawn from ``rng`` (a ``numpy.random.Generator`` or a
    :class:`TorchGenerator`, which reproduces PyTorch's values exactly), as host arrays of ``dtype``."""
    bias_bound = 1.0 / math.sqrt(fan_in)
    bias_shape = (int(weight_shape[0]),)
    if isinstance(rng, TorchGenerator):
        weight_bound = math.sqrt(3.0) * (math.sqrt(2.0 / (1 + 5)) / math.sqrt(fan_in))  # kaiming_uniform_(a=sqrt(5))
    else:
        weight_bound = bias_bound
    w = rng.uniform(-weight_bound, weight_bound, size=weight_shape)
    b = rng.uniform(-bias_bound, bias_bound, size=bias_shape)
    return [w.astype(dtype), b.astype(dtype)]
