"""Parameter-free layers on NCHW arrays: MaxPool2d, AvgPool2d, Upsample2d, Flatten, Unflatten,
and the window geometry they share with :class:`engine.conv.Conv2d`.

Same pure-layer contract as :mod:`engine.layers` (forward/backward and the R-operator rules
``jvp``/``backward_rop``), written on the array module of the operands: one code path for NumPy
and CuPy. Complex-analytic: max-pooling chooses the arg-max on real parts and carries the whole
complex value (docs/complex-step.md section 4.3).
"""

from __future__ import annotations

import math

import numpy

from . import cpu_kernels, ops, workspace
from .backend import array_module
from .layers import Layer

__all__ = ["MaxPool2d", "AvgPool2d", "Upsample2d", "Flatten", "Unflatten", "conv_output_size",
           "pair", "pad_nchw", "offset_slices", "check_nchw"]


def pair(v, what: str) -> tuple[int, int]:
    """(a, b) from an int or a pair of ints (kernel sizes, strides, paddings, scale factors)."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{what} must be an int or a pair of ints, got {v!r}")
        a, b = int(v[0]), int(v[1])
    else:
        a = b = int(v)
    return a, b


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """floor((size + 2 padding - kernel) / stride) + 1 (PyTorch's formula, dilation 1)."""
    return (size + 2 * padding - kernel) // stride + 1


def pad_nchw(x, padding: tuple[int, int], value=0.0):
    """Zero-pad (or ``value``-pad) the two spatial axes of an NCHW array; no copy when padding is 0."""
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    xp = array_module(x)
    n, c, h, w = x.shape
    shape = (n, c, h + 2 * ph, w + 2 * pw)
    if xp is numpy:  # a reused buffer: fill the border only
        out = workspace.empty(xp, shape, x.dtype)
        out[:, :, :ph] = value
        out[:, :, h + ph:] = value
        out[:, :, ph:ph + h, :pw] = value
        out[:, :, ph:ph + h, w + pw:] = value
    else:
        out = xp.full(shape, value, dtype=x.dtype)  # faster than xp.pad's generic path
    out[:, :, ph:ph + h, pw:pw + w] = x
    return out


def offset_slices(kernel, stride, out_hw):
    """For each kernel offset (i, j): the strided slice of the padded input it touches."""
    (kh, kw), (sh, sw), (ho, wo) = kernel, stride, out_hw
    for i in range(kh):
        for j in range(kw):
            yield i, j, (slice(None), slice(None), slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))


def check_nchw(layer, x):
    """Refuse a non-4-d input with a message that names the fix."""
    if x.ndim != 4:
        raise ValueError(f"{layer!r} expects NCHW inputs of shape (N, C, H, W), got an array of shape {tuple(x.shape)}; "
                         "put an Unflatten((C, H, W)) layer before it for flat inputs")


class _Pool2d(Layer):
    """Shared geometry of the pooling layers (square or rectangular windows, dilation 1)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        self.kernel = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride") if stride is not None else self.kernel
        self.padding = pair(padding, "padding")
        if min(self.kernel) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"{type(self).__name__} needs kernel_size >= 1, stride >= 1 and padding >= 0, "
                             f"got kernel_size={kernel_size}, stride={stride}, padding={padding}")
        if self.padding[0] > self.kernel[0] // 2 or self.padding[1] > self.kernel[1] // 2:
            raise ValueError(f"{type(self).__name__}: padding {self.padding} must be at most half the kernel "
                             f"{self.kernel} (as in PyTorch), so that every window holds an input pixel")

    def __repr__(self) -> str:
        extra = "" if self.stride == self.kernel else f", stride={self.stride}"
        extra += "" if self.padding == (0, 0) else f", padding={self.padding}"
        return f"{type(self).__name__}(kernel_size={self.kernel}{extra})"

    def _out_hw(self, h, w):
        return (conv_output_size(h, self.kernel[0], self.stride[0], self.padding[0]),
                conv_output_size(w, self.kernel[1], self.stride[1], self.padding[1]))

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"{self!r} expects inputs of shape (N, C, H, W), got (N, {', '.join(map(str, input_shape))})")
        ho, wo = self._out_hw(*input_shape[1:])
        if ho < 1 or wo < 1:
            raise ValueError(f"{self!r} cannot pool a {input_shape[1]}x{input_shape[2]} input; use a smaller window")
        return (input_shape[0], ho, wo)

    def _geometry(self, x):
        check_nchw(self, x)
        ho, wo = self._out_hw(x.shape[2], x.shape[3])
        if ho < 1 or wo < 1:
            raise ValueError(f"{self!r} cannot pool a {x.shape[2]}x{x.shape[3]} input; use a smaller window")
        return ho, wo

    def _padded_shape(self, shape):
        n, c, h, w = shape
        return (n, c, h + 2 * self.padding[0], w + 2 * self.padding[1])

    def _crop(self, xpad):
        ph, pw = self.padding
        if ph or pw:
            return xpad[:, :, ph:xpad.shape[2] - ph, pw:xpad.shape[3] - pw]
        return xpad


class MaxPool2d(_Pool2d):
    """Max pooling with the arg-max chosen on REAL parts, the whole complex value carried through.

    ``y[n, c, h, w] = x_pad[n, c, s h + i*, s w + j*]`` with ``(i*, j*) = argmax_{i,j} Re x_pad[...]``
    (first maximum on ties; padding is -inf, PyTorch's convention). The index is fixed by the real
    point, so the complex step and the R-operator differentiate the current linear piece
    (docs/complex-step.md section 4.3). Computed by kh kw passes over strided views (no window copy);
    cache: the arg-max offset per output (int8) and the input shape.
    """

    def _index_dtype(self):
        return numpy.int8 if self.kernel[0] * self.kernel[1] <= 127 else numpy.int32

    def forward(self, params, x):
        # One pass per kernel offset over strided views (no window copy): keep the candidate
        # whose real part is strictly larger, so ties go to the first offset, as argmax does.
        xp = array_module(x)
        ho, wo = self._geometry(x)
        xpad = pad_nchw(x, self.padding, -numpy.inf)
        fast = cpu_kernels.maxpool_forward(xpad, self.kernel, self.stride, (*x.shape[:2], ho, wo), self._index_dtype())
        if fast is not None:  # the same selection in one pass (NumPy arrays)
            return fast[0], (fast[1], x.shape)
        branchless = xp is numpy and x.dtype.kind == "f"  # NumPy's masked copies mispredict a data-dependent mask
        best, idx = None, None
        for k, (_, _, sl) in enumerate(offset_slices(self.kernel, self.stride, (ho, wo))):
            cand = xpad[sl]
            if best is None:
                best = cand.copy()
                idx = xp.zeros(best.shape, dtype=self._index_dtype())
                continue
            better = cand.real > best.real
            if branchless:  # the same selection as the copies below, as word blends and integer arithmetic
                best = ops.select(better, cand, best)
                step = idx.dtype.type(k) - idx
                step *= better
                idx += step
                continue
            xp.copyto(best, cand, where=better)
            xp.copyto(idx, idx.dtype.type(k), where=better)  # not idx[better] = k: a boolean mask syncs on CuPy
        return best, (idx, x.shape)

    def _scatter(self, dy, cache):
        """Route each output gradient to its arg-max pixel (overlapping windows add up)."""
        xp = array_module(dy)
        idx, shape = cache
        ho, wo = dy.shape[2], dy.shape[3]
        dxpad = cpu_kernels.maxpool_route(dy, idx, self.kernel, self.stride, self._padded_shape(shape))
        if dxpad is not None:  # disjoint windows on NumPy: one pass
            return self._crop(dxpad)
        dxpad = xp.zeros(self._padded_shape(shape), dtype=dy.dtype)
        disjoint = self.stride[0] >= self.kernel[0] and self.stride[1] >= self.kernel[1]
        for k, (_, _, sl) in enumerate(offset_slices(self.kernel, self.stride, (ho, wo))):
            if disjoint and xp is numpy:  # each pixel is in one window: write the routed gradients in place
                dxpad[sl] = ops.where0(idx == k, dy)  # branchless on NumPy
            elif disjoint:
                xp.copyto(dxpad[sl], dy, where=idx == k)
            else:
                dxpad[sl] += ops.where0(idx == k, dy)
        return self._crop(dxpad)

    def backward(self, params, cache, dy, need_dx=True):
        return self._scatter(dy, cache), []

    def jvp(self, params, cache, rx, rparams):
        xp = array_module(rx)
        idx, _ = cache
        rxpad = pad_nchw(rx, self.padding)
        ry = None
        for k, (_, _, sl) in enumerate(offset_slices(self.kernel, self.stride, idx.shape[2:])):
            if ry is None:
                ry = rxpad[sl].copy()
            else:
                xp.copyto(ry, rxpad[sl], where=idx == k)
        return ry

    def backward_rop(self, params, cache, dy, rdy, rx, rparams, need_dx=True):
        return self._scatter(rdy, cache), []  # piecewise linear: no second-order term


class AvgPool2d(_Pool2d):
    """Average pooling, zero padding counted in the mean (PyTorch's count_include_pad=True).

    ``y[n, c, h, w] = (1 / (kh kw)) sum_{i,j} x_pad[n, c, s h + i, s w + j]``: a linear map, so
    ``jvp`` is the forward map of R{x} and ``backward_rop`` the backward map of R{dy}.
    """

    def _apply(self, x):
        xp = array_module(x)
        ho, wo = self._geometry(x)
        xpad = pad_nchw(x, self.padding)
        y = xp.zeros((x.shape[0], x.shape[1], ho, wo), dtype=x.dtype)
        for _, _, sl in offset_slices(self.kernel, self.stride, (ho, wo)):
            y += xpad[sl]
        y /= self.kernel[0] * self.kernel[1]
        return y

    def _adjoint(self, dy, shape):
        xp = array_module(dy)
        dxpad = xp.zeros(self._padded_shape(shape), dtype=dy.dtype)
        share = dy / (self.kernel[0] * self.kernel[1])
        for _, _, sl in offset_slices(self.kernel, self.stride, (dy.shape[2], dy.shape[3])):
            dxpad[sl] += share
        return self._crop(dxpad)

    def forward(self, params, x):
        return self._apply(x), x.shape

    def backward(self, params, cache, dy, need_dx=True):
        return self._adjoint(dy, cache), []

    def jvp(self, params, cache, rx, rparams):
        return self._apply(rx)

    def backward_rop(self, params, cache, dy, rdy, rx, rparams, need_dx=True):
        return self._adjoint(rdy, cache), []


class Upsample2d(Layer):
    """Nearest-neighbour upsampling by an integer factor (torch.nn.Upsample(mode="nearest")).

    ``y[n, c, h, w] = x[n, c, h // s_h, w // s_w]``: a linear map whose adjoint sums each
    s_h x s_w block. It lets an all-convolutional decoder grow the image back.
    """

    def __init__(self, scale_factor):
        self.scale = pair(scale_factor, "scale_factor")
        if min(self.scale) < 1:
            raise ValueError(f"Upsample2d needs a scale factor >= 1, got {scale_factor!r}")

    def __repr__(self) -> str:
        return f"Upsample2d(scale_factor={self.scale})"

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"{self!r} expects inputs of shape (N, C, H, W), got (N, {', '.join(map(str, input_shape))})")
        return (input_shape[0], input_shape[1] * self.scale[0], input_shape[2] * self.scale[1])

    def _apply(self, x):
        check_nchw(self, x)
        sh, sw = self.scale
        n, c, h, w = x.shape
        xp = array_module(x)
        y = xp.broadcast_to(x[:, :, :, None, :, None], (n, c, h, sh, w, sw))
        return y.reshape(n, c, h * sh, w * sw)

    def _adjoint(self, dy):
        sh, sw = self.scale
        n, c, hh, ww = dy.shape
        return dy.reshape(n, c, hh // sh, sh, ww // sw, sw).sum(axis=(3, 5))

    def forward(self, params, x):
        return self._apply(x), None

    def backward(self, params, cache, dy, need_dx=True):
        return self._adjoint(dy), []

    def jvp(self, params, cache, rx, rparams):
        return self._apply(rx)

    def backward_rop(self, params, cache, dy, rdy, rx, rparams, need_dx=True):
        return self._adjoint(rdy), []


class Flatten(Layer):
    """(N, C, H, W) (or any (N, ...)) -> (N, C H W), row-major as torch.nn.Flatten."""

    def output_shape(self, input_shape):
        return (math.prod(input_shape),)

    def forward(self, params, x):
        return x.reshape(x.shape[0], -1), x.shape[1:]

    def backward(self, params, cache, dy, need_dx=True):
        return dy.reshape(dy.shape[0], *cache), []

    def jvp(self, params, cache, rx, rparams):
        return rx.reshape(rx.shape[0], -1)

    def backward_rop(self, params, cache, dy, rdy, rx, rparams, need_dx=True):
        return rdy.reshape(rdy.shape[0], *cache), []


class Unflatten(Layer):
    """(N, prod(shape)) -> (N, *shape), e.g. flat 784-pixel MNIST rows to (N, 1, 28, 28) images."""

    def __init__(self, shape):
        self.shape = tuple(int(s) for s in shape)
        if not self.shape or min(self.shape) < 1:
            raise ValueError(f"Unflatten needs a non-empty shape of positive sizes, got {shape!r}")
        self.size = math.prod(self.shape)

    def __repr__(self) -> str:
        return f"Unflatten({self.shape})"

    def output_shape(self, input_shape):
        if math.prod(input_shape) != self.size:
            raise ValueError(f"{self!r} expects {self.size} values per example, got shape (N, {', '.join(map(str, input_shape))})")
        return self.shape

    def forward(self, params, x):
        if math.prod(x.shape[1:]) != self.size:
            raise ValueError(f"{self!r} expects {self.size} values per example, got an input of shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], *self.shape), x.shape[1:]

    def backward(self, params, cache, dy, need_dx=True):
        return dy.reshape(dy.shape[0], *cache), []

    def jvp(self, params, cache, rx, rparams):
        return rx.reshape(rx.shape[0], *self.shape)

    def backward_rop(self, params, cache, dy, rdy, rx, rparams, need_dx=True):
        return rdy.reshape(rdy.shape[0], *cache), []
