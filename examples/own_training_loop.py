"""Your own NNX training loop with SwitchNorm: the weight-decay mask and one-call weight records.

    python examples/own_training_loop.py

Trains the MNIST-1D residual CNN of ``switchnorm train`` for a few epochs with
a plain ``nnx.Optimizer`` loop, records every layer's mixing weights with
``WeightHistory.record`` after each epoch, and prints how the first layer's
weights moved.
"""

import numpy as np
import optax
from flax import nnx

import switchnorm
from switchnorm.train import WeightHistory, build_model, load_dataset
from switchnorm.train.data import train_batches

EPOCHS, BATCH = 5, 64

data = load_dataset("mnist1d")  # 4000 / 1000 sequences of shape (40, 1), generated locally
model = build_model("resnet1d", data.input_shape, data.num_classes, norm="sn")

steps = EPOCHS * (len(data.x_train) // BATCH)
schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, steps // EPOCHS, steps)
# AdamW whose weight decay spares every SwitchNorm layer's mean_logits and var_logits.
optimizer = nnx.Optimizer(
    model, optax.adamw(schedule, weight_decay=1e-2, mask=switchnorm.weight_decay_mask), wrt=nnx.Param
)


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model, x):
    return model(x).argmax(-1)


history = WeightHistory()
step = 0
for epoch in range(EPOCHS):
    model.train()  # batch statistics for the bn term
    for x, y in train_batches(data.x_train, data.y_train, BATCH, seed=0, epoch=epoch):
        loss = train_step(model, optimizer, x, y)
        step += 1
    history.record(step, model)  # <- one call: every layer's weights at this step
    model.eval()  # running averages for the bn term
    accuracy = np.mean(np.asarray(predict(model, data.x_test)) == data.y_test)
    print(f"epoch {epoch + 1}: loss {float(loss):.4f}, test accuracy {accuracy:.4f}")

print(switchnorm.format_mixing_weights(history.weights[-1]))
print(
    "first layer's variance weight of bn by epoch:", np.round(history.series("layers/0/norm", "var", "bn"), 3)
)
