"""The five softmax heads (one protocol, see ``base.py``), their building blocks and a registry.

* ``SoftmaxHead``: Linear + softmax over all K classes (O(N D K) per step).
* ``GumbelSoftmaxHead``: trained through Gumbel-perturbed, tempered softmax.
* ``HierarchicalSoftmaxHead``: a tree of small softmaxes (O(N D depth) per step),
  over a tree from ``balanced_tree``, ``huffman_tree`` or ``tree_from_groups``.
* ``AdaptiveSoftmaxHead``: shortlist + low-rank tail clusters (Grave et al. 2017).
* ``SampledSoftmaxHead``: trained on the target + sampled classes with the log-Q
  correction (Jean et al. 2015, TF's ``sampled_softmax_loss``); exact full softmax at eval.

Every head takes ``class_weights=(K,)`` (torch's weighted mean); softmax and gumbel also
take ``label_smoothing=eps`` (torch's ``cross_entropy``).

``make_head("gumbel", D, K, rng=rng, tau=0.5)`` builds one by name (``HEADS``).
"""

from .adaptive import AdaptiveSoftmaxHead
from .base import Head, RowSparseHead
from .candidate_sampling import CandidateSample, CandidateSampler
from .gumbel import (GumbelSoftmaxHead, gumbel_softmax, gumbel_softmax_backward,
                     sample_gumbel)
from .hierarchical import HierarchicalSoftmaxHead
from .registry import HEADS, make_head
from .sampled import SampledSoftmaxHead
from .softmax import SoftmaxHead
from .softmax_functions import log_softmax, logsumexp, softmax, softmax_cross_entropy
from .trees import Tree, balanced_tree, huffman_tree, tree_from_groups

__all__ = [
    "Head", "RowSparseHead", "SoftmaxHead", "GumbelSoftmaxHead", "HierarchicalSoftmaxHead",
    "AdaptiveSoftmaxHead", "SampledSoftmaxHead", "CandidateSample", "CandidateSampler",
    "HEADS", "make_head",
    "softmax", "log_softmax", "logsumexp", "softmax_cross_entropy",
    "gumbel_softmax", "gumbel_softmax_backward", "sample_gumbel",
    "Tree", "balanced_tree", "huffman_tree", "tree_from_groups",
]
