"""engine.conv: forward against direct loops, backward against the complex step and central
differences, R-operator rules against the complex step of forward/backward, Kronecker rows
against KFC's definition from explicit patches, and a small CNN's Hessian against mpmath."""

from functools import lru_cache

import numpy
import pytest

from engine.backend import to_host
from engine.conv import AvgPool2d, Conv2d, Flatten, MaxPool2d, Unflatten, Upsample2d
from engine.curvature import GaussNewton, HessianCS, HessianRop, kron_factors
from engine.gradcheck import layer_directional_errors
from engine.layers import Dense, ReLU, Tanh
from engine.model import Model
from tests.engine.conv_reference import conv2d_loop, mp_cnn_dense_hessian, patches_loop, pool_loop
from tests.reference import numpy_twin

CONV_CASES = [
    (Conv2d(2, 3, 3), (2, 2, 6, 5)),
    (Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 7, 6)),
    (Conv2d(3, 2, (3, 2), stride=(1, 2), padding=(0, 1)), (2, 3, 5, 6)),
    (Conv2d(1, 4, 5, padding=2), (3, 1, 6, 6)),
]
POOL_CASES = [
    (MaxPool2d(2), (2, 3, 6, 5)),
    (MaxPool2d(3, stride=2, padding=1), (2, 2, 7, 7)),
    (MaxPool2d((2, 3), stride=1), (2, 2, 5, 6)),
    (AvgPool2d(2), (2, 3, 6, 5)),
    (AvgPool2d(3, stride=2, padding=1), (2, 2, 7, 6)),
]
OTHER_CASES = [(Upsample2d(2), (2, 3, 3, 4)), (Upsample2d((1, 3)), (2, 2, 2, 3)), (Flatten(), (2, 3, 4, 2)),
               (Unflatten((2, 3, 4)), (2, 24))]
ALL_CASES = CONV_CASES + POOL_CASES + OTHER_CASES


def _ids(cases):
    return [repr(layer) for layer, _ in cases]


def _params(layer, xp, rng, dtype=numpy.float64):
    return [xp.asarray(p) for p in layer.init(rng, dtype)]


def _relmax(a, b):
    a, b = to_host(a), to_host(b)
    return float(numpy.abs(a - b).max() / numpy.abs(b).max())


# --- forward against direct loops ------------------------------------------------------------

@pytest.mark.parametrize("layer,shape", CONV_CASES, ids=_ids(CONV_CASES))
def test_conv_forward_matches_direct_loop(xp, layer, shape):
    rng = numpy.random.default_rng(1)
    w, b = layer.init(rng, numpy.float64)
    x = rng.standard_normal(shape)
    y, _ = layer.forward([xp.asarray(w), xp.asarray(b)], xp.asarray(x))
    ref = conv2d_loop(x, w, b, layer.stride, layer.padding)
    assert y.shape == ref.shape == (shape[0], *layer.output_shape(shape[1:]))
    assert _relmax(y, ref) <= 1e-14


@pytest.mark.parametrize("layer,shape", POOL_CASES, ids=_ids(POOL_CASES))
def test_pool_forward_matches_direct_loop(xp, layer, shape):
    rng = numpy.random.default_rng(2)
    x = rng.standard_normal(shape)
    y, _ = layer.forward([], xp.asarray(x))
    kind = "max" if isinstance(layer, MaxPool2d) else "avg"
    ref = pool_loop(x, layer.kernel, layer.stride, layer.padding, kind)
    assert y.shape == ref.shape == (shape[0], *layer.output_shape(shape[1:]))
    assert _relmax(y, ref) <= 1e-15


def test_complex_conv_forward_matches_direct_loop(xp):
    # complex weights on real data: the complex-step pass; plain products, nothing conjugated
    layer = Conv2d(2, 2, 3, stride=2, padding=1)
    rng = numpy.random.default_rng(3)
    w = rng.standard_normal((2, 2, 3, 3)) + 1j * rng.standard_normal((2, 2, 3, 3))
    b = rng.standard_normal(2) + 1j * rng.standard_normal(2)
    x = rng.standard_normal((2, 2, 5, 6))
    y, _ = layer.forward([xp.asarray(w), xp.asarray(b)], xp.asarray(x))
    assert _relmax(y, conv2d_loop(x, w, b, layer.stride, layer.padding)) <= 1e-14


def test_maxpool_argmax_on_real_parts_carries_complex_value(xp):
    # Window 1: real parts 1, 3 (+1e-30j), 3 (+5j tie), 2. NumPy's complex max is lexicographic and
    # would pick 3+5j; the complex-safe rule keeps the first real maximum, imaginary part and all.
    x = numpy.array([[[[1 + 9j, 3 + 1e-30j], [3 + 5j, 2 - 7j]]]])
    y, _ = MaxPool2d(2).forward([], xp.asarray(x))
    assert complex(to_host(y)[0, 0, 0, 0]) == 3 + 1e-30j
    ref = pool_loop(x, (2, 2), (2, 2), (0, 0), "max")
    assert complex(ref[0, 0, 0, 0]) == 3 + 1e-30j


def test_upsample_and_reshapes_forward(xp):
    x = numpy.arange(12.0).reshape(1, 2, 2, 3)
    y, _ = Upsample2d((2, 1)).forward([], xp.asarray(x))
    assert numpy.array_equal(to_host(y), numpy.repeat(x, 2, axis=2))
    f, _ = Flatten().forward([], xp.asarray(x))
    assert numpy.array_equal(to_host(f), x.reshape(1, 12))
    u, _ = Unflatten((2, 2, 3)).forward([], f)
    assert numpy.array_equal(to_host(u), x)


# --- backward: complex step and central differences ---------------------------------------------

@pytest.mark.parametrize("layer,shape", ALL_CASES, ids=_ids(ALL_CASES))
def test_backward_against_complex_step_and_central_difference(xp, layer, shape):
    rng = numpy.random.default_rng(0)
    params = _params(layer, xp, rng)
    x = xp.asarray(rng.standard_normal(shape))
    err = layer_directional_errors(layer, params, x, seed=3)
    for key, value in err.items():
        tol = 1e-13 if key.startswith("cs") else 1e-7
        assert value <= tol, (key, value)


# --- R-operator rules -------------------------------------------------------------------------

@pytest.mark.parametrize("layer,shape", ALL_CASES, ids=_ids(ALL_CASES))
def test_r_operator_rules(xp, layer, shape):
    """jvp and backward_rop against the complex step of forward and backward (as test_layers)."""
    rng = numpy.random.default_rng(5)
    params = _params(layer, xp, rng)
    x = xp.asarray(rng.standard_normal(shape))
    rx = xp.asarray(rng.standard_normal(shape))
    rparams = [xp.asarray(rng.standard_normal(p.shape)) for p in params]
    y, cache = layer.forward(params, x)
    dy = xp.asarray(rng.standard_normal(y.shape))
    rdy = xp.asarray(rng.standard_normal(y.shape))
    h = 1e-30
    pc = [p + 1j * h * r for p, r in zip(params, rparams)]
    yc, cache_c = layer.forward(pc, x + 1j * h * rx)
    assert _relmax(layer.jvp(params, cache, rx, rparams), yc.imag / h) <= 1e-14
    dxc, dpc = layer.backward(pc, cache_c, dy + 1j * h * rdy)
    rdx, rdp = layer.backward_rop(params, cache, dy, rdy, rx, rparams)
    assert rdx.shape == x.shape
    assert _relmax(rdx, dxc.imag / h) <= 1e-14
    assert len(rdp) == len(params)
    for a, b, p in zip(rdp, dpc, params):
        assert a.shape == p.shape
        assert _relmax(a, b.imag / h) <= 1e-14


@pytest.mark.parametrize("layer,shape", CONV_CASES[:2], ids=_ids(CONV_CASES[:2]))
def test_conv_first_layer_r_operator_without_input_direction(xp, layer, shape):
    # rx = None (the data): R{y} = conv(x, R{W}) + R{b}, R{dW} = conv-adjoint of R{dy} only
    rng = numpy.random.default_rng(6)
    params = _params(layer, xp, rng)
    x = xp.asarray(rng.standard_normal(shape))
    rparams = [xp.asarray(rng.standard_normal(p.shape)) for p in params]
    y, cache = layer.forward(params, x)
    dy, rdy = (xp.asarray(rng.standard_normal(y.shape)) for _ in range(2))
    h = 1e-30
    pc = [p + 1j * h * r for p, r in zip(params, rparams)]
    yc, cache_c = layer.forward(pc, x)
    assert _relmax(layer.jvp(params, cache, None, rparams), yc.imag / h) <= 1e-14
    _, dpc = layer.backward(pc, cache_c, dy + 1j * h * rdy, need_dx=False)
    rdx, rdp = layer.backward_rop(params, cache, dy, rdy, None, rparams, need_dx=False)
    assert rdx is None
    for a, b in zip(rdp, dpc):
        assert _relmax(a, b.imag / h) <= 1e-14


# --- Kronecker view (KFC) ---------------------------------------------------------------------

def _kfc_model():
    conv = Conv2d(2, 3, (3, 2), stride=(2, 1), padding=1)  # 5x4 input -> 3x5 output, L = 15
    return Model([Unflatten((2, 5, 4)), conv, Tanh(), Flatten(), Dense(45, 3)], "softmax_xent",
                 input_shape=(40,), name="kfc-test")


def test_conv_kronecker_statistics_match_kfc_definition(xp):
    """A = E_{n,t}[a~ a~^T] over explicit patches; G = E_n[sum_t Ds_t Ds_t^T] (Grosse & Martens 2016).

    Ds_{n,t} = d loss_n / d z_{n,t} is measured by the complex step of the per-example loss of the
    layers above the convolution, one pre-activation entry at a time: no engine backward pass.
    """
    model = _kfc_model()
    conv = model.layers[1]
    rng = numpy.random.default_rng(7)
    params = model.init(seed=2, xp=xp)
    n = 3
    x_host = rng.standard_normal((n, 40))
    y_host = rng.integers(0, 3, n)
    x, y = xp.asarray(x_host), xp.asarray(y_host)
    _, grads, captures = model.loss_and_grad(params, x, y, regularized=False, capture=True)
    assert [c.layer for c in captures] == [1, 4]
    stats = kron_factors(captures)[0]

    image = x_host.reshape(n, 2, 5, 4)
    a = numpy.concatenate([patches_loop(image, conv.kernel, conv.stride, conv.padding), numpy.ones((n * 15, 1))], axis=1)
    A_ref = sum(numpy.outer(row, row) for row in a) / (n * 15)
    assert _relmax(stats.A, A_ref) <= 1e-14
    assert _relmax(stats.a_mean, a.mean(axis=0)) <= 1e-14

    w, b = (to_host(p) for p in model.layer_params(params, 1))
    z = conv2d_loop(image, w, b, conv.stride, conv.padding)  # (n, 3, 3, 5)
    upper = Model(model.layers[2:], "softmax_xent")
    upper_params = [p.astype(numpy.complex128) for p in params[2:]]
    ds = numpy.zeros_like(z)
    h = 1e-30
    for idx in numpy.ndindex(*z.shape):
        zc = z.astype(numpy.complex128)
        zc[idx] += 1j * h
        out = upper.predict(upper_params, xp.asarray(zc))
        ds[idx] = to_host(upper.loss_fn.per_example(out, y)).imag[idx[0]] / h
    rows = ds.transpose(0, 2, 3, 1).reshape(n, 15, 3)  # (n, t, o)
    G_ref = sum(numpy.outer(r, r) for e in range(n) for r in rows[e]) / n
    assert _relmax(stats.G, G_ref) <= 1e-12
    assert _relmax(stats.g_mean, numpy.sqrt(15) * rows.mean(axis=(0, 1))) <= 1e-12
    assert _relmax(stats.z_mean, z.transpose(0, 2, 3, 1).reshape(-1, 3).mean(axis=0)) <= 1e-14

    # the rows are aligned: [dW_m | db] = g^T a~ / (N sqrt(L)) is the gradient of the mean loss
    c = captures[0]
    m = to_host(c.g).T @ a / (n * numpy.sqrt(15))
    assert _relmax(conv.to_matrix([to_host(g) for g in grads[:2]]), m) <= 1e-13
    assert _relmax(m, numpy.einsum("eto,etk->ok", rows, a.reshape(n, 15, -1)) / n) <= 1e-13


@pytest.mark.parametrize("layer,shape", CONV_CASES, ids=_ids(CONV_CASES))
def test_conv_input_gradient_is_backward_dx(xp, layer, shape):
    rng = numpy.random.default_rng(8)
    params = _params(layer, xp, rng)
    y, cache = layer.forward(params, xp.asarray(rng.standard_normal(shape)))
    dy = xp.asarray(rng.standard_normal(y.shape))
    dx, _ = layer.backward(params, cache, dy)
    assert _relmax(layer.input_gradient(params, cache, dy), dx) == 0.0


def test_conv_homogeneous_view_roundtrip(xp):
    layer = Conv2d(2, 3, (3, 2))
    w, b = _params(layer, xp, numpy.random.default_rng(0))
    m = layer.to_matrix([w, b])
    assert m.shape == (3, 2 * 3 * 2 + 1) == (layer.d_out, layer.d_in + 1)
    assert numpy.array_equal(to_host(m[:, :-1]), to_host(w).reshape(3, -1))
    w2, b2 = layer.from_matrix(m)
    assert w2.shape == w.shape and numpy.array_equal(to_host(w2), to_host(w)) and numpy.array_equal(to_host(b2), to_host(b))


# --- a small CNN's Hessian against mpmath --------------------------------------------------------

def _small_cnn(kind):
    if kind == "max":  # 47 parameters: conv 1->2 3x3, tanh, max-pool 2 stride 1, dense 8->3
        layers = [Unflatten((1, 5, 5)), Conv2d(1, 2, 3), Tanh(), MaxPool2d(2, stride=1), Flatten(), Dense(8, 3)]
    else:  # 25 parameters: strided, padded conv 1->1, relu, average pool 2 stride 1, dense 4->3
        layers = [Unflatten((1, 5, 5)), Conv2d(1, 1, 3, stride=2, padding=1), ReLU(), AvgPool2d(2, stride=1), Flatten(), Dense(4, 3)]
    return Model(layers, "softmax_xent", weight_decay=1e-2, input_shape=(25,), name=f"small-cnn-{kind}")


def _small_problem(kind, xp):
    model = _small_cnn(kind)
    params = model.init(seed=3, xp=xp)
    rng = numpy.random.default_rng(4)
    x = rng.standard_normal((2, 25))
    y = rng.integers(0, 3, 2)
    return model, params, xp.asarray(x), xp.asarray(y)


@lru_cache(maxsize=None)
def _mp_hessian(kind):
    model, params, x, y = _small_problem(kind, numpy)
    return mp_cnn_dense_hessian(model, params, x, y)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_small_cnn_hessian_against_mpmath(xp, kind):
    def run(m):
        model, params, x, y = _small_problem(kind, m)
        return HessianCS(model, params, x, y).dense(), HessianRop(model, params, x, y).dense()

    H_ref = _mp_hessian(kind)
    H_cs, H_rop = numpy_twin(xp, run)  # the CuPy run is also the NumPy run
    assert numpy.abs(H_ref).max() > 1e-3  # a non-trivial reference
    assert _relmax(H_cs, H_ref) <= 1e-12
    assert _relmax(H_rop, H_ref) <= 1e-12
    assert _relmax(H_cs, H_rop) <= 1e-13


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_small_cnn_gauss_newton_against_complex_step_jacobian(xp, kind):
    """G = sum_n J_n^T H_n J_n / N + tau I, with J from the complex step of the network output."""
    model, params, x, y = _small_problem(kind, xp)
    flat = to_host(model.flatten(params))
    h = 1e-30
    J = numpy.zeros((2, 3, model.n_params))
    for k in range(model.n_params):
        wc = flat.astype(numpy.complex128)
        wc[k] += 1j * h
        J[:, :, k] = to_host(model.predict(model.unflatten(xp.asarray(wc)), x)).imag / h
    out = to_host(model.predict(params, x))
    G_ref = model.weight_decay * numpy.eye(model.n_params)
    for n in range(2):
        p = numpy.exp(out[n] - out[n].max())
        p /= p.sum()
        G_ref += J[n].T @ (numpy.diag(p) - numpy.outer(p, p)) @ J[n] / 2
    assert _relmax(GaussNewton(model, params, x, y).dense(), G_ref) <= 1e-13


# --- errors, dtypes, initialisation -----------------------------------------------------------

def test_conv_init_matches_pytorch_default():
    layer = Conv2d(16, 32, 5)
    w, b = layer.init(numpy.random.default_rng(0), numpy.float64)
    bound = 1 / numpy.sqrt(16 * 25)
    assert w.shape == (32, 16, 5, 5) and b.shape == (32,)
    assert abs(w).max() <= bound and abs(b).max() <= bound
    assert abs(w.std() - bound / numpy.sqrt(3)) < 0.02 * bound


def test_bad_shapes_are_clear():
    with pytest.raises(ValueError, match="positive channel counts"):
        Conv2d(0, 3, 3)
    with pytest.raises(ValueError, match="kernel_size >= 1"):
        Conv2d(1, 3, 0)
    with pytest.raises(ValueError, match="expects inputs of shape"):
        Conv2d(2, 3, 3).output_shape((3, 8, 8))
    with pytest.raises(ValueError, match="cannot slide"):
        Conv2d(1, 3, 5).output_shape((1, 3, 3))
    with pytest.raises(ValueError, match="Unflatten"):
        Conv2d(1, 3, 3).forward(Conv2d(1, 3, 3).init(numpy.random.default_rng(0), numpy.float64), numpy.zeros((2, 9)))
    with pytest.raises(ValueError, match="input channels"):
        Conv2d(2, 3, 3).forward(Conv2d(2, 3, 3).init(numpy.random.default_rng(0), numpy.float64), numpy.zeros((2, 1, 5, 5)))
    with pytest.raises(ValueError, match="at most half the kernel"):
        MaxPool2d(2, padding=2)
    with pytest.raises(ValueError, match="expects 24 values"):
        Unflatten((2, 3, 4)).output_shape((25,))
    with pytest.raises(ValueError, match="expects inputs of shape"):
        Model([Conv2d(1, 2, 3)], "half_mse", input_shape=(9,))


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_real_mode_dtype_preserved(dtype):
    rng = numpy.random.default_rng(0)
    for layer, shape in ALL_CASES:
        params = layer.init(rng, dtype)
        x = rng.standard_normal(shape).astype(dtype)
        y, cache = layer.forward(params, x)
        dx, dp = layer.backward(params, cache, y)
        assert y.dtype == dtype and dx.dtype == dtype and all(d.dtype == dtype for d in dp), repr(layer)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("kernel,stride", [(2, 2), (3, 2)])
def test_maxpool_ties_and_nan_take_the_first_maximum(xp, dtype, kernel, stride):
    """Against a direct loop: the first strictly-larger candidate wins (tied zeros after a ReLU,
    tied values, a NaN that starts a window stays, a later NaN never wins), and the backward pass
    routes each gradient to that pixel (the branchless NumPy path and CuPy's masked copies alike)."""
    rng = numpy.random.default_rng(9)
    x = numpy.maximum(rng.standard_normal((2, 3, 7, 8)), 0).astype(dtype)
    x[1, 2, 2:5, 2:5] = 1.5
    x[0, 0, 0, 0] = x[0, 1, 1, 1] = numpy.nan
    layer = MaxPool2d(kernel, stride)
    y, cache = layer.forward([], xp.asarray(x))
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = to_host(layer.backward([], cache, xp.asarray(dy))[0])
    ref, dref = numpy.empty(y.shape, dtype), numpy.zeros(x.shape, dtype)
    for n, c, h, w in numpy.ndindex(*y.shape):
        (bi, bj), bv = (0, 0), x[n, c, h * stride, w * stride]
        for i, j in numpy.ndindex(kernel, kernel):
            if x[n, c, h * stride + i, w * stride + j] > bv:
                (bi, bj), bv = (i, j), x[n, c, h * stride + i, w * stride + j]
        ref[n, c, h, w] = bv
        dref[n, c, h * stride + bi, w * stride + bj] += dy[n, c, h, w]
    assert to_host(y).dtype == dtype and to_host(y).tobytes() == ref.tobytes()
    numpy.testing.assert_allclose(dx, dref, rtol=4 * numpy.finfo(dtype).eps, atol=0)
