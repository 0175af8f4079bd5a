# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Softmax and cross-entropy
#
# The first notebook of the npsoftmax course. Every classifier in this package ends in a
# *head* that turns scores ("logits") into class probabilities with a softmax and is
# trained with the cross-entropy loss. Here we look at the three facts everything later
# relies on:
#
# 1. the textbook softmax overflows, and the max-shift (log-sum-exp) trick fixes it;
# 2. the gradient of softmax + cross-entropy is simply $p - \mathrm{onehot}(y)$;
# 3. how to *check* a gradient numerically — and how a badly designed check passes
#    anything (the vacuous-test trap).
#
# Nothing is re-implemented here: the notebook calls the package's own
# `npsoftmax.heads.softmax`, `log_softmax`, `logsumexp`, `softmax_cross_entropy` and the
# gradient checker `npsoftmax.gradcheck`, and adds pictures and `assert`s of every claim,
# so a regression in the package breaks this notebook.

# %%
import numpy as np
import matplotlib.pyplot as plt
from threadpoolctl import threadpool_limits

from npsoftmax.gradcheck import HEAD_TOLERANCE, numerical_gradient, relative_error
from npsoftmax.heads import log_softmax, logsumexp, softmax, softmax_cross_entropy

rng = np.random.default_rng(0)  # every random number in this notebook comes from here
# One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
# which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
thread_limits = threadpool_limits(limits=1)
np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. Softmax, and how the textbook formula overflows
#
# For logits $z \in \mathbb{R}^K$,
# $$p_k = \mathrm{softmax}(z)_k = \frac{e^{z_k}}{\sum_{j=1}^K e^{z_j}} .$$
#
# In float64, $e^{z}$ overflows to `inf` as soon as $z > \log(\text{max float}) \approx 709.8$
# (in float32 already at $88.7$). Logits like $(1000, 1001, 1002)$ are not exotic — an
# untrained network with large weights produces them — and the formula as written returns
# $\infty / \infty = $ `nan`.

# %%
def naive_softmax(z):
    # The textbook formula, exactly as written: exponentiate, then normalise.
    e = np.exp(z)
    return e / e.sum()

z = np.array([1000.0, 1001.0, 1002.0])
with np.errstate(over="ignore", invalid="ignore"):  # we want to look at the result, not the warning
    naive = naive_softmax(z)
print("naive softmax  :", naive)
print("npsoftmax      :", softmax(z))
assert np.all(np.isnan(naive)), "exp(1000) overflows, so the naive formula gives nan"

# %% [markdown]
# **The fix: softmax does not change when the same constant is added to every logit**,
# $$\frac{e^{z_k - c}}{\sum_j e^{z_j - c}} = \frac{e^{-c}\, e^{z_k}}{e^{-c} \sum_j e^{z_j}} = \mathrm{softmax}(z)_k .$$
# With $c = \max_j z_j$ every exponent is $\le 0$, so nothing overflows, and the largest
# term is $e^0 = 1$, so the denominator is at least 1 — no division by zero either. That is
# what `npsoftmax.heads.softmax` does, in float32 (the training dtype) as well as float64.

# %%
stable = softmax(z)
assert np.all(np.isfinite(stable))
np.testing.assert_allclose(stable, softmax(z - 1000.0), rtol=1e-15)  # shift invariance
np.testing.assert_allclose(stable.sum(), 1.0, rtol=1e-15)

z32 = z.astype(np.float32)
p32 = softmax(z32)
print("float32:", p32, p32.dtype)
assert p32.dtype == np.float32 and np.all(np.isfinite(p32))  # no silent upcast, no overflow

# %% [markdown]
# ## 2. Log-sum-exp: the same trick for the logarithm
#
# Cross-entropy needs $\log p_y$, and
# $$\log p_k = z_k - \log \sum_j e^{z_j} = z_k - \mathrm{logsumexp}(z), \qquad
# \mathrm{logsumexp}(z) = m + \log \sum_j e^{z_j - m}, \quad m = \max_j z_j .$$
#
# Computing `log(softmax(z))` has the *opposite* failure: a probability like $e^{-800}$
# underflows to exactly 0 and its log is $-\infty$, although the right answer is a perfectly
# ordinary $-800$. `log_softmax` never forms the tiny probability.

# %%
z = np.array([0.0, -800.0])
with np.errstate(divide="ignore"):
    via_softmax = np.log(softmax(z))
print("log(softmax(z)):", via_softmax)
print("log_softmax(z) :", log_softmax(z))
assert np.isneginf(via_softmax[1])
np.testing.assert_allclose(log_softmax(z), [0.0, -800.0], atol=1e-12)

# %% [markdown]
# The picture: $\mathrm{logsumexp}(s \cdot (1, 2, 3))$ as the scale $s$ grows. Both formulas
# agree until $e^{3s}$ overflows at $s \approx 236.6$; after that the naive one is `inf`
# (not drawn), the shifted one carries on along the line $3s + \log(1 + e^{-s} + e^{-2s})$.

# %%
scales = np.linspace(1.0, 400.0, 400)
scaled = scales[:, None] * np.array([1.0, 2.0, 3.0])      # (400, 3): one logit vector per row
with np.errstate(over="ignore"):
    naive_lse = np.log(np.sum(np.exp(scaled), axis=1))
stable_lse = logsumexp(scaled, axis=1)
overflow_at = np.log(np.finfo(np.float64).max) / 3

fig, ax = plt.subplots(figsize=(6.5, 3.5))
ax.plot(scales, stable_lse, lw=4, alpha=0.5, label="logsumexp (max shift)")
ax.plot(scales, np.where(np.isfinite(naive_lse), naive_lse, np.nan), "k--", label="log(sum(exp(z))), naive")
ax.axvline(overflow_at, color="C3", ls=":", label=f"exp(3s) overflows (s = {overflow_at:.1f})")
ax.set(xlabel="scale s", ylabel="logsumexp(s * [1, 2, 3])", title="the naive log-sum-exp overflows")
ax.legend(); ax.grid(alpha=0.3)
plt.show()

assert np.all(np.isfinite(stable_lse))
assert np.all(np.isinf(naive_lse[scales > overflow_at]))
below = scales < overflow_at
np.testing.assert_allclose(stable_lse[below], naive_lse[below], rtol=1e-12)

# %% [markdown]
# ## 3. Cross-entropy and its gradient, derived
#
# For one example with label $y$, the loss is the negative log-probability of the label:
# $$L(z) = -\log p_y = -z_y + \log \sum_j e^{z_j} .$$
# Differentiate term by term: $\partial(-z_y)/\partial z_k = -[k = y]$ and
# $\partial \log\sum_j e^{z_j} / \partial z_k = e^{z_k} / \sum_j e^{z_j} = p_k$, so
# $$\boxed{\frac{\partial L}{\partial z_k} = p_k - [k = y]}
# \qquad\text{i.e.}\qquad \nabla_z L = p - \mathrm{onehot}(y).$$
#
# The same result through the chain rule shows why nobody computes it that way. The softmax
# Jacobian is a **full** matrix (each $p_i$ depends on every $z_k$):
# $$\frac{\partial p_i}{\partial z_k} = p_i\,([i = k] - p_k),$$
# and $\partial L / \partial p_i = -[i = y] / p_y$. Multiplying,
# $\partial L/\partial z_k = -\frac{1}{p_y}\, p_y ([y = k] - p_k) = p_k - [k = y]$: the
# $1/p_y$, which would blow up for a confident wrong prediction, cancels exactly. So the
# gradient is computed from $p$ once, and it is bounded: every entry lies in $[-1, 1]$ and
# every row sums to 0.
#
# For a batch the loss is the mean over the $N$ examples, so the gradient is divided by $N$:
# $\nabla_Z L = (P - Y)/N$. That is what `softmax_cross_entropy(logits, y)` returns.

# %%
N, K = 4, 5
logits = 3.0 * rng.standard_normal((N, K))
y = np.array([0, 3, 3, 1])
loss, dlogits = softmax_cross_entropy(logits, y)

by_hand = (softmax(logits) - np.eye(K)[y]) / N     # (p - onehot) / N, the boxed formula
print(f"loss = {loss:.4f}")
print("dlogits =\n", dlogits)
np.testing.assert_allclose(dlogits, by_hand, rtol=1e-12, atol=1e-15)
np.testing.assert_allclose(loss, -np.mean(log_softmax(logits)[np.arange(N), y]), rtol=1e-12)
np.testing.assert_allclose(dlogits.sum(axis=1), 0.0, atol=1e-15)   # rows sum to 0

# %% [markdown]
# ## 4. Checking the gradient numerically
#
# A derivation can be wrong; a *numerical* gradient is an independent oracle. Central
# differences perturb one entry at a time:
# $$\frac{\partial L}{\partial z_i} \approx \frac{L(z + h e_i) - L(z - h e_i)}{2h},$$
# with truncation error $O(h^2)$. We compare the two with the norm-wise relative error
# $\lVert a - n\rVert / (\lVert a\rVert + \lVert n\rVert)$. In float64 with $h = 10^{-6}$ a
# correct gradient agrees to about $10^{-9}$–$10^{-11}$; the package's threshold for heads is
# `HEAD_TOLERANCE`. (`numerical_gradient` perturbs the array *in place*, so the loss function
# just reads `logits`.)

# %%
numeric = numerical_gradient(lambda: softmax_cross_entropy(logits, y)[0], logits)
error = relative_error(dlogits, numeric)
print(f"relative error of p - onehot: {error:.2e}   (tolerance {HEAD_TOLERANCE:g})")
assert error < HEAD_TOLERANCE

# The check has teeth: forgetting the 1/N of the batch mean is caught at once.
forgot_mean = softmax(logits) - np.eye(K)[y]
error_forgot = relative_error(forgot_mean, numeric)
print(f"relative error without the 1/N: {error_forgot:.2f}   (= (N-1)/(N+1) = {(N - 1) / (N + 1):.2f})")
assert error_forgot > 0.1

# %% [markdown]
# **Why float64.** In float32 the rounding error of the loss (about $10^{-7}$) divided by
# $2h$ is an error of several percent on every numerical derivative, so a float32 check cannot tell a
# right gradient from a wrong one. `npsoftmax.gradcheck` therefore refuses float32 arrays —
# and if we sneak float32 in by casting inside the loss, the "check" of the correct formula
# fails:

# %%
try:
    numerical_gradient(lambda: 0.0, logits.astype(np.float32))
except TypeError as error:
    print("TypeError:", str(error)[:95], "...")
else:
    raise AssertionError("the gradient checker must refuse float32 arrays")

# Perturb in float64, but evaluate the loss in float32: the numerical gradient drowns in rounding.
numeric_float32 = numerical_gradient(lambda: softmax_cross_entropy(logits.astype(np.float32), y)[0], logits)
error_float32 = relative_error(dlogits, numeric_float32)
print(f"relative error of the correct gradient against a float32 loss: {error_float32:.1e}")
assert error_float32 > 100 * HEAD_TOLERANCE

# %% [markdown]
# ## 5. The vacuous-test trap
#
# To check the backward pass of a function with a *vector* output, $y = g(z)$, we need a
# scalar. The tempting choice is $L = \sum_k g(z)_k$ — an all-ones upstream gradient. For
# softmax this is a disaster: $\sum_k \mathrm{softmax}(z)_k = 1$ for every $z$, so its
# gradient is exactly **zero**, and a test built on it cannot fail, whatever the backward
# pass returns.
#
# The right scalar is $L = \sum_k \bar y_k\, g(z)_k$ with a **random** upstream gradient
# $\bar y$; its gradient is the vector–Jacobian product $J^\top \bar y$, which is precisely what
# a backward pass computes. For softmax, with $J = \mathrm{diag}(p) - p p^\top$,
# $$J^\top \bar y = p \odot \big(\bar y - \langle \bar y, p\rangle\big).$$
# (With $\bar y = \mathbf 1$: $\langle \mathbf 1, p\rangle = 1$, so the correct answer is 0 — see?)
#
# Below are three candidate backward passes: the correct one, one that returns zeros, and a
# plausible bug that subtracts the plain mean of $\bar y$ instead of its $p$-weighted mean.

# %%
def softmax_backward(dout, p):
    # Correct vector-Jacobian product: J^T dout with J = diag(p) - p p^T.
    return p * (dout - np.sum(dout * p, axis=-1, keepdims=True))

def zeros_backward(dout, p):
    # A backward pass that forgot to do anything.
    return np.zeros_like(p)

def unweighted_mean_backward(dout, p):
    # A plausible bug: the plain mean of dout instead of its p-weighted mean.
    return p * (dout - np.mean(dout, axis=-1, keepdims=True))

candidates = {"correct": softmax_backward, "returns zeros": zeros_backward,
              "unweighted mean (bug)": unweighted_mean_backward}
z = rng.standard_normal((3, 6))
upstream = {"all ones": np.ones_like(z), "random": rng.standard_normal(z.shape)}

results = {}
print(f"{'backward':<24}{'all-ones: max|a - n|':>22}{'random: relative error':>25}")
for name, backward in candidates.items():
    row = {}
    for kind, dout in upstream.items():
        numeric = numerical_gradient(lambda: np.sum(softmax(z) * dout), z)
        analytic = backward(dout, softmax(z))
        row[kind] = (np.max(np.abs(analytic - numeric)), relative_error(analytic, numeric))
    results[name] = row
    print(f"{name:<24}{row['all ones'][0]:>22.1e}{row['random'][1]:>25.1e}")

# %%
# With the all-ones upstream gradient every candidate "passes" (the true gradient is 0) ...
for name, row in results.items():
    assert row["all ones"][0] < 1e-8, name
# ... while the random upstream gradient separates the correct backward from the bugs.
assert results["correct"]["random"][1] < HEAD_TOLERANCE
assert results["returns zeros"]["random"][1] > 1e-2
assert results["unweighted mean (bug)"]["random"][1] > 1e-2

# %% [markdown]
# The package's own tests never use an all-ones upstream gradient or `softmax(x).sum()`; the
# checker `npsoftmax.gradcheck.check_module_gradients` draws a random upstream gradient for
# you.
#
# ### Takeaways
# * Shift the logits by their maximum before exponentiating: softmax, log-softmax and
#   log-sum-exp are then overflow- and underflow-free.
# * Softmax + cross-entropy has the gradient $(p - \mathrm{onehot}(y))/N$: no Jacobian, no $1/p$.
# * Check gradients in float64 with central differences and a **random** upstream gradient.

# %% [markdown]
# **Next:** [02_fully_connected_backprop.ipynb](02_fully_connected_backprop.ipynb) — a two-layer network, forward and backward by hand.
