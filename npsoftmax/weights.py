"""Weights files: a trained model in one ``.npz`` that rebuilds itself, with no run folder needed.

    from npsoftmax.weights import save_weights, load_weights
    save_weights("weights.npz", model, mean=mean, std=std, meta={"epoch": 12})
    model, info = load_weights("weights.npz")     # info["mean"], info["std"] (C,), info["meta"]

The file uses the checkpoint layout (``checkpoint.py``: same checksum and checks) with
no optimizer state. Its ``meta`` holds ``model``, the arguments of
:func:`npsoftmax.models.build_model` that are plain values (head name, K, image shape,
widths, convs per block, feature size, batch norm, dtype, head options such as ``tau`` or ``cutoffs``),
and the per-channel ``mean``/``std`` the images were normalised with; array-valued
head options (a hierarchical head's tree) are stored as ``model/`` arrays.
"""

import numpy as np

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, copy_into

WEIGHTS_KIND = "npsoftmax-weights"


def model_description(model):
    """(spec, arrays) that rebuild ``model``: a JSON-able dict and a dict of arrays.

    ``model`` must come from :func:`npsoftmax.models.build_model` (which records
    ``model.spec``). A ``Tree`` option becomes ``tree.child_offsets`` / ``tree.children``.
    """
    from .heads import Tree

    spec = getattr(model, "spec", None)
    if spec is None:
        raise ValueError("model has no .spec: only models built by npsoftmax.models.build_model can be saved "
                         "as a weights file")
    options, arrays = {}, {}
    for key, value in spec["head_options"].items():
        if isinstance(value, Tree):
            arrays["tree.child_offsets"] = value.child_offsets
            arrays["tree.children"] = value.children
            options[key] = {"array": "tree"}
        elif isinstance(value, np.ndarray):
            arrays[f"option.{key}"] = value
            options[key] = {"array": f"option.{key}"}
        else:
            options[key] = value
    return {**spec, "head_options": options}, arrays


def build_from_description(spec, arrays):
    """Rebuild the model :func:`model_description` described (fresh parameters, to be overwritten)."""
    from .heads import Tree
    from .models import build_model

    options = {}
    for key, value in spec["head_options"].items():
        if isinstance(value, dict) and value.get("array") == "tree":
            options[key] = Tree(arrays["tree.child_offsets"], arrays["tree.children"], spec["n_classes"])
        elif isinstance(value, dict) and "array" in value:
            options[key] = arrays[value["array"]]
        else:
            options[key] = value
    return build_model(spec["head"], spec["n_classes"], tuple(spec["image_shape"]), rng=np.random.default_rng(0),
                       dtype=np.dtype(spec["dtype"]), widths=tuple(spec["widths"]),
                       feature_dim=spec["feature_dim"], batch_norm=spec["batch_norm"],
                       convs_per_block=spec.get("convs_per_block", 1),  # files written before it existed: 1
                       head_options=options)


def save_weights(path, model, *, mean, std, meta=None):
    """Write ``model``'s parameters, buffers and description, plus the normalisation ``mean``/``std`` (C,)."""
    spec, arrays = model_description(model)
    info = {"kind": WEIGHTS_KIND, "model": spec, "mean": [float(v) for v in np.ravel(mean)],
            "std": [float(v) for v in np.ravel(std)], **(meta or {})}
    save_checkpoint(path, params=model.params, buffers=model.buffers, meta=info, model_arrays=arrays)


def load_weights(path):
    """Rebuild the model stored by :func:`save_weights`.

    Returns ``(model, info)``: the model in eval mode with the stored parameters and buffers,
    and ``info``, the file's meta dict with ``mean``/``std`` as (C,) float64 arrays. Raises
    :class:`~npsoftmax.checkpoint.CheckpointError` for a damaged file or one that is not a
    weights file.
    """
    stored = load_checkpoint(path, required_meta=("kind", "model", "mean", "std"))
    info = stored["meta"]
    if info["kind"] != WEIGHTS_KIND:
        raise CheckpointError(f"{path} is a {info['kind']!r} file, not an npsoftmax weights file")
    try:
        model = build_from_description(info["model"], stored["model_arrays"])
        copy_into(model.params, stored["params"], "params")
        copy_into(model.buffers, stored["buffers"], "buffers")
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: the stored model cannot be rebuilt ({error})") from None
    info["mean"] = np.asarray(info["mean"], dtype=np.float64)
    info["std"] = np.asarray(info["std"], dtype=np.float64)
    return model.eval(), info
