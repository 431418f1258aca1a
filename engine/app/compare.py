"""``cstep compare``: several solvers on the same data, initial weights, batch-order rule and
budget (``--budget cpu=SECONDS`` for equal training CPU time), over one seed or several
(``--seeds 1,2,3``: per solver the median and range of the final losses, the diverged runs, the
CPU time, and a median curve with its band), one run file each, a manifest that lets an interrupted comparison be finished with
``cstep compare --resume``, one figure and a table."""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

import nets
import solvers

from .options import UsageError, check_data_dir, check_dataset, check_dtype, check_net, check_solver, tuned
from .plots import plot_runs, plot_seeds
from .report import compare_table, seed_statistics, seed_table
from .distributed import world_size
from .runfile import RunFileLock, load_run
from .runs import STOP, Interrupted, Run, claim_path, drive, load_dataset, pinned_threads, summary

MANIFEST_FORMAT = 1


def _parse_sets(items, solver_list) -> dict[str, dict]:
    """``--set kbfgs.lr=0.1`` -> {"kbfgs": {"lr": "0.1"}} (values validated by the solver)."""
    out: dict[str, dict] = {s: {} for s in solver_list}
    for item in items or []:
        head, sep, value = item.partition("=")
        solver, dot, key = head.partition(".")
        if not sep or not dot or not solver or not key:
            raise UsageError(f"--set {item!r} is not SOLVER.NAME=VALUE (e.g. --set kbfgs.lr=0.1)")
        solver = check_solver(solver)
        if solver not in out:
            raise UsageError(f"--set {item!r} names solver {solver!r}, which is not among --solvers {','.join(solver_list)}")
        key = key.replace("-", "_")
        cls = solvers.get_solver(solver)
        if key not in cls.hyperparameters:
            raise UsageError(f"solver {solver} has no hyper-parameter {key!r}; it takes {', '.join(cls.hyperparameters) or 'none'}")
        out[solver][key] = value
    return out


def _write_manifest(path: Path, manifest: dict) -> None:
    """Atomically (temp file, rename), so an interrupted comparison always leaves a readable manifest."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def _read_manifest(where) -> tuple[Path, dict]:
    """The manifest ``where`` names: the file itself, or the newest ``compare-*.json`` in a folder."""
    where = Path(where)
    if where.is_dir():
        found = sorted(where.glob("compare-*.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UsageError(f"{where} holds no comparison manifest (compare-*.json); give the manifest's path")
        where = found[-1]
    try:
        manifest = json.loads(where.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{where} is not a readable comparison manifest ({exc})") from None
    if manifest.get("format") != MANIFEST_FORMAT or "runs" not in manifest:
        raise UsageError(f"{where} is not a cstep comparison manifest")
    return where, manifest


def _train_all(runs, manifest_path: Path, manifest: dict, args, start: float) -> list[dict]:
    """Drive each run in turn under its lock, recording each finished one in the manifest."""
    results = []
    threads = args.threads if getattr(args, "threads", None) is not None else runs[0].config.get("threads")
    with contextlib.ExitStack() as locks, STOP, pinned_threads(threads):  # a signal between two solvers waits for the next one's first step
        for run in runs:
            locks.enter_context(RunFileLock(run.path))
        for run, entry in zip(runs, manifest["runs"]):
            label = f"[{run.config['solver']}] "
            try:
                status = drive(run, args.quiet, label)
            except Interrupted as exc:
                exc.resume = f"cstep compare --resume {manifest_path}"
                raise
            entry["status"] = status
            _write_manifest(manifest_path, manifest)
            results.append({**summary(run, status, time.perf_counter() - start), "seed": run.config["seed"]})
            run.trainer = None  # free the model state before the next solver
    return results


def _finish(results: list[dict], plot_path: Path | None, args, over_seeds: bool = False) -> int:
    records = [load_run(r["run"]) for r in results if r["epochs"] > 0]
    if not records:  # every run diverged in its first epoch: nothing to draw, but the table still counts them
        print("cstep compare: note: no run completed an epoch; no figure drawn", file=sys.stderr)
        plot_path = None
    elif over_seeds:
        plot_seeds(records, plot_path)
    else:
        plot_runs(records, plot_path)
    by_solver = seed_statistics(results) if over_seeds else None
    if args.json:
        print(json.dumps({"plot": str(plot_path) if plot_path else None, "runs": results, **({"by_solver": by_solver} if by_solver else {})},
                         indent=2))
    elif not args.quiet:
        print(seed_table(by_solver, plot_path) if by_solver else compare_table(results, plot_path))
    return 0


def _parse_seeds(text) -> list[int] | None:
    if not text:
        return None
    try:
        seeds = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--seeds {text!r} is not a comma-separated list of integers, e.g. 1,2,3") from None
    if not seeds or len(set(seeds)) < len(seeds) or min(seeds) < 0:
        raise UsageError(f"--seeds {text!r}: give distinct seeds >= 0, e.g. 1,2,3")
    return seeds


def _apply_budget(args) -> None:
    """``--budget cpu=SECONDS`` (the same training CPU time for every solver) or ``--budget epochs=N``."""
    if not args.budget:
        return
    kind, sep, value = str(args.budget).partition("=")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not sep or kind not in ("cpu", "epochs") or number <= 0:
        raise UsageError(f"--budget {args.budget!r} is not cpu=SECONDS or epochs=N (e.g. --budget cpu=60)")
    if kind == "cpu":
        args.max_time = number
    else:
        args.epochs = int(number)


def _plan(args, solver_list, seeds, out_dir: Path, stamp: str) -> list[tuple[str, int, Path]]:
    tag = (lambda seed: f"-seed{seed}") if len(seeds) > 1 else (lambda seed: "")
    plan = [(s, seed, out_dir / f"{args.net}-{s}{tag(seed)}-{stamp}.h5") for s in solver_list for seed in seeds]
    for _, _, path in plan:
        claim_path(path, False)
    return plan


def cmd_compare(args) -> int:
    if world_size() > 1:
        raise UsageError("cstep compare runs in one process; under mpiexec train each solver with 'cstep train' instead")
    if args.resume:
        return _resume_comparison(args)
    start = time.perf_counter()
    args.net = check_net(args.net)
    solver_list = [check_solver(s.strip()) for s in args.solvers.split(",") if s.strip()]
    if not solver_list:
        raise UsageError("--solvers is empty; give a comma-separated list, e.g. kbfgs,kfac,adam")
    if len(set(solver_list)) < len(solver_list):
        raise UsageError(f"--solvers {args.solvers} names a solver twice; name each once")
    sets = _parse_sets(args.set, solver_list)
    seeds = _parse_seeds(args.seeds) or [args.seed]
    _apply_budget(args)
    out_dir = Path(args.out_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    plan = _plan(args, solver_list, seeds, out_dir, stamp)
    # build every run before training any, so a bad hyper-parameter fails before work is done
    dtype = check_dtype(args.dtype)
    data_dir = check_data_dir(args.data_dir)
    ds_name = check_dataset(args.data) if args.data else nets.PRESETS[args.net][1]
    dataset = load_dataset(ds_name, data_dir, dtype, args.n_train, args.n_test)
    runs = []
    with pinned_threads(args.threads):  # the environment each run records names the BLAS threads it trains with
        for s, seed, path in plan:
            run_args = copy.copy(args)
            run_args.seed = seed
            run = Run.new(run_args, args.net, s, tuned(args.net, s, sets[s]), dataset=dataset)
            run.path = path
            runs.append(run)
    plot_path = Path(args.output) if args.output else out_dir / f"compare-{args.net}-{stamp}.png"
    manifest_path = out_dir / f"compare-{args.net}-{stamp}.json"
    manifest = {"format": MANIFEST_FORMAT, "net": args.net, "plot": str(plot_path), "seeds": seeds,
                "command": " ".join(["cstep"] + list(getattr(args, "argv", []) or [])),
                "runs": [{"solver": s, "seed": seed, "run": str(path), "status": "pending"} for s, seed, path in plan]}
    out_dir.mkdir(parents=True, exist_ok=True)
    for run in runs:
        run.checkpoint()  # every run file exists before the first solver trains: all are resumable
    _write_manifest(manifest_path, manifest)
    return _finish(_train_all(runs, manifest_path, manifest, args, start), plot_path, args, len(seeds) > 1)


def _resume_comparison(args) -> int:
    """Finish every unfinished run of a comparison, then draw and tabulate all of them."""
    start = time.perf_counter()
    manifest_path, manifest = _read_manifest(args.resume)
    runs = [Run.resume(entry["run"]) for entry in manifest["runs"]]
    results = _train_all(runs, manifest_path, manifest, args, start)
    return _finish(results, Path(manifest["plot"]), args, len(manifest.get("seeds", [0])) > 1)
