#!/usr/bin/env bash
# Every GPU figure the performance targets name, in one go, most wanted first.
#
#   OUT=/some/dir bash benchmarks/gpu.sh
#   GPU_SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu.sh    # tiny shapes, to try the script on a CPU
#
# Runs from the repository root with PYTHONPATH=. (the machine has jax[cuda],
# flax and optax but not this package installed). Each step has its own
# timeout and writes as it goes, so a step cut short keeps what finished and
# the next one still runs: on the H100 of 2026-11-27 the host took 5-10 s to
# compile each benchmarked function, so the whole list does not fit one
# 10-minute call and the steps come in the order they are wanted. Writes into $OUT:
#   env.txt          nvidia-smi, python and jax versions
#   checks.txt       1. numerics on this backend (python -m benchmarks.numerics_check)
#   layer-*x8.json/md 2. python -m benchmarks.layer at 8x the batch: SwitchNorm, BatchNorm and
#                       the bandwidth probe, forward and fwd+bwd, float32
#   layer-*train.*   3. the full training steps, SwitchNorm vs BatchNorm
#   ratios.txt       4. python -m benchmarks.ratios at the benchmark shapes, float32: lower
#                       quartile / median of the per-repeat ratios to Linen and NNX BatchNorm,
#                       inference, temporaries / x, training-step memory
#   compile.txt      5. python -m benchmarks.compile_time: one training step's compile time
#   log.txt          everything printed
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
exec > >(tee "$OUT/log.txt") 2>&1
start=$(date +%s)
step() { echo "== $1 (at $(( $(date +%s) - start )) s)"; }

SHAPES="32x32x32x64 8x56x56x256 128x8x8x128 64x256x64 1024x512"
SHAPES_X8="64x56x56x256 256x32x32x64 8192x512 1024x8x8x128 512x256x64"
LAYER_ARGS="--repeats 9 --min-sample-ms 10"
TRAIN_ARGS="--train-batch 256 --train-size 32 --train-features 64 --repeats 9 --min-sample-ms 10"
RATIOS_ARGS="--repeats 11 --min-sample-ms 5"
COMPILE_ARGS="--repeats 1"
if [ -n "${GPU_SMOKE:-}" ]; then
    SHAPES="4x4x4x8 16x8"; SHAPES_X8="8x4x4x8"
    LAYER_ARGS="--repeats 2 --min-sample-ms 1"
    TRAIN_ARGS="--train-batch 4 --train-size 8 --train-features 8 --repeats 2 --min-sample-ms 1"
    RATIOS_ARGS="--repeats 2 --min-sample-ms 1"
    COMPILE_ARGS="--repeats 1 --batch 2"
fi

{ nvidia-smi || true; $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
GPU_NAME=$($PY -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '-'))" 2>/dev/null || echo gpu)

step "1. numerics"
timeout 60 $PY -m benchmarks.numerics_check > "$OUT/checks.txt" 2>&1
cat "$OUT/checks.txt"

step "2. layer harness, 8x batch, float32"
timeout 200 $PY -m benchmarks.layer --device "$GPU_NAME-batch-x8" --out "$OUT" --shapes $SHAPES_X8 \
    --dtypes float32 --variants sn bn probe --no-train-step $LAYER_ARGS

step "3. full training steps"
timeout 100 $PY -m benchmarks.layer --device "$GPU_NAME-train" --out "$OUT" --shapes $TRAIN_ARGS

step "4. ratios, benchmark shapes, float32"
timeout 120 $PY -m benchmarks.ratios --shapes $SHAPES --dtypes float32 $RATIOS_ARGS > "$OUT/ratios.txt" 2>&1
cat "$OUT/ratios.txt"

step "5. compile time of one training step"
timeout 60 $PY -m benchmarks.compile_time $COMPILE_ARGS > "$OUT/compile.txt" 2>&1
cat "$OUT/compile.txt"
echo "gpu.sh finished in $(( $(date +%s) - start )) s"
