"""Models: a CNN body that turns images into features, and a classifier = body + head.

The default body for 32x32x3 CIFAR images (any square input whose side is
divisible by 8 works, e.g. 8x8x1 digits)::

    x (N, C, S, S)
      -> [Conv2d 3x3 pad 1 -> BatchNorm2d -> MaxPool2d 2 -> ReLU]  x 3   widths (32, 64, 128)
      -> Flatten                                  (N, 128 * (S/8)^2)
      -> Linear -> ReLU                           h (N, feature_dim=256)
      -> head (softmax | gumbel | hierarchical | adaptive | sampled) -> loss / log-probabilities (N, K)

Each conv block halves the spatial size; batch norm can be switched off
(``batch_norm=False``) for the plain variant used in benchmarks. A deeper body
(``convs_per_block=2``, VGG's pattern) puts more convs of the same width before each
pool, each but the last followed by its own ReLU at full resolution::

      -> [(Conv2d 3x3 -> BatchNorm2d -> ReLU) x (n - 1) -> Conv2d 3x3 -> BatchNorm2d -> MaxPool2d 2 -> ReLU]
"""

import numpy as np

from .heads import make_head
from .layers import BatchNorm2d, Container, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential
from .validation import check_int

DEFAULT_WIDTHS = (32, 64, 128)
DEFAULT_FEATURE_DIM = 256


def cnn_body(image_shape, *, widths=DEFAULT_WIDTHS, feature_dim=DEFAULT_FEATURE_DIM, batch_norm=True,
             convs_per_block=1, input_gradient=False, rng, dtype=np.float32):
    """Build the conv body.

    Parameters
    ----------
    image_shape : tuple (C, H, W)
        One input image, channels first. H and W must be divisible by 2**len(widths).
    widths : sequence of int
        Output channels of each conv block.
    feature_dim : int
        D, the size of the feature vector ``h`` handed to the head.
    batch_norm : bool
    convs_per_block : int >= 1
        3x3 convs in each block, all of the block's width (the first takes the previous
        block's channels). Only the block's last conv is pooled.
    input_gradient : bool
        Whether ``backward`` computes d loss / d image. Training never needs it (the
        images are not parameters), so by default the first conv skips that col2im,
        as PyTorch does for inputs that do not require grad; set True for saliency maps
        or a gradient check with respect to the input.
    rng : numpy.random.Generator
    dtype : float32 (training) or float64 (gradient checks)

    Returns
    -------
    body : Sequential, mapping (N, C, H, W) -> (N, feature_dim)
    """
    channels, height, width = (int(size) for size in image_shape)
    convs_per_block = check_int(convs_per_block, "convs_per_block")
    downsample = 2 ** len(widths)
    if height % downsample or width % downsample:
        raise ValueError(
            f"image_shape {tuple(image_shape)}: height and width must be divisible by "
            f"2**len(widths) = {downsample} (one 2x2 max pool per conv block)"
        )
    modules = []
    in_channels = channels
    for out_channels in widths:
        for conv in range(convs_per_block):
            if conv:  # the previous conv's ReLU, at full resolution (only a block's last conv is pooled)
                modules.append(ReLU())
            # Batch norm subtracts the per-channel mean, which cancels a conv bias exactly
            # (its gradient is 0), so the conv has a bias only when there is no batch norm.
            modules.append(Conv2d(in_channels, out_channels, 3, pad=1, rng=rng, dtype=dtype, bias=not batch_norm,
                                  input_gradient=input_gradient or bool(modules)))
            if batch_norm:
                modules.append(BatchNorm2d(out_channels, dtype=dtype))
            in_channels = out_channels
        # Pool, then ReLU: the same function as ReLU then pool, bit for bit, because ReLU is
        # non-decreasing, so max(relu(a), relu(b)) = relu(max(a, b)); the gradients agree
        # too (a window whose max is negative passes no gradient either way). Pooling first
        # hands the ReLU a quarter of the values: its forward and backward cost a quarter.
        modules += [MaxPool2d(2), ReLU()]
    flat = in_channels * (height // downsample) * (width // downsample)
    modules += [Flatten(), Linear(flat, feature_dim, rng=rng, dtype=dtype), ReLU()]
    return Sequential(*modules)


class Classifier(Container):
    """A body (images -> features) followed by a head (features -> class log-probabilities).

    A :class:`~npsoftmax.layers.Container`: parameters are exposed under
    ``"body.<name>"`` and ``"head.<name>"`` in one ``params`` dict of live arrays (what
    the optimizer updates), with matching ``grads`` and ``buffers`` (batch-norm running
    statistics), and ``train()``/``eval()`` reach both parts.
    """

    def __init__(self, body, head):
        super().__init__()
        self.body = body
        self.head = head

    def named_children(self):
        return [("body", self.body), ("head", self.head)]

    def forward(self, x, y):
        """x (N, C, H, W), y (N,) int -> mean negative log-likelihood (float)."""
        return self.head.forward(self.body.forward(x), y)

    def backward(self):
        """Back-propagate the last ``forward``'s loss; fills ``grads``.

        Returns dx (N, C, H, W), or None when the body was built with
        ``input_gradient=False`` (the default: training does not need it).
        """
        return self.body.backward(self.head.backward())

    def log_prob(self, x):
        """x (N, C, H, W) -> exact log-probabilities (N, K)."""
        return self.head.log_prob(self.body.forward(x))

    def predict(self, x):
        """x (N, C, H, W) -> (N,) predicted class: the exact argmax of ``log_prob``."""
        return self.head.predict(self.body.forward(x))


def build_model(head_name, n_classes, image_shape, *, rng, dtype=np.float32, widths=DEFAULT_WIDTHS,
                feature_dim=DEFAULT_FEATURE_DIM, batch_norm=True, convs_per_block=1, input_gradient=False,
                head_options=None):
    """The default CNN ending in the registered head ``head_name``.

    Parameters
    ----------
    head_name : str
        One of ``npsoftmax.heads.HEADS`` ("softmax", "gumbel", "hierarchical", "adaptive", "sampled").
    n_classes : int
        K.
    image_shape : tuple (C, H, W)
    widths, feature_dim, batch_norm, convs_per_block, input_gradient : see :func:`cnn_body`
    head_options : dict, optional
        Extra keyword arguments for the head (``tau``, ``cutoffs``, ``tree`` ...).

    Returns
    -------
    Classifier
    """
    # Separate streams: the body's initial weights do not depend on which head follows it,
    # so runs that differ only in the head start from the same body.
    body_rng, head_rng = rng.spawn(2)
    body = cnn_body(image_shape, widths=widths, feature_dim=feature_dim, batch_norm=batch_norm,
                    convs_per_block=convs_per_block, input_gradient=input_gradient, rng=body_rng, dtype=dtype)
    head = make_head(head_name, feature_dim, n_classes, rng=head_rng, dtype=dtype, **(head_options or {}))
    model = Classifier(body, head)
    # What rebuilds this model from a weights file (npsoftmax.weights): every argument but the rng.
    model.spec = {"head": head_name, "n_classes": int(n_classes), "image_shape": [int(v) for v in image_shape],
                  "widths": [int(v) for v in widths], "feature_dim": int(feature_dim),
                  "batch_norm": bool(batch_norm), "convs_per_block": int(convs_per_block),
                  "dtype": np.dtype(dtype).name,
                  "head_options": dict(head_options or {})}
    return model
