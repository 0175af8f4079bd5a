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
import shutil
import sys

import numpy as np

from .checkpoint import write_json
from .heads import HEADS

#: ``--softmax`` choices: the head registry's names (one list for the package and the CLI).
HEAD_NAMES = tuple(HEADS)
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DATA_ERROR = 2  # data, run-folder and checkpoint errors share the usage code: the command must change
EXIT_DIVERGED = 3
#: Files a run writes into its folder; ``--overwrite`` removes exactly these.
RUN_FILES = ("checkpoint.npz", "best.npz", "weights.npz", "history.json", "args.json", "curves.png",
             "confusion.png", "confusion_superclass.png", "reliability.png", "reliability.json")
#: CIFAR-100 adaptive default: a shortlist of 90 classes and one tail cluster of 10. The
#: classes are equally frequent (and numbered alphabetically), so a tail cluster is an
#: arbitrary group the head must learn to recognise as a whole; chosen on validation
#: (results/cifar100/adaptive-cutoffs-validation.md): a 50-class tail cost 4.3 points after
#: 6 subset epochs whatever its width, a 10-class tail 0.7. The tail stays full-rank
#: (D // div_value = 64 >= 10 at D = 256).
CIFAR100_CUTOFFS = (90,)

EPILOG = """\
outputs: RUN_DIR (default runs/<dataset>-<head>) gets history.json, args.json, checkpoint.npz
(resume state), best.npz and weights.npz (the best epoch by validation top-1), curves.png,
confusion.png, reliability.png.

exit codes: 0 finished; 2 usage error, data error, run-folder or checkpoint error (nothing
was trained or overwritten); 3 training diverged (the message names the last finite checkpoint).
"""


def build_parser(description=None, *, single_run=True, torch=False):
    """The argument parser shared by ``train_np.py``, ``train_torch.py``, ``parity.py`` and ``compare.py``.

    ``single_run=False`` (``compare.py``) leaves out the options that name one run
    (``--softmax``, ``--run-dir``, ``--profile``): the caller adds its own.
    ``torch=True`` adds ``--device cpu|cuda`` (the torch backend).
    """
    parser = argparse.ArgumentParser(
        description=description or "Train the default CNN with one of four softmax heads (NumPy/Cython).",
        formatter_class=_HelpFormatter, epilog=EPILOG,
    )
    model = parser.add_argument_group("model")
    if single_run:
        model.add_argument("--softmax", choices=HEAD_NAMES, default="softmax", help="which output head to train")
    model.add_argument("--widths", type=_int_list, default=None,
                       help="conv block widths, comma separated (default 32,64,128 for cifar100, 16,32,64 for digits)")
    model.add_argument("--convs-per-block", type=int, default=1, metavar="N",
                       help="3x3 convs in each conv block (2: VGG-style, the last one pooled)")
    model.add_argument("--feature-dim", type=int, default=None,
                       help="feature size D handed to the head (default 256 for cifar100, 128 for digits)")
    model.add_argument("--no-batch-norm", action="store_true", help="drop batch norm from the conv blocks")
    model.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                       help="float32 trains; float64 is for debugging and gradient checks")

    heads = parser.add_argument_group("heads")
    heads.add_argument("--tau", type=float, default=1.0, help="Gumbel: initial temperature tau0 (> 0)")
    heads.add_argument("--tau-min", type=float, default=0.5, help="Gumbel: floor of the annealed temperature")
    heads.add_argument("--anneal-rate", type=float, default=0.03,
                       help="Gumbel: tau_t = max(tau_min, tau0 * exp(-rate * t)); 0 keeps tau fixed")
    heads.add_argument("--anneal-every", choices=("step", "epoch"), default="epoch",
                       help="Gumbel: what t counts in the annealing formula")
    heads.add_argument("--cutoffs", type=_int_list, default=None,
                       help="adaptive: increasing class cutoffs, e.g. 20,50 (default 90 on cifar100, chosen on "
                            "validation: equally frequent classes make any tail cluster arbitrary, so keep "
                            "it small; K//5,K//2 otherwise)")
    heads.add_argument("--div-value", type=float, default=4.0, help="adaptive: cluster i projects to D // div**(i+1)")
    heads.add_argument("--tree", choices=("superclass", "balanced", "huffman"), default=None,
                       help="hierarchical: tree over the classes (default superclass on cifar100, balanced otherwise)")
    heads.add_argument("--samples", type=int, default=None, metavar="N",
                       help="sampled: classes drawn per batch besides the targets (default K // 5)")
    heads.add_argument("--sampler", choices=("uniform", "log_uniform", "unigram"), default="uniform",
                       help="sampled: candidate distribution (unigram = training class frequencies)")
    heads.add_argument("--class-weights", default=None, metavar="balanced|FILE",
                       help="per-class loss weights, torch's weighted mean: 'balanced' (N / (K * count_k) from "
                            "the training labels) or a text/.npy file of K numbers")
    heads.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS",
                       help="softmax and gumbel: mix the target with the uniform distribution (torch semantics)")

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
    data.add_argument("--val", type=int, default=None, metavar="N",
                      help="hold N training images out as a stratified validation split; the best epoch by "
                           "validation top-1 is kept (default 5000 for cifar100, a tenth of --subset if given; "
                           "0 for digits)")

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=10)
    training.add_argument("--batch-size", type=int, default=128)
    training.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    training.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.05 sgd, 0.001 adam)")
    training.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    training.add_argument("--nesterov", action="store_true", help="SGD with Nesterov momentum")
    training.add_argument("--weight-decay", type=float, default=5e-4)
    training.add_argument("--head-lr-scale", type=float, default=1.0, metavar="S",
                          help="the head's parameters learn at S times the scheduled lr (weight decay included, "
                               "like a torch param group; default 1)")
    training.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine",
                          help="learning-rate schedule (stepped every batch)")
    training.add_argument("--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up length")
    training.add_argument("--early-stop", type=int, default=None, metavar="PATIENCE",
                          help="stop when validation top-1 has not improved for PATIENCE epochs")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--threads", type=int, default=None,
                          help="OpenBLAS and OpenMP threads (default: the cores other processes leave free, from "
                               "the load average; threads waiting for a busy core slow every step several-fold)")

    if torch:
        training.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where torch trains")
    output = parser.add_argument_group("output")
    if single_run:
        output.add_argument("--run-dir", default=None,
                            help="where history, checkpoint and plots go (default runs/<dataset>-<softmax>)")
    output.add_argument("--resume", action="store_true",
                        help="continue the run in the run folder (refused if its options differ)")
    output.add_argument("--overwrite", action="store_true",
                        help="replace a run already in the run folder (without it, an existing run is never touched)")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    if single_run:
        output.add_argument("--profile", type=int, nargs="?", const=20, default=None, metavar="STEPS",
                            help="time STEPS training steps (default 20) layer by layer, print the table and exit")
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, and the epilog printed as written."""


def _int_list(text):
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def load_dataset(args):
    """The ImageDataset named by ``--dataset`` (with ``--subset``, then ``--val`` held out of train).

    Raises DatasetError when the data cannot be read, ValueError when the options leave
    too few training images.
    """
    from .data import load_cifar100, load_digits_images, split_validation, subset

    if args.dataset == "digits":
        dataset = load_digits_images(seed=args.seed)
    else:
        dataset = load_cifar100(args.data_dir, download=not args.no_download, progress=not args.no_progress)
    if args.subset is not None:
        dataset = subset(dataset, min(args.subset, len(dataset.train)), seed=args.seed)
    n_val = args.val or 0  # resolve_defaults() gives the default; None here means none
    if n_val >= len(dataset.train) - dataset.n_classes + 1:
        raise ValueError(f"--val {n_val} leaves fewer training images than classes "
                         f"({len(dataset.train)} training images, {dataset.n_classes} classes)")
    dataset = split_validation(dataset, n_val, seed=args.seed)
    if len(np.unique(dataset.train.labels)) < dataset.n_classes:
        raise ValueError(f"--subset {args.subset} --val {n_val} leaves {len(dataset.train)} training images, which "
                         f"miss some of the {dataset.n_classes} classes: every class needs a training image "
                         f"(use --subset >= {dataset.n_classes + n_val})")
    return dataset


def class_weights(args, dataset):
    """The (K,) weights ``--class-weights`` names, or None; raises ValueError for a bad file."""
    if args.class_weights is None:
        return None
    n_classes = dataset.n_classes
    if args.class_weights == "balanced":
        counts = np.bincount(dataset.train.labels, minlength=n_classes)
        # sklearn's "balanced": every class contributes the same total weight.
        return len(dataset.train) / (n_classes * np.maximum(counts, 1))
    try:
        weights = np.load(args.class_weights) if args.class_weights.endswith(".npy") \
            else np.loadtxt(args.class_weights, ndmin=1)
    except (OSError, ValueError) as error:
        raise ValueError(f"--class-weights {args.class_weights}: cannot read {n_classes} numbers ({error})") from None
    if np.shape(weights) != (n_classes,):
        raise ValueError(f"--class-weights {args.class_weights}: expected {n_classes} numbers (one per class), "
                         f"got shape {np.shape(weights)}")
    return weights


def head_options(args, dataset):
    """Keyword options for the head chosen by ``--softmax`` (plain values and arrays, no built objects).

    The tree is passed by name and built by the head; the superclass tree is the head's
    ``"groups"`` tree over the data set's coarse labels (the head knows no data set).
    """
    options = {}
    weights = class_weights(args, dataset)
    if weights is not None:
        options["class_weights"] = weights
    if args.label_smoothing:
        options["label_smoothing"] = args.label_smoothing
    if args.softmax == "gumbel":
        options["tau"] = args.tau
    elif args.softmax == "adaptive":
        options.update(cutoffs=list(args.cutoffs), div_value=args.div_value)
    elif args.softmax == "sampled":
        options.update(n_samples=args.samples, sampler=args.sampler)
        if args.sampler == "unigram":
            options["class_counts"] = np.bincount(dataset.train.labels, minlength=dataset.n_classes)
    elif args.softmax == "hierarchical":
        if args.tree == "superclass":
            options.update(tree="groups", groups=dataset.coarse_of_fine())
        elif args.tree == "huffman":
            options.update(tree="huffman", class_counts=np.bincount(dataset.train.labels, minlength=dataset.n_classes))
        else:
            options["tree"] = "balanced"
    return options


def build_training(args, dataset):
    """Model, optimizer, schedules and Trainer from parsed arguments."""
    from .models import DEFAULT_FEATURE_DIM, DEFAULT_WIDTHS, build_model
    from .optim import SGD, Adam, ConstantSchedule, CosineSchedule, ExponentialTemperatureSchedule, StepSchedule
    from .train import Trainer

    dtype = np.dtype(args.dtype)
    digits = args.dataset == "digits"
    widths, feature_dim, lr = args.widths, args.feature_dim, args.lr
    image_shape = tuple(np.roll(dataset.train.images.shape[1:], 1))  # (H, W, C) -> (C, H, W)
    rng = np.random.default_rng(args.seed)
    model = build_model(args.softmax, dataset.n_classes, image_shape, rng=rng, dtype=dtype, widths=widths,
                        feature_dim=feature_dim, batch_norm=not args.no_batch_norm,
                        convs_per_block=args.convs_per_block, head_options=head_options(args, dataset))
    lr_scales = None
    if args.head_lr_scale != 1.0:
        lr_scales = {name: args.head_lr_scale for name in model.params if name.startswith("head.")}
    if args.optimizer == "sgd":
        optimizer = SGD(model.params, lr=lr, momentum=args.momentum, nesterov=args.nesterov,
                        weight_decay=args.weight_decay, lr_scales=lr_scales)
    else:
        optimizer = Adam(model.params, lr=lr, weight_decay=args.weight_decay, lr_scales=lr_scales)
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
        progress=not args.no_progress, identity=run_identity(args), early_stop=args.early_stop,
    )
    return trainer


def run_identity(args):
    """The options that define a run (resolved defaults), as stored in its checkpoints.

    Two runs with the same identity follow the same trajectory; ``--resume`` refuses a
    checkpoint whose identity differs. Head options count only for their head, and
    output-only options (progress bar, threads, run folder) never count.
    """
    identity = {name: getattr(args, name) for name in (
        "softmax", "dataset", "subset", "val", "seed", "widths", "feature_dim", "no_batch_norm", "dtype",
        "no_augment", "optimizer", "lr", "weight_decay", "schedule", "warmup_epochs", "epochs", "batch_size")}
    identity["widths"] = list(identity["widths"])
    if args.optimizer == "sgd":
        identity.update(momentum=args.momentum, nesterov=args.nesterov)
    if args.softmax == "gumbel":
        identity.update(tau=args.tau, tau_min=args.tau_min, anneal_rate=args.anneal_rate,
                        anneal_every=args.anneal_every)
    elif args.softmax == "adaptive":
        identity.update(cutoffs=list(args.cutoffs), div_value=args.div_value)
    elif args.softmax == "hierarchical":
        identity.update(tree=args.tree)
    elif args.softmax == "sampled":
        identity.update(samples=args.samples, sampler=args.sampler)
    if args.class_weights is not None:
        identity["class_weights"] = args.class_weights
    if args.label_smoothing:
        identity["label_smoothing"] = args.label_smoothing
    if args.head_lr_scale != 1.0:
        identity["head_lr_scale"] = args.head_lr_scale
    if args.convs_per_block != 1:  # only when set, so runs made before the option still resume
        identity["convs_per_block"] = args.convs_per_block
    return identity


def summary_table(history):
    """A plain-text table of the per-epoch history, one row per epoch."""
    columns = [("epoch", "d"), ("train_loss", ".4f"), ("train_top1", ".4f"), ("val_top1", ".4f"), ("test_loss", ".4f"),
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

    Only the steps are timed (no evaluation): the trainer's own step (its backend's
    ``train_step``) on the run's real batches, with its schedules; nothing is saved.
    """
    from .profiler import profile

    backend = trainer.backend.train()
    done = 0
    with profile(trainer.model, trainer.optimizer) as profiler:
        while done < steps:
            for x, y in trainer.batches():
                backend.apply_schedule(trainer.scheduler.apply(trainer.step + done))
                backend.train_step(x, y)
                done += 1
                if done == steps:
                    break
    header = (f"profile of {steps} training steps: {trainer.model.head.__class__.__name__}, "
              f"batch {trainer.batch_size}, {trainer.dtype}")
    return header + "\n" + profiler.table()


def main(argv=None):
    """Entry point of ``examples/train_np.py``; returns the process exit code."""
    return run(parse_args(build_parser(), argv))


N_CLASSES = {"cifar100": 100, "digits": 10}
IMAGE_SIDE = {"cifar100": 32, "digits": 8}


def resolve_defaults(args):
    """Replace the options whose default depends on others (``None``) by their value, in place.

    After this, ``args`` (and ``args.json``) spell out the run completely.
    """
    digits = args.dataset == "digits"
    from .heads.adaptive import default_cutoffs
    from .models import DEFAULT_FEATURE_DIM, DEFAULT_WIDTHS

    if args.widths is None:
        args.widths = [16, 32, 64] if digits else list(DEFAULT_WIDTHS)
    if args.feature_dim is None:
        args.feature_dim = 128 if digits else DEFAULT_FEATURE_DIM
    if args.lr is None:
        args.lr = 0.05 if args.optimizer == "sgd" else 1e-3
    if args.tree is None:
        args.tree = "balanced" if digits else "superclass"
    if args.cutoffs is None:
        usable = math.isfinite(args.div_value) and args.div_value > 0 and args.feature_dim >= 1
        args.cutoffs = list(CIFAR100_CUTOFFS) if args.dataset == "cifar100" else default_cutoffs(
            N_CLASSES[args.dataset], args.feature_dim if usable else None, args.div_value if usable else 4.0)
    if args.samples is None:
        args.samples = max(1, N_CLASSES[args.dataset] // 5)
    if args.val is None:
        args.val = 0 if digits else (5000 if args.subset is None else args.subset // 10)
    return args


def _finite(value, option, low, high=math.inf, low_inclusive=True):
    inside = (value >= low if low_inclusive else value > low) and value <= high
    if not (math.isfinite(value) and inside):
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high != math.inf else "")
        raise ValueError(f"{option} must be a finite number {bound}, got {value}")


def check_args(args):
    """Resolve defaults, then raise ValueError naming the option when the arguments cannot describe a run.

    Everything that can be checked without the data is checked here, before any work:
    ``main`` turns the error into the usage line + message and exit status 2.
    """
    for option, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--threads", args.threads),
                          ("--subset", args.subset), ("--profile", getattr(args, "profile", None)),
                          ("--feature-dim", args.feature_dim), ("--early-stop", args.early_stop),
                          ("--convs-per-block", args.convs_per_block)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    for option, value in (("--seed", args.seed), ("--val", args.val)):
        if value is not None and value < 0:
            raise ValueError(f"{option} must be >= 0, got {value}")
    if args.widths is not None and (not args.widths or min(args.widths) < 1):
        raise ValueError(f"--widths must list at least one conv width, each >= 1, got {args.widths}")
    if args.cutoffs is not None and not args.cutoffs:
        raise ValueError("--cutoffs must list at least one cutoff")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or replace it")
    resolve_defaults(args)
    side = IMAGE_SIDE[args.dataset]
    if side % 2 ** len(args.widths):
        raise ValueError(f"--widths {','.join(map(str, args.widths))}: each conv block halves the "
                         f"{side}x{side} images, so {args.dataset} allows at most {int(math.log2(side))} blocks")
    if args.tree == "superclass" and args.dataset != "cifar100":
        raise ValueError("--tree superclass needs --dataset cifar100 (the digits have no superclasses)")
    _finite(args.lr, "--lr", 0.0, low_inclusive=False)
    _finite(args.weight_decay, "--weight-decay", 0.0)
    _finite(args.momentum, "--momentum", 0.0, 0.999)
    _finite(args.warmup_epochs, "--warmup-epochs", 0.0, float(args.epochs))
    _finite(args.tau, "--tau", 0.0, low_inclusive=False)
    _finite(args.tau_min, "--tau-min", 0.0, low_inclusive=False)
    _finite(args.anneal_rate, "--anneal-rate", 0.0)
    _finite(args.div_value, "--div-value", 0.0, low_inclusive=False)
    _finite(args.label_smoothing, "--label-smoothing", 0.0, 0.999)
    _finite(args.head_lr_scale, "--head-lr-scale", 0.0, low_inclusive=False)
    head = getattr(args, "softmax", None)
    if args.label_smoothing and head is not None and not HEADS[head].supports_label_smoothing:
        raise ValueError(f"--label-smoothing: the {head} head does not support it (its loss never forms the "
                         f"full softmax); heads that do: "
                         f"{[name for name, cls in HEADS.items() if cls.supports_label_smoothing]}")
    if not 1 <= args.samples <= N_CLASSES[args.dataset]:
        raise ValueError(f"--samples must be in [1, {N_CLASSES[args.dataset]}] (the classes), got {args.samples}")
    if args.class_weights not in (None, "balanced") and not os.path.isfile(args.class_weights):
        raise ValueError(f"--class-weights must be 'balanced' or a file of per-class weights; "
                         f"{args.class_weights!r} is neither")
    n_classes = N_CLASSES[args.dataset]
    from .heads.adaptive import check_cutoffs

    args.cutoffs = check_cutoffs(args.cutoffs, n_classes)
    narrowest = int(args.feature_dim // args.div_value ** len(args.cutoffs))
    if getattr(args, "softmax", None) == "adaptive" and narrowest < 1:
        raise ValueError(f"--div-value {args.div_value} with --feature-dim {args.feature_dim} and "
                         f"{len(args.cutoffs)} tail clusters gives the last cluster a width of {narrowest} (< 1)")
    if args.subset is not None and args.subset - args.val < n_classes:
        raise ValueError(f"--subset {args.subset} with --val {args.val} leaves {args.subset - args.val} training "
                         f"images for {n_classes} classes; every class needs one: use --subset >= "
                         f"{n_classes + args.val}")
    if args.early_stop is not None and args.val == 0:
        raise ValueError("--early-stop needs a validation split: give --val N with N >= 1")
    if args.data_dir is not None and os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        raise ValueError(f"--data-dir {args.data_dir} is a file; it must be the folder that holds cifar-100-python/")
    if getattr(args, "run_dir", None) is not None and os.path.exists(args.run_dir) and not os.path.isdir(args.run_dir):
        raise ValueError(f"--run-dir {args.run_dir} is a file; it must be a folder (it will be created)")


def default_run_dir(args):
    """``runs/<dataset>-<head>`` unless ``--run-dir`` names one."""
    return args.run_dir or os.path.join("runs", f"{args.dataset}-{args.softmax}")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (not writable, holds another run ...)."""


def prepare_run_dir(run_dir, *, resume, overwrite):
    """Check ``run_dir`` before any work, and clear it when ``overwrite``; returns a note to print or None.

    * a folder that holds a run (``checkpoint.npz`` or ``history.json``) is refused unless
      ``resume`` (continue it) or ``overwrite`` (its run files are deleted, nothing else);
    * ``resume`` without a checkpoint starts afresh, and says so;
    * the folder must be creatable and writable now, not after a first epoch.
    """
    checkpoint = os.path.join(run_dir, "checkpoint.npz")
    history = os.path.join(run_dir, "history.json")
    holds_run = os.path.exists(checkpoint) or os.path.exists(history)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as error:
        raise RunFolderError(f"cannot create the run folder {run_dir}: {error.strerror}") from None
    probe = os.path.join(run_dir, ".write-test")
    try:
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as error:
        raise RunFolderError(f"the run folder {run_dir} is not writable: {error.strerror}") from None
    if holds_run and not (resume or overwrite):
        done = _epochs_done(history)
        raise RunFolderError(f"{run_dir} already holds a run ({done} epochs done); add --resume to continue "
                             f"it or --overwrite to replace it (or choose another --run-dir)")
    if overwrite:
        for name in RUN_FILES:
            path = os.path.join(run_dir, name)
            if os.path.exists(path):
                os.unlink(path)
    if resume and not os.path.exists(checkpoint):
        if os.path.exists(history):
            raise RunFolderError(f"{run_dir} has a history.json but no checkpoint.npz to resume from; "
                                 f"use --overwrite to start afresh")
        return f"note: --resume: no checkpoint in {run_dir}, starting a fresh run"
    return None


def _epochs_done(history_path):
    try:
        with open(history_path) as stream:
            return len(json.load(stream))
    except (OSError, ValueError):
        return 0


def default_threads():
    """Threads for a run that did not ask (``--threads``): the cores other processes leave free.

    Returns ``(threads, note)``. A thread pool whose threads wait at a barrier for a
    thread the OS has not scheduled runs at the speed of its slowest core: with one
    other busy process on 2 cores, a 2-thread step was measured 5x slower than a
    1-thread step (OpenBLAS's idle workers spin between calls, and every OpenMP region
    waits for the descheduled thread). So the count is ``cores - round(load)``, at least
    1, from the 1-minute load average; ``note`` says so when that is below the core count.
    """
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return cores, None
    threads = max(1, min(cores, cores - int(round(load))))
    if threads < cores:
        return threads, (f"note: this machine is busy (load {load:.1f} on {cores} cores): using {threads} "
                         f"thread{'s' if threads > 1 else ''} (--threads N overrides)")
    return threads, None


def parse_args(parser, argv=None):
    """Parse and check: the usage line + message and exit status 2 for impossible options."""
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def run(args, make_backend=None):
    """Train with parsed arguments that passed :func:`check_args`; returns the exit code (see ``EPILOG``).

    ``make_backend(trainer)``, if given, replaces the NumPy backend (``train_torch.py``
    passes the torch one); a backend that cannot resume refuses ``--resume``.
    """
    from .parallel import set_threads

    threads = args.threads
    if threads is None:
        threads, note = default_threads()
        if note:
            print(note, file=sys.stderr)
    set_threads(threads)  # the conv chunks' pool; BLAS single-threaded (see npsoftmax.parallel)
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .train import TrainingDiverged

    args.run_dir = default_run_dir(args)
    profiling = getattr(args, "profile", None) is not None
    try:
        if not profiling:
            note = prepare_run_dir(args.run_dir, resume=args.resume, overwrite=args.overwrite)
            if note:
                print(note)
        dataset = load_dataset(args)
        trainer = build_training(args, dataset)
    except (DatasetError, RunFolderError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DATA_ERROR
    if make_backend is not None:
        trainer.backend = make_backend(trainer)
    if profiling:
        print(profile_steps(trainer, args.profile))
        return EXIT_OK
    print(f"npsoftmax ({trainer.backend.name}): {args.softmax} head on {args.dataset} "
          f"({len(dataset.train)} train / {0 if dataset.val is None else len(dataset.val)} val / "
          f"{len(dataset.test)} test images, {dataset.n_classes} classes), run dir {trainer.run_dir}")
    try:
        if args.resume and os.path.exists(trainer.checkpoint_path):
            trainer.load(trainer.checkpoint_path)  # checked first: a refused resume changes nothing
            print(f"resuming {trainer.run_dir} after epoch {trainer.epoch} of {trainer.epochs}")
    except CheckpointError as error:  # includes RunMismatchError
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DATA_ERROR
    write_json(os.path.join(trainer.run_dir, "args.json"), vars(args))
    try:
        history = trainer.fit()
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    print(summary_table(history))
    for path in finish_run(trainer, dataset):
        print(f"wrote {path}")
    return EXIT_OK


def finish_run(trainer, dataset):
    """After training: ``weights.npz`` (the best epoch by validation top-1, else the last), and the
    plots and ``reliability.json`` of that model on the test split. Returns the paths written."""
    from .metrics import evaluation_record, reliability_bins
    from .plots import plot_reliability

    weights = os.path.join(trainer.run_dir, "weights.npz")
    if os.path.exists(trainer.best_path):
        shutil.copyfile(trainer.best_path, weights)
        trainer.restore_weights(weights)
    else:
        trainer.save_weights(weights)
    log_probs = trainer.predict_log_probs(dataset.test.images)
    trainer.backend.train()
    _, trainer.last_confusion = evaluation_record(log_probs, dataset.test.labels, trainer.coarse_of_fine)
    bins = {key: value.tolist() for key, value in reliability_bins(log_probs, dataset.test.labels).items()}
    reliability = os.path.join(trainer.run_dir, "reliability.json")
    write_json(reliability, bins)
    name = os.path.basename(os.path.normpath(trainer.run_dir))
    paths = [weights, reliability, trainer.history_path]
    paths += write_plots(trainer, dataset)
    paths.append(plot_reliability({name: bins}, os.path.join(trainer.run_dir, "reliability.png")))
    if hasattr(trainer.backend, "save_native"):
        paths.append(trainer.backend.save_native(trainer.run_dir))
    return paths


if __name__ == "__main__":
    sys.exit(main())
