"""K-FAC, Adam (paper and standard) and RMSprop against plain re-implementations of docs/kbfgs.md
section 6 (float64, explicit homogeneous inputs, numpy.linalg.inv, textbook update formulas).

The solvers run under the ``xp`` fixture, the references on the host; the device run is also
compared with the NumPy run (tests/solvers/common.py)."""

import numpy
import pytest

from nets import mlp
from solvers import make_solver
from tests.solvers.common import on, to_np, twin


def tiny_model():
    return mlp([5, 4, 5], ["tanh", "linear"], "sigmoid_xent", weight_decay=1e-3)


def batches(n_batches=3, n=16, d=5, seed=0):
    rng = numpy.random.default_rng(seed)
    return [(x, x) for x in (rng.random((n, d)) for _ in range(n_batches))]


def flat(model, grads):
    return numpy.concatenate([g.reshape(-1) for g in grads])


def hom(a):
    return numpy.hstack([a, numpy.ones((len(a), 1))])


class ReferenceKFAC:
    def __init__(self, model, lr, lam, seed, inverse_freq):
        self.model, self.lr, self.sq, self.freq = model, lr, numpy.sqrt(lam), inverse_freq
        self.rng = numpy.random.default_rng(seed)
        self.k = 0

    def stats(self, params, x, y):
        model = self.model
        out = model.predict(params, x)
        t = model.loss_fn.sample_targets(out, self.rng)
        _, _, caps = model.loss_and_grad(params, x, t, regularized=False, capture=True)
        return {c.layer: (hom(c.a).T @ hom(c.a) / len(x), c.g.T @ c.g / len(x)) for c in caps}

    def warm_start(self, params, data):
        acc = None
        for x, y in data:
            s = self.stats(params, x, y)
            acc = s if acc is None else {i: (acc[i][0] + s[i][0], acc[i][1] + s[i][1]) for i in s}
        self.A = {i: v[0] / len(data) for i, v in acc.items()}
        self.G = {i: v[1] / len(data) for i, v in acc.items()}
        self.m = [numpy.zeros_like(p) for p in params]

    def step(self, params, x, y):
        model = self.model
        loss, grads = model.loss_and_grad(params, x, y)
        self.m = [0.9 * m + 0.1 * g for m, g in zip(self.m, grads)]
        s = self.stats(params, x, y)
        if self.k % self.freq == 0 or self.k <= self.freq:
            self.inv = {}
        for i, (Ab, Gb) in s.items():
            self.A[i] = 0.9 * self.A[i] + 0.1 * Ab
            self.G[i] = 0.9 * self.G[i] + 0.1 * Gb
            if i not in self.inv:
                self.inv[i] = (numpy.linalg.inv(self.A[i] + self.sq * numpy.eye(len(self.A[i]))),
                               numpy.linalg.inv(self.G[i] + self.sq * numpy.eye(len(self.G[i]))))
            j = model.layer_param_index[i]
            M = numpy.hstack([self.m[j], self.m[j + 1][:, None]])
            P = self.inv[i][1] @ M @ self.inv[i][0]
            params[j] -= self.lr * P[:, :-1]
            params[j + 1] -= self.lr * P[:, -1]
        self.k += 1
        return loss


def kfac_run(xp):
    model = tiny_model()
    data = batches()
    solver = make_solver("kfac", model, lr=0.5, damping=0.2, seed=123, inverse_freq=2)
    params = model.init(seed=4, xp=xp)
    ref_params = model.init(seed=4, xp=numpy)
    state = solver.warm_start(params, solver.init(params), on(xp, data))
    ref = ReferenceKFAC(model, 0.5, 0.2, 123, 2)
    ref.warm_start(ref_params, data)
    refreshed, trajectory = [], []
    for k in range(7):
        x, y = data[k % 3]
        params, state, info = solver.step(params, state, xp.asarray(x), xp.asarray(y))
        ref.step(ref_params, x, y)
        refreshed.append(bool(info["inverses_refreshed"]))
        for p, q in zip(params, ref_params):
            numpy.testing.assert_allclose(to_np(p), q, rtol=1e-9, atol=1e-12)
        trajectory.append(model.flatten(params))
    # k % 2 == 0 or k <= 2
    assert refreshed == [True, True, True, False, True, False, True]
    for i in solver.kron:
        numpy.testing.assert_allclose(to_np(state[f"layer{i}/G"]), ref.G[i], rtol=1e-10)
    return {"params": trajectory, "G": [state[f"layer{i}/G"] for i in solver.kron], "rng": state["rng"]}


def test_kfac_matches_reference(xp):
    twin(xp, kfac_run)


def adam_run(xp, variant):
    model = tiny_model()
    data = batches()
    solver = make_solver("adam", model, lr=0.01, variant=variant)
    beta2, eps = (0.9, 1e-4) if variant == "paper" else (0.999, 1e-8)
    assert (solver.beta2, solver.epsilon) == (beta2, eps)
    params = model.init(seed=1, xp=xp)
    theta = to_np(model.flatten(params)).copy()
    state = solver.init(params)
    m = numpy.zeros_like(theta)
    v = numpy.zeros_like(theta)
    trajectory = []
    for k in range(5):
        x, y = data[k % 3]
        g = flat(model, model.loss_and_grad(model.unflatten(theta), x, y)[1])
        m = 0.9 * m + 0.1 * g
        m_hat = m / (1 - 0.9 ** (k + 1))
        if variant == "paper":  # v of the bias-corrected momentum (docs/kbfgs.md section 6)
            v = beta2 * v + (1 - beta2) * m_hat ** 2
        else:
            v = beta2 * v + (1 - beta2) * g ** 2
        theta = theta - 0.01 * m_hat / (numpy.sqrt(v / (1 - beta2 ** (k + 1))) + eps)
        params, state, info = solver.step(params, state, xp.asarray(x), xp.asarray(y))
        numpy.testing.assert_allclose(to_np(model.flatten(params)), theta, rtol=1e-11, atol=1e-14)
        trajectory.append(model.flatten(params))
    return {"params": trajectory, "m": state["m"], "v": state["v"], "info": info}


@pytest.mark.parametrize("variant", ["paper", "standard"])
def test_adam_matches_textbook(variant, xp):
    twin(xp, adam_run, variant)
    model = tiny_model()
    # explicit values override the variant's defaults
    assert make_solver("adam", model, variant="standard", beta2=0.99).beta2 == 0.99
    with pytest.raises(ValueError, match="'paper' or 'standard'"):
        make_solver("adam", model, variant="amsgrad")


def rmsprop_run(xp):
    model = tiny_model()
    data = batches()
    solver = make_solver("rmsprop", model, lr=0.01, epsilon=1e-4)
    params = model.init(seed=2, xp=xp)
    theta = to_np(model.flatten(params)).copy()
    state = solver.warm_start(params, solver.init(params), on(xp, data))
    v = sum(flat(model, model.loss_and_grad(model.unflatten(theta), x, y)[1]) ** 2 for x, y in data) / 3
    numpy.testing.assert_allclose(to_np(state["v"]), v, rtol=1e-12)
    m = numpy.zeros_like(theta)
    trajectory = []
    for k in range(5):
        x, y = data[k % 3]
        g = flat(model, model.loss_and_grad(model.unflatten(theta), x, y)[1])
        m = 0.9 * m + 0.1 * g
        v = 0.9 * v + 0.1 * m ** 2
        theta = theta - 0.01 * m / (numpy.sqrt(v) + 1e-4)
        params, state, info = solver.step(params, state, xp.asarray(x), xp.asarray(y))
        numpy.testing.assert_allclose(to_np(model.flatten(params)), theta, rtol=1e-11, atol=1e-14)
        trajectory.append(model.flatten(params))
    return {"params": trajectory, "m": state["m"], "v": state["v"], "info": info}


def test_rmsprop_matches_reference(xp):
    twin(xp, rmsprop_run)
