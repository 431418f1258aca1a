"""engine.model: the complex-step pass against independent high-precision references.

Every numeric test runs its body on NumPy and on CuPy (the ``xp`` fixture); the CuPy run is
compared with high-precision references kept on the host and with the NumPy run of the same body
(:func:`tests.reference.numpy_twin`).
"""

from functools import lru_cache

import numpy
import pytest

from engine.backend import array_module, complex_dtype, to_host
from nets import lenet, mlp
from tests.device_counts import device_work
from tests.solvers.common import to_np
from tests.engine.curvature.common import mp_hessian
from tests.reference import mp_gradient, numpy_twin

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
    """(Re grad, Im grad / h) of one complex pass at w + i h v (on the parameters' module)."""
    w = model.flatten(params)
    wc = w.astype(complex_dtype(w.dtype)) + (1j * h) * v.astype(complex_dtype(w.dtype))
    _, g = model.loss_and_grad(model.unflatten(wc), x, y)
    g = model.flatten(g)
    return g.real, g.imag / h


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ["tanh", "relu", "sigmoid"])
def test_real_part_of_complex_gradient_is_the_gradient(xp, act, loss):
    def run(m):
        model = tiny(act, loss, weight_decay=1e-3)
        params = model.init(seed=1, xp=m)
        x, y = batch(model, m)
        _, g = model.loss_and_grad(params, x, y)
        v = m.asarray(numpy.random.default_rng(2).standard_normal(model.n_params))
        re, hv = cs_pass(model, params, x, y, v)
        assert array_module(re, hv) is m
        return model.flatten(g), re, hv

    g, re, _ = numpy_twin(xp, run)
    assert numpy.linalg.norm(re - g) / numpy.linalg.norm(g) <= 1e-15


@lru_cache(maxsize=None)
def _mp_gradient(act, loss):
    model = tiny(act, loss, weight_decay=1e-2)
    params = model.init(seed=3, xp=numpy)
    x, y = batch(model, numpy, seed=4)
    return mp_gradient(model, params, x, y)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_complex_step_hvp_matches_high_precision_dense_hessian(xp, act, loss):
    # the problem of tests/engine/curvature/common.setup, whose 40-digit Hessian is cached there
    H = mp_hessian(act, loss)
    gref = _mp_gradient(act, loss)
    vs = numpy.random.default_rng(5).standard_normal((3, H.shape[0]))

    def run(m):
        model = tiny(act, loss, weight_decay=1e-2)
        params = model.init(seed=3, xp=m)
        x, y = batch(model, m, seed=4)
        hvs = [cs_pass(model, params, x, y, m.asarray(v))[1] for v in vs]
        _, g = model.loss_and_grad(params, x, y)
        return hvs, model.flatten(g)

    hvs, g = numpy_twin(xp, run)
    for v, hv in zip(vs, hvs):
        ref = H @ v
        assert numpy.linalg.norm(hv - ref) / numpy.linalg.norm(ref) <= 1e-12
    # and the gradient against 40-digit central differences
    assert numpy.linalg.norm(g - gref) / numpy.linalg.norm(gref) <= 1e-13


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("loss", LOSSES)
def test_real_mode_has_no_complex_promotion(xp, loss, dtype):
    def run(m):
        model = tiny("sigmoid", loss, weight_decay=1e-5)
        params = model.init(seed=0, dtype=dtype, xp=m)
        x, y = batch(model, m)
        x = x.astype(dtype)
        if not model.loss_fn.classification:
            y = y.astype(dtype)
        value, grads, caps = model.loss_and_grad(params, x, y, capture=True)
        assert value.dtype == dtype and all(g.dtype == dtype for g in grads)
        assert all(c.a.dtype == dtype and c.g.dtype == dtype for c in caps)
        # complex partner dtype stays at the matching precision
        w = model.flatten(params)
        wc = w.astype(complex_dtype(dtype)) + m.asarray(1j * 1e-3, dtype=complex_dtype(dtype)) * w
        _, gc = model.loss_and_grad(model.unflatten(wc), x, y)
        assert all(g.dtype == complex_dtype(dtype) for g in gc)
        return value, model.flatten(grads), model.flatten(gc)

    numpy_twin(xp, run, rtol=1e-13 if dtype == numpy.float64 else 1e-5)


def test_captures_are_the_kronecker_rows(xp):
    def run(m):
        model = tiny("tanh", "half_mse")
        params = model.init(seed=0, xp=m)
        x, y = batch(model, m, n=5)
        _, _, caps = model.loss_and_grad(params, x, y, capture=True)
        assert [c.layer for c in caps] == model.kron_layers == [0, 2]
        out = model.predict(params, x)
        return {"params": params, "x": x, "y": y, "out": out, "a": [c.a for c in caps], "z": [c.z for c in caps],
                "g": [c.g for c in caps]}

    r = numpy_twin(xp, run)
    # first layer: input is x, pre-activation is x W^T + b
    w, b = r["params"][0], r["params"][1]
    assert numpy.array_equal(r["a"][0], r["x"])
    assert numpy.allclose(r["z"][0], r["x"] @ w.T + b)
    # g = N * dL/dz: for the output layer of half-MSE that is the residual
    assert numpy.allclose(r["g"][1], r["out"] - r["y"])


def test_flat_views_share_memory(xp):
    model = tiny("tanh", "half_mse")
    params = model.init(seed=0, xp=xp)
    flat = model.flatten(params)
    assert array_module(flat) is xp
    views = model.unflatten(flat)
    views[0][0, 0] = 123.0
    assert to_host(flat)[0] == 123.0
    with pytest.raises(ValueError, match="flat parameter vector"):
        model.unflatten(flat[:-1])


def test_init_is_seeded_and_weight_decay_is_reported(xp):
    model = tiny("relu", "sigmoid_xent", weight_decay=1e-5)
    a, b = model.init(seed=7, xp=xp), model.init(seed=7, xp=xp)
    assert all(array_module(p) is xp for p in a)
    assert all(numpy.array_equal(to_host(p), to_host(q)) for p, q in zip(a, b))
    # drawn on the host: the same numbers on every module
    assert all(numpy.array_equal(to_host(p), q) for p, q in zip(a, model.init(seed=7, xp=numpy)))

    def run(m):
        params = model.init(seed=7, xp=m)
        x, y = batch(model, m)
        return model.loss(params, x, y), model.loss(params, x, y, regularized=False), model.sq_norm(params)

    reg, bare, sq = numpy_twin(xp, run)
    assert numpy.isclose(reg - bare, 0.5e-5 * sq, rtol=1e-12)
    assert numpy.isclose(sq, sum((p * p).sum() for p in model.init(seed=7, xp=numpy)), rtol=1e-15)


def test_input_shape_errors_are_clear(xp):
    model = tiny("relu", "half_mse")
    params = model.init(seed=0, xp=xp)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(N, 3\)"):
        model.loss(params, xp.zeros((2, 5)), xp.zeros((2, 3)))
    with pytest.raises(ValueError, match="targets shaped like the output"):
        model.loss(params, xp.zeros((2, 3)), xp.zeros((2, 4)))


def test_a_batch_on_the_other_side_of_the_parameters_is_refused_clearly(cupy_only):
    """Device parameters with a host batch (or the reverse) name the problem and the fix, instead
    of the library's "Unsupported type" / "Implicit conversion" from deep inside a layer."""
    cp = cupy_only
    model = tiny("tanh", "half_mse")
    x, y = batch(model, numpy)
    device_params = model.init(seed=0, xp=cp)
    with pytest.raises(TypeError, match="parameters are CuPy arrays but x is a NumPy array; move the batch with cupy.asarray"):
        model.loss_and_grad(device_params, x, cp.asarray(y))
    with pytest.raises(TypeError, match="parameters are CuPy arrays but y is a NumPy array"):
        model.loss(device_params, cp.asarray(x), y)
    with pytest.raises(TypeError, match="parameters are NumPy arrays but x is a CuPy array"):
        model.predict(model.init(seed=0, xp=numpy), cp.asarray(x))


def small_cnn():
    """LeNet on 12x12 images: Unflatten, Conv2d, ReLU, MaxPool2d, Flatten and Dense layers."""
    return lenet(image_shape=(1, 12, 12), channels=(2, 3), hidden=(5,), n_classes=3, weight_decay=1e-3)


NETS = {
    "mlp": lambda: mlp([6, 8, 5, 4], ["tanh", "relu", "linear"], "sigmoid_xent", weight_decay=1e-3),
    "cnn": small_cnn,
}


@pytest.mark.parametrize("net", sorted(NETS))
def test_passes_make_no_host_sync(xp, net):
    """A forward/backward pass, with captures or at complex parameters (the complex-step pass),
    asks nothing of the host: no sync, and no host array copied in."""
    model = NETS[net]()
    rng = numpy.random.default_rng(0)
    params = model.init(seed=1, xp=xp)
    n = 5
    x = xp.asarray(rng.random((n, model.input_shape[0])))
    d_out = model.output_shape[0]
    y = xp.asarray(rng.integers(0, d_out, n) if model.loss_fn.classification else rng.random((n, d_out)))
    w = model.flatten(params)
    wc = w.astype(complex_dtype(w.dtype))
    wc.imag = 1e-30 * xp.asarray(rng.standard_normal(model.n_params))
    complex_params = model.unflatten(wc)
    with device_work(xp, forbid_syncs=True) as work:
        model.loss_and_grad(params, x, y)
        model.loss_and_grad(params, x, y, capture=True)
        model.loss_and_grad(complex_params, x, y)
        model.loss(params, x, y)
    assert work.n_syncs == 0 and work.h2d == 0, str(work)


@pytest.mark.parametrize("net", sorted(NETS))
def test_cache_free_forward_sweeps_give_the_same_bits(xp, net, monkeypatch):
    """predict (layer.apply, no caches) and input_captures (the warm start's rows, stopping below the
    last Kronecker layer) against the caching forward pass, bit for bit; the last Kronecker
    layer's product is never computed by input_captures."""
    model = NETS[net]()
    rng = numpy.random.default_rng(4)
    params = model.init(seed=2, xp=xp)
    x = xp.asarray(rng.standard_normal((5, model.input_shape[0])))
    fwd = model.forward_pass(params, x, kron_outputs=True)
    same = lambda a, b: numpy.array_equal(to_host(a), to_host(b))  # noqa: E731
    assert same(model.predict(params, x), fwd.out)
    ref = model.forward_captures(fwd)
    top = model.layers[model.kron_layers[-1]]

    def refuse(*args):
        raise AssertionError("input_captures computed the last Kronecker layer's output")

    monkeypatch.setattr(top, "forward", refuse)
    monkeypatch.setattr(top, "apply", refuse)
    rows = model.input_captures(params, x)
    assert [c.layer for c in rows] == model.kron_layers and all(c.z is None and c.g is None for c in rows)
    assert all(same(c.a, r.a) for c, r in zip(rows, ref))


@pytest.mark.parametrize("net", sorted(NETS))
def test_one_reverse_sweep_serves_every_pass(xp, net):
    """Model.backward with its options against loss_and_grad: the gradient, the captures with and
    without parameter gradients (stopping at the first Kronecker layer), unscaled rows, the
    callback form, the deltas, and the forward-only rows; all bit for bit."""
    model = NETS[net]()
    rng = numpy.random.default_rng(3)
    params = model.init(seed=2, xp=xp)
    n = 6
    x = xp.asarray(rng.random((n, model.input_shape[0])))
    d_out = model.output_shape[0]
    y = xp.asarray(rng.integers(0, d_out, n) if model.loss_fn.classification else rng.random((n, d_out)))
    _, grads, caps = model.loss_and_grad(params, x, y, regularized=False, capture=True)
    fwd = model.forward_pass(params, x, kron_outputs=True)
    _, dout = model.loss_fn.value_and_grad(fwd.out, y)
    same = lambda a, b: numpy.array_equal(to_host(a), to_host(b))  # noqa: E731

    full = model.backward(params, fwd, dout, capture=True, keep_deltas=True)
    assert all(same(a, b) for a, b in zip(full.grads, grads))
    assert same(full.deltas[-1], dout) and full.deltas[model.first_param_layer] is not None
    cheap = model.backward(params, fwd, dout, param_grads=False, capture=True)
    assert cheap.grads is None and [c.layer for c in cheap.captures] == model.kron_layers
    for c, ref in zip(cheap.captures, caps):
        assert same(c.a, ref.a) and same(c.z, ref.z) and same(c.g, ref.g)
    seen = []
    raw = model.backward(params, fwd, dout, param_grads=False, capture=seen.append, per_example=False)
    assert raw.captures is None and [c.layer for c in seen] == model.kron_layers[::-1]
    for c, ref in zip(seen[::-1], caps):
        assert same(c.g * n, ref.g)
    rows = model.forward_captures(fwd)
    assert [c.layer for c in rows] == model.kron_layers and all(c.g is None for c in rows)
    assert all(same(c.a, ref.a) and same(c.z, ref.z) for c, ref in zip(rows, caps))
    top = model.kron_layers[-1]
    part = model.backward(params, fwd, dout, stop=top)
    assert all(g is None for g in part.grads[:model.layer_param_index[top]])
    assert all(same(a, b) for a, b in zip(part.grads[model.layer_param_index[top]:], grads[model.layer_param_index[top]:]))


def test_flat_buffer_recognises_the_views_of_one_vector(xp):
    """Parameters made by ``init``/``unflatten`` are views of one flat vector (found by address, no data
    touched); separate arrays are not; the gradients of ``loss_and_grad`` are views of one flat vector
    holding the weight decay, equal to the per-parameter formula."""
    model = mlp([4, 3, 2], ["tanh", "linear"], "half_mse", weight_decay=0.1)
    params = model.init(seed=0, dtype=numpy.float64, xp=xp)
    flat = model.flat_buffer(params)
    assert flat is not None and flat.shape == (model.n_params,)
    numpy.testing.assert_array_equal(to_np(flat), numpy.concatenate([to_np(p).ravel() for p in params]))
    copies = [p.copy() for p in params]
    assert model.flat_buffer(copies) is None
    assert model.flat_buffer(params[::-1]) is None
    rng = numpy.random.default_rng(1)
    x, y = xp.asarray(rng.standard_normal((5, 4))), xp.asarray(rng.standard_normal((5, 2)))
    loss, grads = model.loss_and_grad(params, x, y)
    assert model.flat_buffer(grads) is not None
    _, bare = model.loss_and_grad(copies, x, y, regularized=False)
    for g, b, p in zip(grads, bare, params):
        numpy.testing.assert_allclose(to_np(g), to_np(b) + 0.1 * to_np(p), rtol=1e-14, atol=1e-15)
    sq = sum(float((to_np(p) ** 2).sum()) for p in params)
    numpy.testing.assert_allclose(float(to_np(loss)), float(to_np(model.loss(params, x, y, regularized=False))) + 0.05 * sq,
                                  rtol=1e-13)
