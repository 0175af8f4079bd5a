"""The dataset containers every loader returns, ``subset``, and ``load_cifar100``.

A loader returns an ``ImageDataset``: ``.train`` and ``.test`` are ``ImageSplit``s
holding uint8 NHWC images and int64 labels, plus the class names. Images stay uint8
in memory (CIFAR-100's 60,000 images are 184 MB as uint8, 737 MB as float32);
``transforms.normalize`` turns each batch into float NCHW when it is used.

``load_cifar100`` looks, in order, for the unpacked folder, then the archive, then
downloads the archive (see ``download.py`` for the safety rules); every failure is a
``DatasetError`` that says what was expected, what was found and how to fix it.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import download as _download
from .download import (ARCHIVE_NAME, FOLDER_NAME, DatasetCorruptError, DatasetNotFoundError,
                       download_archive, extract_archive, manual_instructions, offline_mode,
                       resolve_data_dir, verify_file)
from .official_format import read_batch_file, read_meta_file

_FILES = ("train", "test", "meta")


def _check_label_array(values, name, n_images):
    if not isinstance(values, np.ndarray) or values.dtype != np.int64 or values.ndim != 1:
        found = f"{values.dtype} array of shape {values.shape}" if isinstance(values, np.ndarray) \
            else type(values).__name__
        raise TypeError(f"{name} must be an int64 array of shape (N,), got {found}")
    if values.shape[0] != n_images:
        raise ValueError(f"{name} must have shape ({n_images},) (one per image), got {values.shape}")


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """One split: ``images`` (N, H, W, C) uint8, ``labels`` (N,) int64 fine labels,
    ``coarse_labels`` (N,) int64 superclass labels."""

    images: np.ndarray
    labels: np.ndarray
    coarse_labels: np.ndarray

    def __post_init__(self):
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            found = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) \
                else type(images).__name__
            raise TypeError(f"images must be a uint8 array of shape (N, H, W, C), got {found}")
        _check_label_array(self.labels, "labels", images.shape[0])
        _check_label_array(self.coarse_labels, "coarse_labels", images.shape[0])

    def __len__(self):
        return self.images.shape[0]

    def take(self, indices):
        """A new split holding the rows ``indices`` ((M,) ints) of this one (copies)."""
        indices = np.asarray(indices)
        return ImageSplit(self.images[indices], self.labels[indices], self.coarse_labels[indices])


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """``train`` / ``test`` ``ImageSplit``s and the names of the fine and coarse classes
    (``fine_names[label]``, ``coarse_names[coarse_label]``); ``val`` is a validation
    split held out of the training images by :func:`split_validation` (None until then)."""

    train: ImageSplit
    test: ImageSplit
    fine_names: tuple
    coarse_names: tuple
    val: ImageSplit = None

    @property
    def n_classes(self):
        """Number of fine classes, K."""
        return len(self.fine_names)

    def coarse_of_fine(self):
        """(K,) int64: the coarse label of every fine label, read off the training labels.

        This is the ``groups`` array ``tree_from_groups`` takes. Raises ValueError if a
        fine class is absent from ``train`` or appears under two coarse labels.
        """
        groups = np.full(self.n_classes, -1, dtype=np.int64)
        groups[self.train.labels] = self.train.coarse_labels
        consistent = groups[self.train.labels] == self.train.coarse_labels
        if not np.all(consistent) or np.any(groups < 0):
            absent = int(np.sum(groups < 0))
            raise ValueError(
                f"every fine class must appear in train under exactly one coarse label; {absent} of "
                f"{self.n_classes} classes are absent from the {len(self.train)} training images "
                f"(a subset needs at least one image per class)")
        return groups


def stratified_indices(labels, n, rng):
    """Pick ``n`` of the (N,) class ``labels`` at random, each class in proportion to its count.

    Within every class the examples are put in random order and the r-th gets the key
    (r + 0.5) / count: taking the n smallest keys gives each class about
    n * count / N examples (exactly, when that is an integer), and ties between
    classes are broken at random. Returns (n,) int64 indices in increasing order.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise ValueError(
            f"labels must be a 1-D array of non-negative ints, got {labels.dtype} {labels.shape}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n <= labels.shape[0]:
        raise ValueError(f"n must be an int in [1, {labels.shape[0]}], got {n!r}")
    rng = np.random.default_rng(rng)
    permutation = rng.permutation(labels.shape[0])
    shuffled = labels[permutation]
    counts = np.bincount(shuffled)
    by_class = np.argsort(shuffled, kind="stable")          # positions grouped by class, random order inside
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(labels.shape[0], dtype=np.int64)
    rank[by_class] = np.arange(labels.shape[0]) - starts[shuffled[by_class]]
    keys = (rank + 0.5) / counts[shuffled]
    chosen = permutation[np.argsort(keys, kind="stable")[:n]]
    return np.sort(chosen).astype(np.int64)


def subset(dataset, n, *, n_test=None, seed=0):
    """A smaller ``ImageDataset`` for quick runs (``--subset N``): stratified, reproducible.

    ``n`` training and ``n_test`` test examples (default ``min(n, len(test))``) are
    drawn with ``stratified_indices``, so class proportions are kept; ``seed`` is an
    int or a ``numpy.random.Generator``. Order inside each split is preserved.
    """
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
    n_test = min(n, len(dataset.test)) if n_test is None else n_test
    rng = np.random.default_rng(seed)
    return ImageDataset(dataset.train.take(stratified_indices(dataset.train.labels, n, rng)),
                        dataset.test.take(stratified_indices(dataset.test.labels, n_test, rng)),
                        dataset.fine_names, dataset.coarse_names)


def split_validation(dataset, n_val, *, seed=0):
    """Hold ``n_val`` training images out as ``dataset.val`` (stratified, reproducible).

    Every choice (recipe, epochs, temperature schedule, tree, cutoffs, which epoch to
    report) is made on this split; the test split is only reported. The images are
    drawn with :func:`stratified_indices` from ``seed`` (an int), so each class keeps its
    share, and the rest stay in ``train`` in their original order.

    Returns a new ``ImageDataset`` with ``train`` (N - n_val) and ``val`` (n_val);
    ``n_val == 0`` returns ``dataset`` unchanged (no validation split).
    """
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
    if isinstance(n_val, bool) or not isinstance(n_val, (int, np.integer)) or not 0 <= n_val < len(dataset.train):
        raise ValueError(f"n_val must be an int in [0, {len(dataset.train) - 1}] (the training images "
                         f"minus at least one), got {n_val!r}")
    if n_val == 0:
        return dataset
    # A generator of its own (not the --subset one), so the split does not depend on --subset's draws.
    held_out = stratified_indices(dataset.train.labels, int(n_val), np.random.default_rng([seed, 1]))
    keep = np.ones(len(dataset.train), dtype=bool)
    keep[held_out] = False
    return ImageDataset(dataset.train.take(np.flatnonzero(keep)), dataset.test, dataset.fine_names,
                        dataset.coarse_names, val=dataset.train.take(held_out))


def _read_split(path, fine_names, coarse_names):
    images, fine, coarse = read_batch_file(path)
    for name, values, count in (("fine_labels", fine, len(fine_names)),
                                ("coarse_labels", coarse, len(coarse_names))):
        if values.size and (values.min() < 0 or values.max() >= count):
            raise DatasetCorruptError(
                f"{path}: expected {name} in [0, {count}) (meta lists {count} names), "
                f"found values in [{values.min()}, {values.max()}]")
    return ImageSplit(images, fine, coarse)


def load_cifar100_folder(folder):
    """Read ``folder/{meta,train,test}`` (official format) into an ``ImageDataset``.

    Images (N, 32, 32, 3) uint8; labels (N,) int64. Raises ``DatasetError`` naming
    the file that is missing, truncated or malformed.
    """
    folder = Path(folder)
    fine_names, coarse_names = read_meta_file(folder / "meta")
    return ImageDataset(_read_split(folder / "train", fine_names, coarse_names),
                        _read_split(folder / "test", fine_names, coarse_names),
                        fine_names, coarse_names)


def _describe(folder, archive):
    """What is on disk, in one line, for error messages."""
    if folder.is_dir():
        present = [name for name in _FILES if (folder / name).is_file()]
        missing = [name for name in _FILES if name not in present]
        found = f"{folder}/ holds {present or 'none of them'}, lacks {missing}"
    else:
        found = f"no folder {folder}/"
    if archive.is_file():
        return f"{found}; {archive} has {archive.stat().st_size:,} bytes"
    return f"{found}; no {archive}"


def load_cifar100(data_dir=None, download=True, *, url=None, timeout=None, progress=True):
    """Load CIFAR-100, unpacking or downloading it first when needed.

    ``data_dir`` is the folder that holds ``cifar-100-python/`` (or the archive
    ``cifar-100-python.tar.gz``); default ``$NPSOFTMAX_DATA`` or ``~/.cache/npsoftmax``.
    Order: (1) load ``cifar-100-python/{train,test,meta}`` if all three exist;
    (2) else verify (size + md5) and safely unpack the archive if present; (3) else,
    when ``download`` is true and ``NPSOFTMAX_OFFLINE`` is not 1, download it from
    ``url`` (default ``download.CIFAR100_URL``) with ``timeout`` seconds per connect/read.

    Returns an ``ImageDataset``: ``.train`` (50,000) and ``.test`` (10,000) with
    ``.images`` (N, 32, 32, 3) uint8 NHWC, ``.labels`` (N,) int64 fine labels in
    [0, 100), ``.coarse_labels`` (N,) int64 in [0, 20); ``.fine_names`` and
    ``.coarse_names`` from ``meta``. Raises ``DatasetNotFoundError`` (nothing usable,
    download impossible) or ``DatasetCorruptError`` (a file is damaged), with
    instructions for placing the archive by hand.
    """
    root = resolve_data_dir(data_dir)
    folder = root / FOLDER_NAME
    archive = root / ARCHIVE_NAME
    help_text = manual_instructions(root, url)
    if not all((folder / name).is_file() for name in _FILES):
        if archive.is_file():
            try:
                # Module attributes read now, so tests can substitute a small archive's checksums.
                verify_file(archive, _download.ARCHIVE_SIZE, _download.ARCHIVE_MD5)
            except DatasetCorruptError as error:
                raise DatasetCorruptError(
                    f"{error}.\nDelete {archive} and run again to download it afresh.\n{help_text}") from None
        elif not download or offline_mode():
            reason = "download=False" if not download else f"{_download.OFFLINE_ENV} is set"
            raise DatasetNotFoundError(
                f"CIFAR-100 not found and not downloaded ({reason}).\n"
                f"Expected {folder}/{{train,test,meta}} or {archive}; found {_describe(folder, archive)}.\n"
                f"{help_text}")
        else:
            download_archive(root, url=url, timeout=timeout, progress=progress)
        try:
            extract_archive(archive, root, required=_FILES)
        except DatasetCorruptError as error:
            raise DatasetCorruptError(f"{error}\n{help_text}") from None
    try:
        return load_cifar100_folder(folder)
    except DatasetCorruptError as error:
        raise DatasetCorruptError(
            f"{error}\nDelete {folder}/ to unpack it again from {archive}, or replace the file.\n"
            f"{help_text}") from None
