# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 · Write your own head
#
# The five heads of the package (softmax, Gumbel, hierarchical, adaptive, sampled) share one
# small protocol, so the trainer, the optimisers, the checkpoints and the evaluation work with
# any of them — and with yours. In this notebook we write a new head from scratch:
#
# 1. the protocol a head implements, and the math of our head — a softmax with a
#    **learned temperature**;
# 2. a first draft with a classic chain-rule slip that a hand-made gradient check *misses*,
#    and the message `npsoftmax.check_head` gives when it catches it;
# 3. a second slip that no gradient check can see, caught by another of `check_head`'s checks;
# 4. the fixed head passing every check, then trained on the digits with the package's own
#    `Trainer`, beside the built-in softmax and Gumbel heads.
#
# Only the head is written here; everything else (`Head`, `check_head`, `cnn_body`,
# `Classifier`, `Trainer`, the data) is the package's.

# %%
import re
import tempfile

import numpy as np
import matplotlib.pyplot as plt
from threadpoolctl import threadpool_limits

import npsoftmax
from npsoftmax.data import load_digits_images, normalize
from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors
from npsoftmax.heads import Head, log_softmax, softmax_cross_entropy
from npsoftmax.heads.base import linear_weight
from npsoftmax.models import Classifier, build_model, cnn_body
from npsoftmax.optim import SGD, CosineSchedule
from npsoftmax.train import Trainer

rng = np.random.default_rng(0)
# One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
# which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
thread_limits = threadpool_limits(limits=1)
np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. The protocol, and the head we will write
#
# A head turns features $h$ `(N, D)` from the network body into a distribution over $K$
# classes. Subclassing `npsoftmax.heads.Head` gives the constructor checks (`in_features`,
# `n_classes`, `rng`, `dtype`, `class_weights`, `label_smoothing`), `train()`/`eval()`,
# input validation (`_check_batch` refuses wrong shapes, dtypes and NaN features) and a default
# `predict` (the argmax of `log_prob`). We write four things:
#
# | method | returns | contract |
# |---|---|---|
# | `forward(h, y)` | python float | mean negative log-likelihood of the labels; keeps a cache |
# | `backward()` | `dh` `(N, D)` | gradient of the last loss w.r.t. `h`; fills `self.grads` in place |
# | `log_prob(h)` | `(N, K)` | exact, normalised: every row logsumexps to 0 |
# | `__init__` | | registers each parameter with `_add_param` (`params` and `grads`, same keys and shapes) |
#
# **Our head: softmax with a learned temperature.** The scores $s = hW + b$ are divided by a
# temperature $T > 0$ that is itself a parameter:
# $$z = s / T, \qquad L = -\frac1N \sum_i \log \mathrm{softmax}(z_i)_{y_i} .$$
# CLIP learns such a temperature (its `logit_scale`). It can represent no new distribution —
# scaling $W$ and $b$ by $1/T$ does the same — but it changes how training moves: one scalar
# sets the sharpness of every prediction, and weight decay pulls it towards $T = 1$ rather than
# towards small, flat logits as it does $W$. We store
# $\theta = \log T$ (so any real $\theta$ is a valid temperature, and a step changes $T$ by a
# *factor*).
#
# **The gradients.** Notebook 01 gives the cross-entropy gradient with respect to the logits,
# $\bar z = \partial L/\partial z = (\mathrm{softmax}(z) - \mathrm{onehot}(y))/N$. Then the
# chain rule through $z = s\, e^{-\theta}$:
# $$\bar s = \bar z\, e^{-\theta} = \bar z / T, \qquad \bar W = h^\top \bar s, \qquad
# \bar b = \textstyle\sum_i \bar s_i, \qquad \bar h = \bar s\, W^\top,$$
# $$\frac{\partial L}{\partial \theta} = \sum_{i,k} \bar z_{ik}\, \frac{\partial z_{ik}}{\partial \theta}
# = -\sum_{i,k} \bar z_{ik}\, z_{ik} .$$
# `softmax_cross_entropy` returns $\bar z$ (with the class weights and label smoothing
# of `torch.nn.functional.cross_entropy` already folded in), so the head supports both options
# for free.

# %% [markdown]
# ## 2. A first draft, and a check that misses its mistake
#
# Here is a first draft. Read `backward` carefully: it has a slip that is easy to make when the
# division by $T$ happens in `forward` and the chain rule is written from memory.

# %%
class TemperatureSoftmaxDraft(Head):
    """Softmax over (h W + b) / T with a learned log-temperature (first draft).

    Parameters: ``W (D, K)``, ``b (K,)``, ``log_temperature (1,)`` = log T.
    """

    supports_label_smoothing = True     # softmax_cross_entropy implements it

    def __init__(self, in_features, n_classes, *, rng, dtype=np.float32, temperature=1.0,
                 class_weights=None, label_smoothing=0.0):
        super().__init__(in_features, n_classes, rng=rng, dtype=dtype, class_weights=class_weights,
                         label_smoothing=label_smoothing)
        self._add_param("W", linear_weight(self.rng, self.in_features, (self.in_features, self.n_classes),
                                           self.dtype))
        self._add_param("b", np.zeros(self.n_classes, dtype=self.dtype))
        self._add_param("log_temperature", np.full(1, np.log(temperature), dtype=self.dtype))

    @property
    def temperature(self):
        return float(np.exp(self.params["log_temperature"][0]))

    def logits(self, h):
        """z = (h W + b) / T, (N, K)."""
        return (h @ self.params["W"] + self.params["b"]) * np.exp(-self.params["log_temperature"])

    def forward(self, h, y):
        h, y = self._check_batch(h, y)          # shapes, dtype, finite features, labels in range
        z = self.logits(h)
        loss, dz = softmax_cross_entropy(z, y, class_weights=self.class_weights,
                                         label_smoothing=self.label_smoothing)
        self._cache = (h, z, dz)
        return loss

    def backward(self):
        h, z, dz = self._take_cache()           # RuntimeError before any forward
        ds = dz                                 # <- the slip: z = s / T, so ds should be dz / T
        np.matmul(h.T, ds, out=self.grads["W"])
        np.sum(ds, axis=0, out=self.grads["b"])
        self.grads["log_temperature"][0] = -np.sum(dz * z)
        return ds @ self.params["W"].T

    def log_prob(self, h):
        h = self._check_features(h)
        return log_softmax(self.logits(h))


# %% [markdown]
# A quick hand-made gradient check — a fresh float64 head, random features, central differences
# on every array — passes. The reason is the value of $T$: a fresh head starts at $T = 1$, where
# $\bar z / T = \bar z$, so the slip changes nothing. The mistake is invisible exactly where we
# happened to look.

# %%
def gradient_check(head, n_samples=7, seed=1):
    """Relative error of dh and every parameter gradient against central differences (float64)."""
    data_rng = np.random.default_rng(seed)
    h = data_rng.standard_normal((n_samples, head.in_features))
    y = data_rng.integers(0, head.n_classes, n_samples)
    head.forward(h, y)
    analytic = {"h": head.backward(), **{name: grad.copy() for name, grad in head.grads.items()}}
    return gradient_errors(lambda: head.forward(h, y), {"h": h, **head.params}, analytic)


draft = TemperatureSoftmaxDraft(5, 11, rng=np.random.default_rng(0), dtype=np.float64)
errors_at_init = gradient_check(draft)
print(f"T = {draft.temperature:g}:", {name: f"{error:.1e}" for name, error in errors_at_init.items()})
assert max(errors_at_init.values()) < HEAD_TOLERANCE        # the slip hides at T = 1

# %% [markdown]
# `npsoftmax.check_head` is harder to fool. It builds float64 heads itself, and before the
# gradient check it moves every 1-D parameter away from its initial value by random noise
# (zero biases hide bias bugs; here, $\theta = 0$ hides the temperature bug). It then runs every
# check of the protocol and stops at the first failure with a `HeadCheckError` that names the
# check and gives the numbers. (The cell is tagged `varies`: the message lists the arrays in
# an order that can change from run to run, and `h`, `W` and `b` tie for the worst.)

# %% tags=["varies"]
try:
    npsoftmax.check_head(TemperatureSoftmaxDraft)
except npsoftmax.HeadCheckError as error:
    first_failure = error
print(first_failure)

# %%
listed = str(first_failure).split("all errors:")[1]
all_errors = {name: float(value) for name, value in re.findall(r"(\w+)=([-+.e\d]+)", listed)}
print(f"check {first_failure.check!r}; relative errors:", {name: all_errors[name] for name in sorted(all_errors)})
assert first_failure.check == "gradients"
assert all_errors["log_temperature"] < HEAD_TOLERANCE                          # the theta gradient is right ...
through_s = [all_errors[name] for name in ("h", "W", "b")]
assert min(through_s) > 100 * HEAD_TOLERANCE                 # ... everything through s is off,
assert max(through_s) - min(through_s) < 0.05 * max(through_s)  # by one common factor

# %% [markdown]
# The message localises the slip: the gradient with respect to $\theta$ is right (it never
# went through $s$), while `h`, `W` and `b` — every gradient that flows through $\bar s$ — are off
# by the same relative error, which is what one missing scalar factor looks like: with
# $\bar s$ wrong by the factor $T$, the norm-wise relative error is $|T - 1| / (T + 1)$ for all
# three.
#
# ## 3. A mistake no gradient check can see
#
# Suppose the backward pass is right, but `log_prob` forgets the temperature and returns
# `log_softmax(h W + b)`. Forward and backward agree with each other, so every gradient check
# passes; but the model that is *trained* (`softmax(s / T)`) is not the model that is
# *evaluated* (`predict`, test NLL, calibration use `log_prob`). `check_head` compares the
# loss of `forward` in eval mode with the negative log-likelihood computed from `log_prob`.
#
# As in section 2, $T = 1$ would hide this slip: the two models only differ when $T \ne 1$.
# `check_head` builds heads with their default arguments; to check a head at other settings,
# pass a *factory* — any `f(D, K, *, rng, dtype)` that returns a head — here one that starts at
# $T = 0.5$:

# %%
class TemperatureSoftmaxHead(TemperatureSoftmaxDraft):
    """Softmax over (h W + b) / T with a learned log-temperature; see the derivation above."""

    def backward(self):
        h, z, dz = self._take_cache()
        ds = dz * np.exp(-self.params["log_temperature"])     # z = s e^{-theta}: ds = dz / T
        np.matmul(h.T, ds, out=self.grads["W"])
        np.sum(ds, axis=0, out=self.grads["b"])
        self.grads["log_temperature"][0] = -np.sum(dz * z)    # dz/dtheta = -z
        return ds @ self.params["W"].T


class ForgetfulLogProb(TemperatureSoftmaxHead):
    def log_prob(self, h):
        h = self._check_features(h)
        return log_softmax(h @ self.params["W"] + self.params["b"])      # <- no temperature


at_half = lambda D, K, *, rng, dtype: ForgetfulLogProb(D, K, rng=rng, dtype=dtype, temperature=0.5)
try:
    npsoftmax.check_head(at_half)
except npsoftmax.HeadCheckError as error:
    second_failure = error
print(second_failure)
assert second_failure.check == "loss-is-nll"

# %% [markdown]
# ## 4. The fixed head passes every check
#
# `TemperatureSoftmaxHead` above overrides only `backward`, with $\bar s = \bar z / T$. It passes
# all nine checks, with and without the shared options (a factory builds the head with class
# weights and label smoothing):

# %%
passed = npsoftmax.check_head(TemperatureSoftmaxHead)
print("passed:", ", ".join(passed))
with_options = lambda D, K, *, rng, dtype: TemperatureSoftmaxHead(
    D, K, rng=rng, dtype=dtype, class_weights=np.linspace(0.5, 2.0, K), label_smoothing=0.1)
assert npsoftmax.check_head(with_options) == passed
assert len(passed) == len(npsoftmax.conformance.CHECKS)

head = TemperatureSoftmaxHead(5, 11, rng=np.random.default_rng(0), dtype=np.float64, temperature=0.3)
errors = gradient_check(head)
print(f"T = {head.temperature:g}:", {name: f"{error:.1e}" for name, error in errors.items()})
assert max(errors.values()) < HEAD_TOLERANCE

# %% [markdown]
# ## 5. Training it on the digits, beside the built-in heads
#
# A head that passes `check_head` plugs into the rest of the package unchanged. `build_model`
# only knows the registered heads by name, so for ours we assemble the model from its parts:
# `cnn_body` (notebooks 02–04) and the head, joined by `Classifier`. `build_model` draws the
# body from the first of two streams spawned from its `rng` and the head from the second; we
# do the same, so all three runs start from the **same body**.
#
# Same recipe for every head, as in notebook 08 but smaller (conv widths 8, 16, 32 and 64
# features, 8 epochs): SGD with momentum, weight decay $5\cdot10^{-4}$ (on every parameter,
# $\theta$ included, which pulls $T$ towards 1), a cosine learning-rate schedule. The `Trainer`
# calls `on_epoch_end` after every epoch; we use it to record the learned temperature.

# %%
dataset = load_digits_images(seed=0)
K = dataset.n_classes
height, width, channels = dataset.train.images.shape[1:]
image_shape = (channels, height, width)
widths, feature_dim, epochs, batch_size, learning_rate = (8, 16, 32), 64, 8, 64, 0.05
steps_per_epoch = -(-len(dataset.train) // batch_size)


def own_model(rng):
    body_rng, head_rng = rng.spawn(2)     # as build_model: the body does not depend on the head
    body = cnn_body(image_shape, widths=widths, feature_dim=feature_dim, rng=body_rng)
    return Classifier(body, TemperatureSoftmaxHead(feature_dim, K, rng=head_rng))


models = {
    "softmax": build_model("softmax", K, image_shape, rng=np.random.default_rng(0), widths=widths,
                           feature_dim=feature_dim),
    "gumbel": build_model("gumbel", K, image_shape, rng=np.random.default_rng(0), widths=widths,
                          feature_dim=feature_dim, head_options={"tau": 1.0}),
    "temperature (ours)": own_model(np.random.default_rng(0)),
}
first_conv = [model.params["body.0.w"] for model in models.values()]
assert all(np.array_equal(first_conv[0], weights) for weights in first_conv)   # the same initial body

# %% tags=["varies"]
run_root = tempfile.TemporaryDirectory()       # the trainer's history.json and checkpoints
trainers, temperatures = {}, [1.0]
for name, model in models.items():
    optimizer = SGD(model.params, lr=learning_rate, momentum=0.9, weight_decay=5e-4)
    record_temperature = (lambda trainer, record: temperatures.append(trainer.model.head.temperature)) \
        if name.startswith("temperature") else None
    trainer = Trainer(model, optimizer, dataset, epochs=epochs, batch_size=batch_size,
                      run_dir=f"{run_root.name}/{name.split()[0]}", seed=0,
                      lr_schedule=CosineSchedule(learning_rate, epochs * steps_per_epoch),
                      on_epoch_end=record_temperature, progress=False)
    history = trainer.fit()
    trainers[name] = trainer
    print(f"{name:>18}: test top-1 {history[-1]['test_top1']:.3f}, test NLL {history[-1]['test_loss']:.3f} "
          f"({sum(record['epoch_seconds'] for record in history):.1f} s)")
print(f"learned temperature T = {temperatures[-1]:.3f}")
run_root.cleanup()

# %%
fig, (loss_axis, accuracy_axis, temperature_axis) = plt.subplots(1, 3, figsize=(14, 3.4))
for name, trainer in trainers.items():
    epoch = [record["epoch"] for record in trainer.history]
    loss_axis.plot(epoch, [record["test_loss"] for record in trainer.history], "o-", label=name)
    accuracy_axis.plot(epoch, [record["test_top1"] for record in trainer.history], "o-", label=name)
temperature_axis.plot(range(epochs + 1), temperatures, "o-", color="tab:green")
loss_axis.set(xlabel="epoch", ylabel="test NLL", yscale="log", title="exact test negative log-likelihood")
accuracy_axis.set(xlabel="epoch", ylabel="test top-1", title="test accuracy", ylim=(0.5, 1))
temperature_axis.set(xlabel="epoch", ylabel="T", title="our head's learned temperature")
for axis in (loss_axis, accuracy_axis, temperature_axis):
    axis.grid(alpha=0.3)
loss_axis.legend(); accuracy_axis.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The learned temperature falls below 1: sharper predictions lower the training NLL, and
# lowering $T$ gets them without growing $W$ (which weight decay penalises; its pull on
# $\theta = \log T$ is towards $T = 1$, and weak).
# Like every head, ours is evaluated in eval mode through its exact `log_prob`, and `predict`
# is its argmax.

# %%
for name, trainer in trainers.items():
    history = trainer.history
    assert len(history) == epochs
    assert history[-1]["train_loss"] < history[0]["train_loss"], name      # it learned
    assert history[-1]["test_top1"] > 0.85, name
ours = trainers["temperature (ours)"]
assert temperatures[-1] == ours.model.head.temperature < 0.9             # T was learned, and sharpened
features = ours.model.eval().body.forward(
    normalize(dataset.test.images, ours.mean, ours.std))
np.testing.assert_array_equal(ours.model.head.predict(features),
                              np.argmax(ours.model.head.log_prob(features), axis=1))
print("all checks passed")

# %% [markdown]
# ### Takeaways
# * A head is four methods and a `params`/`grads` pair; subclassing `Head` provides the
#   validation, and `check_head` everything a reviewer would ask.
# * A gradient check at the initial parameters can miss a bug that depends on their values
#   (here $T = 1$); `check_head` moves the parameters first, and its message names the check and
#   the arrays.
# * Agreement between `forward` and `backward` is not enough: `log_prob` must describe the
#   model that is trained (`loss-is-nll`).
# * A passing head trains with the package's `Trainer` like the built-in ones.

# %% [markdown]
# **Next:** [10_gradient_estimators.ipynb](10_gradient_estimators.ipynb) — how far the gradients of the sampled, Gumbel and hierarchical objectives are from the full softmax's.
