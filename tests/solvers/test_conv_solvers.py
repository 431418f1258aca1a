"""K-FAC, K-BFGS and K-BFGS(L) on convolutional networks (KFC; KF-QN-CNN, arXiv:2102.06737).

The references below build the conv layers' Kronecker statistics from explicit patches
(``tests.engine.conv_reference.patches_loop``, direct loops) and per-example pre-activation
gradients (the layers' own backward, tested in tests/engine), in float64 and the obvious way:
A = E_{n,t}[a~ a~^T], G = E_n[sum_t Ds_t Ds_t^T], y = sum_t mean_n(Ds_t - Ds+_t) = L mean_{n,t}(dDs),
and the conv damping "Powell on s, then y~ = y + sqrt(lambda) s~" with ``if`` statements.

The solvers run under the ``xp`` fixture; the references stay on the host (their own parameters
and data) and the device run is also compared with the NumPy run (tests/solvers/common.py).
"""

import numpy
import pytest

from engine.conv import Conv2d, Flatten, MaxPool2d, Unflatten
from engine.layers import Dense, Layer, ReLU, Tanh
from engine.model import Model
from solvers import make_solver
from solvers.kbfgs import powell_lm_damping
from tests.engine.conv_reference import patches_loop
from tests.solvers.common import host_float, on, to_np, twin
from tests.solvers.test_kbfgs import ReferenceKBFGS, ref_bfgs, ref_double_damping
from tests.solvers.test_solvers import assert_resume_bit_for_bit

#: settings that train the tiny CNN below in a few dozen steps
HYPER = {
    "kfac": {"lr": 0.3, "damping": 0.1, "inverse_freq": 3},
    "kbfgs": {"lr": 1.0, "damping": 0.3},
    "kbfgs_l": {"lr": 1.0, "damping": 0.3, "memory": 4},
}
NAMES = sorted(HYPER)


def tiny_cnn(weight_decay=1e-4):
    """1x8x8 -> conv3x3(3, pad 1) -> relu -> maxpool2 -> conv3x3(2) -> tanh -> flatten(8) -> dense(3)."""
    layers = [Unflatten((1, 8, 8)), Conv2d(1, 3, 3, padding=1), ReLU(), MaxPool2d(2), Conv2d(3, 2, 3), Tanh(),
              Flatten(), Dense(8, 3)]
    return Model(layers, "softmax_xent", weight_decay=weight_decay, input_shape=(64,), name="tiny-cnn")


def tiny_data(n_batches=3, n=16, seed=0, dtype=numpy.float64):
    """Three classes of 8x8 images: a bright row band, a bright column band, or a bright corner, plus noise."""
    rng = numpy.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n_batches * n)
    x = 0.3 * rng.random((len(labels), 8, 8))
    for k, c in enumerate(labels):
        r = rng.integers(0, 6)
        if c == 0:
            x[k, r:r + 2, :] += 1
        elif c == 1:
            x[k, :, r:r + 2] += 1
        else:
            x[k, :4, :4] += 1
    x = x.reshape(len(labels), 64).astype(dtype)
    return [(x[i:i + n], labels[i:i + n]) for i in range(0, len(labels), n)]


def start(name, dtype=numpy.float64, seed=9999, xp=numpy):
    model = tiny_cnn()
    data = on(xp, tiny_data(dtype=dtype))
    solver = make_solver(name, model, **HYPER[name])
    params = model.init(seed=seed, dtype=dtype, xp=xp)
    state = solver.warm_start(params, solver.init(params), data)
    return model, data, solver, params, state


def mean_loss(model, params, data):
    return float(numpy.mean([host_float(model.loss(params, x, y)) for x, y in data]))


# --- explicit per-layer statistics -----------------------------------------------------------------
def layer_rows(model, params, x, y, dout=None):
    """Per Kronecker layer i: (a rows, z rows, Ds rows, L), rows ordered (n, h, w), from explicit patches.

    Ds rows are the per-example pre-activation gradients d loss_n / dz_{n,t} of the loss (true
    labels ``y``, or the output gradient ``dout`` of the mean loss when given).
    """
    n = x.shape[0]
    h, inputs, outputs, caches = x, [], [], []
    for i, layer in enumerate(model.layers):
        inputs.append(h)
        h, cache = layer.forward(model.layer_params(params, i), h)
        outputs.append(h)
        caches.append(cache)
    if dout is None:
        _, dout = model.loss_fn.value_and_grad(h, y)
    dys, dy = {}, dout
    for i in range(len(model.layers) - 1, -1, -1):
        dys[i] = dy
        dy, _ = model.layers[i].backward(model.layer_params(params, i), caches[i], dy)
    out = {}
    for i in model.kron_layers:
        layer = model.layers[i]
        if isinstance(layer, Conv2d):
            a = patches_loop(inputs[i], layer.kernel, layer.stride, layer.padding)
            c = layer.c_out
            z = outputs[i].transpose(0, 2, 3, 1).reshape(-1, c)
            ds = n * dys[i].transpose(0, 2, 3, 1).reshape(-1, c)
            L = outputs[i].shape[2] * outputs[i].shape[3]
        else:
            a, z, ds, L = inputs[i], outputs[i], n * dys[i], 1
        out[i] = (a, z, ds, L)
    return out


def homogeneous(a):
    return numpy.hstack([a, numpy.ones((a.shape[0], 1))])


def explicit_A(a):
    """E_{n,t}[a~ a~^T]: the mean over all (example, location) rows."""
    at = homogeneous(a)
    return at.T @ at / at.shape[0]


def explicit_G(ds, n):
    """E_n[sum_t Ds_t Ds_t^T] = (1/N) sum over all rows of Ds Ds^T."""
    return ds.T @ ds / n


def ref_powell_lm(s, y, H, mu1, mu2):
    Hy = H @ y
    if (s @ y) / (y @ Hy) <= mu1:
        t = (1 - mu1) * (y @ Hy) / (y @ Hy - s @ y)
        s = t * s + (1 - t) * Hy
    return s, y + mu2 * s


class ReferenceConvKBFGS(ReferenceKBFGS):
    """K-BFGS (dense H_g, ``memory=None``) or K-BFGS(L) (``memory=p``) on explicit conv statistics, float64."""

    def warm_start(self, params, data):
        self.A = {i: 0 for i in self.kron}
        for x, y in data:
            rows = layer_rows(self.model, params, x, y)
            for i in self.kron:
                self.A[i] = self.A[i] + explicit_A(rows[i][0])
        self.A = {i: A / len(data) for i, A in self.A.items()}
        self.init_state(params)

    def step(self, params, x, y):
        model, sq = self.model, numpy.sqrt(self.lam)
        loss, grads = model.loss_and_grad(params, x, y, regularized=True)
        rows = layer_rows(model, params, x, y)
        self.m = [0.9 * m + 0.1 * g for m, g in zip(self.m, grads)]
        trial = [p - self.lr * m for p, m in zip(params, self.m)]  # non-Kronecker parameters (none here)
        for i in self.kron:
            a = rows[i][0]
            if self.k > 0:
                self.A[i] = 0.9 * self.A[i] + 0.1 * explicit_A(a)
            if self.k == 0:
                self.H_a[i] = numpy.linalg.inv(self.A[i] + sq * numpy.eye(len(self.A[i])))
            j = model.layer_param_index[i]
            W = params[j]
            M = numpy.hstack([self.m[j].reshape(W.shape[0], -1), self.m[j + 1][:, None]])
            P = self.H_g_of(i) @ M @ self.H_a[i]
            trial[j] = W - self.lr * P[:, :-1].reshape(W.shape)
            trial[j + 1] = params[j + 1] - self.lr * P[:, -1]
        rows_new = layer_rows(model, trial, x, y)
        for i in self.kron:
            a, z, ds, L = rows[i]
            _, z_new, ds_new, _ = rows_new[i]
            s = z.mean(0) - z_new.mean(0)
            yv = L * (ds.mean(0) - ds_new.mean(0))  # = sum_t mean_n (Ds_t - Ds+_t)
            g_ref = L * ds.mean(0)
            self.s_ema[i] = 0.9 * self.s_ema[i] + 0.1 * s
            self.y_ema[i] = 0.9 * self.y_ema[i] + 0.1 * yv
            H_g = self.H_g_of(i)
            damp = ref_powell_lm if isinstance(model.layers[i], Conv2d) else ref_double_damping
            s_d, y_d = damp(self.s_ema[i], self.y_ema[i], H_g, 0.2, sq)
            if self.memory is None:
                self.H_g[i], _ = ref_bfgs(H_g, s_d, y_d, g_ref)
            elif s_d @ y_d > 1e-4 * (s_d @ s_d) * numpy.linalg.norm(g_ref):
                self.pairs[i].append((s_d, y_d))
            a_bar = numpy.concatenate([a.mean(0), [1.0]])
            s_a = self.H_a[i] @ a_bar
            self.H_a[i], _ = ref_bfgs(self.H_a[i], s_a, (self.A[i] + sq * numpy.eye(len(self.A[i]))) @ s_a, a_bar)
        self.k += 1
        for p, t in zip(params, trial):
            p[...] = t
        return loss


# --- tests -----------------------------------------------------------------------------------------
def cnn_run(xp, name):
    model, data, solver, params, state = start(name, xp=xp)
    before = mean_loss(model, params, data)
    losses = []
    for k in range(30):
        params, state, info = solver.step(params, state, *data[k % len(data)])
        losses.append(info["loss"])
        assert numpy.isfinite(host_float(info["loss"]))
    after = mean_loss(model, params, data)
    assert after < 0.5 * before, f"{name}: {before:.4f} -> {after:.4f}"
    accuracy = numpy.mean([host_float(model.loss_fn.accuracy(model.predict(params, x), y)) for x, y in data])
    assert accuracy > 0.9
    return {"losses": losses, "params": model.flatten(params), "accuracy": accuracy}


@pytest.mark.parametrize("name", NAMES)
def test_decreases_the_loss_of_a_tiny_cnn(name, xp):
    twin(xp, cnn_run, name)


def cnn_reference_run(xp, name, memory):
    model = tiny_cnn(weight_decay=1e-3)
    data = tiny_data()
    lr, lam = 0.3, 0.3
    hyper = {"lr": lr, "damping": lam} if memory is None else {"lr": lr, "damping": lam, "memory": memory}
    solver = make_solver(name, model, **hyper)
    params = model.init(seed=3, xp=xp)
    ref_params = model.init(seed=3, xp=numpy)
    state = solver.warm_start(params, solver.init(params), on(xp, data))
    ref = ReferenceConvKBFGS(model, lr, lam, memory)
    ref.warm_start(ref_params, data)
    for i in solver.kron:
        numpy.testing.assert_allclose(to_np(state[f"layer{i}/A"]), ref.A[i], rtol=1e-12, atol=1e-15)
    lm_fired = 0
    trajectory = []
    for k in range(6):
        x, y = data[k % len(data)]
        params, state, info = solver.step(params, state, xp.asarray(x), xp.asarray(y))
        ref_loss = ref.step(ref_params, x, y)
        lm_fired += int(to_np(info["lm_damping"]))
        assert host_float(info["loss"]) == pytest.approx(float(ref_loss), rel=1e-12)
        for p, q in zip(params, ref_params):
            numpy.testing.assert_allclose(to_np(p), q, rtol=1e-9, atol=1e-12)
        trajectory.append(model.flatten(params))
    assert lm_fired >= 6 * 2  # the LM shift is applied to both conv layers every iteration
    for i in solver.kron:
        numpy.testing.assert_allclose(to_np(state[f"layer{i}/A"]), ref.A[i], rtol=1e-10, atol=1e-13)
        numpy.testing.assert_allclose(to_np(state[f"layer{i}/H_a"]), ref.H_a[i], rtol=1e-8, atol=1e-11)
        numpy.testing.assert_allclose(to_np(solver.g_side_inverse(state, i)), ref.H_g_of(i), rtol=1e-8, atol=1e-11)
        numpy.testing.assert_allclose(to_np(state[f"layer{i}/s_ema"]), ref.s_ema[i], rtol=1e-9, atol=1e-14)
        numpy.testing.assert_allclose(to_np(state[f"layer{i}/y_ema"]), ref.y_ema[i], rtol=1e-9, atol=1e-13)
    return {"params": trajectory, "lm_fired": lm_fired, "H_g": [solver.g_side_inverse(state, i) for i in solver.kron]}


@pytest.mark.parametrize("name,memory", [("kbfgs", None), ("kbfgs_l", 2), ("kbfgs_l", 100)])
def test_kbfgs_on_a_cnn_matches_the_explicit_reference(name, memory, xp):
    """A from patches, y = sum_t mean_n dDs_t, Powell + LM-on-H^{-1} damping on the conv layers,
    double damping on the Dense layer: parameters and factors agree with the reference."""
    twin(xp, cnn_reference_run, name, memory)


def kfac_factors_run(xp):
    model = tiny_cnn()
    data = tiny_data()
    solver = make_solver("kfac", model, lr=0.3, damping=0.1, seed=5)
    params = model.init(seed=1, xp=xp)
    state = solver.warm_start(params, solver.init(params), on(xp, data[:2]))
    params_host = model.init(seed=1, xp=numpy)
    rng = numpy.random.default_rng(5)  # the solver's target generator, replayed
    A_ref = {i: 0 for i in model.kron_layers}
    G_ref = {i: 0 for i in model.kron_layers}
    for x, _ in data[:2]:
        out = model.predict(params_host, x)
        _, dout = model.loss_fn.value_and_grad(out, model.loss_fn.sample_targets(out, rng))
        rows = layer_rows(model, params_host, x, None, dout=dout)
        for i in model.kron_layers:
            a, _, ds, _ = rows[i]
            A_ref[i] = A_ref[i] + explicit_A(a) / 2
            G_ref[i] = G_ref[i] + explicit_G(ds, len(x)) / 2
    for i in model.kron_layers:
        numpy.testing.assert_allclose(to_np(state[f"layer{i}/A"]), A_ref[i], rtol=1e-12, atol=1e-15)
        numpy.testing.assert_allclose(to_np(state[f"layer{i}/G"]), G_ref[i], rtol=1e-12, atol=1e-15)
    # one step: A <- 0.9 A + 0.1 A_batch (true data), G <- 0.9 G + 0.1 G_batch (sampled targets)
    x, y = data[2]
    out = model.predict(params_host, x)
    _, dout = model.loss_fn.value_and_grad(out, model.loss_fn.sample_targets(out, rng))
    rows_sampled = layer_rows(model, params_host, x, None, dout=dout)
    rows_true = layer_rows(model, params_host, x, y)
    _, state, _ = solver.step(params, state, xp.asarray(x), xp.asarray(y))
    conv = [i for i in model.kron_layers if isinstance(model.layers[i], Conv2d)]
    assert conv == [1, 4]
    for i in model.kron_layers:
        numpy.testing.assert_allclose(to_np(state[f"layer{i}/A"]), 0.9 * A_ref[i] + 0.1 * explicit_A(rows_true[i][0]), rtol=1e-12)
        numpy.testing.assert_allclose(to_np(state[f"layer{i}/G"]), 0.9 * G_ref[i] + 0.1 * explicit_G(rows_sampled[i][2], len(x)),
                                      rtol=1e-12, atol=1e-15)
    return {"A": [state[f"layer{i}/A"] for i in model.kron_layers], "G": [state[f"layer{i}/G"] for i in model.kron_layers]}


def test_kfac_conv_factors_are_kfc_from_explicit_patches(xp):
    """K-FAC's warm-started A = E_{n,t}[a~ a~^T] and G = E_n[sum_t Ds Ds^T] (sampled targets), and its first
    EMA update, from explicit patches and per-example gradients of the same sampled targets."""
    twin(xp, kfac_factors_run)


def kfac_step_run(xp):
    model = tiny_cnn()
    data = tiny_data()
    lam, lr = 0.1, 0.3
    solver = make_solver("kfac", model, lr=lr, damping=lam)
    params = model.init(seed=2, xp=xp)
    state = solver.warm_start(params, solver.init(params), on(xp, data))
    old = [to_np(p).copy() for p in params]
    x, y = data[0]
    _, grads = model.loss_and_grad(old, x, y)
    params, state, _ = solver.step(params, state, xp.asarray(x), xp.asarray(y))
    for i in (1, 4):
        j = model.layer_param_index[i]
        A, G = to_np(state[f"layer{i}/A"]), to_np(state[f"layer{i}/G"])
        M = 0.1 * numpy.hstack([grads[j].reshape(grads[j].shape[0], -1), grads[j + 1][:, None]])
        damped = [F + numpy.sqrt(lam) * numpy.eye(len(F)) for F in (G, A)]
        P = numpy.linalg.solve(damped[0], M) @ numpy.linalg.inv(damped[1])
        numpy.testing.assert_allclose(to_np(params[j]), old[j] - lr * P[:, :-1].reshape(old[j].shape), rtol=1e-10, atol=1e-13)
        numpy.testing.assert_allclose(to_np(params[j + 1]), old[j + 1] - lr * P[:, -1], rtol=1e-10, atol=1e-13)
    return {"params": model.flatten(params)}


def test_kfac_conv_step_is_the_damped_kronecker_solve(xp):
    """The first K-FAC step on a conv layer is -alpha (G + sqrt(lam) I)^{-1} [M_W | m_b] (A + sqrt(lam) I)^{-1}."""
    twin(xp, kfac_step_run)


def powell_lm_run(xp, case):
    rng = numpy.random.default_rng(7)
    d, mu1, mu2 = 6, 0.2, numpy.sqrt(0.3)
    B = rng.standard_normal((d, d))
    H = B @ B.T + 0.5 * numpy.eye(d)
    s = rng.standard_normal(d)
    y = {"powell": 0.01 * s + 0.3 * rng.standard_normal(d), "no-powell": numpy.linalg.solve(H, s),
         "negative-curvature": -s + 0.1 * rng.standard_normal(d), "zero-y": numpy.zeros(d)}[case]
    s_dev, y_dev, H_dev = xp.asarray(s), xp.asarray(y), xp.asarray(H)
    s_d, y_d, powell, lm = powell_lm_damping(s_dev, y_dev, H_dev, mu1, mu2=mu2)
    record = {"s": s_d, "y": y_d, "powell": powell, "lm": lm}
    s_d, y_d, powell, lm = to_np(s_d), to_np(y_d), bool(to_np(powell)), bool(to_np(lm))
    assert bool(lm)
    assert s_d @ y_d >= mu2 * (s_d @ s_d) * (1 - 1e-12)
    numpy.testing.assert_allclose(s_d @ y_d, s_d @ y + mu2 * (s_d @ s_d), rtol=1e-12)
    if case == "zero-y":
        assert not bool(powell) and numpy.array_equal(s_d, s) and numpy.array_equal(y_d, mu2 * s)
        return record
    s_ref, y_ref = ref_powell_lm(s, y, H, mu1, mu2)
    numpy.testing.assert_allclose(s_d, s_ref, rtol=1e-12, atol=1e-15)
    numpy.testing.assert_allclose(y_d, y_ref, rtol=1e-12, atol=1e-15)
    assert bool(powell) == (case != "no-powell")
    if bool(powell):
        numpy.testing.assert_allclose(s_d @ y, mu1 * (y @ H @ y), rtol=1e-10)
    # the callable form (K-BFGS(L)'s operator) gives the same pair
    s_c, y_c, _, _ = powell_lm_damping(s_dev, y_dev, lambda v: H_dev @ v, mu1, mu2=mu2)
    numpy.testing.assert_allclose(to_np(s_c), s_d, rtol=1e-13, atol=1e-15)
    numpy.testing.assert_allclose(to_np(y_c), y_d, rtol=1e-13, atol=1e-15)
    return record


@pytest.mark.parametrize("case", ["powell", "no-powell", "negative-curvature", "zero-y"])
def test_powell_lm_damping_bounds_the_curvature(case, xp):
    """s~^T y~ >= sqrt(lambda) s~^T s~ after Powell then y~ = y + sqrt(lambda) s~; matches the if-statement form."""
    twin(xp, powell_lm_run, case)


@pytest.mark.parametrize("dtype,writer", [(numpy.float64, "h5py"), (numpy.float32, "runfile")])
@pytest.mark.parametrize("name", NAMES)
def test_cnn_state_round_trips_through_hdf5_bit_for_bit(name, dtype, writer, tmp_path, xp):
    """step, save the state (HDF5), load into a fresh solver, step == two steps straight, exactly
    (CuPy to CuPy on the device half)."""
    model, data, solver, params, state = start(name, dtype, xp=xp)
    assert_resume_bit_for_bit(model, data, solver, params, state, lambda: make_solver(name, model, **HYPER[name]),
                              dtype, writer, tmp_path)


def test_unsupported_kronecker_layer_is_named():
    class Bilinear(Layer):  # a Kronecker layer of a kind the solvers have no factors for
        kronecker = True

        def __repr__(self):
            return "Bilinear()"

        def forward(self, params, x):
            return x, None

        def backward(self, params, cache, dy, need_dx=True):
            return dy, []

        def jvp(self, params, cache, rx, rparams):
            return rx

        def backward_rop(self, params, cache, dy, rdy, rx, rparams, need_dx=True):
            return rdy, []

    model = Model([Bilinear()], "half_mse")
    for name in NAMES:
        with pytest.raises(ValueError, match=r"Dense and Conv2d layers only; layer 0 \(Bilinear\(\)\)"):
            make_solver(name, model)
