"""Seconds to build the generated data sets at their default sizes, bypassing the cache.

CURVES-like (20000 train / 10000 test, 28x28) needs nothing; FACES-like (103500 / 41400, 25x25)
needs ``faces/olivettifaces.mat`` in ``--data-dir`` / ``CSTEP_DATA_DIR`` and is skipped without
it. Each build goes through ``data.load(..., cache=False)`` (generation plus validation); the
best of ``--repeat`` runs is reported (wall and process CPU seconds), then one cached load (write, then read back) in a
temporary cache directory. The generators are single-threaded NumPy/SciPy code (no BLAS).

    python benchmarks/data_generation.py [--data-dir DIR] [--repeat N] [--no-faces]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import scipy  # noqa: E402

import data  # noqa: E402
from data.faces import OLIVETTI_FILE  # noqa: E402
from data.paths import find_file  # noqa: E402


def best_of(repeat: int, fn, *args, **kw) -> tuple[float, float, object]:
    """The shortest wall and CPU (process) seconds of ``repeat`` calls ``fn(*args, **kw)``, and
    the last result. CPU time is the figure to trust on a machine shared with other work."""
    wall = cpu = float("inf")
    out = None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kw)
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="folder holding faces/olivettifaces.mat (default: CSTEP_DATA_DIR)")
    ap.add_argument("--repeat", type=int, default=1, help="builds per set; the best time is reported")
    ap.add_argument("--no-faces", action="store_true", help="time only the CURVES-like set")
    args = ap.parse_args()

    threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    print(f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"{platform.machine()} {platform.system()}")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"cpus: {os.cpu_count()} (usable {usable}); "
          f"thread env: {', '.join(f'{k}={v}' for k, v in threads.items() if v) or 'unset'}")

    sets = [("curves", {})]
    if not args.no_faces:
        if find_file("faces", [OLIVETTI_FILE], args.data_dir) is None:
            print(f"faces: skipped ({OLIVETTI_FILE} not found; pass --data-dir or set CSTEP_DATA_DIR)")
        else:
            sets.append(("faces", {"data_dir": args.data_dir}))

    for name, kw in sets:
        wall, cpu, d = best_of(args.repeat, data.load, name, cache=False, source="generated", **kw)
        mb = (d.x_train.nbytes + d.x_test.nbytes) / 2**20
        print(f"{name}: build {wall:.2f} s wall, {cpu:.2f} s CPU (cache bypassed, best of {args.repeat}) -> "
              f"train {d.x_train.shape}, test {d.x_test.shape}, {d.x_train.dtype}, {mb:.0f} MiB")
        with tempfile.TemporaryDirectory() as tmp:
            write, _, _ = best_of(1, data.load, name, cache_dir=tmp, source="generated", **kw)
            hit, _, _ = best_of(1, data.load, name, cache_dir=tmp, source="generated", **kw)
            print(f"{name}: first load with cache {write:.2f} s wall (build + write), cache hit {hit:.2f} s wall")


if __name__ == "__main__":
    main()
