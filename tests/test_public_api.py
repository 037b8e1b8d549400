"""The package's public surface, and properties of the core's layout a user relies on."""

import ast
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import switchnorm
from switchnorm import _arguments
from switchnorm import linen as snn

PACKAGE = pathlib.Path(switchnorm.__file__).parent
CORE_MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__main__.py")


def test_star_import_brings_the_public_names_and_not_the_front_end_modules():
    namespace: dict = {}
    exec("from flax import nnx, linen\nfrom switchnorm import *", namespace)
    assert namespace["nnx"] is nnx and namespace["linen"] is nn  # not shadowed by switchnorm's
    names = (
        "SwitchNorm",
        "switch_norm",
        "BatchStats",
        "mixing_weights",
        "mixing_weight_arrays",
        "NORMALIZERS",
    )
    for name in names:
        assert name in namespace
    assert set(switchnorm.__all__) <= set(namespace)


def test_front_end_modules_stay_importable_from_the_package():
    from switchnorm import linen as linen_module
    from switchnorm import nnx as nnx_module

    assert linen_module.SwitchNorm is snn.SwitchNorm and nnx_module.SwitchNorm is switchnorm.SwitchNorm


def test_the_batch_stats_type_returned_by_switch_norm_is_exported():
    x = jnp.ones((2, 3, 4))
    _, stats = switchnorm.switch_norm(x, jnp.zeros(2), jnp.zeros(2), normalizers=("bn", "ln"))
    assert isinstance(stats, switchnorm.BatchStats)


@pytest.mark.parametrize("path", CORE_MODULES, ids=lambda p: p.name)
def test_no_module_imports_flax_internals(path):
    public = {"flax", "flax.errors", "flax.nnx", "flax.linen", "flax.linen.initializers", "flax.typing"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flax"):
            assert node.module in public, f"{path.name} imports {node.module}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("flax.") or alias.name in public, path.name


# --------------------------------------------------------------------------
# Every argument check runs once per call.
# --------------------------------------------------------------------------

CHECKS = ("validate_normalizers", "check_input", "resolve_num_groups", "check_epsilon", "check_momentum")


@pytest.fixture
def check_calls(monkeypatch):
    """Counts the calls of every check function of ``switchnorm._arguments``."""
    calls = dict.fromkeys(CHECKS, 0)
    for name in CHECKS:
        original = getattr(_arguments, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(_arguments, name, counted)
    return calls


X = jax.ShapeDtypeStruct((2, 4, 4, 6), jnp.float32)


def test_the_functional_core_checks_each_argument_once_per_traced_call(check_calls):
    logits = jax.ShapeDtypeStruct((4,), jnp.float32)
    loss = lambda x, a, b: jnp.sum(switchnorm.switch_norm(x, a, b)[0])  # noqa: E731
    jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), X, logits, logits)
    assert check_calls == dict(
        validate_normalizers=1, check_input=1, resolve_num_groups=1, check_epsilon=1, check_momentum=0
    )


def test_the_nnx_layer_checks_its_arguments_once_when_built_and_its_input_once_per_call(check_calls):
    jax.clear_caches()  # the layer body is a cached jit: its input is checked when it is traced
    layer = switchnorm.SwitchNorm(6, rngs=nnx.Rngs(0))
    built = dict(
        validate_normalizers=1, check_input=0, resolve_num_groups=1, check_epsilon=1, check_momentum=1
    )
    assert check_calls == built
    nnx.jit(lambda m, x: m(x))(layer, jnp.ones(X.shape))
    assert check_calls == dict(built, check_input=1)


def test_the_linen_layer_checks_each_argument_once_per_traced_call(check_calls):
    jax.clear_caches()
    module = snn.SwitchNorm(use_running_average=False)
    variables = jax.eval_shape(module.init, jax.random.key(0), X)
    for name in CHECKS:
        check_calls[name] = 0
    jax.eval_shape(lambda v, x: module.apply(v, x, mutable=["batch_stats"]), variables, X)
    assert all(check_calls[name] == 1 for name in CHECKS), check_calls


def test_nnx_and_linen_default_layers_blend_and_report_the_same_on_dense_features(rng):
    x = jnp.asarray(rng.normal(size=(8, 6)) * 2 + 1, jnp.float32)
    logits = {"bn": (0.3, -0.5), "ln": (-1.2, 0.7)}  # (mean, var) logit of each used normalizer
    layer = switchnorm.SwitchNorm(6, rngs=nnx.Rngs(0))
    assert switchnorm.mixing_weights(layer)[""]["mean"].keys() == {"bn", "in", "ln", "gn"}  # not yet called
    for kind, column in (("mean_logits", 0), ("var_logits", 1)):
        getattr(layer, kind)[...] = jnp.array([logits["bn"][column], 5.0, logits["ln"][column], -5.0])
    y_nnx = nnx.jit(lambda m, x: m(x))(layer, x)

    module = snn.SwitchNorm(use_running_average=False)
    variables = module.init(jax.random.key(0), x)
    params = dict(variables["params"])
    assert params["mean_logits"].shape == (4,)  # the same parameters as the NNX layer's
    params["mean_logits"] = jnp.array([logits["bn"][0], 5.0, logits["ln"][0], -5.0])
    params["var_logits"] = jnp.array([logits["bn"][1], 5.0, logits["ln"][1], -5.0])
    variables = {**variables, "params": params}
    y_linen, _ = module.apply(variables, x, mutable=["batch_stats"])

    assert layer.blended_normalizers == ("bn", "ln")
    nnx_report = switchnorm.mixing_weights(layer)[""]
    forward = lambda v, x: module.apply(v, x, mutable=["batch_stats"])  # noqa: E731
    linen_report = switchnorm.mixing_weights(variables, batch=x, forward=forward)[""]
    for kind in ("mean", "var"):
        assert list(nnx_report[kind]) == list(linen_report[kind]) == ["bn", "ln"]
        assert nnx_report[kind] == pytest.approx(linen_report[kind], rel=1e-6)
    np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-6, atol=1e-6)
