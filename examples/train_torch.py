"""Train the default CNN with one of the softmax heads in PyTorch, on the CPU or a GPU.

    python examples/train_torch.py --softmax adaptive --dataset digits --epochs 5
    python examples/train_torch.py --softmax gumbel --device cuda --epochs 30

The same command line as ``train_np.py`` plus ``--device cpu|cuda``, and the same
run: :func:`npsoftmax.cli.run` and its :class:`~npsoftmax.train.Trainer` (data order,
normalisation and augmentation, learning-rate and temperature schedules, evaluation,
``history.json``, best weights), with the torch backend
(:class:`npsoftmax.torch_backend.TorchBackend`) doing the steps on the torch twin of the
npsoftmax model built with the same seed (so the same initial weights).

Written to ``--run-dir`` (default ``runs/<dataset>-<softmax>-torch``): what a NumPy run
writes (``history.json``, ``args.json``, ``weights.npz`` in npsoftmax names, plots)
plus ``model.pt`` (the torch ``state_dict`` of the same best epoch). Torch runs do not resume (``--resume``
is refused): the torch optimizer state is not checkpointed.
"""

import os
import sys

from npsoftmax.cli import EXIT_DATA_ERROR, build_parser, parse_args, run


def main(argv=None):
    args = parse_args(build_parser("Train the default CNN with one of the softmax heads in PyTorch.", torch=True),
                      argv)
    from npsoftmax.torch_adapter import require_torch

    torch = require_torch()
    if args.resume:
        print("error: train_torch.py does not resume (the torch optimizer state is not checkpointed); "
              "use train_np.py --resume", file=sys.stderr)
        return EXIT_DATA_ERROR
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return EXIT_DATA_ERROR
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.run_dir = args.run_dir or os.path.join("runs", f"{args.dataset}-{args.softmax}-torch")
    torch.manual_seed(args.seed)  # torch-side randomness: Gumbel noise, dropout masks

    def make_backend(trainer):
        from npsoftmax.torch_backend import TorchBackend

        return TorchBackend(trainer.model, trainer.optimizer, device=args.device)

    return run(args, make_backend)


if __name__ == "__main__":
    sys.exit(main())
