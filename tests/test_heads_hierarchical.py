"""HierarchicalSoftmaxHead: exact log-probs against a per-class oracle, sparse training, decoding."""

import numpy as np
import pytest
from scipy import special

import npsoftmax.heads.hierarchical as hierarchical_module
from npsoftmax.data.cifar100_classes import COARSE_OF_FINE
from npsoftmax.heads import HierarchicalSoftmaxHead, Tree, balanced_tree, huffman_tree, tree_from_groups


def oracle_log_prob(head, h):
    """Class by class, node by node, straight from the definition (slow, obviously right)."""
    W, b = head.params["node_W"], head.params["node_b"]
    out = np.zeros((h.shape[0], head.n_classes))
    for k in range(head.n_classes):
        for node, position in head.tree.path(k):
            rows = np.arange(head.row_offsets[node], head.row_offsets[node + 1])
            scores = np.concatenate([h @ W[rows].T + b[rows], np.zeros((h.shape[0], 1))], axis=1)
            out[:, k] += special.log_softmax(scores, axis=1)[:, position]
    return out


TREES = {
    "balanced-100": lambda: balanced_tree(100),
    "ternary-100": lambda: balanced_tree(100, 3),
    "cifar100": lambda: tree_from_groups(COARSE_OF_FINE),
    "huffman": lambda: huffman_tree(np.random.default_rng(0).integers(1, 100, 30)),
    "nested": lambda: Tree.from_nested([[0, 1, [2, 3, 4, 5]], 6, [7, [8, 9]]]),
}


@pytest.mark.parametrize("name", list(TREES))
def test_log_prob_matches_the_per_class_oracle(name):
    rng = np.random.default_rng(1)
    tree = TREES[name]()
    head = HierarchicalSoftmaxHead(5, tree.n_classes, rng=rng, dtype=np.float64, tree=tree)
    assert head.params["node_W"].shape == (tree.n_classes - 1, 5)
    assert head.params["node_b"].shape == (tree.n_classes - 1,)
    head.params["node_W"] *= 3
    head.params["node_b"][...] = rng.standard_normal(tree.n_classes - 1)
    h = rng.standard_normal((6, 5))
    np.testing.assert_allclose(head.log_prob(h), oracle_log_prob(head, h), rtol=1e-12, atol=1e-12)
    y = rng.integers(0, tree.n_classes, 6)
    assert head.forward(h, y) == pytest.approx(-oracle_log_prob(head, h)[np.arange(6), y].mean(), rel=1e-12)


def test_cifar100_tree_groups_probability_by_superclass():
    """p(coarse group) is the root's softmax: the tree really follows the superclass labels."""
    rng = np.random.default_rng(2)
    head = HierarchicalSoftmaxHead(4, 100, rng=rng, dtype=np.float64, tree="groups", groups=COARSE_OF_FINE)
    h = rng.standard_normal((3, 4))
    root_rows = np.arange(head.row_offsets[0], head.row_offsets[1])  # 19 rows + reference
    root_scores = np.concatenate([h @ head.params["node_W"][root_rows].T + head.params["node_b"][root_rows],
                                  np.zeros((3, 1))], axis=1)
    log_prob = head.log_prob(h)
    for coarse in range(20):
        members = np.flatnonzero(COARSE_OF_FINE == coarse)
        np.testing.assert_allclose(special.logsumexp(log_prob[:, members], axis=1),
                                   special.log_softmax(root_scores, axis=1)[:, coarse], rtol=1e-12)


def test_training_touches_only_the_rows_on_the_targets_paths():
    rng = np.random.default_rng(3)
    head = HierarchicalSoftmaxHead(4, 1000, rng=rng, dtype=np.float64)
    h = rng.standard_normal((3, 4))
    y = np.array([5, 5, 901])
    head.forward(h, y)
    head.backward()
    on_path = set()
    for k in y:
        for node, _ in head.tree.path(k):
            on_path.add(head.row_offsets[node])  # binary: one row per node
    touched = set(np.flatnonzero(np.any(head.grads["node_W"] != 0, axis=1)))
    assert touched == on_path
    rows, values = head.row_grads["node_W"]
    np.testing.assert_array_equal(rows, sorted(on_path))
    np.testing.assert_array_equal(values, head.grads["node_W"][rows])
    np.testing.assert_array_equal(head.row_grads["node_b"][1], head.grads["node_b"][rows])
    # A second step with other targets leaves no stale rows behind.
    head.forward(h, np.array([0, 1, 2]))
    head.backward()
    touched = set(np.flatnonzero(np.any(head.grads["node_W"] != 0, axis=1)))
    assert touched == set(head.row_grads["node_W"][0])
    new_path = {head.row_offsets[node] for k in (0, 1, 2) for node, _ in head.tree.path(k)}
    assert not touched & (on_path - new_path)


@pytest.mark.parametrize("switch", ["_DENSE_SCATTER_LIMIT", "_GEMM_SCORE_FACTOR"])
def test_alternative_paths_give_the_same_loss_and_gradients(monkeypatch, switch):
    """The forward's gather path and the backward's scatter path (used for large trees or
    huge batches) agree with the small-matrix paths the other tests exercise."""
    rng = np.random.default_rng(4)
    head = HierarchicalSoftmaxHead(6, 50, rng=rng, dtype=np.float64, tree=balanced_tree(50, 3))
    h, y = rng.standard_normal((20, 6)), rng.integers(0, 50, 20)
    loss = head.forward(h, y)
    dh = head.backward()
    grads = {name: grad.copy() for name, grad in head.grads.items()}
    monkeypatch.setattr(hierarchical_module, switch, 0)
    assert head.forward(h, y) == pytest.approx(loss, rel=1e-13)
    np.testing.assert_allclose(head.backward(), dh, rtol=1e-12, atol=1e-15)
    for name in grads:
        np.testing.assert_allclose(head.grads[name], grads[name], rtol=1e-12, atol=1e-15)


def test_large_tree_step_on_the_numpy_fallback_matches_the_compiled_kernels(monkeypatch):
    """A tree large enough for the path-entries-only products (kernels.gathered_row_dots,
    scatter_row_products, tree_paths): the NumPy references give the same step."""
    import npsoftmax.kernels as kernels

    rng = np.random.default_rng(7)
    head = HierarchicalSoftmaxHead(5, 3000, rng=rng, dtype=np.float64)
    h, y = rng.standard_normal((40, 5)), rng.integers(0, 3000, 40)
    results = []
    for extension in (kernels._extension, None):
        monkeypatch.setattr(kernels, "_extension", extension)
        loss = head.forward(h, y)
        assert head._cache[-1] is False  # the step took the path-entries-only products
        results.append([np.array(loss), head.backward(), head.row_grads["node_W"][1], head.row_grads["node_b"][1]])
    for got, expected in zip(*results):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_sparse_sgd_step_equals_dense_sgd():
    rng = np.random.default_rng(5)
    sparse = HierarchicalSoftmaxHead(4, 64, rng=np.random.default_rng(0), dtype=np.float64)
    dense = HierarchicalSoftmaxHead(4, 64, rng=np.random.default_rng(0), dtype=np.float64)
    with pytest.raises(RuntimeError, match="backward"):
        sparse.sparse_sgd_step(0.1)
    for _ in range(3):
        h, y = rng.standard_normal((8, 4)), rng.integers(0, 64, 8)
        for head in (sparse, dense):
            head.forward(h, y)
            head.backward()
        sparse.sparse_sgd_step(0.3)
        for name, value in dense.params.items():
            value -= 0.3 * dense.grads[name]
    for name in dense.params:
        np.testing.assert_allclose(sparse.params[name], dense.params[name], rtol=1e-13)


def test_greedy_decoding_is_approximate_and_never_the_default():
    # Root: {node A = classes 0, 1} vs class 2, p(A) = 0.6, p(0 | A) = p(1 | A) = 0.5,
    # so p = (0.3, 0.3, 0.4): greedy descends into A and answers 0; the truth is 2.
    tree = Tree.from_nested([[0, 1], 2])
    head = HierarchicalSoftmaxHead(1, 3, rng=np.random.default_rng(0), dtype=np.float64, tree=tree)
    head.params["node_W"][...] = [[np.log(1.5)], [0.0]]  # row 0: root's choice of A, row 1: A's of 0
    head.params["node_b"][...] = 0
    h = np.ones((1, 1))
    np.testing.assert_allclose(np.exp(head.log_prob(h)), [[0.3, 0.3, 0.4]], rtol=1e-12)
    assert head.predict(h)[0] == 2
    assert head.predict(h, method="exact")[0] == 2
    assert head.predict(h, method="greedy")[0] == 0
    assert head.predict(h, method="search")[0] == 2  # search is exact where greedy is not
    with pytest.raises(ValueError, match="method must be 'exact', 'search' or 'greedy'"):
        head.predict(h, method="beam")


def test_greedy_follows_the_best_child_at_every_node():
    rng = np.random.default_rng(6)
    for tree in (balanced_tree(100), balanced_tree(100, 3), tree_from_groups(COARSE_OF_FINE)):
        head = HierarchicalSoftmaxHead(5, 100, rng=rng, dtype=np.float64, tree=tree)
        head.params["node_W"] *= 4
        h = rng.standard_normal((300, 5))
        greedy = head.predict(h, method="greedy")
        exact = head.predict(h)
        # Oracle for greedy: at each node take the child whose subtree has the largest
        # conditional probability p(child | node) = sum of its leaves' p / p(node).
        probability = np.exp(head.log_prob(h))
        for i in range(0, 300, 37):
            node = 0
            while True:
                kids = tree.children[tree.child_offsets[node]:tree.child_offsets[node + 1]]
                mass = [probability[i, [~c]].sum() if c < 0 else probability[i, tree.leaves_below(c)].sum()
                        for c in kids]
                best = kids[int(np.argmax(mass))]
                if best < 0:
                    assert greedy[i] == ~best
                    break
                node = best
        np.testing.assert_array_equal(exact, np.argmax(head.log_prob(h), axis=1))
    assert np.any(greedy != exact)  # on a random head, greedy errs on some samples


def test_predict_in_chunks_matches_one_pass(monkeypatch):
    rng = np.random.default_rng(7)
    head = HierarchicalSoftmaxHead(5, 100, rng=rng, dtype=np.float32)
    h = rng.standard_normal((33, 5)).astype(np.float32)
    full_log_prob, full_prediction = head.log_prob(h), head.predict(h)
    monkeypatch.setattr(hierarchical_module, "_PREDICT_CHUNK_ENTRIES", 500)  # 2 rows per chunk
    assert len(head._row_chunks(33)) == 17
    # (a 1-row chunk goes through GEMV instead of GEMM: equal up to float32 rounding)
    np.testing.assert_allclose(head.log_prob(h), full_log_prob, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(head.predict(h), full_prediction)


def test_tree_options():
    rng = np.random.default_rng(8)
    counts = np.arange(10, 0, -1)
    head = HierarchicalSoftmaxHead(3, 10, rng=rng, tree="huffman", class_counts=counts)
    np.testing.assert_array_equal(head.tree.depth, huffman_tree(counts).depth)
    head = HierarchicalSoftmaxHead(3, 10, rng=rng, branching=4)
    assert head.tree.arity.max() == 4
    with pytest.raises(ValueError, match="tree has 10 leaves but the head has n_classes=12"):
        HierarchicalSoftmaxHead(3, 12, rng=rng, tree=balanced_tree(10))
    with pytest.raises(ValueError, match="needs class_counts"):
        HierarchicalSoftmaxHead(3, 10, rng=rng, tree="huffman")
    with pytest.raises(ValueError, match="needs groups"):
        HierarchicalSoftmaxHead(3, 10, rng=rng, tree="groups")
    with pytest.raises(ValueError, match="tree has 100 leaves"):
        HierarchicalSoftmaxHead(3, 10, rng=rng, tree="groups", groups=COARSE_OF_FINE)
    with pytest.raises(ValueError, match="tree must be a Tree or one of"):
        HierarchicalSoftmaxHead(3, 100, rng=rng, tree="cifar100")  # a head knows no data set
    with pytest.raises(ValueError, match="tree must be a Tree or one of"):
        HierarchicalSoftmaxHead(3, 10, rng=rng, tree="random")


def test_gradient_memory_is_not_touched_densely():
    """A 200k-class head: each step writes only its rows (the untouched grads stay zero)."""
    rng = np.random.default_rng(9)
    head = HierarchicalSoftmaxHead(8, 200_000, rng=rng)
    h = rng.standard_normal((16, 8)).astype(np.float32)
    head.forward(h, rng.integers(0, 200_000, 16))
    dh = head.backward()
    assert dh.shape == (16, 8) and dh.dtype == np.float32
    rows = head.row_grads["node_W"][0]
    assert rows.size <= 16 * head.tree.max_depth
    assert np.count_nonzero(np.any(head.grads["node_W"] != 0, axis=1)) <= rows.size


# -- exact decoding by best-first search -----------------------------------------------------------
SEARCH_TREES = {
    "balanced-100": lambda: balanced_tree(100),
    "ternary-100": lambda: balanced_tree(100, 3),
    "cifar100": lambda: tree_from_groups(COARSE_OF_FINE),
    "huffman": lambda: huffman_tree(np.random.default_rng(0).integers(1, 100, 37)),
    "nested": lambda: Tree.from_nested([[0, 1, [2, 3, 4, 5]], 6, [7, [8, 9]]]),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(SEARCH_TREES))
def test_search_and_topk_equal_the_full_log_prob(name, dtype):
    rng = np.random.default_rng(11)
    tree = SEARCH_TREES[name]()
    head = HierarchicalSoftmaxHead(6, tree.n_classes, rng=rng, dtype=dtype, tree=tree)
    head.params["node_W"] *= 3
    head.params["node_b"][...] = rng.standard_normal(tree.n_classes - 1)
    h = rng.standard_normal((40, 6)).astype(dtype)
    log_prob = head.log_prob(h)
    np.testing.assert_array_equal(head.predict(h, method="search"), np.argmax(log_prob, axis=1))
    assert head.last_search_expansions.shape == (40,) and head.last_search_expansions.dtype == np.int64
    k = min(7, tree.n_classes)
    classes, values = head.topk(h, k)
    order = np.argsort(-log_prob, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(classes, order)
    assert classes.dtype == np.int64 and values.dtype == dtype and values.shape == (40, k)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(values, np.take_along_axis(log_prob, order, axis=1), rtol=tolerance, atol=tolerance)
    assert np.all(np.diff(values, axis=1) <= 0)
    # every class, in order: the whole distribution (batch of 1)
    classes, _ = head.topk(h[:1], tree.n_classes)
    np.testing.assert_array_equal(classes[0], np.argsort(-log_prob[0], kind="stable"))


def test_search_breaks_exact_ties_like_argmax():
    # Zero weights and biases: every node is uniform. K = 64 (balanced binary): all leaves
    # tie at 6 log(1/2) and argmax answers 0. K = 100: the shallower leaves (depth 6) tie
    # above the deeper ones, argmax takes the first shallow one.
    for n_classes in (64, 100):
        head = HierarchicalSoftmaxHead(3, n_classes, rng=np.random.default_rng(0), dtype=np.float64)
        head.params["node_W"][...] = 0
        head.params["node_b"][...] = 0
        h = np.random.default_rng(1).standard_normal((4, 3))
        log_prob = head.log_prob(h)
        np.testing.assert_array_equal(head.predict(h, method="search"), np.argmax(log_prob, axis=1))
        classes, _ = head.topk(h, 10)
        np.testing.assert_array_equal(classes, np.argsort(-log_prob, axis=1, kind="stable")[:, :10])
    # A tie between subtrees whose best leaves come in the "wrong" order: node A = {3, 4} and
    # node B = {0, 5}... written so that the tied leaves are 4 (left subtree) and 0 (right).
    tree = Tree.from_nested([[3, 4], [0, 5], [1, 2]])
    head = HierarchicalSoftmaxHead(1, 6, rng=np.random.default_rng(0), dtype=np.float64, tree=tree)
    head.params["node_W"][...] = 0
    # root rows (A, B), A's row (3 vs 4), B's row (0 vs 5), C's row (1 vs 2); equal root scores
    # for A and B, and "4" in A as likely as "0" in B: classes 4 and 0 tie exactly.
    head.params["node_b"][...] = [0.5, 0.5, -1.0, 1.0, 0.0]
    h = np.zeros((1, 1))
    log_prob = head.log_prob(h)
    assert log_prob[0, 4] == log_prob[0, 0] == log_prob[0].max()
    assert head.predict(h, method="search")[0] == 0 == np.argmax(log_prob[0])
    np.testing.assert_array_equal(head.topk(h, 6)[0][0], np.argsort(-log_prob[0], kind="stable"))


def test_search_expands_few_nodes_on_a_confident_head_and_validates_k():
    rng = np.random.default_rng(12)
    head = HierarchicalSoftmaxHead(8, 4096, rng=rng, dtype=np.float64)
    y = rng.integers(0, 4096, 16)
    # Make the head confident about y: every decision on y's path scored +-20.
    h = rng.standard_normal((16, 8))
    head.params["node_W"][...] = 0
    for i, label in enumerate(y[:1]):
        for node, position in head.tree.path(label):
            head.params["node_b"][head.row_offsets[node]] = 20.0 if position == 0 else -20.0
    assert head.predict(h[:1], method="search")[0] == y[0]
    assert head.last_search_expansions[0] == head.tree.depth[y[0]]  # straight down: depth expansions
    with pytest.raises(ValueError, match=r"k must lie in \[1, n_classes\] = \[1, 4096\], got 0"):
        head.topk(h, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        head.topk(h, 2.0)
