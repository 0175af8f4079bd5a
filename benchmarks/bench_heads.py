"""Forward + backward time per batch of the five softmax heads as the number of classes grows.

    python benchmarks/bench_heads.py              # K = 100 ... 100,000 (+ hierarchical, sampled at 1M), ~1-2 min
    python benchmarks/bench_heads.py --quick      # K = 100 ... 10,000, a few seconds
    python benchmarks/bench_heads.py --search     # exact tree decoding: best-first search vs full predict
    python benchmarks/bench_heads.py --search --search-classes 100000 --train-steps 100  # smaller
    python benchmarks/bench_heads.py --threads 1  # npsoftmax.parallel.set_threads(1), as train_np.py --threads 1
    python benchmarks/bench_heads.py --statistic min  # fastest step instead of the median
    python benchmarks/bench_heads.py --versus-torch --threads 1,2 --classes 100000,1000000 --save
                                                  # beside torch, each head alone in a process (~5-10 min)

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

``--versus-torch`` times npsoftmax's full softmax, hierarchical (balanced) and adaptive heads
beside ``torch.nn.AdaptiveLogSoftmaxWithLoss`` (and torch's full softmax, ``nn.Linear`` +
``cross_entropy``, up to ``--torch-softmax-max-classes``, default 100,000) at each K of
``--classes`` and each thread count of ``--threads``: B = ``--batch`` (128), D = 256, float32,
Zipf labels, adaptive cutoffs ``--cutoffs`` (2000,10000,50000) and ``--div-value`` (4) on both
sides, forward + backward (torch: the features require grad, gradients set to None every
step). Like ``bench_train.py`` it uses ``benchmarks/_processes.py``: every figure comes from
fresh worker processes, ``bench_heads.py --worker HEAD``, one head each, with the thread
counts in their environment (and ``torch.set_num_threads``; the npsoftmax worker calls
``npsoftmax.parallel.set_threads``, as ``train_np.py --threads`` does: single-threaded BLAS and
npsoftmax's own pool, which splits the heads' large products and softmaxes into blocks); per K and round, every thread
count in turn runs one process per head, so the heads and the thread counts alternate. A torch
head gets the weights of the npsoftmax head built from the same seed
(``npsoftmax.torch_adapter.to_torch``); if the adaptive (or full softmax) twins' first-step
losses differ, no ratio is reported (exit status 1). The table gives ms per batch per head and
thread count, the ratio adaptive npsoftmax/torch, the hierarchical speed-up over full softmax,
and flags a head whose time grows by more than 5% when a thread is added; then the issue's
targets. ``--save`` (or ``--save-to FILE``) writes the report and every worker's raw samples
to ``benchmarks/results/``. Exit status: 0 measured; 1 refused (losses differ); 2 usage
error; 3 a worker failed.
"""

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import _processes as processes  # first (it records the environment the workers get); this folder is sys.path[0]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

# numpy, npsoftmax and torch are imported inside the functions that use them: in a
# ``--versus-torch`` torch worker, torch's OpenMP runtime must start before npsoftmax is
# imported and sets OMP_WAIT_POLICY=PASSIVE for itself (see _processes.py), and the parent
# of the workers hands on the user's environment untouched.

BATCH, FEATURES = 128, 256
HEAD_NAMES = ["softmax", "gumbel", "hierarchical", "hierarchical-huffman", "adaptive", "sampled"]


def zipf_probabilities(n_classes):
    """p(k) proportional to 1 / (k + 1), k = 0..K-1."""
    import numpy as np

    weights = 1.0 / np.arange(1, n_classes + 1)
    return weights / weights.sum()


def adaptive_cutoffs(n_classes):
    """Shortlist s = clip(K // 50, 20, 2000), then clusters growing 5x: [s, 5s, 25s, ...] < K."""
    import numpy as np

    shortlist = int(np.clip(n_classes // 50, 20, 2000))
    cutoffs = []
    while shortlist < n_classes:
        cutoffs.append(shortlist)
        shortlist *= 5
    return cutoffs


def build_heads(n_classes, names, seed):
    """The heads to time at this K (name -> head), float32, sharing nothing."""
    import numpy as np

    from npsoftmax.heads import (AdaptiveSoftmaxHead, GumbelSoftmaxHead, HierarchicalSoftmaxHead,
                                 SampledSoftmaxHead, SoftmaxHead, huffman_tree)

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
    import numpy as np

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
        lines.append(f"  --threads {threads}: npsoftmax.parallel.set_threads({threads}) (BLAS single-threaded, "
                     f"{'a pool of ' + str(threads) + ' threads' if threads > 1 else 'no pool'})")
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
    import numpy as np

    from npsoftmax.heads import HierarchicalSoftmaxHead

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
    import numpy as np

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
    import numpy as np

    from npsoftmax.heads import HierarchicalSoftmaxHead

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


# ----------------------------------------------------------------------------
# --versus-torch: each head alone in a process of its own, npsoftmax beside torch
# ----------------------------------------------------------------------------
#: ``--worker`` name -> (side, what it times). The order is the order the workers alternate in.
VERSUS_HEADS = {
    "softmax": ("npsoftmax", "SoftmaxHead (full softmax)"),
    "hierarchical": ("npsoftmax", "HierarchicalSoftmaxHead, balanced binary tree"),
    "adaptive": ("npsoftmax", "AdaptiveSoftmaxHead"),
    "torch-adaptive": ("torch", "nn.AdaptiveLogSoftmaxWithLoss"),
    "torch-softmax": ("torch", "nn.Linear + cross_entropy (TorchSoftmaxHead)"),
}
#: The full-softmax heads: slow at large K, so they take ``--softmax-repeats`` steps.
FULL_SOFTMAX = ("softmax", "torch-softmax")
#: (npsoftmax head, torch head) built from the same weights: their first-step losses must agree.
TWINS = (("adaptive", "torch-adaptive"), ("softmax", "torch-softmax"))
VERSUS_CUTOFFS = [2000, 10000, 50000]
VERSUS_DIV_VALUE = 4.0
#: Label batches a worker cycles through (all drawn once, before timing).
LABEL_BATCHES = 16
#: "Slower with more threads": the median grows by more than this fraction.
SLOWER_TOLERANCE = 0.05
EXIT_REFUSED = 1
EXIT_WORKER_FAILED = 3


def versus_data(n_classes, batch, seed):
    """Features (batch, D) float32 and LABEL_BATCHES Zipf label batches (LABEL_BATCHES, batch) int64,
    the same in every worker (the heads' weights come from ``seed``, the data from ``seed + 1``)."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    features = rng.standard_normal((batch, FEATURES), dtype=np.float32)
    labels = rng.choice(n_classes, size=(LABEL_BATCHES, batch), p=zipf_probabilities(n_classes))
    return features, labels.astype(np.int64)


def build_numpy_head(name, n_classes, cutoffs, div_value, seed):
    """The npsoftmax head ``name`` ("softmax", "hierarchical" or "adaptive"), float32, weights from ``seed``."""
    import numpy as np

    from npsoftmax.heads import AdaptiveSoftmaxHead, HierarchicalSoftmaxHead, SoftmaxHead

    rng = np.random.default_rng(seed)
    if name == "softmax":
        return SoftmaxHead(FEATURES, n_classes, rng=rng, dtype=np.float32)
    if name == "hierarchical":
        return HierarchicalSoftmaxHead(FEATURES, n_classes, rng=rng, dtype=np.float32, tree="balanced")
    if name == "adaptive":
        return AdaptiveSoftmaxHead(FEATURES, n_classes, rng=rng, dtype=np.float32, cutoffs=cutoffs,
                                   div_value=div_value)
    raise ValueError(f"no npsoftmax head {name!r}")


def numpy_step(head, features, labels):
    """One forward + backward of an npsoftmax head (dh and every parameter gradient); returns the loss."""
    batches = iter(range(10 ** 12))

    def step():
        loss = head.forward(features, labels[next(batches) % len(labels)])
        head.backward()
        return float(loss)
    return step


def torch_step(torch, head, features, labels):
    """One forward + backward of a torch head, the features requiring grad (so dh is computed, as in
    npsoftmax); gradients are set to None first, every step."""
    from npsoftmax.torch_adapter import head_loss

    h = torch.from_numpy(features).requires_grad_(True)
    targets = [torch.from_numpy(y) for y in labels]
    batches = iter(range(10 ** 12))

    def step():
        head.zero_grad(set_to_none=True)
        h.grad = None
        loss = head_loss(head, h, targets[next(batches) % len(targets)])
        loss.backward()
        return loss.detach().item()
    return step


def versus_worker(args):
    """One head, one K, one thread count, alone in this process: build, take the first step (its loss
    is reported), warm up, time ``--repeats`` steps; print one JSON line."""
    env_at_start = processes.environment_at_start()
    side, _ = VERSUS_HEADS[args.worker]
    threads, n_classes = args.threads[0], args.classes[0]
    versions = {"python": sys.version.split()[0]}
    omp_wait_policy = None
    if side == "torch":
        import torch  # first: its OpenMP runtime reads the environment the parent passed, untouched

        torch.set_num_threads(threads)
        versions["torch"] = torch.__version__
        omp_wait_policy = os.environ.get("OMP_WAIT_POLICY")
    import npsoftmax  # before numpy, as the examples do: its thread defaults reach numpy's OpenBLAS
    import numpy as np

    if side == "npsoftmax":
        omp_wait_policy = os.environ.get("OMP_WAIT_POLICY")  # npsoftmax's own default, set on import
        from npsoftmax.parallel import set_threads

        set_threads(threads)  # as train_np.py --threads does: BLAS single-threaded, npsoftmax's pool
    from npsoftmax.timing import interleaved_samples, thread_report

    versions.update(numpy=np.__version__, npsoftmax=npsoftmax.__version__)
    started = time.perf_counter()
    features, labels = versus_data(n_classes, args.batch, args.seed)
    head = build_numpy_head(args.worker.removeprefix("torch-"), n_classes, args.cutoffs, args.div_value, args.seed)
    if side == "torch":
        from npsoftmax.torch_adapter import to_torch

        head = to_torch(head)  # the same weights, float32
        assert all(p.dtype == torch.float32 for p in head.parameters())
        if args.debug_perturb:  # a deliberately different twin, to see the loss check refuse it
            with torch.no_grad():
                for parameter in head.parameters():
                    parameter.mul_(1.5)
        head.train()
        step = torch_step(torch, head, features, labels)
    else:
        head.train()
        step = numpy_step(head, features, labels)
    build_seconds = time.perf_counter() - started
    first_loss = step()
    samples_ms = [1e3 * s for s in interleaved_samples({"step": step}, args.repeats, args.warmup)["step"]]
    median_ms = float(np.median(samples_ms))
    report = thread_report()
    if side == "torch":
        report += f" torch={torch.get_num_threads()}"
    processes.print_result({
        "side": side, "head": args.worker, "classes": n_classes, "threads": threads, "batch": args.batch,
        "features": FEATURES, "cutoffs": args.cutoffs, "div_value": args.div_value,
        "first_loss": first_loss, "median_ms": median_ms, "samples_ms": samples_ms,
        "build_seconds": build_seconds,
        "summary": f"{median_ms:.2f} ms, loss {first_loss:.5f}",
        "versions": versions, "thread_report": report, "env_at_start": env_at_start,
        "omp_wait_policy": omp_wait_policy, "torch_imported": "torch" in sys.modules, "pid": os.getpid(),
    })
    return 0


def versus_heads(n_classes, args, with_torch):
    """The heads timed at this K, in the order they alternate."""
    heads = [name for name in args.heads if VERSUS_HEADS[name][0] == "npsoftmax" or with_torch]
    if n_classes > args.torch_softmax_max_classes and "torch-softmax" in heads:
        heads.remove("torch-softmax")
    if args.numpy_softmax_max_classes is not None and n_classes > args.numpy_softmax_max_classes \
            and "softmax" in heads:
        heads.remove("softmax")
    return heads


def versus_worker_argv(head, n_classes, threads, args):
    repeats = args.softmax_repeats if head in FULL_SOFTMAX else args.repeats
    argv = [sys.executable, os.path.abspath(__file__), "--worker", head, "--classes", str(n_classes),
            "--threads", str(threads), "--batch", str(args.batch), "--repeats", str(repeats),
            "--warmup", str(args.warmup), "--seed", str(args.seed),
            "--cutoffs", ",".join(map(str, args.cutoffs)), "--div-value", repr(args.div_value)]
    return argv + (["--debug-perturb"] if args.debug_perturb and head.startswith("torch-") else [])


def twin_check(n_classes, threads, round_index):
    """The ``on_round`` check of :func:`_processes.alternate`: twins built from the same weights give
    the same first-step loss (else :class:`_processes.LossMismatch`: no ratio is reported)."""
    def check(_, results):
        for numpy_head, torch_head in TWINS:
            if numpy_head in results and torch_head in results:
                processes.check_losses_agree(results[numpy_head]["first_loss"], results[torch_head]["first_loss"],
                                             f"{numpy_head} head, K={n_classes:,}, {threads} thread(s), "
                                             f"round {round_index + 1}")
    return check


def measure_versus(args, classes, thread_counts, with_torch):
    """{(K, threads): Alternation} and every worker's result in run order.

    Per K, each round runs every thread count in turn (1 thread: softmax, hierarchical, adaptive,
    torch adaptive[, torch softmax]; then 2 threads: the same ...), so a slow minute of the machine
    hits both thread counts and all heads alike.
    """
    outcomes, runs = {}, []
    for n_classes in classes:
        heads = versus_heads(n_classes, args, with_torch)
        for round_index in range(args.rounds):
            for threads in thread_counts:
                commands = {head: versus_worker_argv(head, n_classes, threads, args) for head in heads}
                processes.log_to_stderr(f"-- K={n_classes:,}, {threads} thread(s), round {round_index + 1}/"
                                        f"{args.rounds}")
                one = processes.alternate(commands, 1, processes.thread_env(threads),
                                          on_round=twin_check(n_classes, threads, round_index),
                                          log=processes.log_to_stderr, timeout=args.worker_timeout)
                outcome = outcomes.setdefault((n_classes, threads), processes.Alternation(commands))
                for result in one.runs:
                    result = dict(result, round=round_index)
                    outcome.add(result.pop("label"), result.pop("round"), result)
                    runs.append(outcome.runs[-1])
    return outcomes, runs


def versus_medians(outcomes):
    """{(K, threads): {head: median of the processes' median ms}}."""
    return {key: {head: outcome.median(head, "median_ms") for head in outcome.by_label if outcome.by_label[head]}
            for key, outcome in outcomes.items()}


def thread_slowdowns(medians, n_classes, thread_counts, head):
    """[(t_from, t_to, relative change of the median)] for consecutive measured thread counts."""
    times = [(t, medians[(n_classes, t)][head]) for t in thread_counts
             if head in medians.get((n_classes, t), {})]
    return [(t0, t1, m1 / m0 - 1) for (t0, m0), (t1, m1) in zip(times, times[1:])]


def slower_text(changes):
    if not changes:
        return "-"
    worse = [(t0, t1, change) for t0, t1, change in changes if change > SLOWER_TOLERANCE]
    shown = worse or changes
    words = ", ".join(f"{t0}->{t1} {100 * change:+.0f}%" for t0, t1, change in shown)
    return ("YES " if worse else "no ") + f"({words})"


def milliseconds(value):
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def versus_table(outcomes, classes, thread_counts):
    medians = versus_medians(outcomes)
    width = 26
    header = (f"{'K':>10}  {'head':<24}" + "".join(f"{f'{t} thread' + ('s' if t > 1 else ''):>{width}}"
                                                    for t in thread_counts)
              + f"  {'first loss':>10}  slower with more threads? (> {100 * SLOWER_TOLERANCE:.0f}%)")
    lines = ["ms per batch, forward + backward: median of the processes' medians (min-max of those medians)",
             header]
    for n_classes in classes:
        heads = [head for head in VERSUS_HEADS if any(head in medians.get((n_classes, t), {}) for t in thread_counts)]
        for head in heads:
            cells, losses = [], set()
            for t in thread_counts:
                outcome = outcomes.get((n_classes, t))
                if outcome is None or not outcome.by_label.get(head):
                    cells.append(f"{'-':>{width}}")
                    continue
                low, high = outcome.spread(head, "median_ms")
                cells.append(f"{milliseconds(outcome.median(head, 'median_ms')):>9} "
                             f"({milliseconds(low)}-{milliseconds(high)})".rjust(width))
                losses.update(outcome.values(head, "first_loss"))
            loss_text = "-" if not losses else f"{min(losses):.5f}" + (
                "" if len(losses) == 1 else f"..{max(losses):.5f}")
            lines.append(f"{n_classes:>10,}  {head:<24}" + "".join(cells) + f"  {loss_text:>10}  "
                         + slower_text(thread_slowdowns(medians, n_classes, thread_counts, head)))
        ratios = (("adaptive np/torch", "adaptive", "torch-adaptive", "{:.2f}"),
                  ("hierarchical speed-up", "softmax", "hierarchical", "{:.0f}x"),
                  ("  (vs torch softmax)", "torch-softmax", "hierarchical", "{:.0f}x"),
                  ("adaptive speed-up", "softmax", "adaptive", "{:.1f}x"))
        for name, numerator, denominator, form in ratios:
            cells = []
            for t in thread_counts:
                row = medians.get((n_classes, t), {})
                cells.append((form.format(row[numerator] / row[denominator]) if numerator in row
                              and denominator in row else "-").rjust(width))
            if any(cell.strip() != "-" for cell in cells):
                lines.append(f"{n_classes:>10,}  {name:<24}" + "".join(cells))
    return lines


def versus_targets(outcomes, classes, thread_counts):
    """The issue's targets, reported (never asserted: timings are not tests)."""
    medians = versus_medians(outcomes)
    lines = ["targets (issue #13, item 3):"]

    def each_thread_count(n_classes, describe):
        if n_classes not in classes:
            lines.append(f"  K={n_classes:,}: {describe({})} (K not in --classes)")
            return
        for t in thread_counts:
            lines.append(f"  K={n_classes:,}, {t} thread(s): " + describe(medians.get((n_classes, t), {})))

    def adaptive(row):
        if "adaptive" not in row or "torch-adaptive" not in row:
            return "adaptive numpy/torch: not measured"
        ratio = row["adaptive"] / row["torch-adaptive"]
        return f"adaptive numpy/torch {ratio:.2f} (target <= 1.0): {'met' if ratio <= 1.0 else 'MISSED'}"

    def hierarchical_speedup(row):
        if "softmax" not in row or "hierarchical" not in row:
            return "hierarchical speed-up over full softmax: not measured"
        ratio = row["softmax"] / row["hierarchical"]
        return (f"hierarchical {ratio:.0f}x faster than full softmax (target >= 100x): "
                f"{'met' if ratio >= 100 else 'MISSED'}")

    def hierarchical_ms(row):
        if "hierarchical" not in row:
            return "hierarchical: not measured"
        ms = row["hierarchical"]
        return f"hierarchical {ms:.2f} ms per batch (target <= 3 ms): {'met' if ms <= 3 else 'MISSED'}"

    for n_classes in (100_000, 1_000_000):
        each_thread_count(n_classes, adaptive)
    each_thread_count(100_000, hierarchical_speedup)
    each_thread_count(1_000_000, hierarchical_ms)
    slower = [f"{head} at K={n_classes:,} ({t0}->{t1} {100 * change:+.0f}%)"
              for n_classes in classes for head in VERSUS_HEADS
              for t0, t1, change in thread_slowdowns(medians, n_classes, thread_counts, head)
              if change > SLOWER_TOLERANCE]
    if len(thread_counts) < 2:
        lines.append("  no head slower with more threads: not measured (one thread count)")
    else:
        lines.append("  no head slower with more threads: " + ("MISSED: " + "; ".join(slower) if slower else "met"))
    return lines


def run_versus(args, argv, with_torch, torch_missing):
    """The ``--versus-torch`` report: (lines, every worker's result, exit status)."""
    lines, thread_counts = processes.start_report("bench_heads.py --versus-torch: softmax heads, npsoftmax and torch, each head alone in its own process", __file__, argv, args.threads,
                                                  None if with_torch else torch_missing)
    lines.append(f"setup: B={args.batch}, D={FEATURES}, float32, Zipf labels p(k) ~ 1/(k+1) "
                 f"({LABEL_BATCHES} label batches, cycled), forward + backward (dh and every parameter "
                 f"gradient; torch: features require grad, grads set to None every step); adaptive cutoffs "
                 f"{args.cutoffs}, div_value {args.div_value:g}; hierarchical: balanced binary tree")
    order = ", ".join(head for head in args.heads if with_torch or VERSUS_HEADS[head][0] == "npsoftmax")
    limits = [f"{head} only at K <= {limit:,}" for head, limit in
              (("torch-softmax", args.torch_softmax_max_classes if with_torch else None),
               ("softmax", args.numpy_softmax_max_classes)) if limit is not None and head in args.heads]
    lines.append(f"method: per K, {args.rounds} round(s); each round runs every thread count in turn, and for "
                 f"each a fresh worker process per head, alternating {order}"
                 + (f" ({'; '.join(limits)})" if limits else "") + "; "
                 f"each worker: weights from seed {args.seed} (the torch heads: the npsoftmax head's weights copied "
                 f"by npsoftmax.torch_adapter.to_torch), 1 step (the first loss), {args.warmup} warm-up, "
                 f"{args.repeats} timed steps ({args.softmax_repeats} for full softmax); figure = median of the "
                 f"processes' medians")
    if not thread_counts:
        lines.append("nothing to measure")
        return lines, [], 0
    try:
        outcomes, runs = measure_versus(args, args.classes, thread_counts, with_torch)
    except processes.LossMismatch as error:
        lines.append(f"REFUSED: {error}")
        return lines, [], EXIT_REFUSED
    lines.append(processes.versions_line(runs))
    lines.append("threads, as the workers' pools reported them:")
    lines += processes.threads_lines(runs)
    lines.append(f"load average after: {processes.load_average()}")
    lines.append("")
    lines += versus_table(outcomes, args.classes, thread_counts)
    lines.append("")
    lines += versus_targets(outcomes, args.classes, thread_counts)
    return lines, runs, 0


# ----------------------------------------------------------------------------
def int_list(text):
    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def head_list(text):
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in VERSUS_HEADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown head(s) {unknown or text!r}; choose from {', '.join(VERSUS_HEADS)}")
    return [name for name in VERSUS_HEADS if name in names]  # the canonical order


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="K up to 10,000 and fewer repeats")
    parser.add_argument("--threads", type=int_list, default=None,
                        help="npsoftmax.parallel.set_threads(N) (one count); with --versus-torch a list, e.g. 1,2 (default 1,2)")
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
    versus = parser.add_argument_group("--versus-torch: npsoftmax heads beside torch, each alone in a process")
    versus.add_argument("--versus-torch", action="store_true", help="run the npsoftmax-vs-torch comparison instead")
    versus.add_argument("--classes", type=int_list, default=[100_000, 1_000_000],
                        help="K, comma-separated (default 100000,1000000)")
    versus.add_argument("--heads", type=head_list, default=list(VERSUS_HEADS),
                        help=f"heads to time, comma-separated (default all: {','.join(VERSUS_HEADS)})")
    versus.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    versus.add_argument("--cutoffs", type=int_list, default=VERSUS_CUTOFFS,
                        help="adaptive cutoffs, same for both sides (default 2000,10000,50000)")
    versus.add_argument("--div-value", type=float, default=VERSUS_DIV_VALUE, help="adaptive div_value (default 4)")
    versus.add_argument("--repeats", type=int, default=30, help="timed steps per worker process (default 30)")
    versus.add_argument("--softmax-repeats", type=int, default=5,
                        help="timed steps per worker of a full-softmax head (default 5; ~2.6 s each at K=1M)")
    versus.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (default 2)")
    versus.add_argument("--rounds", type=int, default=3,
                        help="worker processes per head, K and thread count, alternating (default 3)")
    versus.add_argument("--torch-softmax-max-classes", type=int, default=100_000,
                        help="time torch's full softmax only up to this K (default 100000)")
    versus.add_argument("--numpy-softmax-max-classes", type=int, default=None,
                        help="time npsoftmax's full softmax only up to this K (default: every K)")
    versus.add_argument("--no-torch", action="store_true", help="time the npsoftmax heads alone")
    versus.add_argument("--worker-timeout", type=float, default=1800.0,
                        help="seconds one worker process may run (default 1800)")
    versus.add_argument("--save", action="store_true",
                        help="write the report and every worker's raw output to "
                             "benchmarks/results/bench_heads-<UTC date>.txt")
    versus.add_argument("--save-to", metavar="FILE", help="as --save, to FILE")
    parser.add_argument("--worker", choices=sorted(VERSUS_HEADS), help=argparse.SUPPRESS)  # internal: one head
    parser.add_argument("--debug-perturb", action="store_true", help=argparse.SUPPRESS)  # torch twins made different
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker or args.versus_torch:
        for option, value in (("--batch", args.batch), ("--repeats", args.repeats),
                              ("--softmax-repeats", args.softmax_repeats), ("--rounds", args.rounds)):
            if value < 1:
                parser.error(f"{option} must be >= 1, got {value}")
        if args.warmup < 0:
            parser.error("--warmup must be >= 0")
        if any(later <= earlier for earlier, later in zip(args.cutoffs, args.cutoffs[1:])):
            parser.error(f"--cutoffs must be strictly increasing, got {args.cutoffs}")
        if min(args.classes) <= args.cutoffs[-1]:
            parser.error(f"every K of --classes must exceed the last cutoff {args.cutoffs[-1]}, got {args.classes}")
    if args.worker:
        if len(args.threads or []) != 1 or len(args.classes) != 1:
            parser.error("--worker needs one thread count and one K")
        return versus_worker(args)
    if args.versus_torch:
        args.threads = args.threads or [1, 2]
        torch_missing = "--no-torch was given"
        with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
        if not args.no_torch and not with_torch:
            torch_missing = "torch is not installed; `pip install torch==2.13.0` for the comparison"
        try:
            lines, runs, status = run_versus(args, argv, with_torch, torch_missing)
        except processes.WorkerFailed as error:
            print(f"error: a worker failed: {error}", file=sys.stderr)
            return EXIT_WORKER_FAILED
        processes.publish(lines, runs, "bench_heads", save=args.save, out=args.save_to)
        return status
    if args.threads is not None and len(args.threads) != 1:
        parser.error("--threads takes one count (a list only with --versus-torch)")
    threads = None if args.threads is None else args.threads[0]
    import npsoftmax.heads  # noqa: F401  (OpenBLAS and OpenMP load before the limit, so it reaches them)

    if args.search:
        if threads is not None:
            from npsoftmax.parallel import set_threads

            set_threads(threads)
        print(thread_report(threads))
        return search_benchmark(args)
    return run_sweep(args, threads)


def run_sweep(args, threads):
    """The default mode: every head at K = 100 ... 1,000,000, interleaved in this process."""
    import numpy as np

    if args.quick:
        plan = [(100, HEAD_NAMES, 5), (1_000, HEAD_NAMES, 5), (10_000, HEAD_NAMES, 3)]
    else:
        plan = [(100, HEAD_NAMES, 8), (1_000, HEAD_NAMES, 8), (10_000, HEAD_NAMES, 6),
                (100_000, HEAD_NAMES, 6)]
        if not args.no_million:
            plan.append((1_000_000, ["hierarchical", "hierarchical-huffman", "sampled"], 6))

    if threads is not None:
        from npsoftmax.parallel import set_threads

        set_threads(threads)  # as train_np.py --threads does: BLAS single-threaded, npsoftmax's pool
    print(thread_report(threads))
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
    return results


if __name__ == "__main__":
    status = main()
    sys.exit(status if isinstance(status, int) else 0)
