#!/usr/bin/env bash
# Issue 13's many-core check, prepared for a machine with 16 cores (the GPU host's CPU when one
# is lent to a task; see the device tool's README): builds the Cython extension in place, then
# runs the thread sweeps with each side alone in its own processes, alternated:
#
#   * bench_train.py --threads 1,4,8,16 --variant both: the training step, npsoftmax/torch
#     (target <= 1.0 at every count, and npsoftmax's step never slower when threads are added);
#   * bench_heads.py --versus-torch --threads 1,4,8,16 at K = 100,000: the adaptive head against
#     torch's, and no head slower with more threads.
#
# Usage: bash benchmarks/many_cores.sh [OUT_DIR]    (default: $OUT, else benchmarks/results)
# About 7 minutes on 16 cores. THREADS=1,2 ROUNDS=1 shrink it (a smoke run on a small machine);
# PYTHON picks the interpreter (default python3); TRAIN_ARGS and HEADS_ARGS add options to each
# script (later options win: the test suite shrinks both to a tiny smoke run); SKIP_BUILD=1 uses
# the extension as built. The reports, with every worker's raw samples, land in OUT_DIR as
# bench_train-many-cores-<UTC stamp>.txt and bench_heads-many-cores-<UTC stamp>.txt. Exit status:
# 0 both measured, else the last failing script's (1: twins' losses differ, 3: a worker failed).
set -uo pipefail
out=${1:-${OUT:-benchmarks/results}}
python=${PYTHON:-python3}
threads=${THREADS:-1,4,8,16}
rounds=${ROUNDS:-2}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
stamp=$(date -u +%Y%m%d-%H%M%SZ)

echo "== machine: $(nproc) cores; $($python --version 2>&1); threads $threads; rounds $rounds"
if [ "${SKIP_BUILD:-0}" != 1 ] && ! $python setup.py build_ext --inplace > "$out/many-cores-build-$stamp.log" 2>&1; then
    echo "building the extension failed (the benchmarks would time the NumPy fallback):"
    tail -20 "$out/many-cores-build-$stamp.log"
    exit 1
fi
$python -c "import npsoftmax.kernels as k; print('npsoftmax kernels:', k.BACKEND)"

status=0
echo "== training step"
$python benchmarks/bench_train.py --threads "$threads" --rounds "$rounds" --variant both \
    --out "$out/bench_train-many-cores-$stamp.txt" ${TRAIN_ARGS:-} || status=$?
echo "== heads"
$python benchmarks/bench_heads.py --versus-torch --threads "$threads" --classes 100000 \
    --heads hierarchical,adaptive,torch-adaptive --rounds "$rounds" \
    --save-to "$out/bench_heads-many-cores-$stamp.txt" ${HEADS_ARGS:-} || status=$?
exit $status
