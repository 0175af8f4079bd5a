"""Train (or reuse finished runs of) all four heads with the same body and budget; write a report.

    python examples/compare.py --dataset digits --epochs 5
    python examples/compare.py --dataset cifar100 --epochs 30 --reuse

Every head gets the same arguments as ``train_np.py`` (all its options work here;
``--softmax`` is replaced by ``--heads``).
Runs go to ``<runs-root>/<dataset>-<head>``; with ``--reuse`` a run whose
``history.json`` already has the requested number of epochs is not retrained.
With ``--with-torch``, finished ``train_torch.py`` runs of the same heads
(``<runs-root>/<dataset>-<head>-torch``) get rows of their own beside the NumPy ones.
The report, ``<runs-root>/compare/report.md``, has one row per head: top-1,
top-5, macro precision/recall/F1, seconds per epoch and head milliseconds per
batch, plus a bar chart and the test-accuracy curves of all heads in one plot.
"""

import copy
import json
import os
import sys

from npsoftmax.cli import HEAD_NAMES, build_parser, check_args, run

COLUMNS = [("test_top1", "top-1", ".4f"), ("test_top5", "top-5", ".4f"),
           ("test_macro_precision", "macro P", ".4f"), ("test_macro_recall", "macro R", ".4f"),
           ("test_macro_f1", "macro F1", ".4f"), ("epoch_seconds", "s/epoch", ".2f"),
           ("head_ms_per_batch", "head ms/batch", ".2f")]


def report_table(results):
    """Markdown table: one row per head from its final history record."""
    lines = ["| head | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for head, record in results.items():
        cells = [format(record[key], spec) if key in record else "n/a" for key, _, spec in COLUMNS]
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _read_json(path):
    with open(path) as stream:
        return json.load(stream)


def plot_curves(histories, path):
    from npsoftmax.plots import _pyplot, _save

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for head, history in histories.items():
        axis.plot([r["epoch"] for r in history], [r["test_top1"] for r in history], marker="o", label=head)
    axis.set(xlabel="epoch", ylabel="test top-1 accuracy", title="heads compared", ylim=(0, 1))
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, path, plt)


def main(argv=None):
    parser = build_parser("Compare the four heads (same body, same budget); any train_np.py option applies.")
    parser.add_argument("--heads", default=",".join(HEAD_NAMES), help="comma-separated heads to compare")
    parser.add_argument("--runs-root", default="runs", help="parent folder of the runs and of compare/")
    parser.add_argument("--reuse", action="store_true", help="skip heads whose run already finished")
    parser.add_argument("--with-torch", action="store_true",
                        help="add a row for each finished train_torch.py run in <runs-root>/<dataset>-<head>-torch")
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))
    heads = [head.strip() for head in args.heads.split(",") if head.strip()]
    unknown = sorted(set(heads) - set(HEAD_NAMES))
    if unknown:
        parser.error(f"--heads: unknown {unknown}; choose from {list(HEAD_NAMES)}")

    histories = {}
    for head in heads:
        run_args = copy.copy(args)
        run_args.softmax = head
        run_args.run_dir = os.path.join(args.runs_root, f"{args.dataset}-{head}")
        history_path = os.path.join(run_args.run_dir, "history.json")
        finished = os.path.exists(history_path) and len(_read_json(history_path)) >= args.epochs
        if not (args.reuse and finished):
            print(f"=== training {head} ===")
            code = run(run_args)
            if code != 0:
                return code
        histories[head] = _read_json(history_path)[: args.epochs]
        if args.with_torch:
            torch_dir = os.path.join(args.runs_root, f"{args.dataset}-{head}-torch")
            torch_history = os.path.join(torch_dir, "history.json")
            if os.path.exists(torch_history):
                histories[f"{head} (torch)"] = _read_json(torch_history)[: args.epochs]
            else:
                print(f"no torch run for {head}: python examples/train_torch.py --softmax {head} "
                      f"--dataset {args.dataset} --epochs {args.epochs} --run-dir {torch_dir}")

    from npsoftmax.plots import plot_head_comparison

    out_dir = os.path.join(args.runs_root, "compare")
    os.makedirs(out_dir, exist_ok=True)
    results = {head: history[-1] for head, history in histories.items()}
    bars = plot_head_comparison(results, os.path.join(out_dir, "heads.png"),
                                metrics=("test_top1", "test_macro_f1", "epoch_seconds", "head_ms_per_batch"))
    curves = plot_curves(histories, os.path.join(out_dir, "curves.png"))
    table = report_table(results)
    report = os.path.join(out_dir, "report.md")
    with open(report, "w") as stream:
        stream.write(f"# Heads compared on {args.dataset}, {args.epochs} epochs\n\n{table}\n\n"
                     f"![bars](heads.png)\n\n![curves](curves.png)\n")
    print(table)
    for path in (report, bars, curves):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
