"""Runs: building a training run from its options, continuing one from its run file, checkpoints,
and driving the trainer to its target (``cstep train``, ``resume`` and ``compare`` share these)."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import signal
import sys
import threading
import time
from pathlib import Path

import numpy
from threadpoolctl import threadpool_limits

import data
import nets

from .. import __version__
from ..backend import get_xp, to_device
from . import runfile
from .distributed import collective_flags, is_root, join_world, world_note
from .environment import environment_info
from .options import (DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, PRESET_BATCH_SIZES, PRESET_EPOCHS, UsageError, build_solver,
                      check_data_dir, check_dataset, check_dtype, check_net, check_solver, check_task)
from .probes import probe
from .progress import Progress
from .train import Trainer, TrainingDiverged


def make_trainer(model, solver, dataset, batch_size: int = 1000, seed: int = 9999, dtype=numpy.float32,
                 eval_chunk: int = 1000, shuffle: bool = True, init: str = "numpy", order: str = "pcg64", xp=None,
                 cuda_graph: bool = False) -> Trainer:
    """A :class:`Trainer` with its batch iterator: ``seed`` seeds the initial weights and the batch
    order (``order``: "pcg64", or "reference" for the reference code's exact batches, replaying the
    solver's own generator draws, :class:`data.BatchIterator`)."""
    n = dataset.x_train.shape[0]
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"batch size must be between 1 and the {n} training examples, got {batch_size}")
    draws = solver.reference_draws_per_batch if order == "reference" else 0
    batches = data.BatchIterator(n, int(batch_size), seed=seed, shuffle=shuffle, order=order, draws_per_batch=draws)
    return Trainer(model, solver, dataset, batches, seed=seed, dtype=dtype, eval_chunk=eval_chunk, init=init, xp=xp,
                   cuda_graph=cuda_graph)


@contextlib.contextmanager
def pinned_threads(threads: int | None):
    """Run the block with the BLAS pool limited to ``threads`` (None: as it is)."""
    if threads is None:
        yield
        return
    with threadpool_limits(limits=int(threads), user_api="blas"):
        yield


def data_fingerprint(ds) -> str:
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


def load_dataset(name: str, data_dir: str | None, dtype, n_train: int | None, n_test: int | None):
    kwargs = {}
    if n_train is not None:
        kwargs["n_train"] = n_train
    if n_test is not None:
        kwargs["n_test"] = n_test
    try:
        return data.load(name, data_dir=data_dir, dtype=dtype, **kwargs)
    except TypeError as exc:  # a loader without size options
        raise UsageError(f"data set {name!r} cannot be loaded with these options ({exc})") from None


def check_fit(model, ds) -> None:
    """Fail before any work if the network does not fit the data set: its task (classifier or
    autoencoder), then one forward pass of one row."""
    check_task(model, ds)
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
        self.config = config
        self.dtype = check_dtype(config["dtype"])
        config["net"], config["solver"] = check_net(config["net"]), check_solver(config["solver"])
        self.model = nets.build(config["net"])
        # data parallel under mpiexec/srun (engine/app/distributed.py)
        self.comm = join_world(self.model, config.get("grad_worker_fraction"))
        if dataset is None:
            dataset = load_dataset(config["dataset"], config.get("data_dir"), self.dtype,
                                    config.get("n_train"), config.get("n_test"))
        self.dataset = dataset
        check_fit(self.model, dataset)
        self.solver = build_solver(config["solver"], self.model, hyper)
        self.hyper = dict(self.solver.hyper)
        try:
            self.trainer = make_trainer(self.model, self.solver, dataset, batch_size=config["batch_size"],
                                        seed=config["seed"], dtype=self.dtype, eval_chunk=config.get("eval_chunk", 1000),
                                        shuffle=config.get("shuffle", True), init=config.get("init", "numpy"),
                                        order=config.get("order", "pcg64"), cuda_graph=bool(config.get("cuda_graph", False)))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.path: Path | None = None
        self.environment: dict = {}
        self.meta: dict = {}
        self.checkpoints = 0
        self.status = "running"
        #: where a diverged run blew up: the iteration and the step rows after the last checkpoint
        self.divergence: dict = {}

    @classmethod
    def new(cls, args, net: str, solver: str, hyper: dict, dataset=None) -> "Run":
        """A fresh run from the common training options of ``train`` / ``compare``."""
        net, solver = check_net(net), check_solver(solver)
        dtype = check_dtype(args.dtype)
        data_dir = check_data_dir(args.data_dir)
        ds_name = check_dataset(args.data) if args.data else nets.PRESETS[net][1]
        if dataset is None:
            dataset = load_dataset(ds_name, data_dir, dtype, args.n_train, args.n_test)
        epochs = args.epochs
        if epochs is None and args.max_time is None:
            epochs = PRESET_EPOCHS.get(net, DEFAULT_EPOCHS)
        model_desc = nets.PRESETS[net][2]
        config = {
            "net": net, "net_description": model_desc, "solver": solver,
            "dataset": ds_name, "dataset_description": dataset.description,
            "dataset_substitute": bool(dataset.substitute), "dataset_source": getattr(dataset, "source", ""),
            "n_train": args.n_train, "n_test": args.n_test,
            "n_train_used": int(dataset.x_train.shape[0]), "n_test_used": int(dataset.x_test.shape[0]),
            "data_dir": data_dir, "data_fingerprint": data_fingerprint(dataset),
            "dtype": str(dtype), "seed": args.seed, "init": args.init, "order": args.order,
            "batch_size": args.batch_size or PRESET_BATCH_SIZES.get(net, DEFAULT_BATCH_SIZE),
            "epochs": epochs, "max_time": args.max_time, "checkpoint_every": args.checkpoint_every,
            "checkpoint_every_s": args.checkpoint_every_s, "log_every_s": args.log_every_s, "log_every": args.log_every,
            "threads": args.threads, "probe_every": args.probe_every, "probes": args.probe,
            "eval_chunk": 1000, "shuffle": True, "grad_worker_fraction": getattr(args, "grad_worker_fraction", None),
            "cuda_graph": bool(getattr(args, "cuda_graph", False)),
        }
        run = cls(config, hyper, dataset)
        config["n_params"] = run.model.n_params
        config["world_size"] = run.comm.size
        config["param_shapes"] = [list(s) for s in run.model.shapes]
        config["weight_decay"] = run.model.weight_decay
        run.environment = environment_info()
        config["backend"] = run.environment["backend"]
        config["cstep_version"] = __version__
        config["command"] = " ".join(["cstep"] + list(getattr(args, "argv", []) or []))
        return run

    @classmethod
    def resume(cls, path, data_dir: str | None = None) -> "Run":
        """The run stored in ``path``, restored to its last checkpoint."""
        header = runfile.load_run(path)
        config = dict(header.config)
        if data_dir is not None:
            config["data_dir"] = check_data_dir(data_dir)
        elif config.get("data_dir") and not Path(config["data_dir"]).is_dir():
            raise UsageError(f"the run's data directory {config['data_dir']} does not exist here; "
                             "point --data-dir at the data")
        saved_shapes = [list(numpy.shape(p)) for p in header.state["params"]]
        model = nets.build(check_net(config["net"]))
        if saved_shapes != [list(s) for s in model.shapes]:
            raise UsageError(f"run file {path} does not fit network {config['net']}: {_first_shape_mismatch(saved_shapes, model)}; "
                             "it comes from an incompatible network definition")
        run = cls(config, header.hyperparameters)
        fingerprint = data_fingerprint(run.dataset)
        if config.get("data_fingerprint") and fingerprint != config["data_fingerprint"]:
            raise UsageError(f"data set {config['dataset']} differs from the one run {path} started on; "
                             "resume with the same data (same --data-dir and data files)")
        record = runfile.load_run(path, array_module=get_xp(), solver_template=run.trainer.solver_state)
        try:
            run.trainer.load_state_dict(record.state)
        except ValueError as exc:
            raise UsageError(f"run file {path} does not fit: {exc}") from None
        run.path = Path(path)
        run.meta = dict(record.meta)
        run.checkpoints = int(record.progress.get("checkpoints", 0))
        run.environment = environment_info()
        world_note(path, record.progress.get("world_size", config.get("world_size", 1)), run.comm.size)
        if is_root() and run.environment["backend"] != header.environment.get("backend", run.environment["backend"]):
            print(f"cstep resume: note: the run was made on the {header.environment.get('backend')} backend and continues "
                  f"on {run.environment['backend']}; it will not be bit-for-bit what the original backend gives", file=sys.stderr)
        return run

    def checkpoint(self, status: str | None = None) -> None:
        """Write the whole run atomically to its run file."""
        if status is not None:
            self.status = status
        self.checkpoints += 1
        gather = getattr(self.solver, "gather_state", None)
        if self.comm.size > 1 and gather is not None:  # KAISA: every layer's state from its owner (collective)
            gather(self.trainer.solver_state)
        state = self.trainer.state_dict()
        state["progress"].update({
            **self.divergence,
            "status": self.status, "checkpoints": self.checkpoints,
            "target_epochs": self.config.get("epochs"),
            "checkpoint_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "world_size": self.comm.size,
        })
        plan = getattr(self.solver, "factor_plan", lambda: None)()
        if plan is not None:  # KAISA's assignment of the factor work (the bytes per iteration: history comm_bytes)
            state["progress"]["kaisa"] = plan.record()
        meta = dict(self.meta)
        meta["param_layers"] = [(i, type(layer).__name__) for i, layer in enumerate(self.model.layers)
                                for _ in layer.param_shapes()]
        record = runfile.RunRecord(config=self.config, hyperparameters=self.hyper, state=state,
                           environment=self.environment, meta=meta)
        if self.comm.rank == 0:  # data parallel: every rank holds the same run; rank 0 writes it
            runfile.save_run(self.path, record)
            self.meta["created"] = record.meta["created"]


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM; ``saved`` tells whether a checkpoint was written first."""

    def __init__(self, path, iteration: int, signame: str, saved: bool):
        super().__init__(path, iteration, signame, saved)
        self.path, self.iteration, self.signame, self.saved = path, iteration, signame, saved
        #: the command that continues the work (``cstep compare --resume ...`` for a comparison)
        self.resume = f"cstep resume {path}"

    def __str__(self) -> str:
        where = (f"saved a checkpoint at iteration {self.iteration} to {self.path}" if self.saved
                 else f"the run file {self.path} keeps its last checkpoint")
        return f"interrupted by {self.signame}; {where}; continue with '{self.resume}'"

    @property
    def exit_status(self) -> int:
        return 128 + (signal.SIGTERM if self.signame == "SIGTERM" else signal.SIGINT)


class StopOnSignal:
    """SIGINT/SIGTERM ask the run to stop at the next iteration boundary (after a checkpoint); a
    second signal stops at once. Re-entrant: a command holding it around several runs (compare)
    keeps one request across them; the previous handlers come back when the outermost block ends."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None
        self._old = {}
        self._depth = 0

    def _handle(self, signum, frame):
        if self.requested:  # the second signal: no waiting
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self):
        if self._depth == 0:
            self.requested = None
            if threading.current_thread() is threading.main_thread():
                for sig in self.SIGNALS:
                    self._old[sig] = signal.signal(sig, self._handle)
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for sig, old in self._old.items():
                signal.signal(sig, old)
            self._old = {}
        return False


#: the process's one signal watcher (see :class:`StopOnSignal`)
STOP = StopOnSignal()


def drive(run: Run, quiet: bool, label: str = "") -> str:
    """Train ``run`` to its target (config ``epochs`` / ``max_time``), checkpointing every
    ``checkpoint_every`` iterations, every ``checkpoint_every_s`` seconds and at every epoch end;
    returns the final status ('complete', 'diverged'). SIGINT/SIGTERM checkpoint at the next
    iteration boundary and raise :class:`Interrupted`."""
    cfg, trainer = run.config, run.trainer
    epochs, max_time = cfg.get("epochs"), cfg.get("max_time")
    every, every_s = cfg.get("checkpoint_every"), cfg.get("checkpoint_every_s")
    progress = Progress(quiet, label, every_s=cfg.get("log_every_s", 30.0), every=cfg.get("log_every"), max_time=max_time)
    stop = STOP
    last = [time.monotonic()]

    def checkpoint(status=None):
        run.checkpoint(status)
        last[0] = time.monotonic()

    probe_every, probes = cfg.get("probe_every"), cfg.get("probes") or []
    probe_batch = _probe_batch(trainer) if probe_every and probes else None

    def on_step(tr, row):
        progress.step(tr, row, epochs)
        if probe_batch is not None and tr.iteration % probe_every == 0:
            tr.history.add_probe({"iteration": tr.iteration, **probe(tr.model, tr.params, *probe_batch, probes, seed=tr.iteration)})
        requested, due = collective_flags(run.comm, stop.requested, bool(every_s and time.monotonic() - last[0] >= every_s))
        if requested:
            checkpoint("interrupted")
            raise Interrupted(run.path, tr.iteration, requested, saved=True)
        if (every and tr.iteration % every == 0) or due:
            checkpoint()

    def on_epoch(tr, row):
        progress.epoch(tr, row, epochs)
        checkpoint()

    done = (epochs is not None and trainer.epoch >= epochs) or (max_time is not None and trainer.cpu_time >= max_time)
    if not done:
        if not trainer.warm_started:
            progress.message(f"warm start: one pass over {trainer.dataset.x_train.shape[0]} training examples")
        try:
            # overflow on the way to a NaN loss is reported once, as TrainingDiverged, not as NumPy warnings
            with stop, numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
                trainer.run(epochs=epochs, max_time=max_time, on_step=on_step, on_epoch=on_epoch)
        except TrainingDiverged as exc:
            progress.close()
            _keep_divergence(run, trainer)
            print(f"cstep: {label}{exc}; the run file keeps the last finite checkpoint", file=sys.stderr)
            return "diverged"
        except KeyboardInterrupt:
            raise Interrupted(run.path, trainer.iteration, stop.requested or "SIGINT", saved=False) from None
        finally:
            progress.close()
    checkpoint("complete")
    return "complete"


def _probe_batch(trainer, size: int = 1000):
    """The fixed batch the curvature probes use: the first ``size`` training examples."""
    n = min(size, trainer.dataset.x_train.shape[0])
    return trainer._batch(numpy.arange(n))


def _keep_divergence(run: Run, trainer) -> None:
    """Back to the last finite checkpoint, recording where the loss blew up and the step rows from
    there to the blow-up in the progress record (the history stays the checkpoint's, so that a
    resume continues it)."""
    steps = trainer.history.steps
    record = runfile.load_run(run.path, array_module=get_xp(), solver_template=trainer.solver_state)
    kept = record.progress["iteration"]
    run.divergence = {"diverged_at": trainer.iteration, "diverged_cpu_time": trainer.cpu_time,
                      "diverged_steps": {k: v[kept:] for k, v in steps.items()}}
    trainer.load_state_dict(record.state)
    run.checkpoint("diverged")


def summary(run: Run, status: str, elapsed: float) -> dict:
    ep = run.trainer.history.epochs
    return {
        "run": str(run.path), "status": status,
        "net": run.config["net"], "solver": run.config["solver"], "dataset": run.config["dataset"],
        "hyperparameters": run.hyper,
        "epochs": run.trainer.epoch, "iterations": run.trainer.iteration,
        "train_loss": ep.get("train_loss", []), "test_loss": ep.get("test_loss", []),
        "cpu_time": ep.get("cpu_time", []), "wall_time": ep.get("wall_time", []),
        "training_cpu_seconds": run.trainer.cpu_time, "training_wall_seconds": run.trainer.wall_time,
        # a diverged run's clocks are its last finite checkpoint's; this is the CPU time it had spent at the blow-up
        "cpu_seconds_spent": run.divergence.get("diverged_cpu_time", run.trainer.cpu_time),
        "elapsed_seconds": elapsed,
        "backend": run.environment.get("backend"), "dtype": run.config["dtype"],
        **{k: ep[k] for k in ("train_accuracy", "test_accuracy") if k in ep},
    }


def default_run_path(out_dir: Path, net: str, solver: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{net}-{solver}-{stamp}.h5"
    k = 2
    while path.exists():
        path = out_dir / f"{net}-{solver}-{stamp}-{k}.h5"
        k += 1
    return path


def _first_shape_mismatch(saved_shapes, model) -> str:
    """The first parameter array whose shape differs, by name, layer and shapes."""
    for k, (saved, want) in enumerate(zip(saved_shapes, model.shapes)):
        if list(saved) != list(want):
            layer = next(i for i in range(len(model.layers)) if model.layer_param_index[i] <= k
                         < model.layer_param_index[i] + len(model.layers[i].param_shapes()))
            return (f"parameter p{k:03d} (layer {layer}, {type(model.layers[layer]).__name__}) has shape {tuple(saved)} "
                    f"where the network needs {tuple(want)}")
    return (f"the file has {len(saved_shapes)} parameter arrays ({sum(int(numpy.prod(s)) for s in saved_shapes)} values), "
            f"the network {len(model.shapes)} ({model.n_params} values)")


def claim_path(path: Path, overwrite: bool) -> Path:
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name for --out (e.g. {path / 'run.h5'})")
    if path.exists() and not overwrite:
        raise UsageError(f"run file {path} already exists; continue it with 'cstep resume {path}', "
                         "choose another --out, or pass --overwrite")
    return path
