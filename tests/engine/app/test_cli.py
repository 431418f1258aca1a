"""The ``cstep`` command line (engine/app): exact resume for every registered solver, crash
safety under SIGKILL, one-line errors with exit status 2, progress output, info, plot, compare."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy
import pytest

import data
import nets
import solvers
from engine.app import cli, options, progress
from engine import backend
from engine.backend import backend_name
from engine.app.runfile import load_run

REPO = Path(__file__).resolve().parents[3]
TINY, WIDE, CURVES_TINY = "test-tiny-ae", "test-tiny-ae-wide", "test-curves-ae"
TOY = "test-toy"
#: 600 toy examples of 16 features, batch 100: 6 iterations per epoch; every solver's factors are tiny
SMALL = ["--net", TINY, "--n-train", "600", "--n-test", "200", "--batch-size", "100"]
CLOCKS = ("cpu_time", "wall_time")

# shared with the child process of the crash test (exec'd there)
TEST_REGISTRY = textwrap.dedent("""
    import numpy
    import data
    from nets import presets
    from nets.mlp import autoencoder

    def load_toy(data_dir=None, dtype=numpy.float32, n_train=None, n_test=None):
        # 16 features in (0, 1) on a 3-dimensional manifold: something an autoencoder can learn
        rng = numpy.random.default_rng(2024)
        n_train, n_test = n_train or 600, n_test or 200
        z = rng.standard_normal((n_train + n_test, 3))
        x = 1.0 / (1.0 + numpy.exp(-2.0 * (z @ rng.standard_normal((3, 16)))))
        return data.Dataset("test-toy", x[:n_train].astype(dtype), x[n_train:].astype(dtype),
                            description="toy sigmoid-of-low-rank set (tests only)", substitute=True)

    def tiny(weight_decay=1e-5):
        return autoencoder([16, 8, 3], "sigmoid_xent", weight_decay=weight_decay, name="test-tiny-ae")

    def wide(weight_decay=1e-5):
        return autoencoder([16, 10, 3], "sigmoid_xent", weight_decay=weight_decay, name="test-tiny-ae-wide")

    def curves_tiny(weight_decay=1e-5):
        return autoencoder([784, 16, 4], "sigmoid_xent", weight_decay=weight_decay, name="test-curves-ae")

    TEST_DATASETS = {"test-toy": load_toy}
    TEST_PRESETS = {"test-tiny-ae": (tiny, "test-toy", "tiny test autoencoder 16-8-3"),
                    "test-tiny-ae-wide": (wide, "test-toy", "tiny test autoencoder 16-10-3"),
                    "test-curves-ae": (curves_tiny, "curves", "small CURVES autoencoder 784-16-4")}
""")
_registry: dict = {}
exec(TEST_REGISTRY, _registry)

# the child process of the crash test: registers the test presets, reports every completed
# checkpoint on stdout, and can kill itself inside the N-th checkpoint write (after the temporary
# file is complete, before the rename)
CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    if os.environ.get("CSTEP_CUPY") == "standin" and os.environ.get("CSTEP_BACKEND") != "numpy":  # the parent's backend
        from tests import cupy_standin
        cupy_standin.install()
    exec({registry!r})
    presets.PRESETS.update(TEST_PRESETS)
    data.DATASETS.update(TEST_DATASETS)
    import engine.app.runfile as runfile
    real_save, count = runfile.save_run, [0]
    kill_in_write = int(os.environ.get("CSTEP_TEST_KILL_IN_WRITE", "0"))
    def save_run(path, record):
        count[0] += 1
        if count[0] == kill_in_write:
            runfile.os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)
        out = real_save(path, record)
        print("saved", record.state["progress"]["iteration"], flush=True)
        return out
    runfile.save_run = save_run
    step_sleep = float(os.environ.get("CSTEP_TEST_STEP_SLEEP", "0"))
    if step_sleep:  # slow every solver step down, so that a test can signal the process mid-run
        import time
        import solvers.base
        for cls in list(solvers.SOLVERS.values()):
            def slowed(self, *args, _real=cls.step):
                time.sleep(step_sleep)
                return _real(self, *args)
            cls.step = slowed
    from engine.app.cli import main
    sys.exit(main(sys.argv[1:]))
""").format(repo=str(REPO), registry=TEST_REGISTRY)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cstep-cache")


@pytest.fixture(autouse=True)
def tiny_presets(monkeypatch, cache_dir):
    """Test-only presets and data set (see TEST_REGISTRY) and a private data cache."""
    for name, entry in _registry["TEST_PRESETS"].items():
        monkeypatch.setitem(nets.PRESETS, name, entry)
    monkeypatch.setitem(data.DATASETS, TOY, _registry["load_toy"])
    monkeypatch.setenv("CSTEP_CACHE_DIR", str(cache_dir))
    monkeypatch.delenv("CSTEP_DATA_DIR", raising=False)


def _cstep(capsys, *argv):
    """Run ``cstep argv`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_same_run(a_path, b_path):
    """Bitwise equal parameters, solver state, iterator state and history (clock columns excepted)."""
    a, b = load_run(a_path), load_run(b_path)
    for p, q in zip(a.state["params"], b.state["params"], strict=True):
        assert p.dtype == q.dtype and p.tobytes() == q.tobytes()
    sa, sb = a.state["solver_state"], b.state["solver_state"]
    assert list(sa) == list(sb)
    for key in sa:
        if isinstance(sa[key], numpy.ndarray):
            assert sa[key].dtype == sb[key].dtype and sa[key].tobytes() == sb[key].tobytes(), key
        else:
            assert type(sa[key]) is type(sb[key]) and (sa[key] == sb[key] or sa[key] != sa[key]), key
    ia, ib = a.state["iterator"], b.state["iterator"]
    assert list(ia) == list(ib) and all(numpy.array_equal(ia[k], ib[k]) for k in ia)
    assert a.history["steps"] == b.history["steps"]
    strip = lambda t: {k: v for k, v in t.items() if k not in CLOCKS}  # noqa: E731
    assert strip(a.history["epochs"]) == strip(b.history["epochs"])
    for key in ("iteration", "epoch", "warm_started"):
        assert a.progress[key] == b.progress[key]


# --- exact resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", solvers.solver_names())
def test_resume_is_bitwise_exact(solver, tmp_path, capsys, monkeypatch):
    """4 epochs straight == 2 epochs + resume to 4 == resume from a mid-epoch checkpoint."""
    import engine.app.runfile as runfile

    full, split, mid = tmp_path / "full.h5", tmp_path / "split.h5", tmp_path / "mid.h5"
    rc, _, err = _cstep(capsys, "train", *SMALL, "--solver", solver, "--epochs", 4, "--out", full, "--quiet")
    assert rc == 0, err

    real_save = runfile.save_run

    def save_and_snapshot(path, record):
        out = real_save(path, record)
        if record.state["progress"]["iteration"] == 8:  # 2 iterations into epoch 2
            mid.write_bytes(Path(path).read_bytes())
        return out

    monkeypatch.setattr(runfile, "save_run", save_and_snapshot)
    rc, _, err = _cstep(capsys, "train", *SMALL, "--solver", solver, "--epochs", 2, "--checkpoint-every", 4,
                        "--out", split, "--quiet")
    assert rc == 0, err
    monkeypatch.setattr(runfile, "save_run", real_save)
    assert load_run(split).progress["epoch"] == 2 and load_run(mid).progress["iteration"] == 8

    for part in (split, mid):
        rc, _, err = _cstep(capsys, "resume", part, "--epochs", 4, "--quiet")
        assert rc == 0, err
        _assert_same_run(full, part)
    assert load_run(split).progress["status"] == "complete"


# --- crash safety ------------------------------------------------------------------------------------
def _start_child(argv, tmp_path, env_extra=None):
    # the same environment as this process: BLAS thread counts change summation order, hence bits
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    log = open(tmp_path / f"child-{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, argv)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=tmp_path)
    return proc, log


def _saved_iterations(log) -> list[int]:
    log.flush()
    log.seek(0)
    return [int(line.split()[1]) for line in log.read().splitlines() if line.startswith("saved ")]


@pytest.mark.cupy
@pytest.mark.parametrize("solver", ["kbfgs", "kfac"])
def test_device_run_and_resume_match_the_numpy_run(solver, tmp_path, capsys):
    """On CuPy (the stand-in in CI), `cstep train` + `cstep resume` give the NumPy process's run:
    the same losses to float64 rounding, the same iterator and progress, device state saved and read back."""
    if backend_name() != "cupy":
        pytest.skip("the active backend is NumPy: the CuPy pass (CSTEP_CUPY=standin or a GPU) runs this")
    common = [*SMALL, "--solver", solver, "--dtype", "float64", "--quiet"]
    dev = tmp_path / "dev.h5"
    rc, _, err = _cstep(capsys, "train", *common, "--epochs", 1, "--out", dev)
    assert rc == 0, err
    rc, _, err = _cstep(capsys, "resume", dev, "--epochs", 2, "--quiet")
    assert rc == 0, err
    host = tmp_path / "host.h5"
    proc, log = _start_child(["train", *common, "--epochs", 2, "--out", host], tmp_path,
                             {"CSTEP_BACKEND": "numpy", "CSTEP_CUPY": ""})
    assert proc.wait(timeout=300) == 0, (log.seek(0), log.read())[1]
    a, b = load_run(dev), load_run(host)
    assert (a.environment["backend"], b.environment["backend"]) == ("cupy", "numpy")
    assert a.progress["iteration"] == b.progress["iteration"] == 12
    numpy.testing.assert_allclose(a.history["steps"]["loss"], b.history["steps"]["loss"], rtol=1e-10)
    numpy.testing.assert_allclose(a.history["epochs"]["train_loss"], b.history["epochs"]["train_loss"], rtol=1e-10)
    for p, q in zip(a.state["params"], b.state["params"], strict=True):
        numpy.testing.assert_allclose(p, q, rtol=1e-8, atol=1e-12)
    assert list(a.state["iterator"]) == list(b.state["iterator"])
    for key, value in a.state["iterator"].items():
        numpy.testing.assert_array_equal(value, b.state["iterator"][key], err_msg=key)


def test_sigkill_at_any_moment_leaves_a_resumable_run(tmp_path, capsys):
    solver = "kbfgs" if "kbfgs" in solvers.SOLVERS else "sgd"
    common = [*SMALL, "--solver", solver, "--quiet"]
    ref = tmp_path / "ref.h5"
    rc, _, err = _cstep(capsys, "train", *common, "--epochs", 3, "--out", ref)
    assert rc == 0, err
    run = tmp_path / "run.h5"

    # 1. killed inside the 5th checkpoint write: the temporary file is complete but not yet renamed
    proc, log = _start_child(["train", *common, "--epochs", 3, "--checkpoint-every", 1, "--out", run], tmp_path,
                             {"CSTEP_TEST_KILL_IN_WRITE": "5"})
    assert proc.wait(timeout=120) == -signal.SIGKILL
    saved = _saved_iterations(log)
    assert len(saved) == 4
    assert list(tmp_path.glob(".run.h5.*.tmp")), "the killed writer's temporary file should be left behind"
    rec = load_run(run)
    assert rec.progress["iteration"] == saved[-1]
    assert len(rec.history["steps"].get("iteration", [])) == saved[-1]
    last = saved[-1]

    # 2. killed at random moments while resuming (checkpoint writes happen every iteration)
    rng = random.Random(1234)
    for _ in range(3):
        proc, log = _start_child(["resume", run, "--quiet"], tmp_path)
        deadline = time.monotonic() + 60
        while not _saved_iterations(log) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        saved = _saved_iterations(log)
        rc, out, err = _cstep(capsys, "info", run, "--json")  # always loads
        assert rc == 0, err
        progress = json.loads(out)["progress"]
        rec = load_run(run)
        # nothing earlier than the last completed checkpoint is lost
        assert progress["iteration"] >= max(saved + [last])
        assert len(rec.history["steps"].get("iteration", [])) == progress["iteration"]
        last = progress["iteration"]

    # 3. finishing the run gives bit for bit the uninterrupted result, and removes stale temporaries
    rc, _, err = _cstep(capsys, "resume", run, "--quiet")
    assert rc == 0, err
    _assert_same_run(ref, run)
    assert not list(tmp_path.glob(".run.h5.*.tmp"))


# --- bad input -------------------------------------------------------------------------------------------
def _assert_one_line_error(rc, out, err, pattern):
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    """One short finished run (sgd, 2 epochs, on 600 CURVES-like examples), shared by the read-only tests."""
    path = tmp_path_factory.mktemp("tiny-run") / "tiny.h5"
    mp = pytest.MonkeyPatch()
    for name, entry in _registry["TEST_PRESETS"].items():
        mp.setitem(nets.PRESETS, name, entry)
    mp.setenv("CSTEP_CACHE_DIR", str(cache_dir))
    try:
        assert cli.main(["train", "--net", CURVES_TINY, "--n-train", "600", "--n-test", "200", "--batch-size", "100",
                         "--solver", "sgd", "--lr", "0.05", "--epochs", "2", "--out", str(path), "--quiet"]) == 0
    finally:
        mp.undo()
    return path


def _solver_with(name):
    for s in solvers.solver_names():
        if name in solvers.get_solver(s).hyperparameters:
            return s
    pytest.skip(f"no registered solver takes {name}")


@pytest.mark.parametrize("argv, message", [
    (["train", "--net", "no-such-net"], "unknown network 'no-such-net'"),
    (["train", "--solver", "no-such-solver"], "unknown solver 'no-such-solver'"),
    (["train", *SMALL, "--solver", "sgd", "--lr", "-0.1"], "lr must be > 0"),
    (["train", *SMALL, "--solver", "sgd", "--lr", "abc"], "lr must be a number"),
    (["train", *SMALL, "--solver", "sgd", "--dtype", "float16"], f"dtype 'float16' is not supported by the {backend_name()} backend"),
    (["train", *SMALL, "--dtype", "complex128"], "dtype 'complex128' is not supported"),
    (["train", *SMALL, "--data-dir", "/no/such/dir"], "data directory /no/such/dir does not exist"),
    (["train", *SMALL, "--data", "no-such-data"], "unknown data set 'no-such-data'"),
    (["train", *SMALL, "--batch-size", "601"], "batch size"),
    (["train", "--epochs", "0"], "expected a positive integer"),
    (["train", "--no-such-option"], "unrecognized arguments"),
    (["info"], "the following arguments are required"),
    (["plot", "x.h5"], "-o/--output"),
])
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        rc = exc.code
    out, err = capsys.readouterr()
    _assert_one_line_error(rc, out, err, message)


def test_bad_damping_and_hyper_parameter_of_another_solver(capsys):
    solver = _solver_with("damping")
    rc, out, err = _cstep(capsys, "train", *SMALL, "--solver", solver, "--damping", "0")
    _assert_one_line_error(rc, out, err, "damping must be > 0")
    rc, out, err = _cstep(capsys, "train", *SMALL, "--solver", solver, "--damping", "-1")
    _assert_one_line_error(rc, out, err, "damping must be > 0")
    rc, out, err = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--damping", "1")
    _assert_one_line_error(rc, out, err, "solver sgd has no hyper-parameter --damping")


def test_missing_data_dir_from_environment(capsys, monkeypatch):
    monkeypatch.setenv("CSTEP_DATA_DIR", "/no/such/data")
    rc, out, err = _cstep(capsys, "train", *SMALL)
    _assert_one_line_error(rc, out, err, "CSTEP_DATA_DIR")


def test_bad_run_files_are_refused(tmp_path, tiny_run, capsys):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5\n")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(numpy.random.default_rng(0).integers(0, 256, 4096, dtype=numpy.uint8).tobytes())
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(tiny_run.read_bytes()[:6000])
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["weights"] = numpy.zeros(3)
    for command in ("info", "resume", "plot"):
        extra = ["-o", str(tmp_path / "x.png")] if command == "plot" else []
        rc, out, err = _cstep(capsys, command, text, *extra)
        _assert_one_line_error(rc, out, err, "is not an HDF5 file")
        rc, out, err = _cstep(capsys, command, garbage, *extra)
        _assert_one_line_error(rc, out, err, "is not an HDF5 file")
        rc, out, err = _cstep(capsys, command, foreign, *extra)
        _assert_one_line_error(rc, out, err, "not a cstep run file")
        rc, out, err = _cstep(capsys, command, tmp_path / "missing.h5", *extra)
        _assert_one_line_error(rc, out, err, "does not exist")
        rc, out, err = _cstep(capsys, command, truncated, *extra)
        assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_run_from_an_incompatible_network_is_refused(tmp_path, tiny_run, capsys):
    moved = tmp_path / "moved.h5"
    moved.write_bytes(tiny_run.read_bytes())
    with h5py.File(moved, "a") as f:  # the file claims a network whose shapes differ from its parameters
        config = json.loads(f["config"].attrs["json"])
        config["net"] = WIDE
        f["config"].attrs["json"] = json.dumps(config)
    rc, out, err = _cstep(capsys, "resume", moved, "--epochs", 3)
    _assert_one_line_error(rc, out, err, "incompatible network")
    gone = tmp_path / "gone.h5"
    gone.write_bytes(tiny_run.read_bytes())
    with h5py.File(gone, "a") as f:
        config = json.loads(f["config"].attrs["json"])
        config["net"] = "retired-net"
        f["config"].attrs["json"] = json.dumps(config)
    rc, out, err = _cstep(capsys, "resume", gone)
    _assert_one_line_error(rc, out, err, "unknown network 'retired-net'")


def test_existing_run_file_is_not_overwritten(tiny_run, capsys):
    before = tiny_run.read_bytes()
    rc, out, err = _cstep(capsys, "train", *SMALL, "--out", tiny_run)
    _assert_one_line_error(rc, out, err, "already exists")
    assert tiny_run.read_bytes() == before


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for argv, message in ((["train", "--net", "nope"], "unknown network"), (["train", "--dtype", "float16"], "float16"),
                          (["info", str(tmp_path)], "directory")):
        proc = subprocess.run([sys.executable, "-m", "engine", *argv], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)
        assert proc.returncode == 2 and proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


# --- output: progress, JSON, info, plot, compare -------------------------------------------------------------
def test_progress_lines_quiet_and_json(tmp_path, capsys):
    rc, out, err = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--epochs", 2, "--out", tmp_path / "a.h5")
    assert rc == 0
    lines = err.strip().splitlines()  # not a terminal: the initial point, then one plain line per epoch
    assert len(lines) == 3 and lines[0].startswith("initial point  train loss")
    assert lines[1].startswith("epoch 1/2") and lines[2].startswith("epoch 2/2")
    assert "train loss" in lines[2] and "test loss" in lines[2]
    assert "run file:" in out

    rc, out, err = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--epochs", 2, "--out", tmp_path / "b.h5", "--quiet")
    assert rc == 0 and out == "" and err == ""

    rc, out, err = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--epochs", 2, "--out", tmp_path / "c.h5",
                          "--quiet", "--json")
    assert rc == 0 and err == ""
    summary = json.loads(out)
    rec = load_run(tmp_path / "c.h5")
    assert summary["run"] == str(tmp_path / "c.h5")
    assert summary["epochs"] == 2 and summary["iterations"] == 12
    assert summary["train_loss"] == rec.history["epochs"]["train_loss"]
    assert summary["test_loss"] == rec.history["epochs"]["test_loss"]
    assert summary["backend"] == backend_name() and summary["dtype"] == "float32"
    assert summary["elapsed_seconds"] > 0 and summary["status"] == "complete"
    # training lowered the loss below that of the first minibatch
    assert summary["train_loss"][-1] < rec.history["steps"]["loss"][0]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(progress.Progress, "refresh_interval", 0.0)  # redraw at every step, however fast
    rc = cli.main(["train", *SMALL, "--solver", "sgd", "--epochs", "2", "--out", str(tmp_path / "a.h5")])
    assert rc == 0
    text = term.getvalue()
    assert "it/s" in text and "loss=" in text and "epoch 1/2" in text  # tqdm bar with loss and rate
    assert "\r" in text


def test_info_text_and_json(tiny_run, capsys):
    rc, out, err = _cstep(capsys, "info", tiny_run)
    assert rc == 0 and err == ""
    for needle in (CURVES_TINY, "sgd", "lr=0.05", "epoch 2/2", "iteration 12", "final", "train loss", "NumPy", f"backend {backend_name()}",
                   "substitute"):
        assert needle in out, needle
    rc, out, err = _cstep(capsys, "info", tiny_run, "--json")
    info = json.loads(out)
    assert info["config"]["net"] == CURVES_TINY and info["hyperparameters"]["lr"] == 0.05
    assert info["progress"]["epoch"] == 2 and info["progress"]["status"] == "complete"
    assert info["final"]["train_loss"] == info["epochs"]["train_loss"][-1]
    assert info["environment"]["numpy"] == numpy.__version__
    assert info["steps_recorded"] == 12


def _png_pixels(path):
    import matplotlib.image

    raw = Path(path).read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_plot_overlays_runs(tmp_path, tiny_run, capsys):
    other = tmp_path / "other.h5"
    rc, _, _ = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--lr", "0.2", "--epochs", 3, "--out", other, "--quiet")
    assert rc == 0
    fig = tmp_path / "fig.png"
    rc, out, err = _cstep(capsys, "plot", tiny_run, other, "-o", fig)
    assert rc == 0 and str(fig) in out
    pixels = _png_pixels(fig)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 800
    assert pixels[..., :3].std() > 0.05  # not blank
    fresh = tmp_path / "fresh.h5"  # a run with no finished epoch cannot be plotted alone
    rc, _, _ = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--epochs", 1, "--out", fresh, "--quiet")
    with h5py.File(fresh, "a") as f:
        for name in list(f["history/epochs"]):
            del f["history/epochs"][name]
        f["history/epochs"].attrs["columns"] = "[]"
    rc, out, err = _cstep(capsys, "plot", fresh, "-o", tmp_path / "none.png")
    _assert_one_line_error(rc, out, err, "no completed epoch")


def test_compare_runs_every_solver_on_the_same_budget(tmp_path, capsys):
    names = solvers.solver_names()
    chosen = [s for s in ("kbfgs", "adam", "sgd") if s in names][:2] or names[:1]
    rc, out, err = _cstep(capsys, "compare", "--net", TINY, "--solvers", ",".join(chosen), "--epochs", 1,
                          "--n-train", 600, "--n-test", 200, "--batch-size", 100, "--out-dir", tmp_path / "cmp",
                          "--set", f"{chosen[0]}.lr=0.01")
    assert rc == 0, err
    files = sorted((tmp_path / "cmp").glob("*.h5"))
    assert len(files) == len(chosen)
    records = [load_run(f) for f in files]
    for key in ("seed", "batch_size", "epochs", "data_fingerprint", "dtype", "net"):
        assert len({json.dumps(r.config[key]) for r in records}) == 1, key
    assert {r.config["solver"] for r in records} == set(chosen)
    assert next(r for r in records if r.config["solver"] == chosen[0]).hyperparameters["lr"] == 0.01
    assert len(list((tmp_path / "cmp").glob("compare-*.png"))) == 1
    table = out.splitlines()
    assert table[0].split()[:3] == ["solver", "status", "epochs"]
    assert sum(line.split()[0] in chosen for line in table[2:]) == len(chosen)
    rc, out, err = _cstep(capsys, "compare", "--net", TINY, "--solvers", "sgd,nope", "--out-dir", tmp_path / "c2")
    _assert_one_line_error(rc, out, err, "unknown solver 'nope'")
    rc, out, err = _cstep(capsys, "compare", "--net", TINY, "--solvers", "sgd", "--set", "sgd.damping=1",
                          "--out-dir", tmp_path / "c2")
    _assert_one_line_error(rc, out, err, "has no hyper-parameter")


# --- help -------------------------------------------------------------------------------------------------------------
def test_help_lists_every_command_option_solver_and_preset(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    top = capsys.readouterr().out
    commands = ["train", "resume", "info", "plot", "compare", "study"]
    for command in commands:
        assert command in top
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: cstep {command}")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines at hyphens
    for name in nets.preset_names() + solvers.solver_names():
        assert name in text
    for solver in solvers.solver_names():
        for key in solvers.get_solver(solver).hyperparameters:
            assert options.hyper_flag(key) in text


def test_train_defaults_are_the_readme_main_job():
    args = cli.build_parser().parse_args(["train"])
    assert (args.net, args.solver, args.dtype, args.seed, args.init, args.order) == \
        ("curves-ae", "kbfgs", "float32", 9999, "torch", "reference")
    # the main job: batch 100 and 5 epochs for curves-ae (the reference protocol's 1000 leaves the plateau late)
    assert args.batch_size is None and options.PRESET_BATCH_SIZES["curves-ae"] == 100
    assert options.DEFAULT_BATCH_SIZE == 1000 and options.PRESET_BATCH_SIZES["mnist-cnn"] == 128
    assert args.epochs is None and args.max_time is None and options.PRESET_EPOCHS["curves-ae"] == 5
    assert args.threads == 1
    assert nets.PRESETS["curves-ae"][1] == "curves"


def test_divergence_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    path = tmp_path / "nan.h5"
    rc, out, err = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--lr", "1e30", "--momentum", "0",
                          "--epochs", 3, "--checkpoint-every", 1, "--out", path, "--json")
    assert rc == 1 and "became" in err and "Traceback" not in err
    assert json.loads(out)["status"] == "diverged"
    rec = load_run(path)
    assert rec.progress["status"] == "diverged"
    assert all(numpy.isfinite(p).all() for p in rec.state["params"])
    assert all(numpy.isfinite(rec.history["steps"]["loss"]))


def test_tuned_defaults_apply_unless_overridden(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(options.TUNED_HYPERPARAMETERS, (TINY, "sgd"), {"lr": 0.07})
    rc, _, err = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--epochs", 1, "--out", tmp_path / "a.h5", "--quiet")
    assert rc == 0, err
    assert load_run(tmp_path / "a.h5").hyperparameters == {"lr": 0.07, "momentum": 0.9, "heavy_ball": False}
    rc, _, err = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--lr", "0.02", "--epochs", 1, "--out", tmp_path / "b.h5",
                        "--quiet")
    assert rc == 0, err
    assert load_run(tmp_path / "b.h5").hyperparameters["lr"] == 0.02
    assert options.TUNED_HYPERPARAMETERS[("curves-ae", "kbfgs")]["damping"] > 0


def test_init_option_starts_from_pytorch_weights_and_is_recorded(tmp_path, capsys):
    paths = {init: tmp_path / f"{init}.h5" for init in ("torch", "numpy")}
    for (init, path), order in zip(paths.items(), ("reference", "pcg64")):
        rc, _, err = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--epochs", 1, "--init", init,
                            "--order", order, "--out", path, "--quiet")
        assert rc == 0, err
    runs = {init: load_run(path) for init, path in paths.items()}
    assert (runs["torch"].config["init"], runs["torch"].config["order"]) == ("torch", "reference")
    assert (runs["numpy"].config["init"], runs["numpy"].config["order"]) == ("numpy", "pcg64")
    assert runs["torch"].state["iterator"]["reference_order"] == 1 and runs["numpy"].state["iterator"]["reference_order"] == 0
    # the tiny net's initial weights are PyTorch's: torch.manual_seed(9999), then nn.Linear(16, 8),
    # (8, 3), (3, 8), (8, 16); these sums and the last bias were printed by PyTorch 2.13
    model = nets.build(TINY)
    p = [q.astype(numpy.float64) for q in model.init(seed=9999, dtype=numpy.float32, xp=numpy, init="torch")]
    assert sum(float(q.sum()) for q in p) == -1.2924946695566177
    assert float(sum((q ** 2).sum() for q in p)) == 14.597635029901669
    assert float(p[-1][-1]) == float.fromhex("-0x1.c4a9c8p-3")
    # ... and the run started there: SGD has no warm start, so its first batch is rows 0..99
    x = _registry["load_toy"]().x_train[:100]
    first = float(model.loss([q.astype(numpy.float32) for q in p], x, x))
    assert runs["torch"].history["steps"]["loss"][0] == pytest.approx(first, rel=1e-6)
    assert runs["numpy"].history["steps"]["loss"][0] != pytest.approx(first, rel=1e-6)
    rc, out, _ = _cstep(capsys, "info", paths["torch"])
    assert rc == 0 and "seed 9999 (torch init, reference order)" in out


def test_run_files_from_before_init_and_order_resume_as_numpy_and_pcg64(tmp_path, capsys):
    """A run file written before --init/--order existed has neither in its config nor the new iterator
    fields; it was made with NumPy weights and the PCG64 order and must resume as such, bit for bit."""
    full, old = tmp_path / "full.h5", tmp_path / "old.h5"
    common = (*SMALL, "--solver", "kbfgs", "--init", "numpy", "--order", "pcg64", "--quiet")
    rc, _, err = _cstep(capsys, "train", *common, "--epochs", 3, "--out", full)
    assert rc == 0, err
    rc, _, err = _cstep(capsys, "train", *common, "--epochs", 2, "--out", old)
    assert rc == 0, err
    with h5py.File(old, "r+") as f:  # make it look like the format before
        config = json.loads(f["config"].attrs["json"])
        for key in ("init", "order"):
            del config[key], f["config"].attrs[key]
        f["config"].attrs["json"] = json.dumps(config)
        it = f["iterator"]
        index = [pair for pair in json.loads(it.attrs["cstep_index"]) if pair[0] not in ("reference_order", "draws_per_batch")]
        for key in ("reference_order", "draws_per_batch"):
            del it[key]
        it.attrs["cstep_index"] = json.dumps(index)
    rec = load_run(old)
    assert "order" not in rec.config and "reference_order" not in rec.state["iterator"]
    rc, _, err = _cstep(capsys, "resume", old, "--epochs", 3, "--quiet")
    assert rc == 0, err
    _assert_same_run(full, old)


def test_preset_batch_size_applies_unless_given(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(options.PRESET_BATCH_SIZES, TINY, 50)
    base = ["--net", TINY, "--n-train", "600", "--n-test", "200", "--solver", "sgd", "--epochs", 1, "--quiet"]
    for extra, expected in (((), 50), (("--batch-size", 120), 120)):
        path = tmp_path / f"b{expected}.h5"
        rc, _, err = _cstep(capsys, "train", *base, *extra, "--out", path)
        assert rc == 0, err
        rec = load_run(path)
        assert rec.config["batch_size"] == expected and rec.progress["iteration"] == 600 // expected


def test_cuda_graph_is_recorded_and_refused_without_a_device(capsys, tmp_path, tiny_run):
    """``--cuda-graph`` (engine.cuda_graph) lands in the run file's config; on NumPy it is refused in one line."""
    assert load_run(tiny_run).config["cuda_graph"] is False
    if cli_backend_is_device():
        pytest.skip("a CUDA device is present: the refusal is for NumPy")
    rc, _, err = _cstep(capsys, "train", "--net", CURVES_TINY, "--n-train", "600", "--n-test", "200", "--batch-size", "100",
                        "--solver", "kbfgs", "--epochs", "1", "--cuda-graph", "--out", tmp_path / "g.h5", "--quiet")
    assert rc == 2 and "Traceback" not in err and "--cuda-graph needs CuPy on a CUDA device" in err, err
    assert not (tmp_path / "g.h5").exists()


def cli_backend_is_device() -> bool:
    xp = backend.get_xp()
    return xp is not numpy and not getattr(xp, "_standin", False)
