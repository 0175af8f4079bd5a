# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Adaptive softmax
#
# Real label distributions are rarely uniform. In language modelling, and in many
# classification problems with a long tail, class frequencies follow **Zipf's law**: the
# $r$-th most frequent class has frequency $\propto 1/r$. A handful of classes make up most
# of the data. The adaptive softmax (Grave et al. 2017, the algorithm behind
# `torch.nn.AdaptiveLogSoftmaxWithLoss`) spends its compute accordingly:
#
# * a **head** softmax over the frequent *shortlist* classes plus one entry per tail cluster;
# * **tail clusters** of rarer classes, each reached through its head entry and scored
#   through a *narrower* projection (rarer classes get fewer dimensions).
#
# This notebook: Zipf frequencies and the choice of cutoffs, the structure and exact
# probabilities, the gradient check, a cost model against measured time, and equivalence
# with PyTorch when it is installed.

# %%
import time

import numpy as np
import matplotlib.pyplot as plt
from threadpoolctl import threadpool_limits

from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors
from npsoftmax.heads import AdaptiveSoftmaxHead, SoftmaxHead, log_softmax, logsumexp

rng = np.random.default_rng(0)
# One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
# which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
thread_limits = threadpool_limits(limits=1)
np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. Zipf label frequencies and the cutoffs
#
# With $K = 10{,}000$ classes sorted by frequency (class 0 the most frequent) and
# $p_k \propto 1/(k+1)$, the first 10% of the classes cover about three quarters of the
# examples. The `cutoffs` $[c_0, c_1, \dots]$ split the sorted classes into a shortlist
# $[0, c_0)$ and tail clusters $[c_0, c_1), [c_1, c_2), \dots$; here $[1000, 4000]$.

# %%
K = 10_000
cutoffs = [1_000, 4_000]
zipf = 1.0 / np.arange(1, K + 1)
zipf /= zipf.sum()
labels = rng.choice(K, size=200_000, p=zipf)
observed = np.bincount(labels, minlength=K) / labels.size
coverage = np.cumsum(zipf)

fig, (frequency_axis, coverage_axis) = plt.subplots(1, 2, figsize=(11, 3.6))
ranks = np.arange(1, K + 1)
frequency_axis.loglog(ranks[observed > 0], observed[observed > 0], ".", ms=2, alpha=0.5, label="200,000 sampled labels")
frequency_axis.loglog(ranks, zipf, "k", label="p_k = 1 / (H_K k)")
frequency_axis.set(xlabel="class rank", ylabel="frequency", title="Zipf's law"); frequency_axis.legend()
coverage_axis.plot(ranks, coverage)
bounds = [0, *cutoffs, K]
parts = zip(bounds[:-1], bounds[1:], ["shortlist", "cluster 0", "cluster 1"], ["tab:green", "tab:orange", "tab:red"])
for low, high, name, color in parts:
    share = coverage[high - 1] - (coverage[low - 1] if low else 0.0)
    coverage_axis.axvspan(low, high, alpha=0.15, color=color, label=f"{name}: {high - low:,} classes, {share:.0%} of labels")
coverage_axis.set(xlabel="class rank", ylabel="fraction of labels covered", title="cumulative coverage")
coverage_axis.legend(loc="lower right")
fig.tight_layout()
plt.show()

cluster_mass = np.diff([0.0, coverage[cutoffs[0] - 1], coverage[cutoffs[1] - 1], 1.0])
print("label mass: shortlist {:.3f}, cluster 0 {:.3f}, cluster 1 {:.3f}".format(*cluster_mass))
assert cluster_mass[0] > 0.7                      # 10% of the classes, three quarters of the data

# %% [markdown]
# ## 2. Structure and exact probabilities
#
# With features $h \in \mathbb{R}^D$, cutoffs $c_0 < c_1 < \dots$, $n$ clusters and
# `div_value` $d$:
#
# * head scores $u = h\,W_{\text{head}}$, shape $c_0 + n$ (shortlist classes, then one entry per cluster);
# * cluster $i$ scores $v_i = (h\, P_i)\, O_i$ with $P_i$ of shape $(D,\ D / d^{\,i+1})$ — rarer
#   clusters get narrower projections — and $O_i$ of shape $(D/d^{\,i+1},\ |\text{cluster } i|)$.
#
# $$\log p(k) = \begin{cases} \log\mathrm{softmax}(u)_k & k < c_0 \\
# \log\mathrm{softmax}(u)_{c_0 + i} + \log\mathrm{softmax}(v_i)_{k - \mathrm{lo}_i} & k \in \text{cluster } i \end{cases}$$
#
# Both factors are normalised, so the $K$ probabilities sum to one: the model is an exact
# distribution, not an approximation of one.

# %%
D = 64
head = AdaptiveSoftmaxHead(D, K, rng=np.random.default_rng(1), dtype=np.float64, cutoffs=cutoffs, div_value=4.0)
for name, value in head.params.items():
    print(f"{name:<11} {str(value.shape):<14} {value.size:>9,} weights")
adaptive_weights = sum(value.size for value in head.params.values())
print(f"total {adaptive_weights:,} weights; a full softmax needs {D * K:,} ({D * K / adaptive_weights:.1f}x as many)")
assert head.params["head_W"].shape == (D, cutoffs[0] + 2)
assert head.params["tail0_proj"].shape == (D, D // 4) and head.params["tail1_proj"].shape == (D, D // 16)

# %%
h = rng.standard_normal((3, D))
log_p = head.log_prob(h)
head_log_p = log_softmax(h @ head.params["head_W"])
for k in (7, 2_500, 9_000):                          # a shortlist class, one in each cluster
    if k < cutoffs[0]:
        by_hand = head_log_p[:, k]
    else:
        i = int(np.searchsorted(cutoffs, k, side="right")) - 1
        low = cutoffs[i]
        tail = log_softmax((h @ head.params[f"tail{i}_proj"]) @ head.params[f"tail{i}_out"])
        by_hand = head_log_p[:, cutoffs[0] + i] + tail[:, k - low]
    np.testing.assert_allclose(log_p[:, k], by_hand, rtol=1e-12)
    print(f"class {k:>5}: log p = {log_p[:, k]}")
np.testing.assert_allclose(logsumexp(log_p, axis=1), 0.0, atol=1e-10)     # a normalised distribution
np.testing.assert_array_equal(head.predict(h), np.argmax(log_p, axis=1))    # exact prediction

# %% [markdown]
# `predict` is exact but usually cheap: if a sample's best head entry is a shortlist class $s$,
# every tail class $k$ of cluster $i$ has $\log p(k) \le \log\mathrm{softmax}(u)_{c_0+i} \le \log\mathrm{softmax}(u)_s$
# (a log-probability is $\le 0$), so $s$ wins and no tail needs to be scored.
#
# ## 3. Gradient check
#
# Training evaluates a tail cluster only for the examples whose target falls in it. The
# loss for a target in cluster $i$ is a head cross-entropy (target: the cluster's entry) plus
# a cluster cross-entropy; each has notebook 01's $p - \mathrm{onehot}$ gradient, then the
# chain rule through two matrix products. A small head with every cluster represented in the
# batch, with and without the head bias:

# %%
h = rng.standard_normal((7, 8))
y = np.array([0, 3, 6, 11, 11, 14, 19])                  # shortlist [0, 5), clusters [5, 12) and [12, 20)
for head_bias in (False, True):
    small = AdaptiveSoftmaxHead(8, 20, rng=np.random.default_rng(2), dtype=np.float64, cutoffs=[5, 12],
                                div_value=2.0, head_bias=head_bias)
    small.forward(h, y)
    analytic = {"h": small.backward(), **{name: grad.copy() for name, grad in small.grads.items()}}
    errors = gradient_errors(lambda: small.forward(h, y), {"h": h, **small.params}, analytic)
    print(f"head_bias={head_bias}:", {name: f"{error:.1e}" for name, error in errors.items()})
    assert all(error < HEAD_TOLERANCE for error in errors.values())

# %% [markdown]
# ## 4. Cost model vs measured time
#
# Count the multiply-adds of the projections per example (the backward pass costs about twice
# the forward, for both heads, so the ratio is the same):
#
# * full softmax: $D K$;
# * adaptive, training: $D(c_0 + n) + \sum_i q_i\,\big(D h_i + h_i\, |\text{cluster } i|\big)$,
#   where $q_i$ is the fraction of targets in cluster $i$ and $h_i = D/d^{\,i+1}$ — a cluster
#   costs only for the examples that land in it.
#
# We predict the speed-up of one training step (forward + backward, batch 128, $D = 128$,
# float32, Zipf labels, cutoffs at 10% and 40% of $K$) and measure it. The model ignores
# everything that is not a matrix product — the exponentials of the softmax (which the full
# head pays for all $K$ classes), indexing, Python overhead — so it is only a guide; it gets
# better as $K$ grows.

# %% tags=["varies"]
from npsoftmax.timing import interleaved_medians  # timed interleaved, medians

def predicted_speedup(head, labels):
    D = head.in_features
    bounds = head.cutoffs                       # torch-style: the cutoffs with K appended
    cost = D * head.head_size
    for i, width in enumerate(head.hidden_sizes):
        share = np.mean((labels >= bounds[i]) & (labels < bounds[i + 1]))
        cost += share * (D * width + width * (bounds[i + 1] - bounds[i]))
    return D * head.n_classes / cost

N, D = 128, 128
class_counts = [1_000, 5_000, 20_000, 50_000]
predicted, measured = [], []
for K in class_counts:
    probabilities = 1.0 / np.arange(1, K + 1)
    y = rng.choice(K, size=N, p=probabilities / probabilities.sum())
    h = rng.standard_normal((N, D)).astype(np.float32)
    full = SoftmaxHead(D, K, rng=np.random.default_rng(3))
    adaptive = AdaptiveSoftmaxHead(D, K, rng=np.random.default_rng(3), cutoffs=[K // 10, 2 * K // 5])
    seconds = interleaved_medians({"full": lambda: (full.forward(h, y), full.backward()),
                                   "adaptive": lambda: (adaptive.forward(h, y), adaptive.backward())}, repeats=5)
    predicted.append(predicted_speedup(adaptive, y))
    measured.append(seconds["full"] / seconds["adaptive"])
    print(f"K = {K:>6,}: full {1e3 * seconds['full']:7.2f} ms, adaptive {1e3 * seconds['adaptive']:6.2f} ms"
          f"  speed-up predicted {predicted[-1]:5.1f}x, measured {measured[-1]:5.1f}x")

fig, axis = plt.subplots(figsize=(6, 3.6))
axis.semilogx(class_counts, predicted, "o-", label="cost model (multiply-adds)")
axis.semilogx(class_counts, measured, "s-", label="measured (forward + backward)")
axis.axhline(1, color="gray", ls=":")
axis.set(xlabel="number of classes K", ylabel="speed-up over the full softmax", title="adaptive softmax, Zipf labels")
axis.grid(alpha=0.3, which="both"); axis.legend()
plt.show()
assert all(value > 1 for value in predicted) and np.all(np.diff(predicted) > 0)   # the model's own claim

# %% [markdown]
# ## 5. Equivalence with PyTorch
#
# `AdaptiveSoftmaxHead` follows `torch.nn.AdaptiveLogSoftmaxWithLoss` exactly (same cutoffs,
# `div_value`, `head_bias`, same projection widths). Weights are stored $(D_\text{in}, D_\text{out})$
# here and $(D_\text{out}, D_\text{in})$ in torch, so copying them transposes. With the same weights,
# the loss, the per-example log-probabilities, `log_prob`, `predict` and every gradient must
# agree. This section runs only when PyTorch is installed (`pip install torch==2.13.0`, the
# CPU build).

# %% tags=["varies"]
try:
    import torch
except ImportError:
    torch = None
    print("PyTorch is not installed: skipping the equivalence check.")

if torch is not None:
    torch.set_num_threads(1)
    ours = AdaptiveSoftmaxHead(32, 50, rng=np.random.default_rng(4), dtype=np.float64, cutoffs=[10, 25, 40],
                               div_value=2.0, head_bias=True)
    theirs = torch.nn.AdaptiveLogSoftmaxWithLoss(32, 50, [10, 25, 40], div_value=2.0, head_bias=True).double()
    with torch.no_grad():
        theirs.head.weight.copy_(torch.from_numpy(ours.params["head_W"].T))
        theirs.head.bias.copy_(torch.from_numpy(ours.params["head_b"]))
        for i, (projection, output) in enumerate(theirs.tail):
            projection.weight.copy_(torch.from_numpy(ours.params[f"tail{i}_proj"].T))
            output.weight.copy_(torch.from_numpy(ours.params[f"tail{i}_out"].T))

    h = 2.0 * rng.standard_normal((64, 32))
    y = rng.integers(0, 50, 64)
    features = torch.from_numpy(h.copy()).requires_grad_(True)
    result = theirs(features, torch.from_numpy(y))
    result.loss.backward()
    loss, dh = ours.forward(h, y), ours.backward()

    torch_grads = {"head_W": theirs.head.weight.grad.T, "head_b": theirs.head.bias.grad}
    for i, (projection, output) in enumerate(theirs.tail):
        torch_grads[f"tail{i}_proj"], torch_grads[f"tail{i}_out"] = projection.weight.grad.T, output.weight.grad.T
    with torch.no_grad():
        comparisons = {
            "loss": (loss, result.loss.item()),
            "output (log p(y))": (ours.last_output, result.output.numpy()),
            "log_prob": (ours.log_prob(h), theirs.log_prob(torch.from_numpy(h)).numpy()),
            "dh": (dh, features.grad.numpy()),
            **{f"grad {name}": (ours.grads[name], grad.numpy()) for name, grad in torch_grads.items()},
        }
        predictions_agree = np.array_equal(ours.predict(h), theirs.predict(torch.from_numpy(h)).numpy())
    for name, (mine, reference) in comparisons.items():
        difference = np.max(np.abs(np.asarray(mine) - np.asarray(reference)))
        print(f"{name:<18} max |npsoftmax - torch| = {difference:.1e}")
        np.testing.assert_allclose(mine, reference, rtol=1e-10, atol=1e-12)
    print("predict agrees:", predictions_agree)
    assert predictions_agree

# %% [markdown]
# ### Takeaways
# * Under Zipf's law a small shortlist covers most examples; the head softmax handles them,
#   and the rare classes pay for their clusters only when they occur.
# * The adaptive softmax is an exact, normalised distribution with an exact `predict`.
# * Count multiply-adds to predict its speed-up; it pays off from a few thousand classes.

# %% [markdown]
# **Next:** [08_train_and_compare.ipynb](08_train_and_compare.ipynb) — train the CNN with each of the four heads and compare them.
