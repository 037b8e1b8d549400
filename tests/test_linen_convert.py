"""Moving Linen variables between Flax BatchNorm/GroupNorm models and SwitchNorm models.

The references are Flax's own ``nn.BatchNorm`` and ``nn.GroupNorm``: a converted SwitchNorm
model must compute what the trained Flax model computes, and collapsing it back must give
the Flax model its variables again.
"""

import copy
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import switchnorm
from switchnorm import linen as snn

C = 8
TOL = {"rtol": 1e-5, "atol": 1e-5}


class BNNet(nn.Module):
    """The reference: a small CNN written with Flax's BatchNorm (two of them in one block)."""

    @nn.compact
    def __call__(self, x, use_running_average):
        x = nn.relu(nn.BatchNorm(use_running_average=use_running_average)(nn.Conv(C, (3, 3))(x)))
        x = BNBlock(name="Block_0")(x, use_running_average)
        return nn.Dense(3)(x.mean((1, 2)))


class BNBlock(nn.Module):
    @nn.compact
    def __call__(self, x, use_running_average):
        x = nn.relu(nn.BatchNorm(use_running_average=use_running_average)(nn.Conv(C, (3, 3))(x)))
        return nn.BatchNorm(use_running_average=use_running_average)(nn.Conv(C, (3, 3))(x))


class Net(nn.Module):
    """BNNet with ``norm(use_running_average=...)`` in each normalization's place."""

    norm: object = nn.BatchNorm

    @nn.compact
    def __call__(self, x, use_running_average):
        x = nn.relu(self.norm(use_running_average=use_running_average)(nn.Conv(C, (3, 3))(x)))
        x = Block(self.norm)(x, use_running_average)
        return nn.Dense(3)(x.mean((1, 2)))


class Block(nn.Module):
    norm: object

    @nn.compact
    def __call__(self, x, use_running_average):
        x = nn.relu(self.norm(use_running_average=use_running_average)(nn.Conv(C, (3, 3))(x)))
        return self.norm(use_running_average=use_running_average)(nn.Conv(C, (3, 3))(x))


class Mixed(nn.Module):
    """An explicitly named norm, a GroupNorm kept as it is, and ``norm`` auto-named."""

    norm: object = nn.BatchNorm

    @nn.compact
    def __call__(self, x, use_running_average):
        x = self.norm(use_running_average=use_running_average, name="norm1")(nn.Conv(C, (3, 3))(x))
        x = nn.GroupNorm(num_groups=4)(nn.Conv(C, (3, 3))(nn.relu(x)))
        x = self.norm(use_running_average=use_running_average)(x)
        return nn.Dense(3)(x.mean((1, 2)))


def group_norm(use_running_average):
    """nn.GroupNorm in Net's norm place (it has no running averages to switch)."""
    del use_running_average
    return nn.GroupNorm(num_groups=4)


SN_GROUP = functools.partial(snn.SwitchNorm, num_groups=4, epsilon=1e-6)  # nn.GroupNorm's groups and epsilon
X = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
Y = jnp.array([0, 1, 2, 0])


@functools.partial(jax.jit, static_argnums=0)
def train_call(module, variables, x):
    return module.apply(variables, x, False, mutable=["batch_stats"])


@functools.partial(jax.jit, static_argnums=0)
def eval_call(module, variables, x):
    return module.apply(variables, x, True)


def init(module, seed=1):
    return module.init(jax.random.key(seed), X, False)


def trained(module, steps=3):
    """The module's variables after a few SGD steps: scales, biases, running averages moved off init."""
    variables = init(module, seed=0)
    tx = optax.sgd(0.5)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(variables, opt_state):
        def loss(params):
            logits, updates = module.apply({**variables, "params": params}, X, False, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean(), updates

        grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
        changes, opt_state = tx.update(grads, opt_state)
        return {
            **variables,
            **updates,
            "params": optax.apply_updates(variables["params"], changes),
        }, opt_state

    for _ in range(steps):
        variables, opt_state = step(variables, opt_state)
    return variables


@pytest.fixture(scope="module")
def bn_variables():
    return trained(BNNet())


@pytest.fixture(scope="module")
def gn_variables():
    return trained(Net(group_norm))


@pytest.fixture(scope="module")
def sn_init():
    return init(Net(snn.SwitchNorm))


def assert_trees_close(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **TOL), a, b)


# -- BatchNorm to SwitchNorm ------------------------------------------------------------------


def test_a_trained_batchnorm_model_converts_to_the_same_outputs_in_training_and_evaluation(
    bn_variables, sn_init
):
    assert not np.allclose(bn_variables["batch_stats"]["BatchNorm_0"]["var"], 1.0)  # trained, not init
    assert not np.allclose(bn_variables["params"]["Block_0"]["BatchNorm_1"]["scale"], 1.0)
    variables = snn.convert_variables(bn_variables, sn_init)
    sn = Net(snn.SwitchNorm)
    np.testing.assert_allclose(eval_call(sn, variables, X), eval_call(BNNet(), bn_variables, X), **TOL)
    y_sn, stats_sn = train_call(sn, variables, X)
    y_bn, stats_bn = train_call(BNNet(), bn_variables, X)
    np.testing.assert_allclose(y_sn, y_bn, **TOL)
    renamed = {
        "BatchNorm_0": "SwitchNorm_0",
        "Block_0/BatchNorm_0": "Block_0/SwitchNorm_0",
        "Block_0/BatchNorm_1": "Block_0/SwitchNorm_1",
    }
    for bn_path, sn_path in renamed.items():
        for name in ("mean", "var"):
            updated = stats_sn["batch_stats"]
            for key in sn_path.split("/"):
                updated = updated[key]
            expected = stats_bn["batch_stats"]
            for key in bn_path.split("/"):
                expected = expected[key]
            np.testing.assert_allclose(updated[name], expected[name], **TOL)


def test_the_converted_layers_hold_the_source_scale_bias_and_running_averages(bn_variables, sn_init):
    variables = snn.convert_variables(bn_variables, sn_init)
    source, target = (
        bn_variables["params"]["Block_0"]["BatchNorm_1"],
        variables["params"]["Block_0"]["SwitchNorm_1"],
    )
    np.testing.assert_array_equal(target["scale"], source["scale"])
    np.testing.assert_array_equal(target["bias"], source["bias"])
    np.testing.assert_array_equal(
        variables["batch_stats"]["SwitchNorm_0"]["var"], bn_variables["batch_stats"]["BatchNorm_0"]["var"]
    )
    np.testing.assert_array_equal(
        variables["params"]["Dense_0"]["kernel"], bn_variables["params"]["Dense_0"]["kernel"]
    )


def test_a_groupnorm_model_converts_to_the_same_outputs(gn_variables):
    sn = Net(SN_GROUP)
    variables = snn.convert_variables(gn_variables, init(sn))
    reference = Net(group_norm).apply(gn_variables, X, True)
    np.testing.assert_allclose(eval_call(sn, variables, X), reference, **TOL)
    np.testing.assert_allclose(train_call(sn, variables, X)[0], reference, **TOL)
    weights = jax.nn.softmax(variables["params"]["SwitchNorm_0"]["var_logits"])
    assert weights[3] == pytest.approx(1.0) and weights[3] > weights[0]  # gn, in snn's order bn, in, ln, gn


def test_source_weight_is_the_weight_read_back_and_every_logit_gets_a_gradient(bn_variables, sn_init):
    variables = snn.convert_variables(bn_variables, sn_init, source_weight=0.7)
    for layer in (variables["params"]["SwitchNorm_0"], variables["params"]["Block_0"]["SwitchNorm_1"]):
        for name in ("mean_logits", "var_logits"):
            np.testing.assert_allclose(jax.nn.softmax(layer[name]), [0.7, 0.1, 0.1, 0.1], rtol=1e-6)

    def loss(params):
        logits, _ = Net(snn.SwitchNorm).apply(
            {**variables, "params": params}, X, False, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()

    grads = jax.grad(loss)(variables["params"])
    logit_grads = [g for path, g in jax.tree_util.tree_leaves_with_path(grads) if "logits" in str(path[-1])]
    assert len(logit_grads) == 6
    for grad in logit_grads:
        assert np.all(np.asarray(grad) != 0.0), grad


def test_the_input_variables_are_left_as_they_were_and_frozen_dicts_are_accepted(bn_variables, sn_init):
    before = jax.tree.map(np.array, (bn_variables, sn_init))
    variables = snn.convert_variables(flax.core.freeze(bn_variables), flax.core.freeze(sn_init), 0.8)
    assert type(variables) is dict and type(variables["params"]["Block_0"]) is dict
    jax.tree.map(np.testing.assert_array_equal, (bn_variables, sn_init), before)


def test_explicit_names_are_kept_and_a_kept_groupnorm_does_not_shift_the_pairing():
    bn_variables = trained(Mixed())
    sn = Mixed(snn.SwitchNorm)
    sn_init = init(sn)
    assert set(sn_init["params"]) == {"Conv_0", "Conv_1", "norm1", "GroupNorm_0", "SwitchNorm_0", "Dense_0"}
    variables = snn.convert_variables(bn_variables, sn_init)
    np.testing.assert_array_equal(
        variables["params"]["norm1"]["scale"], bn_variables["params"]["norm1"]["scale"]
    )
    np.testing.assert_array_equal(
        variables["params"]["GroupNorm_0"]["bias"], bn_variables["params"]["GroupNorm_0"]["bias"]
    )
    np.testing.assert_array_equal(
        variables["params"]["SwitchNorm_0"]["bias"], bn_variables["params"]["BatchNorm_0"]["bias"]
    )
    np.testing.assert_allclose(eval_call(sn, variables, X), eval_call(Mixed(), bn_variables, X), **TOL)
    np.testing.assert_allclose(
        train_call(sn, variables, X)[0], train_call(Mixed(), bn_variables, X)[0], **TOL
    )


# -- SwitchNorm back to BatchNorm -------------------------------------------------------------


def test_collapsing_a_converted_model_gives_back_the_flax_variables_and_outputs(bn_variables, sn_init):
    plain = snn.collapse_variables(snn.convert_variables(bn_variables, sn_init), init(BNNet()))
    assert_trees_close(plain, bn_variables)
    np.testing.assert_allclose(eval_call(BNNet(), plain, X), eval_call(BNNet(), bn_variables, X), **TOL)


@pytest.mark.parametrize("options", [{"mixing": "sparsestmax"}, {"weights": "channel"}], ids=str)
def test_sparsestmax_and_per_channel_layers_convert_and_collapse_back(bn_variables, options):
    sn = Net(functools.partial(snn.SwitchNorm, **options))
    variables = snn.convert_variables(bn_variables, init(sn), source_weight=0.9)
    logits = variables["params"]["Block_0"]["SwitchNorm_0"]["mean_logits"]
    assert logits.shape == ((4, C) if options.get("weights") == "channel" else (4,))
    # sparsestmax at radius 0 returns a point of the simplex as it is: the logits are the weights
    weights = jax.nn.softmax(logits, axis=0) if "weights" in options else logits
    expected = np.array([0.9, 0.1 / 3, 0.1 / 3, 0.1 / 3]).reshape((4,) + (1,) * (logits.ndim - 1))
    np.testing.assert_allclose(weights, np.broadcast_to(expected, logits.shape), rtol=1e-6)
    exact = snn.convert_variables(bn_variables, init(sn))
    np.testing.assert_allclose(eval_call(sn, exact, X), eval_call(BNNet(), bn_variables, X), **TOL)
    assert_trees_close(snn.collapse_variables(exact, init(BNNet())), bn_variables)


def test_a_layer_that_chose_groupnorm_collapses_onto_a_groupnorm(gn_variables):
    sn_variables = snn.convert_variables(gn_variables, init(Net(SN_GROUP)))
    plain = snn.collapse_variables(sn_variables, init(Net(group_norm)))
    assert_trees_close(plain, gn_variables)


def with_logits(variables, path, name, logits):
    """A copy of variables with one layer's logits replaced."""
    variables = copy.deepcopy(jax.tree.map(np.asarray, variables))
    layer = variables["params"]
    for key in path.split("/"):
        layer = layer[key]
    layer[name] = np.asarray(logits, np.float32)
    return variables


def test_collapsing_onto_a_layer_of_another_kind_names_the_layer_the_choice_and_the_weights(
    bn_variables, sn_init
):
    sn_variables = snn.convert_variables(bn_variables, sn_init)
    chose_ln_mean = with_logits(sn_variables, "Block_0/SwitchNorm_1", "mean_logits", [0.0, 0.0, 10.0, 0.0])
    with pytest.raises(
        ValueError,
        match=r"'Block_0/SwitchNorm_1' chose ln/bn \(weights 0.9999/1\) but the target holds a BatchNorm",
    ):
        snn.collapse_variables(chose_ln_mean, init(BNNet()))
    with pytest.raises(
        ValueError, match=r"'SwitchNorm_0' chose bn/bn .* holds a GroupNorm there .*put nn.BatchNorm there"
    ):
        snn.collapse_variables(sn_variables, init(Net(group_norm)))
    undecided = with_logits(sn_variables, "SwitchNorm_0", "var_logits", [1.0, 0.0, 0.0, 0.0])
    with pytest.raises(
        ValueError, match=r"'SwitchNorm_0' chose bn/bn \(weights 1/0.4754\).*keep a SwitchNorm"
    ):
        snn.collapse_variables(undecided, init(BNNet()))


# -- refusals --------------------------------------------------------------------------------


class Plain(nn.Module):
    @nn.compact
    def __call__(self, x, use_running_average):
        return nn.Dense(3)(x)


@pytest.mark.parametrize(
    ("source_weight", "error", "match"),
    [
        (0, ValueError, "got 0"),
        (1.5, ValueError, "got 1.5"),
        (True, TypeError, "got True"),
        ("a", TypeError, "got 'a'"),
    ],
)
def test_a_source_weight_outside_0_1_is_refused(bn_variables, sn_init, source_weight, error, match):
    with pytest.raises(error, match=rf"source_weight must be .*{match}"):
        snn.convert_variables(bn_variables, sn_init, source_weight=source_weight)


def test_a_model_without_batchnorm_or_groupnorm_is_refused():
    variables = init(Plain())
    with pytest.raises(ValueError, match="found no BatchNorm or GroupNorm"):
        snn.convert_variables(variables, variables)


def test_a_leaf_missing_or_of_another_shape_is_named(bn_variables, sn_init):
    missing = jax.tree.map(np.asarray, bn_variables)
    missing["params"]["Dense_0"] = {"bias": missing["params"]["Dense_0"]["bias"]}
    with pytest.raises(
        ValueError, match=r"'Dense_0/kernel' \(params\) of sn_variables is not in bn_variables"
    ):
        snn.convert_variables(missing, sn_init)
    reshaped = jax.tree.map(np.asarray, sn_init)
    reshaped["params"]["Block_0"]["Conv_1"]["kernel"] = np.zeros((3, 3, C, 4), np.float32)
    with pytest.raises(
        ValueError, match=r"'Block_0/Conv_1/kernel' \(params\) has shape \(3, 3, 8, 8\) in bn_variables"
    ):
        snn.convert_variables(bn_variables, reshaped)


def test_an_extra_source_layer_and_an_unknown_collection_are_refused_not_dropped(bn_variables, sn_init):
    extra = jax.tree.map(np.asarray, bn_variables)
    for collection in ("params", "batch_stats"):
        extra[collection]["Block_0"]["BatchNorm_2"] = extra[collection]["Block_0"]["BatchNorm_1"]
    with pytest.raises(
        ValueError, match=r"bn_variables holds a BatchNorm at 'Block_0/BatchNorm_2' that no SwitchNorm"
    ):
        snn.convert_variables(extra, sn_init)
    with pytest.raises(ValueError, match=r"collection\(s\) \['intermediates'\]"):
        snn.convert_variables({**bn_variables, "intermediates": {"x": jnp.ones(2)}}, sn_init)


def test_a_switchnorm_with_no_source_is_named(bn_variables, sn_init):
    fewer = jax.tree.map(np.asarray, bn_variables)
    for collection in ("params", "batch_stats"):
        del fewer[collection]["Block_0"]["BatchNorm_1"]
    with pytest.raises(
        ValueError, match=r"SwitchNorm at 'Block_0/SwitchNorm_1' with no layer in bn_variables"
    ):
        snn.convert_variables(fewer, sn_init)


class BothKinds(nn.Module):
    norm: object = None

    @nn.compact
    def __call__(self, x, use_running_average):
        first = nn.BatchNorm if self.norm is None else self.norm
        second = (
            nn.GroupNorm(num_groups=4)
            if self.norm is None
            else self.norm(use_running_average=use_running_average)
        )
        return second(first(use_running_average=use_running_average)(nn.Conv(C, (3, 3))(x)))


def test_batchnorms_and_groupnorms_auto_named_in_one_scope_are_ambiguous():
    with pytest.raises(
        ValueError, match=r"2 kinds \(BatchNorm_0, GroupNorm_0\) in scope '\(root\)'.*explicitly"
    ):
        snn.convert_variables(init(BothKinds()), init(BothKinds(snn.SwitchNorm)))


def test_replacing_some_batchnorms_of_a_scope_and_keeping_others_is_ambiguous(bn_variables):
    class OneReplaced(nn.Module):
        @nn.compact
        def __call__(self, x, use_running_average):
            x = nn.relu(snn.SwitchNorm(use_running_average=use_running_average)(nn.Conv(C, (3, 3))(x)))
            x = Block(nn.BatchNorm)(x, use_running_average)
            return nn.Dense(3)(x.mean((1, 2)))

    class KeptFirst(nn.Module):
        @nn.compact
        def __call__(self, x, use_running_average):
            x = nn.BatchNorm(use_running_average=use_running_average)(x)
            return snn.SwitchNorm(use_running_average=use_running_average)(x)

    snn.convert_variables(bn_variables, init(OneReplaced()))  # the root scope replaced its only BatchNorm
    with pytest.raises(
        ValueError, match=r"replaced some BatchNorm or SwitchNorm layers and kept others \(BatchNorm_0\)"
    ):
        snn.convert_variables(init(BothKinds(nn.BatchNorm)), init(KeptFirst()))


def test_logits_of_other_normalizers_need_normalizers(bn_variables):
    sn = Net(functools.partial(snn.SwitchNorm, normalizers=("bn", "ln")))
    with pytest.raises(ValueError, match=r"'SwitchNorm_0' holds logits of shape \(2,\).*pass normalizers="):
        snn.convert_variables(bn_variables, init(sn))
    variables = snn.convert_variables(bn_variables, init(sn), normalizers=("bn", "ln"))
    np.testing.assert_allclose(eval_call(sn, variables, X), eval_call(BNNet(), bn_variables, X), **TOL)
    assert_trees_close(
        snn.collapse_variables(variables, init(BNNet()), normalizers=("bn", "ln")), bn_variables
    )


def test_a_per_sample_layer_is_not_collapsed(bn_variables):
    sn = Net(functools.partial(snn.SwitchNorm, weights="sample"))
    variables = snn.convert_variables(bn_variables, init(sn))
    with pytest.raises(ValueError, match=r"'SwitchNorm_0' has weights='sample'"):
        snn.collapse_variables(variables, init(BNNet()))


class OneNorm(nn.Module):
    """A convolution and one normalization layer, ``norm`` built by the caller."""

    norm: object

    @nn.compact
    def __call__(self, x):
        return self.norm()(nn.Conv(C, (3, 3))(x))


@pytest.mark.parametrize(
    "name, flax_norm",
    [
        ("ln", functools.partial(nn.LayerNorm, reduction_axes=(1, 2, 3), epsilon=1e-5)),
        ("in", functools.partial(nn.InstanceNorm, epsilon=1e-5)),
    ],
)
def test_a_layer_that_chose_ln_or_in_collapses_onto_the_flax_layer(name, flax_norm):
    x = jax.random.normal(jax.random.key(3), (4, 6, 6, 3)) * 2 + 1
    sn_model = OneNorm(functools.partial(snn.SwitchNorm, use_running_average=False))
    variables = sn_model.init(jax.random.key(0), x)
    params = flax.core.unfreeze(variables["params"])
    chosen = jnp.where(jnp.arange(4) == switchnorm.NORMALIZERS.index(name), 0.0, -30.0)
    params["SwitchNorm_0"].update(mean_logits=chosen, var_logits=chosen, bias=jnp.arange(C) / C)
    variables = {**variables, "params": params}
    y, _ = sn_model.apply(variables, x, mutable=["batch_stats"])

    flax_model = OneNorm(flax_norm)
    moved = snn.collapse_variables(variables, flax_model.init(jax.random.key(1), x))
    np.testing.assert_allclose(flax_model.apply(moved, x), y, **TOL)
