"""The full softmax head: one Linear layer and softmax cross-entropy over all K classes.

    z = h @ W + b                 h (N, D), W (D, K), b (K,)  ->  z (N, K)
    loss = -(1/N) sum_i log softmax(z_i)[y_i]

Backward (``dz = (softmax(z) - onehot(y)) / N``, see ``softmax_cross_entropy``):

    dW = h^T dz,   db = sum_i dz_i,   dh = dz W^T

Every step costs O(N D K): the baseline the hierarchical and adaptive heads beat.

``class_weights`` and ``label_smoothing`` follow ``torch.nn.functional.cross_entropy``
(see ``softmax_cross_entropy`` for the formula and its gradient).
"""

import numpy as np

from .. import parallel

from .base import Head, linear_weight
from .softmax_functions import log_softmax, softmax_cross_entropy


class SoftmaxHead(Head):
    """Linear projection + softmax over all classes.

    Parameters: ``W (D, K)`` (Linear weight in the (D_in, D_out) convention; the
    torch adapter transposes it) and ``b (K,)``.

    Args:
        in_features: D.
        n_classes: K.
        rng: ``numpy.random.Generator`` for initialisation.
        dtype: float32 or float64.
        class_weights: optional (K,) weights (torch's ``weight=``: weighted mean).
        label_smoothing: eps in [0, 1) (torch's ``label_smoothing=``).
    """

    supports_label_smoothing = True

    def __init__(self, in_features, n_classes, *, rng, dtype=np.float32, class_weights=None,
                 label_smoothing=0.0):
        super().__init__(in_features, n_classes, rng=rng, dtype=dtype, class_weights=class_weights,
                         label_smoothing=label_smoothing)
        self._add_param("W", linear_weight(self.rng, self.in_features,
                                           (self.in_features, self.n_classes), self.dtype))
        self._add_param("b", np.zeros(self.n_classes, dtype=self.dtype))

    def logits(self, h):
        """Class scores ``z = h W + b`` (N, K) for features ``h (N, D)``."""
        h = self._check_features(h)
        return parallel.matmul(h, self.params["W"]) + self.params["b"]

    def forward(self, h, y):
        """Mean cross-entropy of ``y (N,)`` under softmax(h W + b); caches for ``backward``."""
        h, y = self._check_batch(h, y)
        logits = parallel.matmul(h, self.params["W"])
        logits += self.params["b"]
        loss, dlogits = self._cross_entropy(logits, y)
        self._cache = (h, dlogits)
        return loss

    def _cross_entropy(self, logits, y):
        """``softmax_cross_entropy`` with the head's class weights and label smoothing."""
        return softmax_cross_entropy(logits, y, class_weights=self.class_weights,
                                     label_smoothing=self.label_smoothing)

    def backward(self):
        """Returns ``dh (N, D)`` and writes ``grads["W"]``, ``grads["b"]`` in place."""
        h, dlogits = self._take_cache()
        # The products run on the thread pool when there is one (npsoftmax.parallel.matmul).
        parallel.matmul(h.T, dlogits, out=self.grads["W"])
        np.sum(dlogits, axis=0, out=self.grads["b"])
        return parallel.matmul(dlogits, self.params["W"].T)

    def log_prob(self, h):
        """``log_softmax(h W + b)`` (N, K)."""
        return log_softmax(self.logits(h))
