"""The convolutional layer on NCHW arrays, Conv2d (the pooling and reshaping layers are in :mod:`engine.spatial`
and re-exported here).

The pure-layer contract of :mod:`engine.layers` (forward/backward, the R-operator rules
``jvp``/``backward_rop``) with the Kronecker view of a :class:`engine.layers.KroneckerLayer`. Everything is written on
the array module of the operands, so one code path runs on NumPy and on CuPy (CuPy 14 has no
cuDNN, and cuDNN has no complex support anyway: docs/complex-step.md section 10).

Convolution is im2col plus a batched matrix multiply (one GEMM per example). The patch matrix
of example n, ``P[n]``, is K x L with ``K = C_in * kh * kw`` rows ordered (c, i, j), the order of
``W.reshape(C_out, K)``, and ``L = H_out * W_out`` columns ordered (h, w); the N of them form one
(N, K, L) array, copied from the input's windows in one pass (:func:`engine.cpu_kernels.im2col` on
NumPy; a copy of the ``sliding_window_view`` elsewhere). ``W_m @ P[n]`` is then example n's output
in NCHW order as it stands (no transposing copy), and the backward products read the NCHW output
gradient as it stands: ``dW_m = sum_n dY[n] P[n]^T`` (per-example GEMMs summed over n) and
``dP[n] = W_m^T dY[n]``. Profiled on LeNet-5 (batch 128, float32, one thread) this layout beats the
single (K x N L) GEMM layout it replaced: its C_out-row products (6 x 25 x 100352: 1.7 ms as one
GEMM, 0.5 ms per example) and its transposes in and out cost more than the per-call overhead of
128 small GEMMs.

Memory. The patch matrix made by the forward pass is the cache (with the padded input's shape):
the weight gradient, the R-operator and the Kronecker rows read it instead of rebuilding it. It is
a :mod:`engine.workspace` buffer, reused by the next pass once the cache is dropped, as are the
layer output, dP and col2im's result on NumPy. The input gradient is formed by col2im, ``kh * kw``
strided scatter-adds over kernel offsets (one per (i, j), each covering every example, channel and
location at once; one compiled pass on NumPy with the same sums).

Complex-analytic: plain transposes everywhere, no conjugation.
"""

from __future__ import annotations

import math

import numpy

from .backend import array_module
from .init import fan_in_uniform
from .layers import KroneckerLayer
from . import cpu_kernels, workspace
from .products import matmul
from .spatial import (AvgPool2d, Flatten, MaxPool2d, Unflatten, Upsample2d, check_nchw, conv_output_size, offset_slices,
                      pad_nchw, pair)

__all__ = ["Conv2d", "MaxPool2d", "AvgPool2d", "Upsample2d", "Flatten", "Unflatten", "conv_output_size"]


def _windows(xpad, kernel: tuple[int, int], stride: tuple[int, int]):
    """View (N, C, H_out, W_out, kh, kw) of the kernel windows of a padded NCHW array (no copy)."""
    xp = array_module(xpad)
    v = xp.lib.stride_tricks.sliding_window_view(xpad, kernel, axis=(2, 3))
    sh, sw = stride
    if sh > 1 or sw > 1:
        v = v[:, :, ::sh, ::sw]
    return v


def _by_channel(a):
    """(N, C, ...) -> the (C x N prod(...)) matrix with columns ordered (n, ...): one copy."""
    return a.reshape(a.shape[0], a.shape[1], -1).transpose(1, 0, 2).reshape(a.shape[1], -1)


class Conv2d(KroneckerLayer):
    """2-D convolution (cross-correlation, as torch.nn.Conv2d) on NCHW inputs, dilation 1.

    ``y[n, o, h, w] = b[o] + sum_{c, i, j} W[o, c, i, j] x_pad[n, c, s_h h + i, s_w w + j]``
    with W of shape (C_out, C_in, kh, kw) and b of shape (C_out,). Computed as the GEMMs
    ``Y[n] = W_m P[n] + b`` with the per-example patch matrices P[n] (K x L) and ``W_m = W.reshape(C_out, K)``.

    Backward (plain transposes, complex-analytic): ``dW_m = sum_n dY[n] P[n]^T``, ``db = sum dY``,
    ``dP[n] = W_m^T dY[n]`` scattered back by col2im. Initialisation is PyTorch's Conv2d default,
    W, b ~ U(-1/sqrt(fan_in), +1/sqrt(fan_in)) with fan_in = C_in kh kw.

    Kronecker view (K-FAC for convolutions, "KFC": Grosse & Martens, ICML 2016): every
    (example, location) pair is a row. ``kron_rows`` returns

    * ``a`` = P (N L x K), the patches (the homogeneous 1 is appended by the statistics);
    * ``z`` = Y (N L x C_out), the pre-activations at every location;
    * ``g`` = sqrt(L) * dL/dY (N L x C_out); the Model multiplies it by N, so a row is
      ``sqrt(L) * Ds_{n,t}`` with ``Ds_{n,t} = d loss_n / d z_{n,t}`` the per-example gradient.

    With the generic statistics ``A = a~^T a~ / rows`` and ``G = g^T g / rows`` (rows = N L) this
    gives ``A = E_{n,t}[a~ a~^T]`` (averaged over examples and locations) and
    ``G = E_n[sum_t Ds_t Ds_t^T]`` (summed over locations), so that ``A (x) G`` equals KFC's
    ``Omega (x) Gamma = E_n[sum_t a~ a~^T] (x) E_n[sum_t Ds Ds^T] / |T|`` (KFC section 3.1, the
    spatially homogeneous, spatially uncorrelated approximation). The gradient itself is
    ``[dW_m | db] = g^T a~ / (N sqrt(L))`` in terms of the captured rows (mean loss).
    Per-layer factor for quasi-Newton pairs (K-BFGS for convolutions, KF-QN-CNN, Ren, Bahamou,
    Goldfarb, arXiv 2102.06737): the pre-activation-side pair that matches this G = L Gamma is
    ``s = mean_{n,t} dz`` and ``y = sum_t mean_n dDs_t = L mean_{n,t} dDs = sqrt(L) (g_mean
    difference)``, with ``L = z.shape[0] // batch_size`` (:attr:`kron_g_scale` names the
    convention, :meth:`locations` gives L from a capture).
    """

    spatial = True
    #: How ``kron_rows`` scales the pre-activation-gradient rows: by sqrt(number of locations).
    kron_g_scale = "sqrt_locations"

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding=0):
        self.c_in, self.c_out = int(c_in), int(c_out)
        self.kernel = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        if self.c_in < 1 or self.c_out < 1:
            raise ValueError(f"Conv2d needs positive channel counts, got c_in={c_in}, c_out={c_out}")
        if min(self.kernel) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"Conv2d needs kernel_size >= 1, stride >= 1 and padding >= 0, got "
                             f"kernel_size={kernel_size}, stride={stride}, padding={padding}")
        self.fan_in = self.c_in * self.kernel[0] * self.kernel[1]

    @property
    def d_in(self) -> int:
        """Width of the Kronecker view's input side: K = C_in kh kw (the homogeneous side is K + 1).

        Named as on :class:`engine.layers.Dense`, so solver code that sizes its factors as
        (d_in + 1)^2 and d_out^2 serves both layer kinds.
        """
        return self.fan_in

    @property
    def d_out(self) -> int:
        """Width of the Kronecker view's output side: C_out."""
        return self.c_out

    def __repr__(self) -> str:
        kh, kw = self.kernel
        extra = ""
        if self.stride != (1, 1):
            extra += f", stride={self.stride}"
        if self.padding != (0, 0):
            extra += f", padding={self.padding}"
        return f"Conv2d({self.c_in}, {self.c_out}, kernel_size=({kh}, {kw}){extra})"

    def param_shapes(self):
        return [(self.c_out, self.c_in, *self.kernel), (self.c_out,)]

    def init(self, rng, dtype):
        return fan_in_uniform(rng, (self.c_out, self.c_in, *self.kernel), self.fan_in, dtype)

    def _out_hw(self, h, w):
        return (conv_output_size(h, self.kernel[0], self.stride[0], self.padding[0]),
                conv_output_size(w, self.kernel[1], self.stride[1], self.padding[1]))

    def output_shape(self, input_shape):
        if len(input_shape) != 3 or input_shape[0] != self.c_in:
            raise ValueError(f"{self!r} expects inputs of shape (N, {self.c_in}, H, W), got (N, {', '.join(map(str, input_shape))})")
        ho, wo = self._out_hw(*input_shape[1:])
        if ho < 1 or wo < 1:
            raise ValueError(f"{self!r} cannot slide over a {input_shape[1]}x{input_shape[2]} input; use a smaller kernel or more padding")
        return (self.c_out, ho, wo)

    # --- im2col / col2im ------------------------------------------------------------------
    # The patch matrix is kept per example, P[n] (K x L): the forward pass is the batched GEMM
    # W_m @ P[n], which writes the output straight in NCHW order (no transposing copy), and the
    # backward products read dY[n] (C_out x L) as the NCHW array it is.
    def _cols(self, xpad):
        """The per-example patch matrices P (N x K x L) of a padded input: one im2col copy.

        Rows (c, i, j), columns (h, w): the innermost copy loop runs along image rows. The array is
        a :mod:`engine.workspace` buffer (the largest temporary of a CNN pass).
        """
        xp = array_module(xpad)
        v = _windows(xpad, self.kernel, self.stride)
        n, c, ho, wo, kh, kw = v.shape
        out = workspace.empty(xp, (n, c, kh, kw, ho, wo), xpad.dtype)
        if not cpu_kernels.im2col(xpad, out, self.stride):  # one compiled pass on NumPy
            out[...] = v.transpose(0, 1, 4, 5, 2, 3)
        return out.reshape(n, c * kh * kw, ho * wo)

    def _padded(self, x):
        check_nchw(self, x)
        if x.shape[1] != self.c_in:
            raise ValueError(f"{self!r} expects {self.c_in} input channels, got an input of shape {tuple(x.shape)}")
        return pad_nchw(x, self.padding)

    def _geometry(self, shape):
        """(N, H_out, W_out) of a padded input of ``shape``."""
        n, _, hp, wp = shape
        ho = (hp - self.kernel[0]) // self.stride[0] + 1
        wo = (wp - self.kernel[1]) // self.stride[1] + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"{self!r} cannot slide over a {hp - 2 * self.padding[0]}x{wp - 2 * self.padding[1]} input; "
                             "use a smaller kernel or more padding")
        return n, ho, wo

    def _rows(self, y):
        """(N, C_out, H_out, W_out) -> (N x C_out x L), the layout of ``W_m @ P`` (a view when contiguous)."""
        return y.reshape(y.shape[0], self.c_out, -1)

    def _conv(self, w, b, patches, ho, wo, rx_term=None):
        """NCHW output ``W_m @ P[n] + b`` (plus ``rx_term``'s ``W'_m @ P'[n]``, a (w', patches') pair)."""
        y = matmul(self._wmat(w), patches, out=self._scratch(patches, (patches.shape[0], self.c_out, ho * wo), w))
        y += b[:, None]
        if rx_term is not None:
            y += matmul(self._wmat(rx_term[0]), rx_term[1])
        xp = array_module(y)
        return xp.ascontiguousarray(y.reshape(patches.shape[0], self.c_out, ho, wo))  # complex @ real gives a view

    def _col2im(self, dpatches, xpad_shape, n, ho, wo):
        """Scatter-add patch gradients dP (N x K x L) back onto the unpadded input (col2im).

        ``kh * kw`` strided additions, one per kernel offset (i, j): input pixel
        (s h + i, s w + j) receives dP[n, (c, i, j), (h, w)] from every window that covers it.
        """
        xp = array_module(dpatches)
        kh, kw = self.kernel
        d6 = dpatches.reshape(n, self.c_in, kh, kw, ho, wo)
        dxpad = cpu_kernels.col2im(d6, xpad_shape, self.stride)  # one pass on NumPy, the same sums
        if dxpad is None:
            dxpad = xp.zeros(xpad_shape, dtype=dpatches.dtype)
            for i, j, sl in offset_slices(self.kernel, self.stride, (ho, wo)):
                dxpad[sl] += d6[:, :, i, j]
        ph, pw = self.padding
        if ph or pw:
            dxpad = dxpad[:, :, ph:xpad_shape[2] - ph, pw:xpad_shape[3] - pw]
        return dxpad

    @staticmethod
    def _weight_grad(dy_rows, patches):
        """dW_m = sum_n dY[n] P[n]^T, computed as ``sum_n (P[n] @ dY[n]^T)`` and transposed.

        The patch side (K rows) goes first: OpenBLAS runs a GEMM with few rows (C_out) and a long
        inner dimension markedly slower (16 x 25088 x 288: 1.1 s against 0.04 s on two cores).
        """
        out = Conv2d._scratch(patches, (patches.shape[0], patches.shape[1], dy_rows.shape[1]), dy_rows)
        return matmul(patches, dy_rows.swapaxes(1, 2), out=out).sum(axis=0).T

    @staticmethod
    def _scratch(a, shape, b):
        """A workspace buffer for the real product of ``a`` and ``b`` (None for a complex one)."""
        if a.dtype.kind == "c" or b.dtype.kind == "c":
            return None
        return workspace.empty(array_module(a, b), shape, numpy.result_type(a.dtype, b.dtype))

    def _input_grad(self, w, dy_rows, pshape, n, ho, wo):
        """col2im of W_m^T dY."""
        wt = self._wmat(w).T
        dp = matmul(wt, dy_rows, out=self._scratch(dy_rows, (n, self.fan_in, ho * wo), wt))
        return self._col2im(dp, pshape, n, ho, wo)

    def _wmat(self, w):
        return w.reshape(self.c_out, -1)

    # --- passes ---------------------------------------------------------------------------
    # The cache is (P, padded input shape): the patch matrix made once by the forward pass is
    # the one every later product reads (weight gradient, R-operator, Kronecker rows), never rebuilt.
    def forward(self, params, x):
        w, b = params
        xpad = self._padded(x)
        n, ho, wo = self._geometry(xpad.shape)
        patches = self._cols(xpad)
        return self._conv(w, b, patches, ho, wo), (patches, xpad.shape)

    def backward(self, params, cache, dy, need_dx=True):
        w, _ = params
        patches, pshape = cache
        n, ho, wo = self._geometry(pshape)
        dy_rows = self._rows(dy)
        dw = self._weight_grad(dy_rows, patches).reshape(w.shape)
        db = dy_rows.sum(axis=(0, 2))
        dx = self._input_grad(w, dy_rows, pshape, n, ho, wo) if need_dx else None
        return dx, [dw, db]

    def input_gradient(self, params, cache, dy):
        """dL/dx alone (col2im of W_m^T dY): no weight-gradient GEMM.

        For passes that need only the back-propagated signal (K-BFGS's second pass, which reads
        pre-activation gradients only; ``Dense`` gets the same shortcut as ``dy @ W``).
        """
        w, _ = params
        _, pshape = cache
        n, ho, wo = self._geometry(pshape)
        return self._input_grad(w, self._rows(dy), pshape, n, ho, wo)

    def apply(self, params, x):
        w, b = params
        xpad = self._padded(x)
        _, ho, wo = self._geometry(xpad.shape)
        return self._conv(w, b, self._cols(xpad), ho, wo)

    def jvp(self, params, cache, rx, rparams):
        # y = conv(x, W) + b  =>  R{y} = conv(x, R{W}) + R{b} + conv(R{x}, W)
        w, _ = params
        rw, rb = rparams
        patches, pshape = cache
        _, ho, wo = self._geometry(pshape)
        return self._conv(rw, rb, patches, ho, wo, None if rx is None else (w, self._cols(self._padded(rx))))

    def backward_rop(self, params, cache, dy, rdy, rx, rparams, need_dx=True):
        # dW_m = sum_n dY[n] P[n]^T, db = sum dY, dP = W_m^T dY: differentiate each product.
        w, _ = params
        rw, _ = rparams
        patches, pshape = cache
        n, ho, wo = self._geometry(pshape)
        dy_rows = self._rows(dy)
        rdy_rows = self._rows(rdy)
        rdw = self._weight_grad(rdy_rows, patches)
        if rx is not None:
            rdw = rdw + self._weight_grad(dy_rows, self._cols(self._padded(rx)))
        rdb = rdy_rows.sum(axis=(0, 2))
        rdx = None
        if need_dx:
            rdp = matmul(self._wmat(w).T, rdy_rows)
            rdp += matmul(self._wmat(rw).T, dy_rows)
            rdx = self._col2im(rdp, pshape, n, ho, wo)
        return rdx, [rdw.reshape(w.shape), rdb]

    # --- Kronecker view -------------------------------------------------------------------
    def kron_rows(self, cache, y, dy):
        """(patches a, pre-activations z, sqrt(L) dL/dz) as (N L)-row matrices (see class doc).

        Rows are ordered (n, h, w) in all three; they are transposed views of (K or C_out) x N L
        arrays (copies of the per-example layout), which BLAS reads without a further copy. ``dy=None`` (a forward-only pass, e.g. the warm
        start of A) gives ``g = None``, as ``Dense.kron_rows`` passes ``None`` through.
        """
        patches, pshape = cache
        _, ho, wo = self._geometry(pshape)
        g = None
        if dy is not None:
            g = _by_channel(dy)
            g *= math.sqrt(ho * wo)
            g = g.T
        return _by_channel(patches).T, None if y is None else _by_channel(y).T, g

    def input_rows(self, x):
        return _by_channel(self._cols(self._padded(x))).T

    def to_matrix(self, params):
        """The homogeneous matrix [W_m | b] (C_out x (K + 1)) of a parameter-shaped pair."""
        w, b = params
        xp = array_module(w, b)
        return xp.concatenate([self._wmat(w), b[:, None]], axis=1)

    def from_matrix(self, m):
        """Split a homogeneous (C_out x (K + 1)) matrix back into [W, b] (views of ``m``)."""
        return [m[:, : self.fan_in].reshape(self.c_out, self.c_in, *self.kernel), m[:, self.fan_in]]
