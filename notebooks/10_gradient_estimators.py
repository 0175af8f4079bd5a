# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 10 · Gradient estimators: how far from the full softmax?
#
# Three of the heads train with an objective that is *not* the full softmax cross-entropy,
# usually to save time or to back-propagate through a sample. This notebook holds one batch and
# one network fixed and puts the exact gradient of the full softmax loss next to the gradient
# each of the other objectives gives:
#
# * **sampled softmax** — a *random* gradient: how biased, and how noisy, as a function of the
#   number of sampled classes, with and without the log-Q correction;
# * **Gumbel-softmax** — a random gradient too (fresh noise every step): its mean and spread as a
#   function of the temperature $\tau$;
# * **hierarchical softmax** — a deterministic gradient that is exact, but for a *different
#   distribution*: where the two differ, and when they agree.
#
# For a random gradient $\hat g$ of the exact $g$ the language is that of any estimator:
# $$\underbrace{\mathbb E\,\|\hat g - g\|^2}_{\text{mean squared error}}
#   = \underbrace{\|\mathbb E \hat g - g\|^2}_{\text{bias}^2}
#   + \underbrace{\mathbb E\,\|\hat g - \mathbb E \hat g\|^2}_{\text{variance}} .$$
# Bias is what no amount of averaging (more steps, larger batches) removes; variance is what
# averaging does remove. Every curve below comes from repeated, seeded draws, and every trend
# the text claims is `assert`ed.

# %%
import numpy as np
import matplotlib.pyplot as plt
from threadpoolctl import threadpool_limits

from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors
from npsoftmax.heads import (GumbelSoftmaxHead, HierarchicalSoftmaxHead, SampledSoftmaxHead, SoftmaxHead,
                             balanced_tree, softmax)

# One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
# which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
thread_limits = threadpool_limits(limits=1)
np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. The fixed network and the exact gradient
#
# One batch of $N = 64$ feature vectors $h_i \in \mathbb R^{16}$ (Gaussian: the body's output is
# fixed, only the head's objective changes) and $K = 1000$ classes whose labels follow Zipf's law
# (class $k$ has frequency $\propto 1/(k+1)$, as in notebook 07). The head's weights are random and
# its biases are the log class frequencies — what a trained network learns first, the prior.
#
# For the full softmax, $z_{ik} = w_k \cdot h_i + b_k$ and $L = -\frac1N\sum_i \log p_i(y_i)$ with
# $p_i = \mathrm{softmax}(z_i)$. With notebook 01's $\partial L/\partial z_{ik} = (p_{ik} - [k = y_i])/N$,
# the gradient with respect to the features is
# $$g_i = \frac{\partial L}{\partial h_i} = \frac1N\Big(\underbrace{\textstyle\sum_k p_{ik}\, w_k}_{\text{push down: } \mathbb E_{k \sim p_i}[w_k]} - \underbrace{w_{y_i}}_{\text{pull up}}\Big) .$$
# The pull-up term costs $O(D)$; the push-down term is an expectation over **all** $K$ classes,
# $O(DK)$ — that is what the cheaper objectives approximate. We compare gradients with respect to
# $h$ (the signal the body receives; $N \times D = 1024$ numbers) because all heads have one,
# whatever their parameters.

# %%
N, D, K = 64, 16, 1000
data_rng = np.random.default_rng(0)
zipf = 1.0 / np.arange(1, K + 1)
zipf /= zipf.sum()
h = data_rng.standard_normal((N, D))
y = data_rng.choice(K, size=N, p=zipf)

full = SoftmaxHead(D, K, rng=np.random.default_rng(1), dtype=np.float64)
full.params["W"] *= 2.0                       # logits w.h of order 1 ...
full.params["b"][...] = np.log(zipf)          # ... on top of the learned prior


def exact_gradient(head):
    """d loss / d h (N, D) of the head's exact objective: forward and backward in eval mode."""
    head.eval()
    head.forward(h, y)
    gradient = head.backward()
    head.train()
    return gradient


exact = exact_gradient(full)
check = gradient_errors(lambda: full.forward(h, y), {"h": h}, {"h": exact})
print(f"exact gradient: norm {np.linalg.norm(exact):.4f}, gradient check on h: {check['h']:.1e}")
assert check["h"] < HEAD_TOLERANCE

probabilities = softmax(h @ full.params["W"] + full.params["b"])
push_down = probabilities @ full.params["W"].T          # E_{k ~ p_i}[w_k], (N, D)
np.testing.assert_allclose(exact, (push_down - full.params["W"].T[y]) / N, atol=1e-14)

# %% [markdown]
# Two helpers measure any head's training gradient against this one: `draw_gradients` runs
# `forward`/`backward` in training mode `n_draws` times (a fresh sample of classes, or of noise,
# each time, from the head's seeded generator), and `compare` summarises the draws, all relative
# to $\|g\|$:
#
# * cosine similarity of each draw with $g$ (direction only);
# * relative **bias** $\|\bar g - g\| / \|g\|$ with $\bar g$ the mean of the $R$ draws. The mean of
#   $R$ draws still carries variance$/R$, so we subtract that estimate:
#   $\widehat{\text{bias}}^2 = \|\bar g - g\|^2 - \widehat{\text{var}}/R$ (clipped at 0);
# * relative **standard deviation** $\sqrt{\widehat{\text{var}}}/\|g\|$ with
#   $\widehat{\text{var}} = \frac1{R-1}\sum_r \|\hat g_r - \bar g\|^2$.
#
# A bias well below the *resolution* $\sqrt{\widehat{\text{var}}/R}/\|g\|$ (the noise left in the mean of
# $R$ draws) cannot be measured with $R$ draws; the plots show that floor, draw a bias only where
# it is above it, and the assertions only claim trends above it.

# %%
def draw_gradients(head, n_draws):
    """(n_draws, N, D): d loss / d h of n_draws training-mode forward/backward passes."""
    head.train()
    return np.stack([(head.forward(h, y), head.backward())[1] for _ in range(n_draws)])


def compare(draws, reference=exact):
    """Cosine of each draw with the reference, and the relative bias and standard deviation."""
    flat, target = draws.reshape(len(draws), -1), reference.ravel()
    scale = np.linalg.norm(target)
    mean = flat.mean(axis=0)
    variance = np.sum((flat - mean) ** 2) / (len(flat) - 1)
    bias_squared = max(np.sum((mean - target) ** 2) - variance / len(flat), 0.0)
    return {"cosine": flat @ target / (np.linalg.norm(flat, axis=1) * scale),
            "cosine_of_mean": mean @ target / (np.linalg.norm(mean) * scale),
            "bias": np.sqrt(bias_squared) / scale, "std": np.sqrt(variance) / scale,
            "resolution": np.sqrt(variance / len(flat)) / scale,
            "norm_ratio": np.linalg.norm(mean) / scale}


# %% [markdown]
# ## 2. Sampled softmax: bias and variance against the number of samples
#
# `SampledSoftmaxHead` draws, once per batch, $n$ distinct classes $S = \{s_1..s_n\}$ from a
# proposal $Q$ (here log-uniform, i.e. Zipf-like, for classes sorted by frequency) and computes a
# softmax over the target plus the samples only, with logits
# $$o_{i,c} = z_{ic} - \log E_c, \qquad c \in \{y_i\} \cup S, \qquad E_c = 1 - (1 - Q(c))^{T},$$
# where $E_c$ is the expected number of times $c$ appears among the $T$ draws it took to collect $n$
# distinct classes (for $n \ll K$, $E_c \approx T\,Q(c)$). Exactly as for the full softmax, its gradient is
# $$\hat g_i = \frac1N\Big(\sum_{c} q_{ic}\, w_c - w_{y_i}\Big), \qquad q_i = \mathrm{softmax}(o_i):$$
# the pull-up term is exact; the push-down expectation over $K$ classes is replaced by a weighted
# average over $1 + n$ candidates.
#
# **Why subtract $\log E_c$ (the log-Q correction).** Write the push-down term as a ratio of two sums
# over all classes, $\mathbb E_p[w] = \sum_k e^{z_k} w_k \,/\, \sum_k e^{z_k}$, and estimate both sums by
# importance sampling. $E_c$ is the probability that class $c$ is among the candidates, so
# weighting every candidate by $1/E_c$ makes a sum over the candidates an unbiased estimate of the
# sum over all classes (Horvitz–Thompson): $\sum_k e^{z_k} w_k \approx \sum_{s \in S} \frac{e^{z_s}}{E_s} w_s$,
# and the same for the denominator. Dividing by $E_s$ is subtracting $\log E_s$ in the exponent. The ratio of two unbiased estimates is
# *not* unbiased, but its bias falls like $1/n$ (self-normalised importance sampling); the variance
# falls too. **Without** the correction, the candidates are weighted by $e^{z_s}$ alone, and since
# frequent classes are sampled more often, the estimate averages over (a normalised) $p_k E_k$,
# roughly $p_k Q(k)$, instead of $p_k$: it pushes frequent classes down too hard, and that bias
# only disappears when the sample holds nearly every class ($E_k \to 1$).
#
# We draw $R = 200$ samples at each $n$, with a fresh head per setting whose weights are the fixed
# network's (the sampled head stores them transposed, `class_W` $(K, D)$), seeded generators, and
# the correction switched on and off.

# %%
def sampled_head(n_samples, subtract_log_q, seed=2):
    head = SampledSoftmaxHead(D, K, rng=np.random.default_rng(seed), dtype=np.float64, n_samples=n_samples,
                              sampler="log_uniform", subtract_log_q=subtract_log_q)
    head.params["class_W"][...] = full.params["W"].T
    head.params["class_b"][...] = full.params["b"]
    return head


# Its eval mode is the exact full softmax: the same gradient as the reference.
np.testing.assert_allclose(exact_gradient(sampled_head(10, True)), exact, rtol=1e-10, atol=1e-15)

sample_sizes = np.array([5, 10, 20, 50, 100, 200, 500])
n_draws = 200
sampled = {correction: [compare(draw_gradients(sampled_head(n, correction), n_draws)) for n in sample_sizes]
           for correction in (True, False)}
print(" n   | with log-Q: cosine   bias    std  | without: cosine   bias    std")
for index, n in enumerate(sample_sizes):
    row = [sampled[correction][index] for correction in (True, False)]
    print(f"{n:4d} |" + " |".join(f"        {s['cosine'].mean():.3f}  {s['bias']:.3f}  {s['std']:.3f}" for s in row))

# %%
fig, (cosine_axis, error_axis) = plt.subplots(1, 2, figsize=(12, 3.8))
for correction, color in ((True, "tab:blue"), (False, "tab:red")):
    label = "with log-Q" if correction else "without log-Q"
    stats = sampled[correction]
    cosine_mean = np.array([s["cosine"].mean() for s in stats])
    cosine_std = np.array([s["cosine"].std() for s in stats])
    cosine_axis.semilogx(sample_sizes, cosine_mean, "o-", color=color, label=label)
    cosine_axis.fill_between(sample_sizes, cosine_mean - cosine_std, cosine_mean + cosine_std, color=color, alpha=0.15)
    measured = np.array([s["bias"] if s["bias"] > s["resolution"] else np.nan for s in stats])  # resolved only
    error_axis.loglog(sample_sizes, measured, "o-", color=color, label=f"bias, {label}")
    error_axis.loglog(sample_sizes, [s["std"] for s in stats], "s--", color=color, label=f"std, {label}")
error_axis.loglog(sample_sizes, [s["resolution"] for s in sampled[True]], ":", color="tab:blue",
                  label=f"resolution of {n_draws} draws, with log-Q")
error_axis.loglog(sample_sizes, 1.0 / sample_sizes, ":", color="gray", label="1 / n")
cosine_axis.set(xlabel="sampled classes n (of K = 1000)", ylabel="cosine with exact gradient",
                title=f"direction: mean ± std over {n_draws} draws")
error_axis.set(xlabel="sampled classes n (of K = 1000)", ylabel="relative to ||g||",
               title="bias and standard deviation")
for axis in (cosine_axis, error_axis):
    axis.grid(alpha=0.3, which="both"); axis.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# What the figure shows, checked below:
#
# * **With** the correction, the bias falls steadily with $n$ (roughly like $1/n$, until it drops
#   below what 200 draws resolve) and so does the standard deviation: the gradient converges to
#   the exact one. At every $n$ the error is mostly variance.
# * **Without** it, the bias is larger at every $n$ — more than ten times larger from $n = 50$ on —
#   and falls much more slowly; at large $n$ it dominates the error. From $n = 50$ on the
#   standard deviation is *smaller* than with the correction: dividing by small $E_c$ gives rare
#   sampled classes large weights, which is noisy — importance sampling's trade of variance for
#   bias.
# * With all $K$ classes as candidates both objectives are the full softmax (up to
#   $E_c \approx 1$), and both gradients are exact.

# %%
bias = {correction: np.array([s["bias"] for s in sampled[correction]]) for correction in (True, False)}
spread = {correction: np.array([s["std"] for s in sampled[correction]]) for correction in (True, False)}
cosine = {correction: np.array([s["cosine"].mean() for s in sampled[correction]]) for correction in (True, False)}
for correction in (True, False):
    assert np.all(np.diff(spread[correction]) < 0), correction          # variance falls with n
    assert np.all(np.diff(cosine[correction]) > 0), correction          # the direction improves with n
resolved = sample_sizes <= 100
assert np.all(np.diff(bias[True][resolved]) < 0)                        # bias falls with n ...
assert np.all(bias[True][~resolved] < 0.01)                             # ... below 1% of ||g|| from n = 200
assert bias[True][-1] < bias[True][0] / 20
assert np.all(bias[True] < spread[True])                                # with log-Q the error is mostly variance
assert np.all(bias[False] > 1.5 * bias[True])                           # no correction: more bias everywhere,
assert np.all(bias[False][sample_sizes >= 50] > 10 * bias[True][sample_sizes >= 50])   # ... far more at large n,
assert bias[False][-1] > 2 * spread[False][-1]                          # ... where it dominates the error,
assert np.all(spread[False][sample_sizes >= 50] < spread[True][sample_sizes >= 50])    # but with less variance

everything = {correction: compare(draw_gradients(sampled_head(K, correction), 5)) for correction in (True, False)}
for correction, stats in everything.items():
    print(f"n = K = {K}, {'with' if correction else 'without'} log-Q: bias {stats['bias']:.1e}, std {stats['std']:.1e}")
    assert stats["bias"] < 1e-2 and stats["std"] < 1e-2

# %% [markdown]
# ## 3. Gumbel-softmax: mean and spread against the temperature
#
# `GumbelSoftmaxHead` trains with $L_\tau = -\frac1N\sum_i \log \mathrm{softmax}\big((z_i + g_i)/\tau\big)_{y_i}$ and
# fresh Gumbel noise $g$ every step (notebook 05). With $r_i = \mathrm{softmax}((z_i + g_i)/\tau)$ its
# gradient is
# $$\hat g_i = \frac{1}{N\tau}\Big(\sum_k r_{ik}\, w_k - w_{y_i}\Big) .$$
# Compare with $g_i$: the push-down weights are a **random, tempered** $r_i$ instead of $p_i$, and
# everything is scaled by $1/\tau$. Its mean is
# $\mathbb E\,\hat g_i = \frac1{N\tau}\big(\sum_k \bar r_{ik} w_k - w_{y_i}\big)$ with $\bar r_i = \mathbb E_g[r_i]$. Two limits:
#
# * $\tau \to 0$: $r_i$ becomes the one-hot vector of $\arg\max_k(z_{ik} + g_{ik})$ — by the
#   Gumbel-max trick an exact sample of $p_i$ — so $\bar r_i \to p_i$ and $\tau \hat g$ is an
#   **unbiased** estimate of $g$. But a single draw pushes down one random class with full weight
#   (or, when the sample hits the target, nothing): the spread of $\tau \hat g$ grows, and that of
#   $\hat g$ itself grows like $1/\tau$ on top.
# * $\tau \to \infty$: $r_i$ flattens towards uniform whatever the noise: the spread vanishes, but
#   $\tau \hat g \to \frac1N(\frac1K \sum_k w_k - w_{y_i})$, which ignores the model's probabilities:
#   **biased**.
#
# The factor $1/\tau$ is a known, deterministic scale that the learning rate absorbs (and, when
# $\tau$ is annealed, a schedule), so we measure the bias and spread of $\tau\hat g$, and report the
# scale $\|\mathbb E\hat g\|/\|g\|$ separately. The noise-free gradient $g$ is the Gumbel head's own
# eval-mode gradient ($\log p = $ `log_softmax(z)`: no noise, no temperature).

# %%
def gumbel_head(tau, seed=3):
    head = GumbelSoftmaxHead(D, K, rng=np.random.default_rng(seed), dtype=np.float64, tau=tau)
    head.params["W"][...] = full.params["W"]
    head.params["b"][...] = full.params["b"]
    return head


np.testing.assert_allclose(exact_gradient(gumbel_head(0.5)), exact, rtol=1e-12)   # noise-free = softmax

temperatures = np.array([0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0])
gumbel = [compare(tau * draw_gradients(gumbel_head(tau), n_draws)) for tau in temperatures]
print("  tau  | cosine  cosine of mean  bias(tau g)  std(tau g)  |E g| / |g|")
for tau, s in zip(temperatures, gumbel):
    print(f"{tau:6.1f} | {s['cosine'].mean():.3f}       {s['cosine_of_mean']:.4f}        {s['bias']:.3f}       "
          f"{s['std']:.3f}     {s['norm_ratio'] / tau:.3f}")

# %%
gumbel_bias = np.array([s["bias"] for s in gumbel])
gumbel_spread = np.array([s["std"] for s in gumbel])
gumbel_cosine = np.array([s["cosine"].mean() for s in gumbel])
gumbel_cosine_std = np.array([s["cosine"].std() for s in gumbel])
mean_cosine = np.array([s["cosine_of_mean"] for s in gumbel])
scale = np.array([s["norm_ratio"] for s in gumbel]) / temperatures

fig, (cosine_axis, error_axis, scale_axis) = plt.subplots(1, 3, figsize=(15, 3.8))
cosine_axis.semilogx(temperatures, gumbel_cosine, "o-", label="each draw (mean ± std)")
cosine_axis.fill_between(temperatures, gumbel_cosine - gumbel_cosine_std, gumbel_cosine + gumbel_cosine_std, alpha=0.15)
cosine_axis.semilogx(temperatures, mean_cosine, "s-", label=f"mean of {n_draws} draws")
cosine_axis.set(xlabel="temperature tau", ylabel="cosine with noise-free gradient", title="direction")
resolution = np.array([s["resolution"] for s in gumbel])
error_axis.loglog(temperatures, np.where(gumbel_bias > resolution, gumbel_bias, np.nan), "o-", label="bias of tau * g_hat")
error_axis.loglog(temperatures, gumbel_spread, "s--", label="std of tau * g_hat")
error_axis.loglog(temperatures, np.sqrt(gumbel_bias ** 2 + gumbel_spread ** 2), "-", color="gray", alpha=0.6,
                  label="root mean squared error")
error_axis.loglog(temperatures, resolution, ":", color="tab:blue", label=f"resolution of {n_draws} draws")
error_axis.set(xlabel="temperature tau", ylabel="relative to ||g||", title="low tau: unbiased but noisy")
scale_axis.loglog(temperatures, scale, "o-", label="||E g_hat|| / ||g||")
scale_axis.loglog(temperatures, 1 / temperatures, ":", color="gray", label="1 / tau")
scale_axis.set(xlabel="temperature tau", title="the 1/tau scale of the raw gradient")
for axis in (cosine_axis, error_axis, scale_axis):
    axis.grid(alpha=0.3, which="both"); axis.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The measured trade-off, checked below: as $\tau$ falls, the bias of $\tau\hat g$ falls (the mean
# gradient's direction approaches the exact one, cosine → 1) while its spread grows, so a *single*
# draw's cosine with $g$ gets worse; the mean squared error is smallest at an intermediate $\tau$.
# Over the whole range the raw gradient's mean scales like $1/\tau$ (right): annealing $\tau$
# without lowering the learning rate makes the steps larger.

# %%
assert np.all(np.diff(gumbel_spread) < 0)                   # spread grows as tau falls
assert np.all(np.diff(gumbel_bias[temperatures >= 1.0]) > 0)   # bias falls as tau falls ...
assert gumbel_bias[0] < 0.1 and gumbel_bias[-1] > 0.2        # ... to below the resolution at tau = 0.1
assert mean_cosine[0] > 0.99 > mean_cosine[-1]
mse = gumbel_bias ** 2 + gumbel_spread ** 2
assert 0 < np.argmin(mse) < len(temperatures) - 1            # the best tau is in between
assert gumbel_cosine[0] < gumbel_cosine[temperatures == 1.0][0]  # a single low-tau draw is noisier
np.testing.assert_allclose(scale[0] * temperatures[0], 1.0, atol=0.05)   # E g_hat ~ g / tau at low tau

# %% [markdown]
# ## 4. Hierarchical softmax: exact, but for another distribution
#
# The hierarchical head's gradient is not an estimate of anything: it is deterministic and exact
# (notebook 06 checks it numerically) — for its own objective, the negative log-likelihood of a
# *different* distribution. To compare it with the softmax we need the two models to share their
# parameters, and the tree suggests how. Every edge $e$ of the tree has a score
# $s_e = v_e \cdot h + c_e$ (a node's last child has score 0), and the tree assigns class $k$ the
# **same unnormalised score** a softmax would use,
# $$z_k = \sum_{e \in \mathrm{path}(k)} s_e = u_k \cdot h + a_k, \qquad u_k = \sum_{e \in \mathrm{path}(k)} v_e,
# \quad a_k = \sum_{e \in \mathrm{path}(k)} c_e ,$$
# a linear function of $h$: a softmax head with weights $u_k$ and biases $a_k$. The two differ only
# in **where they normalise**:
# $$\log p_{\mathrm{flat}}(k) = z_k - \log \sum_{j=1}^K e^{z_j}, \qquad
#   \log p_{\mathrm{tree}}(k) = z_k - \sum_{m \in \mathrm{path}(k)} \log Z_m, \quad Z_m = \sum_{c \in \mathrm{children}(m)} e^{s_{m,c}} .$$
# Once, over all classes; or at every node on the way, over its children. Differentiating:
# $$-\nabla_h \log p_{\mathrm{flat}}(y) = \mathbb E_{k \sim p_{\mathrm{flat}}}[u_k] - u_y, \qquad
#   -\nabla_h \log p_{\mathrm{tree}}(y) = \sum_{m \in \mathrm{path}(y)} \mathbb E_{c \sim \mathrm{softmax}(s_m)}[v_{m,c}] - u_y .$$
# The pull-up term $u_y$ is **identical**. The push-down term differs: the softmax pushes down every
# class in proportion to its probability; the tree pushes down, at each node on the target's path,
# the siblings of the chosen child — $O(\log K)$ work, and a different vector. With one node (a tree of
# depth 1, all $K$ classes children of the root) the two are the same model.
#
# Below: `path_matrix` builds $P_{k,r} = 1$ when the edge of weight row $r$ lies on class $k$'s path
# (the head stores one row per edge except each node's last child, in node and child order), so
# $U = P\, V$ and $a = P\, c$.

# %%
def path_matrix(tree):
    """(K, K - 1) 0/1 matrix: entry (k, r) is 1 when weight row r's edge is on the path to class k."""
    free_edge = tree.edge_position < tree.arity[tree.edge_node] - 1     # edges that own a weight row
    row_of_edge = np.cumsum(free_edge) - 1
    paths = np.zeros((tree.n_classes, int(free_edge.sum())))
    for k in range(tree.n_classes):
        edge, node = tree.leaf_edge[k], tree.leaf_parent[k]
        while edge >= 0:                                  # climb to the root (its node_edge is -1)
            if free_edge[edge]:
                paths[k, row_of_edge[edge]] = 1
            edge, node = tree.node_edge[node], tree.node_parent[node]
    return paths


def matched_pair(branching, seed=4):
    """A hierarchical head on a balanced tree, and the softmax head with the same path scores."""
    tree_head = HierarchicalSoftmaxHead(D, K, rng=np.random.default_rng(seed), dtype=np.float64,
                                        tree=balanced_tree(K, branching))
    tree_head.params["node_W"] *= 2.0
    tree_head.params["node_b"][...] = np.random.default_rng(seed + 1).normal(0, 0.5, K - 1)
    paths = path_matrix(tree_head.tree)
    flat_head = SoftmaxHead(D, K, rng=np.random.default_rng(seed), dtype=np.float64)
    flat_head.params["W"][...] = (paths @ tree_head.params["node_W"]).T       # u_k = sum of the path's v_e
    flat_head.params["b"][...] = paths @ tree_head.params["node_b"]
    return tree_head, flat_head, paths


tree_head, flat_head, paths = matched_pair(branching=2)
print(tree_head.tree)
tree_gradient, flat_gradient = exact_gradient(tree_head), exact_gradient(flat_head)
tree_check = gradient_errors(lambda: tree_head.forward(h, y), {"h": h}, {"h": tree_gradient})["h"]
print(f"tree head's own gradient check on h: {tree_check:.1e}")
assert tree_check < HEAD_TOLERANCE

# The decomposition, term by term: the same pull-up u_y; push-down over all classes vs along the path.
U, V = flat_head.params["W"].T, tree_head.params["node_W"]
flat_push = np.exp(flat_head.log_prob(h)) @ U
tree_push = np.zeros((N, D))
edge_scores = h @ V.T + tree_head.params["node_b"]               # (N, K - 1): score of every edge with a row
row_offsets = tree_head.row_offsets
for i in range(N):
    for node, _ in tree_head.tree.path(y[i]):
        rows = np.arange(row_offsets[node], row_offsets[node + 1])      # the node's children but the last
        local = softmax(np.append(edge_scores[i, rows], 0.0))           # the last child scores 0
        tree_push[i] = tree_push[i] + local[:-1] @ V[rows]              # ... and has no vector
np.testing.assert_allclose(flat_gradient, (flat_push - U[y]) / N, atol=1e-14)
np.testing.assert_allclose(tree_gradient, (tree_push - U[y]) / N, atol=1e-14)

# %% [markdown]
# Both formulas reproduce the heads' gradients exactly. For one sample, the two distributions over
# the 1000 classes (sorted by the softmax's probabilities) and the two gradients:

# %%
sample = 0
flat_p, tree_p = np.exp(flat_head.log_prob(h[sample:sample + 1])[0]), np.exp(tree_head.log_prob(h[sample:sample + 1])[0])
order = np.argsort(-flat_p)[:40]
fig, (distribution_axis, gradient_axis) = plt.subplots(1, 2, figsize=(13, 3.6))
distribution_axis.bar(np.arange(40) - 0.2, flat_p[order], width=0.4, label="softmax over z (flat)")
distribution_axis.bar(np.arange(40) + 0.2, tree_p[order], width=0.4, label="binary tree over the same z")
distribution_axis.set(xlabel="the 40 classes most probable under the flat softmax", ylabel="probability",
                      title="same scores z_k, normalised once vs at every node")
distribution_axis.legend()
gradient_axis.bar(np.arange(D) - 0.2, N * flat_gradient[sample], width=0.4, label="flat softmax")
gradient_axis.bar(np.arange(D) + 0.2, N * tree_gradient[sample], width=0.4, label="tree")
gradient_axis.set(xlabel="feature dimension", ylabel="N * dL/dh", title=f"gradient for sample {sample} (label {y[sample]})")
gradient_axis.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# How different, as the tree gets deeper? Balanced trees over the same 1000 classes with branching
# 1000 (one node: the softmax itself), 32, 10, 4 and 2, each with its matched softmax. We measure the
# cosine between the two gradients and the total-variation distance
# $\frac12\sum_k |p_{\mathrm{flat}}(k) - p_{\mathrm{tree}}(k)|$ between the two distributions, averaged
# over the batch. There is no sample size or temperature to turn here: the difference is a property
# of the model family, not noise.

# %%
branchings = [K, 32, 10, 4, 2]
depths, tree_cosines, distances = [], [], []
for branching in branchings:
    tree_head, flat_head, _ = matched_pair(branching)
    tree_gradient, flat_gradient = exact_gradient(tree_head).ravel(), exact_gradient(flat_head).ravel()
    distance = 0.5 * np.abs(np.exp(tree_head.log_prob(h)) - np.exp(flat_head.log_prob(h))).sum(axis=1).mean()
    depths.append(tree_head.tree.max_depth)
    tree_cosines.append(tree_gradient @ flat_gradient / (np.linalg.norm(tree_gradient) * np.linalg.norm(flat_gradient)))
    distances.append(distance)
    print(f"branching {branching:4d} (depth {depths[-1]:2d}): cosine of gradients {tree_cosines[-1]:.4f}, "
          f"total variation {distance:.3f}")

fig, axis = plt.subplots(figsize=(6, 3.4))
axis.plot(depths, tree_cosines, "o-", label="cosine(tree gradient, flat gradient)")
axis.plot(depths, distances, "s-", label="total variation between the distributions")
axis.set(xlabel="tree depth (balanced tree over K = 1000)", title="matched parameters, different normalisation")
axis.grid(alpha=0.3); axis.legend(fontsize=8)
plt.show()

# %%
assert depths[0] == 1 and abs(tree_cosines[0] - 1) < 1e-12 and distances[0] < 1e-12   # one node: the softmax
assert all(cosine < 0.99 for cosine in tree_cosines[1:])                             # any real tree differs
assert tree_cosines[-1] < 0.9 and distances[-1] > 0.3                                # the binary tree, a lot

# %% [markdown]
# ## Summary
#
# | objective | gradient w.r.t. $h$ | bias vs the full softmax | variance | knob |
# |---|---|---|---|---|
# | full softmax | $\frac1N(\mathbb E_{p}[w] - w_y)$ | — | 0 | — |
# | sampled softmax, log-Q | push-down over $1 + n$ importance-weighted candidates | falls like $1/n$ | falls with $n$ | $n$ |
# | sampled softmax, no correction | candidates weighted by $e^{z}$ only | large, falls slowly | lower from $n \approx 50$ on | $n$, $Q$ |
# | Gumbel-softmax | $\frac1{N\tau}(\mathbb E_{r}[w] - w_y)$, random tempered $r$ | of $\tau\hat g$: → 0 as $\tau \to 0$ | of $\tau\hat g$: grows as $\tau \to 0$ | $\tau$ |
# | hierarchical | pull-up the same; push-down along the target's path | a different model: no knob removes it | 0 | the tree |
#
# The first two are estimators of the softmax gradient; the hierarchical head is an exact gradient of a
# different distribution — which is why notebook 08 compares heads by their *test* likelihood and
# accuracy, not by how close their training loss is to the softmax's.

# %% [markdown]
# **Next:** [11_cifar100_results.ipynb](11_cifar100_results.ipynb) — the five heads trained on the real
# CIFAR-100: their committed results, calibration, how severe their mistakes are, and their test images.
