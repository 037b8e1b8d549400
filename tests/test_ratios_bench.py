"""benchmarks.ratios and the training steps it measures the memory of (timings are not asserted)."""

import jax
import numpy as np

from benchmarks import layer, ratios


def test_the_mlp_step_trains_dense_layers_with_either_normalizer():
    fns = layer.mlp_step_fns(batch=8, inputs=4, width=6, dtype="float32")
    assert set(fns) == {"sn", "bn"}
    for name, (step, args) in fns.items():
        params, stats, _, loss = step(*args)
        assert np.isfinite(float(loss))
        # Three normalized Dense layers of 6 features, each with running averages of 6 channels.
        means = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(stats) if "mean" in str(path[-1])]
        assert [m.shape for m in means] == [(6,)] * 3, name
        assert any("SwitchNorm" in str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)) is (
            name == "sn"
        )


def test_the_table_reports_both_training_steps_memory():
    peaks = {"sn": 2.0 * 2**20, "bn": 4.0 * 2**20, "mlp/sn": 3.0 * 2**20, "mlp/bn": 2.0 * 2**20}
    lines = ratios.table([], peaks).splitlines()
    assert lines[-2].startswith("Training step (residual CNN") and lines[-2].endswith("sn / bn = 0.500.")
    assert lines[-1].startswith("Training step (MLP, 3 x Dense 512") and lines[-1].endswith(
        "sn / bn = 1.500."
    )
