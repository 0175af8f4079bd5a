"""Re-check a trained model from its weights file alone: rebuild it, evaluate the test split, print the metrics.

    python examples/evaluate.py --weights results/cifar100/softmax/weights.npz --data-dir DEST --no-download
    python examples/evaluate.py --weights results/cifar100/softmax/weights.npz --data-dir DEST --json

The weights file (written by every run, see ``npsoftmax.weights``) records the head and
its options, the architecture, the normalisation statistics and the run's identity
(data set, ``--subset``, seed), so the model and the exact test split it was evaluated
on are rebuilt from it; the numbers are the trainer's own (same code path, same batch
size). ``--json`` prints one JSON object with ``head``, ``test_top1``, ``test_top5``,
``nll``, ``ece``, ``n_test``, macro P/R/F1 and, on CIFAR-100, ``coarse_top1`` and
``in_superclass_error_share``.

Exit codes: 0 ok; 2 usage, data or weights-file error.
"""

import argparse
import json
import sys
import time
from types import SimpleNamespace

import numpy as np

from npsoftmax.checkpoint import CheckpointError
from npsoftmax.cli import EXIT_DATA_ERROR, load_dataset
from npsoftmax.data import DatasetError
from npsoftmax.metrics import evaluation_record
from npsoftmax.train import predict_log_probs
from npsoftmax.weights import load_weights


def evaluate_weights(path, *, data_dir=None, download=True, progress=False):
    """Evaluate the weights file ``path`` on its run's test split; returns a flat dict of metrics."""
    model, info = load_weights(path)
    identity = info.get("identity") or {}
    if "dataset" not in identity:
        raise CheckpointError(f"{path} does not record which data set it was trained on (no identity)")
    # The same options the run loaded its data with, so --subset picks the same test images.
    data_args = SimpleNamespace(dataset=identity["dataset"], data_dir=data_dir, no_download=not download,
                                no_progress=not progress, seed=identity["seed"], subset=identity.get("subset"),
                                val=identity.get("val", 0))
    dataset = load_dataset(data_args)
    start = time.perf_counter()
    log_probs = predict_log_probs(model, dataset.test.images, info["mean"], info["std"],
                                  dtype=np.dtype(info["model"]["dtype"]))
    seconds = time.perf_counter() - start
    groups = dataset.coarse_of_fine() if identity["dataset"] == "cifar100" else None
    record, _ = evaluation_record(log_probs, dataset.test.labels, groups)
    result = {"head": info["model"]["head"], "tree": identity.get("tree") if identity.get("softmax") ==
              "hierarchical" else None, "epoch": info.get("epoch"), "n_test": int(len(dataset.test)),
              "nll": record.pop("loss")}
    result.update({f"test_{key}" if key in ("top1", "top5") else key: value for key, value in record.items()})
    result["seconds"] = seconds
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--weights", required=True, help="a weights.npz written by train_np.py / compare.py")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding cifar-100-python/ (default $NPSOFTMAX_DATA or ~/.cache/npsoftmax)")
    parser.add_argument("--no-download", action="store_true", help="never touch the network")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        result = evaluate_weights(args.weights, data_dir=args.data_dir, download=not args.no_download,
                                  progress=not args.json)
    except (CheckpointError, DatasetError, FileNotFoundError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DATA_ERROR
    if args.json:
        print(json.dumps(result))
    else:
        width = max(len(key) for key in result)
        for key, value in result.items():
            print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
