"""Small in-place helpers for the EMA'd Kronecker factors of K-BFGS and K-FAC."""

from __future__ import annotations

import numpy

from engine.backend import array_module
from engine.layers import KroneckerLayer

from ._kernels import scaled_ema_

__all__ = ["ema_", "ema_homogeneous_second_moment_", "flush_subnormals_", "check_real_params", "kron_layers", "spatial_layers"]


def ema_(target, new, decay: float):
    """target <- decay target + (1 - decay) new, in place (returns ``target``)."""
    target *= decay
    target += (1 - decay) * new
    return target


def ema_homogeneous_second_moment_(A, a, decay: float, a_mean=None):
    """A <- decay A + (1 - decay) (1/N) a~^T a~ in place, a~ = [a, 1] (N x (d+1)).

    The same statistic as ``engine.curvature.kron_factors(..., which="A")``, fused with the EMA
    so that no (d+1)^2 batch matrix is assembled: a^T a goes through SYRK (NumPy uses it for
    ``a.T @ a``), the ones column contributes the column means (``a_mean`` when the caller has
    them) and 1. Exactly symmetric.
    """
    n, d = a.shape  # n counts rows: N examples (Dense) or N L (example, location) pairs (Conv2d)
    w = (1 - decay) / n
    aa = a.T @ a
    scaled_ema_(A[:d, :d], aa, decay, w)  # one fused pass on NumPy
    A[:d, d] *= decay
    A[d, :d] *= decay
    A[d, d] *= decay
    col = (1 - decay) * a_mean if a_mean is not None else a.sum(axis=0) * w
    A[:d, d] += col
    A[d, :d] += col
    A[d, d] += 1 - decay
    return A


def flush_subnormals_(a):
    """Set entries with |a| below the smallest normal number to zero, in place.

    kbfgs.md pitfall 19: entries of EMA'd factors that decay (e.g. rows of dead ReLU units)
    drift into the subnormal range, where x86 arithmetic is many times slower; the official
    K-FAC doubles its epoch time on CPU after epoch 11 because of it.
    """
    xp = array_module(a)
    tiny = numpy.finfo(a.dtype).tiny
    xp.copyto(a, 0, where=xp.abs(a) < tiny)
    return a


def check_real_params(name: str, params) -> None:
    if not params or params[0].dtype.kind != "f":
        kind = params[0].dtype if params else "no parameters"
        raise TypeError(f"{name} trains real float32/float64 parameters, got {kind}; complex parameters are for curvature passes")


def kron_layers(name: str, model) -> list[int]:
    """Indices of the model's Kronecker layers, each a :class:`engine.layers.KroneckerLayer` (Dense, Conv2d).

    Every such layer exposes the same Kronecker view (``d_in``, ``d_out``, ``kron_rows``,
    ``to_matrix``, ``from_matrix``), so factors are sized (d_in + 1)^2 and d_out^2 for any: for
    Conv2d d_in = C_in kh kw (a patch) and d_out = C_out, with one row per (example, location)
    (KFC, Grosse & Martens 2016; :class:`engine.conv.Conv2d`).
    """
    layers = model.kron_layers
    if not layers:
        raise ValueError(f"{name} needs a model with Dense layers or Conv2d layers; {model.name} has none")
    other = [i for i in layers if not isinstance(model.layers[i], KroneckerLayer)]
    if other:
        raise ValueError(f"{name} has Kronecker factors for KroneckerLayer kinds, i.e. Dense and Conv2d layers only; layer {other[0]} "
                         f"({model.layers[other[0]]!r}) claims a Kronecker view without that contract; use a solver without "
                         "Kronecker factors for it")
    return layers


def spatial_layers(model, layers) -> set[int]:
    """The indices among ``layers`` whose rows are (example, location) pairs (``KroneckerLayer.spatial``: Conv2d)."""
    return {i for i in layers if model.layers[i].spatial}
