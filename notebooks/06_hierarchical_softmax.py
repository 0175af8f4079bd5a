# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Hierarchical softmax
#
# A full softmax over $K$ classes costs $O(DK)$ per example, forward and backward. The
# hierarchical softmax arranges the classes as the **leaves of a tree**; every internal node
# makes a small softmax choice among its children, and a class's probability is the product
# of the choices on its root-to-leaf path:
# $$p(k \mid h) = \prod_{(m,\, j)\ \in\ \mathrm{path}(k)} p(\text{child } j \mid \text{node } m, h),
# \qquad p(\,\cdot \mid m, h) = \mathrm{softmax}(s_m), \quad s_m = W_m h + b_m .$$
# Training needs only the nodes on the target's path: $O(D \log K)$ for a balanced tree.
# This notebook: building trees (balanced, Huffman, CIFAR-100's superclasses) and drawing
# them, path probabilities, the gradient check, why training is $O(\log K)$, exact versus
# greedy decoding, and measured time against $K$.

# %%
import time

import numpy as np
import matplotlib.pyplot as plt
from threadpoolctl import threadpool_limits

from npsoftmax.data import COARSE_NAMES, COARSE_OF_FINE, FINE_NAMES
from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors
from npsoftmax.heads import (HierarchicalSoftmaxHead, SoftmaxHead, Tree, balanced_tree, huffman_tree,
                             log_softmax, logsumexp, tree_from_groups)

rng = np.random.default_rng(0)
# One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
# which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
thread_limits = threadpool_limits(limits=1)
np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. Trees
#
# A `Tree` stores, for every internal node $m$ (the root is node 0), its children in order; a
# child is either another internal node or the leaf of class $k$. Three builders:
#
# * `balanced_tree(K, branching=2)`: classes $0..K-1$ left to right, every split as even as
#   possible, so depths differ by at most one (for any $K$, not only powers of two);
# * `huffman_tree(class_counts)`: the binary Huffman code tree — frequent classes near the
#   root, which minimises the expected number of decisions $\sum_k \mathrm{count}_k\, \mathrm{depth}_k$;
# * `tree_from_groups(groups)`: root → one node per group → its classes (CIFAR-100: 20
#   superclasses × 5 classes).
#
# A small drawing helper (leaves in order along the bottom of their level, internal nodes
# above the middle of their children):

# %%
def draw_tree(tree, axis, title, leaf_names=None, edge_label=None):
    # Draw a small Tree: grey circles are internal nodes, boxes are classes.
    # edge_label(node, position) -> optional text written on the edge to that child.
    positions, next_leaf = {}, [0]

    def place(node, level):
        xs = []
        first, last = tree.child_offsets[node], tree.child_offsets[node + 1]
        for position, child in enumerate(tree.children[first:last]):
            if child < 0:
                key = ("leaf", int(~child))
                positions[key] = (next_leaf[0], -(level + 1))
                next_leaf[0] += 1
            else:
                key = ("node", int(child))
                place(int(child), level + 1)
            xs.append(positions[key][0])
            if edge_label is not None:
                edges.append((node, key, edge_label(node, position)))
            else:
                edges.append((node, key, None))
        positions[("node", node)] = (float(np.mean(xs)), -level)

    edges = []
    place(0, 0)
    for node, key, label in edges:
        (x0, y0), (x1, y1) = positions[("node", node)], positions[key]
        axis.plot([x0, x1], [y0, y1], color="gray", lw=1.2, zorder=1)
        if label:
            axis.text((x0 + x1) / 2, (y0 + y1) / 2, label, fontsize=8, color="tab:red",
                      ha="center", va="center", backgroundcolor="white", zorder=2)
    for (kind, index), (x, y) in positions.items():
        if kind == "node":
            axis.scatter(x, y, s=260, color="lightgray", edgecolor="k", zorder=3)
            axis.text(x, y, str(index), ha="center", va="center", fontsize=8, zorder=4)
        else:
            name = leaf_names[index] if leaf_names is not None else str(index)
            axis.text(x, y, name, ha="center", va="center", fontsize=9, zorder=4,
                      bbox=dict(boxstyle="round", facecolor="lightyellow", edgecolor="k"))
    axis.set_title(title, fontsize=10)
    axis.axis("off")
    axis.margins(0.12)

# %%
K = 7
zipf_counts = 1000 / np.arange(1, K + 1)                   # class 0 is 7x as frequent as class 6
trees = {"balanced_tree(7)": balanced_tree(K), "balanced_tree(7, branching=3)": balanced_tree(K, branching=3),
         "huffman_tree(Zipf counts)": huffman_tree(zipf_counts)}
fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
for axis, (name, tree) in zip(axes, trees.items()):
    draw_tree(tree, axis, name)
plt.show()

for name, tree in trees.items():
    expected_decisions = np.sum(zipf_counts * tree.depth) / zipf_counts.sum()
    print(f"{name:<30} depths {tree.depth}   expected decisions per sample {expected_decisions:.3f}")
assert trees["balanced_tree(7)"].depth.max() - trees["balanced_tree(7)"].depth.min() <= 1
huffman_cost = np.sum(zipf_counts * trees["huffman_tree(Zipf counts)"].depth)
assert huffman_cost <= np.sum(zipf_counts * trees["balanced_tree(7)"].depth)   # Huffman is optimal

# %% [markdown]
# CIFAR-100's 100 classes come in 20 superclasses of 5 (`COARSE_OF_FINE[k]` is the superclass
# of class $k$). The grouped tree has a 20-way root and twenty 5-way nodes: every class is
# two decisions away — *which superclass*, then *which class inside it*.

# %%
cifar_tree = tree_from_groups(COARSE_OF_FINE)
print(cifar_tree)
for group in range(3):
    members = np.flatnonzero(COARSE_OF_FINE == group)
    print(f"  {COARSE_NAMES[group]:<28} -> {', '.join(FINE_NAMES[k] for k in members)}")
assert cifar_tree.n_classes == 100 and cifar_tree.arity[0] == 20 and np.all(cifar_tree.depth == 2)

# %% [markdown]
# ## 2. Path probabilities
#
# **Parameters.** A softmax over $c$ children does not change if the same number is added to
# all $c$ scores, so one score per node can be pinned to 0. `HierarchicalSoftmaxHead` gives
# node $m$ one weight row per child *except the last*, whose score is the constant 0 (for a
# binary node this is exactly a logistic regression, $p(\text{first child}) = \sigma(w^\top h + b)$).
# Rows `row_offsets[m]:row_offsets[m+1]` of `node_W` $(K-1, D)$ belong to node $m$; any tree
# with $K$ leaves needs exactly $K - 1$ rows.
#
# We compute $\log p(k \mid h)$ by walking `tree.path(k)` — a list of (node, child position)
# from the root — and adding the log-softmax of each node's scores, then compare with the
# head's exact `log_prob`. The drawing shows the conditional probabilities on every edge.

# %%
tree = balanced_tree(K)
head = HierarchicalSoftmaxHead(4, K, rng=np.random.default_rng(1), dtype=np.float64, tree=tree)
head.params["node_W"] *= 3.0                     # make the choices less uniform, for the picture
h = rng.standard_normal((1, 4))

def node_log_probs(head, h_row, node):
    rows = np.arange(head.row_offsets[node], head.row_offsets[node + 1])
    scores = np.append(head.params["node_W"][rows] @ h_row + head.params["node_b"][rows], 0.0)  # last child: 0
    return log_softmax(scores)

def path_log_prob(head, h_row, k):
    return sum(node_log_probs(head, h_row, node)[position] for node, position in head.tree.path(k))

by_path = np.array([path_log_prob(head, h[0], k) for k in range(K)])
for k in range(K):
    print(f"class {k}: path {head.tree.path(k)}  p = {np.exp(by_path[k]):.4f}")
np.testing.assert_allclose(by_path, head.log_prob(h)[0], rtol=1e-12)
print("sum of p over the leaves:", np.exp(by_path).sum())

fig, axis = plt.subplots(figsize=(7, 3.4))
draw_tree(tree, axis, "p(child | node, h) on every edge; p(class) = product along its path",
          leaf_names=[f"{k}\np={np.exp(by_path[k]):.2f}" for k in range(K)],
          edge_label=lambda node, position: f"{np.exp(node_log_probs(head, h[0], node)[position]):.2f}")
plt.show()

many_h = rng.standard_normal((50, 4))
np.testing.assert_allclose(logsumexp(head.log_prob(many_h), axis=1), 0.0, atol=1e-12)   # normalised

# %% [markdown]
# ## 3. Gradient check, and why training is O(log K)
#
# The loss for one example is $-\sum_{(m, j) \in \mathrm{path}(y)} \log \mathrm{softmax}(s_m)_j$: a sum
# of small cross-entropies, one per node on the path. Each has notebook 01's gradient,
# $\mathrm{softmax}(s_m) - \mathrm{onehot}(j)$, with respect to that node's scores, and **no other
# node appears in the loss**. We check the head on an 11-class ternary tree and on a Huffman
# tree.

# %%
y = np.array([0, 3, 3, 7, 10, 5])
h = rng.standard_normal((6, 5))
for tree in (balanced_tree(11, branching=3), huffman_tree(np.arange(11, 0, -1))):
    head = HierarchicalSoftmaxHead(5, 11, rng=np.random.default_rng(2), dtype=np.float64, tree=tree)
    head.params["node_b"][...] = rng.standard_normal(10)
    head.forward(h, y)
    analytic = {"h": head.backward(), **{name: grad.copy() for name, grad in head.grads.items()}}
    errors = gradient_errors(lambda: head.forward(h, y),
                             {"h": h, "node_W": head.params["node_W"], "node_b": head.params["node_b"]}, analytic)
    print(tree, {name: f"{error:.1e}" for name, error in errors.items()})
    assert all(error < HEAD_TOLERANCE for error in errors.values())

# %% [markdown]
# Which weight rows did a training step touch? Exactly the rows of the nodes on the targets'
# paths — for a balanced binary tree over 100 classes, at most 7 rows per example out of 99,
# and the rows of nodes shared by several targets only once.

# %%
K = 100
head = HierarchicalSoftmaxHead(8, K, rng=np.random.default_rng(3), dtype=np.float64, tree=balanced_tree(K))
y = np.array([3, 3, 41, 97])
head.forward(rng.standard_normal((4, 8)), y)
head.backward()
touched = np.flatnonzero(np.any(head.grads["node_W"] != 0, axis=1))
on_paths = sorted({row for k in y for node, _ in head.tree.path(k)
                   for row in range(head.row_offsets[node], head.row_offsets[node + 1])})
print(f"rows touched: {touched.size} of {K - 1}: {touched}")
np.testing.assert_array_equal(touched, on_paths)
np.testing.assert_array_equal(head.row_grads["node_W"][0], on_paths)   # the sparse view of the same gradient

# %% [markdown]
# The depth of a balanced binary tree is $\lceil \log_2 K \rceil$: a million classes are 20
# binary decisions away.

# %%
sizes = [10, 100, 1_000, 10_000, 100_000, 1_000_000]
depths = [balanced_tree(size).max_depth for size in sizes]
for size, depth in zip(sizes, depths):
    print(f"K = {size:>9,}: depth {depth:2d} = ceil(log2 K) = {int(np.ceil(np.log2(size)))}")
    assert depth == int(np.ceil(np.log2(size)))

# %% [markdown]
# ## 4. Exact versus greedy decoding
#
# To *predict*, we want $\arg\max_k p(k \mid h)$. The tempting $O(\log K)$ shortcut is to walk
# down from the root, always taking the most probable child ("greedy"). It is **not** exact:
# a likely subtree can contain no single likely class. The smallest example: the root chooses
# between the subtree $\{0, 1\}$ (probability 0.6) and class 2 (0.4), and the subtree splits
# evenly — so $p = (0.3, 0.3, 0.4)$, greedy answers 0 and the truth is 2.
#
# `predict(h)` is therefore exact by default (the argmax of `log_prob`, $O(DK)$);
# `predict(h, method="greedy")` is available, clearly labelled as an approximation.

# %%
tree = Tree.from_nested([[0, 1], 2])                   # root -> (node {0, 1}, class 2)
head = HierarchicalSoftmaxHead(1, 3, rng=np.random.default_rng(0), dtype=np.float64, tree=tree)
head.params["node_W"][...] = [[np.log(1.5)], [0.0]]    # root: p({0,1}) = 1.5/2.5 = 0.6; node 1: 50/50
head.params["node_b"][...] = 0.0
h = np.ones((1, 1))
p = np.exp(head.log_prob(h))[0]
exact, greedy = head.predict(h)[0], head.predict(h, method="greedy")[0]
print("p =", p, "| exact:", exact, "| greedy:", greedy)

fig, axis = plt.subplots(figsize=(4.5, 2.8))
draw_tree(tree, axis, f"greedy picks {greedy}, the most probable class is {exact}",
          leaf_names=[f"{k}\np={p[k]:.1f}" for k in range(3)],
          edge_label=lambda node, position: f"{np.exp(node_log_probs(head, h[0], node)[position]):.1f}")
plt.show()

np.testing.assert_allclose(p, [0.3, 0.3, 0.4], rtol=1e-12)
assert exact == 2 and greedy == 0

# %%
# On a random 100-class head, how often does greedy miss, and by how much probability?
head = HierarchicalSoftmaxHead(8, 100, rng=np.random.default_rng(4), dtype=np.float64)
head.params["node_W"] *= 4.0
h = rng.standard_normal((2000, 8))
log_p = head.log_prob(h)
exact, greedy = head.predict(h), head.predict(h, method="greedy")
rows = np.arange(len(h))
print(f"greedy != exact on {np.mean(greedy != exact):.1%} of the samples")
assert np.all(log_p[rows, exact] >= log_p[rows, greedy])    # exact is never worse ...
assert np.any(greedy != exact)                              # ... and greedy is sometimes wrong

# %% [markdown]
# ## 5. Measured time against K
#
# One training step (forward + backward) of the full softmax head and of the hierarchical
# head (balanced binary tree), batch 128, $D = 64$, float32. The full head's cost grows
# linearly in $K$; the hierarchical head's grows like $\log K$ (plus the bookkeeping of which
# rows were touched). Medians of interleaved runs with one BLAS thread (set at the top) on
# whatever machine runs this notebook; read the slopes.

# %% tags=["varies"]
from npsoftmax.timing import interleaved_medians  # timed interleaved, medians

def training_step(head, h, y):
    return lambda: (head.forward(h, y), head.backward())

N, D = 128, 64
class_counts = [100, 1_000, 10_000, 100_000]
timings = {"softmax": [], "hierarchical": []}
for K in class_counts:
    h = rng.standard_normal((N, D)).astype(np.float32)
    y = rng.integers(0, K, N)
    heads = {"softmax": SoftmaxHead(D, K, rng=np.random.default_rng(5)),
             "hierarchical": HierarchicalSoftmaxHead(D, K, rng=np.random.default_rng(5))}
    seconds = interleaved_medians({name: training_step(head, h, y) for name, head in heads.items()}, repeats=5)
    for name in timings:
        timings[name].append(seconds[name])
    print(f"K = {K:>7,}: softmax {1e3 * seconds['softmax']:8.2f} ms   hierarchical "
          f"{1e3 * seconds['hierarchical']:6.2f} ms   ratio {seconds['softmax'] / seconds['hierarchical']:6.1f}x")

fig, axis = plt.subplots(figsize=(6, 3.6))
for name, values in timings.items():
    axis.loglog(class_counts, 1e3 * np.array(values), "o-", label=name)
axis.set(xlabel="number of classes K", ylabel="ms per training step", title="forward + backward, N = 128, D = 64")
axis.grid(alpha=0.3, which="both"); axis.legend()
plt.show()

# %% [markdown]
# ### Takeaways
# * A class's probability is the product of the softmax choices on its path; one row per
#   free choice gives exactly $K - 1$ weight rows for any tree.
# * Training touches only the path's nodes: $O(D \log K)$ per example for a balanced tree;
#   Huffman trees shorten the paths of frequent classes.
# * Greedy descent is $O(\log K)$ but approximate; the exact argmax needs all leaves.

# %% [markdown]
# **Next:** [07_adaptive_softmax.ipynb](07_adaptive_softmax.ipynb) — adaptive softmax: spend compute where the frequent classes are.
