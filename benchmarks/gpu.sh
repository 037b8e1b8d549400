#!/usr/bin/env bash
# The layer benchmark on a GPU machine, in one go (< 6 minutes on an H100).
#
#   OUT=/some/dir bash benchmarks/gpu.sh
#
# Worst case: 45 s of checks + 280 s of harness (results are written after
# every shape, so a timeout keeps what finished). Runs from the repository
# root with PYTHONPATH=. (the machine has jax[cuda], flax and optax but not
# this package installed). Writes into $OUT:
#   env.txt                    nvidia-smi, python and jax versions
#   checks.txt                 python -m benchmarks.numerics_check on the GPU
#   layer-<GPU>.json / .md     the harness results (python -m benchmarks.layer)
#   log.txt                    everything printed
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
exec > >(tee "$OUT/log.txt") 2>&1
start=$(date +%s)

{ nvidia-smi; $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. Correctness on this backend (about 20 s): every normalizer and a blend at
#    mean 1e4 / std 1 in float32 against float64, and the custom VJP against
#    autodiff (benchmarks/numerics_check.py, the one copy of these checks).
timeout 45 $PY -m benchmarks.numerics_check > "$OUT/checks.txt" 2>&1
cat "$OUT/checks.txt"

# 2. The harness: every variant, shape and dtype, interleaved; training step.
GPU_NAME=$($PY -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '-'))" 2>/dev/null || echo gpu)
# BENCH_ARGS replaces the defaults below (e.g. BENCH_ARGS=--quick for a smoke test).
timeout 280 $PY -m benchmarks.layer --device "$GPU_NAME" --out "$OUT" \
    ${BENCH_ARGS:---repeats 11 --min-sample-ms 10 --train-batch 64 --train-size 32 --train-features 64}
echo "gpu.sh finished in $(( $(date +%s) - start )) s"
