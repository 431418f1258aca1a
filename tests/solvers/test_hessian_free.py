"""solvers.hessian_free: Martens' HF checked rule by rule against dense references.

Each body runs under the ``xp`` fixture and returns a record; on the CuPy half it must agree with
the NumPy run of the same body (``twinned``, tests/solvers/common.py)."""

import h5py
import numpy
import pytest

from engine.backend import to_host
from engine.conv import Conv2d, Flatten, Unflatten
from engine.curvature import GaussNewton
from engine.layers import Dense, Tanh
from engine.model import Model
from engine.app.runfile import read_record, write_record
from nets.mlp import autoencoder
from solvers import make_solver
from solvers.hessian_free import squared_gradient_diagonal
from solvers.krylov import EXIT_REASONS, truncated_cg
from tests.solvers.common import twinned


def autoencoder_problem(xp, n=64, seed=0, weight_decay=1e-4):
    """12-6-3-6-12 tanh autoencoder, sigmoid cross-entropy, on images of a 3-d latent structure."""
    model = autoencoder([12, 6, 3], "sigmoid_xent", hidden="tanh", weight_decay=weight_decay, name="ae")
    rng = numpy.random.default_rng(seed)
    z = rng.standard_normal((n, 3))
    basis = rng.standard_normal((3, 12)) * 2
    x = 1 / (1 + numpy.exp(-(z @ basis)))
    x = xp.asarray(x)
    return model, x, x


def flat_host(model, params):
    return numpy.asarray(to_host(model.flatten(params)))


@twinned
def test_hf_decreases_the_loss_of_a_small_autoencoder(xp):
    """Martens' defaults (lambda0 = 45, ...) on a full batch: the excess loss over its lower bound,
    the entropy of the targets sum_j H(x_j) (sigmoid cross-entropy with soft targets), drops by 95%."""
    model, x, y = autoencoder_problem(xp)
    xh = numpy.asarray(to_host(x))
    entropy = float(numpy.mean(numpy.sum(-(xh * numpy.log(xh) + (1 - xh) * numpy.log(1 - xh)), axis=1)))
    params = model.init(seed=3, xp=xp)
    solver = make_solver("hessian_free", model)
    state = solver.init(params)
    loss0 = float(to_host(model.loss(params, x, y)))
    losses = []
    for _ in range(25):
        params, state, info = solver.step(params, state, x, y)
        losses.append(info["loss"])
        assert info["n_hvp"] >= info["cg_iters"]
    final = float(to_host(model.loss(params, x, y)))
    assert losses[0] == pytest.approx(loss0, rel=1e-14)
    # full batch + Armijo: the loss never rises
    assert all(b <= a for a, b in zip(losses + [final], (losses + [final])[1:]))
    assert final - entropy < 0.05 * (loss0 - entropy)
    assert state["damping"] < 45.0  # the LM rule brought lambda down from Martens' initial 45
    return {"losses": losses, "final": final, "params": flat_host(model, params), "damping": state["damping"]}


@twinned
def test_squared_gradient_diagonal_matches_per_example_gradients(xp):
    model, x, y = autoencoder_problem(xp, n=10)
    params = model.init(seed=1, xp=xp)
    _, _, caps = model.loss_and_grad(params, x, y, capture=True)
    diag = numpy.asarray(to_host(squared_gradient_diagonal(model, caps, 10)))
    ref = numpy.zeros(model.n_params)
    for i in range(10):
        _, g = model.loss_and_grad(params, x[i:i + 1], y[i:i + 1], regularized=False)
        gi = numpy.asarray(to_host(model.flatten(g)))
        ref += gi * gi
    ref /= 10
    numpy.testing.assert_allclose(diag, ref, rtol=1e-12, atol=1e-300)
    return {"diag": diag}


def conv_model(padding):
    """3x3 images, one 3x3 convolution (1 output location without padding, 9 with), tanh, Dense."""
    locations = 1 if padding == 0 else 9
    layers = [Unflatten((1, 3, 3)), Conv2d(1, 2, 3, padding=padding), Tanh(), Flatten(), Dense(2 * locations, 1)]
    return Model(layers, "half_mse", input_shape=(9,), name=f"conv-{locations}")


@twinned
def test_squared_gradient_diagonal_decides_from_the_capture_rows(xp):
    """Any Kronecker layer with one capture row per example qualifies (a convolution with one output
    location is a Dense layer on its patches); N L rows per layer are refused."""
    rng = numpy.random.default_rng(3)
    x, y = xp.asarray(rng.standard_normal((6, 9))), xp.asarray(rng.standard_normal((6, 1)))
    model = conv_model(padding=0)
    params = model.init(seed=1, xp=xp)
    _, _, caps = model.loss_and_grad(params, x, y, capture=True)
    diag = numpy.asarray(to_host(squared_gradient_diagonal(model, caps, 6)))
    ref = numpy.zeros(model.n_params)
    for i in range(6):
        _, g = model.loss_and_grad(params, x[i:i + 1], y[i:i + 1], regularized=False)
        gi = numpy.asarray(to_host(model.flatten(g)))
        ref += gi * gi
    numpy.testing.assert_allclose(diag, ref / 6, rtol=1e-12, atol=1e-300)
    wide = conv_model(padding=1)
    wide_params = wide.init(seed=1, xp=xp)
    _, _, caps = wide.loss_and_grad(wide_params, x, y, capture=True)
    with pytest.raises(ValueError, match="one capture row per example; layer 1 .* has 54 rows for 6 examples"):
        squared_gradient_diagonal(wide, caps, 6)
    return {"diag": diag}


@twinned
def test_one_step_solves_the_damped_gauss_newton_system(xp):
    """No preconditioner, no warm start, no CG backtracking: p = -(G + lambda I)^{-1} g."""
    model, x, y = autoencoder_problem(xp, n=32)
    params = model.init(seed=2, xp=xp)
    w0 = flat_host(model, params)
    lam = 0.5
    G = numpy.asarray(to_host(GaussNewton(model, params, x[:16], y[:16]).dense()))
    _, grads = model.loss_and_grad(params, x, y)
    g = numpy.asarray(to_host(model.flatten(grads)))
    p = numpy.linalg.solve(G + lam * numpy.eye(len(g)), -g)
    solver = make_solver("hessian_free", model, damping=lam, curvature_fraction=0.5, preconditioner="none",
                         cg_backtracking=False, cg_rtol=1e-13, cg_max_iter=500)
    params, state, info = solver.step(params, solver.init(params), x, y)
    assert EXIT_REASONS[info["cg_exit"]] in ("converged", "model_stalled")
    a = info["alpha"]
    assert info["accepted"] == 1 and a == pytest.approx(0.8 ** info["backtracks"], rel=1e-12)
    numpy.testing.assert_allclose(flat_host(model, params) - w0, a * p, rtol=1e-6, atol=1e-9 * numpy.linalg.norm(p))
    # rho on the curvature batch with damping off (Martens)
    xh, yh = x[:16], y[:16]
    lh0 = float(to_host(model.loss(model.unflatten(xp.asarray(w0)), xh, yh)))
    lh1 = float(to_host(model.loss(model.unflatten(xp.asarray(w0 + p)), xh, yh)))
    rho = (lh1 - lh0) / (g @ p + 0.5 * p @ G @ p)
    assert info["rho"] == pytest.approx(rho, rel=1e-6)
    expected = lam * 1.5 if rho < 0.25 else (lam * 2 / 3 if rho > 0.75 else lam)
    assert state["damping"] == pytest.approx(expected, rel=1e-15)
    return {"info": info, "params": flat_host(model, params)}


@twinned
def test_cg_backtracking_keeps_the_best_stored_iterate(xp):
    model, x, y = autoencoder_problem(xp, n=32)
    params = model.init(seed=4, xp=xp)
    w0 = flat_host(model, params)
    lam = 1e-3  # weak damping: late CG iterates overshoot on the batch, so backtracking has work to do
    solver = make_solver("hessian_free", model, damping=lam, preconditioner="none", cg_max_iter=60)
    params, _, info = solver.step(params, solver.init(params), x, y)
    # replay CG and Martens' rule by hand
    ref_params = model.unflatten(xp.asarray(w0))
    _, grads = model.loss_and_grad(ref_params, x, y)
    g = model.flatten(grads)
    op = GaussNewton(model, ref_params, x, y)
    cg = truncated_cg(op.matvec, -g, damping=lam, max_iter=60, rtol=0.0, adaptive_rtol=False,
                      model_decrease_check=True, keep_iterates=True)
    losses = [float(to_host(model.loss(model.unflatten(xp.asarray(w0) + it.x), x, y))) for it in cg.iterates]
    j = len(losses) - 1
    while j > 0 and losses[j - 1] <= losses[j]:
        j -= 1
    assert info["cg_iters"] == cg.iterations
    assert info["cg_chosen"] == cg.iterates[j].iteration
    assert info["cg_chosen"] < info["cg_iters"]  # this case does walk back
    if info["accepted"]:
        step = flat_host(model, params) - w0
        numpy.testing.assert_allclose(step, info["alpha"] * numpy.asarray(to_host(cg.iterates[j].x)), rtol=1e-9, atol=1e-14)
    return {"info": info, "params": flat_host(model, params), "losses": losses}


@twinned
def test_rejected_step_leaves_parameters_unchanged(xp):
    model, x, y = autoencoder_problem(xp, n=16)
    params = model.init(seed=5, xp=xp)
    w0 = flat_host(model, params)
    # almost no damping, no CG backtracking and no line-search reduction allowed: the full CG step
    # overshoots (rho < 0) and Armijo rejects it
    solver = make_solver("hessian_free", model, max_backtracks=0, damping=1e-6, preconditioner="none",
                         cg_backtracking=False)
    params, state, info = solver.step(params, solver.init(params), x, y)
    assert info["rho"] < 0 and info["accepted"] == 0
    assert numpy.array_equal(flat_host(model, params), w0)
    assert info["alpha"] == 0.0 and info["step_norm"] == 0.0
    assert state["damping"] == pytest.approx(1.5e-6, rel=1e-15)
    return {"info": info}


@twinned
def test_warm_start_and_state_round_trip(xp, tmp_path):
    model, x, y = autoencoder_problem(xp, n=32)
    solver = make_solver("hessian_free", model, cg_max_iter=30, curvature_fraction=0.5)
    params = model.init(seed=6, xp=xp)
    state = solver.init(params)
    params, state, info0 = solver.step(params, state, x, y)
    params, state, info1 = solver.step(params, state, x, y)
    assert info1["n_hvp"] == info1["cg_iters"] + 1  # the product for H x0 of the 0.95 warm start
    path = tmp_path / "hf.h5"
    with h5py.File(path, "w") as f:
        write_record(f.create_group("s"), state)
    with h5py.File(path, "r") as f:
        loaded = read_record(f["s"], array_module=xp, template=state)
    assert set(loaded) == set(state) == {"damping", "cg_x", "k"}
    assert loaded["damping"] == state["damping"] and loaded["k"] == state["k"]
    assert numpy.array_equal(to_host(loaded["cg_x"]), to_host(state["cg_x"]))
    p1 = model.unflatten(model.flatten(params))
    p2 = model.unflatten(model.flatten(params))
    p1, _, i1 = solver.step(p1, state, x, y)
    p2, _, i2 = solver.step(p2, loaded, x, y)
    assert i1 == i2 and numpy.array_equal(flat_host(model, p1), flat_host(model, p2))
    return {"info0": info0, "info1": info1, "info": i1, "params": flat_host(model, p1)}
