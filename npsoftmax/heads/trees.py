"""Class trees for the hierarchical softmax, and three ways to build one.

A tree has exactly ``K = n_classes`` leaves, one per class, and ``M`` internal
nodes (root = node 0). Each internal node chooses one of its children, so a
class's probability is the product of the choices on its root-to-leaf path:

    p(k | h) = prod over (node, child) on the path of p(child | node, h)

Storage (compressed, like a CSR sparse matrix, so that a tree with a million
leaves is a handful of flat arrays, and everything is vectorised):

* the children of internal node ``m`` are ``children[child_offsets[m]:child_offsets[m + 1]]``,
  in order; a child ``c >= 0`` is internal node ``c``, a child ``c < 0`` is the leaf
  of class ``-1 - c`` (i.e. ``~k`` encodes class ``k``). Each (node, child) pair is
  an *edge*, numbered by its position in ``children``; there are ``M + K - 1``.
* every internal node has at least 2 children (a 1-way "choice" would be pointless).

Builders:

* ``balanced_tree(K, branching=2)``: leaves 0..K-1 left to right, every split as even
  as possible, so depths differ by at most one (any K, not only powers of two).
* ``huffman_tree(class_counts)``: binary Huffman code tree; frequent classes sit
  near the root, minimising the expected number of decisions per sample.
* ``tree_from_groups(groups)``: root -> one node per group -> that group's classes
  (e.g. CIFAR-100: 20 coarse superclasses x 5 fine classes).
* ``Tree.from_nested([[0, 1], [2, [3, 4]]])``: any tree written as nested lists.
"""

import numpy as np

from .base import check_int


def _concatenated_ranges(starts, lengths):
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``, without a loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths) + np.arange(
        ends[-1] if ends.size else 0, dtype=np.int64)


class Tree:
    """A rooted tree whose leaves are the classes 0..K-1 (see the module docstring).

    Args:
        child_offsets: (M + 1,) ints, ``child_offsets[0] == 0``, non-decreasing,
            ``child_offsets[-1] == len(children)``.
        children: (M + K - 1,) ints, ``>= 0`` for internal nodes, ``~k`` for class k.
        n_classes: K.

    Derived attributes (all read-only numpy arrays, int64):
        arity (M,): number of children of each internal node.
        edge_node (E,), edge_position (E,): the node an edge leaves, and which child it is.
        node_parent (M,), node_edge (M,): each internal node's parent (-1 for the root)
            and incoming edge (-1 for the root).
        leaf_parent (K,), leaf_position (K,), leaf_edge (K,): the same for each class.
        node_level (M,): number of edges from the root (root 0).
        depth (K,): number of decisions on each class's path (= its parent's level + 1).
        levels: list of (M_l,) arrays, the internal nodes at each level (breadth-first).
        max_depth: largest ``depth``.
    """

    def __init__(self, child_offsets, children, n_classes):
        self.n_classes = check_int(n_classes, "n_classes", minimum=2)
        child_offsets = self._as_int_array(child_offsets, "child_offsets")
        children = self._as_int_array(children, "children")
        n_internal = child_offsets.size - 1
        if n_internal < 1 or child_offsets[0] != 0 or child_offsets[-1] != children.size:
            raise ValueError(
                "child_offsets must start at 0 and end at len(children) "
                f"({children.size}), got {child_offsets.size} entries from "
                f"{child_offsets[0] if child_offsets.size else None} to "
                f"{child_offsets[-1] if child_offsets.size else None}")
        arity = np.diff(child_offsets)
        if np.any(arity < 2):
            bad = int(np.flatnonzero(arity < 2)[0])
            raise ValueError(f"every internal node needs >= 2 children; node {bad} has {arity[bad]}")
        n_edges = n_internal + self.n_classes - 1
        if children.size != n_edges:
            raise ValueError(
                f"a tree with {n_internal} internal nodes and {self.n_classes} leaves has "
                f"{n_edges} edges, but children has {children.size} entries")
        if children.max() >= n_internal or children.min() < -self.n_classes:
            raise ValueError(
                f"children must lie in [-{self.n_classes}, {n_internal}) (internal nodes "
                f"0..{n_internal - 1}, class k as ~k), got [{children.min()}, {children.max()}]")
        is_leaf = children < 0
        leaf_classes = ~children[is_leaf]
        internal_children = children[~is_leaf]
        if not np.array_equal(np.bincount(leaf_classes, minlength=self.n_classes),
                              np.ones(self.n_classes, dtype=np.int64)):
            raise ValueError(f"every class 0..{self.n_classes - 1} must be exactly one leaf")
        reference_counts = np.bincount(internal_children, minlength=n_internal)
        if reference_counts[0] != 0 or np.any(reference_counts[1:] != 1):
            raise ValueError("the root (node 0) must have no parent and every other internal "
                             "node exactly one")

        edge_node = np.repeat(np.arange(n_internal, dtype=np.int64), arity)
        edge_position = np.arange(n_edges, dtype=np.int64) - child_offsets[edge_node]
        node_parent = np.full(n_internal, -1, dtype=np.int64)
        node_edge = np.full(n_internal, -1, dtype=np.int64)
        internal_edges = np.flatnonzero(~is_leaf)
        node_parent[internal_children] = edge_node[internal_edges]
        node_edge[internal_children] = internal_edges
        leaf_edge = np.empty(self.n_classes, dtype=np.int64)
        leaf_edge[leaf_classes] = np.flatnonzero(is_leaf)

        # Breadth-first levels from the root. A unique parent per node alone still
        # allows a detached cycle (1 -> 2 -> 1); such nodes are never reached.
        levels = [np.zeros(1, dtype=np.int64)]
        n_reached = 1
        while True:
            frontier = levels[-1]
            below = children[_concatenated_ranges(child_offsets[frontier], arity[frontier])]
            below = below[below >= 0]
            if below.size == 0:
                break
            levels.append(below)
            n_reached += below.size
            if n_reached > n_internal:  # pragma: no cover - excluded by the parent check
                break
        if n_reached != n_internal:
            raise ValueError("some internal nodes are not reachable from the root (a cycle)")
        node_level = np.empty(n_internal, dtype=np.int64)
        for level, nodes in enumerate(levels):
            node_level[nodes] = level

        self.n_internal = n_internal
        self.child_offsets = child_offsets
        self.children = children
        self.arity = arity
        self.edge_node = edge_node
        self.edge_position = edge_position
        self.node_parent = node_parent
        self.node_edge = node_edge
        self.leaf_parent = edge_node[leaf_edge]
        self.leaf_position = edge_position[leaf_edge]
        self.leaf_edge = leaf_edge
        self.node_level = node_level
        self.depth = node_level[self.leaf_parent] + 1
        self.levels = levels
        self.max_depth = int(self.depth.max())
        for value in [*vars(self).values(), *levels]:
            if isinstance(value, np.ndarray):
                value.setflags(write=False)

    @staticmethod
    def _as_int_array(values, name):
        values = np.asarray(values)
        if values.dtype == bool or not np.issubdtype(values.dtype, np.integer) or values.ndim != 1:
            raise TypeError(f"{name} must be a 1-D integer array, got dtype {values.dtype} "
                            f"shape {values.shape}")
        return values.astype(np.int64)  # a private copy: the tree is immutable

    @classmethod
    def from_nested(cls, nested):
        """Build a tree from nested lists: a list is an internal node, an int is a class.

        ``Tree.from_nested([[0, 1], 2])``: the root chooses between node {0, 1} and class 2.
        Internal nodes are numbered breadth-first (root 0).
        """
        if not isinstance(nested, (list, tuple)):
            raise TypeError(f"nested must be a list of children, got {type(nested).__name__}")
        offsets, children, queue = [0], [], [nested]
        n_classes = 0
        position = 0
        while position < len(queue):
            node = queue[position]
            position += 1
            for child in node:
                if isinstance(child, (list, tuple)):
                    queue.append(child)
                    children.append(len(queue) - 1)
                elif isinstance(child, (int, np.integer)) and not isinstance(child, bool):
                    children.append(~int(child))
                    n_classes += 1
                else:
                    raise TypeError(f"tree entries must be lists or int classes, got {child!r}")
            offsets.append(len(children))
        return cls(offsets, children, n_classes)

    def path(self, k):
        """The decisions leading to class ``k``: list of (node, child position), root first."""
        k = int(k)
        if not 0 <= k < self.n_classes:
            raise ValueError(f"k must lie in [0, {self.n_classes}), got {k}")
        steps = [(int(self.leaf_parent[k]), int(self.leaf_position[k]))]
        node = self.leaf_parent[k]
        while self.node_parent[node] >= 0:
            steps.append((int(self.node_parent[node]), int(self.edge_position[self.node_edge[node]])))
            node = self.node_parent[node]
        return steps[::-1]

    def leaves_below(self, node):
        """Sorted (n,) array of the classes in the subtree of internal node ``node``."""
        frontier, classes = np.array([int(node)]), []
        while frontier.size:
            below = self.children[_concatenated_ranges(self.child_offsets[frontier],
                                                       self.arity[frontier])]
            classes.append(~below[below < 0])
            frontier = below[below >= 0]
        return np.sort(np.concatenate(classes))

    def __repr__(self):
        return (f"Tree(n_classes={self.n_classes}, n_internal={self.n_internal}, "
                f"max_depth={self.max_depth}, max_arity={int(self.arity.max())})")


def balanced_tree(n_classes, branching=2):
    """A tree over classes 0..K-1 (left to right) whose every split is as even as possible.

    A node over ``n`` classes gets ``min(branching, n)`` children over ``ceil``/``floor``
    of ``n / branching`` classes each, so leaf depths differ by at most one for any K
    (K = 100, binary: depths 6 and 7). Built one level at a time, vectorised, so
    K = 1,000,000 takes well under a second.

    Args:
        n_classes: K >= 2.
        branching: maximum number of children per node, >= 2.

    Returns:
        Tree with ``ceil((K - 1) / (branching - 1))``-ish internal nodes, breadth-first numbered.
    """
    n_classes = check_int(n_classes, "n_classes", minimum=2)
    branching = check_int(branching, "branching", minimum=2)
    arities, children = [], []
    starts = np.zeros(1, dtype=np.int64)
    sizes = np.array([n_classes], dtype=np.int64)
    next_node = 1
    parts = np.arange(branching)
    while sizes.size:
        quotient, remainder = np.divmod(sizes, branching)
        # The first `remainder` parts get one extra class: sizes differ by at most one.
        part_sizes = quotient[:, None] + (parts[None, :] < remainder[:, None])
        part_starts = starts[:, None] + np.cumsum(part_sizes, axis=1) - part_sizes
        present = part_sizes > 0
        arities.append(present.sum(axis=1))
        sizes, starts = part_sizes[present], part_starts[present]
        internal = sizes >= 2
        node_ids = next_node + np.cumsum(internal) - 1
        children.append(np.where(internal, node_ids, ~starts))
        next_node += int(internal.sum())
        sizes, starts = sizes[internal], starts[internal]
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(arities))])
    return Tree(offsets, np.concatenate(children), n_classes)


def huffman_tree(class_counts):
    """Binary Huffman tree from class frequencies: frequent classes get short paths.

    Repeatedly merges the two least frequent subtrees (ties prefer leaves, then the
    older subtree, so the result is deterministic). This minimises
    ``sum_k count_k * depth_k``, the expected number of binary decisions, so it is
    also the cheapest tree for the hierarchical softmax's training step.

    Args:
        class_counts: (K,) finite, non-negative numbers (counts or probabilities), K >= 2.

    Returns:
        Tree whose root (node 0) is the final merge.
    """
    counts = np.asarray(class_counts)
    if counts.dtype == bool or not np.issubdtype(counts.dtype, np.number):
        raise TypeError(f"class_counts must be numeric, got dtype {counts.dtype}")
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(f"class_counts must have shape (K,) with K >= 2, got {counts.shape}")
    counts = counts.astype(np.float64)
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("class_counts must be finite and non-negative")
    n_classes = counts.size
    # Merged weights are created in non-decreasing order, so instead of a heap two
    # sorted queues suffice: the leaves sorted once, and the merges in creation order.
    # The two smallest subtrees are always at the fronts of the queues (O(K) after the sort).
    order = np.argsort(counts, kind="stable")
    leaf_weights, leaf_codes = counts[order].tolist(), (~order).tolist()
    merged_weights, merges = [], []
    next_leaf = next_merge = 0
    for _ in range(n_classes - 1):
        pair = []
        for _ in range(2):
            leaf_weight = leaf_weights[next_leaf] if next_leaf < n_classes else np.inf
            merge_weight = merged_weights[next_merge] if next_merge < len(merged_weights) else np.inf
            if leaf_weight <= merge_weight:  # ties go to the leaf: deterministic
                pair.append((leaf_weight, leaf_codes[next_leaf]))
                next_leaf += 1
            else:
                pair.append((merge_weight, next_merge))
                next_merge += 1
        merged_weights.append(pair[0][0] + pair[1][0])
        merges.append((pair[0][1], pair[1][1]))
    # Merge t is internal node n_internal - 1 - t, so the last merge is the root (node 0).
    n_internal = len(merges)
    children = np.array(merges[::-1], dtype=np.int64)
    internal = children >= 0
    children[internal] = n_internal - 1 - children[internal]
    return Tree(np.arange(0, 2 * n_internal + 1, 2), children.reshape(-1), n_classes)


def tree_from_groups(groups):
    """Two-level tree: root -> one node per group -> the group's classes.

    Args:
        groups: (K,) ints, ``groups[k]`` is the group of class k (any integer labels,
            e.g. ``npsoftmax.data.cifar100_classes.COARSE_OF_FINE``: 20 groups x 5).

    Returns:
        Tree. The root's children are the groups in increasing label order; a group
        of a single class is that class's leaf directly (no 1-way node); with a
        single group the tree is flat (one softmax over all classes).
    """
    groups = np.asarray(groups)
    if groups.dtype == bool or not np.issubdtype(groups.dtype, np.integer):
        raise TypeError(f"groups must be an integer array, got dtype {groups.dtype}")
    if groups.ndim != 1 or groups.size < 2:
        raise ValueError(f"groups must have shape (K,) with K >= 2, got {groups.shape}")
    n_classes = groups.size
    labels, group_index, group_sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if labels.size == 1:
        return Tree([0, n_classes], ~np.arange(n_classes), n_classes)
    # Classes sorted by (group, class): each group's members are then contiguous.
    members = np.lexsort((np.arange(n_classes), group_index))
    is_node = group_sizes >= 2
    node_ids = np.cumsum(is_node)  # group g's node id (root is 0), valid where is_node
    first_member = np.cumsum(group_sizes) - group_sizes
    root_children = np.where(is_node, node_ids, ~members[first_member])
    grouped_members = members[np.repeat(is_node, group_sizes)]
    offsets = np.concatenate([[0, labels.size], labels.size + np.cumsum(group_sizes[is_node])])
    return Tree(offsets, np.concatenate([root_children, ~grouped_members]), n_classes)
