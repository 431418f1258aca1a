"""The convolutional layer on NCHW arrays, Conv2d (the pooling and reshaping layers are in :mod:`engine.spatial`
and re-exported here).

The pure-layer contract of :mod:`engine.layers` (forward/backward, the R-operator rules
``jvp``/``backward_rop``) with the Kronecker view of a :class:`engine.layers.KroneckerLayer`. Everything is written on
the array module of the operands, so one code path runs on NumPy and on CuPy (CuPy 14 has no
cuDNN, and cuDNN has no complex support anyway: docs/complex-step.md section 10).

Convolution is im2col plus one matrix multiply (GEMM). The patch matrix ``P`` of an input has one
row per (example n, output location t), ``N * L`` rows with ``L = H_out * W_out``, and
``K = C_in * kh * kw`` columns ordered (c, i, j), the order of ``W.reshape(C_out, K)``; it is read
from ``xp.lib.stride_tricks.sliding_window_view`` (a view) and materialised, transposed
(K x N L, which copies faster and keeps col2im's additions contiguous), by one reshape copy.

Memory. The layers cache the (padded) input, never the patch matrix: ``P`` is ``kh * kw`` times
larger than the input (25x for 5x5 kernels), so keeping it from the forward to the backward pass
of every conv layer would dominate the memory of a CNN. The price is one extra im2col copy in the
backward pass (and in ``jvp``/``backward_rop``/``kron_rows``), each freed as soon as its GEMM
is done. The input gradient is formed by col2im as ``kh * kw`` strided scatter-adds over kernel
offsets (one per (i, j), each covering every example, channel and location at once).

Complex-analytic: plain transposes everywhere, no conjugation.
"""

from __future__ import annotations

import math

from .backend import array_module
from .init import fan_in_uniform
from .layers import KroneckerLayer
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


class Conv2d(KroneckerLayer):
    """2-D convolution (cross-correlation, as torch.nn.Conv2d) on NCHW inputs, dilation 1.

    ``y[n, o, h, w] = b[o] + sum_{c, i, j} W[o, c, i, j] x_pad[n, c, s_h h + i, s_w w + j]``
    with W of shape (C_out, C_in, kh, kw) and b of shape (C_out,). Computed as the GEMM
    ``Y = P W_m^T + b`` with the patch matrix P (N L x K) and ``W_m = W.reshape(C_out, K)``.

    Backward (plain transposes, complex-analytic): ``dW_m = dY^T P``, ``db = sum_rows dY``,
    ``dP = dY W_m`` scattered back by col2im. Initialisation is PyTorch's Conv2d default,
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
    def _cols(self, xpad):
        """The transposed patch matrix P^T (K x N L) of a padded input: one im2col copy.

        Columns are ordered (n, h, w) and rows (c, i, j). This layout (rather than P itself) keeps
        the innermost copy loop running along image rows, and lets col2im add contiguous blocks.
        """
        v = _windows(xpad, self.kernel, self.stride)
        n, c, ho, wo, kh, kw = v.shape
        return v.transpose(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, n * ho * wo)

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

    def _cols_to_nchw(self, cols, n, ho, wo):
        """(C_out x N L) -> contiguous (N, C_out, H_out, W_out)."""
        xp = array_module(cols)
        return xp.ascontiguousarray(cols.reshape(self.c_out, n, ho, wo).transpose(1, 0, 2, 3))

    def _nchw_to_cols(self, y):
        """(N, C_out, H_out, W_out) -> (C_out x N L) (a copy)."""
        return y.transpose(1, 0, 2, 3).reshape(self.c_out, -1)

    def _col2im(self, dcols, xpad_shape, n, ho, wo):
        """Scatter-add patch gradients dP^T (K x N L) back onto the unpadded input (col2im).

        ``kh * kw`` strided additions, one per kernel offset (i, j): input pixel
        (s h + i, s w + j) receives dP[(n, h, w), (c, i, j)] from every window that covers it.
        """
        xp = array_module(dcols)
        kh, kw = self.kernel
        d6 = dcols.reshape(self.c_in, kh, kw, n, ho, wo)
        dxpad = xp.zeros(xpad_shape, dtype=dcols.dtype)
        dxpad_cn = dxpad.transpose(1, 0, 2, 3)  # (C, N, Hp, Wp) view, to match d6's block layout
        for i, j, sl in offset_slices(self.kernel, self.stride, (ho, wo)):
            dxpad_cn[sl] += d6[:, i, j]
        ph, pw = self.padding
        if ph or pw:
            dxpad = dxpad[:, :, ph:xpad_shape[2] - ph, pw:xpad_shape[3] - pw]
        return dxpad

    @staticmethod
    def _weight_grad(dy_cols, cols):
        """dW_m = dY^T P = (P^T dY)^T, computed as ``(cols @ dy_cols.T).T``.

        The same product as ``dy_cols @ cols.T``, but OpenBLAS runs a GEMM with few rows (C_out)
        and a long inner dimension (N L) up to 30x slower (measured: 1.1 s against 0.04 s for
        16 x 25088 x 288 on two cores), so the long side is put first.
        """
        return matmul(cols, dy_cols.T).T

    def _wmat(self, w):
        return w.reshape(self.c_out, -1)

    # --- passes ---------------------------------------------------------------------------
    # The cache is (P^T, padded input shape): the patch matrix made once by the forward pass is
    # the one every later product reads (weight gradient, R-operator, Kronecker rows), never rebuilt.
    def forward(self, params, x):
        w, b = params
        xpad = self._padded(x)
        n, ho, wo = self._geometry(xpad.shape)
        patches = self._cols(xpad)
        cols = matmul(self._wmat(w), patches)
        cols += b[:, None]
        return self._cols_to_nchw(cols, n, ho, wo), (patches, xpad.shape)

    def backward(self, params, cache, dy, need_dx=True):
        w, _ = params
        patches, pshape = cache
        n, ho, wo = self._geometry(pshape)
        dy_cols = self._nchw_to_cols(dy)
        dw = self._weight_grad(dy_cols, patches).reshape(w.shape)
        db = dy_cols.sum(axis=1)
        dx = self._col2im(matmul(self._wmat(w).T, dy_cols), pshape, n, ho, wo) if need_dx else None
        return dx, [dw, db]

    def input_gradient(self, params, cache, dy):
        """dL/dx alone (col2im of dY W_m): no weight-gradient GEMM.

        For passes that need only the back-propagated signal (K-BFGS's second pass, which reads
        pre-activation gradients only; ``Dense`` gets the same shortcut as ``dy @ W``).
        """
        w, _ = params
        _, pshape = cache
        n, ho, wo = self._geometry(pshape)
        return self._col2im(matmul(self._wmat(w).T, self._nchw_to_cols(dy)), pshape, n, ho, wo)

    def apply(self, params, x):
        w, b = params
        xpad = self._padded(x)
        n, ho, wo = self._geometry(xpad.shape)
        cols = matmul(self._wmat(w), self._cols(xpad))
        cols += b[:, None]
        return self._cols_to_nchw(cols, n, ho, wo)

    def jvp(self, params, cache, rx, rparams):
        # y = conv(x, W) + b  =>  R{y} = conv(x, R{W}) + R{b} + conv(R{x}, W)
        w, _ = params
        rw, rb = rparams
        patches, pshape = cache
        n, ho, wo = self._geometry(pshape)
        cols = self._wmat(rw) @ patches
        cols += rb[:, None]
        if rx is not None:
            cols += self._wmat(w) @ self._cols(self._padded(rx))
        return self._cols_to_nchw(cols, n, ho, wo)

    def backward_rop(self, params, cache, dy, rdy, rx, rparams, need_dx=True):
        # dW_m = dY^T P, db = sum dY, dP = dY W_m: differentiate each product.
        w, _ = params
        rw, _ = rparams
        patches, pshape = cache
        n, ho, wo = self._geometry(pshape)
        dy_cols = self._nchw_to_cols(dy)
        rdy_cols = self._nchw_to_cols(rdy)
        rdw = self._weight_grad(rdy_cols, patches)
        if rx is not None:
            rdw = rdw + self._weight_grad(dy_cols, self._cols(self._padded(rx)))
        rdb = rdy_cols.sum(axis=1)
        rdx = None
        if need_dx:
            rdp = self._wmat(w).T @ rdy_cols
            rdp += self._wmat(rw).T @ dy_cols
            rdx = self._col2im(rdp, pshape, n, ho, wo)
        return rdx, [rdw.reshape(w.shape), rdb]

    # --- Kronecker view -------------------------------------------------------------------
    def kron_rows(self, cache, y, dy):
        """(patches a, pre-activations z, sqrt(L) dL/dz) as (N L)-row matrices (see class doc).

        Rows are ordered (n, h, w) in all three; they are transposed views of (K or C_out) x N L
        arrays, which BLAS reads without a copy. ``dy=None`` (a forward-only pass, e.g. the warm
        start of A) gives ``g = None``, as ``Dense.kron_rows`` passes ``None`` through.
        """
        patches, pshape = cache
        _, ho, wo = self._geometry(pshape)
        g = None
        if dy is not None:
            g = self._nchw_to_cols(dy)
            g *= math.sqrt(ho * wo)
            g = g.T
        return patches.T, None if y is None else self._nchw_to_cols(y).T, g

    def input_rows(self, x):
        return self._cols(self._padded(x)).T

    def to_matrix(self, params):
        """The homogeneous matrix [W_m | b] (C_out x (K + 1)) of a parameter-shaped pair."""
        w, b = params
        xp = array_module(w, b)
        return xp.concatenate([self._wmat(w), b[:, None]], axis=1)

    def from_matrix(self, m):
        """Split a homogeneous (C_out x (K + 1)) matrix back into [W, b] (views of ``m``)."""
        return [m[:, : self.fan_in].reshape(self.c_out, self.c_in, *self.kernel), m[:, self.fan_in]]
