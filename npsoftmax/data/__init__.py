"""Datasets and per-batch transforms: uint8 NHWC images in, float NCHW batches out.

    import numpy as np
    from npsoftmax.data import load_cifar100, channel_mean_std, normalize, augment
    data = load_cifar100()      # .train/.test: images (N, 32, 32, 3) uint8, labels (N,) int64
    mean, std = channel_mean_std(data.train.images)
    x = augment(normalize(data.train.images[:128], mean, std), rng=np.random.default_rng(0))

Files: ``cifar100.py`` (containers, ``subset``, the loader), ``download.py`` (fetch,
verify, unpack; the error classes), ``official_format.py`` (read/write the official
pickles), ``digits.py`` (scikit-learn's digits, offline), ``transforms.py``,
``cifar100_classes.py`` (label names and the 20 x 5 superclass table as constants).
Importing this package is cheap: tqdm and scikit-learn are imported only when used.
"""

from .cifar100 import (ImageDataset, ImageSplit, load_cifar100, load_cifar100_folder,
                       split_validation, stratified_indices, subset)
from .cifar100_classes import COARSE_NAMES, COARSE_OF_FINE, FINE_NAMES
from .digits import load_digits_images
from .download import (DatasetCorruptError, DatasetError, DatasetNotFoundError, default_data_dir,
                       download_archive, extract_archive, verify_file)
from .official_format import (make_cifar100_archive, read_batch_file, read_meta_file,
                              write_cifar100_files)
from .transforms import augment, channel_mean_std, normalize, random_crop, random_flip

__all__ = [
    "ImageDataset", "ImageSplit", "load_cifar100", "load_cifar100_folder", "stratified_indices",
    "split_validation", "subset", "COARSE_NAMES", "COARSE_OF_FINE", "FINE_NAMES", "load_digits_images",
    "DatasetCorruptError", "DatasetError", "DatasetNotFoundError", "default_data_dir",
    "download_archive", "extract_archive", "verify_file", "make_cifar100_archive",
    "read_batch_file", "read_meta_file", "write_cifar100_files", "augment", "channel_mean_std",
    "normalize", "random_crop", "random_flip",
]
