"""engine.curvature.gauss_newton: symmetric PSD, equal to the Hessian where the network is linear
in its parameters (or at zero residual), and equal to J^T H_out J from explicit Jacobians."""

import numpy
import pytest

from engine.backend import to_host
from engine.curvature import GaussNewton, HessianRop
from nets import mlp
from tests.reference import mp_dense_hessian

from .common import ACTS, LOSSES, batch, rel, setup


def jacobian_by_complex_step(model, params, x, h=1e-30):
    """d vec(out) / d w, column j = Im out(w + i h e_j) / h (independent of the jvp code)."""
    w = to_host(model.flatten(params))
    xh = to_host(x)
    cols = []
    for j in range(model.n_params):
        wc = w.astype(complex)
        wc[j] += 1j * h
        cols.append(model.predict(model.unflatten(wc), xh).imag.ravel() / h)
    return numpy.stack(cols, axis=1)


def output_hessian(loss, out, n):
    """Hessian of the mean loss w.r.t. vec(out), from the textbook formulas."""
    N, d = out.shape
    H = numpy.zeros((N * d, N * d))
    for i in range(N):
        z = out[i]
        if loss == "half_mse":
            block = numpy.eye(d)
        elif loss == "sigmoid_xent":
            s = 1 / (1 + numpy.exp(-z))
            block = numpy.diag(s * (1 - s))
        else:
            p = numpy.exp(z - z.max())
            p /= p.sum()
            block = numpy.diag(p) - numpy.outer(p, p)
        H[i * d:(i + 1) * d, i * d:(i + 1) * d] = block / n
    return H


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTS)
def test_gauss_newton_matches_explicit_jacobians_and_is_psd(xp, act, loss):
    model, params, x, y = setup(act, loss, xp)
    G = to_host(GaussNewton(model, params, x, y, regularized=False).dense())
    J = jacobian_by_complex_step(model, params, x)
    out = to_host(model.predict(params, x))
    ref = J.T @ output_hessian(loss, out, x.shape[0]) @ J
    assert rel(G, ref) <= 1e-13
    assert numpy.abs(G - G.T).max() <= 1e-15 * numpy.abs(G).max()
    eig = numpy.linalg.eigvalsh((G + G.T) / 2)
    assert eig.min() >= -1e-14 * eig.max()
    Greg = to_host(GaussNewton(model, params, x, y).dense())
    assert rel(Greg, G + model.weight_decay * numpy.eye(model.n_params)) <= 1e-15


def test_gauss_newton_is_the_hessian_of_a_linear_model_with_squared_error(xp):
    model = mlp([3, 4], ["linear"], "half_mse", weight_decay=1e-2)
    params = model.init(seed=1, xp=xp)
    x, y = batch(model, xp, n=5)
    G = to_host(GaussNewton(model, params, x, y).dense())
    H = mp_dense_hessian(model, [to_host(p) for p in params], to_host(x), to_host(y))
    assert rel(G, H) <= 1e-12


def test_gauss_newton_is_the_hessian_of_a_deep_linear_network_at_zero_residual(xp):
    model = mlp([3, 4, 3], ["linear", "linear"], "half_mse", weight_decay=1e-3)
    params = model.init(seed=2, xp=xp)
    x, _ = batch(model, xp, n=5)
    y = model.predict(params, x)  # zero residual: the second-order network term vanishes
    G = to_host(GaussNewton(model, params, x, y).dense())
    H = to_host(HessianRop(model, params, x, y).dense())
    assert rel(G, H) <= 1e-14
    # away from zero residual the two differ (the test above is not vacuous)
    y2 = y + 1.0
    assert rel(to_host(GaussNewton(model, params, x, y2).dense()), to_host(HessianRop(model, params, x, y2).dense())) > 1e-3
