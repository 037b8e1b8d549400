"""``switchnorm.param_labels`` and ``switchnorm.weight_decay_mask``: the mixing logits told apart.

Both are part of the layer's own API, so they must work on an NNX state and on Linen params
without the training extra (scikit-learn, orbax, ...) installed.
"""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import switchnorm
from switchnorm import linen as snn


def flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_param_labels_mark_exactly_the_logits_of_an_nnx_state():
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), switchnorm.SwitchNorm(8, rngs=nnx.Rngs(0)))
    labels = flat(switchnorm.param_labels(nnx.state(model, nnx.Param)))
    mixing = {p for p, label in labels.items() if label == "mixing"}
    assert {p.split("]")[-2].split("'")[-2] for p in mixing} == {"mean_logits", "var_logits"}
    assert len(mixing) == 2 and set(labels.values()) == {"mixing", "rest"}


def test_param_labels_and_the_mask_mark_exactly_the_logits_of_linen_params():
    params = snn.SwitchNorm().init(jax.random.key(0), jnp.ones((2, 4, 4, 8)), use_running_average=False)[
        "params"
    ]
    labels, mask = switchnorm.param_labels(params), switchnorm.weight_decay_mask(params)
    assert labels == {"mean_logits": "mixing", "var_logits": "mixing", "scale": "rest", "bias": "rest"}
    assert mask == {"mean_logits": False, "var_logits": False, "scale": True, "bias": True}


def test_multi_transform_with_the_labels_steps_only_the_logits_with_their_own_optimizer():
    params = {"norm": {"mean_logits": jnp.ones(2), "scale": jnp.ones(2)}}
    tx = optax.multi_transform(
        {"mixing": optax.sgd(1.0), "rest": optax.set_to_zero()}, switchnorm.param_labels
    )
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert updates["norm"]["mean_logits"].tolist() == [-1.0, -1.0]
    assert updates["norm"]["scale"].tolist() == [0.0, 0.0]


def test_the_labels_need_no_training_extra():
    # A meta-path hook refuses every package of the training extra: the labels must not need one.
    script = textwrap.dedent(
        """
        import sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"sklearn", "orbax", "matplotlib", "mnist1d", "tqdm", "tensorboardX"}:
                    raise ImportError("training extra refused: " + name)
        sys.meta_path.insert(0, Refuse())
        import jax.numpy as jnp
        import switchnorm
        print(switchnorm.param_labels({"n": {"var_logits": jnp.zeros(2), "bias": jnp.zeros(2)}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "{'n': {'bias': 'rest', 'var_logits': 'mixing'}}"
