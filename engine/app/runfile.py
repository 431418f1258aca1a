"""HDF5 run files: everything a run needs to continue bit for bit (DESIGN.md convention 6).

A run file is an ordinary HDF5 file, readable with plain ``h5py``::

    /                       attrs: magic = "cstep-run", format_version, cstep_version, created, updated
    /config                 attrs: every option of the run (net, solver, dataset, dtype, seed, batch
                            size, target epochs, ...); attr ``json`` holds the same dict exactly
    /config/hyperparameters attrs: the solver's hyper-parameters by their paper names
    /environment            attrs (engine.app.environment): cstep/python/numpy/scipy/h5py/cupy versions, host, platform,
                            backend, device name, CPU count
    /progress               attrs: iteration, epoch, warm_started, cpu_time, wall_time, clock (what
                            cpu_time counts: process_time, or cuda_events on CuPy), status,
                            checkpoints (how many were written), checkpoint_time (UTC)
    /params/pNNN            one dataset per parameter, in model order (attrs: layer, layer_type)
    /solver_state/<key>     one dataset per state field (keys with '/' become sub-groups); scalars
                            are 0-d datasets; complex arrays are stored as complex
    /iterator/<key>         the data iterator's state (permutation, position, generator words)
    /history/steps/<col>    one 1-d resizable dataset per per-iteration column (iteration, loss, ...)
    /history/probes/<col>   curvature probes taken during training (iteration, top_eig, trace, ...)
    /history/epochs/<col>   per-epoch columns (epoch, iterations, cpu_time, wall_time, train_loss, ...)

Records (solver state, iterator state) are written by :func:`write_record`: each group carries a
JSON attribute ``cstep_index`` listing ``[key, type]`` pairs in their original order, so Python
scalars come back as the same Python type (``int``, ``float``, ``bool``, ``complex``, ``str``,
``None``), NumPy scalars as NumPy scalars, nested dicts as dicts and arrays as arrays.

Writes are atomic: the whole file is written to a temporary file in the same directory, flushed,
``fsync``-ed and renamed over the old one with :func:`os.replace`, so a crash at any moment
leaves either the previous complete checkpoint or the new one, never a mixture.
"""

from __future__ import annotations

import datetime
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from ..backend import is_device_array, to_host

__all__ = ["MAGIC", "FORMAT_VERSION", "RunFileError", "RunRecord", "RunFileLock", "save_run", "load_run",
           "check_run_file", "write_record", "read_record"]

#: the value of the root attribute ``magic`` that marks a cstep run file
MAGIC = "cstep-run"
#: bumped whenever the layout changes incompatibly
FORMAT_VERSION = 1

_INDEX_ATTR = "cstep_index"


class RunFileError(ValueError):
    """A run file is missing, foreign, corrupt or incompatible (one sentence, with the fix)."""


def _h5py():
    import h5py  # noqa: PLC0415 (imported on use: the engine core does not need it)
    return h5py


@dataclass
class RunRecord:
    """The content of a run file.

    ``state`` is a :meth:`engine.train.Trainer.state_dict` (params, solver_state, iterator,
    history, progress); ``config`` and ``hyperparameters`` are flat dicts of Python scalars.
    """

    config: dict
    hyperparameters: dict
    state: dict
    environment: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # root attributes, read back (created, updated, ...)
    path: Path | None = None

    @property
    def progress(self) -> dict:
        return self.state["progress"]

    @property
    def history(self) -> dict:
        return self.state["history"]


# --- records: flat dicts of arrays and scalars ------------------------------------------------
def _is_device_array(v) -> bool:
    return is_device_array(v)


def write_record(group, record: dict) -> None:
    """Write a dict of arrays / scalars / nested dicts under an h5py ``group``, losslessly."""
    index = []
    for key, value in record.items():
        key = str(key)
        if not key or key.startswith("/") or key in (".", ".."):
            raise ValueError(f"record key {key!r} cannot be stored in HDF5; rename it")
        if isinstance(value, dict):
            write_record(group.create_group(key), value)
            tag = "dict"
        elif value is None:
            tag = "none"
        elif isinstance(value, bool):
            group.create_dataset(key, data=numpy.bool_(value))
            tag = "bool"
        elif isinstance(value, int):
            if not -(1 << 63) <= value < (1 << 63):
                group.create_dataset(key, data=str(value))
                tag = "bigint"
            else:
                group.create_dataset(key, data=numpy.int64(value))
                tag = "int"
        elif isinstance(value, float):
            group.create_dataset(key, data=numpy.float64(value))
            tag = "float"
        elif isinstance(value, complex):
            group.create_dataset(key, data=numpy.complex128(value))
            tag = "complex"
        elif isinstance(value, str):
            group.create_dataset(key, data=value)
            tag = "str"
        elif isinstance(value, numpy.generic):
            group.create_dataset(key, data=value)
            tag = "numpy_scalar"
        elif isinstance(value, (list, tuple)):
            group.create_dataset(key, data=json.dumps(list(value)))
            tag = "json_list" if isinstance(value, list) else "json_tuple"
        elif _is_device_array(value) or isinstance(value, numpy.ndarray):
            host = numpy.asarray(to_host(value), order="C")
            group.create_dataset(key, data=host)
            tag = "device_array" if _is_device_array(value) else "array"
        else:
            raise TypeError(f"record field {key!r} has type {type(value).__name__}, which run files cannot store; "
                            "use arrays, Python scalars, strings, lists or dicts")
        index.append([key, tag])
    group.attrs[_INDEX_ATTR] = json.dumps(index)


def read_record(group, array_module=None, template: dict | None = None) -> dict:
    """Inverse of :func:`write_record`.

    Where an array goes: when ``template`` (e.g. a freshly initialised solver state) has the
    field, where the template's value lives (a device array: ``array_module``; anything else: the
    host), so a run written on one backend resumes on another; without a template entry, where it
    was when written (a CuPy array to ``array_module``, a NumPy array stays NumPy: host-only
    fields such as generator words never land on the device).
    """
    if _INDEX_ATTR not in group.attrs:
        raise RunFileError(f"group {group.name} has no {_INDEX_ATTR} attribute")
    out = {}
    template = template or {}
    for key, tag in json.loads(group.attrs[_INDEX_ATTR]):
        if tag == "dict":
            sub = template.get(key) if isinstance(template.get(key), dict) else None
            out[key] = read_record(group[key], array_module, sub)
            continue
        if tag == "none":
            out[key] = None
            continue
        raw = group[key][()]
        if tag == "bool":
            out[key] = bool(raw)
        elif tag == "int":
            out[key] = int(raw)
        elif tag == "bigint":
            out[key] = int(raw.decode() if isinstance(raw, bytes) else raw)
        elif tag == "float":
            out[key] = float(raw)
        elif tag == "complex":
            out[key] = complex(raw)
        elif tag == "str":
            out[key] = raw.decode() if isinstance(raw, bytes) else str(raw)
        elif tag == "numpy_scalar":
            out[key] = raw
        elif tag in ("json_list", "json_tuple"):
            value = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            out[key] = value if tag == "json_list" else tuple(value)
        elif tag in ("array", "device_array"):
            host = numpy.array(raw)  # 0-d datasets read as scalars: make them arrays again
            like = template.get(key)
            on_device = _is_device_array(like) if key in template else tag == "device_array"
            to_xp = (array_module or numpy) if on_device else numpy
            out[key] = host if to_xp is numpy else to_xp.asarray(host)
        else:
            raise RunFileError(f"field {group.name}/{key} has unknown type tag {tag!r}; it was written by a newer cstep")
    return out


# --- history columns -----------------------------------------------------------------------
def _write_columns(group, table: dict) -> None:
    group.attrs["columns"] = json.dumps(list(table))
    for col, values in table.items():
        if values and all(isinstance(v, str) for v in values):
            data = numpy.array(values, dtype=_h5py().string_dtype())
        elif values and all(isinstance(v, bool) for v in values):
            data = numpy.array(values, dtype=numpy.bool_)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values) and values:
            data = numpy.array(values, dtype=numpy.int64)
        else:
            data = numpy.array([float(v) for v in values], dtype=numpy.float64)
        # resizable and chunked so that tools may append rows in place
        group.create_dataset(col, data=data, maxshape=(None,), chunks=(max(1, min(len(data), 4096)),) if len(data) else True)


def _read_columns(group) -> dict:
    cols = json.loads(group.attrs["columns"]) if "columns" in group.attrs else list(group)
    out = {}
    for col in cols:
        data = group[col][()]
        if data.dtype.kind in ("O", "S"):
            out[col] = [v.decode() if isinstance(v, bytes) else str(v) for v in data]
        else:
            out[col] = data.tolist()
    return out


# --- whole files -----------------------------------------------------------------------------
def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_attrs(group, values: dict) -> None:
    for key, value in values.items():
        if value is None:
            continue  # the exact dict (None included) lives in the json attribute of /config
        if isinstance(value, (list, tuple, dict)):
            value = json.dumps(value)
        group.attrs[key] = value


def _plain(value):
    """An h5py attribute value as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, numpy.ndarray):
        return value.tolist()
    if isinstance(value, numpy.generic):
        return value.item()
    return value


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove_stale_temps(path: Path) -> None:
    """Temporary files left by a writer that was killed mid-write: never our own, never one whose
    writer (the PID in its name) is still alive."""
    mine = _temp_name(path).name
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        pid = stale.name[len(path.name) + 2:-len(".tmp")]
        if stale.name == mine or (pid.isdigit() and _pid_alive(int(pid))):
            continue
        try:
            stale.unlink()
        except OSError:
            pass


def _write_file(f, record: RunRecord, created: str) -> None:
    """The whole run into the open h5py file ``f`` (layout: the module docstring)."""
    state = record.state
    f.attrs["magic"] = MAGIC
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["cstep_version"] = record.environment.get("cstep_version", "")
    f.attrs["created"] = created
    f.attrs["updated"] = _utc_now()

    cfg = f.create_group("config")
    cfg.attrs["json"] = json.dumps(record.config)
    _write_attrs(cfg, record.config)
    hyp = cfg.create_group("hyperparameters")
    hyp.attrs["json"] = json.dumps(record.hyperparameters)
    _write_attrs(hyp, record.hyperparameters)

    _write_attrs(f.create_group("environment"), record.environment)
    prog = f.create_group("progress")
    prog.attrs["json"] = json.dumps(state["progress"])
    _write_attrs(prog, state["progress"])

    params = f.create_group("params")
    layer_of = record.meta.get("param_layers") or []
    for k, p in enumerate(state["params"]):
        ds = params.create_dataset(f"p{k:03d}", data=numpy.asarray(to_host(p), order="C"))
        if k < len(layer_of):
            ds.attrs["layer"], ds.attrs["layer_type"] = layer_of[k]
    params.attrs["count"] = len(state["params"])

    write_record(f.create_group("solver_state"), state["solver_state"])
    write_record(f.create_group("iterator"), state["iterator"])
    hist = f.create_group("history")
    _write_columns(hist.create_group("steps"), state["history"]["steps"])
    _write_columns(hist.create_group("probes"), state["history"].get("probes", {}))
    _write_columns(hist.create_group("epochs"), state["history"]["epochs"])


def save_run(path, record: RunRecord) -> Path:
    """Write ``record`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    The HDF5 image is built in memory first and written with plain file I/O, so a full disk or a
    read-only folder is one ``OSError`` naming the file (the previous checkpoint stays intact) and
    never leaves the HDF5 library half-way through a write.
    """
    h5py = _h5py()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    created = record.meta.get("created") or _utc_now()
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        _write_file(f, record, created)
    image = buffer.getbuffer()
    try:
        with open(tmp, "wb") as fh:
            fh.write(image)
            fh.flush()
            os.fsync(fh.fileno())  # durable before the rename publishes it
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno is not None:
            kept = "the previous checkpoint is intact" if path.exists() else "nothing was written"
            raise OSError(exc.errno, f"cannot write run file {path} ({exc.strerror}); {kept}") from None
        raise
    finally:
        image.release()
    _remove_stale_temps(path)
    record.meta["created"] = created
    return path


class RunFileLock:
    """An exclusive lock on a run file for as long as one process writes it (``fcntl.flock`` on the
    hidden file ``.NAME.lock`` beside it, which holds the owner's PID). A second writer gets a
    :class:`RunFileError` at once instead of racing the first."""

    def __init__(self, path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self._fd = None

    def __enter__(self) -> "RunFileLock":
        import fcntl  # noqa: PLC0415 (POSIX only; imported where the lock is taken)

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write run file {self.path} ({exc.strerror}); choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunFileError(f"run file {self.path} is being written by another cstep process (PID {owner}); "
                               "wait for it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock; the file stays (unlinking it would race)
            self._fd = None
        return False


def check_run_file(path) -> Path:
    """``path`` as a Path, after checking that it exists and is a cstep run file of a known format."""
    h5py = _h5py()
    path = Path(path)
    if not path.exists():
        raise RunFileError(f"run file {path} does not exist; give the path of a file written by 'cstep train'")
    if path.is_dir():
        raise RunFileError(f"{path} is a directory, not a run file; give the path of a .h5 file written by 'cstep train'")
    if not h5py.is_hdf5(path):
        raise RunFileError(f"{path} is not an HDF5 file (corrupt or foreign); give a run file written by 'cstep train'")
    try:
        with h5py.File(path, "r") as f:
            magic = _plain(f.attrs.get("magic", ""))
            version = _plain(f.attrs.get("format_version", -1))
    except OSError as exc:
        raise RunFileError(f"{path} cannot be read as HDF5 ({exc}); the file is damaged") from None
    if magic != MAGIC:
        raise RunFileError(f"{path} is an HDF5 file but not a cstep run file (no magic attribute {MAGIC!r}); "
                           "give a run file written by 'cstep train'")
    if not isinstance(version, int) or version < 1:
        raise RunFileError(f"{path} has an invalid format_version {version!r}; the file is damaged")
    if version > FORMAT_VERSION:
        raise RunFileError(f"{path} has run-file format {version}, newer than this cstep reads ({FORMAT_VERSION}); "
                           "upgrade cstep")
    return path


def load_run(path, array_module=None, solver_template: dict | None = None) -> RunRecord:
    """Read a run file written by :func:`save_run`.

    ``array_module`` is where device arrays of the solver state go (default: NumPy);
    ``solver_template`` is a freshly initialised solver state telling which fields are device
    arrays (see :func:`read_record`). Raises :class:`RunFileError` on a foreign or damaged file.
    """
    h5py = _h5py()
    path = check_run_file(path)
    try:
        with h5py.File(path, "r") as f:
            meta = {k: _plain(v) for k, v in f.attrs.items()}
            config = json.loads(_plain(f["config"].attrs["json"]))
            hyper = json.loads(_plain(f["config/hyperparameters"].attrs["json"]))
            environment = {k: _plain(v) for k, v in f["environment"].attrs.items()}
            progress = json.loads(_plain(f["progress"].attrs["json"]))
            count = int(f["params"].attrs["count"])
            params = [f["params"][f"p{k:03d}"][()] for k in range(count)]
            meta["param_layers"] = [(int(f["params"][f"p{k:03d}"].attrs["layer"]), _plain(f["params"][f"p{k:03d}"].attrs["layer_type"]))
                                    for k in range(count) if "layer" in f["params"][f"p{k:03d}"].attrs]
            solver_state = read_record(f["solver_state"], array_module, solver_template)
            iterator = read_record(f["iterator"])
            history = {"steps": _read_columns(f["history/steps"]), "epochs": _read_columns(f["history/epochs"]),
                       "probes": _read_columns(f["history/probes"]) if "probes" in f["history"] else {}}
    except RunFileError as exc:
        raise RunFileError(f"{path} is damaged: {exc}") from None
    except (KeyError, OSError, ValueError, TypeError) as exc:
        raise RunFileError(f"{path} is damaged or incomplete ({type(exc).__name__}: {exc}); "
                           "restore it from a copy or start a new run") from None
    state = {"params": params, "solver_state": solver_state, "iterator": iterator,
             "history": history, "progress": progress}
    return RunRecord(config=config, hyperparameters=hyper, state=state, environment=environment,
                     meta=meta, path=path)
