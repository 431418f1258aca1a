"""The training loop shared by the command line and the benchmarks.

It follows the K-BFGS reference protocol (docs/kbfgs.md sections 3.4-3.5):

* minibatches are sequential slices of a per-epoch permutation (``data.BatchIterator``),
  remainder dropped; a solver with a warm start consumes one epoch of the iterator first, so it
  starts on a reshuffled order;
* before the first iteration (epoch 0: the initial point) and after every epoch the regularised loss (data loss + 0.5 tau ||theta||^2) is evaluated on the
  full training and test sets in chunks (1000 by default, remainder dropped) and averaged over
  chunks; classifiers also record accuracy;
* two clocks are kept: process CPU time (the reference's time axis) and wall time, both
  accumulated over training iterations only, excluding evaluation and the warm start.

A :class:`Trainer` holds everything a run needs to continue exactly (parameters, solver state,
iterator state, history, clocks); :meth:`Trainer.state_dict` and :meth:`Trainer.load_state_dict`
expose it as flat records for the run files. Callbacks see each iteration and each epoch end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy

from ..backend import array_module, get_xp, is_device_array, to_device, to_host
from ..cuda_graph import GraphedStep, check_graphable
from ..parallel import shard_rows
from .staging import PinnedStaging

__all__ = ["Trainer", "History", "evaluate", "host_scalars", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class History:
    """Per-iteration, per-epoch and per-probe records (columns of Python floats/ints)."""

    steps: dict[str, list] = field(default_factory=dict)
    epochs: dict[str, list] = field(default_factory=dict)
    #: curvature probes taken during training (``cstep train --probe-every``)
    probes: dict[str, list] = field(default_factory=dict)

    @staticmethod
    def _append(table: dict[str, list], row: dict) -> None:
        n = len(next(iter(table.values()))) if table else 0
        for key, value in row.items():
            if key not in table:
                table[key] = [math.nan] * n  # a column that appears late is NaN before
            table[key].append(value)
        for key, col in table.items():
            if len(col) == n:
                col.append(math.nan)

    def add_step(self, row: dict) -> None:
        self._append(self.steps, row)

    def add_probe(self, row: dict) -> None:
        self._append(self.probes, row)

    def add_epoch(self, row: dict) -> None:
        self._append(self.epochs, row)

    def last_epoch(self) -> dict:
        return {k: v[-1] for k, v in self.epochs.items()} if self.epochs else {}


def _scalar(v):
    """A host Python scalar from a host 0-d array / scalar (a device value costs one sync)."""
    v = to_host(v)
    if isinstance(v, numpy.ndarray):
        v = v.item()
    if isinstance(v, numpy.generic):
        v = v.item()
    if isinstance(v, complex):
        v = v.real
    return v


PROCESS_TIME = "process_time"
CUDA_EVENTS = "cuda_events"


class _StepClock:
    """The time of one step: the process's CPU time (NumPy) or the device time between two CUDA
    events (CuPy; read after the iteration's one host sync, which the stop event precedes, so it
    adds none), and the wall time."""

    def __init__(self, xp, kind: str):
        self.kind, self.xp = kind, xp
        self.w0 = time.perf_counter()
        if kind == CUDA_EVENTS:
            self.start, self.end = xp.cuda.Event(), xp.cuda.Event()
            self.start.record()
        else:
            self.c0 = time.process_time()

    def stop(self) -> None:
        if self.kind == CUDA_EVENTS:
            self.end.record()
        else:
            self.c1 = time.process_time()

    def seconds(self) -> tuple[float, float]:
        wall = time.perf_counter() - self.w0
        if self.kind == CUDA_EVENTS:
            return self.xp.cuda.get_elapsed_time(self.start, self.end) / 1e3, wall
        return self.c1 - self.c0, wall


#: the training set is kept on the device when it needs at most this fraction of the device's free
#: memory when the trainer is built (batches are then gathered there; only their indices travel)
DEVICE_DATA_FRACTION = 0.25


def host_scalars(info: dict) -> dict:
    """``info`` with every value a host Python scalar, in ONE device-to-host transfer.

    The device scalars (0-d CuPy arrays) are stacked into one float64 vector on the device and
    copied once (one host sync per call, whatever the number of fields); booleans and integers
    come back as ``bool`` and ``int`` (counts are far below 2**53, so float64 carries them
    exactly), complex values as their real part, as :func:`_scalar` gives them one by one.
    """
    device = [k for k, v in info.items() if is_device_array(v)]
    out = {k: _scalar(v) for k, v in info.items() if k not in device}
    if device:
        xp = array_module(info[device[0]])
        values = to_host(xp.stack([xp.asarray(info[k]).real.astype(numpy.float64).reshape(()) for k in device]))
        for k, value in zip(device, values.tolist()):
            kind = info[k].dtype.kind
            out[k] = bool(value) if kind == "b" else int(value) if kind in "iu" else value
    return {k: out[k] for k in info}


def evaluate(model, params, x, y, chunk: int = 1000, dtype=None) -> dict:
    """Regularised loss (and accuracy for classifiers) on a whole host dataset.

    Chunks of ``chunk`` rows, remainder dropped (as the reference code does) unless the set is
    smaller than one chunk; the mean over chunks is returned.
    """
    n = x.shape[0]
    if n == 0:
        return {}
    size = min(chunk, n)
    n_chunks = n // size
    xp = array_module(*params)  # the data follows the parameters, wherever they live
    dtype = dtype or params[0].dtype
    reg = model.regularizer(params)
    losses, accs = [], []
    for c in range(n_chunks):
        xb = to_device(x[c * size:(c + 1) * size], xp, dtype=dtype)
        yb = xb if y is None else to_device(y[c * size:(c + 1) * size], xp, dtype=_target_dtype(y, dtype))
        out = model.predict(params, xb)
        losses.append(model.loss_fn.value(out, yb))
        if model.loss_fn.classification:
            accs.append(model.loss_fn.accuracy(out, yb))
    result = {"loss": sum(losses) / n_chunks + reg}
    if accs:
        result["accuracy"] = sum(accs) / n_chunks
    return host_scalars(result)


def _target_dtype(y, dtype):
    """Real regression targets take the run's dtype (float32 stays float32); labels keep theirs."""
    return dtype if numpy.issubdtype(y.dtype, numpy.floating) else None


class Trainer:
    """One training run: model + solver + dataset + batch iterator + history.

    ``dataset`` is a ``data.Dataset`` (host arrays; ``y_train is None`` for autoencoders, whose
    target is the input). ``batches`` is the batch iterator over its training examples
    (``next_indices()``, ``batches_per_epoch``, ``batch_size``, ``n_examples``, ``state_dict()``,
    ``load_state_dict()``: a ``data.BatchIterator``, built by the caller, e.g.
    :func:`engine.app.runs.make_trainer`). Parameters live in one flat device buffer whose views
    the solver updates in place; ``seed`` seeds the initial weights (drawn by ``init``: "numpy" or
    "torch", see :meth:`engine.model.Model.init`). Each batch is gathered on the host and copied
    to the parameters' module once.
    """

    def __init__(self, model, solver, dataset, batches, seed: int = 9999, dtype=numpy.float32,
                 eval_chunk: int = 1000, init: str = "numpy", xp=None, cuda_graph: bool = False):
        self.model, self.solver, self.dataset = model, solver, dataset
        self.dtype = numpy.dtype(dtype)
        n = dataset.x_train.shape[0]
        if batches.n_examples != n:
            raise ValueError(f"the batch iterator covers {batches.n_examples} examples but the training set has {n}")
        self.iterator = batches
        self.batch_size = int(batches.batch_size)
        self.eval_chunk = int(eval_chunk)
        self.xp = xp or get_xp()
        self.params = model.init(seed=seed, dtype=self.dtype, xp=self.xp, init=init)
        #: the training set on the device (x, y) when it fits (DEVICE_DATA_FRACTION), else None
        self.device_data = self._device_training_set()
        #: otherwise on a device: pinned double buffers, the next batch copied during the step (staging.py)
        self.staging = None
        self.solver_state = solver.init(self.params)
        self.history = History()
        self.iteration = 0
        self.epoch = 0
        self.cpu_time = 0.0
        self.wall_time = 0.0
        #: what ``cpu_time`` (the ``max_time`` budget) counts: the device's time between two CUDA events
        #: around each step on CuPy, the process's CPU time on NumPy (stated in the run file's progress)
        self.clock = CUDA_EVENTS if self.xp is not numpy else PROCESS_TIME
        self.warm_started = not solver.needs_warm_start
        #: the step: ``solver.step``, or with ``cuda_graph`` its CUDA-graph replay (engine.cuda_graph;
        #: refused at once where it cannot work)
        self.step = solver.step
        if cuda_graph:
            check_graphable(solver, self.xp)
            self.step = GraphedStep(solver, self.xp)

    # --- state for run files ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue this run bit for bit, as host copies.

        ``{"params": [host arrays], "solver_state": {...}, "iterator": {...},
        "history": {"steps": {col: list}, "epochs": {col: list}}, "progress": {...}}``. Arrays
        are copied, so the record does not change when training goes on.
        """
        def copy(v):
            if isinstance(v, dict):
                return {k: copy(x) for k, x in v.items()}
            if isinstance(v, numpy.ndarray):
                return v.copy()
            if type(v).__module__.startswith("cupy"):
                return v.copy()  # stays on the device; the run file converts with to_host
            if isinstance(v, list):
                return list(v)
            return v

        return {
            "params": [numpy.array(to_host(p)) for p in self.params],
            "solver_state": copy(self.solver_state),
            "iterator": copy(self.iterator.state_dict()),
            "history": {"steps": {k: list(v) for k, v in self.history.steps.items()},
                        "probes": {k: list(v) for k, v in self.history.probes.items()},
                        "epochs": {k: list(v) for k, v in self.history.epochs.items()}},
            "progress": {"iteration": self.iteration, "epoch": self.epoch, "warm_started": self.warm_started,
                         "cpu_time": self.cpu_time, "wall_time": self.wall_time, "clock": self.clock},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (e.g. read from a run file) into this trainer.

        The parameters must match the model's shapes; they are copied into one flat device
        buffer of the trainer's dtype (the solver updates its views in place).
        """
        params = state["params"]
        shapes = [tuple(numpy.shape(p)) for p in params]
        if shapes != [tuple(s) for s in self.model.shapes]:
            raise ValueError(f"the saved parameters ({len(shapes)} arrays, {sum(int(numpy.prod(s)) for s in shapes)} values) "
                             f"do not fit network {self.model.name} ({len(self.model.shapes)} arrays, {self.model.n_params} values); "
                             "the run was made with a different network")
        dtypes = {numpy.dtype(to_host(p).dtype) for p in params}
        if dtypes and dtypes != {self.dtype}:
            raise ValueError(f"the saved parameters are {', '.join(sorted(map(str, dtypes)))} but this trainer runs in {self.dtype}; "
                             "use the run's dtype")
        flat = numpy.concatenate([numpy.asarray(to_host(p)).reshape(-1) for p in params]) if params else numpy.zeros(0, self.dtype)
        self.params = self.model.unflatten(to_device(flat, self.xp, dtype=self.dtype))
        self.solver_state = dict(state["solver_state"])
        self.iterator.load_state_dict(state["iterator"])
        self.history = History(steps={k: list(v) for k, v in state["history"]["steps"].items()},
                               probes={k: list(v) for k, v in state["history"].get("probes", {}).items()},
                               epochs={k: list(v) for k, v in state["history"]["epochs"].items()})
        prog = state["progress"]
        self.iteration = int(prog["iteration"])
        self.epoch = int(prog["epoch"])
        self.warm_started = bool(prog["warm_started"])
        self.cpu_time = float(prog["cpu_time"])
        self.wall_time = float(prog["wall_time"])
        saved_clock = prog.get("clock", PROCESS_TIME)  # run files before the device clock: process time
        if saved_clock != self.clock:
            raise ValueError(f"the run's time budget was counted with {saved_clock} but this trainer counts {self.clock}; "
                             "resume it on the backend it ran on")

    # --- data ---------------------------------------------------------------------------
    def _device_training_set(self):
        """The training set on the device, or None: copied once when it takes at most
        :data:`DEVICE_DATA_FRACTION` of the device's free memory (inputs in the run's dtype)."""
        if self.xp is numpy:
            return None
        x, y = self.dataset.x_train, self.dataset.y_train
        nbytes = x.size * self.dtype.itemsize + (0 if y is None else y.size * numpy.dtype(_target_dtype(y, self.dtype)).itemsize)
        free, _ = self.xp.cuda.runtime.memGetInfo()
        if nbytes > DEVICE_DATA_FRACTION * free:
            return None
        xd = to_device(x, self.xp, dtype=self.dtype)
        return xd, (None if y is None else to_device(y, self.xp, dtype=_target_dtype(y, self.dtype)))

    def _rows_of(self, idx):
        """This rank's rows of a global batch (engine/parallel.py), without recording them."""
        comm = self.model.parallel.comm
        lo, hi = shard_rows(len(idx), comm.rank, comm.size)
        return idx[lo:hi]

    def _batch(self, idx):
        """``(x[idx], y[idx])`` on the parameters' module (inputs cast to the run's dtype, labels keep
        theirs); an autoencoder's target is the same array as its input. With the training set on the
        device the batch is gathered there (only the indices travel); otherwise it is gathered on the
        host and copied once. In a data-parallel run only this rank's rows of the global batch are
        taken (engine/parallel.py)."""
        idx = idx[self.model.parallel.shard(len(idx))]
        if self.device_data is not None:
            xd, yd = self.device_data
            ix = to_device(numpy.asarray(idx, dtype=numpy.int64), self.xp)
            xb = xd[ix]
            return xb, (xb if yd is None else yd[ix])
        if self.xp is not numpy:
            y = self.dataset.y_train
            if self.staging is None:
                comm = self.model.parallel.comm
                lo, hi = shard_rows(self.batch_size, comm.rank, comm.size)  # this rank's rows of a batch
                self.staging = PinnedStaging(self.xp, self.dataset.x_train, y, hi - lo, self.dtype,
                                             None if y is None else (_target_dtype(y, self.dtype) or y.dtype))
            batch = self.staging.take(idx)
            if batch is not None:
                return batch
        xb = to_device(self.dataset.x_train[idx], self.xp, dtype=self.dtype)
        y = self.dataset.y_train
        return xb, (xb if y is None else to_device(y[idx], self.xp, dtype=_target_dtype(y, self.dtype)))

    def _warm_start_batches(self):
        for _ in range(self.iterator.batches_per_epoch):
            yield self._batch(self.iterator.next_indices())

    # --- loop ---------------------------------------------------------------------------
    def warm_start(self) -> None:
        """The solver's one-epoch warm-start pass (docs/kbfgs.md section 4.2), if it has one."""
        if not self.warm_started:
            self.solver_state = self.solver.warm_start(self.params, self.solver_state, self._warm_start_batches())
            self.warm_started = True

    def evaluate(self) -> dict:
        ds = self.dataset
        row = {f"train_{k}": v for k, v in evaluate(self.model, self.params, ds.x_train, ds.y_train, self.eval_chunk, self.dtype).items()}
        if ds.x_test is not None and len(ds.x_test):
            row.update({f"test_{k}": v for k, v in evaluate(self.model, self.params, ds.x_test, ds.y_test, self.eval_chunk, self.dtype).items()})
        return row

    def run(self, epochs: int | None = None, max_time: float | None = None,
            on_step: Callable[[Trainer, dict], None] | None = None,
            on_epoch: Callable[[Trainer, dict], None] | None = None) -> History:
        """Train until ``epochs`` epochs in total are done or ``max_time`` seconds of :attr:`clock` are spent
        (CPU seconds on NumPy, device seconds on CuPy).

        The time budget is checked at epoch boundaries, as in the reference code.
        """
        if epochs is None and max_time is None:
            raise ValueError("give a number of epochs or a time budget")
        if self.iteration == 0 and not self.history.epochs:  # epoch 0: where the run starts from
            row = {"epoch": 0, "iterations": 0, "cpu_time": 0.0, "wall_time": 0.0, **self.evaluate()}
            self.history.add_epoch(row)
            if on_epoch:
                on_epoch(self, row)
        self.warm_start()
        per_epoch = self.iterator.batches_per_epoch
        comm = self.model.parallel.comm
        while (epochs is None or self.epoch < epochs) and (max_time is None or self.cpu_time < max_time):
            # an epoch may have been interrupted by a checkpoint: finish what is left of it
            start_it = self.iteration - self.epoch * per_epoch
            for _ in range(start_it, per_epoch):
                x, y = self._batch(self.iterator.next_indices())
                clock, b0 = _StepClock(self.xp, self.clock), comm.bytes
                self.params, self.solver_state, info = self.step(self.params, self.solver_state, x, y)
                clock.stop()
                if self.staging is not None:  # the next batch's gather and copy run during this step
                    self.staging.prefetch(self._rows_of(self.iterator.peek_indices()))
                # the one host sync per iteration: it also waits for the step, so the clocks are honest
                row = host_scalars(info)
                if comm.size > 1:
                    row["comm_bytes"] = comm.bytes - b0  # what this rank sent in the step's collectives
                cpu, wall = clock.seconds()
                self.cpu_time += cpu
                self.wall_time += wall
                if comm.size > 1 and max_time is not None:
                    # rank 0's clock decides the budget, so every rank stops after the same iteration
                    # (a rank that stopped alone would leave the others waiting in a collective)
                    self.cpu_time, self.wall_time = comm.bcast_object((self.cpu_time, self.wall_time), root=0)
                self.iteration += 1
                row = {"iteration": self.iteration, **row}
                self.history.add_step(row)
                if not math.isfinite(row.get("loss", 0.0)):
                    raise TrainingDiverged(f"the training loss became {row['loss']} at iteration {self.iteration}; "
                                           "lower the learning rate or raise the damping")
                if on_step:
                    on_step(self, row)
            self.epoch += 1
            row = {"epoch": self.epoch, "iterations": self.iteration, "cpu_time": self.cpu_time,
                   "wall_time": self.wall_time, **self.evaluate()}
            self.history.add_epoch(row)
            if on_epoch:
                on_epoch(self, row)
        return self.history
