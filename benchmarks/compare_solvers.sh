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
# (SKIP_SWEEP=1 reuses the sweep JSON already in OUT_ROOT; SKIP_AE=1 runs only the
# mnist-cnn part, SKIP_CNN=1 only the autoencoder; finished mnist-cnn runs are kept.)
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
if [ "${SKIP_SWEEP:-0}" != 1 ] && [ "${SKIP_AE:-0}" != 1 ]; then
uptime > "$OUT/sweep.uptime"
nice -n "${NICE:-10}" cstep compare "${COMMON[@]}" --seeds 1 --budget cpu=20 \
    --out-dir "$OUT/sweep-x1" > "$OUT/sweep-x1.json"
nice -n "${NICE:-10}" cstep compare "${COMMON[@]}" --seeds 1 --budget cpu=20 \
    --set kbfgs.lr=0.1 --set kbfgs_l.lr=0.1 --set kfac.lr=0.3 \
    --set shampoo.lr=0.0015 --set soap.lr=0.001 --set muon.lr=0.003 \
    --set adam.lr=0.0003 \
    --out-dir "$OUT/sweep-lo" > "$OUT/sweep-lo.json"
nice -n "${NICE:-10}" cstep compare "${COMMON[@]}" --seeds 1 --budget cpu=20 \
    --set kbfgs.lr=1 --set kbfgs_l.lr=1 --set kfac.lr=3 \
    --set shampoo.lr=0.015 --set soap.lr=0.01 --set muon.lr=0.03 \
    --set adam.lr=0.003 \
    --out-dir "$OUT/sweep-hi" > "$OUT/sweep-hi.json"
uptime >> "$OUT/sweep.uptime"
fi

# --- 2. comparison over seeds with the chosen lrs ---------------------------
if [ "${SKIP_AE:-0}" != 1 ]; then
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
nice -n "${NICE:-10}" cstep compare "${COMMON[@]}" --seeds 1,2,3 --budget cpu="$BUDGET" \
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
fi

# --- 3. mnist-cnn: test accuracy after one epoch (batch 128, the preset's) over seeds,
# with a small lr sweep like the autoencoder's. Sweep: seed 1, each solver's default
# lr (the tuned mnist-cnn one where engine/app/options.py has it: K-FAC 0.3,
# K-BFGS and K-BFGS(L) 1) and /3 and x3 (grid fixed before any run). Per solver the
# lr with the highest test accuracy is kept (diverged runs excluded); seeds 2 and 3
# then run at the kept lr, and seed 1's run of that lr completes the three seeds.
# One process per solver and lr so that one slow solver cannot cost the rest.
if [ "${SKIP_CNN:-0}" != 1 ]; then
CNN_SOLVERS=${CNN_SOLVERS:-"adam kfac kbfgs kbfgs_l muon shampoo soap"}
declare -A LR=([adam]=0.001 [kfac]=0.3 [kbfgs]=1 [kbfgs_l]=1 [muon]=0.01 [shampoo]=0.005 [soap]=0.003)
mkdir -p "$OUT/cnn"
uptime > "$OUT/cnn.uptime"
for s in $CNN_SOLVERS; do
    for f in 1 3 x; do
        lr=$(python -c "import sys; lr, f = float(sys.argv[1]), sys.argv[2]; print(f'{(lr / 3 if f == \"1\" else lr * 3 if f == \"3\" else lr):g}')" "${LR[$s]}" "$f")
        [ -s "$OUT/cnn/$s-lr$lr-seed1.json" ] && continue
        nice -n "${NICE:-10}" timeout 300 cstep compare --net mnist-cnn --solvers "$s" --seeds 1 --set "$s.lr=$lr" \
            --budget epochs=1 --threads 1 --json --out-dir "$OUT/cnn" > "$OUT/cnn/$s-lr$lr-seed1.json" || true
    done
    kept=$(python - "$OUT/cnn" "$s" <<'EOF2'
import glob, json, sys
best = None
for f in glob.glob(f"{sys.argv[1]}/{sys.argv[2]}-lr*-seed1.json"):
    try:
        r = json.load(open(f))["runs"][0]
    except (ValueError, IndexError, KeyError):
        continue
    if r["status"] != "diverged" and (best is None or r["test_accuracy"][-1] > best[0]):
        best = (r["test_accuracy"][-1], r["hyperparameters"]["lr"])
print(f"{best[1]:g}")
EOF2
)
    for seed in 2 3; do
        [ -s "$OUT/cnn/$s-lr$kept-seed$seed.json" ] && continue
        nice -n "${NICE:-10}" timeout 300 cstep compare --net mnist-cnn --solvers "$s" --seeds "$seed" --set "$s.lr=$kept" \
            --budget epochs=1 --threads 1 --json --out-dir "$OUT/cnn" > "$OUT/cnn/$s-lr$kept-seed$seed.json" || true
    done
    echo "$s $kept" >> "$OUT/cnn/kept.txt"
done
uptime >> "$OUT/cnn.uptime"
# the sweep (seed 1) and the three seeds at the kept lr, as `cstep compare --seeds` tabulates them
python - "$OUT/cnn" <<'EOF2'
import glob, json, re, sys
from engine.app.report import seed_statistics
d = sys.argv[1]
kept = dict(line.split() for line in open(f"{d}/kept.txt"))
runs = []
for f in sorted(glob.glob(f"{d}/*-lr*-seed*.json")):
    s, lr, seed = re.match(r".*/(\w+)-lr([^-]+(?:-\d+)?)-seed(\d)\.json", f).groups()
    try:
        r = json.load(open(f))["runs"][0]
    except (ValueError, IndexError, KeyError):
        print(f"{s} lr={lr} seed {seed}: no result"); continue
    acc = r["test_accuracy"][-1] if r.get("test_accuracy") else float("nan")
    if seed == "1":
        print(f"sweep {s:<8} lr={lr:<8} {r['status']:<9} test acc {acc:.4f} train loss {r['train_loss'][-1]:.4f} cpu {r['training_cpu_seconds']:.1f}")
    if lr == kept[s]:
        runs.append({**r, "seed": int(seed)})
stats = seed_statistics(runs)
print(f"{'solver':<9} {'lr':<7} seeds diverged  test accuracy median [range]   train loss median [range]   CPU s")
for s, e in stats.items():
    a, t = e["test_accuracy"], e["train_loss"]
    print(f"{s:<9} {kept[s]:<7} {len(e['seeds']):>5} {e['diverged']:>8}  {a['median']:.4f} [{a['min']:.4f}, {a['max']:.4f}]"
          f"      {t['median']:.4f} [{t['min']:.4f}, {t['max']:.4f}]    {e['cpu_seconds']['median']:.1f}")
EOF2
fi
