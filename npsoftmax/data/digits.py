"""scikit-learn's bundled handwritten digits as an ``ImageDataset``: real images, no network.

1,797 grey 8x8 images of the digits 0-9 (UCI "optdigits"), shipped inside
scikit-learn, so examples, notebooks and tests can train on real data offline in
seconds. The loader returns the same containers as ``load_cifar100``:

* ``images`` (N, 8, 8, 1) uint8: the original values are ink counts 0..16 and are
  rescaled to 0..255 with ``round(v * 255 / 16)``, so the same ``transforms`` code
  (which divides by 255) serves both datasets;
* ``labels`` (N,) int64, the digit;
* ``coarse_labels`` (N,) int64 = ``label % 2`` with ``coarse_names = ('even', 'odd')``:
  an arbitrary but balanced 2 x 5 grouping, there so the group-built hierarchical
  softmax can be tried on digits the way CIFAR-100 uses its 20 x 5 superclasses.

The train/test split is stratified (every digit keeps its share) and fixed by ``seed``.
"""

import numpy as np

from .cifar100 import ImageDataset, ImageSplit, stratified_indices

#: Names of the digit classes and of the even/odd groups.
DIGIT_NAMES = tuple(str(digit) for digit in range(10))
PARITY_NAMES = ("even", "odd")


def load_digits_images(test_fraction=0.2, seed=0):
    """Load the scikit-learn digits as an ``ImageDataset``, split train/test by ``seed``.

    ``test_fraction`` in (0, 1) of the 1,797 images go to ``test`` (rounded, stratified).
    Returns images (N, 8, 8, 1) uint8 in 0..255, labels (N,) int64 in [0, 10),
    coarse_labels (N,) int64 in {0, 1} (even / odd). Needs scikit-learn (imported here,
    not when the package is imported).
    """
    if not (isinstance(test_fraction, float) and 0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("load_digits_images needs scikit-learn: pip install scikit-learn") from error
    bunch = load_digits()
    # Values are integers 0..16; rint makes the rescaling exact and symmetric (16 -> 255).
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., np.newaxis]
    labels = np.asarray(bunch.target, dtype=np.int64)
    n_test = int(round(test_fraction * labels.shape[0]))
    if not 0 < n_test < labels.shape[0]:
        raise ValueError(f"test_fraction={test_fraction} leaves an empty split of {labels.shape[0]} images")
    is_test = np.zeros(labels.shape[0], dtype=bool)
    is_test[stratified_indices(labels, n_test, np.random.default_rng(seed))] = True

    def split(mask):
        return ImageSplit(images[mask], labels[mask], labels[mask] % 2)

    return ImageDataset(split(~is_test), split(is_test), DIGIT_NAMES, PARITY_NAMES)
