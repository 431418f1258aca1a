"""engine.curvature.hessian: complex-step, finite-difference and R-operator products against
a 40-digit dense Hessian (tests/reference.py), and against each other."""

import math

import numpy
import pytest
import scipy.sparse.linalg

import nets
from engine.backend import array_module, to_host
from engine.curvature import DEFAULT_CS_STEP, EmpiricalFisher, GaussNewton, HessianCS, HessianFD, HessianRop
from engine.layers import Dense, Tanh
from engine.model import Model
from tests.device_counts import device_work
from tests.reference import numpy_twin

from .common import ACTS, LOSSES, mp_hessian, rel, setup


def directions(model, xp, k=3, seed=5):
    rng = numpy.random.default_rng(seed)
    return [xp.asarray(rng.standard_normal(model.n_params)) for _ in range(k)]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTS)
def test_cs_and_rop_match_high_precision_hessian(xp, act, loss):
    H = mp_hessian(act, loss)

    def run(m):
        model, params, x, y = setup(act, loss, m)
        cs, rop = HessianCS(model, params, x, y), HessianRop(model, params, x, y)
        assert cs.xp is rop.xp is m
        products = [(cs.matvec(v), rop.matvec(v)) for v in directions(model, m)]
        return [to_host(v) for v in directions(model, m)], products, cs.dense(), rop.dense()

    vs, products, cs_dense, rop_dense = numpy_twin(xp, run)  # the CuPy run is the NumPy run
    for v, (hv_cs, hv_rop) in zip(vs, products):
        ref = H @ v
        assert hv_cs.dtype == hv_rop.dtype == numpy.float64
        assert rel(hv_cs, ref) <= 1e-12
        assert rel(hv_rop, ref) <= 1e-12
        assert rel(hv_cs, hv_rop) <= 1e-13
    assert rel(rop_dense, H) <= 1e-12
    assert rel(cs_dense, H) <= 1e-12


@pytest.mark.parametrize("act", ACTS)
def test_cs_is_invariant_to_the_step(xp, act):
    model, params, x, y = setup(act, "softmax_xent", xp)
    v = directions(model, xp, 1)[0]
    base = HessianCS(model, params, x, y).matvec(v)
    assert HessianCS(model, params, x, y).h == 1e-30
    for h in (1e-8, 1e-20, 1e-100, 1e-200, 1e-300):
        assert rel(HessianCS(model, params, x, y, h=h).matvec(v), base) <= 1e-13, h


@pytest.mark.parametrize("loss", LOSSES)
def test_cs_normalisation_handles_extreme_directions(xp, loss):
    """Components spanning 1e-200 .. 1e+50, and uniformly tiny or huge directions."""
    act = "tanh"
    model, params, x, y = setup(act, loss, xp)
    H = mp_hessian(act, loss)
    rng = numpy.random.default_rng(7)
    wide = rng.choice([-1.0, 1.0], model.n_params) * 10.0 ** rng.uniform(-200, 50, model.n_params)
    wide[:2] = [1e-200, 1e50]
    cs, rop = HessianCS(model, params, x, y), HessianRop(model, params, x, y)
    for v in (wide, 1e-290 * rng.standard_normal(model.n_params), 1e300 * rng.standard_normal(model.n_params)):
        ref = H @ v
        assert rel(cs.matvec(xp.asarray(v)), ref) <= 1e-12
        assert rel(rop.matvec(xp.asarray(v)), ref) <= 1e-12
    zero = cs.matvec(xp.zeros(model.n_params))
    assert float(abs(zero).max()) == 0.0


@pytest.mark.parametrize("op_class", [HessianCS, HessianRop])
@pytest.mark.parametrize("act", ACTS)
def test_symmetry_and_linearity(xp, op_class, act):
    model, params, x, y = setup(act, "sigmoid_xent", xp)
    op = op_class(model, params, x, y)
    u, v, w = directions(model, xp, 3, seed=11)
    # exactly rounded dot products (fsum), so what is measured is the operator's asymmetry
    uHv = math.fsum(to_host(u) * to_host(op.matvec(v)))
    vHu = math.fsum(to_host(v) * to_host(op.matvec(u)))
    assert abs(uHv - vHu) <= 1e-14 * abs(uHv)
    a, b = 2.5, -0.75
    lhs = op.matvec(a * u + b * w)
    assert rel(lhs, a * op.matvec(u) + b * op.matvec(w)) <= 1e-13


@pytest.mark.parametrize("loss", LOSSES)
def test_cs_returns_the_gradient_from_the_same_pass(xp, loss):
    model, params, x, y = setup("tanh", loss, xp)
    _, g = model.loss_and_grad(params, x, y)
    g = model.flatten(g)
    v = directions(model, xp, 1)[0]
    hv, g_cs = HessianCS(model, params, x, y).matvec_and_grad(v)
    assert g_cs.dtype == numpy.float64 and g_cs.flags.c_contiguous
    assert rel(g_cs, g) <= 1e-15
    assert rel(hv, mp_hessian("tanh", loss) @ to_host(v)) <= 1e-12
    # the other operators hand out the same gradient through the same call
    for op in (HessianRop(model, params, x, y), HessianFD(model, params, x, y, scheme="forward"), HessianFD(model, params, x, y)):
        hv_op, g_op = op.matvec_and_grad(v)
        assert rel(g_op, g) <= 1e-15
        assert rel(hv_op, hv) <= 1e-7


def test_unregularized_products_drop_tau(xp):
    model, params, x, y = setup("tanh", "half_mse", xp)
    v = directions(model, xp, 1)[0]
    for cls in (HessianCS, HessianRop, HessianFD):
        reg = cls(model, params, x, y).matvec(v)
        bare = cls(model, params, x, y, regularized=False).matvec(v)
        assert rel(reg - bare, model.weight_decay * v) <= (1e-6 if cls is HessianFD else 1e-12)


class _CountingModel:
    """Wraps a model and counts gradient passes (to check the cost of the FD schemes)."""

    def __init__(self, model):
        self._model, self.calls = model, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def loss_and_grad(self, *a, **k):
        self.calls += 1
        return self._model.loss_and_grad(*a, **k)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTS)
def test_fd_default_steps_reach_the_classical_accuracy(xp, act, loss):
    model, params, x, y = setup(act, loss, xp)
    H = mp_hessian(act, loss)
    central, forward = HessianFD(model, params, x, y), HessianFD(model, params, x, y, scheme="forward")
    assert 1e-6 < central.h < 1e-4 and 1e-8 < forward.h < 1e-7
    for v in directions(model, xp, 2):
        ref = H @ to_host(v)
        assert rel(central.matvec(v), ref) <= 1e-9
        assert rel(forward.matvec(v), ref) <= 1e-7


def test_fd_cost_is_one_or_two_gradients(xp):
    model, params, x, y = setup("tanh", "softmax_xent", xp)
    counted = _CountingModel(model)
    fwd = HessianFD(counted, params, x, y, scheme="forward")
    assert counted.calls == 1  # g(w), cached at construction
    v = directions(model, xp, 1)[0]
    fwd.matvec(v), fwd.matvec(2 * v)
    assert counted.calls == 3
    counted.calls = 0
    ctr = HessianFD(counted, params, x, y, scheme="central")
    ctr.matvec(v)
    assert counted.calls == 2
    counted.calls = 0
    HessianCS(counted, params, x, y).matvec_and_grad(v)
    assert counted.calls == 1


def test_float32_models_use_complex64_with_their_default_step(xp):
    """float32 products against the float64 R-operator, flat for h from 1e-4 down to 1e-20."""
    model, params, x, y = setup("tanh", "sigmoid_xent", xp)
    p32 = [p.astype(numpy.float32) for p in params]
    v = directions(model, xp, 1)[0]
    ref = HessianRop(model, params, x, y).matvec(v)
    cs = HessianCS(model, p32, x, y)
    assert cs.h == DEFAULT_CS_STEP[numpy.dtype(numpy.float32)] and cs.complex_dtype == numpy.complex64
    hv, g = cs.matvec_and_grad(v.astype(numpy.float32))
    assert hv.dtype == g.dtype == numpy.float32
    assert rel(hv, ref) <= 2e-6
    for h in (1e-4, 1e-8, 1e-16, 1e-20):
        assert rel(HessianCS(model, p32, x, y, h=h).matvec(v), ref) <= 2e-6, h
    assert rel(HessianFD(model, p32, x, y).matvec(v), ref) <= 1e-3
    assert rel(HessianRop(model, p32, x, y).matvec(v), ref) <= 2e-6


@pytest.mark.parametrize("act", ACTS)
def test_to_scipy_eigsh_finds_the_largest_eigenvalue(xp, act):
    model, params, x, y = setup(act, "softmax_xent", xp)
    H = mp_hessian(act, "softmax_xent")
    top = numpy.linalg.eigvalsh(H)[-1]
    for cls in (HessianCS, HessianRop):
        op = cls(model, params, x, y).to_scipy()
        if xp is numpy:
            lam = scipy.sparse.linalg.eigsh(op, k=1, which="LA", tol=1e-14, v0=numpy.ones(model.n_params))[0][0]
        else:
            import cupyx.scipy.sparse.linalg as cpl
            lam = float(cpl.eigsh(op, k=1, which="LA", tol=1e-14)[0][0])
        assert abs(lam - top) <= 1e-11 * abs(top)


def test_rop_with_an_activation_before_the_first_weight_layer(xp):
    """R{x} = 0 must flow through parameter-free layers that see the data directly."""
    model = Model([Tanh(), Dense(3, 4), Tanh(), Dense(4, 2)], "half_mse", weight_decay=1e-3, input_shape=(3,))
    params = model.init(seed=1, xp=xp)
    rng = numpy.random.default_rng(2)
    x, y = xp.asarray(rng.standard_normal((5, 3))), xp.asarray(rng.random((5, 2)))
    v = xp.asarray(rng.standard_normal(model.n_params))
    assert rel(HessianRop(model, params, x, y).matvec(v), HessianCS(model, params, x, y).matvec(v)) <= 1e-13


def test_interface_and_errors(xp):
    model, params, x, y = setup("relu", "half_mse", xp)
    op = HessianRop(model, params, x, y)
    n = model.n_params
    assert op.shape == (n, n) and op.dtype == numpy.float64
    V = xp.asarray(numpy.random.default_rng(0).standard_normal((n, 3)))
    MV = op.matmat(V)
    assert MV.shape == (n, 3)
    assert rel(MV[:, 1], op.matvec(V[:, 1])) <= 1e-15
    assert rel(op @ V, MV) == 0.0 and rel(op @ V[:, 0], MV[:, 0]) <= 1e-15
    assert op.matmat(xp.zeros((n, 0))).shape == (n, 0)
    assert rel(op.matvec(V[:, :1]), MV[:, 0]) <= 1e-15  # an (n, 1) column is accepted
    with pytest.raises(ValueError, match="shape"):
        op.matvec(xp.zeros(n + 1))
    with pytest.raises(TypeError, match="real vectors"):
        op.matvec(xp.zeros(n, dtype=complex))
    with pytest.raises(TypeError, match="real parameters"):
        HessianCS(model, [p.astype(complex) for p in params], x, y)
    with pytest.raises(ValueError, match="positive"):
        HessianCS(model, params, x, y, h=0.0)
    with pytest.raises(ValueError, match="scheme"):
        HessianFD(model, params, x, y, scheme="backward")
    flat = HessianCS(model, model.flatten(params), x, y)  # the flat vector is accepted too
    assert rel(flat.matvec(V[:, 0]), MV[:, 0]) <= 1e-13
    big = Model([Dense(100, 60)], "half_mse", input_shape=(100,))
    bp = big.init(seed=0, xp=xp)
    bop = HessianRop(big, bp, xp.zeros((2, 100)), xp.zeros((2, 60)))
    with pytest.raises(ValueError, match="force=True"):
        bop.dense()


def test_convolutional_network_products_agree(xp):
    """A small LeNet (Unflatten, Conv2d, MaxPool2d, Flatten before the Dense layers): complex step
    and R-operator, two independent routes, agree; central differences agree to their accuracy."""
    cnn = pytest.importorskip("nets.cnn")
    model = cnn.lenet(image_shape=(1, 12, 12), channels=(2, 3), hidden=(5,), n_classes=3, weight_decay=1e-3)
    params = model.init(seed=0, xp=xp)
    rng = numpy.random.default_rng(0)
    x, y = xp.asarray(rng.random((4, 144))), xp.asarray(rng.integers(0, 3, 4))
    rop = HessianRop(model, params, x, y)
    for v in directions(model, xp, 2):
        ref = rop.matvec(v)
        assert rel(HessianCS(model, params, x, y).matvec(v), ref) <= 1e-13
        assert rel(HessianFD(model, params, x, y).matvec(v), ref) <= 1e-8


def test_readme_example_runs_where_the_parameters_are(xp):
    """The README's example (HessianCS, HessianRop) with the model's parameters on ``xp``: the
    operators compute on the parameters' module, taking the host batch and direction as they are
    (copied to the device once); the raw complex pass gets device arrays. Same numbers as NumPy."""
    def run(m):
        model = nets.mlp([3, 8, 2], ["tanh", "linear"], "half_mse")
        params = model.init(seed=0, xp=m)
        rng = numpy.random.default_rng(0)
        x, y = rng.standard_normal((16, 3)), rng.standard_normal((16, 2))
        xd, yd = m.asarray(x), m.asarray(y)
        loss, grads = model.loss_and_grad(params, xd, yd)  # real pass
        v = rng.standard_normal(model.n_params)  # one complex pass: gradient and H v
        w = model.flatten(params).astype(numpy.complex128) + 1e-30j * m.asarray(v)
        _, g = model.loss_and_grad(model.unflatten(w), xd, yd)
        g = model.flatten(g)
        grad, hv = g.real, g.imag / 1e-30
        H = HessianCS(model, params, x, y)  # the same through the operator interface
        hv2, grad2 = H.matvec_and_grad(v)
        exact = HessianRop(model, params, x, y).matvec(v)
        assert H.xp is m and all(array_module(a) is m for a in (loss, hv, hv2, grad2, exact))
        if m is numpy:
            assert isinstance(H.to_scipy(), scipy.sparse.linalg.LinearOperator)
        else:
            import cupyx.scipy.sparse.linalg as cpl
            assert isinstance(H.to_scipy(), cpl.LinearOperator)
        return loss, model.flatten(grads), grad, hv, hv2, grad2, exact

    loss, g_real, grad, hv, hv2, grad2, exact = numpy_twin(xp, run)
    assert rel(hv, exact) <= 1e-13 and rel(hv2, exact) <= 1e-13
    assert rel(grad, g_real) <= 1e-15 and rel(grad2, g_real) <= 1e-15


def test_operators_refuse_device_data_with_host_parameters(cupy_only):
    cp = cupy_only
    model, params, x, y = setup("tanh", "half_mse", numpy)
    with pytest.raises(TypeError, match="parameters are NumPy arrays but x is a CuPy array"):
        HessianCS(model, params, cp.asarray(x), y)
    with pytest.raises(TypeError, match="parameters are NumPy arrays but y is a CuPy array"):
        HessianRop(model, model.flatten(params), x, cp.asarray(y))
    op = HessianCS(model, params, x, y)
    with pytest.raises(TypeError, match="computes with NumPy .* got a CuPy array"):
        op.matvec(cp.zeros(model.n_params))


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_operator_products_make_no_host_sync(xp, net):
    """Products (complex step, finite differences, R-operator, Gauss-Newton, empirical Fisher)
    on device vectors neither synchronise with the host nor copy host data in."""
    if net == "mlp":
        model = nets.mlp([6, 8, 5, 4], ["tanh", "relu", "linear"], "sigmoid_xent", weight_decay=1e-3)
    else:
        model = nets.lenet(image_shape=(1, 12, 12), channels=(2, 3), hidden=(5,), n_classes=3, weight_decay=1e-3)
    rng = numpy.random.default_rng(0)
    params = model.init(seed=1, xp=xp)
    n, d_out = 5, model.output_shape[0]
    x = xp.asarray(rng.random((n, model.input_shape[0])))
    y = xp.asarray(rng.integers(0, d_out, n) if model.loss_fn.classification else rng.random((n, d_out)))
    v = xp.asarray(rng.standard_normal(model.n_params))
    ops = [cls(model, params, x, y) for cls in (HessianCS, HessianRop, GaussNewton, EmpiricalFisher)]
    ops.append(HessianFD(model, params, x, y, h=1e-5))
    cs = ops[0]
    with device_work(xp, forbid_syncs=True) as work:
        for op in ops:
            op.matvec(v)
        cs.matvec_and_grad(v)
        cs.matmat(xp.stack([v, 2 * v], axis=1))
    assert work.n_syncs == 0 and work.h2d == 0, str(work)
