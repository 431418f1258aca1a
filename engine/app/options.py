"""What the command line accepts: defaults, tuned hyper-parameters, and the checks that turn a bad
name or value into one clear line (:class:`UsageError`, exit status 2)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy

import data
import nets
import solvers

from ..backend import backend_name

class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


#: ``cstep train`` with no arguments: the CURVES-like autoencoder, K-BFGS, about a minute on 2 cores
DEFAULT_NET = "curves-ae"
DEFAULT_SOLVER = "kbfgs"
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 1000  # the reference protocol's minibatch (docs/kbfgs.md section 3.4)
DEFAULT_SEED = 9999  # the reference code's seed (docs/kbfgs.md section 3.3)
DEFAULT_DTYPE = "float32"
#: The initial weights: PyTorch's own values for the seed (the reference code's initial point at
#: its seed 9999; engine/init.py), or NumPy's PCG64 draws of the same distribution.
DEFAULT_INIT = "torch"
#: The batch order: the reference code's own sequence for the seed (data/batches.py), or PCG64.
DEFAULT_ORDER = "reference"
DEFAULT_COMPARE_SOLVERS = ("kbfgs", "kfac", "adam")
SUPPORTED_DTYPES = ("float32", "float64")
#: BLAS threads a run uses (pinned with threadpoolctl and recorded): 1 makes a run's figures the same on
#: every machine (float32 K-BFGS trajectories depend on the summation order, hence on the thread count),
#: and on a shared 2-core machine one thread was also the faster (two threads spin under contention)
DEFAULT_THREADS = 1
#: seconds of wall time between checkpoints (besides every --checkpoint-every iterations and every epoch end)
DEFAULT_CHECKPOINT_EVERY_S = 300.0
#: seconds between progress lines when stderr is not a terminal
DEFAULT_LOG_EVERY_S = 30.0
#: hyper-parameters tuned for a (network, solver) pair, used where the command line gives none (the
#: run file records every value used). curves-ae + kbfgs: with the paper's MNIST choice lambda = 0.3
#: (alpha = 0.3) K-BFGS leaves the CURVES plateau near epoch 7 and then diverges (inf at iteration
#: 185, float32, batch 1000, seed 9999, PyTorch's initial weights, reference order; NaN at 174
#: from NumPy's initial weights and PCG64 order); lambda = 1 stays finite and reaches 164.6 at
#: epoch 10 (measured 2026-11-21 on the CURVES-like set).
#: mnist-cnn (batch 128, its preset batch size): K-FAC alpha 0.3 / lambda 0.1, K-BFGS and K-BFGS(L) alpha 1 / lambda 0.3
#: (conv layers with the KF-QN-CNN damping) give 98.5% / 98.7% / 98.4% test accuracy after one epoch and
#: 98.8% / 98.7% / 98.8% after two (Adam with its defaults: 97.4%, 98.7%) (batch 128, float32, seed 9999,
#: full MNIST, measured 2026-11-21).
TUNED_HYPERPARAMETERS: dict[tuple[str, str], dict] = {
    ("curves-ae", "kbfgs"): {"damping": 1.0},
    ("mnist-cnn", "kfac"): {"lr": 0.3, "damping": 0.1},
    ("mnist-cnn", "kbfgs"): {"lr": 1.0, "damping": 0.3},
    ("mnist-cnn", "kbfgs_l"): {"lr": 1.0, "damping": 0.3},
}

#: minibatch sizes of presets that do not use the reference protocol's 1000, used where
#: --batch-size is not given: the LeNet-5 classifier trains (and was tuned above) at 128. The CURVES
#: autoencoder is the main job (``cstep train`` with no options): at batch 1000 K-BFGS sits on the
#: "mean image" plateau (~179) from epoch 2 to 5 and ends near 144 after 10 epochs; at batch 100
#: (200 iterations an epoch) it leaves the plateau in the first epoch and the loss falls every epoch,
#: 179.2, 155.0, 120.3, 101.5, 90.3 (float32, seed 9999, one BLAS thread; measured 2026-11-30).
#: --batch-size 1000 is the reference protocol.
PRESET_BATCH_SIZES: dict[str, int] = {"mnist-cnn": 128, "curves-ae": 100}
#: epochs of presets whose default differs from DEFAULT_EPOCHS: the main job's five epochs take about a
#: minute on one core.
PRESET_EPOCHS: dict[str, int] = {"curves-ae": 5}


def tuned(net: str, solver: str, given: dict) -> dict:
    """The tuned defaults of (net, solver) overridden by what the command line gives."""
    return {**TUNED_HYPERPARAMETERS.get((net, solver), {}), **given}

#: columns of the history that are clocks (differ between otherwise identical runs)
CLOCK_COLUMNS = ("cpu_time", "wall_time")


# --- registries ----------------------------------------------------------------------------------
def dataset_names() -> list[str]:
    return sorted(data.DATASETS)


def hyper_table() -> dict[str, list[tuple[str, object]]]:
    """hyper-parameter name -> [(solver name, Hyper)], over every registered solver."""
    table: dict[str, list] = {}
    for name in solvers.solver_names():
        for key, spec in solvers.get_solver(name).hyperparameters.items():
            table.setdefault(key, []).append((name, spec))
    return table


def escape_percent(text: str) -> str:
    return str(text).replace("%", "%%")


#: training options a solver hyper-parameter must not shadow; such a hyper-parameter gets --solver-NAME
RESERVED = {"net", "solver", "data", "data_dir", "n_train", "n_test", "epochs", "max_time", "batch_size", "dtype",
             "seed", "checkpoint_every", "quiet", "json", "out", "overwrite", "help", "set", "solvers", "out_dir",
             "output"}


def hyper_flag(key: str) -> str:
    """The option of hyper-parameter ``key``: ``--lr``; ``--solver-seed`` where ``--seed`` is the run's own."""
    return "--" + ("solver_" + key if key in RESERVED else key).replace("_", "-")


def given_hyper(args, solver: str) -> dict:
    """The hyper-parameters given on the command line, checked against ``solver``."""
    cls = solvers.get_solver(solver)
    given = {}
    for key in hyper_table():
        value = getattr(args, f"hyper_{key}", None)
        if value is None:
            continue
        if key not in cls.hyperparameters:
            takes = ", ".join(hyper_flag(k) for k in cls.hyperparameters) or "none"
            raise UsageError(f"solver {solver} has no hyper-parameter {hyper_flag(key)}; it takes {takes}")
        given[key] = value
    return given


def build_solver(name: str, model, hyper: dict):
    try:
        return solvers.make_solver(name, model, **hyper)
    except ValueError as exc:
        msg = str(exc)
        raise UsageError(msg if msg.startswith("unknown solver") else f"invalid hyper-parameter for {name}: {msg}") from None


def canonical(name: str, choices, what: str) -> str:
    """``name`` as spelled in ``choices``, hyphens and underscores alike (``newton-krylov`` is
    ``newton_krylov``, ``curves_ae`` is ``curves-ae``); an unknown name is a :class:`UsageError`."""
    key = str(name).strip().lower().replace("_", "-")
    for choice in choices:
        if choice.lower().replace("_", "-") == key:
            return choice
    raise UsageError(f"unknown {what} {name!r}; choose one of {', '.join(sorted(choices))}")


def check_net(name: str) -> str:
    """The preset's registered name."""
    return canonical(name, nets.PRESETS, "network")


def check_solver(name: str) -> str:
    """The solver's registered name."""
    return canonical(name, solvers.SOLVERS, "solver")


def check_dataset(name: str) -> str:
    """The data set's registered name."""
    return canonical(name, data.DATASETS, "data set")


def check_task(model, dataset) -> None:
    """A classifier needs labels and an autoencoder none: name the data set that fits, before any work."""
    classifier = model.loss_fn.classification
    if classifier == (not dataset.is_autoencoder) and not (classifier and dataset.is_regression):
        return
    if not classifier and dataset.is_regression:
        return
    prefix = dataset.name.split("-")[0]
    fits = [n for n in sorted(data.DATASETS) if n.startswith(prefix) and ("classify" in n) == classifier]
    hint = f"; use --data {fits[0]}" if fits else ""
    if classifier:
        raise UsageError(f"network {model.name} is a classifier ({model.loss_fn.name}) but data set {dataset.name} "
                         f"has no labels (an autoencoder set){hint}")
    raise UsageError(f"network {model.name} reconstructs its input ({model.loss_fn.name}) but data set {dataset.name} "
                     f"is a labelled classification set{hint}")


def check_dtype(name: str) -> numpy.dtype:
    if name not in SUPPORTED_DTYPES:
        raise UsageError(f"dtype {name!r} is not supported by the {backend_name()} backend; use float32 or float64")
    return numpy.dtype(name)


def check_data_dir(data_dir: str | None) -> str | None:
    """The data directory to use (an explicit one must exist; so must CSTEP_DATA_DIR if set)."""
    if data_dir:
        if not Path(data_dir).expanduser().is_dir():
            raise UsageError(f"data directory {data_dir} does not exist; give an existing directory with --data-dir")
        return str(Path(data_dir).expanduser().resolve())
    env = os.environ.get("CSTEP_DATA_DIR")
    if env and not Path(env).expanduser().is_dir():
        raise UsageError(f"data directory {env} (from CSTEP_DATA_DIR) does not exist; fix or unset CSTEP_DATA_DIR")
    return None


def number_type(kind: type, ok, requirement: str):
    """An argparse ``type=`` converter to ``kind`` that accepts values with ``ok(value)``."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {value}")
        return value
    return convert


positive_int = number_type(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = number_type(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number_type(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonnegative_float = number_type(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
