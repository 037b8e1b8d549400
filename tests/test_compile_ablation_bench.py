"""The compile-time ablations still trace, and each still replaces what it names.

``benchmarks.compile_ablation`` patches parts of the layer by name; a renamed
function would leave a patch applying to nothing, and its row would silently
measure the unchanged layer. Each ablation must trace a smaller program.
"""

import jax
import pytest
from flax import nnx

from benchmarks import compile_ablation, compile_time
from switchnorm.nnx import SwitchNorm
from switchnorm.train import models

ABLATIONS = [v for v in compile_ablation.VARIANTS if v not in ("sn", "flax_four", "flax_bn")]


def traced_size(name: str) -> int:
    """Characters of the step's jaxpr under the ablation (a measure of the program traced)."""
    with compile_ablation.ablation(name):
        step, args = compile_time.build("sn", batch=2, size=8)
        return len(str(jax.make_jaxpr(step)(*args)))


@pytest.mark.parametrize("name", ABLATIONS)
def test_each_ablation_traces_a_smaller_step(name):
    assert traced_size(name) < 0.95 * traced_size("sn")


def test_flax_four_puts_flax_layers_in_every_place_of_the_model():
    with compile_ablation.ablation("flax_four"):
        step, args = compile_time.build("sn", batch=2, size=8)
        jaxpr = str(jax.make_jaxpr(step)(*args))
        norm = models.make_norm("sn", 8, spatial=True, rngs=nnx.Rngs(0))
    assert isinstance(norm, compile_ablation.FlaxFour)
    assert "custom_vjp_call" not in jaxpr  # no SwitchNorm left: its layer is a custom VJP
    assert isinstance(models.make_norm("sn", 8, spatial=True, rngs=nnx.Rngs(0)), SwitchNorm)


def test_the_layer_is_whole_again_after_an_ablation():
    before = traced_size("sn")
    traced_size("trivial_graph")
    assert traced_size("sn") == before
