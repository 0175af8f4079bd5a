"""Train every head on the same body and budget, then write one report (the CIFAR-100 study).

    python examples/compare.py --dataset digits --epochs 5
    python examples/compare.py --dataset cifar100 --data-dir DEST --no-download --epochs 30 --jobs 2
    python examples/compare.py --dataset cifar100 --data-dir DEST --no-download --epochs 30 --jobs 2 --resume

Every run gets the same arguments as ``train_np.py`` (all its options work here);
``--heads`` replaces ``--softmax``. A head name may carry its tree,
``hierarchical-superclass`` / ``hierarchical-balanced`` / ``hierarchical-huffman``. On
CIFAR-100 the default is the study's five runs: softmax, gumbel (annealed tau),
hierarchical with the superclass tree and with a balanced tree, adaptive.

Runs go to ``<runs-root>/<head>`` (default ``results/cifar100`` for the full CIFAR-100,
``runs/compare-<dataset>`` otherwise). Killed at any point, the same command with
``--resume`` continues every unfinished run and re-checks the finished ones (a run whose
options differ is refused, never mixed). ``--jobs N`` trains N runs at a time, each in its
own process with ``--threads cores/N`` (two single-threaded runs are the best throughput
on two cores); each process writes ``<run>/log.txt``.

The report, ``<runs-root>/report.md``, has one row per run, the test figures of its best
epoch by validation top-1 (the epoch its ``weights.npz`` holds, which
``examples/evaluate.py`` re-checks), plus ``curves.png``, ``reliability.png`` and
``heads.png``.
"""

import concurrent.futures
import contextlib
import copy
import json
import math
import multiprocessing
import os
import sys

import numpy as np

from npsoftmax.checkpoint import load_checkpoint
from npsoftmax.cli import EXIT_USAGE, HEAD_NAMES, build_parser, check_args, run
from npsoftmax.train import best_record

TREES = ("superclass", "balanced", "huffman")
STUDY_HEADS = ("softmax", "gumbel", "hierarchical-superclass", "hierarchical-balanced", "adaptive")

COLUMNS = [("test_top1", "top-1", ".4f"), ("test_top5", "top-5", ".4f"),
           ("test_macro_precision", "macro P", ".4f"), ("test_macro_recall", "macro R", ".4f"),
           ("test_macro_f1", "macro F1", ".4f"), ("test_coarse_top1", "superclass acc", ".4f"),
           ("test_in_superclass_error_share", "errors in superclass", ".3f"), ("test_loss", "NLL", ".3f"),
           ("test_ece", "ECE", ".3f"), ("seconds_per_epoch", "s/epoch", ".1f"),
           ("head_ms_per_batch", "head ms/batch", ".2f"), ("head_parameters", "head params", ",d"),
           ("best_epoch", "best epoch", "d")]


def parse_heads(text, dataset):
    """``--heads`` -> list of (run name, head, tree or None); raises ValueError naming a bad entry."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--heads must name at least one head, got {text!r}")
    runs = []
    for name in names:
        head, _, tree = name.partition("-")
        if head not in HEAD_NAMES or (tree and (head != "hierarchical" or tree not in TREES)):
            raise ValueError(f"--heads: unknown {name!r}; choose from {list(HEAD_NAMES)} or "
                             f"hierarchical-<tree> with tree in {list(TREES)}")
        if tree == "superclass" and dataset != "cifar100":
            raise ValueError(f"--heads {name}: the superclass tree needs --dataset cifar100")
        runs.append((name, head, tree or None))
    if len({name for name, _, _ in runs}) != len(runs):
        raise ValueError(f"--heads names a run twice: {names}")
    return runs


def report_table(rows):
    """Markdown table, one row per run (``rows``: run name -> dict of the COLUMNS keys)."""
    lines = ["| run | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, row in rows.items():
        cells = [format(row[key], spec) if row.get(key) is not None and not (
            isinstance(row[key], float) and math.isnan(row[key])) else "n/a" for key, _, spec in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _read_json(path):
    with open(path) as stream:
        return json.load(stream)


def report_row(run_dir):
    """The report's figures for one run folder: the best epoch's test record plus costs, or None."""
    history_path = os.path.join(run_dir, "history.json")
    if not os.path.exists(history_path):
        return None
    history = _read_json(history_path)
    if not history:
        return None
    best = best_record(history) or history[-1]  # no validation split: the last epoch
    row = {key: value for key, value in best.items() if key.startswith("test_")}
    row["best_epoch"] = best["epoch"]
    row["epochs_done"] = len(history)
    row["seconds_per_epoch"] = float(np.median([record["epoch_seconds"] for record in history]))
    row["head_ms_per_batch"] = float(np.median([record["head_ms_per_batch"] for record in history]))
    weights = os.path.join(run_dir, "weights.npz")
    if os.path.exists(weights):
        params = load_checkpoint(weights)["params"]
        row["head_parameters"] = int(sum(value.size for name, value in params.items() if name.startswith("head.")))
    return row


def plot_curves(histories, path):
    """Validation (dashed) and test (solid) top-1 of every run per epoch, in one plot."""
    from npsoftmax.plots import _pyplot, _save

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, (name, history) in enumerate(histories.items()):
        epochs = [record["epoch"] for record in history]
        axis.plot(epochs, [record["test_top1"] for record in history], color=f"C{index % 10}", label=name)
        if "val_top1" in history[0]:
            axis.plot(epochs, [record["val_top1"] for record in history], color=f"C{index % 10}", linestyle="--")
    axis.set(xlabel="epoch", ylabel="top-1 accuracy (solid: test, dashed: validation)", title="heads compared")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, path, plt)


def _run_in_child(run_args):
    """One run in a worker process, its output in ``<run>/log.txt``; returns the exit code."""
    os.makedirs(run_args.run_dir, exist_ok=True)
    with open(os.path.join(run_args.run_dir, "log.txt"), "a") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return run(run_args)


def main(argv=None):
    parser = build_parser("Compare the heads (same body, same budget); any train_np.py option applies.",
                          single_run=False)
    parser.add_argument("--heads", default=None,
                        help="comma-separated runs, e.g. softmax,hierarchical-balanced (default: the five-run "
                             f"study {','.join(STUDY_HEADS)} on cifar100, {','.join(HEAD_NAMES)} on digits)")
    parser.add_argument("--runs-root", default=None,
                        help="parent folder of the runs and the report (default results/cifar100 for the full "
                             "cifar100, runs/compare-<dataset> otherwise)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, one process each")
    parser.add_argument("--with-torch", action="store_true",
                        help="add a row for each finished train_torch.py run in <runs-root>/<head>-torch")
    args = parser.parse_args(argv)
    args.softmax = "softmax"  # check_args validates every head's options
    try:
        check_args(args)
        default_heads = STUDY_HEADS if args.dataset == "cifar100" else HEAD_NAMES
        runs = parse_heads(args.heads or ",".join(default_heads), args.dataset)
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    except ValueError as error:
        parser.error(str(error))
    root = args.runs_root or ("results/cifar100" if args.dataset == "cifar100" and args.subset is None
                              else os.path.join("runs", f"compare-{args.dataset}"))
    if args.jobs > 1 and args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)

    run_args = {}
    for name, head, tree in runs:
        one = copy.copy(args)
        one.softmax = head
        one.tree = tree or args.tree
        one.run_dir = os.path.join(root, name)
        one.profile = None
        if args.jobs > 1:
            one.no_progress = True
        run_args[name] = one
    if args.jobs == 1:
        for name, one in run_args.items():
            print(f"=== {name} ===")
            code = run(one)
            if code != 0:
                return code
    else:
        print(f"training {len(run_args)} runs, {args.jobs} at a time with --threads {args.threads}; "
              f"progress in {root}/<run>/log.txt")
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = {name: pool.submit(_run_in_child, one) for name, one in run_args.items()}
            codes = {name: future.result() for name, future in futures.items()}
        failed = {name: code for name, code in codes.items() if code != 0}
        if failed:
            for name in failed:
                print(f"run {name} failed (exit {failed[name]}); see {run_args[name].run_dir}/log.txt",
                      file=sys.stderr)
            return max(failed.values())
    return write_report(args, root, list(run_args))


def write_report(args, root, names):
    """report.md, curves.png, reliability.png and heads.png from the finished runs in ``root``."""
    from npsoftmax.plots import plot_head_comparison, plot_reliability

    rows, histories, reliability = {}, {}, {}
    for name in names + ([f"{name}-torch" for name in names] if args.with_torch else []):
        run_dir = os.path.join(root, name)
        row = report_row(run_dir)
        if row is None:
            if name.endswith("-torch"):
                print(f"no torch run for {name[:-6]}: python examples/train_torch.py --softmax "
                      f"{name[:-6].split('-')[0]} --dataset {args.dataset} --epochs {args.epochs} --run-dir {run_dir}")
            continue
        rows[name] = row
        histories[name] = _read_json(os.path.join(run_dir, "history.json"))
        bins_path = os.path.join(run_dir, "reliability.json")
        if os.path.exists(bins_path):
            reliability[name] = _read_json(bins_path)
    if not rows:
        print(f"error: no finished run in {root}", file=sys.stderr)
        return EXIT_USAGE
    paths = [plot_curves(histories, os.path.join(root, "curves.png")),
             plot_head_comparison(rows, os.path.join(root, "heads.png"),
                                  metrics=("test_top1", "test_ece", "seconds_per_epoch", "head_ms_per_batch"))]
    if reliability:
        paths.append(plot_reliability(reliability, os.path.join(root, "reliability.png")))
    table = report_table(rows)
    unfinished = [name for name, row in rows.items() if row["epochs_done"] < args.epochs]
    still = ", ".join(f"{name} ({rows[name]['epochs_done']}/{args.epochs} epochs)" for name in unfinished)
    note = f"\n\nStill training: {still}." if unfinished else ""
    report = os.path.join(root, "report.md")
    with open(report, "w") as stream:
        stream.write(f"# Heads compared on {args.dataset}, {args.epochs} epochs\n\n"
                     f"Test figures of each run's best epoch by validation top-1 (the epoch in its "
                     f"`weights.npz`); s/epoch and head ms/batch are medians over epochs.{note}\n\n{table}\n\n"
                     f"![curves](curves.png)\n\n![reliability](reliability.png)\n\n![bars](heads.png)\n")
    print(table)
    for path in [report] + paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
