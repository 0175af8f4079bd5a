"""Tree structure and the three builders: shapes, depths, optimality and label structure."""

import heapq

import numpy as np
import pytest

from npsoftmax.data.cifar100_classes import COARSE_OF_FINE
from npsoftmax.heads import Tree, balanced_tree, huffman_tree, tree_from_groups


def check_is_tree_over_classes(tree, n_classes):
    """Every class is exactly one leaf, and its path really leads to it."""
    assert tree.n_classes == n_classes
    leaves = ~tree.children[tree.children < 0]
    np.testing.assert_array_equal(np.sort(leaves), np.arange(n_classes))
    assert tree.children.size == tree.n_internal + n_classes - 1
    assert np.all(tree.arity >= 2)
    for k in range(n_classes):
        path = tree.path(k)
        assert path[0][0] == 0 and len(path) == tree.depth[k]
        # Following the positions from the root reaches leaf k.
        node = 0
        for step, (path_node, position) in enumerate(path):
            assert path_node == node
            child = tree.children[tree.child_offsets[node] + position]
            if step < len(path) - 1:
                node = child
        assert child == ~k


@pytest.mark.parametrize("n_classes,branching", [(2, 2), (3, 2), (5, 2), (100, 2), (100, 3), (7, 5), (64, 4)])
def test_balanced_tree(n_classes, branching):
    tree = balanced_tree(n_classes, branching)
    check_is_tree_over_classes(tree, n_classes)
    assert tree.depth.max() - tree.depth.min() <= 1
    assert tree.max_depth == int(np.ceil(np.log(n_classes) / np.log(branching) - 1e-9))
    assert np.all(tree.arity <= branching)
    # Leaves are the classes in order, left to right (a depth-first traversal).
    order = []

    def visit(node):
        for child in tree.children[tree.child_offsets[node]:tree.child_offsets[node + 1]]:
            order.append(~child) if child < 0 else visit(child)
    visit(0)
    assert order == list(range(n_classes))


def test_balanced_binary_tree_over_100_classes():
    tree = balanced_tree(100)
    assert tree.n_internal == 99
    assert sorted(np.unique(tree.depth)) == [6, 7]
    assert np.sum(tree.depth == 6) == 28  # 2^7 - 100 leaves sit one level higher


def test_huffman_textbook_example():
    # The classic example (Cormen et al.): code lengths 1, 3, 3, 3, 4, 4.
    counts = np.array([45, 13, 12, 16, 9, 5])
    tree = huffman_tree(counts)
    check_is_tree_over_classes(tree, 6)
    np.testing.assert_array_equal(tree.depth, [1, 3, 3, 3, 4, 4])


def huffman_cost(counts):
    """Independent oracle: the optimal expected code length is the sum of all merge weights."""
    heap = list(map(float, counts))
    heapq.heapify(heap)
    total = 0.0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


@pytest.mark.parametrize("seed", range(4))
def test_huffman_is_optimal_and_monotone(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, size=rng.integers(2, 40))
    tree = huffman_tree(counts)
    check_is_tree_over_classes(tree, counts.size)
    assert np.sum(counts * tree.depth) == pytest.approx(huffman_cost(counts))
    # More frequent classes are never deeper.
    for i in range(counts.size):
        assert np.all(tree.depth[counts > counts[i]] <= tree.depth[i])


def test_huffman_of_zipf_counts_beats_the_balanced_tree():
    counts = 1.0 / np.arange(1, 1001)
    huffman, balanced = huffman_tree(counts), balanced_tree(1000)
    assert np.sum(counts * huffman.depth) < 0.8 * np.sum(counts * balanced.depth)
    assert huffman.depth[0] <= 3


def test_tree_from_groups_follows_the_labels():
    rng = np.random.default_rng(0)
    groups = rng.permutation(np.repeat([10, 3, 7, 42], [5, 1, 8, 6]))  # shuffled, one singleton
    tree = tree_from_groups(groups)
    check_is_tree_over_classes(tree, groups.size)
    for k in range(groups.size):
        same_group = np.flatnonzero(groups == groups[k])
        if same_group.size == 1:
            assert tree.depth[k] == 1 and tree.leaf_parent[k] == 0  # no 1-way node
        else:
            assert tree.depth[k] == 2
            np.testing.assert_array_equal(tree.leaves_below(tree.leaf_parent[k]), same_group)
    assert tree.arity[0] == 4  # one root child per group


def test_cifar100_superclass_tree():
    tree = tree_from_groups(COARSE_OF_FINE)
    check_is_tree_over_classes(tree, 100)
    assert tree.n_internal == 21 and tree.arity[0] == 20
    assert np.all(tree.depth == 2)
    for coarse in range(20):
        node = tree.children[coarse]  # root's children in coarse-label order
        np.testing.assert_array_equal(tree.leaves_below(node), np.flatnonzero(COARSE_OF_FINE == coarse))


def test_single_group_is_a_flat_tree():
    tree = tree_from_groups(np.zeros(4, dtype=int))
    assert tree.n_internal == 1 and tree.arity[0] == 4 and np.all(tree.depth == 1)


def test_from_nested():
    tree = Tree.from_nested([[0, 1], 2, [3, [4, 5]]])
    check_is_tree_over_classes(tree, 6)
    np.testing.assert_array_equal(tree.depth, [2, 2, 1, 2, 3, 3])
    assert tree.path(5) == [(0, 2), (2, 1), (3, 1)]


@pytest.mark.parametrize("offsets,children,n_classes,message", [
    ([0, 1], [-1], 2, "needs >= 2 children"),
    ([0, 2], [-1, -1], 2, "exactly one leaf"),
    ([0, 2, 4], [1, -1, -2, -3], 4, "edges"),
    ([0, 2, 4, 6], [-1, -2, 2, -3, 1, -4], 4, "not reachable"),
    ([0, 2, 4], [0, -1, -2, -3], 3, "root"),
    ([0, 2, 4], [1, -1, -2, -9], 3, "children must lie in"),
    ([1, 3], [-1, -2], 2, "child_offsets must start at 0"),
])
def test_invalid_trees_are_rejected(offsets, children, n_classes, message):
    with pytest.raises(ValueError, match=message):
        Tree(offsets, children, n_classes)


def test_builder_validation():
    with pytest.raises(ValueError, match="n_classes must be >= 2"):
        balanced_tree(1)
    with pytest.raises(ValueError, match="branching must be >= 2"):
        balanced_tree(10, branching=1)
    with pytest.raises(ValueError, match="class_counts must be finite and non-negative"):
        huffman_tree([1.0, -1.0])
    with pytest.raises(ValueError, match=r"class_counts must have shape \(K,\) with K >= 2"):
        huffman_tree([1.0])
    with pytest.raises(TypeError, match="groups must be an integer array"):
        tree_from_groups([0.5, 1.5])
    with pytest.raises(TypeError, match="children must be a 1-D integer array"):
        Tree([0, 2], [0.0, 1.0], 2)


def test_trees_are_immutable():
    tree = balanced_tree(10)
    with pytest.raises(ValueError):
        tree.children[0] = 5
