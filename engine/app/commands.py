"""The ``cstep`` subcommands: each ``cmd_<name>(args) -> int``, wired to its options in
:mod:`engine.app.cli`."""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import nets
import solvers

from .options import (DEFAULT_BATCH_SIZE, PRESET_BATCH_SIZES, UsageError, check_data_dir, check_dataset, check_dtype, check_net, check_solver, given_hyper,
                      tuned)
from .plots import load_for_plot, plot_runs
from .report import compare_table, ensure_parent, info_lines, info_record, print_summary, solver_info, solver_lines
from .runfile import load_run
from .runs import Run, claim_path, default_run_path, drive, load_dataset, summary
from .study import run_study
from .study_targets import METHODS, parse_steps


def cmd_train(args) -> int:
    start = time.perf_counter()
    args.net, args.solver = check_net(args.net), check_solver(args.solver)
    hyper = tuned(args.net, args.solver, given_hyper(args, args.solver))
    path = Path(args.out) if args.out else default_run_path(Path("runs"), args.net, args.solver)
    claim_path(path, args.overwrite)
    run = Run.new(args, args.net, args.solver, hyper)
    run.path = path
    run.checkpoint()  # the run file exists from the start: a crash at any later moment leaves a resumable file
    status = drive(run, run.config["epochs"], run.config["max_time"], run.config["checkpoint_every"], args.quiet)
    print_summary(summary(run, status, time.perf_counter() - start), args)
    return 0 if status == "complete" else 1


def cmd_resume(args) -> int:
    start = time.perf_counter()
    run = Run.resume(args.run, data_dir=args.data_dir)
    if args.epochs is not None and args.epochs < run.trainer.epoch:
        raise UsageError(f"run {args.run} already has {run.trainer.epoch} epochs; --epochs is the new total, so give more "
                         f"than {run.trainer.epoch} (or leave it out)")
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
    status = drive(run, epochs, run.config["max_time"], run.config["checkpoint_every"], args.quiet)
    print_summary(summary(run, status, time.perf_counter() - start), args)
    return 0 if status == "complete" else 1


def cmd_info(args) -> int:
    rec = load_run(args.run)
    if args.json:
        print(json.dumps(info_record(rec), indent=2))
    else:
        print("\n".join(info_lines(rec)))
    return 0


def cmd_plot(args) -> int:
    runs = load_for_plot(args.runs)
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
        solver = check_solver(solver)
        if solver not in out:
            raise UsageError(f"--set {item!r} names solver {solver!r}, which is not among --solvers {','.join(solver_list)}")
        key = key.replace("-", "_")
        cls = solvers.get_solver(solver)
        if key not in cls.hyperparameters:
            raise UsageError(f"solver {solver} has no hyper-parameter {key!r}; it takes {', '.join(cls.hyperparameters) or 'none'}")
        out[solver][key] = value
    return out


def cmd_compare(args) -> int:
    start = time.perf_counter()
    args.net = check_net(args.net)
    solver_list = [check_solver(s.strip()) for s in args.solvers.split(",") if s.strip()]
    if not solver_list:
        raise UsageError("--solvers is empty; give a comma-separated list, e.g. kbfgs,kfac,adam")
    if len(set(solver_list)) < len(solver_list):
        raise UsageError(f"--solvers {args.solvers} names a solver twice; name each once")
    sets = _parse_sets(args.set, solver_list)
    out_dir = Path(args.out_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = {s: out_dir / f"{args.net}-{s}-{stamp}.h5" for s in solver_list}
    for p in paths.values():
        claim_path(p, False)
    # build every run before training any, so a bad hyper-parameter fails before work is done
    dtype = check_dtype(args.dtype)
    data_dir = check_data_dir(args.data_dir)
    ds_name = check_dataset(args.data) if args.data else nets.PRESETS[args.net][1]
    dataset = load_dataset(ds_name, data_dir, dtype, args.n_train, args.n_test)
    runs = []
    for s in solver_list:
        run = Run.new(args, args.net, s, tuned(args.net, s, sets[s]), dataset=dataset)
        run.path = paths[s]
        runs.append(run)
    results = []
    for run in runs:
        run.checkpoint()
        label = f"[{run.config['solver']}] "
        status = drive(run, run.config["epochs"], run.config["max_time"], run.config["checkpoint_every"], args.quiet, label)
        results.append(summary(run, status, time.perf_counter() - start))
        run.trainer = None  # free the model state before the next solver
    plot_path = Path(args.output) if args.output else out_dir / f"compare-{args.net}-{stamp}.png"
    plot_runs([load_run(r["run"]) for r in results if r["epochs"] > 0] or load_for_plot([]), plot_path)
    if args.json:
        print(json.dumps({"plot": str(plot_path), "runs": results}, indent=2))
        return 0
    if not args.quiet:
        print(compare_table(results, plot_path))
    return 0


def cmd_study(args) -> int:
    """Run the study from parsed arguments; user errors raise ValueError (one line, exit 2)."""
    try:
        sizes = tuple(int(s) for s in str(args.sizes).replace(" ", "").split(",") if s)
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers such as 6,10,10,4, got {args.sizes!r}") from None
    for path in (args.json, args.csv, args.plot):
        if path:
            ensure_parent(path)
    if args.plot and not str(args.plot).lower().endswith(".png"):
        raise ValueError(f"--plot writes a PNG; give a path ending in .png, got {args.plot!r}")
    result = run_study(
        targets=args.target or ["all"],
        methods=args.method or list(METHODS),
        precisions=args.precision,
        steps=parse_steps(args.steps) if args.steps else None,
        mlp={"sizes": sizes, "batch": args.batch, "seed": args.seed},
        acts=args.act,
        progress=not args.quiet,
    )
    if not args.quiet:
        print(result.table())
        print()
        print(result.summary())
    written = []
    if args.json:
        result.to_json(args.json)
        written.append(args.json)
    if args.csv:
        result.to_csv(args.csv)
        written.append(args.csv)
    if args.plot:
        result.plot(args.plot)
        written.append(args.plot)
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_presets(args) -> int:
    rows = []
    for name in nets.preset_names():
        _, dataset, description = nets.PRESETS[name]
        rows.append({"name": name, "dataset": dataset, "n_params": nets.build(name).n_params,
                     "batch_size": PRESET_BATCH_SIZES.get(name, DEFAULT_BATCH_SIZE), "description": description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  data {r['dataset']:<14} {r['n_params']:>10,} parameters, batch {r['batch_size']:<5} "
              f"{r['description']}")
    return 0


def cmd_solvers(args) -> int:
    if args.name is None:
        rows = [{"name": n, "summary": solvers.get_solver(n).summary} for n in solvers.solver_names()]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            width = max(len(r["name"]) for r in rows)
            print("\n".join(f"{r['name']:<{width}}  {r['summary']}" for r in rows))
            print("\n'cstep solvers NAME' lists a solver's hyper-parameters and defaults.")
        return 0
    name = check_solver(args.name)
    info = solver_info(name)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print("\n".join(solver_lines(info)))
    return 0
