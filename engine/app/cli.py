"""The ``cstep`` command line.

Each subcommand lives in a function ``cmd_<name>(args) -> int`` registered in
:func:`build_parser`. Errors a user can fix (bad names, bad values, missing files) are raised as
:class:`UsageError` (or ``ValueError`` from the library) and printed as one line on stderr with
exit status 2, never as a traceback.

Subcommands: ``train`` (a new run, written to an HDF5 run file), ``resume`` (continue a run from
its last checkpoint, bit for bit), ``info`` (what a run file holds), ``plot`` (loss against epoch
and CPU time, several runs overlaid), ``compare`` (several solvers on the same data, seed and
budget) and ``study`` (the complex-step precision study, :mod:`engine.study`).

Solver hyper-parameter options are generated from the solver registry
(:data:`solvers.SOLVERS`, each solver's ``hyperparameters``), network choices from the preset
registry (:data:`nets.PRESETS`), so a new solver or preset appears here without edits.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy

from . import __version__
from .init import INIT_SCHEMES


class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


#: ``cstep train`` with no arguments: the CURVES-like autoencoder, K-BFGS, about a minute on 2 cores
DEFAULT_NET = "curves-ae"
DEFAULT_SOLVER = "kbfgs"
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 1000  # the reference protocol's minibatch (kbfgs.md section 3.4)
DEFAULT_SEED = 9999  # the reference code's seed (kbfgs.md section 3.3)
DEFAULT_DTYPE = "float32"
#: The initial weights: PyTorch's own values for the seed (the reference code's initial point at
#: its seed 9999; engine/init.py), or NumPy's PCG64 draws of the same distribution.
DEFAULT_INIT = "torch"
#: The batch order: the reference code's own sequence for the seed (data/batches.py), or PCG64.
DEFAULT_ORDER = "reference"
DEFAULT_COMPARE_SOLVERS = ("kbfgs", "kfac", "adam")
SUPPORTED_DTYPES = ("float32", "float64")
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
#: --batch-size is not given: the LeNet-5 classifier trains (and was tuned above) at 128.
PRESET_BATCH_SIZES: dict[str, int] = {"mnist-cnn": 128}


def _tuned(net: str, solver: str, given: dict) -> dict:
    """The tuned defaults of (net, solver) overridden by what the command line gives."""
    return {**TUNED_HYPERPARAMETERS.get((net, solver), {}), **given}

#: columns of the history that are clocks (differ between otherwise identical runs)
CLOCK_COLUMNS = ("cpu_time", "wall_time")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2), like every other error."""

    def error(self, message):  # noqa: D401 (argparse API)
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


# --- registries ----------------------------------------------------------------------------------
def _solvers():
    import solvers  # noqa: PLC0415 (the CLI imports everything, lazily, so --help stays fast)
    return solvers


def _nets():
    import nets  # noqa: PLC0415
    return nets


def _datasets() -> list[str]:
    import data  # noqa: PLC0415
    return sorted(data.DATASETS)


def _hyper_table() -> dict[str, list[tuple[str, object]]]:
    """hyper-parameter name -> [(solver name, Hyper)], over every registered solver."""
    table: dict[str, list] = {}
    s = _solvers()
    for name in s.solver_names():
        for key, spec in s.get_solver(name).hyperparameters.items():
            table.setdefault(key, []).append((name, spec))
    return table


def _escape(text: str) -> str:
    return str(text).replace("%", "%%")


#: training options a solver hyper-parameter must not shadow; such a hyper-parameter gets --solver-NAME
_RESERVED = {"net", "solver", "data", "data_dir", "n_train", "n_test", "epochs", "max_time", "batch_size", "dtype",
             "seed", "checkpoint_every", "quiet", "json", "out", "overwrite", "help", "set", "solvers", "out_dir",
             "output"}


def _hyper_flag(key: str) -> str:
    """The option of hyper-parameter ``key``: ``--lr``; ``--solver-seed`` where ``--seed`` is the run's own."""
    return "--" + ("solver_" + key if key in _RESERVED else key).replace("_", "-")


def _add_hyper_options(parser) -> None:
    """One ``--name`` per hyper-parameter of any registered solver (paper names, e.g. --lr)."""
    tuned = "; ".join(f"{net} with {solver}: " + ", ".join(f"{k} {v}" for k, v in values.items())
                      for (net, solver), values in TUNED_HYPERPARAMETERS.items())
    group = parser.add_argument_group(
        "solver hyper-parameters",
        "By their paper names; each defaults to the chosen solver's own value (listed per solver), except "
        f"for these tuned network/solver pairs: {tuned}. Giving one the chosen solver does not take is an error.")
    for key, specs in sorted(_hyper_table().items()):
        flag = _hyper_flag(key)
        if flag in parser._option_string_actions:  # e.g. a solver's own "seed" next to the run's --seed
            raise RuntimeError(f"hyper-parameter {key} collides with option {flag}")
        first = specs[0][1]
        kind = first.type or type(first.default)
        defaults = "; ".join(f"{solver}: {spec.default}" for solver, spec in specs)
        helps = sorted({spec.help for _, spec in specs})
        help_text = _escape(f"{' / '.join(helps)} (defaults: {defaults})")
        if kind is bool:
            group.add_argument(flag, dest=f"hyper_{key}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = {float: "FLOAT", int: "INT"}.get(kind, "VALUE")
            group.add_argument(flag, dest=f"hyper_{key}", default=None, metavar=metavar, help=help_text)


def _given_hyper(args, solver: str) -> dict:
    """The hyper-parameters given on the command line, checked against ``solver``."""
    cls = _solvers().get_solver(solver)
    given = {}
    for key in _hyper_table():
        value = getattr(args, f"hyper_{key}", None)
        if value is None:
            continue
        if key not in cls.hyperparameters:
            takes = ", ".join(_hyper_flag(k) for k in cls.hyperparameters) or "none"
            raise UsageError(f"solver {solver} has no hyper-parameter {_hyper_flag(key)}; it takes {takes}")
        given[key] = value
    return given


def _make_solver(name: str, model, hyper: dict):
    try:
        return _solvers().make_solver(name, model, **hyper)
    except ValueError as exc:
        msg = str(exc)
        raise UsageError(msg if msg.startswith("unknown solver") else f"invalid hyper-parameter for {name}: {msg}") from None


def _check_net(name: str) -> None:
    if name not in _nets().PRESETS:
        raise UsageError(f"unknown network {name!r}; choose one of {', '.join(_nets().preset_names())}")


def _check_solver(name: str) -> None:
    if name not in _solvers().SOLVERS:
        raise UsageError(f"unknown solver {name!r}; choose one of {', '.join(_solvers().solver_names())}")


def _check_dtype(name: str) -> numpy.dtype:
    from .backend import backend_name  # noqa: PLC0415
    if name not in SUPPORTED_DTYPES:
        raise UsageError(f"dtype {name!r} is not supported by the {backend_name()} backend; use float32 or float64")
    return numpy.dtype(name)


def _check_data_dir(data_dir: str | None) -> str | None:
    """The data directory to use (an explicit one must exist; so must CSTEP_DATA_DIR if set)."""
    if data_dir:
        if not Path(data_dir).expanduser().is_dir():
            raise UsageError(f"data directory {data_dir} does not exist; give an existing directory with --data-dir")
        return str(Path(data_dir).expanduser().resolve())
    env = os.environ.get("CSTEP_DATA_DIR")
    if env and not Path(env).expanduser().is_dir():
        raise UsageError(f"data directory {env} (from CSTEP_DATA_DIR) does not exist; fix or unset CSTEP_DATA_DIR")
    return None


def _number_type(kind: type, ok, requirement: str):
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


_positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
_nonnegative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number_type(float, lambda v: v > 0 and math.isfinite(v), "a positive number")


# --- building a run ----------------------------------------------------------------------------
def _data_fingerprint(ds) -> str:
    """SHA-256 over shapes, dtypes and bytes of the four arrays: a resumed run must see the same data."""
    h = hashlib.sha256()
    for a in (ds.x_train, ds.x_test, ds.y_train, ds.y_test):
        if a is None:
            h.update(b"none")
            continue
        a = numpy.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _load_dataset(name: str, data_dir: str | None, dtype, n_train: int | None, n_test: int | None):
    import data  # noqa: PLC0415
    kwargs = {}
    if n_train is not None:
        kwargs["n_train"] = n_train
    if n_test is not None:
        kwargs["n_test"] = n_test
    try:
        return data.load(name, data_dir=data_dir, dtype=dtype, **kwargs)
    except TypeError as exc:  # a loader without size options
        raise UsageError(f"data set {name!r} cannot be loaded with these options ({exc})") from None


def _check_fit(model, ds) -> None:
    """Fail before any work if the network does not fit the data set (one forward pass of one row)."""
    from .backend import get_xp, to_device  # noqa: PLC0415
    xp = get_xp()
    params = model.init(seed=0, dtype=numpy.float64, xp=xp)
    x = to_device(ds.x_train[:1], xp, dtype=numpy.float64)
    y = x if ds.y_train is None else to_device(ds.y_train[:1], xp)
    try:
        model.loss(params, x, y)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"network {model.name} does not fit data set {ds.name} "
                         f"(examples of shape {ds.feature_shape}): {exc}") from None


class Run:
    """A run being built or continued: config, model, data set, solver, trainer, run file path."""

    def __init__(self, config: dict, hyper: dict, dataset=None):
        from .train import Trainer  # noqa: PLC0415

        self.config = config
        self.dtype = _check_dtype(config["dtype"])
        _check_net(config["net"])
        _check_solver(config["solver"])
        self.model = _nets().build(config["net"])
        if dataset is None:
            dataset = _load_dataset(config["dataset"], config.get("data_dir"), self.dtype,
                                    config.get("n_train"), config.get("n_test"))
        self.dataset = dataset
        _check_fit(self.model, dataset)
        self.solver = _make_solver(config["solver"], self.model, hyper)
        self.hyper = dict(self.solver.hyper)
        try:
            self.trainer = Trainer(self.model, self.solver, dataset, batch_size=config["batch_size"],
                                   seed=config["seed"], dtype=self.dtype, eval_chunk=config.get("eval_chunk", 1000),
                                   shuffle=config.get("shuffle", True), init=config.get("init", "numpy"),
                                   order=config.get("order", "pcg64"))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.path: Path | None = None
        self.environment: dict = {}
        self.meta: dict = {}
        self.checkpoints = 0
        self.status = "running"

    @classmethod
    def new(cls, args, net: str, solver: str, hyper: dict, dataset=None) -> "Run":
        """A fresh run from the common training options of ``train`` / ``compare``."""
        _check_net(net)
        _check_solver(solver)
        dtype = _check_dtype(args.dtype)
        data_dir = _check_data_dir(args.data_dir)
        ds_name = args.data or _nets().PRESETS[net][1]
        if dataset is None:
            dataset = _load_dataset(ds_name, data_dir, dtype, args.n_train, args.n_test)
        epochs = args.epochs
        if epochs is None and args.max_time is None:
            epochs = DEFAULT_EPOCHS
        model_desc = _nets().PRESETS[net][2]
        config = {
            "net": net, "net_description": model_desc, "solver": solver,
            "dataset": ds_name, "dataset_description": dataset.description,
            "dataset_substitute": bool(dataset.substitute), "dataset_source": getattr(dataset, "source", ""),
            "n_train": args.n_train, "n_test": args.n_test,
            "n_train_used": int(dataset.x_train.shape[0]), "n_test_used": int(dataset.x_test.shape[0]),
            "data_dir": data_dir, "data_fingerprint": _data_fingerprint(dataset),
            "dtype": str(dtype), "seed": args.seed, "init": args.init, "order": args.order,
            "batch_size": args.batch_size or PRESET_BATCH_SIZES.get(net, DEFAULT_BATCH_SIZE),
            "epochs": epochs, "max_time": args.max_time, "checkpoint_every": args.checkpoint_every,
            "eval_chunk": 1000, "shuffle": True,
        }
        run = cls(config, hyper, dataset)
        config["n_params"] = run.model.n_params
        config["param_shapes"] = [list(s) for s in run.model.shapes]
        config["weight_decay"] = run.model.weight_decay
        from .runfile import environment_info  # noqa: PLC0415
        run.environment = environment_info()
        config["backend"] = run.environment["backend"]
        config["cstep_version"] = __version__
        config["command"] = " ".join(["cstep"] + list(getattr(args, "argv", []) or []))
        return run

    @classmethod
    def resume(cls, path, data_dir: str | None = None) -> "Run":
        """The run stored in ``path``, restored to its last checkpoint."""
        from .backend import get_xp  # noqa: PLC0415
        from .runfile import environment_info, load_run  # noqa: PLC0415

        header = load_run(path)
        config = dict(header.config)
        if data_dir is not None:
            config["data_dir"] = _check_data_dir(data_dir)
        elif config.get("data_dir") and not Path(config["data_dir"]).is_dir():
            raise UsageError(f"the run's data directory {config['data_dir']} does not exist here; "
                             "point --data-dir at the data")
        saved_shapes = [list(numpy.shape(p)) for p in header.state["params"]]
        _check_net(config["net"])
        model = _nets().build(config["net"])
        if saved_shapes != [list(s) for s in model.shapes]:
            raise UsageError(f"run file {path} was written for a network with {len(saved_shapes)} parameter arrays "
                             f"({sum(int(numpy.prod(s)) for s in saved_shapes)} values) but network {config['net']} has "
                             f"{len(model.shapes)} ({model.n_params} values); it comes from an incompatible network definition")
        run = cls(config, header.hyperparameters)
        fingerprint = _data_fingerprint(run.dataset)
        if config.get("data_fingerprint") and fingerprint != config["data_fingerprint"]:
            raise UsageError(f"data set {config['dataset']} differs from the one run {path} started on; "
                             "resume with the same data (same --data-dir and data files)")
        record = load_run(path, array_module=get_xp(), solver_template=run.trainer.solver_state)
        try:
            run.trainer.load_state_dict(record.state)
        except ValueError as exc:
            raise UsageError(f"run file {path} does not fit: {exc}") from None
        run.path = Path(path)
        run.meta = dict(record.meta)
        run.checkpoints = int(record.progress.get("checkpoints", 0))
        run.environment = environment_info()
        if run.environment["backend"] != header.environment.get("backend", run.environment["backend"]):
            print(f"cstep resume: note: the run was made on the {header.environment.get('backend')} backend and continues "
                  f"on {run.environment['backend']}; it will not be bit-for-bit what the original backend gives", file=sys.stderr)
        return run

    def checkpoint(self, status: str | None = None) -> None:
        """Write the whole run atomically to its run file."""
        from .runfile import RunRecord, save_run  # noqa: PLC0415
        if status is not None:
            self.status = status
        self.checkpoints += 1
        state = self.trainer.state_dict()
        state["progress"].update({
            "status": self.status, "checkpoints": self.checkpoints,
            "target_epochs": self.config.get("epochs"),
            "checkpoint_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        meta = dict(self.meta)
        meta["param_layers"] = [(i, type(layer).__name__) for i, layer in enumerate(self.model.layers)
                                for _ in layer.param_shapes()]
        record = RunRecord(config=self.config, hyperparameters=self.hyper, state=state,
                           environment=self.environment, meta=meta)
        save_run(self.path, record)
        self.meta["created"] = record.meta["created"]


# --- progress reporting ----------------------------------------------------------------------------
class Progress:
    """A tqdm bar per epoch on a terminal, one plain line per epoch otherwise, nothing when quiet.

    Everything goes to ``stream`` (stderr), so stdout carries only the final summary / JSON.
    """

    #: seconds between redraws of the bar (tqdm's mininterval)
    refresh_interval = 0.1

    def __init__(self, quiet: bool, label: str = "", stream=None):
        self.stream = stream or sys.stderr
        self.mode = "none" if quiet else ("bar" if self._isatty() else "log")
        self.label = label
        self.bar = None

    def _isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def _target(self, trainer, epochs) -> str:
        return f"/{epochs}" if epochs else ""

    def step(self, trainer, row: dict, epochs) -> None:
        if self.mode != "bar":
            return
        if self.bar is None:
            from tqdm import tqdm  # noqa: PLC0415
            per_epoch = trainer.iterator.batches_per_epoch
            done = trainer.iteration - trainer.epoch * per_epoch - 1
            self.bar = tqdm(total=per_epoch, initial=done, desc=f"{self.label}epoch {trainer.epoch + 1}{self._target(trainer, epochs)}",
                            unit="it", leave=False, file=self.stream, dynamic_ncols=True,
                            mininterval=self.refresh_interval)
        self.bar.set_postfix_str(f"loss={row.get('loss', float('nan')):.5g}", refresh=False)
        self.bar.update(1)

    def epoch(self, trainer, row: dict, epochs) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.mode == "none":
            return
        parts = [f"{self.label}epoch {row['epoch']}{self._target(trainer, epochs)}", f"iter {row['iterations']}"]
        for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
            if key in row and row[key] == row[key]:
                parts.append(f"{key.replace('_', ' ')} {row[key]:.6g}")
        parts.append(f"cpu {row['cpu_time']:.1f}s")
        parts.append(f"wall {row['wall_time']:.1f}s")
        print("  ".join(parts), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.mode != "none":
            print(f"{self.label}{text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _drive(run: Run, epochs, max_time, checkpoint_every, quiet: bool, label: str = "") -> str:
    """Train ``run`` to its target, checkpointing every ``checkpoint_every`` iterations and at every
    epoch end; returns the final status ('complete', 'diverged')."""
    from .train import TrainingDiverged  # noqa: PLC0415

    progress = Progress(quiet, label)
    trainer = run.trainer

    def on_step(tr, row):
        progress.step(tr, row, epochs)
        if checkpoint_every and tr.iteration % checkpoint_every == 0:
            run.checkpoint()

    def on_epoch(tr, row):
        progress.epoch(tr, row, epochs)
        run.checkpoint()

    done = (epochs is not None and trainer.epoch >= epochs) or (max_time is not None and trainer.cpu_time >= max_time)
    if not done:
        if not trainer.warm_started:
            progress.message(f"warm start: one pass over {trainer.dataset.x_train.shape[0]} training examples")
        try:
            # overflow on the way to a NaN loss is reported once, as TrainingDiverged, not as NumPy warnings
            with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
                trainer.run(epochs=epochs, max_time=max_time, on_step=on_step, on_epoch=on_epoch)
        except TrainingDiverged as exc:
            progress.close()
            # the run file keeps the last finite checkpoint; only its status changes
            from .runfile import load_run  # noqa: PLC0415
            from .backend import get_xp  # noqa: PLC0415
            record = load_run(run.path, array_module=get_xp(), solver_template=run.trainer.solver_state)
            run.trainer.load_state_dict(record.state)
            run.checkpoint("diverged")
            print(f"cstep: {label}{exc}; the run file keeps the last finite checkpoint", file=sys.stderr)
            return "diverged"
        finally:
            progress.close()
    run.checkpoint("complete")
    return "complete"


def _summary(run: Run, status: str, elapsed: float) -> dict:
    ep = run.trainer.history.epochs
    return {
        "run": str(run.path), "status": status,
        "net": run.config["net"], "solver": run.config["solver"], "dataset": run.config["dataset"],
        "hyperparameters": run.hyper,
        "epochs": run.trainer.epoch, "iterations": run.trainer.iteration,
        "train_loss": ep.get("train_loss", []), "test_loss": ep.get("test_loss", []),
        "cpu_time": ep.get("cpu_time", []), "wall_time": ep.get("wall_time", []),
        "training_cpu_seconds": run.trainer.cpu_time, "training_wall_seconds": run.trainer.wall_time,
        "elapsed_seconds": elapsed,
        "backend": run.environment.get("backend"), "dtype": run.config["dtype"],
    }


def _print_summary(summary: dict, args) -> None:
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=True))
    elif not args.quiet:
        tr = summary["train_loss"][-1] if summary["train_loss"] else float("nan")
        te = summary["test_loss"][-1] if summary["test_loss"] else float("nan")
        print(f"{summary['status']}: {summary['solver']} on {summary['net']}/{summary['dataset']}, "
              f"{summary['epochs']} epochs ({summary['iterations']} iterations), train loss {tr:.6g}, test loss {te:.6g}, "
              f"{summary['training_cpu_seconds']:.1f} s training CPU, {summary['elapsed_seconds']:.1f} s elapsed")
        print(f"run file: {summary['run']}")


def _default_run_path(out_dir: Path, net: str, solver: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{net}-{solver}-{stamp}.h5"
    k = 2
    while path.exists():
        path = out_dir / f"{net}-{solver}-{stamp}-{k}.h5"
        k += 1
    return path


def _claim_path(path: Path, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise UsageError(f"run file {path} already exists; continue it with 'cstep resume {path}', "
                         "choose another --out, or pass --overwrite")
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name for --out")
    return path


# --- commands ----------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    start = time.perf_counter()
    _check_net(args.net)
    _check_solver(args.solver)
    hyper = _tuned(args.net, args.solver, _given_hyper(args, args.solver))
    path = Path(args.out) if args.out else _default_run_path(Path("runs"), args.net, args.solver)
    _claim_path(path, args.overwrite)
    run = Run.new(args, args.net, args.solver, hyper)
    run.path = path
    run.checkpoint()  # the run file exists from the start: a crash at any later moment leaves a resumable file
    status = _drive(run, run.config["epochs"], run.config["max_time"], run.config["checkpoint_every"], args.quiet)
    _print_summary(_summary(run, status, time.perf_counter() - start), args)
    return 0 if status == "complete" else 1


def cmd_resume(args) -> int:
    start = time.perf_counter()
    run = Run.resume(args.run, data_dir=args.data_dir)
    if args.epochs is not None:
        run.config["epochs"] = args.epochs
    if args.max_time is not None:
        run.config["max_time"] = args.max_time
    if args.checkpoint_every is not None:
        run.config["checkpoint_every"] = args.checkpoint_every
    epochs = run.config["epochs"]
    if epochs is not None and run.trainer.epoch >= epochs and args.epochs is None and not args.quiet:
        print(f"cstep resume: run already has {run.trainer.epoch} of {epochs} epochs; pass --epochs N to go further",
              file=sys.stderr)
    status = _drive(run, epochs, run.config["max_time"], run.config["checkpoint_every"], args.quiet)
    _print_summary(_summary(run, status, time.perf_counter() - start), args)
    return 0 if status == "complete" else 1


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def cmd_info(args) -> int:
    from .runfile import load_run  # noqa: PLC0415
    rec = load_run(args.run)
    ep = rec.history["epochs"]
    final = {k: v[-1] for k, v in ep.items()} if ep and any(ep.values()) else {}
    steps = rec.history["steps"]
    if args.json:
        print(json.dumps({"run": str(rec.path), "format_version": rec.meta.get("format_version"),
                          "created": rec.meta.get("created"), "updated": rec.meta.get("updated"),
                          "config": rec.config, "hyperparameters": rec.hyperparameters,
                          "progress": rec.progress, "final": final, "epochs": ep,
                          "steps_recorded": len(next(iter(steps.values()))) if steps else 0,
                          "step_columns": list(steps), "environment": rec.environment}, indent=2))
        return 0
    c, p, e = rec.config, rec.progress, rec.environment
    sub = " (substitute: not comparable with published numbers)" if c.get("dataset_substitute") else ""
    hyper = ", ".join(f"{k}={_fmt(v)}" for k, v in rec.hyperparameters.items())
    target = c.get("epochs")
    lines = [
        f"run file     {rec.path}  (format {rec.meta.get('format_version')}, created {rec.meta.get('created')}, updated {rec.meta.get('updated')})",
        f"network      {c['net']}: {c.get('net_description', '')}; {c.get('n_params', 0):,} parameters",
        f"data         {c['dataset']}: {c.get('n_train_used')} train / {c.get('n_test_used')} test{sub}",
        f"solver       {c['solver']}  {hyper}",
        f"options      batch size {c['batch_size']}, dtype {c['dtype']}, seed {c['seed']} ({c.get('init', 'numpy')} init, {c.get('order', 'pcg64')} order), epochs {target}, "
        f"max time {str(c['max_time']) + ' s' if c.get('max_time') else 'none'}, "
        f"checkpoint every {str(c['checkpoint_every']) + ' iterations and every epoch' if c.get('checkpoint_every') else 'epoch'}",
        f"progress     {p.get('status', '?')}: epoch {p['epoch']}{'/' + str(target) if target else ''}, iteration {p['iteration']}, "
        f"{p['cpu_time']:.2f} s training CPU, {p['wall_time']:.2f} s wall, {p.get('checkpoints', '?')} checkpoints "
        f"(last {p.get('checkpoint_time', '?')})",
    ]
    if final:
        losses = ", ".join(f"{k.replace('_', ' ')} {_fmt(final[k])}" for k in ("train_loss", "test_loss", "train_accuracy", "test_accuracy") if k in final)
        lines.append(f"final        {losses}")
    else:
        lines.append("final        no epoch completed yet")
    lines.append(f"environment  cstep {e.get('cstep_version')}, Python {e.get('python')}, NumPy {e.get('numpy')}, "
                 f"SciPy {e.get('scipy')}, h5py {e.get('h5py')}, CuPy {e.get('cupy') or 'none'}; backend {e.get('backend')} "
                 f"on {e.get('device')}; host {e.get('host')} ({e.get('platform')})")
    print("\n".join(lines))
    return 0


def _load_for_plot(paths):
    from .runfile import load_run  # noqa: PLC0415
    runs, empty = [], []
    for path in paths:
        rec = load_run(path)
        (runs if rec.history["epochs"].get("epoch") else empty).append(rec)
    if not runs:
        raise UsageError(f"{', '.join(str(r.path) for r in empty) or 'no run file'}: no completed epoch to plot; "
                         "train for at least one epoch first")
    for rec in empty:
        print(f"cstep plot: note: {rec.path} has no completed epoch yet; left out", file=sys.stderr)
    return runs


def _run_labels(records) -> list[str]:
    """Solver names, plus what tells runs of the same solver apart (differing hyper-parameters or
    options), plus the file name when nothing does."""
    labels = []
    options = ("net", "dataset", "n_train_used", "batch_size", "dtype", "seed", "init", "order")
    for r in records:
        same = [q for q in records if q.config["solver"] == r.config["solver"]]
        label = r.config["solver"]
        if len(same) > 1:
            diff = [f"{k}={_fmt(v)}" for k, v in r.hyperparameters.items()
                    if len({json.dumps(q.hyperparameters.get(k)) for q in same}) > 1]
            diff += [f"{k.removesuffix('_used')}={_fmt(r.config.get(k))}" for k in options
                     if len({json.dumps(q.config.get(k)) for q in same}) > 1]
            if diff:
                label += " (" + ", ".join(diff) + ")"
        labels.append(label)
    if len(set(labels)) < len(labels):
        labels = [f"{lab} [{Path(r.path).stem}]" if labels.count(lab) > 1 else lab for lab, r in zip(labels, records)]
    return labels


def plot_runs(records, out, title: str | None = None) -> Path:
    """Training (solid) and test (dashed) loss against epoch and against training CPU time, log scale,
    one colour per run, labelled by solver (plus what differs where a solver repeats)."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: PLC0415

    labels = _run_labels(records)
    fig, (ax_ep, ax_t) = plt.subplots(1, 2, figsize=(12, 5.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for k, (r, label) in enumerate(zip(records, labels)):
        ep = r.history["epochs"]
        colour = colours[k % len(colours)]
        epochs = numpy.asarray(ep["epoch"], dtype=float)
        cpu = numpy.asarray(ep["cpu_time"], dtype=float)
        for key, style in (("train_loss", "-"), ("test_loss", "--")):
            if key in ep:
                y = numpy.asarray(ep[key], dtype=float)
                ax_ep.plot(epochs, y, style, color=colour, marker="o", markersize=3)
                ax_t.plot(cpu, y, style, color=colour, marker="o", markersize=3)
        handles.append(Line2D([], [], color=colour, marker="o", markersize=4, label=label))
    handles += [Line2D([], [], color="0.3", linestyle="-", label="train"),
                Line2D([], [], color="0.3", linestyle="--", label="test")]
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, xlabel in ((ax_ep, "epoch"), (ax_t, "training CPU time (s)")):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (incl. 0.5 tau ||theta||^2)")
        ax.grid(True, which="both", alpha=0.3)
    ax_ep.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_ep.set_title("loss against epoch", fontsize=10)
    ax_t.set_title("loss against training CPU time", fontsize=10)
    if title is None:
        nets_ = sorted({r.config["net"] for r in records})
        sets = sorted({r.config["dataset"] for r in records})
        sub = " (substitute data)" if any(r.config.get("dataset_substitute") for r in records) else ""
        extras = [f"{name} {records[0].config[key]}" for key, name in (("batch_size", "batch"), ("dtype", ""))
                  if len({str(r.config[key]) for r in records}) == 1]
        title = f"{', '.join(nets_)} on {', '.join(sets)}{sub}" + (": " + ", ".join(e.strip() for e in extras) if extras else "")
    fig.suptitle(title)
    ncol = min(len(handles), 4)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    rows = -(-len(handles) // ncol)
    fig.tight_layout(rect=(0, 0.04 + 0.045 * rows, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=120)
    except ValueError as exc:  # unknown image format from the suffix
        raise UsageError(f"cannot write {out}: {exc}") from None
    finally:
        plt.close(fig)
    return out


def cmd_plot(args) -> int:
    runs = _load_for_plot(args.runs)
    out = plot_runs(runs, args.output, args.title)
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def _parse_sets(items, solver_list) -> dict[str, dict]:
    """``--set kbfgs.lr=0.1`` -> {"kbfgs": {"lr": "0.1"}} (values validated by the solver)."""
    out: dict[str, dict] = {s: {} for s in solver_list}
    for item in items or []:
        head, sep, value = item.partition("=")
        solver, dot, key = head.partition(".")
        if not sep or not dot or not solver or not key:
            raise UsageError(f"--set {item!r} is not SOLVER.NAME=VALUE (e.g. --set kbfgs.lr=0.1)")
        if solver not in out:
            raise UsageError(f"--set {item!r} names solver {solver!r}, which is not among --solvers {','.join(solver_list)}")
        key = key.replace("-", "_")
        cls = _solvers().get_solver(solver)
        if key not in cls.hyperparameters:
            raise UsageError(f"solver {solver} has no hyper-parameter {key!r}; it takes {', '.join(cls.hyperparameters) or 'none'}")
        out[solver][key] = value
    return out


def cmd_compare(args) -> int:
    start = time.perf_counter()
    _check_net(args.net)
    solver_list = [s.strip() for s in args.solvers.split(",") if s.strip()]
    if not solver_list:
        raise UsageError("--solvers is empty; give a comma-separated list, e.g. kbfgs,kfac,adam")
    for s in solver_list:
        _check_solver(s)
    if len(set(solver_list)) < len(solver_list):
        raise UsageError(f"--solvers {args.solvers} names a solver twice; name each once")
    sets = _parse_sets(args.set, solver_list)
    out_dir = Path(args.out_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = {s: out_dir / f"{args.net}-{s}-{stamp}.h5" for s in solver_list}
    for p in paths.values():
        _claim_path(p, False)
    # build every run before training any, so a bad hyper-parameter fails before work is done
    dtype = _check_dtype(args.dtype)
    data_dir = _check_data_dir(args.data_dir)
    ds_name = args.data or _nets().PRESETS[args.net][1]
    dataset = _load_dataset(ds_name, data_dir, dtype, args.n_train, args.n_test)
    runs = []
    for s in solver_list:
        run = Run.new(args, args.net, s, _tuned(args.net, s, sets[s]), dataset=dataset)
        run.path = paths[s]
        runs.append(run)
    results = []
    for run in runs:
        run.checkpoint()
        label = f"[{run.config['solver']}] "
        status = _drive(run, run.config["epochs"], run.config["max_time"], run.config["checkpoint_every"], args.quiet, label)
        results.append(_summary(run, status, time.perf_counter() - start))
        run.trainer = None  # free the model state before the next solver
    from .runfile import load_run  # noqa: PLC0415
    plot_path = Path(args.output) if args.output else out_dir / f"compare-{args.net}-{stamp}.png"
    plot_runs([load_run(r["run"]) for r in results if r["epochs"] > 0] or _load_for_plot([]), plot_path)
    if args.json:
        print(json.dumps({"plot": str(plot_path), "runs": results}, indent=2))
        return 0
    if not args.quiet:
        header = f"{'solver':<12} {'status':<9} {'epochs':>6} {'iters':>6} {'train loss':>12} {'test loss':>12} {'CPU s':>8}  run file"
        print(header)
        print("-" * len(header))
        for r in results:
            tr = r["train_loss"][-1] if r["train_loss"] else float("nan")
            te = r["test_loss"][-1] if r["test_loss"] else float("nan")
            print(f"{r['solver']:<12} {r['status']:<9} {r['epochs']:>6} {r['iterations']:>6} {tr:>12.6g} {te:>12.6g} "
                  f"{r['training_cpu_seconds']:>8.1f}  {r['run']}")
        print(f"plot: {plot_path}")
    return 0


# --- parser --------------------------------------------------------------------------------------------
def _add_training_options(p, *, for_compare: bool = False) -> None:
    nets_ = _nets()
    g = p.add_argument_group("model and data")
    if not for_compare:
        g.add_argument("--net", default=DEFAULT_NET, metavar="NET",
                       help=f"network preset: {', '.join(nets_.preset_names())} (default {DEFAULT_NET})")
    g.add_argument("--data", default=None, metavar="NAME",
                   help=f"data set: {', '.join(_datasets())} (default: the preset's own)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="directory holding the data files (default: $CSTEP_DATA_DIR, else the cache directory); "
                        "CURVES is generated locally when its file is absent")
    g.add_argument("--n-train", type=_positive_int, default=None, metavar="N",
                   help="use only the first N training examples (default: all)")
    g.add_argument("--n-test", type=_positive_int, default=None, metavar="N",
                   help="use only the first N test examples (default: all)")
    from data.batches import ORDERS  # noqa: PLC0415
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=_positive_int, default=None, metavar="N",
                   help=f"number of epochs (default {DEFAULT_EPOCHS}, or unlimited when --max-time is given)")
    t.add_argument("--max-time", type=_positive_float, default=None, metavar="SECONDS",
                   help="training CPU-time budget in seconds (process time, excluding evaluation and warm start), "
                        "checked at epoch ends as the reference code does")
    t.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                   help=f"minibatch size (default {DEFAULT_BATCH_SIZE}, the reference protocol's; "
                        f"{', '.join(f'{n} {b}' for n, b in PRESET_BATCH_SIZES.items())}); "
                        "the remainder of an epoch is dropped")
    t.add_argument("--dtype", default=DEFAULT_DTYPE, metavar="DTYPE",
                   help=f"real precision of parameters and data: float32 or float64 (default {DEFAULT_DTYPE})")
    t.add_argument("--seed", type=_nonnegative_int, default=DEFAULT_SEED, metavar="N",
                   help=f"seed of the initial weights and of the data order (default {DEFAULT_SEED}, the reference code's)")
    t.add_argument("--init", choices=INIT_SCHEMES, default=DEFAULT_INIT,
                   help="who draws the initial weights (W, b ~ U(+-1/sqrt(fan_in))) for --seed: 'torch' gives exactly "
                        "PyTorch's values after torch.manual_seed(seed), the reference code's initial point, without "
                        f"PyTorch; 'numpy' uses NumPy's PCG64 generator (default {DEFAULT_INIT})")
    t.add_argument("--order", choices=ORDERS, default=DEFAULT_ORDER,
                   help="the batch order for --seed: 'reference' is exactly the reference code's sequence (first "
                        "epoch in file order, then numpy.random.seed(seed) shuffles, with its K-BFGS/K-FAC generator "
                        "draws; seeds below 2**32); 'pcg64' draws each epoch's permutation from NumPy's PCG64 "
                        f"(default {DEFAULT_ORDER})")
    t.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="N",
                   help="also write a checkpoint every N iterations (a checkpoint is always written at every epoch end)")
    o = p.add_argument_group("output")
    o.add_argument("--quiet", action="store_true", help="no progress bar, no log lines, no summary (--json still prints)")
    o.add_argument("--json", action="store_true",
                   help="print a JSON summary at the end: run path, epochs, per-epoch train and test loss and "
                        "clocks, elapsed seconds, backend, dtype")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cstep",
        description="cstep: complex-step curvature and second-order neural-network training "
                    "(K-BFGS, K-BFGS(L), Newton-Krylov, K-FAC, Hessian-free, Adam, RMSprop, SGD) on NumPy or CuPy.",
        epilog="Run 'cstep COMMAND --help' for the options of a command. 'cstep train' with no options trains "
               "the CURVES-like deep autoencoder with K-BFGS for a few epochs and writes runs/NET-SOLVER-TIME.h5.",
    )
    parser.add_argument("--version", action="version", version=f"cstep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    solver_list = ", ".join(_solvers().solver_names())

    p = sub.add_parser(
        "train", help="train a network and write an HDF5 run file",
        description=f"Train a network preset with a solver and write everything to an HDF5 run file (atomically, at "
                    f"every epoch end and every --checkpoint-every iterations), so that 'cstep resume' continues it bit "
                    f"for bit. With no options: {DEFAULT_NET} on the locally generated CURVES-like set with {DEFAULT_SOLVER}, "
                    f"{DEFAULT_EPOCHS} epochs, batch {DEFAULT_BATCH_SIZE}, {DEFAULT_DTYPE}, written to "
                    f"runs/{DEFAULT_NET}-{DEFAULT_SOLVER}-YYYYmmdd-HHMMSS.h5.")
    p.add_argument("--solver", default=DEFAULT_SOLVER, metavar="NAME",
                   help=f"solver: {solver_list} (default {DEFAULT_SOLVER})")
    _add_training_options(p)
    p.add_argument("--out", default=None, metavar="PATH",
                   help="run file to write (default runs/NET-SOLVER-YYYYmmdd-HHMMSS.h5)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    _add_hyper_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "resume", help="continue a run from its last checkpoint",
        description="Continue a run from the last checkpoint in its run file, with the same network, data, solver "
                    "and options, bit for bit on the same backend; the run file keeps being updated in place.")
    p.add_argument("run", metavar="RUN.h5", help="the run file")
    p.add_argument("--epochs", type=_positive_int, default=None, metavar="N",
                   help="new total number of epochs (default: the run's original target)")
    p.add_argument("--max-time", type=_positive_float, default=None, metavar="SECONDS",
                   help="new total training CPU-time budget in seconds (default: the run's own)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="N",
                   help="checkpoint every N iterations from now on (default: the run's own setting)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="where the data files are now (default: as recorded)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no log lines, no summary")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end (as 'cstep train --json')")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser(
        "info", help="show what a run file holds",
        description="Show a run file's configuration, hyper-parameters, progress, final losses and environment.")
    p.add_argument("run", metavar="RUN.h5", help="the run file")
    p.add_argument("--json", action="store_true",
                   help="print everything as JSON (config, hyperparameters, progress, final, per-epoch history, environment)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "plot", help="plot loss curves of one or more runs",
        description="Plot training (solid) and test (dashed) loss against epoch and against training CPU time, "
                    "log scale, several runs overlaid and labelled by solver.")
    p.add_argument("runs", nargs="+", metavar="RUN.h5", help="run files")
    p.add_argument("-o", "--output", required=True, metavar="FIG.png", help="image to write (format from the suffix)")
    p.add_argument("--title", default=None, help="figure title (default: network, data set, batch size, dtype)")
    p.add_argument("--quiet", action="store_true", help="do not print the path written")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "compare", help="run several solvers on the same data, seed and budget",
        description="Train one network with several solvers on the same data, initial weights, batch-order rule "
                    "and budget (with --order reference each solver gets the batches the reference code gives "
                    "that method); write one run file per solver, one comparison plot and a table.")
    p.add_argument("--net", default=DEFAULT_NET, metavar="NET",
                   help=f"network preset: {', '.join(_nets().preset_names())} (default {DEFAULT_NET})")
    p.add_argument("--solvers", default=",".join(DEFAULT_COMPARE_SOLVERS), metavar="A,B,...",
                   help=f"comma-separated solvers among {solver_list} (default {','.join(DEFAULT_COMPARE_SOLVERS)})")
    p.add_argument("--set", action="append", default=None, metavar="SOLVER.NAME=VALUE",
                   help="a hyper-parameter of one solver, e.g. --set kbfgs.lr=0.1 (repeatable; default: each solver's own)")
    _add_training_options(p, for_compare=True)
    p.add_argument("--out-dir", default="runs", metavar="DIR", help="where the run files go (default runs)")
    p.add_argument("-o", "--output", default=None, metavar="FIG.png",
                   help="comparison plot (default OUT_DIR/compare-NET-YYYYmmdd-HHMMSS.png)")
    p.set_defaults(func=cmd_compare)

    if importlib.util.find_spec("engine.study") is not None:
        from . import study  # noqa: PLC0415
        study.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        print(f"cstep {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cstep {args.command}: interrupted; the run file keeps the last checkpoint "
              "(continue with 'cstep resume RUN.h5')", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"cstep {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a backend error (e.g. CSTEP_BACKEND=cupy without a GPU) is still one line
        from .backend import BackendError  # noqa: PLC0415
        if isinstance(exc, BackendError):
            print(f"cstep {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
