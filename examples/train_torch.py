"""Train the default CNN with one of the four softmax heads in PyTorch, on the CPU or a GPU.

    python examples/train_torch.py --softmax adaptive --dataset digits --epochs 5
    python examples/train_torch.py --softmax gumbel --device cuda --epochs 30

The same command line as ``train_np.py`` (one parser, :func:`npsoftmax.cli.build_parser`)
plus ``--device cpu|cuda``. The model is built by npsoftmax exactly as ``train_np.py``
builds it (same seed, so the same initial weights), converted with
``npsoftmax.torch_adapter.to_torch``, and trained with the ``torch.optim`` twin of the
npsoftmax optimizer, the same learning-rate and temperature schedules, and the same
batches in the same order (the npsoftmax ``Trainer``'s shuffling, normalisation and
augmentation). Evaluation reuses ``Trainer.evaluate``, so ``history.json`` has the same
records (accuracy, macro P/R/F1, seconds per epoch, head ms per batch) and
``examples/compare.py``-style tools can set numpy and torch runs side by side.

Written to ``--run-dir`` (default ``runs/<dataset>-<softmax>-torch``): ``history.json``,
``args.json``, the plots, ``model.pt`` (torch ``state_dict``) and ``weights.npz``
(the trained weights converted back to npsoftmax names, in the checkpoint format).
"""

import json
import os
import sys
import time

import numpy as np

from npsoftmax.cli import EXIT_DATA_ERROR, EXIT_DIVERGED, build_parser, build_training, check_args, load_dataset, \
    summary_table, write_plots
from npsoftmax.weights import save_weights
from npsoftmax.torch_adapter import copy_from_torch, head_loss, require_torch, to_torch, to_torch_optimizer


def build_torch_parser(description=None):
    """``train_np.py``'s parser plus ``--device``."""
    parser = build_parser(description or "Train the default CNN with one of four softmax heads in PyTorch.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where torch trains")
    return parser


def apply_schedules(trainer, step, torch_optimizer, torch_head):
    """Set the scheduled lr (and Gumbel tau) for ``step`` on the torch side; returns the values."""
    values = trainer.scheduler.apply(step)  # computes them (and sets them on the numpy twin)
    if "lr" in values:
        for group in torch_optimizer.param_groups:
            group["lr"] = values["lr"]
    if "tau" in values:
        torch_head.tau = values["tau"]
    return values


class TorchEvaluationModel:
    """What ``Trainer.evaluate`` needs from a model (``eval``, ``train``, ``log_prob``), run in torch."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def eval(self):
        self.model.eval()
        return self

    def train(self):
        self.model.train()
        return self

    def log_prob(self, x):
        """x (N, C, H, W) numpy -> (N, K) numpy log-probabilities."""
        torch = require_torch()
        with torch.no_grad():
            return self.model.log_prob(torch.from_numpy(x).to(self.device)).cpu().numpy()


def _synchronize(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(trainer, model, optimizer, device):
    """One epoch in torch; returns the same training figures as ``Trainer.train_epoch``.

    The head runs on detached features so that its forward + backward can be timed
    on its own (``head_seconds``), then the body's backward continues from their gradient.
    """
    torch = require_torch()
    model.train()
    total_loss, total_correct, seen, head_seconds = 0.0, 0, 0, 0.0
    start = time.perf_counter()
    for x, y in trainer.batches():
        values = apply_schedules(trainer, trainer.step, optimizer, model.head)
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        optimizer.zero_grad(set_to_none=True)
        features = model.body(x)
        head_input = features.detach().requires_grad_(True)
        _synchronize(torch, device)
        head_start = time.perf_counter()
        with torch.no_grad():
            predictions = model.head.predict(head_input)
        loss = head_loss(model.head, head_input, y)
        loss.backward()
        _synchronize(torch, device)
        head_seconds += time.perf_counter() - head_start
        features.backward(head_input.grad)
        loss_value = loss.item()
        if not np.isfinite(loss_value):
            raise FloatingPointError(
                f"the training loss became {loss_value} at epoch {trainer.epoch + 1}, step {trainer.step} "
                f"(lr={optimizer.param_groups[0]['lr']:g}{', tau=%g' % values['tau'] if 'tau' in values else ''})")
        optimizer.step()
        trainer.step += 1
        total_loss += loss_value * len(y)
        total_correct += int((predictions == y).sum().item())
        seen += len(y)
    _synchronize(torch, device)
    seconds = time.perf_counter() - start
    return {
        "train_loss": total_loss / seen,
        "train_top1": total_correct / seen,
        "epoch_seconds": seconds,
        "head_seconds": head_seconds,
        "head_ms_per_batch": 1e3 * head_seconds / trainer.steps_per_epoch,
        "images_per_second": seen / seconds,
    }


def run(args):
    """Train with parsed arguments; returns the exit code (0, 2 data/setup error, 3 diverged)."""
    torch = require_torch()
    if args.resume:
        print("error: train_torch.py does not resume; use train_np.py --resume", file=sys.stderr)
        return EXIT_DATA_ERROR
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return EXIT_DATA_ERROR
    device = torch.device(args.device)
    args.run_dir = args.run_dir or os.path.join("runs", f"{args.dataset}-{args.softmax}-torch")
    from npsoftmax.data import DatasetError

    try:
        dataset = load_dataset(args)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DATA_ERROR
    torch.manual_seed(args.seed)  # torch-side randomness: Gumbel noise, dropout masks
    # The numpy Trainer builds the model, optimizer and schedules exactly as train_np.py,
    # and owns the data order; the torch twin does the training.
    trainer = build_training(args, dataset)
    numpy_model = trainer.model
    model = to_torch(numpy_model, device=device)
    optimizer = to_torch_optimizer(trainer.optimizer, model)
    trainer.model = TorchEvaluationModel(model, device)  # Trainer.evaluate now runs torch
    print(f"npsoftmax/torch: {args.softmax} head on {args.dataset} ({len(dataset.train)} train / "
          f"{len(dataset.test)} test images, {dataset.n_classes} classes), device {device}, "
          f"run dir {trainer.run_dir}")
    os.makedirs(trainer.run_dir, exist_ok=True)
    while trainer.epoch < trainer.epochs:
        record = {"epoch": trainer.epoch + 1, "lr": float(optimizer.param_groups[0]["lr"])}
        if hasattr(model.head, "tau"):
            record["tau"] = float(model.head.tau)
        try:
            record.update(train_epoch(trainer, model, optimizer, device))
        except FloatingPointError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_DIVERGED
        test_record, trainer.last_confusion = trainer.evaluate()
        record.update({f"test_{key}": value for key, value in test_record.items()})
        trainer.epoch += 1
        trainer.history.append(record)
        with open(trainer.history_path, "w") as stream:
            json.dump(trainer.history, stream, indent=1)
        print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, test top-1 "
              f"{record['test_top1']:.4f}, {record['epoch_seconds']:.2f} s")
    print(summary_table(trainer.history))
    with open(os.path.join(trainer.run_dir, "args.json"), "w") as stream:
        json.dump(vars(args), stream, indent=1)
    torch.save(model.state_dict(), os.path.join(trainer.run_dir, "model.pt"))
    copy_from_torch(model, numpy_model)  # back to npsoftmax names and layouts
    save_weights(os.path.join(trainer.run_dir, "weights.npz"), numpy_model, mean=trainer.mean, std=trainer.std,
                 meta={"trained_with": "torch", "device": str(device), "epoch": trainer.epoch,
                       "step": trainer.step, "identity": trainer.identity})
    for path in [*write_plots(trainer, dataset), trainer.history_path]:
        print(f"wrote {path}")
    return 0


def main(argv=None):
    parser = build_torch_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
