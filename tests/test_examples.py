"""The example scripts: examples/sample_weights.py's weights are the layer's, and the script runs."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import switchnorm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """An example script as a module (its ``main`` does not run on import)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trained_sample_layer(rng) -> switchnorm.SwitchNorm:
    """An eval-mode weights="sample" layer with random logits, map, scale, bias and running averages."""
    layer = switchnorm.SwitchNorm(8, weights="sample", num_groups=4, rngs=nnx.Rngs(0))
    for name, shape in (("mean_logits", (4,)), ("var_logits", (4,)), ("sample_map", (2, 8, 4))):
        getattr(layer, name)[...] = jnp.asarray(rng.normal(size=shape), jnp.float32)
    layer.scale[...] = jnp.asarray(rng.uniform(0.5, 2, 8), jnp.float32)
    layer.bias[...] = jnp.asarray(rng.normal(size=8), jnp.float32)
    layer(jnp.asarray(rng.normal(1.0, 2.0, (16, 5, 5, 8)), jnp.float32))  # running averages move off 0 and 1
    layer.eval()
    return layer


def test_sample_weights_example_blends_as_the_layer_does(rng):
    """Normalizing with the example's per-sample weights reproduces the eval-mode layer's output."""
    example = load_example("sample_weights")
    layer = trained_sample_layer(rng)
    gain = np.exp(rng.uniform(np.log(0.1), np.log(10), (6, 1, 1, 1)))
    x = jnp.asarray(gain * rng.normal(0.5, 1.0, (6, 5, 5, 8)), jnp.float32)
    weights = example.per_sample_weights(layer, x)
    mean, var = x.mean(axis=(1, 2)), x.var(axis=(1, 2))
    stats = [example._normalizer_stats(layer, mean, var, n) for n in layer.blended_normalizers]
    mix_mean = sum(w[:, None] * mu for w, (mu, _) in zip(weights["mean"].T, stats, strict=True))
    mix_var = sum(w[:, None] * s2 for w, (_, s2) in zip(weights["var"].T, stats, strict=True))
    factor = layer.scale[...] / jnp.sqrt(mix_var + layer.epsilon)
    expected = (x - mix_mean[:, None, None, :]) * factor[:, None, None, :] + layer.bias[...]
    assert np.ptp(weights["mean"][:, 0]) > 0.05  # the samples' weights differ: the map is read
    np.testing.assert_allclose(layer(x), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_sample_weights_example_prints_the_accuracy_and_draws(tmp_path):
    """One epoch, without --compare: that would double the compilation and only repeat ``train``."""
    out = tmp_path / "weights.png"
    script = [sys.executable, str(EXAMPLES / "sample_weights.py")]
    result = subprocess.run(
        [*script, "--epochs", "1", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert 'weights="sample": test accuracy' in result.stdout
    assert "layer 1 mean weights, median clean/altered: bn" in result.stdout
    assert out.stat().st_size > 10_000
