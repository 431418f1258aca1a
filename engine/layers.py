"""Pure layers: a layer holds shapes and hyper-parameters, never weights (DESIGN.md convention 3).

The contract is :class:`Layer` (an abstract base): ``forward``, ``backward``, the R-operator rules
``jvp`` and ``backward_rop``, and the shape methods ``param_shapes``, ``init``, ``output_shape``.
Layers whose weights multiply a homogeneous input derive from :class:`KroneckerLayer`, which adds
the Kronecker view the K-FAC / K-BFGS statistics read: ``kron_rows``, ``to_matrix`` /
``from_matrix`` (the ``[W | b]`` matrix), ``d_in`` / ``d_out``, ``locations`` and ``spatial``.
:class:`engine.model.Model` owns the only forward and reverse sweeps over the layers; nothing else
walks them or asks which kind of layer it holds.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy

from . import ops
from .products import matmul
from .backend import array_module
from .init import fan_in_uniform

__all__ = ["Layer", "KroneckerLayer", "Dense", "Activation", "ReLU", "Sigmoid", "Tanh", "Identity", "activation"]


class Layer(abc.ABC):
    """The layer contract. A parameter-free, shape-preserving layer unless it overrides the shape methods.

    * ``forward(params, x) -> (y, cache)`` and ``backward(params, cache, dy, need_dx=True) ->
      (dx, dparams)``: the ordinary pass and its hand-written, complex-analytic adjoint (plain
      transposes, no conjugation), so the same call with complex parameters is the complex-step
      pass; ``dx`` is ``None`` when ``need_dx`` is false, ``dparams`` a list (empty without
      parameters).
    * ``jvp(params, cache, rx, rparams) -> ry`` and ``backward_rop(params, cache, dy, rdy, rx,
      rparams, need_dx=True) -> (rdx, rdparams)``: Pearlmutter's R-operator (1994) applied to the
      forward and to the backward equations, written separately from the complex step so that
      :class:`engine.curvature.HessianRop` is an independent reference. ``rx`` is ``None`` for a
      layer whose input does not depend on the parameters (R{x} = 0).
    * ``input_gradient(params, cache, dy) -> dx``: ``backward``'s dx alone; layers with weights
      override it to skip the weight-gradient products (the sweeps that need no parameter gradient).
    * ``apply(params, x) -> y``: ``forward``'s output alone, for passes that keep no cache.
    * ``param_shapes()``, ``init(rng, dtype)``, ``output_shape(input_shape)``: shapes, initial
      values, shape checks.
    """

    #: True for a :class:`KroneckerLayer` (it has the Kronecker view)
    kronecker: ClassVar[bool] = False

    @abc.abstractmethod
    def forward(self, params, x):
        """(y, cache): the layer output and what ``backward`` / ``jvp`` / ``backward_rop`` need."""

    @abc.abstractmethod
    def backward(self, params, cache, dy, need_dx=True):
        """(dL/dx or None, [dL/dp for each parameter]) from dy = dL/dy."""

    @abc.abstractmethod
    def jvp(self, params, cache, rx, rparams):
        """R{y} = dy/dx R{x} + dy/dp R{p} (``rx`` None means R{x} = 0)."""

    @abc.abstractmethod
    def backward_rop(self, params, cache, dy, rdy, rx, rparams, need_dx=True):
        """(R{dx} or None, [R{dp}]): the R-operator applied to ``backward``'s equations."""

    def input_gradient(self, params, cache, dy):
        """dL/dx alone (the same values as ``backward``'s dx)."""
        return self.backward(params, cache, dy, need_dx=True)[0]

    def apply(self, params, x):
        """The output alone, keeping no cache (forward-only passes: evaluation, prediction)."""
        return self.forward(params, x)[0]

    def param_shapes(self) -> list[tuple[int, ...]]:
        return []

    def init(self, rng, dtype) -> list[numpy.ndarray]:
        """Host arrays of the initial parameters drawn from ``rng`` (a ``numpy.random.Generator``
        or an :class:`engine.init.TorchGenerator`)."""
        return []

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-example output shape for a per-example input shape (for shape checks)."""
        return input_shape

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class KroneckerLayer(Layer):
    """A layer whose parameters are a homogeneous matrix [W | b] (d_out x (d_in + 1)) acting on rows a~ = [a, 1].

    The Kronecker view (K-FAC, Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016):

    * ``d_in``, ``d_out``: the widths of the input rows a and of the pre-activation rows z;
    * ``kron_rows(cache, y, dy) -> (a, z, g)``: row matrices of the layer input, the pre-activation
      (the layer output ``y``) and the pre-activation gradient (``dy``; ``None`` passes through
      for forward-only passes). The model scales g to per-example size (N dL/dz);
    * ``to_matrix(params)`` / ``from_matrix(m)``: the [W | b] matrix of a parameter-shaped pair and back;
    * ``spatial``: whether the rows are (example, location) pairs of a weight shared over
      locations (N L rows, Conv2d) rather than one row per example (N rows, Dense);
    * ``locations(rows, batch_size)``: L, the rows per example of a capture.
    """

    kronecker: ClassVar[bool] = True
    #: the rows are (example, location) pairs of a weight shared over the locations
    spatial: ClassVar[bool] = False
    d_in: int
    d_out: int

    @abc.abstractmethod
    def kron_rows(self, cache, y, dy):
        """(a, z, g) as row matrices (see the class docstring)."""

    def input_rows(self, x):
        """The rows a of a layer input x alone (``kron_rows``' a without the forward product)."""
        return self.kron_rows(x, None, None)[0]

    @abc.abstractmethod
    def to_matrix(self, params):
        """The homogeneous matrix [W | b] (d_out x (d_in + 1)) of a parameter-shaped pair."""

    @abc.abstractmethod
    def from_matrix(self, m):
        """Split a homogeneous (d_out x (d_in + 1)) matrix back into the parameter shapes (views of ``m``)."""

    def locations(self, rows: int, batch_size: int) -> int:
        """L, the number of rows per example in a capture of ``rows`` rows (1 unless ``spatial``)."""
        if batch_size < 1 or rows % batch_size or (not self.spatial and rows != batch_size):
            raise ValueError(f"{self!r}: a capture of {rows} rows does not fit the batch size {batch_size}")
        return rows // batch_size


class Dense(KroneckerLayer):
    """Fully connected layer ``y = x W^T + b`` with W of shape (d_out, d_in), as torch.nn.Linear.

    Initialisation is PyTorch's Linear default, W, b ~ U(-1/sqrt(d_in), +1/sqrt(d_in)), which the
    K-BFGS reference code uses (docs/kbfgs.md section 3.3). The Kronecker view is the homogeneous
    weight matrix [W | b] of shape (d_out, d_in + 1) acting on the homogeneous input [x, 1].
    """

    def __init__(self, d_in: int, d_out: int):
        if d_in < 1 or d_out < 1:
            raise ValueError(f"Dense needs positive sizes, got d_in={d_in}, d_out={d_out}")
        self.d_in, self.d_out = int(d_in), int(d_out)

    def __repr__(self) -> str:
        return f"Dense({self.d_in}, {self.d_out})"

    def param_shapes(self):
        return [(self.d_out, self.d_in), (self.d_out,)]

    def output_shape(self, input_shape):
        if tuple(input_shape) != (self.d_in,):
            raise ValueError(f"{self!r} expects inputs of shape (N, {self.d_in}), got (N, {', '.join(map(str, input_shape))})")
        return (self.d_out,)

    def init(self, rng, dtype):
        return fan_in_uniform(rng, (self.d_out, self.d_in), self.d_in, dtype)

    def forward(self, params, x):
        w, b = params
        y = matmul(x, w.T)
        y += b
        return y, x

    def backward(self, params, cache, dy, need_dx=True):
        w, _ = params
        x = cache
        dw = matmul(dy.T, x)
        db = dy.sum(axis=0)
        dx = matmul(dy, w) if need_dx else None
        return dx, [dw, db]

    def input_gradient(self, params, cache, dy):
        return matmul(dy, params[0])

    def jvp(self, params, cache, rx, rparams):
        w, _ = params
        rw, rb = rparams
        x = cache
        ry = x @ rw.T
        ry += rb
        if rx is not None:
            ry += rx @ w.T
        return ry

    def backward_rop(self, params, cache, dy, rdy, rx, rparams, need_dx=True):
        # dx = dy W, dW = dy^T x, db = sum dy  =>  differentiate each product rule term.
        w, _ = params
        rw, _ = rparams
        x = cache
        rdw = rdy.T @ x
        if rx is not None:
            rdw += dy.T @ rx
        rdb = rdy.sum(axis=0)
        rdx = (rdy @ w + dy @ rw) if need_dx else None
        return rdx, [rdw, rdb]

    # --- Kronecker view -------------------------------------------------------------------
    def kron_rows(self, cache, y, dy):
        """(layer input a, pre-activation z, dL/dz) as row matrices, one row per example."""
        return cache, y, dy

    def to_matrix(self, params):
        """The homogeneous matrix [W | b] (d_out x (d_in + 1)) of a parameter-shaped pair."""
        w, b = params
        xp = array_module(w, b)
        return xp.concatenate([w, b[:, None]], axis=1)

    def from_matrix(self, m):
        """Split a homogeneous (d_out x (d_in + 1)) matrix back into [W, b] (views of ``m``)."""
        return [m[:, : self.d_in], m[:, self.d_in]]


class Activation(Layer):
    """Elementwise activation. Subclasses define f, f' and f'' in the forms used below."""

    name = "activation"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ReLU(Activation):
    """max(z, 0) with the mask taken from Re z (docs/complex-step.md section 4.3)."""

    name = "relu"

    def forward(self, params, x):
        return ops.relu_forward(x)  # (y, mask) in one pass

    def backward(self, params, cache, dy, need_dx=True):
        return ops.where0(cache, dy), []

    def apply(self, params, x):
        if x.dtype.kind == "c":  # no maximum on complex values: the masked form
            return self.forward(params, x)[0]
        return array_module(x).maximum(x, 0)  # one pass, no mask (real input only)

    def jvp(self, params, cache, rx, rparams):
        return ops.where0(cache, rx)

    def backward_rop(self, params, cache, dy, rdy, rx, rparams, need_dx=True):
        return ops.where0(cache, rdy), []  # f'' = 0 away from the kink


class _SmoothActivation(Activation):
    """f with derivatives expressed through the output y = f(z) (cache = y)."""

    def f(self, z):  # pragma: no cover - abstract
        raise NotImplementedError

    def df(self, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def d2f(self, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def vjp(self, dy, y):
        """dy f'(z) from the output y (one fused kernel where the subclass gives one)."""
        return dy * self.df(y)

    def forward(self, params, x):
        y = self.f(x)
        return y, y

    def backward(self, params, cache, dy, need_dx=True):
        return self.vjp(dy, cache), []

    def jvp(self, params, cache, rx, rparams):
        return self.vjp(rx, cache)

    def backward_rop(self, params, cache, dy, rdy, rx, rparams, need_dx=True):
        # dz = dy f'(z)  =>  R{dz} = R{dy} f'(z) + dy f''(z) R{z}
        return rdy * self.df(cache) + dy * self.d2f(cache) * rx, []


class Tanh(_SmoothActivation):
    name = "tanh"

    def f(self, z):
        return ops.tanh(z)

    def df(self, y):
        return ops.tanh_grad(y)

    def vjp(self, dy, y):
        return ops.tanh_vjp(dy, y)

    def d2f(self, y):
        return -2 * y * (1 - y * y)


class Sigmoid(_SmoothActivation):
    """Logistic sigmoid in the stable tanh form (no NaN at Re z = -1000)."""

    name = "sigmoid"

    def f(self, z):
        return ops.sigmoid(z)

    def df(self, y):
        return ops.sigmoid_grad(y)

    def vjp(self, dy, y):
        return ops.sigmoid_vjp(dy, y)

    def d2f(self, y):
        return y * (1 - y) * (1 - 2 * y)


class Identity(Activation):
    """The linear activation (code layer and output layer of the autoencoders)."""

    name = "identity"

    def forward(self, params, x):
        return x, None

    def backward(self, params, cache, dy, need_dx=True):
        return dy, []

    def jvp(self, params, cache, rx, rparams):
        return rx

    def backward_rop(self, params, cache, dy, rdy, rx, rparams, need_dx=True):
        return rdy, []


_ACTIVATIONS = {cls.name: cls for cls in (ReLU, Sigmoid, Tanh, Identity)}
_ACTIVATIONS["linear"] = Identity


def activation(name: str) -> Activation:
    """An activation layer by name: relu, sigmoid, tanh, identity (alias linear)."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(sorted(_ACTIVATIONS))}") from None
