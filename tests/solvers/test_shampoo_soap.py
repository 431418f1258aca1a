"""Shampoo and SOAP (docs/preconditioners.md) against plain re-implementations written here: NumPy,
float64, explicit per-parameter loops, ``numpy.linalg.eigh`` / ``numpy.linalg.qr``, the formulas of
the solvers' docstrings written out once more. On a tiny MLP and on the tiny CNN of
tests/solvers/test_conv_solvers.py (a Conv2d kernel is the (C_out, C_in kh kw) matrix).

The solvers run under the ``xp`` fixture, the references on the host; the device run is also
compared with the NumPy run (tests/solvers/common.py). Training mnist-mlp with the defaults:
tests/solvers/test_mnist_mlp_defaults.py.
"""

import numpy
import pytest

from engine.conv import Conv2d, Flatten, MaxPool2d, Unflatten
from engine.layers import Dense, Tanh
from engine.model import Model
from nets import mlp
from solvers import make_solver
from tests.solvers.common import on, to_np, twin
from tests.solvers.test_solvers import assert_resume_bit_for_bit
from tests.solvers.test_sync_budget import check_syncs, run_budgeted


def tiny_mlp():
    """5 -> 4 (tanh) -> 5, sigmoid cross-entropy: W1 is 4 x 5, W2 is 5 x 4."""
    return mlp([5, 4, 5], ["tanh", "linear"], "sigmoid_xent", weight_decay=1e-3)


def mlp_data(n_batches=3, n=16, seed=0, dtype=numpy.float64):
    rng = numpy.random.default_rng(seed)
    return [(x, x) for x in (rng.random((n, 5)).astype(dtype) for _ in range(n_batches))]


def tiny_cnn():
    """1x3x3 -> conv2x2(4) -> tanh -> conv1x1(3) -> tanh -> maxpool2 -> flatten(3) -> dense(3), softmax.

    Kernels as matrices: 4 x (1 2 2) and 3 x (4 1 1); the Dense W is 3 x 3."""
    layers = [Unflatten((1, 3, 3)), Conv2d(1, 4, 2), Tanh(), Conv2d(4, 3, 1), Tanh(), MaxPool2d(2), Flatten(), Dense(3, 3)]
    return Model(layers, "softmax_xent", weight_decay=1e-3, input_shape=(9,), name="tiny-cnn-3x3")


def cnn_data(n_batches=3, n=16, seed=0, dtype=numpy.float64):
    """Three classes of 3x3 images: a bright row, a bright column or a bright diagonal, plus noise."""
    rng = numpy.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n_batches * n)
    x = 0.3 * rng.random((len(labels), 3, 3))
    for k, c in enumerate(labels):
        r = rng.integers(0, 3)
        if c == 0:
            x[k, r, :] += 1
        elif c == 1:
            x[k, :, r] += 1
        else:
            x[k] += numpy.eye(3)
    x = x.reshape(len(labels), 9).astype(dtype)
    return [(x[i:i + n], labels[i:i + n]) for i in range(0, len(labels), n)]


#: Every factor of these models is full rank or has a simple zero eigenvalue (|rows - cols| <= 1, smooth
#: units): an eigenbasis is then defined up to signs, which neither method sees. With a multiple zero
#: eigenvalue (a 3 x 8 layer's R) the basis inside that eigenspace is arbitrary, so SOAP's steps and
#: Shampoo's roots with a tiny epsilon depend on the last bits of the factors, in any implementation.
CASES = {"mlp": (tiny_mlp, mlp_data), "cnn": (tiny_cnn, cnn_data)}


def mat(a):
    return a.reshape(a.shape[0], -1)


def norm(a):
    return numpy.sqrt(numpy.sum(a * a))


# --- the references -------------------------------------------------------------------------------
def ref_inverse_fourth_root(A, eps):
    """Q diag((lambda - min(lambda_min, 0) + eps)^(-1/4)) Q^T (Distributed Shampoo's eigen root)."""
    lam, Q = numpy.linalg.eigh(A)
    lam = lam - min(lam.min(), 0.0) + eps
    return Q @ numpy.diag(lam ** -0.25) @ Q.T


class ReferenceShampoo:
    def __init__(self, model, params, lr=1e-3, beta1=0.9, beta2=1.0, epsilon=1e-12, precondition_every=10,
                 start_preconditioning_step=-1, grafting="adam", grafting_beta2=0.999, grafting_epsilon=1e-8, momentum=0.0):
        self.model, self.lr, self.b1, self.b2, self.eps = model, lr, beta1, beta2, epsilon
        self.every, self.graft, self.gb2, self.geps, self.mu = precondition_every, grafting, grafting_beta2, grafting_epsilon, momentum
        self.start = precondition_every if start_preconditioning_step == -1 else start_preconditioning_step
        self.t = 0
        self.m = [numpy.zeros_like(p) for p in params]
        self.v = [numpy.zeros_like(p) for p in params]
        self.B = [numpy.zeros_like(p) for p in params]
        self.L = {j: numpy.zeros((p.shape[0],) * 2) for j, p in enumerate(params) if p.ndim >= 2}
        self.R = {j: numpy.zeros((mat(p).shape[1],) * 2) for j, p in enumerate(params) if p.ndim >= 2}
        self.L_root, self.R_root = {}, {}

    def step(self, params, x, y):
        self.t += 1
        t = self.t
        loss, grads = self.model.loss_and_grad(params, x, y)
        for j, g in enumerate(grads):
            self.v[j] = self.gb2 * self.v[j] + (1 - self.gb2) * g ** 2
            if j in self.L:
                G = mat(g)
                if self.b2 < 1:
                    self.L[j] = self.b2 * self.L[j] + (1 - self.b2) * G @ G.T
                    self.R[j] = self.b2 * self.R[j] + (1 - self.b2) * G.T @ G
                else:
                    self.L[j] = self.L[j] + G @ G.T
                    self.R[j] = self.R[j] + G.T @ G
        if (t % self.every == 0 and t > self.start) or t == self.start:
            c2 = 1 - self.b2 ** t if self.b2 < 1 else 1.0
            for j in self.L:
                self.L_root[j] = ref_inverse_fourth_root(self.L[j] / c2, self.eps)
                self.R_root[j] = ref_inverse_fourth_root(self.R[j] / c2, self.eps)
        for j, g in enumerate(grads):
            self.m[j] = self.b1 * self.m[j] + (1 - self.b1) * g
            m_hat = self.m[j] / (1 - self.b1 ** t)
            adam = m_hat / (numpy.sqrt(self.v[j] / (1 - self.gb2 ** t)) + self.geps)
            if j not in self.L or t < self.start:
                P = adam
            else:
                S = self.L_root[j] @ mat(m_hat) @ self.R_root[j]
                if self.graft == "adam":
                    S = S * norm(adam) / (norm(S) + 1e-16)
                P = S.reshape(g.shape)
            if self.mu > 0:
                self.B[j] = self.mu * self.B[j] + P
                P = self.B[j]
            params[j] = params[j] - self.lr * P
        return params


class ReferenceSOAP:
    def __init__(self, model, params, lr=3e-3, beta1=0.95, beta2=0.95, epsilon=1e-8, shampoo_beta=-1.0,
                 precondition_frequency=10, correct_bias=True):
        self.model, self.lr, self.b1, self.b2, self.eps = model, lr, beta1, beta2, epsilon
        self.bs = beta2 if shampoo_beta == -1 else shampoo_beta
        self.f, self.correct = precondition_frequency, correct_bias
        self.calls = 0
        self.m = [numpy.zeros_like(p) for p in params]
        self.v = [numpy.zeros(mat(p).shape if p.ndim >= 2 else p.shape) for p in params]
        self.L = {j: numpy.zeros((p.shape[0],) * 2) for j, p in enumerate(params) if p.ndim >= 2}
        self.R = {j: numpy.zeros((mat(p).shape[1],) * 2) for j, p in enumerate(params) if p.ndim >= 2}
        self.QL, self.QR = {}, {}

    def factors(self, grads):
        for j in self.L:
            G = mat(grads[j])
            self.L[j] = self.bs * self.L[j] + (1 - self.bs) * G @ G.T
            self.R[j] = self.bs * self.R[j] + (1 - self.bs) * G.T @ G

    def step(self, params, x, y):
        loss, grads = self.model.loss_and_grad(params, x, y)
        t = self.calls
        self.calls += 1
        if t == 0:  # statistics and eigenbases only, no step
            self.factors(grads)
            for j in self.L:
                self.QL[j] = numpy.linalg.eigh(self.L[j])[1][:, ::-1]
                self.QR[j] = numpy.linalg.eigh(self.R[j])[1][:, ::-1]
            return params
        size = self.lr * numpy.sqrt(1 - self.b2 ** t) / (1 - self.b1 ** t) if self.correct else self.lr
        for j, g in enumerate(grads):
            self.m[j] = self.b1 * self.m[j] + (1 - self.b1) * g
            if j in self.L:
                QL, QR = self.QL[j], self.QR[j]
                G_rot = QL.T @ mat(g) @ QR
                self.v[j] = self.b2 * self.v[j] + (1 - self.b2) * G_rot ** 2
                N = QL @ ((QL.T @ mat(self.m[j]) @ QR) / (numpy.sqrt(self.v[j]) + self.eps)) @ QR.T
            else:
                self.v[j] = self.b2 * self.v[j] + (1 - self.b2) * g ** 2
                N = self.m[j] / (numpy.sqrt(self.v[j]) + self.eps)
            params[j] = params[j] - size * N.reshape(g.shape)
        self.factors(grads)
        if t % self.f == 0:
            for j in self.L:
                for axis, (F, Q) in enumerate(((self.L[j], self.QL[j]), (self.R[j], self.QR[j]))):
                    order = numpy.argsort(-numpy.diag(Q.T @ F @ Q))
                    self.v[j] = self.v[j][order, :] if axis == 0 else self.v[j][:, order]
                    Q_new = numpy.linalg.qr(F @ Q[:, order])[0]
                    if axis == 0:
                        self.QL[j] = Q_new
                    else:
                        self.QR[j] = Q_new
        return params


REFERENCES = {"shampoo": ReferenceShampoo, "soap": ReferenceSOAP}
#: settings that exercise every branch in a few steps: Shampoo's grafted-Adam start, refreshes
#: between and at k = start, EMA factors with bias correction, momentum, no grafting; SOAP's skipped
#: first step and eigenbasis refreshes
SETTINGS = {
    "shampoo": [{"lr": 0.05, "precondition_every": 3, "start_preconditioning_step": 2, "momentum": 0.5},
                {"lr": 0.05, "precondition_every": 2, "beta2": 0.9, "epsilon": 1e-6},
                {"lr": 0.02, "precondition_every": 1, "grafting": "none", "beta1": 0.0, "epsilon": 1e-4}],
    "soap": [{"lr": 0.02, "precondition_frequency": 2},
             {"lr": 0.02, "precondition_frequency": 3, "shampoo_beta": 0.8, "correct_bias": False}],
}
CASE_IDS = [(name, k, case) for name in SETTINGS for k in range(len(SETTINGS[name])) for case in CASES]


# --- one step and several against the references ------------------------------------------------------
def assert_params_close(got, want, rtol, where):
    for j, (p, q) in enumerate(zip(got, want)):
        p = to_np(p).astype(numpy.float64)
        err, scale = norm(p - q), norm(q)
        assert err <= rtol * scale, f"{where}: parameter {j} differs by {err / scale:.2e} relative (> {rtol:g})"


def reference_run(xp, name, setting, case, dtype=numpy.float64, steps=7):
    build, batches = CASES[case]
    hyper = SETTINGS[name][setting]
    model = build()
    host_data = batches(dtype=dtype)
    solver = make_solver(name, model, **hyper)
    params = model.init(seed=3, dtype=dtype, xp=xp)
    theta0 = [to_np(p).astype(numpy.float64) for p in params]
    ref_params = [p.copy() for p in theta0]
    ref = REFERENCES[name](model, ref_params, **hyper)
    state = solver.init(params)
    # float64: the change of the parameters agrees to 1e-12 (stricter than the parameters themselves);
    # float32: the parameters agree to 1e-6 with the float64 reference
    rtol = 1e-12 if dtype == numpy.float64 else 1e-6
    trajectory = []
    for k in range(steps):
        x, y = host_data[k % len(host_data)]
        params, state, info = solver.step(params, state, xp.asarray(x), xp.asarray(y))
        ref_params = ref.step(ref_params, x.astype(numpy.float64), y if y.dtype.kind in "iu" else y.astype(numpy.float64))
        if dtype == numpy.float64:
            got = [to_np(p) - q for p, q in zip(params, theta0)]
            assert_params_close(got, [p - q for p, q in zip(ref_params, theta0)], rtol, f"{name} step {k}")
        else:
            assert_params_close(params, ref_params, rtol, f"{name} step {k}")
        trajectory.append(model.flatten(params))
    record = {"params": trajectory, "k": state["k"]}
    for key in state:  # factor statistics (eigenvectors are defined up to sign: not compared across backends)
        if key.endswith("/L") or key.endswith("/R") or key.endswith("/m"):
            record[key] = state[key]
    return record


@pytest.mark.parametrize("name,setting,case", CASE_IDS)
def test_steps_match_the_reference_float64(name, setting, case, xp):
    twin(xp, reference_run, name, setting, case)


@pytest.mark.parametrize("case", ["mlp", "cnn"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_steps_match_the_reference_float32(name, case, xp):
    twin(xp, reference_run, name, 0 if name == "soap" else 1, case, numpy.float32, 2)


# --- Shampoo's roots are the eigh roots of its statistics ------------------------------------------
def roots_run(xp, epsilon):
    model = tiny_cnn()
    solver = make_solver("shampoo", model, lr=0.05, beta2=0.9, precondition_every=2, epsilon=epsilon)
    params = model.init(seed=5, xp=xp)
    state = solver.init(params)
    batches = on(xp, cnn_data())
    for k in range(4):  # roots refreshed at t = 2 and t = 4: the state's roots are those of the final L, R
        params, state, info = solver.step(params, state, *batches[k % 3])
    assert info["roots_refreshed"]
    c2 = 1 - 0.9 ** 4
    record = {}
    for j in solver.matrices:
        for name in ("L", "R"):
            F = to_np(state[f"param{j}/{name}"]) / c2
            root = to_np(state[f"param{j}/{name}_root"])
            lam, Q = numpy.linalg.eigh(F)
            want = (Q * (lam - min(lam.min(), 0) + epsilon) ** -0.25) @ Q.T
            assert norm(root - want) <= 1e-12 * norm(want), (j, name)
            assert numpy.array_equal(root, root.T) or norm(root - root.T) <= 1e-14 * norm(root)
            if epsilon >= 1e-3:  # well conditioned: root^4 (F + epsilon I) = I
                r4 = numpy.linalg.matrix_power(root, 4)
                assert norm(r4 @ (F + epsilon * numpy.eye(len(F))) - numpy.eye(len(F))) <= 1e-10 * len(F), (j, name)
            record[f"{j}/{name}_root"] = state[f"param{j}/{name}_root"]
    return record


@pytest.mark.parametrize("epsilon", [1e-12, 1e-3])
def test_shampoo_roots_are_eigh_roots_of_the_statistics(epsilon, xp):
    twin(xp, roots_run, epsilon)


# --- state, syncs, hyper-parameters ------------------------------------------------------------------
def cnn_start(name, xp, dtype=numpy.float64):
    model = tiny_cnn()
    solver = make_solver(name, model, **SETTINGS[name][0])
    params = model.init(seed=9999, dtype=dtype, xp=xp)
    return model, on(xp, cnn_data(dtype=dtype)), solver, params, solver.init(params)


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_state_round_trips_through_hdf5_bit_for_bit_cnn(name, dtype, tmp_path, xp):
    model, data_, solver, params, state = cnn_start(name, xp, dtype)
    assert all(key == "k" or key.startswith("param") for key in state)
    assert_resume_bit_for_bit(model, data_, solver, params, state, lambda: make_solver(name, model, **SETTINGS[name][0]),
                              dtype, "runfile", tmp_path)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_a_step_makes_no_host_sync_cnn(name, cupy_only):
    """Every step of the first five (Shampoo's root refreshes at k = 2 and 3, SOAP's eigh at k = 0 and its
    QR refreshes at k = 2 and 4) on the device: no host sync."""
    works = run_budgeted(name, cnn_start, cupy_only, steps=5)
    for k, (work, _) in enumerate(works):
        check_syncs(work, 0, f"{name} step {k} (tiny CNN)")


def test_hyper_parameters():
    model = tiny_mlp()
    assert make_solver("shampoo", model).start == 10
    assert make_solver("shampoo", model, precondition_every=4).start == 4
    assert make_solver("shampoo", model, precondition_every=4, start_preconditioning_step=7).start == 7
    assert make_solver("soap", model).factor_beta == 0.95
    assert make_solver("soap", model, beta2=0.99, shampoo_beta=0.9).factor_beta == 0.9
    with pytest.raises(ValueError, match="'adam' or 'none'"):
        make_solver("shampoo", model, grafting="sgd")
    with pytest.raises(ValueError, match=r"beta2 must be in \(0, 1\]"):
        make_solver("shampoo", model, beta2=0.0)
    with pytest.raises(ValueError, match="start_preconditioning_step must be -1 or >= 1"):
        make_solver("shampoo", model, start_preconditioning_step=0)
    with pytest.raises(TypeError, match="real float32/float64"):
        make_solver("soap", model).init(model.unflatten(numpy.zeros(model.n_params, complex)))


# training mnist-mlp with the defaults: tests/solvers/test_mnist_mlp_defaults.py (all five baselines)
