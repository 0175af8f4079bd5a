"""Checkpoints: one ``.npz`` file per run holding everything needed to resume exactly.

Layout of the archive (flat keys, plain arrays, so ``np.load`` can read it anywhere)::

    param/<name>      every model parameter            (e.g. param/body.0.w)
    buffer/<name>     non-trainable state               (batch-norm running stats)
    optim/<key>       optimizer state (momentum buffers, Adam moments, step count)
    model/<name>      arrays that describe the model's structure (a hierarchical head's tree)
    meta              a 0-d unicode array holding JSON: epoch, RNG states, the run's identity ...
    checksum          sha256 of everything above (names, dtypes, shapes, bytes, meta)

Saving is atomic: the archive is written to a temporary file in the same folder
and moved over the old one with ``os.replace``, so a run killed mid-save leaves
the previous checkpoint intact, never a truncated file (a kill -9 can leave the
temporary ``.checkpoint-*.npz`` behind: :func:`remove_stale_temporaries` clears them).

Loading trusts nothing: a file that is truncated, bit-flipped (checksum), lacks a
required entry, or holds NaN/inf parameters raises :class:`CheckpointError` with
one message saying which.
"""

import glob
import hashlib
import json
import os
import tempfile
import zipfile

import numpy as np

FORMAT_VERSION = 2
TEMPORARY_PREFIX = ".checkpoint-"
_SECTIONS = {"param": "params", "buffer": "buffers", "optim": "optimizer_state", "model": "model_arrays"}


class CheckpointError(ValueError):
    """A checkpoint (or weights file) that cannot be trusted: unreadable, damaged, incomplete or not finite."""


def content_checksum(arrays):
    """sha256 hex digest of a dict name -> ndarray: names, dtypes, shapes and bytes, in sorted order.

    A flipped bit anywhere in the values, a renamed entry or a changed shape changes it.
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def non_finite_entries(arrays):
    """Names of the floating-point arrays in ``arrays`` (dict) that hold a NaN or an infinity."""
    return sorted(name for name, value in arrays.items()
                  if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.all(np.isfinite(value)))


def remove_stale_temporaries(directory):
    """Delete the ``.checkpoint-*.npz`` files an interrupted save left in ``directory``; returns their paths.

    Only call this when no other process writes checkpoints into ``directory``.
    """
    stale = sorted(glob.glob(os.path.join(glob.escape(os.fspath(directory)), TEMPORARY_PREFIX + "*.npz")))
    for path in stale:
        os.unlink(path)
    return stale


def generator_state(generator):
    """JSON-serialisable state of a ``numpy.random.Generator``."""
    return generator.bit_generator.state


def restore_generator(generator, state):
    """Put ``generator`` back into a state captured by :func:`generator_state`."""
    generator.bit_generator.state = state


def save_checkpoint(path, *, params, buffers=None, optimizer_state=None, meta=None, model_arrays=None):
    """Atomically write a checkpoint.

    Parameters
    ----------
    path : str or Path, ending in ``.npz``
    params, buffers : dict name -> ndarray
    optimizer_state : dict key -> ndarray or scalar (``optimizer.state_dict()``)
    meta : dict, JSON-serialisable (epoch, RNG states, history length ...)
    model_arrays : dict name -> ndarray, structure needed to rebuild the model (optional)
    """
    path = os.fspath(path)
    arrays = {f"param/{name}": np.asarray(value) for name, value in params.items()}
    arrays.update({f"buffer/{name}": np.asarray(value) for name, value in (buffers or {}).items()})
    arrays.update({f"optim/{key}": np.asarray(value) for key, value in (optimizer_state or {}).items()})
    arrays.update({f"model/{key}": np.asarray(value) for key, value in (model_arrays or {}).items()})
    arrays["meta"] = np.array(json.dumps({"format_version": FORMAT_VERSION, **(meta or {})}))
    arrays["checksum"] = np.array(content_checksum(arrays))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=".npz", dir=directory)
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


def write_json(path, value):
    """Write ``value`` as JSON to ``path`` atomically (a temporary file, then a rename), like the checkpoints."""
    path = os.fspath(path)
    temporary = path + ".tmp"
    with open(temporary, "w") as stream:
        json.dump(value, stream, indent=1)
    os.replace(temporary, path)


def load_checkpoint(path, *, required_meta=()):
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : str or Path
    required_meta : names that must be present in ``meta`` (e.g. ``("epoch", "rng_states")``)

    NaN/inf in params or buffers is refused: a diverged model is not a checkpoint.

    Returns
    -------
    dict with keys ``params``, ``buffers``, ``optimizer_state``, ``model_arrays`` (dicts of
    arrays) and ``meta`` (dict). Raises :class:`CheckpointError` (a ``ValueError``) naming
    the problem, or ``FileNotFoundError``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            contents = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as error:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({error})") from None
    if "meta" not in contents:
        raise CheckpointError(f"checkpoint {path} has no 'meta' entry: not an npsoftmax checkpoint")
    stored = contents.pop("checksum", None)
    if stored is None:
        raise CheckpointError(f"checkpoint {path} has no checksum: written by an older npsoftmax "
                              f"(format 1) or not by npsoftmax; it cannot be verified")
    if str(stored) != content_checksum(contents):
        raise CheckpointError(f"checkpoint {path} is damaged: its content does not match its checksum")
    try:
        meta = json.loads(str(contents.pop("meta")))
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path}: its meta entry is not valid JSON ({error})") from None
    missing = [name for name in required_meta if name not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing} in its meta entry")
    result = {section: {} for section in _SECTIONS.values()}
    result["meta"] = meta
    for key, value in contents.items():
        section, _, name = key.partition("/")
        if section not in _SECTIONS:
            raise CheckpointError(f"checkpoint {path} has an unknown entry {key!r}")
        result[_SECTIONS[section]][name] = value
    bad = non_finite_entries({**result["params"], **result["buffers"]})
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN or inf in {bad[:5]}"
                              f"{' and %d more' % (len(bad) - 5) if len(bad) > 5 else ''}: "
                              f"it was saved from a diverged model and cannot be resumed")
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
