"""A model is a sequence of pure layers plus a loss (DESIGN.md convention 3).

Parameters are a list of arrays, one per layer parameter, in layer order. A flat vector view is
available for curvature operators: :meth:`Model.unflatten` returns views into the flat vector
(no copies), so a solver can keep one flat buffer and hand its views to the layers. Every call
takes complex parameters as readily as real ones; nothing here converts complex to real, so the
same ``loss_and_grad`` at ``w + i h v`` is the complex-step pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy

from .backend import array_module, get_xp, is_device_array
from .init import make_generator
from .layers import Layer
from .losses import Loss, get_loss

__all__ = ["Model", "Capture"]


@dataclass
class Capture:
    """What a Kronecker-factored solver needs from one layer, as row matrices.

    ``a``: the layer input (N x d_in; patches for convolutions), ``z``: the pre-activation
    (N x d_out), ``g``: the per-example pre-activation gradient, i.e. N * d(mean loss)/dz
    (kbfgs.md pitfall 3: per-example scale, not the gradient of the mean). ``layer`` is the
    index in ``model.layers`` and ``param_index`` the index of its first parameter.
    """

    layer: int
    param_index: int
    a: object
    z: object
    g: object


class Model:
    """Layers + loss + optional L2 weight decay ``weight_decay`` (tau) on all parameters.

    The regularised objective is ``data loss + 0.5 tau ||theta||^2`` with gradient
    ``grad(data loss) + tau theta`` (kbfgs.md section 3.2); pass ``regularized=False`` for the
    bare data loss (what the curvature passes of K-BFGS and K-FAC use).
    """

    def __init__(self, layers: list[Layer], loss: Loss | str, weight_decay: float = 0.0,
                 input_shape: tuple[int, ...] | None = None, name: str = "model"):
        if not layers:
            raise ValueError("a model needs at least one layer")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.layers = list(layers)
        self.loss_fn = get_loss(loss)
        self.weight_decay = float(weight_decay)
        self.name = name
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.output_shape = None
        if self.input_shape is not None:
            shape = self.input_shape
            for layer in self.layers:
                shape = layer.output_shape(shape)
            self.output_shape = shape
        self.shapes: list[tuple[int, ...]] = []
        self.layer_param_index: list[int] = []
        for layer in self.layers:
            self.layer_param_index.append(len(self.shapes))
            self.shapes.extend(tuple(s) for s in layer.param_shapes())
        self.sizes = [prod(s) for s in self.shapes]
        self.offsets = numpy.concatenate([[0], numpy.cumsum(self.sizes)]).astype(int).tolist()
        self.n_params = self.offsets[-1]
        #: backward passes stop at the first layer with parameters: nobody needs dL/dx below it
        self.first_param_layer = next((i for i, layer in enumerate(self.layers) if layer.param_shapes()), len(self.layers))

    def __repr__(self) -> str:
        body = ", ".join(map(repr, self.layers))
        return f"Model({self.name}: [{body}], loss={self.loss_fn.name}, weight_decay={self.weight_decay}, n_params={self.n_params})"

    # --- parameters ---------------------------------------------------------------------
    def layer_params(self, params, i: int) -> list:
        """The parameters of layer ``i`` (a slice of the list)."""
        start = self.layer_param_index[i]
        return params[start:start + len(self.layers[i].param_shapes())]

    @property
    def kron_layers(self) -> list[int]:
        """Indices of layers with a Kronecker view (Dense, Conv2d)."""
        return [i for i, layer in enumerate(self.layers) if layer.kronecker]

    def init(self, seed: int = 9999, dtype=numpy.float64, xp=None, init: str = "numpy") -> list:
        """Initial parameters, layer by layer (W then b, U(+-1/sqrt(fan_in))), on ``xp``.

        ``init="numpy"`` draws them from ``numpy.random.default_rng(seed)``; ``init="torch"``
        gives exactly the float32 values PyTorch draws for the same layers after
        ``torch.manual_seed(seed)`` (:mod:`engine.init`), i.e. the reference code's initial point.
        """
        xp = xp or get_xp()
        rng = make_generator(init, seed)
        dtype = numpy.dtype(dtype)
        if dtype not in (numpy.float32, numpy.float64):
            raise TypeError(f"parameters are float32 or float64, not {dtype}")
        host = [p for layer in self.layers for p in layer.init(rng, dtype)]
        return self.unflatten(xp.asarray(numpy.concatenate([p.ravel() for p in host]) if host else numpy.zeros(0, dtype)))

    def flatten(self, params):
        """One flat vector holding all parameters (a copy)."""
        xp = array_module(*params)
        return xp.concatenate([p.reshape(-1) for p in params])

    def unflatten(self, flat) -> list:
        """Views of a flat vector shaped as the parameter list (no copies)."""
        if flat.ndim != 1 or flat.shape[0] != self.n_params:
            raise ValueError(f"flat parameter vector must have shape ({self.n_params},), got {tuple(flat.shape)}")
        return [flat[self.offsets[k]:self.offsets[k + 1]].reshape(s) for k, s in enumerate(self.shapes)]

    def zeros_like_params(self, params) -> list:
        """A parameter-shaped list of zeros sharing one flat buffer."""
        xp = array_module(*params)
        return self.unflatten(xp.zeros(self.n_params, dtype=params[0].dtype))

    def sq_norm(self, params):
        """sum_k sum(p_k * p_k): ||theta||^2 without conjugation (analytic in complex mode)."""
        return sum((p * p).sum() for p in params)

    # --- passes -------------------------------------------------------------------------
    def _check_input(self, x, params=None, y=None):
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.name} expects inputs of shape (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        # Data and parameters must live on the same side: the library's own error for a host
        # array meeting a device array ("Unsupported type", "Implicit conversion") names neither.
        if params:
            on_device = is_device_array(params[0])
            for what, a in (("x", x), ("y", y)):
                if a is not None and is_device_array(a) != on_device:
                    where, other = ("CuPy", "NumPy") if on_device else ("NumPy", "CuPy")
                    raise TypeError(f"{self.name}: the parameters are {where} arrays but {what} is a {other} array; "
                                    f"move the batch with {'cupy.asarray' if on_device else 'engine.backend.to_host'} once, before the passes")

    def forward(self, params, x):
        """(network output, list of per-layer caches)."""
        self._check_input(x, params)
        caches = []
        for i, layer in enumerate(self.layers):
            x, cache = layer.forward(self.layer_params(params, i), x)
            caches.append(cache)
        return x, caches

    def predict(self, params, x):
        """The network output only."""
        return self.forward(params, x)[0]

    def regularizer(self, params):
        """0.5 tau ||theta||^2 (0 when tau = 0)."""
        return 0.5 * self.weight_decay * self.sq_norm(params) if self.weight_decay else 0.0

    def loss(self, params, x, y, regularized: bool = True):
        """Mean loss on the batch (plus 0.5 tau ||theta||^2 when ``regularized``); a 0-d array."""
        self._check_input(x, params, y)
        out, _ = self.forward(params, x)
        self.loss_fn.check_target(out, y)
        value = self.loss_fn.value(out, y)
        return value + self.regularizer(params) if regularized and self.weight_decay else value

    def loss_and_grad(self, params, x, y, regularized: bool = True, capture: bool = False):
        """(loss, gradient list) or, with ``capture``, (loss, gradients, list of :class:`Capture`).

        One forward and one backward pass. With complex parameters this is the complex-step
        pass: Re of the result is the gradient, Im/h the Hessian-vector product. No host sync.
        """
        self._check_input(x, params, y)
        caches, outputs = [], []
        h = x
        for i, layer in enumerate(self.layers):
            h, cache = layer.forward(self.layer_params(params, i), h)
            caches.append(cache)
            outputs.append(h if capture and layer.kronecker else None)
        self.loss_fn.check_target(h, y)
        value, dy = self.loss_fn.value_and_grad(h, y)
        grads: list = [None] * len(params)
        captures = []
        n = x.shape[0]
        first = self.first_param_layer
        for i in range(len(self.layers) - 1, first - 1, -1):
            layer = self.layers[i]
            if capture and layer.kronecker:
                a, z, g = layer.kron_rows(caches[i], outputs[i], dy)
                captures.append(Capture(i, self.layer_param_index[i], a, z, g * n))
            dy, dparams = layer.backward(self.layer_params(params, i), caches[i], dy, need_dx=i > first)
            start = self.layer_param_index[i]
            grads[start:start + len(dparams)] = dparams
        if regularized and self.weight_decay:
            value = value + self.regularizer(params)
            for g, p in zip(grads, params):
                g += self.weight_decay * p
        if capture:
            captures.reverse()
            return value, grads, captures
        return value, grads
