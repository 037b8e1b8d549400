"""The compile-time benchmark still builds and traces each of its training steps.

``benchmarks.compile_time`` swaps Flax's BatchNorm into the training wing's model
through ``models.make_norm``; when that function's signature grew an argument the
swap broke, and nothing noticed until the benchmark was run by hand.
"""

import inspect

import jax
import pytest

from benchmarks import compile_time
from switchnorm.train import models


def test_the_flax_batchnorm_swap_takes_make_norms_arguments():
    assert inspect.signature(compile_time._flax_batchnorm).parameters.keys() == (
        inspect.signature(models.make_norm).parameters.keys()
    )


@pytest.mark.parametrize("variant", compile_time.VARIANTS)
def test_each_variant_builds_a_step_that_traces(variant):
    step, args = compile_time.build(variant, batch=2, size=8)
    params, _, _, loss = jax.eval_shape(step, *args)
    assert loss.shape == ()
    assert jax.tree.structure(params) == jax.tree.structure(args[0])
