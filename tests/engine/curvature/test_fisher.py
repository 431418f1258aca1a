"""engine.curvature.fisher: empirical Fisher against per-example backward passes; sampled true
Fisher: reproducible, built from its targets, and converging to the GGN it estimates."""

import numpy
import pytest

from engine.backend import array_module, to_host
from engine.curvature import EmpiricalFisher, Fisher, GaussNewton
from engine.layers import Dense, Layer, Tanh
from engine.model import Model
from tests.device_counts import device_work

from .common import LOSSES, batch, rel, setup


def per_example_loop(model, params, x, y):
    """Rows grad l_n from N one-example backward passes (mean over one example = l_n)."""
    rows = []
    for i in range(x.shape[0]):
        _, g = model.loss_and_grad(params, x[i:i + 1], y[i:i + 1], regularized=False)
        rows.append(to_host(model.flatten(g)))
    return numpy.stack(rows)


@pytest.mark.parametrize("loss", LOSSES)
def test_empirical_fisher_is_the_mean_outer_product_of_per_example_gradients(xp, loss):
    model, params, x, y = setup("tanh", loss, xp)
    P = per_example_loop(model, params, x, y)
    ref = P.T @ P / x.shape[0]
    op = EmpiricalFisher(model, params, x, y, regularized=False)
    assert rel(op.per_example_gradients(), P) <= 1e-14
    assert rel(op.dense(), ref) <= 1e-14
    reg = EmpiricalFisher(model, params, x, y)
    assert rel(reg.dense(), ref + model.weight_decay * numpy.eye(model.n_params)) <= 1e-14


@pytest.mark.parametrize("loss", LOSSES)
def test_sampled_fisher_is_reproducible_and_estimates_the_gauss_newton(xp, loss):
    model, params, x, y = setup("tanh", loss, xp)
    F1 = Fisher(model, params, x, seed=42, regularized=False)
    F2 = Fisher(model, params, x, seed=numpy.random.default_rng(42), regularized=False)
    assert numpy.array_equal(to_host(F1.targets), to_host(F2.targets))
    assert numpy.array_equal(to_host(F1.dense()), to_host(F2.dense()))
    # the operator is the empirical Fisher at its sampled targets (independent loop)
    P = per_example_loop(model, params, x, F1.targets)
    assert rel(F1.dense(), P.T @ P / x.shape[0]) <= 1e-14
    # many samples per example: the Monte-Carlo Fisher approaches its expectation, the GGN
    G = to_host(GaussNewton(model, params, x, y, regularized=False).dense())
    big = Fisher(model, params, x, seed=7, n_samples=4000, regularized=False)
    assert big.targets.shape[0] == 4000 * x.shape[0]
    assert rel(big.dense(), G) <= 0.08
    assert rel(Fisher(model, params, x, seed=7, n_samples=1, regularized=False).dense(), G) > 0.08


class Scale(Layer):
    """An elementwise learnable scale: a parameter layer that is not Dense (fallback path)."""

    def __init__(self, d):
        self.d = d

    def param_shapes(self):
        return [(self.d,)]

    def init(self, rng, dtype):
        return [rng.uniform(0.5, 1.5, self.d).astype(dtype)]

    def forward(self, params, x):
        return x * params[0], x

    def backward(self, params, cache, dy, need_dx=True):
        return (dy * params[0] if need_dx else None), [(dy * cache).sum(axis=0)]

    def jvp(self, params, cache, rx, rparams):
        return cache * rparams[0] + (rx * params[0] if rx is not None else 0)

    def backward_rop(self, params, cache, dy, rdy, rx, rparams, need_dx=True):
        rdx = rdy * params[0] + dy * rparams[0] if need_dx else None
        rdp = (rdy * cache).sum(axis=0) + ((dy * rx).sum(axis=0) if rx is not None else 0)
        return rdx, [rdp]


def test_models_with_other_parameter_layers_use_per_example_passes(xp):
    model = Model([Dense(3, 4), Tanh(), Scale(4), Dense(4, 2)], "half_mse", weight_decay=1e-3, input_shape=(3,))
    params = model.init(seed=0, xp=xp)
    x, y = batch(model, xp, n=6)
    P = per_example_loop(model, params, x, y)
    op = EmpiricalFisher(model, params, x, y, regularized=False)
    assert array_module(op.per_example_gradients()) is xp
    assert rel(op.dense(), P.T @ P / 6) <= 1e-14


@pytest.mark.parametrize("loss", LOSSES)
def test_device_drawn_targets_same_on_every_backend_and_copy_nothing(xp, loss):
    """``target_rng="device"``: the targets are the loss's keyed draw with the generator's first 63-bit
    key (the same numbers on NumPy and CuPy: compared with an independent NumPy draw), the operator is
    the empirical Fisher at them, and on the stand-in building it copies nothing to the device."""
    model, params, x, y = setup("tanh", loss, xp)
    key = int(numpy.random.default_rng(42).integers(0, 2 ** 63))
    out_host = to_host(model.predict([to_host(p) for p in params], to_host(x)))
    expected = model.loss_fn.sample_targets_keyed(out_host, key)
    F = Fisher(model, params, x, seed=42, regularized=False, target_rng="device")
    assert numpy.array_equal(to_host(F.targets), expected)
    P = per_example_loop(model, params, x, F.targets)
    assert rel(F.dense(), P.T @ P / x.shape[0]) <= 1e-14
    if getattr(xp, "_standin", False):
        with device_work(xp) as work:
            Fisher(model, params, x, seed=42, regularized=False, target_rng="device")
        assert work.h2d == 0, work
        with device_work(xp) as work:
            Fisher(model, params, x, seed=42, regularized=False)
        assert work.h2d == 1, work  # the host draw's copy
    with pytest.raises(ValueError, match="target_rng"):
        Fisher(model, params, x, target_rng="gpu")
