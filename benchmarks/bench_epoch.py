"""Seconds per CIFAR-100 epoch and peak memory, on a synthetic CIFAR-shaped dataset.

The real dataset cannot be downloaded on every machine, but an epoch's cost does
not depend on the pixel values: this builds ``--train`` random uint8 images of
shape 32x32x3 with 100 classes (the full CIFAR-100 training set is 50,000) and
``--test`` test images, then runs the real :class:`~npsoftmax.train.Trainer`
(default CNN, the chosen head, augmentation on, batch 128) for one epoch, and
prints the epoch's training seconds, the evaluation seconds, and the peak
resident memory of the process (the dataset is kept as uint8; batches are
converted on the fly).

    python benchmarks/bench_epoch.py                        # softmax head, 50,000 + 10,000 images
    python benchmarks/bench_epoch.py --softmax hierarchical --train 10000
"""

import argparse
import resource
import sys
import tempfile
import time

import numpy as np

from npsoftmax.cli import HEAD_NAMES
from npsoftmax.data import COARSE_NAMES, COARSE_OF_FINE, FINE_NAMES, ImageDataset, ImageSplit
from npsoftmax.models import build_model
from npsoftmax.optim import SGD
from npsoftmax.train import Trainer


def synthetic_split(n, rng):
    """n random CIFAR-shaped images (n, 32, 32, 3) uint8 with fine and coarse labels."""
    labels = rng.integers(0, 100, n)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return ImageSplit(images, labels.astype(np.int64), COARSE_OF_FINE[labels])


def peak_rss_mib():
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--softmax", choices=HEAD_NAMES, default="softmax")
    parser.add_argument("--train", type=int, default=50_000, help="training images (default 50,000)")
    parser.add_argument("--test", type=int, default=10_000, help="test images (default 10,000)")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    dataset = ImageDataset(synthetic_split(args.train, rng), synthetic_split(args.test, rng), FINE_NAMES,
                           COARSE_NAMES)
    options = {"tree": "cifar100"} if args.softmax == "hierarchical" else {}
    model = build_model(args.softmax, 100, (3, 32, 32), rng=rng, head_options=options)
    optimizer = SGD(model.params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, optimizer, dataset, epochs=1, batch_size=args.batch_size, run_dir=run_dir,
                          augment=True, progress=sys.stderr.isatty())
        record = trainer.train_epoch()
        start = time.perf_counter()
        trainer.evaluate()
        evaluation = time.perf_counter() - start
    print(f"{args.softmax} head, {args.train} training images, batch {args.batch_size}, float32")
    print(f"train epoch: {record['epoch_seconds']:.1f} s ({record['images_per_second']:.0f} img/s, "
          f"head {record['head_seconds']:.2f} s)")
    print(f"evaluation of {args.test} images: {evaluation:.1f} s")
    print(f"peak resident memory: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
