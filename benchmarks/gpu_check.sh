#!/usr/bin/env bash
# One-shot GPU check for a machine with a CUDA device, under 8 minutes:
#   1. install cstep with its CuPy extra (skipped when CuPy already imports: no network needed then);
#   2. pytest -m cupy: every test's CuPy half, on the real device;
#   3. benchmarks/gpu_check.py: CuPy against NumPy (one complex-step H v, one K-BFGS step) and the
#      timings (complex-step pass / gradient pass, a K-BFGS MNIST-autoencoder epoch in float32).
# MNIST is read from $CSTEP_DATA_DIR (or ./.gpu_data when present); without it the epoch is timed
# on random data of MNIST's shape. Logs go to $OUT (default /tmp/gpu_check).
#     bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if [ -z "${CSTEP_DATA_DIR:-}" ] && [ -d .gpu_data ]; then export CSTEP_DATA_DIR="$PWD/.gpu_data"; fi
start=$SECONDS
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/device.txt"
if "$PY" -c "import cupy" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || export PYTHONPATH="$PWD"
else
    "$PY" -m pip install -q -e ".[dev,cuda13]" >"$OUT/install.log" 2>&1 || "$PY" -m pip install -q -e ".[dev,cuda12]" >>"$OUT/install.log" 2>&1 \
        || { echo "gpu_check: CuPy is not importable and could not be installed (see $OUT/install.log)"; exit 2; }
fi
echo "== pytest -m cupy (real CuPy)"
timeout 300 "$PY" -m pytest -q -m cupy -p no:cacheprovider -x 2>&1 | tee "$OUT/pytest_cupy.log" | tail -n 25
rc_tests=${PIPESTATUS[0]}
echo "== benchmarks/gpu_check.py"
timeout $((470 - (SECONDS - start))) "$PY" benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
rc_check=${PIPESTATUS[0]}
echo "gpu_check: pytest exit $rc_tests, check exit $rc_check, $((SECONDS - start)) s"
[ "$rc_tests" -eq 0 ] && [ "$rc_check" -eq 0 ]
