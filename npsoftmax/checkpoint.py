"""Checkpoints: one ``.npz`` file per run holding everything needed to resume exactly.

Layout of the archive (flat keys, plain arrays, so ``np.load`` can read it anywhere)::

    param/<name>      every model parameter            (e.g. param/body.0.w)
    buffer/<name>     non-trainable state               (batch-norm running stats)
    optim/<key>       optimizer state (momentum buffers, Adam moments, step count)
    meta              a 0-d unicode array holding JSON: epoch, RNG states, anything extra

Saving is atomic: the archive is written to a temporary file in the same folder
and moved over the old one with ``os.replace``, so a run killed mid-save leaves
the previous checkpoint intact, never a truncated file.
"""

import json
import os
import tempfile
import zipfile

import numpy as np

FORMAT_VERSION = 1


def generator_state(generator):
    """JSON-serialisable state of a ``numpy.random.Generator``."""
    return generator.bit_generator.state


def restore_generator(generator, state):
    """Put ``generator`` back into a state captured by :func:`generator_state`."""
    generator.bit_generator.state = state


def save_checkpoint(path, *, params, buffers=None, optimizer_state=None, meta=None):
    """Atomically write a checkpoint.

    Parameters
    ----------
    path : str or Path, ending in ``.npz``
    params, buffers : dict name -> ndarray
    optimizer_state : dict key -> ndarray or scalar (``optimizer.state_dict()``)
    meta : dict, JSON-serialisable (epoch, RNG states, history length ...)
    """
    path = os.fspath(path)
    arrays = {f"param/{name}": np.asarray(value) for name, value in params.items()}
    arrays.update({f"buffer/{name}": np.asarray(value) for name, value in (buffers or {}).items()})
    arrays.update({f"optim/{key}": np.asarray(value) for key, value in (optimizer_state or {}).items()})
    arrays["meta"] = np.array(json.dumps({"format_version": FORMAT_VERSION, **(meta or {})}))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".checkpoint-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def load_checkpoint(path):
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns
    -------
    dict with keys ``params``, ``buffers``, ``optimizer_state`` (dicts of arrays)
    and ``meta`` (dict).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            contents = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"checkpoint {path} is unreadable or truncated: {error}") from error
    if "meta" not in contents:
        raise ValueError(f"checkpoint {path} has no 'meta' entry: not an npsoftmax checkpoint")
    result = {"params": {}, "buffers": {}, "optimizer_state": {}, "meta": json.loads(str(contents.pop("meta")))}
    sections = {"param": "params", "buffer": "buffers", "optim": "optimizer_state"}
    for key, value in contents.items():
        section, _, name = key.partition("/")
        result[sections[section]][name] = value
    return result


def copy_into(destination, source, what):
    """Copy arrays from ``source`` into the live arrays of ``destination`` (same keys and shapes).

    Used to restore params and buffers in place, so optimizers holding references keep working.
    """
    if set(destination) != set(source):
        missing = sorted(set(destination) - set(source))
        unexpected = sorted(set(source) - set(destination))
        raise ValueError(f"{what}: checkpoint does not match the model (missing {missing}, unexpected {unexpected})")
    for name, array in destination.items():
        if array.shape != source[name].shape:
            raise ValueError(f"{what}[{name!r}]: model has shape {array.shape}, checkpoint {source[name].shape}")
        array[...] = source[name]
