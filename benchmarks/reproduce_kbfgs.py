"""Reproduce the published MNIST-autoencoder numbers of K-BFGS, K-BFGS(L) and K-FAC.

Goldfarb, Ren, Bahamou, "Practical Quasi-Newton Methods for Training Deep Neural Networks"
(NeurIPS 2020), official ``Demo.ipynb`` (docs/kbfgs.md section 7): MNIST autoencoder
784-1000-500-250-30 (mirrored, ReLU, sigmoid cross-entropy), batch 1000, float32,
weight decay tau = 1e-5, seed 9999; K-BFGS and K-BFGS(L) with alpha = 0.3, lambda = 0.3, K-FAC
with alpha = 1, lambda = 3. The training loop is :class:`engine.app.train.Trainer` (built by :func:`engine.app.runs.make_trainer`) (the reference
protocol: warm-start methods consume one epoch of the batch iterator first; per epoch the loss
with 0.5 tau ||theta||^2 on the full training and test sets in chunks of 1000).

Per epoch it prints training and test loss next to the published Demo numbers, the numbers of
the measured reference run (docs/kbfgs.md pitfall 20) and the seconds per epoch, both process CPU time
(the reference's time axis; with multi-threaded BLAS it counts every thread) and wall time,
training iterations only (evaluation and warm start excluded). At the end it checks the issue's
targets and exits non-zero if one is missed.

Initial point and batches. By default the run starts from the reference code's own initial
point, the float32 weights PyTorch draws after ``torch.manual_seed(9999)`` (``--init torch``,
reproduced bit for bit without PyTorch by ``engine/init.py``), and sees the reference code's own
batches (``--order reference``: its legacy ``numpy.random`` shuffles plus the one generator draw
per iteration of its second-order methods, ``data/batches.py``). Only floating-point rounding then
differs from the reference run. This matters because K-BFGS and K-BFGS(L) at the Demo's
alpha = 0.3, lambda = 0.3 sit at the edge of stability in their first ~100 iterations, and the
dynamics are chaotic: from the same initial point and batches, this solver and an op-for-op
PyTorch port of the official code (kept outside this repository; it reproduces the
measured reference run of docs/kbfgs.md pitfall 20 to the printed digits: K-BFGS 166.80 / 110.01, K-BFGS(L)
164.08 / 107.55 after epochs 1 / 2) agree to 1e-7 for 8 iterations in float32 and then drift apart
as rounding errors grow (3e-3 at iteration 20); the port itself ends epoch 1 at 166.80 with two
threads and 167.19 with one. The official method diverges off the published seed: the port
goes to NaN at iteration 37 from seed 2 (K-BFGS), and at iteration 22 when only the batch order
changes (K-BFGS(L), NumPy seed 2 with PyTorch seed 9999); from seed 1 it ends epoch 1 at 175.55,
just over the 175 target. This solver does the same: NaN at iteration 37 from seed 2, 171.23 after
epoch 1 from seed 1. So the published targets belong to seed 9999 under the reference
protocol, not to the method at any seed; ``--seed``, ``--init numpy`` and ``--order pcg64`` show
the spread.

    PYTHONPATH=. python benchmarks/reproduce_kbfgs.py --epochs 10
    PYTHONPATH=. python benchmarks/reproduce_kbfgs.py --solvers kbfgs --epochs 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy

import data
import nets
from data.batches import ORDERS
from engine.init import INIT_SCHEMES
from engine.app.runs import make_trainer
from engine.app.train import TrainingDiverged
from solvers import make_solver

#: Demo.ipynb at HEAD (Hessian-action V2, K-FAC with fixed 0.9 EMA): epoch -> (train, test).
PUBLISHED = {
    "kbfgs": {1: (169.02, 167.85), 2: (109.64, 108.67), 5: (68.03, 68.23), 10: (59.81, 60.98), 20: (56.30, 58.47),
              30: (54.99, 57.79), 50: (53.82, 57.61), 75: (53.11, 57.79), 100: (52.66, 58.05), 120: (52.42, 58.27)},
    "kfac": {1: (183.17, 182.72), 2: (135.13, 134.33), 5: (73.97, 73.68), 10: (61.65, 62.48), 20: (56.72, 58.52),
             30: (55.14, 57.65), 50: (53.75, 57.38), 75: (52.90, 57.60)},
}
#: The official code run on a 2-core x86-64 CPU (docs/kbfgs.md pitfall 20): epoch -> training loss.
REFERENCE_RUN = {
    "kbfgs": {1: 166.80, 2: 110.01, 5: 68.34, 10: 60.07},
    "kbfgs_l": {1: 164.08, 2: 107.55, 5: 66.21, 10: 59.18},
    "kfac": {1: 182.83, 2: 139.88, 5: 74.21, 10: 61.36},
}
#: The issue's acceptance targets: epoch -> maximum training loss.
TARGETS = {
    "kbfgs": {1: 175.0, 2: 115.0, 5: 71.0, 10: 61.5},
    "kfac": {5: 77.0, 10: 63.5},
}
#: K-BFGS(L) must end within this fraction of K-BFGS (at the last epoch, >= 10).
KBFGSL_TOLERANCE = 0.05

HYPER = {
    "kbfgs": {"lr": 0.3, "damping": 0.3},
    "kbfgs_l": {"lr": 0.3, "damping": 0.3},
    "kfac": {"lr": 1.0, "damping": 3.0},
}


def run_solver(name: str, dataset, epochs: int, extra: dict, log, log_every: int = 0, seed: int = 9999,
               init: str = "torch", order: str = "reference") -> list[dict]:
    model = nets.build("mnist-ae")  # tau = 1e-5 on all parameters
    solver = make_solver(name, model, **{**HYPER.get(name, {}), **extra})
    trainer = make_trainer(model, solver, dataset, batch_size=1000, seed=seed, dtype=numpy.float32, init=init,
                      order=order)
    log(f"\n=== {name}: {solver!r}")
    c0, w0 = time.process_time(), time.perf_counter()
    trainer.warm_start()
    log(f"warm start: {time.process_time() - c0:.1f} s CPU, {time.perf_counter() - w0:.1f} s wall (not counted)")
    init = trainer.evaluate()
    log(f"epoch   0  train {init['train_loss']:8.2f}  test {init['test_loss']:8.2f}")
    log(f"{'epoch':>5} {'train':>9} {'test':>9} {'published':>17} {'ref run':>8} {'target':>7}"
        f" {'CPU s/ep':>9} {'wall s/ep':>9}  damping/skips (last step)")
    rows = []
    last = {"cpu": 0.0, "wall": 0.0}

    def on_epoch(tr, row):
        e = row["epoch"]
        pub = PUBLISHED.get(name, {}).get(e)
        ref = REFERENCE_RUN.get(name, {}).get(e)
        tgt = TARGETS.get(name, {}).get(e)
        cpu, wall = row["cpu_time"] - last["cpu"], row["wall_time"] - last["wall"]
        last.update(cpu=row["cpu_time"], wall=row["wall_time"])
        step = {k: v[-1] for k, v in tr.history.steps.items()}
        events = " ".join(f"{k}={step[k]:g}" for k in ("powell_damping", "lm_damping", "skipped_H_g", "skipped_H_a") if k in step)
        log(f"{e:5d} {row['train_loss']:9.2f} {row['test_loss']:9.2f} "
            f"{(f'{pub[0]:.2f} / {pub[1]:.2f}' if pub else '-'):>17} {(f'{ref:.2f}' if ref else '-'):>8} "
            f"{(f'{tgt:.1f}' if tgt else '-'):>7} {cpu:9.1f} {wall:9.1f}  {events}")
        rows.append({"epoch": e, "train_loss": row["train_loss"], "test_loss": row["test_loss"],
                     "cpu_s": cpu, "wall_s": wall})

    def on_step(tr, row):
        if log_every and tr.iteration % log_every == 0:
            log(f"  iteration {tr.iteration:5d}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "iteration"))

    try:
        # a diverging run overflows on its way to NaN; the Trainer reports that in one line (as the CLI does)
        with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
            trainer.run(epochs=epochs, on_epoch=on_epoch, on_step=on_step)
    except TrainingDiverged as exc:  # report it and go on with the next solver
        log(f"{name} DIVERGED: {exc}")
    return rows


def check_targets(results: dict[str, list[dict]], log, epochs: int) -> bool:
    ok = True
    log("\n=== targets")
    for name, targets in TARGETS.items():
        if name not in results:
            continue
        by_epoch = {r["epoch"]: r["train_loss"] for r in results[name]}
        for e, tgt in sorted(t for t in targets.items() if t[0] <= epochs):
            if e in by_epoch:
                passed = by_epoch[e] <= tgt
                ok &= passed
                log(f"{name:8s} epoch {e:3d}: {by_epoch[e]:8.2f} <= {tgt:6.1f}  {'PASS' if passed else 'FAIL'}")
            elif not results[name] or results[name][-1]["epoch"] < e:
                ok = False
                log(f"{name:8s} epoch {e:3d}: not reached (diverged or stopped early)  FAIL")
    if "kbfgs" in results and "kbfgs_l" in results and epochs >= 10:
        last = {name: (results[name][-1]["epoch"] if results[name] else 0) for name in ("kbfgs", "kbfgs_l")}
        e = min(last.values())
        if e >= 10:
            a = {r["epoch"]: r["train_loss"] for r in results["kbfgs"]}[e]
            b = {r["epoch"]: r["train_loss"] for r in results["kbfgs_l"]}[e]
            rel = abs(b - a) / a
            passed = rel <= KBFGSL_TOLERANCE
            ok &= passed
            log(f"kbfgs_l  epoch {e:3d}: {b:8.2f} vs kbfgs {a:8.2f}: {100 * rel:.2f}% <= {100 * KBFGSL_TOLERANCE:.0f}%  {'PASS' if passed else 'FAIL'}")
        else:
            ok = False
            stopped = " and ".join(f"{name} after epoch {n}" for name, n in last.items() if n < epochs)
            log(f"kbfgs_l  epoch  10: not compared, {stopped} (diverged or stopped early)  FAIL")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--solvers", default="kbfgs,kbfgs_l,kfac", help="comma-separated: kbfgs, kbfgs_l, kfac (others run with their defaults)")
    ap.add_argument("--data-dir", default=os.environ.get("CSTEP_DATA_DIR"), help="folder with the MNIST files (default: CSTEP_DATA_DIR)")
    ap.add_argument("--hessian-action", default=None, choices=("V1", "V2"), help="K-BFGS Hessian-action variant (default V2)")
    ap.add_argument("--json", default=None, help="also write the per-epoch figures to this JSON file")
    ap.add_argument("--seed", type=int, default=9999, help="initial weights and data order (the published seed is 9999)")
    ap.add_argument("--init", default="torch", choices=INIT_SCHEMES,
                    help="who draws the initial weights for --seed: 'torch' (default) is exactly the reference code's "
                         "initial point, 'numpy' NumPy's PCG64 draws of the same distribution")
    ap.add_argument("--order", default="reference", choices=ORDERS,
                    help="batch order for --seed: 'reference' (default) is exactly the reference code's batches, "
                         "'pcg64' this project's own shuffles")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a hyper-parameter of every solver run, e.g. --set lr=0.2 (repeatable)")
    ap.add_argument("--log-every", type=int, default=0, help="print the step record every this many iterations (0: never)")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    dataset = data.load("mnist", data_dir=args.data_dir, dtype=numpy.float32)
    log(f"MNIST: {dataset.x_train.shape[0]} train, {dataset.x_test.shape[0]} test; batch 1000, float32, tau = 1e-5, seed {args.seed} "
        f"({args.init} initial weights, {args.order} batch order)")
    log(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')} OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '-')}, "
        f"{os.cpu_count()} CPUs; CPU time sums over threads")
    results = {}
    for name in [s.strip() for s in args.solvers.split(",") if s.strip()]:
        extra = {}
        if args.hessian_action and name in ("kbfgs", "kbfgs_l"):
            extra["hessian_action"] = args.hessian_action
        for item in args.set:
            key, _, value = item.partition("=")
            extra[key] = value
        results[name] = run_solver(name, dataset, args.epochs, extra, log, args.log_every, args.seed, args.init,
                                   args.order)
    ok = check_targets(results, log, args.epochs)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
