"""engine.model: the complex-step pass against independent high-precision references."""

import numpy
import pytest

from engine.backend import complex_dtype
from nets import mlp
from tests.reference import mp_dense_hessian, mp_gradient

LOSSES = ["sigmoid_xent", "half_mse", "softmax_xent"]


def tiny(act, loss, weight_decay=0.0):
    """3-4-3 MLP: 31 parameters, small enough for a 40-digit dense Hessian."""
    return mlp([3, 4, 3], [act, "linear"], loss, weight_decay=weight_decay)


def batch(model, xp, n=4, seed=0):
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((n, model.input_shape[0]))
    d_out = model.output_shape[0]
    y = rng.integers(0, d_out, size=n) if model.loss_fn.classification else rng.random((n, d_out))
    return xp.asarray(x), xp.asarray(y)


def cs_pass(model, params, x, y, v, h=1e-30):
    """(Re grad, Im grad / h) of one complex pass at w + i h v."""
    xp = type(params[0]).__module__.split(".")[0] == "cupy" and __import__("cupy") or numpy
    w = model.flatten(params)
    wc = w.astype(complex_dtype(w.dtype)) + (1j * h) * v.astype(complex_dtype(w.dtype))
    _, g = model.loss_and_grad(model.unflatten(wc), x, y)
    g = model.flatten(g)
    return g.real, g.imag / h


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ["tanh", "relu", "sigmoid"])
def test_real_part_of_complex_gradient_is_the_gradient(xp, act, loss):
    model = tiny(act, loss, weight_decay=1e-3)
    params = model.init(seed=1, xp=xp)
    x, y = batch(model, xp)
    _, g = model.loss_and_grad(params, x, y)
    g = model.flatten(g)
    v = xp.asarray(numpy.random.default_rng(2).standard_normal(model.n_params))
    re, _ = cs_pass(model, params, x, y, v)
    assert float(xp.linalg.norm(re - g) / xp.linalg.norm(g)) <= 1e-15


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_complex_step_hvp_matches_high_precision_dense_hessian(act, loss):
    model = tiny(act, loss, weight_decay=1e-2)
    params = model.init(seed=3)
    x, y = batch(model, numpy, seed=4)
    H = mp_dense_hessian(model, params, x, y)
    rng = numpy.random.default_rng(5)
    for _ in range(3):
        v = rng.standard_normal(model.n_params)
        _, hv = cs_pass(model, params, x, y, v)
        ref = H @ v
        assert numpy.linalg.norm(hv - ref) / numpy.linalg.norm(ref) <= 1e-12
    # and the gradient against 40-digit central differences
    _, g = model.loss_and_grad(params, x, y)
    gref = mp_gradient(model, params, x, y)
    assert numpy.linalg.norm(model.flatten(g) - gref) / numpy.linalg.norm(gref) <= 1e-13


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("loss", LOSSES)
def test_real_mode_has_no_complex_promotion(loss, dtype):
    model = tiny("sigmoid", loss, weight_decay=1e-5)
    params = model.init(seed=0, dtype=dtype)
    x, y = batch(model, numpy)
    x = x.astype(dtype)
    if not model.loss_fn.classification:
        y = y.astype(dtype)
    value, grads, caps = model.loss_and_grad(params, x, y, capture=True)
    assert value.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert all(c.a.dtype == dtype and c.g.dtype == dtype for c in caps)
    # complex partner dtype stays at the matching precision
    w = model.flatten(params)
    wc = w.astype(complex_dtype(dtype)) + numpy.asarray(1j * 1e-3, dtype=complex_dtype(dtype)) * w
    _, gc = model.loss_and_grad(model.unflatten(wc), x, y)
    assert all(g.dtype == complex_dtype(dtype) for g in gc)


def test_captures_are_the_kronecker_rows():
    model = tiny("tanh", "half_mse")
    params = model.init(seed=0)
    x, y = batch(model, numpy, n=5)
    _, _, caps = model.loss_and_grad(params, x, y, capture=True)
    assert [c.layer for c in caps] == model.kron_layers == [0, 2]
    # first layer: input is x, pre-activation is x W^T + b
    w, b = params[0], params[1]
    assert numpy.array_equal(caps[0].a, x)
    assert numpy.allclose(caps[0].z, x @ w.T + b)
    # g = N * dL/dz: for the output layer of half-MSE that is the residual
    out = model.predict(params, x)
    assert numpy.allclose(caps[1].g, out - y)


def test_flat_views_share_memory():
    model = tiny("tanh", "half_mse")
    params = model.init(seed=0)
    flat = model.flatten(params)
    views = model.unflatten(flat)
    views[0][0, 0] = 123.0
    assert flat[0] == 123.0
    with pytest.raises(ValueError, match="flat parameter vector"):
        model.unflatten(flat[:-1])


def test_init_is_seeded_and_weight_decay_is_reported():
    model = tiny("relu", "sigmoid_xent", weight_decay=1e-5)
    a, b = model.init(seed=7), model.init(seed=7)
    assert all(numpy.array_equal(p, q) for p, q in zip(a, b))
    x, y = batch(model, numpy)
    reg = model.loss(a, x, y)
    bare = model.loss(a, x, y, regularized=False)
    assert numpy.isclose(reg - bare, 0.5e-5 * sum((p * p).sum() for p in a), rtol=1e-12)


def test_input_shape_errors_are_clear():
    model = tiny("relu", "half_mse")
    params = model.init(seed=0)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(N, 3\)"):
        model.loss(params, numpy.zeros((2, 5)), numpy.zeros((2, 3)))
    with pytest.raises(ValueError, match="targets shaped like the output"):
        model.loss(params, numpy.zeros((2, 3)), numpy.zeros((2, 4)))
