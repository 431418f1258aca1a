"""Complex-safe elementwise operations, each with the derivative its backward pass uses.

Every function here is the analytic continuation of its real counterpart
(``docs/complex-step.md`` section 4): branches are decided on the real part and
the whole complex value is carried through, so a complex-step pass differentiates exactly.
Nothing here conjugates or takes a modulus, ``sign`` or ``maximum`` of a complex value. On real
input each function returns the ordinary real result, with the input's dtype.

**First-order forms inside a declared complex-step pass** (docs/complex-step.md section 5.3). Inside
:func:`engine.products.complex_step` with h <= eps (:func:`first_order`), a complex z = a + i b
has b = O(h), and the transcendental functions here (sigmoid, tanh, softplus, exp, log-softmax)
return the truncated Taylor expansion in the imaginary part, f(a) + i b f'(a), from REAL f(a)
and f'(a): the dropped terms are -f''(a) b^2 / 2 in the real part and -f'''(a) b^3 / 6 in the
imaginary part, relatively O(h^2) (1e-60 at h = 1e-30), below rounding exactly as the O(h^2) GEMM
term :mod:`engine.products` drops. Outside such a pass (gradient checks, the precision study's
large steps, a general complex input) the full complex functions run. The polynomial derivative
chains of backprop (``sigmoid_vjp``, ``tanh_vjp``) stay complex products: they are analytic and
already cheaper than the real-part split (NumPy's complex multiply is one vectorised pass).
"""

from __future__ import annotations

import numpy

from . import host_kernels, workspace
from .backend import array_module
from .fuse import fused
from .products import drops_second_order

__all__ = [
    "relu", "relu_grad", "relu_forward", "where0", "select", "sigmoid", "sigmoid_grad", "sigmoid_vjp", "tanh", "tanh_grad", "tanh_vjp",
    "softplus", "log1p", "abs_cs", "max0_cs", "logsumexp", "log_softmax", "softmax", "real_part", "add_scaled_",
    "first_order", "exp", "sigmoid_parts_formula",
]

def first_order(z) -> bool:
    """Whether ``z`` is complex inside a declared complex-step pass with h <= eps, where the
    functions here use their first-order forms f(a) + i b f'(a) (see the module docstring)."""
    return z.dtype.kind == "c" and drops_second_order(z.dtype)


def _first_order_formula(xp, f, df, zi):
    """f(a) + i b f'(a) from the real f(a), f'(a) and b = Im z (the truncated Taylor expansion)."""
    return f + 1j * (zi * df)


def sigmoid_parts_formula(xp, zr):
    """(e, sigmoid(a), sigmoid'(a)) of a REAL a with e = exp(-|a|): s = (1 or e)/(1 + e) and
    s' = e/(1 + e)^2, both to full relative precision in either tail (no 1 - s cancellation)."""
    e = xp.exp(-xp.abs(zr))
    q = 1 / (1 + e)
    return e, xp.where(zr >= 0, 1, e) * q, e * q * q


@fused
def _sigmoid_first_order(xp, zr, zi):
    _, s, ds = sigmoid_parts_formula(xp, zr)
    return _first_order_formula(xp, s, ds, zi)


@fused
def _tanh_first_order(xp, zr, zi):
    # tanh'(a) = sech^2 a = 4 e / (1 + e)^2 with e = exp(-2|a|): no 1 - t^2 cancellation in the tails
    e = xp.exp(-2 * xp.abs(zr))
    q = 1 / (1 + e)
    return _first_order_formula(xp, xp.tanh(zr), 4 * e * q * q, zi)


@fused
def _softplus_first_order(xp, zr, zi):
    e, s, _ = sigmoid_parts_formula(xp, zr)
    return _first_order_formula(xp, xp.where(zr >= 0, zr, 0) + xp.log1p(e), s, zi)


@fused
def _exp_first_order(xp, zr, zi):
    e = xp.exp(zr)
    return _first_order_formula(xp, e, e, zi)


def exp(z):
    """exp z; inside a complex-step pass the first-order e^a + i b e^a (module docstring)."""
    if first_order(z):
        return _exp_first_order(z.real, z.imag)
    return array_module(z).exp(z)


@fused
def add_scaled_(xp, y, x, a):
    """y <- y + a x in place (one kernel on a device; analytic: no conjugation)."""
    y += a * x


def real_part(z):
    """Re z as a view (``.real`` of a real array is the array itself)."""
    return z.real


def relu(z):
    """max(z, 0) with the branch taken on Re z: ``where(Re z > 0, z, 0)``."""
    xp = array_module(z)
    return xp.where(z.real > 0, z, 0)


@fused
def _relu_forward(xp, z, zr):
    mask = zr > 0
    return xp.where(mask, z, 0), mask


#: unsigned integers of each real itemsize, for the branchless masking on NumPy
_UINT = {2: numpy.uint16, 4: numpy.uint32, 8: numpy.uint64}


def _scratch(shape, dtype):
    """A host array for a masking result: a reused :mod:`engine.workspace` buffer for the image
    batches of a convolutional network (more than 2 axes), whose large per-pass temporaries
    otherwise cost fresh pages every pass (K-BFGS epoch on mnist-cnn: 21.6 and 22.3 s without, 19.9-21.0 s
    with); a fresh array for the matrices of dense networks, whose peak memory a pool of idle
    buffers would raise (K-FAC on the MNIST autoencoder: 606 MB, 618 MB pooled)."""
    return workspace.empty(numpy, shape, dtype) if len(shape) > 2 else numpy.empty(shape, dtype=dtype)


def _bitmask(mask, v):
    """where(mask, v, 0) on NumPy as a bitwise AND with all-ones/all-zeros words (the same bits:
    v where mask, +0 elsewhere, NaN and inf masked too), or None where it does not apply.

    NumPy's ``where`` branches per element, which a random ReLU mask mispredicts half the time
    (2.2 ms for 600k float32 against 0.2 ms here); CuPy keeps the fused ``where``.
    """
    if array_module(v) is not numpy or v.dtype.kind not in "fc" or mask.shape != v.shape:
        return None
    u = _UINT.get(v.real.dtype.itemsize)
    if u is None or (v.dtype.kind == "c" and not v.flags.c_contiguous):
        return None
    words = v.view(u).reshape(*v.shape, 2) if v.dtype.kind == "c" else v.view(u)[..., None]
    bits = _scratch(mask.shape, u)
    numpy.copyto(bits, mask)
    numpy.negative(bits, out=bits)  # True -> all ones (modular negation), False -> 0
    out = _scratch(v.shape, v.dtype)
    numpy.bitwise_and(words, bits[..., None], out=out.view(u).reshape(words.shape))
    return out


def select(mask, a, b):
    """where(mask, a, b) for arrays ``a``, ``b`` of one real dtype and shape (strided views allowed).

    On NumPy the words are blended branchlessly, ``b ^ ((a ^ b) & all-ones-or-zero)``, the same
    bits as ``where`` (see :func:`_bitmask`); complex or CuPy operands use ``where``.
    """
    xp = array_module(a, b)
    u = _UINT.get(a.dtype.itemsize)
    if xp is not numpy or a.dtype.kind not in "fiu" or a.dtype != b.dtype or a.shape != b.shape or u is None:
        return xp.where(mask, a, b)
    aw, bw = a.view(u), b.view(u)
    bits = mask.astype(u)
    numpy.negative(bits, out=bits)
    out = numpy.bitwise_xor(aw, bw)
    out &= bits
    out ^= bw
    return out.view(a.dtype)


def where0(mask, v):
    """where(mask, v, 0) for a boolean ``mask`` (branchless on NumPy): ReLU's backward and R-operator rules, max-pooling's routing."""
    out = host_kernels.where0(mask, v) if v.ndim <= 2 else None  # a dense batch: one pass; images: pooled blend
    if out is None:
        out = _bitmask(mask, v)
    return array_module(v).where(mask, v, 0) if out is None else out


def relu_forward(z):
    """(relu(z), relu_grad(z)) in one pass (one kernel on a device; branchless on NumPy)."""
    if array_module(z) is numpy:
        if z.ndim <= 2:  # a dense layer's batch: one pass into fresh arrays
            out = host_kernels.relu_forward(z)
            if out is not None:
                return out
        mask = numpy.greater(z.real, 0, out=_scratch(z.shape, bool))
        y = _bitmask(mask, z)
        if y is not None:
            return y, mask
    return _relu_forward(z, z.real)


def relu_grad(z):
    """d relu / dz as a boolean mask (Re z > 0); the kink at 0 gets derivative 0."""
    return z.real > 0


def max0_cs(z):
    """Complex-safe max(z, 0): the whole z where Re z > 0, else 0 (same as :func:`relu`)."""
    return relu(z)


def abs_cs_formula(xp, z, zr):
    """:func:`abs_cs` given Re z as ``zr`` (a formula for the fused kernels)."""
    return xp.where(zr < 0, -z, z)


def abs_cs(z):
    """Complex-safe |z| (Martins' complexify): -z where Re z < 0, else z. Not the modulus."""
    return abs_cs_formula(array_module(z), z, z.real)


def tanh(z):
    """tanh z (analytic; complex tanh stays finite at |Re z| = 1000); first-order inside a complex-step pass."""
    if first_order(z):
        return _tanh_first_order(z.real, z.imag)
    return array_module(z).tanh(z)


def tanh_grad(t):
    """d tanh/dz written in terms of the output t = tanh z: 1 - t^2."""
    return 1 - t * t


@fused
def tanh_vjp(xp, dy, t):
    """dy tanh'(z) = dy (1 - t^2) from the output t (one kernel on a device)."""
    return dy * tanh_grad(t)


def sigmoid(z):
    """Logistic sigmoid, stable and accurate for every real part.

    With e = exp(-|z|_cs) (Re <= 0, so it never overflows): 1/(1 + e) where Re z >= 0 and
    e/(1 + e) where Re z < 0. The textbook 1/(1 + exp(-z)) overflows to complex inf/inf = NaN
    at Re z = -1000 (docs/complex-step.md section 4.3), and 0.5 (1 + tanh(z/2)) is finite but loses
    all relative accuracy in the left tail (1 + tanh(-15) cancels); this form keeps full
    relative precision on both sides. Inside a complex-step pass: s(a) + i b s'(a) (module docstring).
    """
    if first_order(z):
        return _sigmoid_first_order(z.real, z.imag)
    return _sigmoid(z, z.real)


def sigmoid_formula(xp, z, zr):
    """:func:`sigmoid` given Re z as ``zr`` (a formula for the fused kernels)."""
    e = xp.exp(-abs_cs_formula(xp, z, zr))
    return xp.where(zr >= 0, 1, e) / (1 + e)


_sigmoid = fused(sigmoid_formula)


def sigmoid_grad(s):
    """d sigmoid/dz in terms of the output s: s (1 - s)."""
    return s * (1 - s)


@fused
def sigmoid_vjp(xp, dy, s):
    """dy sigmoid'(z) = dy s (1 - s) from the output s (one kernel on a device)."""
    return dy * sigmoid_grad(s)


def softplus_real_formula(xp, z):
    """:func:`softplus` of a REAL z (the library's log1p is exact there; a formula for the fused kernels)."""
    pos = z >= 0
    return xp.where(pos, z, 0) + xp.log1p(xp.exp(xp.where(pos, -z, z)))


def log1p(z):
    """log(1 + z), accurate for small |z| in real AND complex arithmetic (for Re z > -1).

    Real input goes to the library's ``log1p``. Complex input does not: CuPy computes complex
    ``log1p`` as ``log(1 + z)`` (and NumPy's loses the real part the same way), so for
    z = u + iv with |u| below eps the 1 + u rounds to 1 and Re log1p(z) comes out 0 instead of
    ~u. Writing 1 + z = (1 + u)(1 + i t) with t = v / (1 + u) splits the principal logarithm
    exactly into real functions of real arguments:

        log1p(z) = [log1p(u) + log1p(t^2) / 2] + i atan2(v, 1 + u)

    (|1 + z|^2 = (1 + u)^2 (1 + t^2), arg(1 + z) = atan2(v, 1 + u)). Each part keeps full
    relative precision: log1p(u) and log1p(t^2) are real log1p's, and atan2 of v against the
    rounded 1 + u errs by one rounding relative. It is the analytic log(1 + z) itself, not a
    first-order approximation, so a complex-step pass differentiates it exactly, and nothing is
    conjugated; with v = 0 the real part is log1p(u) bit for bit.
    """
    xp = array_module(z)
    if not xp.iscomplexobj(z):
        return xp.log1p(z)
    u, v = z.real, z.imag
    one_u = 1 + u
    t = v / one_u
    out = xp.empty_like(z)
    re = xp.log1p(u)
    re += 0.5 * xp.log1p(t * t)
    out.real[...] = re
    out.imag[...] = xp.arctan2(v, one_u)
    return out


def softplus(z):
    """log(1 + e^z) in the stable form max_cs(z, 0) + log1p(exp(-|z|_cs)).

    Both max and abs are the complex-safe versions that return the complex z, so the linear
    term keeps its derivative (writing max(Re z, 0) would drop it). They take the SAME branch,
    decided on Re z >= 0: z + log1p(e^-z) there, log1p(e^z) below, so at Re z = 0 exactly the
    derivative is sigmoid(0) = 1/2 (a max taken on Re z > 0 with an abs taken on Re z < 0 would
    mix the branches there and give -1/2). ``e = exp(-|z|_cs)`` has Re <= 0, so it never
    overflows, and its log1p is :func:`log1p`, which keeps full relative precision in complex
    mode too (for Re z = -40, e ~ 4e-18 and log(1 + e) would round to 0). Derivative:
    sigmoid(z).
    """
    xp = array_module(z)
    if not xp.iscomplexobj(z):
        return _softplus_real(z)
    if first_order(z):  # softplus(a) + i b sigmoid(a) (module docstring)
        return _softplus_first_order(z.real, z.imag)
    pos = z.real >= 0
    return xp.where(pos, z, 0) + log1p(xp.exp(xp.where(pos, -z, z)))


_softplus_real = fused(softplus_real_formula)


def logsumexp(z, axis=-1, keepdims=False):
    """log sum exp(z) along ``axis``, shifted by the max of the REAL parts.

    The shift m is real and constant in backprop; softmax is invariant to it, and since
    Re(z - m) <= 0 nothing overflows. Derivative: softmax(z). Inside a complex-step pass:
    lse(a) + i sum(softmax(a) b) (module docstring).
    """
    xp = array_module(z)
    if first_order(z):
        zr = z.real
        out = logsumexp(zr, axis=axis, keepdims=True)
        out = out + 1j * (xp.exp(zr - out) * z.imag).sum(axis=axis, keepdims=True)
        return out if keepdims else xp.squeeze(out, axis=axis)
    m = xp.max(z.real, axis=axis, keepdims=True)
    out = xp.log(xp.sum(xp.exp(z - m), axis=axis, keepdims=True)) + m
    return out if keepdims else xp.squeeze(out, axis=axis)


def log_softmax(z, axis=-1):
    """z - logsumexp(z) (complex-safe, stable)."""
    return z - logsumexp(z, axis=axis, keepdims=True)


def softmax(z, axis=-1):
    """exp(log_softmax(z)); never overflows."""
    return exp(log_softmax(z, axis=axis))
