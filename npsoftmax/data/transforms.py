"""Per-batch preprocessing: channel statistics, normalisation to float NCHW, augmentation.

Datasets stay uint8 NHWC in memory; each batch is converted when it is used:

    mean, std = channel_mean_std(data.train.images)              # (C,), (C,) on the 0..1 scale
    x = normalize(data.train.images[batch], mean, std)            # (B, C, H, W) float32
    x = random_flip(random_crop(x, pad=4, rng=rng), rng=rng)      # the standard CIFAR augmentation

``normalize`` computes ``(pixel / 255 - mean) / std`` per channel, so ``mean`` and
``std`` are on the 0..1 scale (CIFAR-100 train: about (0.507, 0.487, 0.441) and
(0.267, 0.256, 0.276)). The augmentations are vectorised over the batch (no Python
loop per image), draw from a ``numpy.random.Generator`` (reproducible from a seed),
keep the input dtype and never modify their input.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..validation import check_generator, check_nchw, check_uint8_images

_STATS_CHUNK = 4096  # images per chunk: bounds the intp codes to ~100 MB for CIFAR




def channel_mean_std(images):
    """Per-channel mean and (population, ddof=0) std of uint8 NHWC ``images`` on the 0..1 scale.

    ``images`` (N, H, W, C) uint8 -> ``(mean, std)``, each (C,) float64. A uint8 channel
    takes only 256 values, so its exact histogram ``count[c, v]`` (chunk by chunk, one
    ``bincount``) is all we need: mean = sum_v count v / total and
    var = sum_v count (v - mean)^2 / total, the two-pass formula with no cancellation,
    and the dataset is never copied to float.
    """
    check_uint8_images(images)
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image, got N = 0")
    channels = images.shape[3]
    histogram = np.zeros(channels * 256, dtype=np.int64)
    channel_offset = 256 * np.arange(channels, dtype=np.intp)
    for start in range(0, images.shape[0], _STATS_CHUNK):
        # Code c * 256 + v counts value v in channel c: one bincount for all channels.
        codes = images[start:start + _STATS_CHUNK].reshape(-1, channels) + channel_offset
        histogram += np.bincount(codes.reshape(-1), minlength=channels * 256)
    histogram = histogram.reshape(channels, 256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = histogram.sum(axis=1)
    mean = histogram @ values / total
    variance = np.einsum("cv,cv->c", histogram, (values - mean[:, None]) ** 2) / total
    return mean, np.sqrt(variance)


def normalize(images, mean, std, dtype=np.float32):
    """uint8 NHWC ``images`` (N, H, W, C) -> ``(images / 255 - mean) / std`` as (N, C, H, W) ``dtype``.

    ``mean``, ``std``: (C,) on the 0..1 scale (see ``channel_mean_std``), std > 0.
    ``dtype`` is float32 (training) or float64 (gradient checks); the arithmetic is
    done in ``dtype`` as one multiply-add per channel: v * a + b with
    a = 1 / (255 std) and b = -mean / std.
    """
    check_uint8_images(images)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    channels = images.shape[3]
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    for name, value in (("mean", mean), ("std", std)):
        if value.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) (one per channel), got {value.shape}")
    if not np.all(std > 0):
        raise ValueError(f"std must be positive in every channel, got {std}")
    scale = (1.0 / (255.0 * std)).astype(dtype).reshape(channels, 1, 1)
    shift = (-mean / std).astype(dtype).reshape(channels, 1, 1)
    out = np.empty((images.shape[0], channels) + images.shape[1:3], dtype=dtype)
    out[...] = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW while converting, one pass
    out *= scale
    out += shift
    return out


def random_crop(x, pad=4, *, rng):
    """Zero-pad ``x`` (N, C, H, W) by ``pad`` on each side and cut a random H x W window per image.

    Each image gets its own offset (dy, dx) in [0, 2 pad] x [0, 2 pad], drawn from
    ``rng``. ``sliding_window_view`` exposes all (2 pad + 1)^2 windows of the padded
    batch as a (N, C, 2p+1, 2p+1, H, W) view without copying; one fancy index then
    picks window (dy_i, dx_i) of image i. ``pad = 0`` returns an unchanged copy.
    Returns (N, C, H, W), same dtype.
    """
    check_nchw(x)
    rng = check_generator(rng)
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    n, _, height, width = x.shape
    offsets_y = rng.integers(0, 2 * pad + 1, size=n)
    offsets_x = rng.integers(0, 2 * pad + 1, size=n)
    if pad == 0:
        return x.copy()
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(padded, (height, width), axis=(2, 3))
    # The three index arrays broadcast to (N,) and, being split by the ':' for C,
    # their axis comes first: the result is (N, C, H, W).
    return windows[np.arange(n), :, offsets_y, offsets_x]


def random_flip(x, *, rng, probability=0.5):
    """Mirror each image of ``x`` (N, C, H, W) left-right with ``probability``; returns a new array."""
    check_nchw(x)
    rng = check_generator(rng)
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must lie in [0, 1], got {probability!r}")
    flip = rng.random(x.shape[0]) < probability
    out = x.copy()
    out[flip] = x[flip, :, :, ::-1]
    return out


def augment(x, *, rng, pad=4):
    """The standard CIFAR training augmentation: ``random_flip(random_crop(x, pad))``, (N, C, H, W)."""
    return random_flip(random_crop(x, pad, rng=rng), rng=rng)
