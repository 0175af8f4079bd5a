"""Train the same model in npsoftmax and in PyTorch in lockstep; report how far apart they end up.

    python examples/parity.py --softmax adaptive --dataset digits
    python examples/parity.py --softmax gumbel --dataset digits --steps 500 --dtype float32

Both frameworks start from the same initial weights (the npsoftmax model, converted
with ``to_torch``), see the same batches in the same order (the npsoftmax
``Trainer``'s shuffling and augmentation), use the same optimizer, learning-rate and
temperature schedules, and the Gumbel head gets the same noise in both. After
``--steps`` optimizer steps it prints the largest absolute difference between the
two sets of weights (and batch-norm statistics) and writes ``parity.png``, the two
loss curves overlaid with their difference underneath, and ``parity.json``.

float64 by default: the two then differ only by summation order (about 1e-16 per
operation), so the weights stay within ~1e-10 after hundreds of steps. In float32 the
rounding differences are ~1e-7 per step and SGD amplifies them; the curves still
overlap but the weights drift apart slowly. Every ``train_np.py`` option applies.
"""

import json
import math
import os
import sys

# npsoftmax's Cython kernels and torch both use OpenMP threads. Alternating between them
# every step, idle threads spin-wait and starve the busy ones, and on a busy machine every
# barrier waits for a descheduled thread: 5-10x slower on 2 cores. This is a correctness
# tool on small models, so it runs single-threaded unless OMP_NUM_THREADS says otherwise
# (set before numpy's kernels or torch start their thread pools, i.e. before importing them).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from npsoftmax.cli import build_parser, build_training, load_dataset, parse_args, resolve_defaults  # noqa: E402
from npsoftmax.torch_adapter import buffers_from_torch, params_from_torch, require_torch  # noqa: E402


def build_parity_parser():
    """``train_torch.py``'s parser plus ``--steps``, ``--out-dir`` and ``--tolerance``; float64 by default."""
    parser = build_parser("Train the same model in npsoftmax and PyTorch in lockstep and compare.", torch=True)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps in each framework")
    parser.add_argument("--out-dir", default=None,
                        help="where parity.png and parity.json go (default runs/parity-<dataset>-<softmax>)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="exit with status 1 if the max weight difference exceeds this")
    parser.set_defaults(dtype="float64", no_progress=True)
    return parser


def largest_differences(ours, theirs):
    """{name: max |ours[name] - theirs[name]|} for matching dicts of arrays."""
    return {name: float(np.max(np.abs(ours[name] - theirs[name]))) for name in ours}


def plot_losses(numpy_losses, torch_losses, path, title, dtype):
    """Both loss curves overlaid (top) and their relative difference per step (bottom); returns ``path``."""
    from npsoftmax.plots import _pyplot, _save

    plt = _pyplot()
    steps = np.arange(1, len(numpy_losses) + 1)
    figure, (loss_axis, difference_axis) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                                        gridspec_kw={"height_ratios": [2, 1]})
    loss_axis.plot(steps, numpy_losses, label="npsoftmax", linewidth=2.5, alpha=0.6)
    loss_axis.plot(steps, torch_losses, label="PyTorch", linestyle="--", color="black", linewidth=1)
    loss_axis.set(ylabel="training loss (mean NLL)", title=title)
    loss_axis.legend()
    # Relative difference; exact agreement (0) is drawn at the floor, a tenth of the dtype's eps.
    theirs = np.asarray(torch_losses)
    difference = np.abs(np.asarray(numpy_losses) - theirs) / np.maximum(np.abs(theirs), np.finfo(dtype).tiny)
    floor = 0.1 * np.finfo(dtype).eps
    difference_axis.semilogy(steps, np.maximum(difference, floor), color="C3")
    difference_axis.set(xlabel="optimizer step", ylabel="relative loss difference", ylim=(floor / 2, None))
    for axis in (loss_axis, difference_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path, plt)


def run_parity(args):
    """Train both twins for ``args.steps`` steps; returns a dict of losses, differences and the plot path."""
    torch = require_torch()
    if args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    device = torch.device(args.device)
    out_dir = args.out_dir or os.path.join("runs", f"parity-{args.dataset}-{args.softmax}")
    resolve_defaults(args)
    dataset = load_dataset(args)
    # Enough epochs for the steps, so that the lr schedule spans exactly this run.
    args.epochs = math.ceil(args.steps / math.ceil(len(dataset.train) / args.batch_size))
    args.run_dir = out_dir
    trainer = build_training(args, dataset)
    model = trainer.model
    # The two backends of the one training loop, stepped side by side on the trainer's batches.
    from npsoftmax.torch_backend import TorchBackend

    numpy_side = trainer.backend.train()
    torch_side = TorchBackend(model, trainer.optimizer, device=device).train()
    twin = torch_side.model
    numpy_losses, torch_losses = [], []
    while trainer.step < args.steps:
        for x, y in trainer.batches():
            values = trainer.scheduler.apply(trainer.step)  # sets the numpy side's lr and tau
            torch_side.apply_schedule(values)
            numpy_losses.append(numpy_side.train_step(x, y).loss)
            noise = getattr(model.head, "last_noise", None)  # the Gumbel head's noise, shared
            torch_losses.append(torch_side.train_step(x, y, noise=noise).loss)
            trainer.step += 1
            if trainer.step == args.steps:
                break
    weights = largest_differences(model.params, params_from_torch(model, twin))
    buffers = largest_differences(model.buffers, buffers_from_torch(model, twin))
    os.makedirs(out_dir, exist_ok=True)
    title = f"{args.softmax} head on {args.dataset}, {args.dtype}, {args.steps} steps"
    plot = plot_losses(numpy_losses, torch_losses, os.path.join(out_dir, "parity.png"), title,
                       np.dtype(args.dtype))
    result = {
        "softmax": args.softmax, "dataset": args.dataset, "dtype": args.dtype, "device": str(device),
        "steps": args.steps, "numpy_losses": numpy_losses, "torch_losses": torch_losses,
        "max_loss_difference": float(np.max(np.abs(np.subtract(numpy_losses, torch_losses)))),
        "max_weight_difference": max(weights.values()),
        "max_buffer_difference": max(buffers.values(), default=0.0),
        "max_weight": float(max(np.max(np.abs(value)) for value in model.params.values())),
        "weight_differences": weights, "buffer_differences": buffers, "plot": plot,
    }
    with open(os.path.join(out_dir, "parity.json"), "w") as stream:
        json.dump(result, stream, indent=1)
    return result


def main(argv=None):
    args = parse_args(build_parity_parser(), argv)
    result = run_parity(args)
    worst = sorted(result["weight_differences"].items(), key=lambda item: -item[1])[:3]
    print(f"{result['softmax']} head on {result['dataset']}, {result['dtype']}, {result['device']}: "
          f"{result['steps']} steps in npsoftmax and PyTorch from the same weights and batches")
    print(f"  loss    step 1 {result['numpy_losses'][0]:.6f} / {result['torch_losses'][0]:.6f}, "
          f"step {result['steps']} {result['numpy_losses'][-1]:.6f} / {result['torch_losses'][-1]:.6f} "
          f"(numpy / torch); max |difference| {result['max_loss_difference']:.3e}")
    print(f"  weights max |difference| {result['max_weight_difference']:.3e} "
          f"(largest |weight| {result['max_weight']:.3g}); worst: "
          + ", ".join(f"{name} {value:.2e}" for name, value in worst))
    print(f"  batch-norm running statistics max |difference| {result['max_buffer_difference']:.3e}")
    print(f"wrote {result['plot']}")
    if args.tolerance is not None and result["max_weight_difference"] > args.tolerance:
        print(f"error: weights differ by more than --tolerance {args.tolerance:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
