"""The ``cstep`` command line: the parser and the entry point.

Each subcommand is a function ``cmd_<name>(args) -> int`` in :mod:`engine.app.commands`, wired to
its options here. Errors a user can fix (bad names, bad values, missing files) are raised as
:class:`~engine.app.options.UsageError` (or ``ValueError`` from the library) and printed as one
line on stderr with exit status 2, never as a traceback.

Subcommands: ``train`` (a new run, written to an HDF5 run file), ``resume`` (continue a run from
its last checkpoint, bit for bit), ``info`` (what a run file holds), ``plot`` (loss against epoch
and CPU time, several runs overlaid), ``compare`` (several solvers on the same data, seed and
budget) and ``study`` (the complex-step precision study, :mod:`engine.app.study`).

Solver hyper-parameter options are generated from the solver registry
(:data:`solvers.SOLVERS`, each solver's ``hyperparameters``), network choices from the preset
registry (:data:`nets.PRESETS`), so a new solver or preset appears here without edits. This
table of options is the one long function the layout allows (:func:`build_parser`).
"""

from __future__ import annotations

import argparse
import sys

import nets
import solvers
from data.batches import ORDERS

from .. import __version__
from ..backend import BackendError
from ..communicator import CommunicatorError
from ..init import INIT_SCHEMES
from . import analyze, commands, compare
from .probes import PROBES, parse_probes
from .runs import Interrupted
from .options import (DEFAULT_BATCH_SIZE, DEFAULT_CHECKPOINT_EVERY_S, DEFAULT_LOG_EVERY_S, DEFAULT_THREADS, DEFAULT_COMPARE_SOLVERS, DEFAULT_DTYPE, DEFAULT_EPOCHS, DEFAULT_INIT,
                      DEFAULT_NET, DEFAULT_ORDER, DEFAULT_SEED, DEFAULT_SOLVER, PRESET_BATCH_SIZES, PRESET_EPOCHS,
                      TUNED_HYPERPARAMETERS, UsageError, check_solver, dataset_names, escape_percent, hyper_flag, hyper_table,
                      nonnegative_float, nonnegative_int, positive_float, positive_int)
from .study_targets import DEFAULT_SEED as STUDY_SEED


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2), like every other error."""

    def error(self, message):  # noqa: D401 (argparse API)
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def add_hyper_options(parser, only: str | None = None) -> None:
    """One ``--name`` per hyper-parameter of any registered solver (paper names, e.g. --lr); with
    ``only``, the help lists just that solver's (``cstep train --solver kfac --help``)."""
    tuned = "; ".join(f"{net} with {solver}: " + ", ".join(f"{k} {v}" for k, v in values.items())
                      for (net, solver), values in TUNED_HYPERPARAMETERS.items() if only in (None, solver))
    per_solver = "; ".join(f"{name}: " + " ".join(hyper_flag(k) for k in solvers.get_solver(name).hyperparameters)
                           for name in solvers.solver_names())
    if only is None:
        title = "solver hyper-parameters"
        text = (f"By their paper names; each defaults to the chosen solver's own value (listed per option). Which solver "
                f"takes which: {per_solver}. 'cstep train --solver NAME --help' lists one solver's alone; 'cstep solvers "
                f"NAME' describes it.")
    else:
        title = f"hyper-parameters of {only} ({solvers.get_solver(only).summary})"
        text = "By their paper names, with the solver's defaults."
    if tuned:
        text += f" Tuned network/solver defaults, used where the option is not given: {tuned}."
    group = parser.add_argument_group(title, escape_percent(text + " Giving one the chosen solver does not take is an error."))
    for key, specs in sorted(hyper_table().items()):
        if only is not None and only not in {name for name, _ in specs}:
            group.add_argument(hyper_flag(key), dest=f"hyper_{key}", default=None, help=argparse.SUPPRESS)
            continue
        specs = [(name, spec) for name, spec in specs if only in (None, name)]
        flag = hyper_flag(key)
        if flag in parser._option_string_actions:  # e.g. a solver's own "seed" next to the run's --seed
            raise RuntimeError(f"hyper-parameter {key} collides with option {flag}")
        first = specs[0][1]
        kind = first.type or type(first.default)
        defaults = "; ".join(f"{solver}: {spec.default}" for solver, spec in specs)
        helps = sorted({spec.help for _, spec in specs})
        help_text = escape_percent(f"{' / '.join(helps)} (defaults: {defaults})")
        if kind is bool:
            group.add_argument(flag, dest=f"hyper_{key}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = {float: "FLOAT", int: "INT"}.get(kind, "VALUE")
            group.add_argument(flag, dest=f"hyper_{key}", default=None, metavar=metavar, help=help_text)


def _add_training_options(p, *, for_compare: bool = False) -> None:
    g = p.add_argument_group("model and data")
    if not for_compare:
        g.add_argument("--net", default=DEFAULT_NET, metavar="NET",
                       help=f"network preset: {', '.join(nets.preset_names())} (default {DEFAULT_NET})")
    g.add_argument("--data", default=None, metavar="NAME",
                   help=f"data set: {', '.join(dataset_names())} (default: the preset's own)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="directory holding the data files (default: $CSTEP_DATA_DIR, else the cache directory); "
                        "CURVES is generated locally when its file is absent")
    g.add_argument("--n-train", type=positive_int, default=None, metavar="N",
                   help="use only the first N training examples (default: all)")
    g.add_argument("--n-test", type=positive_int, default=None, metavar="N",
                   help="use only the first N test examples (default: all)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                   help=f"number of epochs (default {DEFAULT_EPOCHS}; "
                        f"{', '.join(f'{n} {e}' for n, e in PRESET_EPOCHS.items())}; unlimited when --max-time is given)")
    t.add_argument("--max-time", type=positive_float, default=None, metavar="SECONDS",
                   help="training time budget in seconds (process CPU time on NumPy, device time by CUDA events on CuPy; "
                        "excluding evaluation and warm start), checked at epoch ends as the reference code does")
    t.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help=f"minibatch size (default {DEFAULT_BATCH_SIZE}, the reference protocol's; "
                        f"{', '.join(f'{n} {b}' for n, b in PRESET_BATCH_SIZES.items())}); "
                        "the remainder of an epoch is dropped")
    t.add_argument("--dtype", default=DEFAULT_DTYPE, metavar="DTYPE",
                   help=f"real precision of parameters and data: float32 or float64 (default {DEFAULT_DTYPE})")
    t.add_argument("--seed", type=nonnegative_int, default=DEFAULT_SEED, metavar="N",
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
    t.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                   help="also write a checkpoint every N iterations (a checkpoint is always written at every epoch end)")
    t.add_argument("--checkpoint-every-s", type=nonnegative_float, default=DEFAULT_CHECKPOINT_EVERY_S, metavar="SECONDS",
                   help=f"also write a checkpoint when SECONDS of wall time have passed since the last one (default "
                        f"{DEFAULT_CHECKPOINT_EVERY_S:g}; 0: only by iterations and epochs). SIGINT/SIGTERM always save one at "
                        "the next iteration boundary before exiting; a second signal exits at once")
    t.add_argument("--cuda-graph", action="store_true",
                   help="CuPy only, K-BFGS and K-BFGS(L): capture the steady-state step (and the flush step) in CUDA graphs "
                        "and replay them (recorded in the run file; refused on NumPy; docs/gpu.md)")
    t.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS, metavar="N",
                   help=f"BLAS threads (default {DEFAULT_THREADS}: the same figures on every machine; recorded in the run "
                        "file; float32 trajectories of K-BFGS depend on the thread count)")
    t.add_argument("--grad-worker-fraction", type=positive_float, default=None, metavar="F",
                   help="data-parallel runs (mpiexec -n R cstep train ...) of K-FAC, K-BFGS, K-BFGS(L): split the per-layer "
                        "factor work over the ranks as KAISA does; F R ranks hold each layer's inverse factors, from 1 (every "
                        "rank holds every inverse: least communication) to 1/R (one owner per layer: least memory). Default: "
                        "every rank does all the factor work itself")
    t.add_argument("--probe-every", type=positive_int, default=None, metavar="N",
                   help="every N iterations, record curvature probes on a fixed batch (the first 1000 training "
                        "examples) in the run's /history/probes, outside the training clocks (default: none)")
    t.add_argument("--probe", type=parse_probes, default=list(PROBES), metavar="top-eig,trace",
                   help="which probes: top-eig (top Hessian eigenvalue, 20 Lanczos steps on complex-step products), "
                        "trace (Hutchinson, 10 probes); default both")
    _add_log_options(t)
    o = p.add_argument_group("output")
    o.add_argument("--quiet", action="store_true", help="no progress bar, no log lines, no summary (--json still prints)")
    o.add_argument("--json", action="store_true",
                   help="print a JSON summary at the end: run path, epochs, per-epoch train and test loss and "
                        "clocks, elapsed seconds, backend, dtype")


def _add_log_options(group, defaults: bool = True) -> None:
    group.add_argument("--log-every-s", type=nonnegative_float, default=DEFAULT_LOG_EVERY_S if defaults else None,
                       metavar="SECONDS", help=f"off a terminal, print a progress line (iteration, loss, it/s, ETA) every "
                                               f"SECONDS (default {DEFAULT_LOG_EVERY_S:g}; 0: only at epoch ends)")
    group.add_argument("--log-every", type=positive_int, default=None, metavar="N",
                       help="off a terminal, also print a progress line every N iterations")


def build_parser(solver_help: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; ``solver_help`` narrows ``train --help``'s hyper-parameters to one solver."""
    parser = _Parser(
        prog="cstep",
        description="cstep: complex-step curvature and second-order neural-network training "
                    "(K-BFGS, K-BFGS(L), Newton-Krylov, K-FAC, Hessian-free, Adam, RMSprop, SGD) on NumPy or CuPy.",
        epilog="Run 'cstep COMMAND --help' for the options of a command. 'cstep train' with no options trains "
               f"{DEFAULT_NET} with {DEFAULT_SOLVER} for {PRESET_EPOCHS.get(DEFAULT_NET, DEFAULT_EPOCHS)} epochs and "
               "writes runs/NET-SOLVER-TIME.h5; "
               "'cstep presets' and 'cstep solvers' list the networks and solvers.",
    )
    parser.add_argument("--version", action="version", version=f"cstep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    solver_list = ", ".join(solvers.solver_names())

    p = sub.add_parser(
        "train", help="train a network and write an HDF5 run file",
        description=f"Train a network preset with a solver and write everything to an HDF5 run file (atomically, at "
                    f"every epoch end and every --checkpoint-every iterations), so that 'cstep resume' continues it bit "
                    f"for bit. With no options: {DEFAULT_NET} on the locally generated CURVES-like set with {DEFAULT_SOLVER}, "
                    f"{PRESET_EPOCHS.get(DEFAULT_NET, DEFAULT_EPOCHS)} epochs, batch "
                    f"{PRESET_BATCH_SIZES.get(DEFAULT_NET, DEFAULT_BATCH_SIZE)}, {DEFAULT_DTYPE}, written to "
                    f"runs/{DEFAULT_NET}-{DEFAULT_SOLVER}-YYYYmmdd-HHMMSS.h5.")
    p.add_argument("--solver", default=DEFAULT_SOLVER, metavar="NAME",
                   help=f"solver: {solver_list} (default {DEFAULT_SOLVER})")
    _add_training_options(p)
    p.add_argument("--out", default=None, metavar="PATH",
                   help="run file to write (default runs/NET-SOLVER-YYYYmmdd-HHMMSS.h5)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    add_hyper_options(p, only=solver_help)
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser(
        "resume", help="continue a run from its last checkpoint",
        description="Continue a run from the last checkpoint in its run file, with the same network, data, solver "
                    "and options, bit for bit on the same backend; the run file keeps being updated in place.")
    p.add_argument("run", metavar="RUN.h5", help="the run file")
    p.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                   help="new total number of epochs (default: the run's original target)")
    p.add_argument("--max-time", type=positive_float, default=None, metavar="SECONDS",
                   help="new total training CPU-time budget in seconds (default: the run's own)")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                   help="checkpoint every N iterations from now on (default: the run's own setting)")
    p.add_argument("--grad-worker-fraction", type=positive_float, default=None, metavar="F",
                   help="KAISA's split of the factor work in a data-parallel run from now on (default: the run's own)")
    p.add_argument("--checkpoint-every-s", type=nonnegative_float, default=None, metavar="SECONDS",
                   help="checkpoint every SECONDS of wall time from now on (default: the run's own setting)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="BLAS threads from now on (default: the run's own; another count is not bit for bit)")
    _add_log_options(p, defaults=False)
    p.add_argument("--data-dir", default=None, metavar="DIR", help="where the data files are now (default: as recorded)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no log lines, no summary")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end (as 'cstep train --json')")
    p.set_defaults(func=commands.cmd_resume)

    p = sub.add_parser(
        "info", help="show what a run file holds",
        description="Show a run file's configuration, hyper-parameters, progress, final losses and environment.")
    p.add_argument("run", metavar="RUN.h5", help="the run file")
    p.add_argument("--json", action="store_true",
                   help="print everything as JSON (config, hyperparameters, progress, final, per-epoch history, environment)")
    p.set_defaults(func=commands.cmd_info)

    p = sub.add_parser(
        "plot", help="plot loss curves of one or more runs",
        description="Plot training (solid) and test (dashed) loss against epoch and against training CPU time, "
                    "log scale, several runs overlaid and labelled by solver.")
    p.add_argument("runs", nargs="+", metavar="RUN.h5", help="run files")
    p.add_argument("-o", "--output", required=True, metavar="FIG.png", help="image to write (format from the suffix)")
    p.add_argument("--title", default=None, help="figure title (default: network, data set, batch size, dtype)")
    p.add_argument("--probes", action="store_true",
                   help="plot the curvature probes recorded during training (--probe-every) against the iteration")
    p.add_argument("--per-iteration", action="store_true",
                   help="left panel: every step's minibatch loss against the iteration, with the epoch evaluations "
                        "as markers (default: loss against epoch)")
    p.add_argument("--quiet", action="store_true", help="do not print the path written")
    p.set_defaults(func=commands.cmd_plot)

    p = sub.add_parser(
        "compare", help="run several solvers on the same data, seed and budget",
        description="Train one network with several solvers on the same data, initial weights, batch-order rule "
                    "and budget (with --order reference each solver gets the batches the reference code gives "
                    "that method); write one run file per solver, one comparison plot and a table.")
    p.add_argument("--net", default=DEFAULT_NET, metavar="NET",
                   help=f"network preset: {', '.join(nets.preset_names())} (default {DEFAULT_NET})")
    p.add_argument("--solvers", default=",".join(DEFAULT_COMPARE_SOLVERS), metavar="A,B,...",
                   help=f"comma-separated solvers among {solver_list} (default {','.join(DEFAULT_COMPARE_SOLVERS)})")
    p.add_argument("--set", action="append", default=None, metavar="SOLVER.NAME=VALUE",
                   help="a hyper-parameter of one solver, e.g. --set kbfgs.lr=0.1 (repeatable; default: each solver's own)")
    _add_training_options(p, for_compare=True)
    p.add_argument("--out-dir", default="runs", metavar="DIR", help="where the run files go (default runs)")
    p.add_argument("-o", "--output", default=None, metavar="FIG.png",
                   help="comparison plot (default OUT_DIR/compare-NET-YYYYmmdd-HHMMSS.png)")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="run every solver on each seed (initial weights and batch order); the table and figure give "
                        "per solver the median and range over seeds, the diverged runs and the CPU time (default: --seed)")
    p.add_argument("--budget", default=None, metavar="cpu=SECONDS|epochs=N",
                   help="the same budget for every solver: training CPU seconds (cpu=60) or epochs (epochs=5)")
    p.add_argument("--resume", default=None, metavar="MANIFEST",
                   help="finish an interrupted comparison: its manifest (compare-NET-TIME.json, written next to the "
                        "run files) or the folder holding it (the newest); the other options are then taken from it")
    p.set_defaults(func=compare.cmd_compare)

    _add_study_parser(sub)
    _add_analyze_parser(sub)
    _add_listing_parsers(sub)
    return parser


def _add_analyze_parser(sub) -> None:
    p = sub.add_parser(
        "analyze", help="curvature spectra by exact and finite-difference products, side by side",
        description="Lanczos top eigenvalues, Hutchinson/Hutch++ trace, SLQ spectral density and per-layer blocks of "
                    "the Hessian (complex step, R-operator, finite differences), Gauss-Newton or Fisher, at a run's "
                    "last checkpoint or a preset's initial point, on a fixed batch; a table, JSON and a figure.")
    p.add_argument("run", nargs="?", default=None, metavar="RUN.h5", help="the run file (or --net NET)")
    p.add_argument("--net", default=None, metavar="NET", help="a preset at its initial point instead of a run")
    p.add_argument("--curvature", default="cs", metavar="A,B,...",
                   help=f"comma-separated: {', '.join(analyze.CURVATURES)} (default cs)")
    p.add_argument("--top-k", type=nonnegative_int, default=10, metavar="K", help="top eigenvalues by Lanczos (default 10; 0: none)")
    p.add_argument("--lanczos-iter", type=positive_int, default=None, metavar="M",
                   help="Lanczos steps (default max(2K + 10, 30)); each is one product")
    p.add_argument("--trace", action="store_true", help="the trace by Hutchinson and Hutch++")
    p.add_argument("--probes", type=positive_int, default=30, metavar="N", help="products per trace estimate (default 30)")
    p.add_argument("--density", action="store_true", help="the spectral density by stochastic Lanczos quadrature")
    p.add_argument("--density-probes", type=positive_int, default=5, metavar="N", help="SLQ probes (default 5)")
    p.add_argument("--per-layer", action="store_true", help="also the top eigenvalue and trace of each layer's block")
    p.add_argument("--batch", type=positive_int, default=1000, metavar="N", help="the first N training examples (default 1000)")
    p.add_argument("--dtype", default=None, metavar="DTYPE", help="float32 or float64 (default: the run's; float64 for a preset)")
    p.add_argument("--seed", type=nonnegative_int, default=0, metavar="N", help="seed of the probes (and a preset's weights)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="where the data files are (default: as recorded)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every figure as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a figure (densities or top eigenvalues; per layer)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    p.set_defaults(func=commands.cmd_analyze)


def _add_listing_parsers(sub) -> None:
    p = sub.add_parser("presets", help="list the network presets",
                       description="The network presets: name, default data set, parameters and a one-line description.")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=commands.cmd_presets)
    p = sub.add_parser("solvers", help="list the solvers, or describe one",
                       description="The solvers with a one-line description and paper; with NAME, its hyper-parameters "
                                   "with their defaults, checks and meaning, and the networks it has tuned defaults for.")
    p.add_argument("name", nargs="?", metavar="NAME", help="a solver (hyphens or underscores: kbfgs-l, kbfgs_l)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=commands.cmd_solvers)


def _solver_asked_for_help(argv: list[str]) -> str | None:
    """``cstep train --solver NAME --help``: the solver whose options the help should list."""
    if not argv or argv[0] != "train" or not ({"-h", "--help"} & set(argv)):
        return None
    for k, arg in enumerate(argv):
        name = argv[k + 1] if arg == "--solver" and k + 1 < len(argv) else arg.partition("=")[2] if arg.startswith("--solver=") else None
        if name:
            try:
                return check_solver(name)
            except UsageError:
                return None
    return None


def _add_study_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``cstep study`` on an ``argparse`` subparsers object; returns the subparser."""
    p = subparsers.add_parser(
        "study",
        help="precision study: complex step vs forward/central differences",
        description="Relative error of the complex step, forward and central differences against step h, "
                    "on scalar test functions (50-digit references) and on the gradient and Hessian-vector "
                    "product of a small MLP (exact R-operator reference). Prints a table; writes JSON, CSV, PNG.",
    )
    p.add_argument("--target", action="append", metavar="NAME",
                   help="demo, squire-trapp (st-power, st-exp), mlp-hvp, mlp-grad or all (default); repeat or comma-separate")
    p.add_argument("--method", action="append", metavar="NAME",
                   help="cs, forward, central (default: all three); repeat or comma-separate")
    p.add_argument("--act", default="tanh,relu", metavar="ACT",
                   help="MLP hidden activation: tanh, relu, or both (default: tanh,relu)")
    p.add_argument("--sizes", default="6,10,10,4", metavar="W0,W1,...", help="MLP layer widths (default 6,10,10,4)")
    p.add_argument("--batch", type=int, default=16, help="MLP batch size (default 16)")
    p.add_argument("--seed", type=int, default=STUDY_SEED, help=f"seed of the MLP weights, data and direction (default {STUDY_SEED})")
    p.add_argument("--precision", default="both", metavar="P", help="float64, float32 or both (default both)")
    p.add_argument("--steps", metavar="H,H,...", help="custom comma list of steps, e.g. 1e-1,1e-8,1e-30 (default 1e-1 ... 1e-310)")
    p.add_argument("--json", metavar="PATH", help="write the curves, minima and setup as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the curves as long-format CSV")
    p.add_argument("--plot", metavar="PATH", help="write a log-log PNG, one panel per target")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table (only the files written)")
    p.set_defaults(func=commands.cmd_study)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(solver_help=_solver_asked_for_help(argv))
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
    except Interrupted as exc:
        print(f"cstep {args.command}: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"cstep {args.command}: interrupted before training started; nothing was written", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"cstep {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (BackendError, CommunicatorError) as exc:  # e.g. CSTEP_BACKEND=cupy without a GPU, no mpi4py under mpiexec: one line
        print(f"cstep {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
