"""The ``cstep`` subcommands: each ``cmd_<name>(args) -> int``, wired to its options in
:mod:`engine.app.cli` (``compare`` lives in :mod:`engine.app.compare`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nets
import solvers

from .distributed import barrier, join_world, quiet_unless_root, root_lock, root_value
from .options import DEFAULT_BATCH_SIZE, PRESET_BATCH_SIZES, UsageError, check_net, check_solver, given_hyper, tuned
from . import analyze
from .plots import load_for_plot, plot_analysis, plot_probes, plot_runs, run_labels
from .report import ensure_parent, info_lines, info_record, print_summary, solver_info, solver_lines
from .runfile import check_run_file, load_run
from .runs import Run, claim_path, default_run_path, drive, pinned_threads, summary
from .study import run_study
from .study_targets import METHODS, parse_steps


def cmd_train(args) -> int:
    start = time.perf_counter()
    args.net, args.solver = check_net(args.net), check_solver(args.solver)
    hyper = tuned(args.net, args.solver, given_hyper(args, args.solver))
    path = Path(root_value(str(args.out) if args.out else str(default_run_path(Path("runs"), args.net, args.solver))))
    quiet_unless_root(args)
    if path.is_dir():
        claim_path(path, args.overwrite)  # the one-line message for a directory
    with root_lock(path), pinned_threads(args.threads):  # a second writer fails here, before any check or work
        claim_path(path, args.overwrite)
        barrier()  # data parallel: every rank has checked the path before rank 0 creates the file
        run = Run.new(args, args.net, args.solver, hyper)
        run.path = path
        run.checkpoint()  # the run file exists from the start: a crash at any later moment leaves a resumable file
        status = drive(run, args.quiet)
    print_summary(summary(run, status, time.perf_counter() - start), args)
    return 0 if status == "complete" else 1


def cmd_resume(args) -> int:
    check_run_file(args.run)
    threads = args.threads if args.threads is not None else load_run(args.run).config.get("threads")
    quiet_unless_root(args)
    with root_lock(args.run), pinned_threads(threads):
        return _resume_locked(args)


def _resume_locked(args) -> int:
    start = time.perf_counter()
    run = Run.resume(args.run, data_dir=args.data_dir)
    if args.epochs is not None and args.epochs < run.trainer.epoch:
        raise UsageError(f"run {args.run} already has {run.trainer.epoch} epochs; --epochs is the new total, so give more "
                         f"than {run.trainer.epoch} (or leave it out)")
    if args.epochs is not None:
        run.config["epochs"] = args.epochs
    if args.max_time is not None:
        run.config["max_time"] = args.max_time
    for key in ("checkpoint_every", "checkpoint_every_s", "log_every_s", "log_every", "threads"):
        if getattr(args, key) is not None:
            run.config[key] = getattr(args, key)
    if args.grad_worker_fraction is not None:  # KAISA's split from now on (the numbers do not change)
        run.config["grad_worker_fraction"] = args.grad_worker_fraction
        join_world(run.model, args.grad_worker_fraction)
    epochs = run.config["epochs"]
    if epochs is not None and run.trainer.epoch >= epochs and args.epochs is None and not args.quiet:
        print(f"cstep resume: run already has {run.trainer.epoch} of {epochs} epochs; pass --epochs N to go further",
              file=sys.stderr)
    status = drive(run, args.quiet)
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
    if args.probes:
        if not any(r.history.get("probes") for r in runs):
            raise UsageError("these runs recorded no curvature probes; train with --probe-every N --probe top-eig,trace")
        out = plot_probes(runs, run_labels(runs), args.output)
    else:
        out = plot_runs(runs, args.output, args.title, per_iteration=args.per_iteration)
    if not args.quiet:
        print(f"wrote {out}")
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


def cmd_analyze(args) -> int:
    if bool(args.run) == bool(args.net):
        raise UsageError("give a run file (cstep analyze RUN.h5) or a preset (--net NET), one of them")
    if not (args.top_k or args.trace or args.density):
        raise UsageError("nothing to compute: give --top-k K, --trace and/or --density")
    result = analyze.run_analysis(args)
    if not args.quiet:
        print(analyze.table(result))
    if args.json:
        ensure_parent(args.json)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot_analysis(result, args.plot)}")
    return 0
