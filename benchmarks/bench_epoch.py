"""Seconds per CIFAR-100 epoch and peak memory, on a synthetic CIFAR-shaped dataset; optionally against torch.

The real dataset cannot be downloaded on every machine, but an epoch's cost does
not depend on the pixel values: this builds ``--train`` random uint8 images of
shape 32x32x3 with 100 classes, equally many of each (the full CIFAR-100 training
set is 50,000) and ``--test`` test images, builds the model, optimizer, schedules
and :class:`~npsoftmax.train.Trainer` exactly as ``examples/train_np.py`` does
(``npsoftmax.cli.build_training``: default CNN, the chosen head, SGD momentum 0.9,
weight decay 5e-4, cosine learning rate, augmentation on, batch 128), runs one
epoch, and prints the epoch's training seconds, the evaluation seconds, and the
peak resident memory of the process (the dataset is kept as uint8; batches are
converted on the fly).

    python benchmarks/bench_epoch.py                        # softmax head, 50,000 + 10,000 images
    python benchmarks/bench_epoch.py --softmax hierarchical --train 10000
    python benchmarks/bench_epoch.py --compare-torch --threads 2 --rounds 3 --save

``--compare-torch`` runs the same epoch twice over, each side alone in a fresh
process of its own (``benchmarks/_processes.py``), alternating npsoftmax, torch,
npsoftmax, torch ... for ``--rounds`` rounds: ``Trainer.train_epoch`` with the
NumPy backend (the ``train_np.py`` path), and with the torch backend (the
``train_torch.py --device cpu`` path: ``TorchBackend`` trains the torch twin from
``to_torch`` with the ``torch.optim`` twin of the optimizer, on the same batches
in the same order, with the same schedules). Same recipe, batch and ``--threads``
on both sides; each worker reports its epoch and evaluation seconds and its own
peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``), and the table gives medians over
the rounds and the npsoftmax / torch ratios. Each worker's environment is this
script's plus the thread counts, nothing else (npsoftmax sets
``OMP_WAIT_POLICY=PASSIVE`` for itself on import; torch keeps its own default).
``--out FILE`` / ``--save`` keep the report with every worker's raw output.
The torch worker also holds the npsoftmax model its twin was converted from (a few
MB), so its RSS includes that.

Exit status: 0 measured; 2 usage error; 3 a worker process failed.
"""

import argparse
import importlib.util
import os
import resource
import sys
import tempfile
import time

import _processes as processes  # first (it records the environment the workers get); this folder is sys.path[0]

# numpy, npsoftmax and torch are imported inside functions: in a torch worker, torch's OpenMP
# runtime must start before npsoftmax is imported and sets OMP_WAIT_POLICY=PASSIVE for itself.

N_CLASSES = 100
SIDES = {"numpy": "npsoftmax", "torch": "torch"}  # --worker name -> label in the table
EXIT_WORKER_FAILED = 3


def synthetic_split(n, rng):
    """n random CIFAR-shaped images (n, 32, 32, 3) uint8 with fine and coarse labels.

    Every class gets n // 100 or n // 100 + 1 images (CIFAR-100 is balanced), in random
    order, so that any n >= 100 holds every class, as the superclass tree needs.
    """
    import numpy as np

    from npsoftmax.data import COARSE_OF_FINE, ImageSplit

    labels = rng.permutation(np.resize(np.arange(N_CLASSES), n))
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return ImageSplit(images, labels.astype(np.int64), COARSE_OF_FINE[labels])


def peak_rss_mib():
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_trainer(args, run_dir):
    """The synthetic dataset and the Trainer that ``train_np.py`` would build for it (one epoch)."""
    import numpy as np

    from npsoftmax.cli import build_parser, build_training, check_args
    from npsoftmax.data import COARSE_NAMES, FINE_NAMES, ImageDataset

    rng = np.random.default_rng(args.seed)
    dataset = ImageDataset(synthetic_split(args.train, rng), synthetic_split(args.test, rng), FINE_NAMES,
                           COARSE_NAMES)
    progress = args.worker is None and sys.stderr.isatty()
    training_args = build_parser().parse_args(
        ["--dataset", "cifar100", "--softmax", args.softmax, "--epochs", "1", "--batch-size", str(args.batch_size),
         "--seed", str(args.seed), "--run-dir", run_dir] + ([] if progress else ["--no-progress"]))
    check_args(training_args)
    return build_training(training_args, dataset)


def run_epoch(side, args):
    """One training epoch and one evaluation of the test split, in this process; returns the figures.

    ``side`` is ``"numpy"`` (the Trainer's default NumPy backend, as ``train_np.py``) or ``"torch"``
    (the same Trainer with :class:`npsoftmax.torch_backend.TorchBackend` on the CPU, as
    ``train_torch.py --device cpu``).
    """
    env_at_start = processes.environment_at_start()
    versions = {"python": sys.version.split()[0]}
    if side == "torch":
        import torch  # first: its OpenMP runtime reads the environment the parent passed, untouched

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        versions["torch"] = torch.__version__
        omp_wait_policy = os.environ.get("OMP_WAIT_POLICY")
    import npsoftmax  # before numpy, as the examples do: its thread defaults reach numpy's OpenBLAS
    import numpy as np
    from npsoftmax.kernels import BACKEND
    from npsoftmax.timing import thread_report

    if side == "numpy":
        omp_wait_policy = os.environ.get("OMP_WAIT_POLICY")  # npsoftmax's own default, set on import
    versions.update(numpy=np.__version__, npsoftmax=f"{npsoftmax.__version__} (im2col {BACKEND})")
    if args.threads is not None and side == "numpy":
        from npsoftmax.parallel import set_threads

        set_threads(args.threads)  # as train_np.py --threads does (torch's side: torch.set_num_threads)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(args, run_dir)
        if side == "torch":  # what train_torch.py --device cpu does: the same Trainer, the torch backend
            from npsoftmax.torch_backend import TorchBackend

            torch.manual_seed(args.seed)  # torch-side randomness (Gumbel noise), as train_torch.py
            trainer.backend = TorchBackend(trainer.model, trainer.optimizer, device="cpu")
        rss_before = current_rss_mib()
        record = trainer.train_epoch()
        start = time.perf_counter()
        trainer.evaluate()
        evaluation = time.perf_counter() - start
    report = thread_report() + (f" torch={torch.get_num_threads()}" if side == "torch" else "")
    return {
        "side": SIDES[side], "softmax": args.softmax, "train_images": args.train, "test_images": args.test,
        "batch": args.batch_size, "threads": args.threads,
        "epoch_seconds": record["epoch_seconds"], "images_per_second": record["images_per_second"],
        "head_seconds": record["head_seconds"], "eval_seconds": evaluation, "train_loss": record["train_loss"],
        "rss_before_epoch_mib": rss_before, "peak_rss_mib": peak_rss_mib(),
        "summary": f"epoch {record['epoch_seconds']:.2f} s, eval {evaluation:.2f} s, peak RSS {peak_rss_mib():.0f} MiB",
        "versions": versions, "thread_report": report, "env_at_start": env_at_start,
        "omp_wait_policy": omp_wait_policy, "torch_imported": "torch" in sys.modules, "pid": os.getpid(),
    }


def current_rss_mib():
    """This process's resident memory now, MiB (Linux ``/proc/self/status``; None elsewhere)."""
    try:
        with open("/proc/self/status") as stream:
            for line in stream:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ----------------------------------------------------------------------------
def run_alone(args, argv):
    """npsoftmax alone, in this process (the script's original mode)."""
    result = run_epoch("numpy", args)
    lines = processes.report_header("bench_epoch.py: one npsoftmax epoch in this process", __file__, argv)
    lines += [
        f"{args.softmax} head, {args.train} training images, batch {args.batch_size}, float32",
        f"{result['thread_report']}",
        f"train epoch: {result['epoch_seconds']:.1f} s ({result['images_per_second']:.0f} img/s, "
        f"head {result['head_seconds']:.2f} s)",
        f"evaluation of {args.test} images: {result['eval_seconds']:.1f} s",
        f"peak resident memory: {result['peak_rss_mib']:.0f} MiB",
    ]
    return lines, [{"label": "npsoftmax", "round": 0, **result}]


def run_compare(args, argv):
    """npsoftmax and torch epochs, each alone in its own process, alternating; the comparison table."""
    threads = args.threads if args.threads is not None else processes.usable_cores()
    commands = {}
    for side, label in SIDES.items():
        commands[label] = [sys.executable, os.path.abspath(__file__), "--worker", side, "--softmax", args.softmax,
                           "--train", str(args.train), "--test", str(args.test), "--batch-size",
                           str(args.batch_size), "--threads", str(threads), "--seed", str(args.seed)]
    lines = processes.report_header(
        "bench_epoch.py --compare-torch: one epoch, npsoftmax (train_np.py path) vs torch (train_torch.py --device "
        "cpu path), each alone in its own process", __file__, argv)
    lines.append(f"method: {args.softmax} head, {args.train} synthetic training + {args.test} test images, batch "
                 f"{args.batch_size}, float32, train_np.py's recipe, {threads} threads; {args.rounds} round(s) of "
                 f"fresh worker processes alternating npsoftmax, torch; figure = median over the processes, "
                 f"spread = their min-max; peak RSS = each worker's own ru_maxrss")
    outcome = processes.alternate(commands, args.rounds, processes.thread_env(threads), log=processes.log_to_stderr)
    lines.append(processes.versions_line(outcome.runs))
    lines.append("threads, as the workers' pools reported them:")
    lines += processes.threads_lines(outcome.runs)
    lines.append(f"load average after: {processes.load_average()}")
    lines.append("")
    columns = (("epoch_seconds", "epoch s", 2), ("images_per_second", "img/s", 0), ("eval_seconds", "eval s", 2),
               ("peak_rss_mib", "peak RSS MiB", 0), ("rss_before_epoch_mib", "RSS before MiB", 0))
    lines.append(f"{'impl':<11}{'epoch s':>9} {'spread':<15}" + "".join(f"{title:>15}" for _, title, _ in columns[1:])
                 + f"{'train loss':>12}")
    medians = {}
    for label in SIDES.values():
        medians[label] = {key: outcome.median(label, key) for key, _, _ in columns}
        low, high = outcome.spread(label, "epoch_seconds")
        lines.append(f"{label:<11}{medians[label]['epoch_seconds']:>9.2f} {f'({low:.2f}-{high:.2f})':<15}"
                     + "".join(f"{medians[label][key]:>15.{digits}f}" for key, _, digits in columns[1:])
                     + f"{outcome.median(label, 'train_loss'):>12.4f}")
    ratios = {key: medians["npsoftmax"][key] / medians["torch"][key] for key, _, _ in columns}
    lines.append(f"{'np/torch':<11}{ratios['epoch_seconds']:>9.2f} {'':<15}"
                 + "".join(f"{ratios[key]:>15.2f}" for key, _, _ in columns[1:]))
    np_loss, torch_loss = outcome.median("npsoftmax", "train_loss"), outcome.median("torch", "train_loss")
    if abs(np_loss - torch_loss) > 0.05 * abs(torch_loss):
        lines.append(f"warning: the epoch's mean training losses differ by more than 5% (npsoftmax {np_loss:.4f}, "
                     f"torch {torch_loss:.4f}): the two sides may not be training the same network")
    return lines, outcome.runs


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--softmax", default="softmax", help="the head, as train_np.py --softmax (default softmax)")
    parser.add_argument("--train", type=int, default=50_000, help="training images (default 50,000; at least 100)")
    parser.add_argument("--test", type=int, default=10_000, help="test images (default 10,000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for BLAS, OpenMP and torch (default: all cores)")
    parser.add_argument("--compare-torch", action="store_true",
                        help="npsoftmax vs torch, each alone in its own process, alternating")
    parser.add_argument("--rounds", type=int, default=3,
                        help="--compare-torch: epochs per side, alternating (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", metavar="FILE", help="also write the report and every worker's raw output to FILE")
    parser.add_argument("--save", action="store_true", help="as --out benchmarks/results/bench_epoch-<UTC date>.txt")
    parser.add_argument("--worker", choices=sorted(SIDES), help=argparse.SUPPRESS)  # internal: one side, one epoch
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train < N_CLASSES:
        parser.error(f"--train must be >= {N_CLASSES} (every class needs a training image), got {args.train}")
    for option, value in (("--test", args.test), ("--batch-size", args.batch_size), ("--rounds", args.rounds),
                          ("--threads", args.threads)):
        if value is not None and value < 1:
            parser.error(f"{option} must be >= 1, got {value}")
    if args.worker:  # the parent checked the options; npsoftmax must not be imported before torch here
        processes.print_result(run_epoch(args.worker, args))
        return 0
    from npsoftmax.cli import HEAD_NAMES  # (the workers start from _processes.STARTING_ENVIRON regardless)

    if args.softmax not in HEAD_NAMES:
        parser.error(f"--softmax must be one of {', '.join(HEAD_NAMES)}, got {args.softmax!r}")
    if args.compare_torch and importlib.util.find_spec("torch") is None:
        parser.error("--compare-torch needs torch: `pip install torch==2.13.0`")
    try:
        lines, runs = (run_compare if args.compare_torch else run_alone)(args, argv)
    except processes.WorkerFailed as error:
        print(f"error: a worker failed: {error}", file=sys.stderr)
        return EXIT_WORKER_FAILED
    processes.publish(lines, runs, "bench_epoch", save=args.save, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
