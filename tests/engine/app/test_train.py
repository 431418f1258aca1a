"""The training loop (engine/app/train.py): reference protocol (batch order, evaluation), exact
continuation through state_dict / run files, stopping rules."""

from __future__ import annotations

import math

import numpy
import pytest

import data
from engine.backend import array_module, to_host
from engine.app.runfile import RunRecord, load_run, save_run
from engine.app.runs import make_trainer
from engine.app.train import Trainer, TrainingDiverged, evaluate, host_scalars
from nets import mlp
from solvers.base import Hyper, Solver, positive, rng_from_state_array, rng_state_array
from solvers.sgd import SGD

CLOCKS = ("cpu_time", "wall_time")


def _dataset(n_train=50, n_test=30, d=8, seed=0):
    rng = numpy.random.default_rng(seed)
    return data.Dataset("toy", rng.random((n_train, d)), rng.random((n_test, d)), description="uniform toy data")


def _model():
    return mlp([8, 5, 8], ["tanh", "linear"], "sigmoid_xent", weight_decay=1e-3, name="toy-ae")


class NoisyWarmSolver(Solver):
    """A test solver with everything exact resume must carry: a warm start that reads one epoch,
    a host random generator in the state, device arrays, and Python scalars of several types."""

    name = "noisy-test"
    hyperparameters = {"lr": positive("step", 0.05), "noise": Hyper(0.01, "perturbation scale")}
    needs_warm_start = True

    def init(self, params):
        return {"m": self.model.flatten(params) * 0, "k": 0, "scale": 1.0, "seen": 0,
                "rng": rng_state_array(numpy.random.default_rng(123))}

    def warm_start(self, params, state, batches):
        for x, _ in batches:
            state["seen"] += x.shape[0]
        return state

    def step(self, params, state, x, y):
        model = self.model
        loss, grads = model.loss_and_grad(params, x, y)
        xp = array_module(*params)
        rng = rng_from_state_array(state["rng"])  # a host generator: its words stay on the host
        g = model.flatten(grads) + self.noise * xp.asarray(rng.standard_normal(model.n_params))
        state["rng"] = rng_state_array(rng)
        state["m"] = 0.5 * state["m"] + g
        state["scale"] *= 0.99
        for p, s in zip(params, model.unflatten(self.lr * state["scale"] * state["m"])):
            p -= s
        state["k"] += 1
        return params, state, {"loss": loss, "scale": state["scale"], "skipped": state["k"] % 3 == 0}


def _strip_clocks(table):
    return {k: v for k, v in table.items() if k not in CLOCKS}


def _assert_same_state(a: Trainer, b: Trainer):
    for p, q in zip(a.params, b.params):
        assert type(p) is type(q)
        assert p.dtype == q.dtype and to_host(p).tobytes() == to_host(q).tobytes()
    assert list(a.solver_state) == list(b.solver_state)
    for key, v in a.solver_state.items():
        w = b.solver_state[key]
        if hasattr(v, "dtype") and getattr(v, "ndim", 0) >= 0 and not isinstance(v, numpy.generic):
            assert type(v) is type(w), key  # device fields stay on the device, host fields on the host
            assert v.dtype == w.dtype and to_host(v).tobytes() == to_host(w).tobytes(), key
        else:
            assert type(v) is type(w) and v == w, key
    assert a.history.steps == b.history.steps
    assert _strip_clocks(a.history.epochs) == _strip_clocks(b.history.epochs)
    assert (a.iteration, a.epoch, a.warm_started) == (b.iteration, b.epoch, b.warm_started)


def test_sgd_run_matches_an_independent_reference_loop(xp):
    """Batch order (natural first epoch, then fresh permutations from PCG64(seed)), EMA momentum
    and the per-epoch chunked evaluation, recomputed by hand (on the host, whatever ``xp``)."""
    ds, model = _dataset(), _model()
    lr, rho, seed, batch, chunk = 0.3, 0.9, 7, 10, 20
    tr = make_trainer(model, SGD(model, lr=lr, momentum=rho), ds, batch_size=batch, seed=seed,
                 dtype=numpy.float64, eval_chunk=chunk, xp=xp)
    assert array_module(*tr.params) is xp
    tr.run(epochs=3)

    params = model.init(seed=seed, dtype=numpy.float64, xp=numpy)
    m = numpy.zeros(model.n_params)
    order_rng = numpy.random.Generator(numpy.random.PCG64(seed))
    losses, train_evals, test_evals = [], [], []

    def evaluate_here():  # chunks of 20, the remainder dropped, mean over chunks of the regularised loss
        train_evals.append(numpy.mean([float(model.loss(params, ds.x_train[c:c + 20], ds.x_train[c:c + 20])) for c in (0, 20)]))
        test_evals.append(float(model.loss(params, ds.x_test[:20], ds.x_test[:20])))

    evaluate_here()  # epoch 0: the initial point
    for epoch in range(3):
        order = numpy.arange(50) if epoch == 0 else order_rng.permutation(50)
        for b in range(50 // batch):
            xb = ds.x_train[order[b * batch:(b + 1) * batch]]
            loss, grads = model.loss_and_grad(params, xb, xb)
            losses.append(float(loss))
            m = rho * m + (1 - rho) * model.flatten(grads)
            params = model.unflatten(model.flatten(params) - lr * m)
        evaluate_here()
    assert tr.history.steps["loss"] == pytest.approx(losses, rel=1e-13)
    assert tr.history.steps["iteration"] == list(range(1, 16))
    numpy.testing.assert_allclose(to_host(model.flatten(tr.params)), model.flatten(params), rtol=1e-12, atol=1e-14)
    assert tr.history.epochs["train_loss"] == pytest.approx(train_evals, rel=1e-12)
    assert tr.history.epochs["test_loss"] == pytest.approx(test_evals, rel=1e-12)
    assert tr.history.epochs["epoch"] == [0, 1, 2, 3] and tr.history.epochs["iterations"] == [0, 5, 10, 15]


def test_evaluate_averages_chunks_and_drops_the_remainder(xp):
    """The data follows the parameters' module (host data is copied to the device chunk by chunk)."""
    ds, model = _dataset(n_train=45), _model()
    params = model.init(seed=1, dtype=numpy.float64, xp=numpy)
    got = evaluate(model, [xp.asarray(p) for p in params], ds.x_train, None, chunk=20)["loss"]
    assert type(got) is float
    want = 0.5 * (float(model.loss(params, ds.x_train[:20], ds.x_train[:20]))
                  + float(model.loss(params, ds.x_train[20:40], ds.x_train[20:40])))
    assert got == pytest.approx(want, rel=1e-13)


@pytest.mark.parametrize("stop_at", [7, 10])  # mid-epoch, and exactly at an epoch end
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_state_dict_continues_bitwise(tmp_path, stop_at, dtype, xp):
    ds, model = _dataset(), _model()

    def make():
        return make_trainer(model, NoisyWarmSolver(model), ds, batch_size=10, seed=3, dtype=dtype, eval_chunk=20, xp=xp)

    full = make()
    full.run(epochs=4)
    assert full.solver_state["seen"] == 50  # the warm start read one epoch

    class Stop(Exception):
        pass

    saved = {}

    def on_step(tr, row):
        if tr.iteration == stop_at:
            saved["state"] = tr.state_dict()
            raise Stop

    first = make()
    with pytest.raises(Stop):
        first.run(epochs=4, on_step=on_step)
    state = saved["state"]
    first.run(epochs=4)  # state_dict is a copy: training on does not change it
    assert state["progress"]["iteration"] == stop_at

    # through a run file, as `cstep resume` does
    path = save_run(tmp_path / "run.h5", RunRecord(config={}, hyperparameters={}, state=state))
    resumed = make()
    resumed.load_state_dict(load_run(path, array_module=xp, solver_template=resumed.solver_state).state)
    assert resumed.iteration == stop_at and resumed.warm_started
    resumed.run(epochs=4)
    _assert_same_state(full, resumed)


def test_load_state_dict_rejects_another_network_or_dtype():
    ds, model = _dataset(), _model()
    tr = make_trainer(model, SGD(model), ds, batch_size=10, dtype=numpy.float32)
    other = mlp([8, 6, 8], ["tanh", "linear"], "sigmoid_xent", name="wider")
    wrong = make_trainer(other, SGD(other), ds, batch_size=10, dtype=numpy.float32)
    with pytest.raises(ValueError, match="different network"):
        tr.load_state_dict(wrong.state_dict())
    as64 = make_trainer(model, SGD(model), ds, batch_size=10, dtype=numpy.float64)
    with pytest.raises(ValueError, match="float64"):
        tr.load_state_dict(as64.state_dict())


def test_time_budget_is_checked_at_epoch_ends():
    ds, model = _dataset(), _model()
    tr = make_trainer(model, SGD(model), ds, batch_size=10)
    tr.run(max_time=1e-12)  # already exceeded after the first step, but the epoch is finished
    assert tr.epoch == 1 and tr.iteration == 5
    tr.run(epochs=3)
    assert tr.epoch == 3 and tr.cpu_time > 0 and tr.wall_time > 0
    assert tr.history.epochs["cpu_time"] == sorted(tr.history.epochs["cpu_time"])


def test_divergence_stops_with_a_clear_error():
    ds, model = _dataset(), _model()

    class Exploding(SGD):
        def step(self, params, state, x, y):
            params, state, info = super().step(params, state, x, y)
            return params, state, {**info, "loss": math.inf if state["k"] == 3 else info["loss"]}

    tr = make_trainer(model, Exploding(model), ds, batch_size=10)
    with pytest.raises(TrainingDiverged, match="iteration 3.*learning rate"):
        tr.run(epochs=2)


def test_bad_batch_size_is_refused():
    ds, model = _dataset(), _model()
    with pytest.raises(ValueError, match="batch size"):
        make_trainer(model, SGD(model), ds, batch_size=51)


def test_reference_order_replays_the_solvers_own_generator_draws():
    from solvers import make_solver

    ds = _dataset()
    for name, draws in (("kbfgs", 1), ("kbfgs_l", 1), ("kfac", 1), ("sgd", 0), ("rmsprop", 0), ("adam", 0)):
        solver = make_solver(name, _model())
        assert solver.reference_draws_per_batch == draws
        tr = make_trainer(_model(), solver, ds, batch_size=10, seed=3, dtype=numpy.float64, order="reference")
        assert (tr.iterator.order, tr.iterator.draws_per_batch) == ("reference", draws)
        assert make_trainer(_model(), solver, ds, batch_size=10, seed=3).iterator.draws_per_batch == 0
    # the same draws as the reference loop: after the warm-start epoch, one permutation(10) per batch
    tr = make_trainer(_model(), make_solver("kbfgs", _model()), ds, batch_size=10, seed=3, order="reference")
    tr.run(epochs=2)
    legacy = numpy.random.RandomState(3)
    order = numpy.arange(50)
    for _ in range(3):  # epochs 1 and 2 trained, epoch 3's order drawn at the end of epoch 2
        perm = numpy.arange(50)
        legacy.shuffle(perm)
        order = order[perm]
        for _ in range(5):
            legacy.permutation(10)
    state = tr.iterator.state_dict()
    assert (state["epoch"], state["position"]) == (3, 0)
    numpy.testing.assert_array_equal(tr.iterator.next_indices(), order[:10])


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_device_run_is_the_host_run(xp, dtype):
    """The trainer on CuPy gives the NumPy run's history: every step loss and epoch evaluation."""
    ds, model = _dataset(), _model()
    runs = [make_trainer(model, NoisyWarmSolver(model), ds, batch_size=10, seed=3, dtype=dtype, eval_chunk=20, xp=m)
            for m in (numpy, xp)]
    for tr in runs:
        tr.run(epochs=2)
    rel = 1e-12 if dtype == numpy.float64 else 1e-5
    assert runs[1].history.steps["loss"] == pytest.approx(runs[0].history.steps["loss"], rel=rel)
    assert runs[1].history.steps["skipped"] == runs[0].history.steps["skipped"]
    for col in ("train_loss", "test_loss"):
        assert runs[1].history.epochs[col] == pytest.approx(runs[0].history.epochs[col], rel=rel)
    numpy.testing.assert_allclose(to_host(model.flatten(runs[1].params)), model.flatten(runs[0].params), rtol=rel * 10)


def test_trainer_makes_one_host_sync_per_iteration(xp):
    """All info scalars of a step come to the host in one transfer; nothing else syncs."""
    from tests.device_counts import device_work

    ds, model = _dataset(), _model()
    tr = make_trainer(model, SGD(model), ds, batch_size=10, seed=3, dtype=numpy.float32, xp=xp)
    marks = []
    with device_work(xp, forbid_syncs=False) as work:
        def on_step(trainer, row):
            marks.append(sum(xp.counters.syncs.values()) if work.exact else 0)
        tr.run(epochs=1, on_step=on_step)
    assert tr.iteration == 5
    if work.exact:
        per_iteration = [b - a for a, b in zip(marks, marks[1:])]
        assert per_iteration == [1] * 4, f"syncs per iteration {per_iteration}: {work}"


def test_host_scalars_is_one_transfer_and_keeps_types(xp):
    from tests.device_counts import device_work

    info = {"loss": xp.asarray(1.5, dtype=numpy.float32), "n": xp.asarray(3), "flag": xp.asarray(True),
            "z": xp.asarray(2.0 + 1e-30j), "host": 7, "hf": numpy.float64(0.25)}
    if xp is numpy:
        row = host_scalars(info)
    else:
        with device_work(xp) as work:
            row = host_scalars(info)
        if work.exact:
            assert work.n_syncs == 1, str(work)
    assert row == {"loss": 1.5, "n": 3, "flag": True, "z": 2.0, "host": 7, "hf": 0.25}
    assert [type(v) for v in row.values()] == [float, int, bool, float, int, float]


def test_a_batch_moves_to_the_parameters_module_once(xp):
    """Inputs are cast to the run's dtype, labels keep theirs, an autoencoder's target is its input."""
    rng = numpy.random.default_rng(0)
    labelled = data.Dataset("toy-labels", rng.random((10, 8)), rng.random((4, 8)), y_train=numpy.arange(10) % 3,
                            y_test=numpy.arange(4) % 3, n_classes=3, description="labelled toy data")
    model = mlp([8, 3], ["linear"], "softmax_xent", name="toy-clf")
    tr = make_trainer(model, SGD(model), labelled, batch_size=5, dtype=numpy.float64, xp=xp)
    idx = numpy.array([7, 2, 5])
    xb, yb = tr._batch(idx)
    assert array_module(xb, yb) is xp and xb.dtype == numpy.float64 and yb.dtype == labelled.y_train.dtype
    numpy.testing.assert_array_equal(to_host(xb), labelled.x_train[idx])
    numpy.testing.assert_array_equal(to_host(yb), labelled.y_train[idx])
    ae = make_trainer(_model(), SGD(_model()), _dataset(), batch_size=5, dtype=numpy.float32, xp=xp)
    xa, ya = ae._batch(idx)
    assert ya is xa and xa.dtype == numpy.float32


def test_the_trainer_takes_its_batches_from_the_caller():
    ds, model = _dataset(), _model()
    with pytest.raises(ValueError, match="covers 40 examples but the training set has 50"):
        Trainer(model, SGD(model), ds, data.BatchIterator(40, 10))
    tr = Trainer(model, SGD(model), ds, data.BatchIterator(50, 25, seed=1), seed=1)
    tr.run(epochs=1)
    assert tr.iteration == 2 and tr.batch_size == 25


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_a_regression_set_trains_in_the_runs_dtype(xp, dtype):
    """Float targets are a regression set: they reach the device in the run's dtype, and the loss falls."""
    rng = numpy.random.default_rng(3)
    x = rng.standard_normal((60, 4))
    y = numpy.tanh(x @ rng.standard_normal((4, 2)))
    ds = data.Dataset("toy-regression", x[:40], x[40:], y_train=y[:40], y_test=y[40:], description="tanh teacher")
    model = mlp([4, 8, 2], ["tanh", "linear"], "half_mse", name="toy-reg")
    tr = make_trainer(model, SGD(model, lr=0.1), ds, batch_size=10, dtype=dtype, xp=xp)
    xb, yb = tr._batch(numpy.arange(3))
    assert xb.dtype == yb.dtype == numpy.dtype(dtype)
    tr.run(epochs=20)
    losses = tr.history.epochs["train_loss"]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("fits", [True, False], ids=["on-device", "host-batches"])
def test_the_training_set_lives_on_the_device_when_it_fits(xp, fits, monkeypatch):
    """Under the memory rule the training set is copied once and batches are gathered on the device:
    an iteration moves only its indices; otherwise each batch is gathered on the host and copied."""
    from engine.app import train
    from tests.device_counts import device_work

    if not fits:
        monkeypatch.setattr(train, "DEVICE_DATA_FRACTION", 0.0)
    ds, model = _dataset(), _model()
    tr = make_trainer(model, SGD(model), ds, batch_size=10, seed=3, dtype=numpy.float32, xp=xp)
    assert (tr.device_data is not None) == (fits and xp is not numpy)
    idx = numpy.array([7, 2, 5, 9])
    xb, yb = tr._batch(idx)
    assert yb is xb and array_module(xb) is xp
    numpy.testing.assert_array_equal(to_host(xb), ds.x_train[idx].astype(numpy.float32))
    before = getattr(getattr(xp, "counters", None), "h2d_bytes", 0)
    with device_work(xp) as work:
        tr._batch(idx)
    if work.exact:  # one copy: the indices (int64), or the gathered batch itself
        assert work.h2d == 1 and work.n_syncs == 0
        assert xp.counters.h2d_bytes - before == (idx.size * 8 if fits else ds.x_train[idx].nbytes)
    ref = make_trainer(model, SGD(model), ds, batch_size=10, seed=3, dtype=numpy.float32, xp=numpy)
    for t in (tr, ref):
        t.run(epochs=1)
    assert tr.history.steps["loss"] == pytest.approx(ref.history.steps["loss"], rel=1e-5)


def test_the_time_budget_clock_is_stated_and_kept(xp):
    """NumPy counts the process's CPU time, CuPy the device time between CUDA events around each
    step (no extra host sync); the run's progress states which, and a resume on the other clock is refused."""
    ds, model = _dataset(), _model()
    tr = make_trainer(model, SGD(model), ds, batch_size=10, seed=3, dtype=numpy.float32, xp=xp)
    tr.run(epochs=1)
    state = tr.state_dict()
    assert state["progress"]["clock"] == ("process_time" if xp is numpy else "cuda_events")
    assert tr.cpu_time > 0
    other = make_trainer(model, SGD(model), ds, batch_size=10, seed=3, dtype=numpy.float32, xp=xp)
    other.load_state_dict(state)
    assert other.cpu_time == tr.cpu_time
    state["progress"]["clock"] = "cuda_events" if xp is numpy else "process_time"
    with pytest.raises(ValueError, match="resume it on the backend it ran on"):
        other.load_state_dict(state)


def test_host_batches_go_through_pinned_double_buffers(cupy_only, monkeypatch):
    """A training set that does not fit on the device: each batch is gathered into a pinned buffer and
    copied on a copy stream, the next one while the current step runs (all but the first of an epoch's
    batches were prefetched), alternating between two buffer pairs, with the losses of the NumPy run."""
    from engine.app import train

    xp = cupy_only
    monkeypatch.setattr(train, "DEVICE_DATA_FRACTION", 0.0)
    ds, model = _dataset(), _model()
    tr = make_trainer(model, SGD(model), ds, batch_size=10, seed=3, dtype=numpy.float32, xp=xp)
    assert tr.device_data is None
    slots = []
    original = train.PinnedStaging.take

    def take(self, idx):
        out = original(self, idx)
        slots.append(self.slot)
        return out

    monkeypatch.setattr(train.PinnedStaging, "take", take)
    tr.run(epochs=2)
    staging = tr.staging
    assert staging is not None and staging.rows == 10
    per_epoch = tr.iterator.batches_per_epoch
    assert staging.prefetched == 2 * per_epoch - 1  # every batch after the first came prefetched
    assert slots == [j % 2 for j in range(2 * per_epoch)]  # the two buffer pairs alternate
    ref = make_trainer(model, SGD(model), ds, batch_size=10, seed=3, dtype=numpy.float32, xp=numpy)
    ref.run(epochs=2)
    assert tr.history.steps["loss"] == pytest.approx(ref.history.steps["loss"], rel=1e-5)
