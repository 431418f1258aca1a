"""What a newcomer meets in the first hour, and the edges that used to crash or mislead: names
with hyphens, a network given the wrong kind of data, listings of presets and solvers, per-solver
help, accuracy in the JSON summary, and the messages of resume, --out and divergence. Each test
here failed before its fix."""

from __future__ import annotations

import json

import h5py
import numpy
import pytest

import data
import nets
import solvers
from engine.app.runfile import load_run
from nets.mlp import mlp
from tests.engine.app.test_cli import SMALL, TINY, TOY, _cstep, cache_dir, tiny_presets  # noqa: F401 (fixtures)

CLASSIFY = "test-toy-classify"
CLASSIFIER = "test-tiny-classifier"


def _load_labelled(data_dir=None, dtype=numpy.float32, n_train=None, n_test=None):
    rng = numpy.random.default_rng(5)
    n_train, n_test = n_train or 600, n_test or 200
    x = rng.standard_normal((n_train + n_test, 16)).astype(dtype)
    y = (x[:, :3].argmax(axis=1)).astype(numpy.int64)
    return data.Dataset(CLASSIFY, x[:n_train], x[n_train:], y_train=y[:n_train], y_test=y[n_train:], n_classes=3,
                        description="toy 3-class set (tests only)", substitute=True)


def _classifier(weight_decay=1e-5):
    return mlp([16, 8, 3], ["tanh", "linear"], "softmax_xent", weight_decay=weight_decay, name=CLASSIFIER)


@pytest.fixture(autouse=True)
def labelled_presets(monkeypatch):
    monkeypatch.setitem(data.DATASETS, CLASSIFY, _load_labelled)
    monkeypatch.setitem(nets.PRESETS, CLASSIFIER, (_classifier, CLASSIFY, "tiny test classifier 16-8-3"))


# --- 6. names and data sets ----------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["newton-krylov", "kbfgs-l", "hessian-free", "KBFGS_L"])
def test_hyphen_and_underscore_solver_names_are_the_same(solver, tmp_path, capsys):
    rc, out, err = _cstep(capsys, "train", *SMALL, "--solver", solver, "--epochs", 1, "--out", tmp_path / "r.h5", "--json")
    assert rc == 0, err
    assert json.loads(out)["solver"] == solver.lower().replace("-", "_")


def test_hyphenated_names_in_compare_and_set(tmp_path, capsys):
    rc, out, err = _cstep(capsys, "compare", "--net", TINY.replace("-", "_"), "--n-train", 600, "--n-test", 200,
                          "--batch-size", 100, "--solvers", "kbfgs-l,sgd", "--set", "kbfgs-l.lr=0.1", "--epochs", 1,
                          "--out-dir", tmp_path, "--quiet", "--json")
    assert rc == 0, err
    runs = json.loads(out)["runs"]
    assert [r["solver"] for r in runs] == ["kbfgs_l", "sgd"] and runs[0]["hyperparameters"]["lr"] == 0.1


def test_a_network_given_the_wrong_kind_of_data_names_the_right_one(tmp_path, capsys):
    rc, _, err = _cstep(capsys, "train", "--net", CLASSIFIER, "--data", TOY, "--epochs", 1, "--out", tmp_path / "a.h5")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "is a classifier" in err and f"use --data {CLASSIFY}" in err
    rc, _, err = _cstep(capsys, "train", *SMALL, "--data", CLASSIFY, "--epochs", 1, "--out", tmp_path / "b.h5")
    assert rc == 2 and "reconstructs its input" in err and len(err.strip().splitlines()) == 1


# --- 5. listings and help --------------------------------------------------------------------------
def test_presets_and_solvers_are_listed_with_descriptions_and_defaults(capsys):
    rc, out, _ = _cstep(capsys, "presets")
    assert rc == 0
    for name in nets.preset_names():
        assert name in out
    assert "842,340 parameters" in out  # curves-ae
    rc, out, _ = _cstep(capsys, "solvers")
    for line, name in zip(out.splitlines(), sorted(solvers.SOLVERS)):
        assert line.startswith(name)
    assert "Goldfarb, Ren, Bahamou" in out
    rc, out, _ = _cstep(capsys, "solvers", "kbfgs-l", "--json")
    info = json.loads(out)
    assert info["name"] == "kbfgs_l" and info["hyperparameters"]["memory"]["default"] == 100
    rc, _, err = _cstep(capsys, "solvers", "nope")
    assert rc == 2 and "unknown solver 'nope'" in err


def test_help_says_what_the_default_job_is_and_narrows_to_one_solver(capsys):
    with pytest.raises(SystemExit):
        _cstep(capsys, "--help")
    top = capsys.readouterr().out
    assert "a few epochs" not in top and "curves-ae with kbfgs for 5 epochs" in top
    with pytest.raises(SystemExit):
        _cstep(capsys, "train", "--solver", "adam", "--help")
    text = capsys.readouterr().out
    assert "hyper-parameters of adam" in text and "--beta2" in text and "--memory" not in text and "--inverse-freq" not in text
    with pytest.raises(SystemExit):
        _cstep(capsys, "train", "--help")
    text = capsys.readouterr().out
    assert "kbfgs_l: --lr" in text and "--memory" in text


# --- 14. JSON and info -----------------------------------------------------------------------------
def test_json_summary_of_a_classifier_carries_its_accuracy(tmp_path, capsys):
    rc, out, err = _cstep(capsys, "train", "--net", CLASSIFIER, "--solver", "adam", "--batch-size", 100, "--epochs", 2,
                          "--out", tmp_path / "c.h5", "--json")
    assert rc == 0, err
    summary = json.loads(out)
    rec = load_run(tmp_path / "c.h5")
    assert summary["test_accuracy"] == rec.history["epochs"]["test_accuracy"] and len(summary["train_accuracy"]) == 3  # epochs 0, 1, 2
    rc, out, _ = _cstep(capsys, "train", "--net", CLASSIFIER, "--solver", "adam", "--batch-size", 100, "--epochs", 1,
                        "--out", tmp_path / "d.h5")
    assert "test accuracy" in out


def test_info_of_a_time_budget_run_says_unlimited_epochs(tmp_path, capsys):
    rc, _, err = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--max-time", 1e-9, "--out", tmp_path / "t.h5", "--quiet")
    assert rc == 0, err
    rc, out, _ = _cstep(capsys, "info", tmp_path / "t.h5")
    assert "epochs None" not in out and "epochs unlimited (time budget)" in out


# --- 11. messages -----------------------------------------------------------------------------------
def test_resume_names_the_parameter_that_does_not_fit(tmp_path, capsys):
    path = tmp_path / "r.h5"
    rc, _, err = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--epochs", 1, "--out", path, "--quiet")
    assert rc == 0, err
    with h5py.File(path, "r+") as f:
        w = f["params/p002"][()]
        del f["params/p002"]
        f["params"].create_dataset("p002", data=w.T.copy())
    rc, _, err = _cstep(capsys, "resume", path)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"parameter p002 (layer 2, Dense) has shape {w.T.shape} where the network needs {w.shape}" in err


def test_out_pointing_at_a_directory_says_so(tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    rc, _, err = _cstep(capsys, "train", *SMALL, "--epochs", 1, "--out", tmp_path / "adir")
    assert rc == 2 and "is a directory; give a file name for --out" in err and "cstep resume" not in err


def test_resume_to_fewer_epochs_than_done_is_refused_and_changes_nothing(tmp_path, capsys):
    path = tmp_path / "done.h5"
    rc, _, err = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--epochs", 3, "--out", path, "--quiet")
    assert rc == 0, err
    before = path.read_bytes()
    rc, _, err = _cstep(capsys, "resume", path, "--epochs", 2)
    assert rc == 2 and "already has 3 epochs" in err
    assert path.read_bytes() == before


def test_a_diverged_run_keeps_the_record_of_its_blow_up(tmp_path, capsys):
    path = tmp_path / "nan.h5"
    rc, _, err = _cstep(capsys, "train", *SMALL, "--solver", "sgd", "--lr", "1e30", "--momentum", "0", "--epochs", 2,
                        "--out", path, "--quiet")
    assert rc == 1
    rec = load_run(path)
    at = rec.progress["diverged_at"]
    losses = rec.progress["diverged_steps"]["loss"]
    assert at >= 1 and losses and not numpy.isfinite(losses[-1])
    assert rec.progress["iteration"] < at and len(rec.history["steps"].get("loss", [])) == rec.progress["iteration"]
    rc, out, _ = _cstep(capsys, "info", path)
    assert f"non-finite at iteration {at}" in out


# --- 1. the BLAS library and its threads: recorded and pinned ------------------------------------------
def test_blas_library_and_thread_count_are_recorded_and_pinned(tmp_path, capsys):
    """The run uses --threads BLAS threads whatever OPENBLAS_NUM_THREADS says, and records both the
    library and the count; runs started with different environment defaults are bit for bit equal."""
    from tests.engine.app.test_cli import CURVES_TINY, _assert_same_run, _start_child

    common = ["train", "--net", CURVES_TINY, "--n-train", 2000, "--n-test", 200, "--batch-size", 500, "--solver", "kbfgs",
              "--epochs", 2, "--quiet"]
    paths = []
    for env_threads in ("1", "2"):
        path = tmp_path / f"env{env_threads}.h5"
        proc, log = _start_child([*common, "--out", path], tmp_path, {"OPENBLAS_NUM_THREADS": env_threads})
        assert proc.wait(timeout=300) == 0, (log.seek(0), log.read())[1]
        paths.append(path)
    rec = load_run(paths[0])
    assert rec.config["threads"] == 1 and rec.environment["blas_threads"] == 1
    assert rec.environment["blas"].split()[0] in ("openblas", "mkl", "blis", "accelerate", "flexiblas", "unknown")
    assert load_run(paths[1]).environment["blas_threads"] == 1
    _assert_same_run(*paths)
    rc, out, _ = _cstep(capsys, "info", paths[0])
    assert f"BLAS {rec.environment['blas']}, 1 thread(s) (--threads 1)" in out
