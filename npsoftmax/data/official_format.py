"""Read and write the files of the official CIFAR-100 "python version", bit for bit.

The archive unpacks to ``cifar-100-python/`` holding three pickles (protocol 2,
written by Python 2, so they are read with ``encoding="latin1"``):

* ``train`` / ``test``: a dict with
  ``data``          uint8 array (N, 3072): per image the 1024 red values, then the
                    1024 green, then the 1024 blue ("channel-major"), each plane a
                    32x32 image stored row by row;
  ``fine_labels``   list of N ints in [0, 100);
  ``coarse_labels`` list of N ints in [0, 20);
  ``filenames``     list of N str;  ``batch_label``  str.
* ``meta``: a dict with ``fine_label_names`` (100 str) and ``coarse_label_names`` (20 str).

So one row reshapes to (3, 32, 32) = (C, H, W), and the package's images are
(N, 32, 32, 3) NHWC uint8: ``data.reshape(N, 3, 32, 32).transpose(0, 2, 3, 1)``.

Unpickling can run arbitrary code, so the reader uses an unpickler that only
resolves the few numpy globals an array needs; anything else is refused. The
writer produces the same structure, so tests (and users building subsets) can make
small datasets the loader cannot tell from the real one.
"""

import os
import pickle
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .cifar100_classes import COARSE_NAMES, FINE_NAMES
from .download import FOLDER_NAME, DatasetCorruptError, DatasetNotFoundError, file_md5

#: (H, W, C) of one CIFAR image.
IMAGE_SHAPE = (32, 32, 3)
#: Keys of a ``train`` / ``test`` pickle and of ``meta``.
BATCH_KEYS = ("data", "fine_labels", "coarse_labels", "filenames", "batch_label")
META_KEYS = ("fine_label_names", "coarse_label_names")
#: ``batch_label`` values of the official files.
BATCH_LABELS = {"train": "training batch 1 of 1", "test": "testing batch 1 of 1"}

# Globals an ndarray pickle needs. Python 2 / numpy 1 files name numpy.core, numpy 2
# names numpy._core; both resolve to numpy._core (the numpy.core shim warns on access).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),  # protocol 2 stores bytes this way
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, str, ints and numpy arrays, nothing else."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        module, name = _ALLOWED_GLOBALS[module, name]
        return super().find_class(module, name)


def _load_pickle(path):
    """Unpickle ``path`` (latin1) into a dict; clear DatasetError naming the file on any failure."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: expected a CIFAR-100 pickle file, found nothing")
    try:
        with open(path, "rb") as handle:
            content = _ArrayOnlyUnpickler(handle, encoding="latin1").load()
    except Exception as error:  # truncation and garbage surface as many exception types
        raise DatasetCorruptError(
            f"{path}: cannot unpickle ({type(error).__name__}: {error}); "
            f"the file is truncated or corrupt ({path.stat().st_size:,} bytes, md5 {file_md5(path)})"
        ) from None
    if not isinstance(content, dict):
        raise DatasetCorruptError(f"{path}: expected a pickled dict, found {type(content).__name__}")
    return content


def _require_keys(content, keys, path):
    missing = [key for key in keys if key not in content]
    if missing:
        raise DatasetCorruptError(
            f"{path}: expected keys {list(keys)}, missing {missing} (found {sorted(map(str, content))})")


def channel_major_to_nhwc(data, height=32, width=32):
    """(N, C*H*W) channel-major rows -> contiguous (N, H, W, C) images, same dtype."""
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] % (height * width) != 0:
        raise ValueError(
            f"data must have shape (N, C*{height}*{width}), got shape {data.shape}")
    channels = data.shape[1] // (height * width)
    return np.ascontiguousarray(data.reshape(-1, channels, height, width).transpose(0, 2, 3, 1))


def nhwc_to_channel_major(images):
    """(N, H, W, C) images -> contiguous (N, C*H*W) rows (all of channel 0, then 1, ...)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W, C), got shape {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(images.shape[0], -1)


def read_batch_file(path):
    """Read an official ``train``/``test`` pickle.

    Returns ``(images, fine_labels, coarse_labels)``: (N, 32, 32, 3) uint8 NHWC,
    (N,) int64, (N,) int64. Raises ``DatasetCorruptError`` naming the file when it
    cannot be unpickled or does not have the official keys, dtypes and shapes.
    """
    content = _load_pickle(path)
    _require_keys(content, ("data", "fine_labels", "coarse_labels"), path)
    data = content["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != int(np.prod(IMAGE_SHAPE)):
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) \
            else type(data).__name__
        raise DatasetCorruptError(f"{path}: expected 'data' as a uint8 array (N, 3072), found {found}")
    labels = {}
    for key in ("fine_labels", "coarse_labels"):
        try:
            values = np.asarray(content[key])
            ok = values.ndim == 1 and values.dtype != bool and np.issubdtype(values.dtype, np.integer)
        except (TypeError, ValueError):
            ok = False
        if not ok or values.shape[0] != data.shape[0]:
            raise DatasetCorruptError(
                f"{path}: expected {key!r} as {data.shape[0]} integers (one per row of 'data'), "
                f"found {np.shape(content[key])} of {type(content[key]).__name__}")
        labels[key] = values.astype(np.int64)
    return (channel_major_to_nhwc(data, *IMAGE_SHAPE[:2]), labels["fine_labels"],
            labels["coarse_labels"])


def read_meta_file(path):
    """Read the official ``meta`` pickle -> ``(fine_names, coarse_names)``, two tuples of str."""
    content = _load_pickle(path)
    _require_keys(content, META_KEYS, path)
    names = []
    for key in META_KEYS:
        value = content[key]
        if not isinstance(value, (list, tuple)) or not value or \
                not all(isinstance(name, str) for name in value):
            raise DatasetCorruptError(
                f"{path}: expected {key!r} as a non-empty list of str, found {value!r:.80}")
        names.append(tuple(value))
    return names[0], names[1]


def _write_pickle_atomically(path, content):
    """Pickle ``content`` (protocol 2, like the official files) to ``path`` via a temp name."""
    path = Path(path)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".part",
                                         delete=False)
    try:
        with handle:
            pickle.dump(content, handle, protocol=2)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _check_labels(values, name, n_images, n_classes):
    values = np.asarray(values)
    if values.ndim != 1 or values.dtype == bool or not np.issubdtype(values.dtype, np.integer):
        raise TypeError(
            f"{name} must be a 1-D integer array (N,), got {values.dtype} of shape {values.shape}")
    if values.shape[0] != n_images:
        raise ValueError(f"{name} must have shape ({n_images},) (one per image), got {values.shape}")
    if values.size and (values.min() < 0 or values.max() >= n_classes):
        raise ValueError(
            f"{name} must lie in [0, {n_classes}), got values in [{values.min()}, {values.max()}]")
    return [int(value) for value in values]


def write_batch_file(path, images, fine_labels, coarse_labels, *, n_fine=100, n_coarse=20,
                     filenames=None, batch_label="training batch 1 of 1"):
    """Write one ``train``/``test`` pickle in the official format.

    ``images`` (N, 32, 32, 3) uint8 NHWC; ``fine_labels`` / ``coarse_labels`` (N,)
    integers in [0, n_fine) / [0, n_coarse). ``filenames`` defaults to
    ``image_000000.png``, ... Labels and filenames are stored as Python lists and
    ``data`` as a uint8 (N, 3072) channel-major array, exactly like the real files.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"images must have shape (N, 32, 32, 3), got shape {images.shape}")
    n_images = images.shape[0]
    fine = _check_labels(fine_labels, "fine_labels", n_images, n_fine)
    coarse = _check_labels(coarse_labels, "coarse_labels", n_images, n_coarse)
    if filenames is None:
        filenames = [f"image_{index:06d}.png" for index in range(n_images)]
    filenames = [str(name) for name in filenames]
    if len(filenames) != n_images:
        raise ValueError(f"filenames must have {n_images} entries, got {len(filenames)}")
    _write_pickle_atomically(path, {
        "filenames": filenames,
        "batch_label": str(batch_label),
        "fine_labels": fine,
        "coarse_labels": coarse,
        "data": nhwc_to_channel_major(images),
    })


def write_meta_file(path, fine_names=FINE_NAMES, coarse_names=COARSE_NAMES):
    """Write the official ``meta`` pickle: ``fine_label_names`` and ``coarse_label_names`` lists."""
    for name, value in (("fine_names", fine_names), ("coarse_names", coarse_names)):
        if isinstance(value, str) or not value or not all(isinstance(item, str) for item in value):
            raise TypeError(f"{name} must be a non-empty sequence of str, got {value!r:.80}")
    _write_pickle_atomically(path, {"fine_label_names": list(fine_names),
                                    "coarse_label_names": list(coarse_names)})


def write_cifar100_files(directory, *, train, test, fine_names=FINE_NAMES, coarse_names=COARSE_NAMES):
    """Write ``directory/cifar-100-python/{train,test,meta}`` in the official format.

    ``train`` and ``test`` are ``(images, fine_labels, coarse_labels)`` triples:
    (N, 32, 32, 3) uint8 NHWC, (N,) ints, (N,) ints. ``directory`` is what
    ``load_cifar100(data_dir=...)`` takes. Returns the ``cifar-100-python`` folder.
    """
    folder = Path(directory) / FOLDER_NAME
    folder.mkdir(parents=True, exist_ok=True)
    for split, triple in (("train", train), ("test", test)):
        if not (isinstance(triple, (tuple, list)) and len(triple) == 3):
            raise TypeError(f"{split} must be an (images, fine_labels, coarse_labels) triple, "
                            f"got {type(triple).__name__}")
        write_batch_file(folder / split, *triple, n_fine=len(fine_names), n_coarse=len(coarse_names),
                         batch_label=BATCH_LABELS[split])
    write_meta_file(folder / "meta", fine_names, coarse_names)
    return folder


def make_cifar100_archive(directory, archive_path=None):
    """Pack ``directory/cifar-100-python/`` into a .tar.gz laid out like the official one.

    ``archive_path`` defaults to ``directory/cifar-100-python.tar.gz``. Returns
    ``(path, size_in_bytes, md5_hex)``, the values ``download_archive`` and
    ``verify_file`` take.
    """
    folder = Path(directory) / FOLDER_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"expected a folder {folder} (see write_cifar100_files), found nothing")
    archive_path = Path(directory) / f"{FOLDER_NAME}.tar.gz" if archive_path is None else Path(archive_path)
    with tarfile.open(archive_path, "w:gz") as tar:
        tar.add(folder, arcname=FOLDER_NAME, recursive=False)
        for entry in sorted(folder.iterdir()):
            if entry.is_file():
                tar.add(entry, arcname=f"{FOLDER_NAME}/{entry.name}")
    return archive_path, archive_path.stat().st_size, file_md5(archive_path)
