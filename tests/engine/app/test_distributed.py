"""Data-parallel training over MPI with real processes (``mpiexec -n 2``; engine/parallel.py,
engine/communicator.py, engine/app/distributed.py).

The reference is the single-process run of the same case in this process: with 2 ranks the
float64 loss trajectory of every solver listed in issue 17 must equal it to relative 1e-12 over
20 iterations, on a small MLP and a small CNN, and both ranks must end with bitwise identical
parameters. Through the command line: a run file written by rank 0 alone, recording the world
size; resume on 2 ranks is bit for bit a straight 2-rank run; resume on 1 rank works and says it is
not bit for bit.

Needs ``mpiexec`` and mpi4py (the ``[mpi]`` extra). Without them the tests skip, except under
``CI=true``, where they fail: CI installs the extra and must run them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from engine.app.runfile import load_run
from tests.distributed.cases import HYPER, ITERATIONS, trainer

REPO = Path(__file__).resolve().parents[3]


def _mpiexec() -> str | None:
    """mpiexec beside this Python (the mpich wheel puts it there) or on PATH, when mpi4py imports."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()


@pytest.fixture
def mpiexec():
    if os.environ.get("CSTEP_CUPY") == "standin":
        pytest.skip("the MPI ranks run on NumPy: the NumPy pass runs these tests (CuPy ranks need NCCL and GPUs)")
    if MPIEXEC is None:
        message = "mpiexec and mpi4py are needed (pip install -e '.[mpi]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the data-parallel tests: {message}")
        pytest.skip(message)
    return MPIEXEC


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["CSTEP_BACKEND"] = "numpy"  # MPI ranks run on NumPy (CuPy ranks would need NCCL and GPUs)
    env.pop("CSTEP_CUPY", None)
    return env


def _launch(mpiexec, n: int, *argv, cwd=None, timeout=120):
    return subprocess.run([mpiexec, "-n", str(n), sys.executable, *map(str, argv)], env=_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_two_ranks_follow_the_single_process_trajectory(net, mpiexec, tmp_path):
    out = tmp_path / "result.npz"
    proc = _launch(mpiexec, 2, "-m", "tests.distributed.worker", out, net, *HYPER)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = numpy.load(out)
    for name in HYPER:
        ref = trainer(net, name)
        with numpy.errstate(over="ignore"):
            ref.run(epochs=1)
        want = numpy.array(ref.history.steps["loss"])
        got = result[f"{name}/loss"]
        assert len(want) == len(got) == ITERATIONS
        assert numpy.all(numpy.isfinite(want))
        assert numpy.max(numpy.abs(got / want - 1)) < 1e-12, (name, got, want)
        assert want[-1] < want[0], name  # the runs train: the comparison is not of two stalled runs
        assert bool(result[f"{name}/same_on_all_ranks"]), f"{name}: the ranks' parameters drifted apart"
        flat = numpy.concatenate([p.ravel() for p in ref.params])
        numpy.testing.assert_allclose(result[f"{name}/params"], flat, rtol=0, atol=1e-12)
        assert numpy.all(result[f"{name}/comm_bytes"] > 0)


def test_uneven_shards_weight_the_global_batch(mpiexec, tmp_path):
    """A batch of 15 splits 7 + 8: the shards' means are weighted by 7/15 and 8/15, not averaged; and
    K-FAC's device-drawn targets of rank 1 are those of global rows 7..14 (counter rows offset)."""
    out = tmp_path / "result.npz"
    cases = ("sgd", "kfac", "kfac_device_rng")
    proc = _launch(mpiexec, 2, "-m", "tests.distributed.worker", out, "mlp", *cases, "--batch", 15)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = numpy.load(out)
    for name in cases:
        ref = trainer("mlp", name, batch=15)
        ref.run(epochs=1)
        want = numpy.array(ref.history.steps["loss"])
        assert numpy.max(numpy.abs(result[f"{name}/loss"] / want - 1)) < 1e-12, name


SMALL = ["--net", "test-tiny-ae", "--n-train", "600", "--n-test", "200", "--batch-size", "100", "--dtype", "float64", "--quiet"]


def _cstep(mpiexec, n, *argv, cwd):
    return _launch(mpiexec, n, "-m", "tests.distributed.cli_child", *argv, cwd=cwd)


def _same_state(a_path, b_path):
    a, b = load_run(a_path), load_run(b_path)
    for p, q in zip(a.state["params"], b.state["params"], strict=True):
        assert p.tobytes() == q.tobytes()
    for key, value in a.state["solver_state"].items():
        if isinstance(value, numpy.ndarray):
            assert value.tobytes() == b.state["solver_state"][key].tobytes(), key
    assert a.history["steps"]["loss"] == b.history["steps"]["loss"]


def test_command_line_train_and_resume_on_two_ranks(mpiexec, tmp_path):
    full, split, other = tmp_path / "full.h5", tmp_path / "split.h5", tmp_path / "other.h5"
    proc = _cstep(mpiexec, 2, "train", *SMALL, "--solver", "kbfgs", "--epochs", 2, "--out", full, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = load_run(full)
    assert rec.config["world_size"] == 2 and rec.progress["world_size"] == 2
    assert "comm_bytes" in rec.history["steps"] and min(rec.history["steps"]["comm_bytes"]) > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".h5") == ["full.h5"]  # no per-rank files

    # the same world size, with KAISA's one-owner-per-layer split of the factor work (checkpoints
    # gather every layer's state from its owner): bit for bit the run above
    proc = _cstep(mpiexec, 2, "train", *SMALL, "--solver", "kbfgs", "--epochs", 1, "--out", split,
                  "--grad-worker-fraction", 0.5, "--checkpoint-every", 4, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kaisa = load_run(split).progress["kaisa"]
    assert kaisa["grad_workers_per_layer"] == 1 and sorted({v["owner"] for v in kaisa["layers"].values()}) == [0, 1]
    shutil.copy(split, other)
    proc = _cstep(mpiexec, 2, "resume", split, "--epochs", 2, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not be bit for bit" not in proc.stderr
    _same_state(full, split)

    # another world size: it works, says so, and stays within rounding of the 2-rank run
    proc = subprocess.run([sys.executable, "-m", "tests.distributed.cli_child", "resume", str(other), "--epochs", "2", "--quiet"],
                          env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpointed with 2 rank(s) and continues on 1" in proc.stderr and "not be bit for bit" in proc.stderr
    a, b = load_run(full).history["steps"]["loss"], load_run(other).history["steps"]["loss"]
    numpy.testing.assert_allclose(b, a, rtol=1e-10)
    assert load_run(other).progress["world_size"] == 1


@pytest.mark.parametrize("net, fraction, ranks", [("mlp", 1.0, 2), ("mlp", 0.5, 2), ("cnn", 0.5, 2), ("mlp", 0.5, 4)])
def test_kaisa_factor_work_gives_the_same_run(net, fraction, ranks, mpiexec, tmp_path):
    """KAISA: each layer's owner computes its factor work and shares it (fraction 1: the inverses
    with every rank; 1/2 on 2 ranks: only the preconditioned momentum travels; 1/2 on 4 ranks:
    groups of 2 gradient workers, P sent to the other group). Same trajectory
    and damping/skip counts as one process, identical parameters on both ranks, and after a gather
    identical solver states (what a checkpoint writes)."""
    out = tmp_path / "result.npz"
    names = ["kfac", "kbfgs", "kbfgs_l"]
    proc = _launch(mpiexec, ranks, "-m", "tests.distributed.worker", out, net, *names, "--fraction", fraction)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = numpy.load(out)
    for name in names:
        ref = trainer(net, name)
        ref.run(epochs=1)
        want = numpy.array(ref.history.steps["loss"])
        assert numpy.max(numpy.abs(result[f"{name}/loss"] / want - 1)) < 1e-12, name
        assert bool(result[f"{name}/same_on_all_ranks"]) and bool(result[f"{name}/state_same_on_all_ranks"]), name
        assert bool(result[f"{name}/state_layout_kept"]), f"{name}: gathering changed a state entry's shape or dtype"
        for key in ("powell_damping", "skipped_H_g", "skipped_H_a"):
            if f"{name}/{key}" in result:
                numpy.testing.assert_array_equal(result[f"{name}/{key}"], ref.history.steps[key], err_msg=f"{name} {key}")


def test_errors_stop_every_rank_with_one_line(mpiexec, tmp_path):
    """A usage error is found by every rank alike, so all of them stop (no rank left waiting in a
    collective) with the same one-line message and exit status 2."""
    taken = tmp_path / "taken.h5"
    taken.write_bytes(b"")
    cases = [(["train", *SMALL, "--solver", "sgd", "--out", taken], "already exists"),
             (["train", *SMALL, "--solver", "kfac", "--grad-worker-fraction", 0.3, "--out", tmp_path / "a.h5"],
              "--grad-worker-fraction 0.3 on 2 ranks"),
             (["compare", "--net", "test-tiny-ae", "--solvers", "sgd,adam"], "cstep compare runs in one process")]
    for argv, message in cases:
        proc = _cstep(mpiexec, 2, *argv, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        # both ranks said it (mpiexec may run their lines together), and nothing else: no traceback
        assert proc.stderr.count(": error: ") == 2 and proc.stderr.count(message) == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_a_time_budget_stops_every_rank_after_the_same_iteration(mpiexec, tmp_path):
    """--max-time on 2 ranks: each rank's own clock differs, so rank 0's decides (broadcast every
    iteration); a rank that stopped alone would leave the other waiting in a collective (a hang,
    caught by the launch timeout)."""
    out = tmp_path / "timed.h5"
    proc = _cstep(mpiexec, 2, "train", *SMALL, "--solver", "kfac", "--max-time", 0.3, "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = load_run(out)
    assert rec.progress["cpu_time"] >= 0.3 and rec.progress["world_size"] == 2
