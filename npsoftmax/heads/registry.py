"""The name -> head registry used by the command line (``--softmax NAME``) and the trainer."""

import numpy as np

from .adaptive import AdaptiveSoftmaxHead
from .gumbel import GumbelSoftmaxHead
from .hierarchical import HierarchicalSoftmaxHead
from .sampled import SampledSoftmaxHead
from .softmax import SoftmaxHead

#: The five heads by name.
HEADS = {
    "softmax": SoftmaxHead,
    "gumbel": GumbelSoftmaxHead,
    "hierarchical": HierarchicalSoftmaxHead,
    "adaptive": AdaptiveSoftmaxHead,
    "sampled": SampledSoftmaxHead,
}


def make_head(name, in_features, n_classes, *, rng, dtype=np.float32, **options):
    """Build the head called ``name`` (a key of ``HEADS``).

    Args:
        name: "softmax", "gumbel", "hierarchical", "adaptive" or "sampled".
        in_features: D.  n_classes: K.  rng: ``numpy.random.Generator``.
        dtype: float32 or float64.
        **options: the head's own options (``tau`` for gumbel; ``tree``, ``branching``,
            ``class_counts``, ``groups`` for hierarchical; ``cutoffs``, ``div_value``,
            ``head_bias`` for adaptive; ``n_samples``, ``sampler``, ``class_counts``,
            ``remove_accidental_hits``, ``subtract_log_q`` for sampled; ``class_weights`` for
            every head and ``label_smoothing`` for softmax and gumbel).

    Returns:
        the head instance.
    """
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    return HEADS[name](in_features, n_classes, rng=rng, dtype=dtype, **options)
