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
#   checks.txt                 gradient and large-mean checks of the core on the GPU
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

# 1. Correctness on this backend (about 20 s): custom VJP vs autodiff, and
#    mean 1e4 / std 1 in float32 against float64 NumPy.
timeout 45 $PY - > "$OUT/checks.txt" 2>&1 <<'PYEOF'
import jax, jax.numpy as jnp, numpy as np
from switchnorm._core import switch_norm, switch_norm_autodiff
print("backend", jax.default_backend(), jax.devices()[0].device_kind)
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(8, 16, 16, 32)) * 2 + 3, jnp.float32)
ml, vl = jnp.asarray(rng.normal(size=4), jnp.float32), jnp.asarray(rng.normal(size=4), jnp.float32)
dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
def loss(layer):
    return lambda x, ml, vl: jnp.sum(layer(x, ml, vl)[0] * dy)
for name, layer in (("custom_vjp", switch_norm), ("autodiff", switch_norm_autodiff)):
    g = jax.jit(jax.grad(loss(layer), argnums=(0, 1, 2)))(x, ml, vl)
    if name == "custom_vjp":
        ref = g
    print(name, "max |grad - custom_vjp grad|:", [float(jnp.max(jnp.abs(a - b))) for a, b in zip(g, ref)])
big = rng.normal(size=(4, 8, 8, 16)) + 1e4
y = np.asarray(jax.jit(lambda x: switch_norm(x, jnp.zeros(1), jnp.zeros(1), normalizers=("in",))[0])(jnp.asarray(big, jnp.float32)))
# The reference sees the float32-rounded input the layer sees: half an ulp at
# 1e4 is 4.9e-4, which would otherwise swamp the layer's own error.
big = np.asarray(jnp.asarray(big, jnp.float32), np.float64)
ref = (big - big.mean(axis=(1, 2), keepdims=True)) / np.sqrt(big.var(axis=(1, 2), keepdims=True) + 1e-5)
print("mean 1e4 / std 1, float32 'in' vs float64 of the same input: max abs error", float(np.max(np.abs(y - ref))), "(must be < 1e-3)")
PYEOF
cat "$OUT/checks.txt"

# 2. The harness: every variant, shape and dtype, interleaved; training step.
GPU_NAME=$($PY -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '-'))" 2>/dev/null || echo gpu)
# BENCH_ARGS replaces the defaults below (e.g. BENCH_ARGS=--quick for a smoke test).
timeout 280 $PY -m benchmarks.layer --device "$GPU_NAME" --out "$OUT" \
    ${BENCH_ARGS:---repeats 11 --min-sample-ms 10 --train-batch 64 --train-size 32 --train-features 64}
echo "gpu.sh finished in $(( $(date +%s) - start )) s"
