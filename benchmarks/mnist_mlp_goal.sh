#!/usr/bin/env bash
# The goal of the five baselines of issue 19: `cstep train --net mnist-mlp` reaches >= 97%
# test accuracy in 2 epochs with each solver's documented defaults (full MNIST, the preset's
# batch 1000, float32, one BLAS thread). Runs each solver on seeds 9999 (cstep's default,
# i.e. exactly `cstep train --net mnist-mlp --solver NAME --epochs 2`), 1 and 2 through
# `cstep compare --seeds`, prints the table and the per-run accuracies, and exits 1 if any
# run ends below 97%. About 3 minutes of CPU; one training process at a time.
#
# Usage: CSTEP_DATA_DIR=... benchmarks/mnist_mlp_goal.sh [OUT_DIR] [SOLVERS]
set -euo pipefail
OUT=${1:-/tmp/cstep-mnist-mlp-goal}
SOLVERS=${2:-shampoo,soap,muon,adahessian,sophia}
mkdir -p "$OUT"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
cstep compare --net mnist-mlp --solvers "$SOLVERS" --seeds 9999,1,2 --budget epochs=2 --threads 1 \
    --json --quiet --out-dir "$OUT" > "$OUT/goal.json"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
python - "$OUT/goal.json" <<'EOF2'
import json, sys
from engine.app.report import seed_table
d = json.load(open(sys.argv[1]))
print(seed_table(d["by_solver"], d["plot"]))
short = []
for r in d["runs"]:
    acc = r["test_accuracy"]
    print(f"{r['solver']:<11} seed {r['seed']:<5} test accuracy after epochs 1, 2: {acc[1]:.4f}, {acc[2]:.4f}  "
          f"({r['training_cpu_seconds']:.1f} s training CPU, {r['status']})")
    if r["status"] != "complete" or acc[-1] < 0.97:
        short.append(f"{r['solver']} seed {r['seed']}")
print("below 97%: " + (", ".join(short) if short else "none"))
sys.exit(1 if short else 0)
EOF2
