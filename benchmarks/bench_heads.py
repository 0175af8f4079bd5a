"""Forward + backward time per batch of the five softmax heads as the number of classes grows.

    python benchmarks/bench_heads.py              # K = 100 ... 100,000 (+ hierarchical, sampled at 1M), ~1-2 min
    python benchmarks/bench_heads.py --quick      # K = 100 ... 10,000, a few seconds
    python benchmarks/bench_heads.py --search     # exact tree decoding: best-first search vs full predict
    python benchmarks/bench_heads.py --search --search-classes 100000 --train-steps 100  # smaller
    python benchmarks/bench_heads.py --threads 1  # limit BLAS threads (threadpoolctl)
    python benchmarks/bench_heads.py --statistic min  # fastest step instead of the median

Batch B = 128, features D = 256, float32; labels are Zipf-distributed
(``p(k) ~ 1 / (k + 1)``, class 0 the most frequent), which is what the adaptive head's
cutoffs and the Huffman tree are built for. Heads:

* softmax             full softmax, O(B D K): the baseline every ratio is measured against
* gumbel              full softmax + Gumbel noise (one uniform draw per logit)
* hierarchical        balanced binary tree, O(B D log2 K)
* hierarchical-huffman  Huffman tree from the Zipf frequencies (frequent classes shallow)
* adaptive            cutoffs [s, 5s, 25s, ...] < K with s = clip(K // 50, 20, 2000), div_value 4
* sampled             sampled softmax, n_samples = min(512, K // 4) log-uniform candidates per batch

``--search`` times ``HierarchicalSoftmaxHead.predict(h, method="search")`` (exact, best-first)
against the full exact ``predict`` on a head trained until confident (features drawn around
class centroids, a few hundred ``sparse_sgd_step``s), asserting identical answers, and on
random untrained weights (the worst case: a flat distribution makes the search expand many
nodes).

For every K all heads are built first and then timed *interleaved* (round-robin over
the heads, several rounds), so a slow phase of the machine hits all of them alike;
the table reports medians (or minima, ``--statistic min``) and the speed-up over
full softmax from the same run. The
hierarchical heads keep dense ``grads`` but write only the rows a step touched (see
``HierarchicalSoftmaxHead``), so K = 1,000,000 costs the same per step as K = 1,000.
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from npsoftmax.heads import (AdaptiveSoftmaxHead, GumbelSoftmaxHead,  # noqa: E402
                             HierarchicalSoftmaxHead, SampledSoftmaxHead, SoftmaxHead, huffman_tree)

BATCH, FEATURES = 128, 256
HEAD_NAMES = ["softmax", "gumbel", "hierarchical", "hierarchical-huffman", "adaptive", "sampled"]


def zipf_probabilities(n_classes):
    """p(k) proportional to 1 / (k + 1), k = 0..K-1."""
    weights = 1.0 / np.arange(1, n_classes + 1)
    return weights / weights.sum()


def adaptive_cutoffs(n_classes):
    """Shortlist s = clip(K // 50, 20, 2000), then clusters growing 5x: [s, 5s, 25s, ...] < K."""
    shortlist = int(np.clip(n_classes // 50, 20, 2000))
    cutoffs = []
    while shortlist < n_classes:
        cutoffs.append(shortlist)
        shortlist *= 5
    return cutoffs


def build_heads(n_classes, names, seed):
    """The heads to time at this K (name -> head), float32, sharing nothing."""
    probabilities = zipf_probabilities(n_classes)
    builders = {
        "softmax": lambda rng: SoftmaxHead(FEATURES, n_classes, rng=rng),
        "gumbel": lambda rng: GumbelSoftmaxHead(FEATURES, n_classes, rng=rng, tau=0.5),
        "hierarchical": lambda rng: HierarchicalSoftmaxHead(FEATURES, n_classes, rng=rng),
        "hierarchical-huffman": lambda rng: HierarchicalSoftmaxHead(
            FEATURES, n_classes, rng=rng, tree=huffman_tree(probabilities)),
        "adaptive": lambda rng: AdaptiveSoftmaxHead(
            FEATURES, n_classes, rng=rng, cutoffs=adaptive_cutoffs(n_classes)),
        "sampled": lambda rng: SampledSoftmaxHead(
            FEATURES, n_classes, rng=rng, n_samples=min(512, n_classes // 4)),
    }
    return {name: builders[name](np.random.default_rng(seed)) for name in names}


def time_heads(heads, features, label_batches, rounds, steps_per_round):
    """Interleaved timing: milliseconds of forward+backward, list per head."""
    times = {name: [] for name in heads}
    for head in heads.values():  # warm-up: first-touch page faults, BLAS thread start
        head.forward(features, label_batches[0])
        head.backward()
    batch = 0
    for _ in range(rounds):
        for name, head in heads.items():
            for _ in range(steps_per_round):
                labels = label_batches[batch % len(label_batches)]
                batch += 1
                start = time.perf_counter()
                head.forward(features, labels)
                head.backward()
                times[name].append(1e3 * (time.perf_counter() - start))
    return times


def thread_report(threads):
    lines = [f"python {platform.python_version()}, numpy {np.__version__}, "
             f"{os.cpu_count()} CPUs; env: " + ", ".join(
                 f"{key}={os.environ[key]}" for key in
                 ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                 if key in os.environ) or "no thread variables set"]
    try:
        from threadpoolctl import threadpool_info
        for pool in threadpool_info():
            lines.append(f"  {pool.get('internal_api')} {pool.get('version')}: "
                         f"{pool.get('num_threads')} threads ({pool.get('user_api')})")
    except ImportError:
        lines.append("  (threadpoolctl not installed: BLAS thread count unknown)")
    if threads is not None:
        lines.append(f"  limited to {threads} BLAS thread(s) for this run (--threads)")
    return "\n".join(lines)


def format_table(results, sizes, statistic="median"):
    names = [name for name in HEAD_NAMES if any(name in results[k] for k in sizes)]
    width = max(len(name) for name in names) + 2
    header = f"{'K':>10} " + "".join(f"{name:>{width}}" for name in names)
    lines = [f"{statistic} forward+backward time per batch [ms]", header]
    for k in sizes:
        lines.append(f"{k:>10,} " + "".join(
            f"{results[k][name]:>{width}.2f}" if name in results[k] else f"{'-':>{width}}"
            for name in names))
    lines += ["", "speed-up over full softmax (same run)", header]
    for k in sizes:
        base = results[k].get("softmax")
        lines.append(f"{k:>10,} " + "".join(
            f"{base / results[k][name]:>{width - 1}.1f}x" if base and name in results[k]
            else f"{'-':>{width}}" for name in names))
    return "\n".join(lines)


def check_targets(results):
    """The issue's targets, reported (never asserted: timings are not tests)."""
    lines = []
    if 100_000 in results and "softmax" in results[100_000]:
        row = results[100_000]
        for name, target in (("hierarchical", 20), ("adaptive", 10)):
            if name in row:
                ratio = row["softmax"] / row[name]
                lines.append(f"K=100,000 {name}: {ratio:.1f}x faster than softmax "
                             f"(target >= {target}x): {'met' if ratio >= target else 'MISSED'}")
    if 1_000_000 in results and "hierarchical" in results[1_000_000]:
        ms = results[1_000_000]["hierarchical"]
        lines.append(f"K=1,000,000 hierarchical: {ms:.2f} ms per batch (target <= 15 ms): "
                     f"{'met' if ms <= 15 else 'MISSED'}")
    return "\n".join(lines)


def plot(results, sizes, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written (wanted {path})")
        return
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name in HEAD_NAMES:
        points = [(k, results[k][name]) for k in sizes if name in results[k]]
        if points:
            axes.plot(*zip(*points), marker="o", label=name)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("number of classes K")
    axes.set_ylabel("forward + backward per batch [ms]")
    axes.set_title(f"softmax heads, B={BATCH}, D={FEATURES}, float32, Zipf labels")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


def train_confident_tree(n_classes, n_centroids, steps, seed, learning_rate=1.0):
    """A balanced-tree head trained with ``sparse_sgd_step`` on features around class centroids.

    ``n_centroids`` classes (spread over the whole range) get a centroid in R^D; a batch
    draws B of them and adds noise. Returns ``(head, centroids (C, D), their classes (C,))``.
    """
    rng = np.random.default_rng(seed)
    head = HierarchicalSoftmaxHead(FEATURES, n_classes, rng=rng)
    classes = np.sort(rng.choice(n_classes, size=n_centroids, replace=False))
    centroids = rng.standard_normal((n_centroids, FEATURES)).astype(np.float32)
    for _ in range(steps):
        pick = rng.integers(0, n_centroids, BATCH)
        h = centroids[pick] + 0.3 * rng.standard_normal((BATCH, FEATURES)).astype(np.float32)
        head.forward(h, classes[pick])
        head.backward()
        head.sparse_sgd_step(learning_rate)
    return head, centroids, classes


def time_decoders(head, h, repeats):
    """Min time [ms] of full exact predict and of search; asserts equal answers."""
    full_ms, search_ms = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        exact = head.predict(h)
        full_ms.append(1e3 * (time.perf_counter() - start))
        start = time.perf_counter()
        found = head.predict(h, method="search")
        search_ms.append(1e3 * (time.perf_counter() - start))
        mismatch = np.flatnonzero(exact != found)
        assert mismatch.size == 0, f"search != exact on rows {mismatch[:10]}"
    return min(full_ms), min(search_ms), head.last_search_expansions


def search_benchmark(args):
    """Best-first search vs full exact predict (the ``--search`` section)."""
    rng = np.random.default_rng(args.seed + 1)
    rows = []
    for n_classes in args.search_classes:
        started = time.perf_counter()
        head, centroids, classes = train_confident_tree(n_classes, args.centroids, args.train_steps, args.seed)
        pick = rng.integers(0, len(classes), BATCH)
        h = centroids[pick] + 0.3 * rng.standard_normal((BATCH, FEATURES)).astype(np.float32)
        full, search, expansions = time_decoders(head, h, args.search_repeats)
        accuracy = float(np.mean(head.predict(h, method="search") == classes[pick]))
        rows.append((f"trained K={n_classes:,}", BATCH, full, search, expansions, accuracy))
        print(f"K={n_classes:,}: trained {args.train_steps} steps and timed in "
              f"{time.perf_counter() - started:.1f} s (depth {head.tree.max_depth})", flush=True)
        del head
    for n_classes in args.worst_classes:
        head = HierarchicalSoftmaxHead(FEATURES, n_classes, rng=np.random.default_rng(args.seed))
        h = rng.standard_normal((args.worst_batch, FEATURES)).astype(np.float32)
        full, search, expansions = time_decoders(head, h, 1)
        rows.append((f"random K={n_classes:,}", args.worst_batch, full, search, expansions, float("nan")))
        del head
    lines = ["exact decoding: full predict vs best-first search (identical answers asserted), float32, "
             f"D={FEATURES}",
             f"{'head':>22} {'batch':>6} {'full [ms]':>11} {'search [ms]':>12} {'speed-up':>9} "
             f"{'expanded mean':>14} {'max':>8} {'top-1 acc':>10}"]
    for name, batch, full, search, expansions, accuracy in rows:
        lines.append(f"{name:>22} {batch:>6} {full:>11.1f} {search:>12.1f} {full / search:>8.1f}x "
                     f"{expansions.mean():>14.1f} {expansions.max():>8} {accuracy:>10.3f}")
    for name, batch, full, search, *_ in rows:
        if name == "trained K=1,000,000":
            ratio = full / search
            lines.append(f"K=1,000,000 trained: search {ratio:.0f}x faster than full predict "
                         f"(target >= 50x): {'met' if ratio >= 50 else 'MISSED'}")
    print("\n".join(lines))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="K up to 10,000 and fewer repeats")
    parser.add_argument("--threads", type=int, default=None, help="limit BLAS threads")
    parser.add_argument("--no-million", action="store_true", help="skip the K = 1,000,000 row")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("bench_heads.png"),
                        help="where to save the log-log plot (default: benchmarks/bench_heads.png)")
    parser.add_argument("--statistic", choices=("median", "min"), default="median",
                        help="summary of the timed steps (min is robust when other jobs share the CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    search = parser.add_argument_group("--search: exact hierarchical decoding")
    search.add_argument("--search", action="store_true", help="run the search benchmark instead")
    search.add_argument("--search-classes", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="K of the trained heads (default 100000 1000000)")
    search.add_argument("--centroids", type=int, default=2048, help="classes with a centroid (default 2048)")
    search.add_argument("--train-steps", type=int, default=400, help="sparse SGD steps (default 400)")
    search.add_argument("--search-repeats", type=int, default=2, help="timed repeats (min reported)")
    search.add_argument("--worst-classes", type=int, nargs="*", default=[100_000],
                        help="K of untrained (random) heads, the worst case (default 100000)")
    search.add_argument("--worst-batch", type=int, default=4, help="batch of the worst case (default 4)")
    args = parser.parse_args(argv)
    if args.search:
        limiter = None
        if args.threads is not None:
            from threadpoolctl import threadpool_limits
            limiter = threadpool_limits(args.threads)
        print(thread_report(args.threads))
        rows = search_benchmark(args)
        if limiter is not None:
            limiter.restore_original_limits()
        return rows

    if args.quick:
        plan = [(100, HEAD_NAMES, 5), (1_000, HEAD_NAMES, 5), (10_000, HEAD_NAMES, 3)]
    else:
        plan = [(100, HEAD_NAMES, 8), (1_000, HEAD_NAMES, 8), (10_000, HEAD_NAMES, 6),
                (100_000, HEAD_NAMES, 6)]
        if not args.no_million:
            plan.append((1_000_000, ["hierarchical", "hierarchical-huffman", "sampled"], 6))

    limiter = None
    if args.threads is not None:
        from threadpoolctl import threadpool_limits
        limiter = threadpool_limits(args.threads)
    print(thread_report(args.threads))
    print(f"B={BATCH}, D={FEATURES}, float32, Zipf labels p(k) ~ 1/(k+1)\n")

    rng = np.random.default_rng(args.seed)
    features = rng.standard_normal((BATCH, FEATURES)).astype(np.float32)
    results = {}
    for n_classes, names, rounds in plan:
        started = time.perf_counter()
        heads = build_heads(n_classes, names, args.seed)
        labels = rng.choice(n_classes, size=(32, BATCH), p=zipf_probabilities(n_classes))
        # Fewer steps per round where a step is slow (the full softmax at large K).
        steps = 1 if n_classes >= 100_000 else (2 if n_classes >= 10_000 else 5)
        if n_classes >= 1_000_000:
            steps = 10
        times = time_heads(heads, features, labels, rounds, steps)
        summary = np.median if args.statistic == "median" else np.min
        results[n_classes] = {name: float(summary(t)) for name, t in times.items()}
        extra = ""
        if "adaptive" in heads:
            extra = f", adaptive cutoffs {heads['adaptive'].cutoffs[:-1]}"
        depths = {name: heads[name].tree.max_depth for name in heads if name.startswith("hier")}
        print(f"K={n_classes:,}: timed {rounds} rounds x {steps} steps in "
              f"{time.perf_counter() - started:.1f} s (incl. setup); max tree depth {depths}{extra}",
              flush=True)
        del heads
    sizes = [k for k, _, _ in plan]
    print()
    print(format_table(results, sizes, args.statistic))
    print()
    print(check_targets(results))
    plot(results, sizes, args.out)
    if limiter is not None:
        limiter.restore_original_limits()
    return results


if __name__ == "__main__":
    main()
