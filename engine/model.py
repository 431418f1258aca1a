"""A model is a sequence of pure layers plus a loss, and the one pass engine (DESIGN.md convention 3).

Parameters are a list of arrays, one per layer parameter, in layer order. A flat vector view is
available for curvature operators: :meth:`Model.unflatten` returns views into the flat vector
(no copies), so a solver can keep one flat buffer and hand its views to the layers. Every call
takes complex parameters as readily as real ones; nothing here converts complex to real, so the
same ``loss_and_grad`` at ``w + i h v`` is the complex-step pass.

The passes. The model owns the only sweeps over its layers; the curvature operators and the
solvers call them instead of walking the layers:

* :meth:`Model.forward_pass` -> :class:`ForwardPass`: the output and every layer's cache (and,
  on request, the Kronecker layers' pre-activations, which the captures read);
* :meth:`Model.backward`: THE reverse sweep. From dL/d(output) it returns a :class:`BackwardPass`
  with, as asked, the parameter gradients (or only the back-propagated signal, skipping the
  weight-gradient products), the Kronecker rows of every Kronecker layer as :class:`Capture`
  records (collected, or handed to a callback as the sweep passes the layer), and the signal
  arriving at every layer (what the R-operator's backward needs); it stops at the first layer
  with parameters, or earlier at a given ``stop`` layer;
* :meth:`Model.r_forward` and :meth:`Model.backward_rop`: Pearlmutter's R-operator on the
  forward and on the backward equations (the latter runs on the same reverse sweep);
* :meth:`Model.loss_and_grad` and :meth:`Model.loss`: the compositions everybody uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Callable

import numpy

from .backend import array_module, data_address, get_xp, is_device_array
from .fuse import fused
from .init import make_generator
from .layers import Layer
from .losses import Loss, get_loss
from .parallel import DataParallel
from .ops import add_scaled_

__all__ = ["Model", "Capture", "ForwardPass", "BackwardPass"]


@dataclass
class Capture:
    """What a Kronecker-factored solver needs from one layer, as row matrices.

    ``a``: the layer input (N x d_in; patches for convolutions), ``z``: the pre-activation
    (N x d_out), ``g``: the per-example pre-activation gradient, i.e. N * d(mean loss)/dz
    (docs/kbfgs.md pitfall 3: per-example scale, not the gradient of the mean). ``layer`` is the
    index in ``model.layers`` and ``param_index`` the index of its first parameter.
    """

    layer: int
    param_index: int
    a: object
    z: object
    g: object


@dataclass
class ForwardPass:
    """What one forward sweep keeps (:meth:`Model.forward_pass`).

    ``out``: the network output; ``caches[i]``: layer i's cache; ``outputs[i]``: layer i's output
    for the Kronecker layers when the pass was asked to keep them (their pre-activations z, which
    the captures read), else ``None``; ``batch_size``: N, the rows of the input.
    """

    out: object
    caches: list
    outputs: list
    batch_size: int


@dataclass
class BackwardPass:
    """What one reverse sweep returns (:meth:`Model.backward`); unrequested fields are ``None``.

    ``grads``: the parameter-gradient list (entries of layers below ``stop`` stay ``None``);
    ``captures``: the :class:`Capture` of every Kronecker layer the sweep passed, in layer order;
    ``deltas[i]``: dL/d(output of layer i) for the layers the sweep passed.
    """

    grads: list | None = None
    captures: list | None = None
    deltas: list | None = None


class Model:
    """Layers + loss + optional L2 weight decay ``weight_decay`` (tau) on all parameters.

    The regularised objective is ``data loss + 0.5 tau ||theta||^2`` with gradient
    ``grad(data loss) + tau theta`` (docs/kbfgs.md section 3.2); pass ``regularized=False`` for the
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
        self._kron_layers = tuple(i for i, layer in enumerate(self.layers) if layer.kronecker)
        #: data parallelism (engine/parallel.py): batch means over this rank's shard become global
        #: means where they are formed (loss, gradient here; the solvers' statistics there)
        self.parallel = DataParallel()

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
        """Indices of layers with a Kronecker view (:class:`engine.layers.KroneckerLayer`: Dense, Conv2d)."""
        return list(self._kron_layers)

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

    def flat_buffer(self, arrays):
        """The flat vector that ``arrays`` are the :meth:`unflatten` views of, or None when they are not
        (separate arrays): decided from shapes and addresses, without touching the data."""
        base = getattr(arrays[0], "base", None) if len(arrays) == len(self.shapes) and arrays else None
        if base is None or base.ndim != 1 or base.shape[0] != self.n_params or base.dtype != arrays[0].dtype:
            return None
        start, size = data_address(base), base.dtype.itemsize
        for a, offset, shape in zip(arrays, self.offsets, self.shapes):
            if tuple(a.shape) != shape or a.dtype != base.dtype or not a.flags.c_contiguous \
                    or data_address(a) != start + offset * size:
                return None
        return base

    def as_flat(self, arrays):
        """The flat vector of a parameter-shaped list: its buffer when the list is views of one
        (:meth:`flat_buffer`), else a concatenated copy (one launch)."""
        flat = self.flat_buffer(arrays)
        return flat if flat is not None else self.flatten(arrays)

    def zeros_like_params(self, params) -> list:
        """A parameter-shaped list of zeros sharing one flat buffer."""
        xp = array_module(*params)
        return self.unflatten(xp.zeros(self.n_params, dtype=params[0].dtype))

    def sq_norm(self, params):
        """theta^T theta = ||theta||^2 without conjugation (analytic in complex mode), on the flat vector."""
        flat = self.as_flat(params)
        return array_module(flat).dot(flat, flat)

    # --- passes -------------------------------------------------------------------------
    def check_batch(self, x, params=None, y=None):
        """Refuse an input of the wrong per-example shape, a host batch holding NaN or Inf (which
        would turn every parameter into NaN, silently), or a batch on the other side (host or
        device) from the parameters, with one sentence naming the fix. No host sync: a device batch
        is not scanned for NaN (that would cost one); the trainer's batches come from a host data
        set that is checked when it is built."""
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.name} expects inputs of shape (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        for what, a in (("x", x), ("y", y)):
            if isinstance(a, numpy.ndarray) and a.dtype.kind in "fc" and not numpy.isfinite(a).all():
                bad = int(a.size - numpy.count_nonzero(numpy.isfinite(a)))
                raise ValueError(f"{self.name}: the batch's {what} holds {bad} NaN or infinite value(s); "
                                 "clean or drop those examples before the step")
        # Data and parameters must live on the same side: the library's own error for a host
        # array meeting a device array ("Unsupported type", "Implicit conversion") names neither.
        if params:
            on_device = is_device_array(params[0])
            for what, a in (("x", x), ("y", y)):
                if a is not None and is_device_array(a) != on_device:
                    where, other = ("CuPy", "NumPy") if on_device else ("NumPy", "CuPy")
                    raise TypeError(f"{self.name}: the parameters are {where} arrays but {what} is a {other} array; "
                                    f"move the batch with {'cupy.asarray' if on_device else 'engine.backend.to_host'} once, before the passes")

    def forward_pass(self, params, x, y=None, kron_outputs: bool = False) -> ForwardPass:
        """THE forward sweep: output and caches (and the Kronecker layers' outputs with ``kron_outputs``).

        ``y``, when given, is only checked (same side as the parameters)."""
        self.check_batch(x, params, y)
        caches, outputs = [], []
        h = x
        for i, layer in enumerate(self.layers):
            h, cache = layer.forward(self.layer_params(params, i), h)
            caches.append(cache)
            outputs.append(h if kron_outputs and layer.kronecker else None)
        return ForwardPass(h, caches, outputs, x.shape[0])

    def forward(self, params, x):
        """(network output, list of per-layer caches)."""
        fwd = self.forward_pass(params, x)
        return fwd.out, fwd.caches

    def predict(self, params, x):
        """The network output only: a forward sweep that keeps no caches (``layer.apply``)."""
        self.check_batch(x, params)
        h = x
        for i, layer in enumerate(self.layers):
            h = layer.apply(self.layer_params(params, i), h)
        return h

    def _capture(self, i, fwd: ForwardPass, dy, per_example: bool) -> Capture:
        """Layer i's Kronecker rows; g = N dL/dz (``per_example``) or the layer's unscaled rows."""
        a, z, g = self.layers[i].kron_rows(fwd.caches[i], fwd.outputs[i], dy)
        if per_example and g is not None:
            g = g * fwd.batch_size
        return Capture(i, self.layer_param_index[i], a, z, g)

    def forward_captures(self, fwd: ForwardPass) -> list[Capture]:
        """The Kronecker rows a and z of a forward pass kept with ``kron_outputs`` (g = None), in
        layer order: what a forward-only statistic (the warm start of A) reads."""
        return [self._capture(i, fwd, None, False) for i in self.kron_layers]

    def input_captures(self, params, x) -> list[Capture]:
        """The Kronecker rows a of every Kronecker layer (z = g = None), from a forward sweep that
        keeps no caches and stops at the last Kronecker layer's input (its product, and everything
        above it, is never computed): what the warm start of A reads."""
        self.check_batch(x, params)
        out, h = [], x
        last = self._kron_layers[-1] if self._kron_layers else -1
        for i, layer in enumerate(self.layers[:last + 1]):
            if layer.kronecker:
                out.append(Capture(i, self.layer_param_index[i], layer.input_rows(h), None, None))
            if i < last:
                h = layer.apply(self.layer_params(params, i), h)
        return out

    def _reverse_sweep(self, params, signal, stop: int, rule) -> list:
        """THE reverse walk over the layers, from the top down to layer ``stop``.

        ``rule(i, layer params, signal, need_dx) -> (signal below, parameter results or None)``
        is applied at every layer; the parameter results are gathered into a parameter-shaped list.
        """
        results = [None] * len(params)
        for i in range(len(self.layers) - 1, stop - 1, -1):
            signal, per_param = rule(i, self.layer_params(params, i), signal, i > stop)
            if per_param:
                start = self.layer_param_index[i]
                results[start:start + len(per_param)] = per_param
        return results

    def backward(self, params, fwd: ForwardPass, dout, *, param_grads: bool = True,
                 capture: bool | Callable[[Capture], None] = False, per_example: bool = True,
                 stop: int | None = None, keep_deltas: bool = False) -> BackwardPass:
        """Back-propagate ``dout`` = dL/d(output) through the forward pass ``fwd``.

        * ``param_grads``: compute the parameter gradients (``layer.backward``); without them only
          the signal goes down (``layer.input_gradient``: no weight-gradient products).
        * ``capture``: True collects the :class:`Capture` of every Kronecker layer passed (the
          forward pass must keep ``kron_outputs``); a callable receives each one instead, as the
          sweep passes the layer (top first), and nothing is collected. ``per_example``: g = N dL/dz
          (docs/kbfgs.md pitfall 3), else the layer's unscaled rows (dL/dz for Dense, sqrt(L) dL/dz for Conv2d)
          for a caller that only needs their mean.
        * ``stop``: the lowest layer the sweep reaches (its dx is not formed). Default: the first
          layer with parameters (nothing below it needs dL/dx), or, without parameter gradients
          but with captures, the first Kronecker layer (the K-BFGS second pass: about 2/3 of a
          full backward, docs/kbfgs.md section 4.3).
        * ``keep_deltas``: keep dL/d(output of layer i) for every layer passed (``deltas``).
        """
        if stop is None:
            kron = self._kron_layers
            stop = kron[0] if capture and not param_grads and kron else self.first_param_layer
        captures = [] if capture is True else None
        deltas = [None] * len(self.layers) if keep_deltas else None

        def rule(i, lp, dy, need_dx):
            layer = self.layers[i]
            if keep_deltas:
                deltas[i] = dy
            if capture and layer.kronecker:
                c = self._capture(i, fwd, dy, per_example)
                if captures is None:
                    capture(c)
                else:
                    captures.append(c)
            if param_grads:
                return layer.backward(lp, fwd.caches[i], dy, need_dx=need_dx)
            return (layer.input_gradient(lp, fwd.caches[i], dy) if need_dx else None), None

        grads = self._reverse_sweep(params, dout, stop, rule)
        if captures is not None:
            captures.reverse()
        return BackwardPass(grads if param_grads else None, captures, deltas)

    def r_forward(self, params, fwd: ForwardPass, rparams):
        """(R{input} of every layer, R{out}) for the parameter direction ``rparams`` (Pearlmutter
        1994, R-forward, through the layers' ``jvp``).

        R{x} = 0 for the data; parameter-free layers before the first weight layer keep it 0
        (recorded as ``None``, which the layers' ``jvp`` accept for the first weight layer).
        """
        r = None
        r_inputs = []
        for i, layer in enumerate(self.layers):
            r_inputs.append(r)
            lp = self.layer_params(params, i)
            if r is None and not lp:
                continue
            r = layer.jvp(lp, fwd.caches[i], r, self.layer_params(rparams, i))
        if r is None:
            r = array_module(fwd.out).zeros_like(fwd.out)
        return r_inputs, r

    def backward_rop(self, params, fwd: ForwardPass, deltas, rdout, r_inputs, rparams) -> list:
        """R{gradient}: the R-operator on the backward equations (``layer.backward_rop``), on the
        reverse sweep. ``deltas`` from :meth:`backward` with ``keep_deltas``, ``r_inputs`` from
        :meth:`r_forward`, ``rdout`` = R{dL/d(output)}."""
        def rule(i, lp, rdy, need_dx):
            return self.layers[i].backward_rop(lp, fwd.caches[i], deltas[i], rdy, r_inputs[i],
                                               self.layer_params(rparams, i), need_dx=need_dx)

        return self._reverse_sweep(params, rdout, self.first_param_layer, rule)

    def regularizer(self, params):
        """0.5 tau ||theta||^2 (0 when tau = 0)."""
        return 0.5 * self.weight_decay * self.sq_norm(params) if self.weight_decay else 0.0

    def loss(self, params, x, y, regularized: bool = True):
        """Mean loss on the batch (plus 0.5 tau ||theta||^2 when ``regularized``); a 0-d array."""
        out = self.forward_pass(params, x, y).out
        self.loss_fn.check_target(out, y)
        value = self.loss_fn.value(out, y)
        if self.parallel.active:
            value = self.parallel.mean([value])[0]
        return value + self.regularizer(params) if regularized and self.weight_decay else value

    def loss_and_grad(self, params, x, y, regularized: bool = True, capture: bool = False, forward: ForwardPass | None = None,
                      per_example: bool = True):
        """(loss, gradient list) or, with ``capture``, (loss, gradients, list of :class:`Capture`).

        One forward and one backward pass. With complex parameters this is the complex-step
        pass: Re of the result is the gradient, Im/h the Hessian-vector product. No host sync.
        ``forward``: a forward pass of ``x`` already made at ``params`` (kept with ``kron_outputs``
        for ``capture``), reused instead of a new one. ``per_example``: the captures' g rows as in
        :meth:`backward`. The gradients are views of one flat vector (:meth:`flat_buffer` finds it).
        """
        fwd = forward if forward is not None else self.forward_pass(params, x, y, kron_outputs=capture)
        if forward is not None:
            self.check_batch(x, params, y)
        self.loss_fn.check_target(fwd.out, y)
        value, dy = self.loss_fn.value_and_grad(fwd.out, y)
        back = self.backward(params, fwd, dy, capture=capture, per_example=per_example)
        # one flat gradient (its views are returned): the solvers' updates are one operation each
        grad = self.flatten(back.grads)
        if self.parallel.active:  # the global batch's loss and gradient (curvature products by complex step too)
            value, grad = self.parallel.mean([value, grad])
            grad = grad.copy()  # its own flat buffer again (the solvers' updates recognise it by address)
        if regularized and self.weight_decay:
            theta = self.as_flat(params)
            xp = array_module(theta)
            value = _add_regularizer(value, xp.dot(theta, theta), 0.5 * self.weight_decay)
            add_scaled_(grad, theta, self.weight_decay)
        grads = self.unflatten(grad)
        if capture:
            return value, grads, back.captures
        return value, grads


@fused
def _add_regularizer(xp, value, sq_norm, half_tau):
    return value + half_tau * sq_norm

