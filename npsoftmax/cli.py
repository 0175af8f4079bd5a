"""The command line behind ``examples/train_np.py`` (and the shared parser of ``train_torch.py``).

    python examples/train_np.py --softmax gumbel --dataset digits --epochs 5
    python examples/train_np.py --softmax hierarchical --tree superclass --dataset cifar100

It loads the data (CIFAR-100 or the offline digits), builds the default CNN with
the chosen head, trains it with :class:`npsoftmax.train.Trainer`, then prints a
summary table and writes plots next to ``history.json`` in the run folder.
"""

import argparse
import json
import math
import os
import sys

import numpy as np

HEAD_NAMES = ("softmax", "gumbel", "hierarchical", "adaptive")
EXIT_DATA_ERROR = 2
EXIT_DIVERGED = 3


def build_parser(description=None):
    """The argument parser shared by ``train_np.py`` and ``train_torch.py``."""
    parser = argparse.ArgumentParser(
        description=description or "Train the default CNN with one of four softmax heads (NumPy/Cython).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--softmax", choices=HEAD_NAMES, default="softmax", help="which output head to train")
    model.add_argument("--widths", type=_int_list, default=None,
                       help="conv block widths, comma separated (default 32,64,128 for cifar100, 16,32,64 for digits)")
    model.add_argument("--feature-dim", type=int, default=None,
                       help="feature size D handed to the head (default 256 for cifar100, 128 for digits)")
    model.add_argument("--no-batch-norm", action="store_true", help="drop batch norm from the conv blocks")
    model.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                       help="float32 trains; float64 is for debugging and gradient checks")

    heads = parser.add_argument_group("heads")
    heads.add_argument("--tau", type=float, default=1.0, help="Gumbel: initial temperature tau0 (> 0)")
    heads.add_argument("--tau-min", type=float, default=0.5, help="Gumbel: floor of the annealed temperature")
    heads.add_argument("--anneal-rate", type=float, default=0.0,
                       help="Gumbel: tau_t = max(tau_min, tau0 * exp(-rate * t)); 0 keeps tau fixed")
    heads.add_argument("--anneal-every", choices=("step", "epoch"), default="epoch",
                       help="Gumbel: what t counts in the annealing formula")
    heads.add_argument("--cutoffs", type=_int_list, default=None,
                       help="adaptive: increasing class cutoffs, e.g. 20,50 (default K//5,K//2)")
    heads.add_argument("--div-value", type=float, default=4.0, help="adaptive: cluster i projects to D // div**(i+1)")
    heads.add_argument("--tree", choices=("superclass", "balanced", "huffman"), default=None,
                       help="hierarchical: tree over the classes (default superclass on cifar100, balanced otherwise)")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=("cifar100", "digits"), default="cifar100",
                      help="cifar100 (downloads 169 MB once) or scikit-learn's offline 8x8 digits")
    data.add_argument("--data-dir", default=None,
                      help="folder holding cifar-100-python/ or the .tar.gz (default $NPSOFTMAX_DATA or ~/.cache/npsoftmax)")
    data.add_argument("--no-download", action="store_true",
                      help="never touch the network (same as NPSOFTMAX_OFFLINE=1)")
    data.add_argument("--subset", type=int, default=None, metavar="N",
                      help="train on a stratified subset of N images (and at most N test images) for quick runs")
    data.add_argument("--no-augment", action="store_true",
                      help="disable random crop + flip (always off for digits)")

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=10)
    training.add_argument("--batch-size", type=int, default=128)
    training.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    training.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.05 sgd, 0.001 adam)")
    training.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    training.add_argument("--nesterov", action="store_true", help="SGD with Nesterov momentum")
    training.add_argument("--weight-decay", type=float, default=5e-4)
    training.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine",
                          help="learning-rate schedule (stepped every batch)")
    training.add_argument("--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up length")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--threads", type=int, default=None,
                          help="limit OpenBLAS and OpenMP threads (default: all cores; use 1 on a busy machine, "
                               "where idle threads spinning against other processes can slow steps 10x)")

    output = parser.add_argument_group("output")
    output.add_argument("--run-dir", default=None, help="where history, checkpoint and plots go (default runs/<dataset>-<softmax>)")
    output.add_argument("--resume", action="store_true", help="continue from run-dir/checkpoint.npz if present")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    output.add_argument("--profile", type=int, nargs="?", const=20, default=None, metavar="STEPS",
                        help="time STEPS training steps (default 20) layer by layer, print the table and exit")
    return parser


def _int_list(text):
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def load_dataset(args):
    """The ImageDataset named by ``--dataset`` (with ``--subset``); raises DatasetError on failure."""
    from .data import load_cifar100, load_digits_images, subset

    if args.dataset == "digits":
        dataset = load_digits_images(seed=args.seed)
    else:
        dataset = load_cifar100(args.data_dir, download=not args.no_download, progress=not args.no_progress)
    if args.subset is not None:
        dataset = subset(dataset, min(args.subset, len(dataset.train)), seed=args.seed)
    return dataset


def head_options(args, dataset):
    """Keyword options for the head chosen by ``--softmax``."""
    from .heads import balanced_tree, huffman_tree, tree_from_groups

    n_classes = dataset.n_classes
    if args.softmax == "gumbel":
        return {"tau": args.tau}
    if args.softmax == "adaptive":
        cutoffs = args.cutoffs or sorted({max(1, n_classes // 5), max(2, n_classes // 2)})
        return {"cutoffs": cutoffs, "div_value": args.div_value}
    if args.softmax == "hierarchical":
        tree = args.tree or ("superclass" if args.dataset == "cifar100" else "balanced")
        if tree == "superclass":
            return {"tree": tree_from_groups(dataset.coarse_of_fine())}
        if tree == "huffman":
            return {"tree": huffman_tree(np.bincount(dataset.train.labels, minlength=n_classes))}
        return {"tree": balanced_tree(n_classes)}
    return {}


def build_training(args, dataset):
    """Model, optimizer, schedules and Trainer from parsed arguments."""
    from .models import DEFAULT_FEATURE_DIM, DEFAULT_WIDTHS, build_model
    from .optim import SGD, Adam, ConstantSchedule, CosineSchedule, ExponentialTemperatureSchedule, StepSchedule
    from .train import Trainer

    dtype = np.dtype(args.dtype)
    digits = args.dataset == "digits"
    widths = args.widths or ((16, 32, 64) if digits else DEFAULT_WIDTHS)
    feature_dim = args.feature_dim or (128 if digits else DEFAULT_FEATURE_DIM)
    image_shape = tuple(np.roll(dataset.train.images.shape[1:], 1))  # (H, W, C) -> (C, H, W)
    rng = np.random.default_rng(args.seed)
    model = build_model(args.softmax, dataset.n_classes, image_shape, rng=rng, dtype=dtype, widths=widths,
                        feature_dim=feature_dim, batch_norm=not args.no_batch_norm,
                        head_options=head_options(args, dataset))
    lr = args.lr if args.lr is not None else (0.05 if args.optimizer == "sgd" else 1e-3)
    if args.optimizer == "sgd":
        optimizer = SGD(model.params, lr=lr, momentum=args.momentum, nesterov=args.nesterov,
                        weight_decay=args.weight_decay)
    else:
        optimizer = Adam(model.params, lr=lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(dataset.train) / args.batch_size)  # what Trainer.steps_per_epoch gives
    total_steps = steps_per_epoch * args.epochs
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    if args.schedule == "cosine":
        lr_schedule = CosineSchedule(lr, total_steps, warmup_steps=warmup)
    elif args.schedule == "step":
        lr_schedule = StepSchedule(lr, step_size=max(1, total_steps // 3), gamma=0.1, warmup_steps=warmup)
    else:
        lr_schedule = ConstantSchedule(lr)
    tau_schedule = None
    if args.softmax == "gumbel" and args.anneal_rate > 0:
        per_step = args.anneal_rate if args.anneal_every == "step" else args.anneal_rate / steps_per_epoch
        tau_schedule = ExponentialTemperatureSchedule(args.tau, args.tau_min, per_step)
    run_dir = args.run_dir or os.path.join("runs", f"{args.dataset}-{args.softmax}")
    trainer = Trainer(
        model, optimizer, dataset, epochs=args.epochs, batch_size=args.batch_size, run_dir=run_dir,
        seed=args.seed, augment=not (digits or args.no_augment), dtype=dtype, lr_schedule=lr_schedule,
        tau_schedule=tau_schedule, coarse_of_fine=None if digits else dataset.coarse_of_fine(),
        progress=not args.no_progress,
    )
    return trainer


def summary_table(history):
    """A plain-text table of the per-epoch history, one row per epoch."""
    columns = [("epoch", "d"), ("train_loss", ".4f"), ("train_top1", ".4f"), ("test_loss", ".4f"),
               ("test_top1", ".4f"), ("test_top5", ".4f"), ("test_macro_f1", ".4f"),
               ("epoch_seconds", ".2f"), ("head_seconds", ".3f")]
    lines = [" ".join(f"{name:>{len(name)}}" for name, _ in columns)]
    for record in history:
        lines.append(" ".join(f"{record.get(name, float('nan')):>{len(name)}{spec}}" for name, spec in columns))
    return "\n".join(lines)


def write_plots(trainer, dataset):
    """Curves and confusion matrices into the run folder; returns the paths written."""
    from .metrics import coarse_confusion
    from .plots import plot_confusion, plot_history

    paths = [plot_history(trainer.history, os.path.join(trainer.run_dir, "curves.png"),
                          title=os.path.basename(trainer.run_dir))]
    confusion = trainer.last_confusion
    names = dataset.fine_names if len(dataset.fine_names) <= 30 else None
    paths.append(plot_confusion(confusion, os.path.join(trainer.run_dir, "confusion.png"), names))
    if trainer.coarse_of_fine is not None:
        coarse = coarse_confusion(confusion, trainer.coarse_of_fine)
        paths.append(plot_confusion(coarse, os.path.join(trainer.run_dir, "confusion_superclass.png"),
                                    dataset.coarse_names, title="superclass confusion (20 x 20)"))
    return paths


def profile_steps(trainer, steps):
    """Run ``steps`` training steps under :func:`npsoftmax.profiler.profile`; return its table.

    Only the steps are timed (no evaluation), on the run's real batches; nothing is saved.
    """
    from .profiler import profile

    model, optimizer = trainer.model.train(), trainer.optimizer
    done = 0
    with profile(model, optimizer) as profiler:
        while done < steps:
            for x, y in trainer.batches():
                model.forward(x, y)
                model.backward()
                optimizer.step(model.grads)
                done += 1
                if done == steps:
                    break
    header = (f"profile of {steps} training steps: {trainer.model.head.__class__.__name__}, "
              f"batch {trainer.batch_size}, {trainer.dtype}")
    return header + "\n" + profiler.table()


def main(argv=None):
    """Entry point of ``examples/train_np.py``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))  # usage + message, exit status 2
    return run(args)


def check_args(args):
    """Raise ValueError naming the option when parsed arguments cannot describe a run."""
    for option, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--threads", args.threads),
                          ("--subset", args.subset), ("--profile", args.profile)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    if args.tree == "superclass" and args.dataset != "cifar100":
        raise ValueError("--tree superclass needs --dataset cifar100 (the digits have no superclasses)")
    if args.tau <= 0 or args.tau_min <= 0 or args.anneal_rate < 0:
        raise ValueError(f"--tau and --tau-min must be > 0 and --anneal-rate >= 0, got {args.tau}, "
                         f"{args.tau_min}, {args.anneal_rate}")


def busy_machine_warning():
    """A hint to use ``--threads 1`` when other processes already keep every core busy, else None.

    Idle BLAS threads spin while they wait; when another process holds the other cores,
    each multi-threaded GEMM waits for a thread that is not scheduled, and steps have
    been measured 10-30x slower (PERFORMANCE-NOTES, README "Threads").
    """
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return None
    if cores > 1 and load >= cores - 0.5:
        return (f"note: this machine is busy (load {load:.1f} on {cores} cores); multi-threaded BLAS can "
                f"stall next to other processes - if steps are slow, try --threads 1")
    return None


def run(args):
    """Train with parsed arguments that passed :func:`check_args`; returns the exit code."""
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=args.threads)  # BLAS and OpenMP pools, for this process
    else:
        hint = busy_machine_warning()
        if hint:
            print(hint, file=sys.stderr)
    from .data import DatasetError
    from .train import TrainingDiverged

    try:
        dataset = load_dataset(args)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DATA_ERROR
    trainer = build_training(args, dataset)
    if args.profile is not None:
        print(profile_steps(trainer, args.profile))
        return 0
    print(f"npsoftmax: {args.softmax} head on {args.dataset} "
          f"({len(dataset.train)} train / {len(dataset.test)} test images, {dataset.n_classes} classes), "
          f"run dir {trainer.run_dir}")
    try:
        history = trainer.fit(resume=args.resume)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    if trainer.epoch and not hasattr(trainer, "last_confusion"):
        trainer.last_confusion = trainer.evaluate()[1]
    print(summary_table(history))
    with open(os.path.join(trainer.run_dir, "args.json"), "w") as stream:
        json.dump(vars(args), stream, indent=1)
    for path in write_plots(trainer, dataset):
        print(f"wrote {path}")
    print(f"wrote {trainer.history_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
