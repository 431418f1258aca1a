#!/usr/bin/env bash
# Solvers compared over seeds on the MNIST autoencoder at an equal training-CPU
# budget, with learning rates chosen by a small documented sweep (README,
# "Benchmarks" -> "Measured results" -> "Solvers compared over seeds").
#
# 1. Sweep: seed 1 only, --budget cpu=20, three learning rates per solver
#    (its default, default/3, default*3; the grid was fixed before any run).
#    One `cstep compare` per grid point sets every solver's lr at once.
#    Per solver the lr with the lowest final training loss is kept.
# 2. Comparison: seeds 1,2,3 at --budget cpu=$BUDGET with the kept lrs
#    (picked from the sweep's JSON by the rule above).
#
# Usage: CSTEP_DATA_DIR=... benchmarks/compare_solvers.sh [OUT_ROOT]
# (SKIP_SWEEP=1 reuses the sweep JSON already in OUT_ROOT.)
# Run it on a quiet machine: one training process at a time, one thread.
set -euo pipefail

OUT=${1:-/tmp/cstep-bench}
BUDGET=${BUDGET:-20}
SOLVERS=kbfgs,kbfgs_l,kfac,shampoo,soap,muon,adam
COMMON=(--net mnist-ae --solvers "$SOLVERS" --threads 1 --json)
mkdir -p "$OUT"

# --- 1. learning-rate sweep (seed 1, cpu=20) -------------------------------
# x1 = every solver's default lr (kbfgs 0.3, kbfgs_l 0.3, kfac 1,
# shampoo 0.005, soap 0.003, muon 0.01, adam 0.001).
if [ "${SKIP_SWEEP:-0}" != 1 ]; then
uptime > "$OUT/sweep.uptime"
nice -n 10 cstep compare "${COMMON[@]}" --seeds 1 --budget cpu=20 \
    --out-dir "$OUT/sweep-x1" > "$OUT/sweep-x1.json"
nice -n 10 cstep compare "${COMMON[@]}" --seeds 1 --budget cpu=20 \
    --set kbfgs.lr=0.1 --set kbfgs_l.lr=0.1 --set kfac.lr=0.3 \
    --set shampoo.lr=0.0015 --set soap.lr=0.001 --set muon.lr=0.003 \
    --set adam.lr=0.0003 \
    --out-dir "$OUT/sweep-lo" > "$OUT/sweep-lo.json"
nice -n 10 cstep compare "${COMMON[@]}" --seeds 1 --budget cpu=20 \
    --set kbfgs.lr=1 --set kbfgs_l.lr=1 --set kfac.lr=3 \
    --set shampoo.lr=0.015 --set soap.lr=0.01 --set muon.lr=0.03 \
    --set adam.lr=0.003 \
    --out-dir "$OUT/sweep-hi" > "$OUT/sweep-hi.json"
uptime >> "$OUT/sweep.uptime"
fi

# --- 2. comparison over seeds with the chosen lrs ---------------------------
# Per solver the swept lr with the lowest final training loss (diverged runs excluded).
CHOSEN=$(python - "$OUT" <<'EOF'
import json, sys
best = {}
for tag in ("lo", "x1", "hi"):
    for r in json.load(open(f"{sys.argv[1]}/sweep-{tag}.json"))["runs"]:
        if r["status"] == "diverged":
            continue
        loss = r["train_loss"][-1]
        if r["solver"] not in best or loss < best[r["solver"]][0]:
            best[r["solver"]] = (loss, r["hyperparameters"]["lr"])
print(" ".join(f"--set {s}.lr={lr:g}" for s, (_, lr) in best.items()))
EOF
)
echo "chosen: $CHOSEN" | tee "$OUT/chosen.txt"
uptime > "$OUT/compare.uptime"
# shellcheck disable=SC2086
nice -n 10 cstep compare "${COMMON[@]}" --seeds 1,2,3 --budget cpu="$BUDGET" \
    $CHOSEN --out-dir "$OUT/compare" > "$OUT/compare.json"
uptime >> "$OUT/compare.uptime"

# --- tables: the sweep's final training losses, and the comparison table as
# `cstep compare --seeds` prints it without --json ---------------------------
python - "$OUT" <<'EOF'
import json, sys
from engine.app.report import seed_table
out = sys.argv[1]
for tag in ("lo", "x1", "hi"):
    for r in json.load(open(f"{out}/sweep-{tag}.json"))["runs"]:
        print(f"sweep {tag:<2} {r['solver']:<8} lr={r['hyperparameters']['lr']:<7g} {r['status']:<9} "
              f"epochs={r['epochs']} train={r['train_loss'][-1]:.2f} cpu={r['training_cpu_seconds']:.1f}")
d = json.load(open(f"{out}/compare.json"))
print(seed_table(d["by_solver"], d["plot"]))
EOF

# --- 3. mnist-cnn test accuracy after one epoch (batch 128, the preset's),
# seed 1, each solver's default (tuned where engine/app/options.py has it) lr,
# no sweep; one process per solver so that one slow solver cannot cost the rest
if [ "${SKIP_CNN:-0}" != 1 ]; then
mkdir -p "$OUT/cnn"
uptime > "$OUT/cnn.uptime"
for s in adam kfac kbfgs kbfgs_l muon shampoo soap; do
    nice -n 10 timeout 150 cstep compare --net mnist-cnn --solvers "$s" --seeds 1 \
        --budget epochs=1 --threads 1 --json --out-dir "$OUT/cnn" > "$OUT/cnn/$s.json" || true
done
uptime >> "$OUT/cnn.uptime"
fi
