# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · The Gumbel-softmax
#
# How do you back-propagate through a *sample* from a categorical distribution? The
# Gumbel-max trick turns sampling into an argmax of noisy logits; replacing the argmax by a
# softmax at temperature $\tau$ makes it differentiable (Jang et al. 2017; Maddison et al.
# 2017). This notebook covers
#
# 1. the Gumbel-max trick, checked by a histogram of samples;
# 2. the temperature: from one-hot ($\tau \to 0$) to uniform ($\tau \to \infty$);
# 3. the gradient of the Gumbel-softmax head, $(p - \mathrm{onehot}(y))/\tau$, and the
#    *diagonal-only* Jacobian mistake that a gradient check catches;
# 4. straight-through hard samples;
# 5. temperature annealing, and a small training run.
#
# Everything comes from `npsoftmax.heads` (`sample_gumbel`, `gumbel_softmax`,
# `gumbel_softmax_backward`, `GumbelSoftmaxHead`) and `npsoftmax.optim`.

# %%
import numpy as np
import matplotlib.pyplot as plt
from threadpoolctl import threadpool_limits

from npsoftmax.data import load_digits_images
from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors, numerical_gradient, relative_error
from npsoftmax.heads import (GumbelSoftmaxHead, SoftmaxHead, gumbel_softmax, gumbel_softmax_backward,
                             sample_gumbel, softmax, softmax_cross_entropy)
from npsoftmax.optim import Adam, ExponentialTemperatureSchedule, Scheduler

rng = np.random.default_rng(0)
# One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
# which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
thread_limits = threadpool_limits(limits=1)
np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. The Gumbel-max trick
#
# Gumbel(0, 1) noise is $g = -\log(-\log u)$ with $u \sim U(0, 1)$; its density is
# $e^{-(g + e^{-g})}$ and its mean is Euler's constant $\gamma \approx 0.5772$. The trick:
# with i.i.d. $g_k$,
# $$\arg\max_k\, (z_k + g_k) \;\sim\; \mathrm{Categorical}\big(\mathrm{softmax}(z)\big)$$
# exactly. (Sketch: $z_k + g_k$ is Gumbel with location $z_k$; the max of Gumbels with
# locations $z_k$ lands on $k$ with probability $e^{z_k}/\sum_j e^{z_j}$.)
# `sample_gumbel` clips $u$ away from 0 and 1, so the noise is always finite.

# %%
noise = sample_gumbel((200_000,), rng, dtype=np.float64)
grid = np.linspace(-3, 8, 300)
fig, axis = plt.subplots(figsize=(5.5, 3))
axis.hist(noise, bins=120, density=True, alpha=0.5, label="sample_gumbel")
axis.plot(grid, np.exp(-(grid + np.exp(-grid))), "k", label=r"density $e^{-(g + e^{-g})}$")
axis.set(xlim=(-3, 8), title="Gumbel(0, 1) noise"); axis.legend()
plt.show()
print(f"mean {noise.mean():.4f} (Euler's constant 0.5772)")
assert abs(noise.mean() - np.euler_gamma) < 0.01 and np.all(np.isfinite(noise))

# %%
z = np.array([1.0, 0.5, 2.0, -1.0, 0.0])
K = z.size
n_draws = 20_000
draws = np.argmax(z + sample_gumbel((n_draws, K), rng, dtype=np.float64), axis=1)
frequencies = np.bincount(draws, minlength=K) / n_draws

fig, axis = plt.subplots(figsize=(5.5, 3))
axis.bar(np.arange(K) - 0.2, softmax(z), width=0.4, label="softmax(z)")
axis.bar(np.arange(K) + 0.2, frequencies, width=0.4, label=f"argmax(z + g), {n_draws} draws")
axis.set(xlabel="class", ylabel="probability", title="the Gumbel-max trick samples softmax(z)"); axis.legend()
plt.show()
print("softmax(z)  :", softmax(z))
print("frequencies :", frequencies)
assert np.max(np.abs(frequencies - softmax(z))) < 0.015      # ~4 standard errors at 20,000 draws

# %% [markdown]
# ## 2. The relaxation and its temperature
#
# The argmax has zero gradient almost everywhere. The Gumbel-softmax replaces it by
# $$y = \mathrm{softmax}\big((z + g)/\tau\big),$$
# a point inside the simplex. As $\tau \to 0$ it approaches the one-hot vector of
# $\arg\max(z + g)$ — the exact sample — and as $\tau \to \infty$ it flattens towards uniform.
# Below: *one* noise draw, five temperatures; then the mean largest entry over 2,000 draws as
# $\tau$ sweeps. Whatever $\tau$, the relaxed sample's argmax is the Gumbel-max sample (softmax
# preserves order).

# %%
one_noise = sample_gumbel((1, K), rng, dtype=np.float64)
temperatures = [0.1, 0.3, 1.0, 3.0, 10.0]
fig, axes = plt.subplots(1, len(temperatures), figsize=(13, 2.6), sharey=True)
for axis, tau in zip(axes, temperatures):
    sample, _ = gumbel_softmax(z[None, :], tau, noise=one_noise)
    axis.bar(range(K), sample[0], color="tab:purple")
    axis.set(title=f"tau = {tau:g}", xticks=range(K), ylim=(0, 1))
    assert np.argmax(sample) == np.argmax(z + one_noise)
axes[0].set_ylabel("relaxed sample y")
plt.show()

many_noise = sample_gumbel((2000, K), rng, dtype=np.float64)
logits = np.tile(z, (2000, 1))
sweep = np.logspace(-1.5, 1.5, 25)
sharpness = np.array([gumbel_softmax(logits, tau, noise=many_noise)[0].max(axis=1).mean() for tau in sweep])
fig, axis = plt.subplots(figsize=(5.5, 3))
axis.semilogx(sweep, sharpness, "o-")
axis.axhline(1 / K, color="gray", ls=":", label="uniform (1/K)")
axis.set(xlabel="temperature tau", ylabel="mean max_k y_k", title="low tau: nearly one-hot; high tau: nearly uniform")
axis.legend()
plt.show()
assert np.all(np.diff(sharpness) < 0)
assert sharpness[0] > 0.95 and sharpness[-1] < 1 / K + 0.05

# %% [markdown]
# ## 3. The head's gradient, and the diagonal-only mistake
#
# `GumbelSoftmaxHead` trains with the cross-entropy of the relaxed sample,
# $L = -\frac1N \sum_i \log \mathrm{softmax}(t_i)_{y_i}$ with $t = (z + g)/\tau$ and fresh
# noise $g$ every call. Notebook 01's result applies to $t$, and $\partial t/\partial z = 1/\tau$:
# $$\frac{\partial L}{\partial z} = \frac{\mathrm{softmax}(t) - \mathrm{onehot}(y)}{N\,\tau} .$$
#
# **The mistake.** Chaining through $y = \mathrm{softmax}(t)$ by hand, it is tempting to use only
# the diagonal of its Jacobian, $\partial y_k/\partial t_k = y_k(1 - y_k)$. But the Jacobian is
# the full matrix $\mathrm{diag}(y) - y y^\top$: every $y_k$ depends on every $t_j$. With the
# diagonal only, the gradient of $-\log y_{\text{target}}$ keeps its target entry
# $(y_{\text{target}} - 1)/\tau$ and loses all the others, $y_k/\tau$ — the entries that push the
# wrong classes down. The check compares both with central differences on the logits (the
# noise is held fixed so that the loss is a deterministic function).

# %%
N, tau = 6, 0.5
logits = rng.standard_normal((N, K))
noise = sample_gumbel((N, K), rng, dtype=np.float64)
y = rng.integers(0, K, N)
loss_of_logits = lambda: softmax_cross_entropy((logits + noise) / tau, y)[0]
numeric = numerical_gradient(loss_of_logits, logits)

relaxed = softmax((logits + noise) / tau)
onehot = np.eye(K)[y]
exact = (relaxed - onehot) / (N * tau)
# Diagonal only: dL/dy = -onehot / (N y), times y (1 - y), times 1/tau.
diagonal_only = (-onehot / (N * relaxed)) * relaxed * (1 - relaxed) / tau

exact_error, diagonal_error = relative_error(exact, numeric), relative_error(diagonal_only, numeric)
print(f"exact (p - onehot) / tau : relative error {exact_error:.1e}")
print(f"diagonal-only Jacobian   : relative error {diagonal_error:.2f}")
assert exact_error < HEAD_TOLERANCE
assert diagonal_error > 0.1

# %% [markdown]
# The same check on the head itself, for its input features and both parameters. The head
# remembers the noise of its last training forward (`head.last_noise`), and
# `forward(h, y, noise=...)` re-evaluates the loss with that noise, which is what a numerical
# gradient needs.

# %%
head = GumbelSoftmaxHead(7, K, rng=np.random.default_rng(1), dtype=np.float64, tau=0.5)
h = rng.standard_normal((N, 7))
loss = head.forward(h, y)
frozen_noise = head.last_noise
dh = head.backward()
analytic = {"h": dh, **{name: grad.copy() for name, grad in head.grads.items()}}
errors = gradient_errors(lambda: head.forward(h, y, noise=frozen_noise),
                         {"h": h, "W": head.params["W"], "b": head.params["b"]}, analytic)
print({name: f"{error:.1e}" for name, error in errors.items()})
assert all(error < HEAD_TOLERANCE for error in errors.values())

# %% [markdown]
# For the *sampling* API (`gumbel_softmax` followed by any downstream loss) the backward pass
# is a vector-Jacobian product with a random upstream gradient $\bar y$:
# $\bar t = y \odot (\bar y - \langle \bar y, y\rangle)$, $\bar z = \bar t/\tau$. The diagonal-only
# version $y(1-y)\bar y/\tau$ fails the same way.

# %%
dsample = rng.standard_normal((N, K))
sample, cache = gumbel_softmax(logits, tau, noise=noise)
numeric = numerical_gradient(lambda: np.sum(gumbel_softmax(logits, tau, noise=noise)[0] * dsample), logits)
full_error = relative_error(gumbel_softmax_backward(dsample, cache), numeric)
diagonal_error = relative_error(sample * (1 - sample) * dsample / tau, numeric)
print(f"gumbel_softmax_backward: {full_error:.1e}   diagonal only: {diagonal_error:.2f}")
assert full_error < HEAD_TOLERANCE and diagonal_error > 0.1

# %% [markdown]
# ## 4. Straight-through hard samples
#
# Sometimes the downstream computation needs a real one-hot sample. `gumbel_softmax(...,
# hard=True)` returns the exact one-hot $\arg\max(z + g)$ — a true categorical sample — while
# `gumbel_softmax_backward` passes the *relaxed* sample's gradient straight through. The
# gradient is therefore biased (it is the gradient of a different function), but it has low
# variance and works well in practice; lower $\tau$ reduces the bias and raises the variance.

# %%
hard, hard_cache = gumbel_softmax(logits, tau, hard=True, noise=noise)
soft, soft_cache = gumbel_softmax(logits, tau, hard=False, noise=noise)
print("hard sample:\n", hard)
np.testing.assert_array_equal(hard, np.eye(K)[np.argmax(logits + noise, axis=1)])   # exact one-hot samples
np.testing.assert_allclose(gumbel_softmax_backward(dsample, hard_cache),
                           gumbel_softmax_backward(dsample, soft_cache), rtol=1e-15)  # straight-through

# %% [markdown]
# ## 5. Annealing the temperature, and a small training run
#
# A high temperature gives smooth, low-variance gradients but a blurry relaxation; a low one
# is faithful but noisy (the gradient scales like $1/\tau$). The usual schedule starts warm
# and cools, with a floor so that $\tau$ never reaches 0:
# $$\tau_t = \max\big(\tau_{\min},\ \tau_0\, e^{-r t}\big)$$
# (`ExponentialTemperatureSchedule`; `Scheduler` writes it into `head.tau` before every step).
# We train a Gumbel head directly on the 64 pixels of scikit-learn's digits (a linear
# classifier, so it runs in a second) and, for reference, a plain softmax head from the same
# initial weights.
#
# At evaluation the Gumbel head uses **no noise and no temperature**: `log_prob(h)` is
# `log_softmax(z)`, the distribution the Gumbel-max trick samples from, so `predict` is
# deterministic whatever $\tau$ is.

# %%
data = load_digits_images(seed=0)
features = lambda split: (split.images.reshape(len(split), -1) / 255.0).astype(np.float32)
h_train, y_train = features(data.train), data.train.labels
h_test, y_test = features(data.test), data.test.labels

schedule = ExponentialTemperatureSchedule(tau0=2.0, tau_min=0.5, rate=0.02)
epochs, batch_size = 12, 128
steps_per_epoch = -(-len(y_train) // batch_size)
history = {}
for name, head_class in (("gumbel", GumbelSoftmaxHead), ("softmax", SoftmaxHead)):
    head = head_class(64, 10, rng=np.random.default_rng(3), dtype=np.float32)
    optimizer = Adam(head.params, lr=0.02)
    scheduler = Scheduler(head=head, tau_schedule=schedule) if name == "gumbel" else Scheduler()
    order_rng = np.random.default_rng(4)
    record = {"loss": [], "tau": [], "test_accuracy": []}
    step = 0
    for epoch in range(epochs):
        order = order_rng.permutation(len(y_train))
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            record["tau"].append(scheduler.apply(step).get("tau", np.nan))
            record["loss"].append(head.forward(h_train[batch], y_train[batch]))
            head.backward()
            optimizer.step(head.grads)
            step += 1
        record["test_accuracy"].append(np.mean(head.predict(h_test) == y_test))
    history[name] = (head, record)
    print(f"{name:>8}: test accuracy {record['test_accuracy'][-1]:.3f} after {step} steps")

# %%
gumbel_head, gumbel_record = history["gumbel"]
fig, (tau_axis, loss_axis, accuracy_axis) = plt.subplots(1, 3, figsize=(14, 3.3))
tau_axis.plot(gumbel_record["tau"])
tau_axis.set(xlabel="step", ylabel="tau", title="tau_t = max(0.5, 2 exp(-0.02 t))")
for name, (_, record) in history.items():
    loss_axis.plot(record["loss"], label=name, alpha=0.8)
    accuracy_axis.plot(np.arange(1, epochs + 1), record["test_accuracy"], "o-", label=name)
loss_axis.set(xlabel="step", ylabel="training loss", title="training objective (Gumbel: noisy, tempered)")
accuracy_axis.set(xlabel="epoch", ylabel="test accuracy", title="noise-free test accuracy", ylim=(0.5, 1))
for axis in (tau_axis, loss_axis, accuracy_axis):
    axis.grid(alpha=0.3)
loss_axis.legend(); accuracy_axis.legend()
fig.tight_layout()
plt.show()

taus = np.array(gumbel_record["tau"])
assert taus[0] == 2.0 and taus[-1] == 0.5 and np.all(np.diff(taus) <= 0)
assert gumbel_record["test_accuracy"][-1] > 0.85 and history["softmax"][1]["test_accuracy"][-1] > 0.85
# Evaluation is deterministic and independent of tau: no noise in log_prob / predict.
first_prediction = gumbel_head.predict(h_test)
gumbel_head.tau = 10.0
np.testing.assert_array_equal(gumbel_head.predict(h_test), first_prediction)
np.testing.assert_array_equal(first_prediction, np.argmax(gumbel_head.log_prob(h_test), axis=1))

# %% [markdown]
# ### Takeaways
# * $\arg\max(z + g)$ with Gumbel noise is an exact sample of $\mathrm{softmax}(z)$; the
#   softmax at temperature $\tau$ relaxes it.
# * The head's gradient is $(p - \mathrm{onehot}(y))/\tau$ — the full softmax Jacobian; the
#   diagonal-only shortcut misses every off-target entry and fails the gradient check.
# * Straight-through: one-hot forward, relaxed backward. Anneal $\tau$ with a floor.

# %% [markdown]
# **Next:** [06_hierarchical_softmax.ipynb](06_hierarchical_softmax.ipynb) — a tree of small softmaxes: O(log K) training.
