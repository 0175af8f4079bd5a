"""Train the default CNN with one of the softmax heads in PyTorch, on the CPU or a GPU.

    python examples/train_torch.py --softmax adaptive --dataset digits --epochs 5
    python examples/train_torch.py --softmax gumbel --device cuda --epochs 30

The same command line as ``train_np.py`` plus ``--device cpu|cuda``, and the same
training loop: the npsoftmax :class:`~npsoftmax.train.Trainer` (data order,
normalisation and augmentation, learning-rate and temperature schedules, evaluation,
``history.json``, best weights) with the torch backend
(:class:`npsoftmax.torch_backend.TorchBackend`), which trains the torch twin of the
npsoftmax model built with the same seed (so the same initial weights).

Written to ``--run-dir`` (default ``runs/<dataset>-<softmax>-torch``): what a NumPy run
writes (``history.json``, ``args.json``, ``weights.npz`` in npsoftmax names, plots)
plus ``model.pt`` (the torch ``state_dict``). Torch runs do not resume (``--resume``
is refused): the torch optimizer state is not checkpointed.
"""

import os
import sys

from npsoftmax.cli import (EXIT_DATA_ERROR, EXIT_DIVERGED, EXIT_OK, RunFolderError, build_parser, build_training,
                           check_args, finish_run, load_dataset, prepare_run_dir, summary_table, write_json)


def run(args):
    """Train with parsed arguments; returns the exit code (0, 2 data/setup error, 3 diverged)."""
    from npsoftmax.torch_adapter import require_torch

    torch = require_torch()
    from npsoftmax.data import DatasetError
    from npsoftmax.torch_backend import TorchBackend
    from npsoftmax.train import TrainingDiverged

    if args.resume:
        print("error: train_torch.py does not resume; use train_np.py --resume", file=sys.stderr)
        return EXIT_DATA_ERROR
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return EXIT_DATA_ERROR
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(limits=args.threads)
    args.run_dir = args.run_dir or os.path.join("runs", f"{args.dataset}-{args.softmax}-torch")
    try:
        prepare_run_dir(args.run_dir, resume=False, overwrite=args.overwrite)
        dataset = load_dataset(args)
        trainer = build_training(args, dataset)
    except (DatasetError, RunFolderError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DATA_ERROR
    torch.manual_seed(args.seed)  # torch-side randomness: Gumbel noise, dropout masks
    trainer.backend = TorchBackend(trainer.model, trainer.optimizer, device=args.device)
    print(f"npsoftmax/torch: {args.softmax} head on {args.dataset} ({len(dataset.train)} train / "
          f"{len(dataset.test)} test images, {dataset.n_classes} classes), device {args.device}, "
          f"run dir {trainer.run_dir}")
    write_json(os.path.join(trainer.run_dir, "args.json"), vars(args))
    try:
        history = trainer.fit()
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    print(summary_table(history))
    paths = finish_run(trainer, dataset)
    model_path = os.path.join(trainer.run_dir, "model.pt")
    torch.save(trainer.backend.model.state_dict(), model_path)
    for path in paths + [model_path]:
        print(f"wrote {path}")
    return EXIT_OK


def main(argv=None):
    parser = build_parser("Train the default CNN with one of the softmax heads in PyTorch.", torch=True)
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
