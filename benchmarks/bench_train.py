"""One training step of the default CIFAR CNN: npsoftmax vs PyTorch, each side alone in its own process.

Builds the default body (conv 32/64/128, each 3x3 pad 1 -> [batch norm] -> 2x2 max
pool -> ReLU; Flatten -> Linear 2048->256 -> ReLU) with the full softmax head
(Linear 256->100 + cross-entropy) in npsoftmax, and its identical twin in torch
(``npsoftmax.torch_adapter.to_torch``: same layers, same initial weights,
float32), and times

* a training step: forward, softmax head, backward, SGD momentum update;
* inference: forward to log-probabilities in eval mode;

at batch 128 on random CIFAR-shaped data, for the batch-norm model and the
plain variant without batch norm.

How (``benchmarks/_processes.py``): every measurement is a fresh worker process,
``bench_train.py --worker numpy|torch``, that builds the model (same seed: same
weights and data on both sides), takes one step whose loss it reports, warms up,
times ``--repeats`` steps and prints one JSON line. The workers alternate
(npsoftmax, torch, npsoftmax, torch ... for ``--rounds`` rounds) so a slow minute
of the machine hits both sides; a figure is the median of the processes' medians,
with their min-max spread. Each worker has the parent's environment plus the
thread counts of ``--threads`` (OMP/OPENBLAS/MKL_NUM_THREADS, torch.set_num_threads),
and nothing else: npsoftmax sets ``OMP_WAIT_POLICY=PASSIVE`` for itself when it
is imported, torch keeps its own default.

The twins must be twins: if npsoftmax's and torch's first-step losses differ
(relative tolerance 1e-4) no ratio is printed; both losses are, and the exit
status is 1.

    python benchmarks/bench_train.py                          # all cores, both variants
    python benchmarks/bench_train.py --threads 1,2,4,8,16     # the sweep (counts above the cores are skipped)
    python benchmarks/bench_train.py --threads 1,2 --load 1   # + the same under 1 busy process: slowdowns
    python benchmarks/bench_train.py --save                   # + the report and raw samples in benchmarks/results/
    python benchmarks/bench_train.py --profile                # + per-layer npsoftmax table and conv GFLOP/s
    python benchmarks/bench_train.py --no-torch               # npsoftmax figures alone
    python benchmarks/bench_train.py --same-process           # the old way: both in one process (flatters npsoftmax)

``--load N`` starts N single-threaded busy loops (each stops by itself after
``--load-max-seconds`` or when this script dies, and is terminated when the
measurement ends), repeats the same measurement beside them, and prints each
side's slowdown (loaded / unloaded median) and the loaded ratio.

``--same-process`` times both sides interleaved in *this* process, with
``OMP_WAIT_POLICY=PASSIVE`` set for both. It is kept for comparison with earlier
figures, and it is not a fair race: npsoftmax's OpenBLAS workers still spin while
torch's step runs, and torch runs under npsoftmax's wait policy (torch's step read
~122 ms that way against ~71 ms alone, PERFORMANCE-NOTES.md).

With torch not installed the script prints the npsoftmax figures alone and says
so (install the CPU build with ``pip install torch==2.13.0``).

Exit status: 0 measured; 1 the first-step losses differ (no ratio reported);
2 usage error; 3 a worker process failed.
"""

import argparse
import importlib.util
import os
import sys

import _processes as processes  # this script's folder is sys.path[0]

# numpy, npsoftmax and torch are imported inside the functions that use them. The parent of the
# workers imports none of them, so the environment it hands on is the user's (importing npsoftmax
# would add OMP_WAIT_POLICY=PASSIVE); and the torch worker must load torch's OpenMP runtime before
# npsoftmax is imported, so that the runtime reads the environment without npsoftmax's setting.

N_CLASSES = 100
IMAGE_SHAPE = (3, 32, 32)
LEARNING_RATE = 0.01
MOMENTUM = 0.9
VARIANTS = {"bn": True, "plain": False}
SIDES = {"numpy": "npsoftmax", "torch": "torch"}  # --worker name -> label in the tables
EXIT_REFUSED = 1
EXIT_WORKER_FAILED = 3


# ----------------------------------------------------------------------------
# The two implementations
# ----------------------------------------------------------------------------
def make_batch(batch, seed):
    """The fixed random batch both sides train on: x (batch, 3, 32, 32) float32, y (batch,) int64."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *IMAGE_SHAPE), dtype=np.float32)
    y = rng.integers(0, N_CLASSES, size=batch)
    return x, y


class NumpyRunner:
    """npsoftmax model + SGD; ``train_step()`` and ``infer()`` on fixed data."""

    def __init__(self, batch_norm, x, y, seed, conv_algorithm="auto", fuse=True):
        import numpy as np

        from npsoftmax.layers import Conv2d
        from npsoftmax.models import build_model
        from npsoftmax.optim import SGD

        self.model = build_model("softmax", N_CLASSES, IMAGE_SHAPE, rng=np.random.default_rng(seed),
                                 dtype=np.float32, batch_norm=batch_norm)
        for module in self.model.body:
            if isinstance(module, Conv2d):
                module.algorithm = conv_algorithm
        self.model.body.fuse_batchnorm_max_pool = fuse  # batch norm + max pool as one pass (layers.Sequential)
        # torch computes no gradient for the images (they do not require grad); neither
        # does the default npsoftmax body (its first conv skips dx: one GEMM and a col2im).
        assert not self.model.body[0].input_gradient
        self.optimizer = SGD(self.model.params, lr=LEARNING_RATE, momentum=MOMENTUM)
        self.x, self.y = x, y

    def train_step(self):
        loss = self.model.forward(self.x, self.y)
        self.model.backward()
        self.optimizer.step(self.model.grads)
        return float(loss)

    def infer(self):
        return self.model.log_prob(self.x)


class TorchRunner:
    """The same network in PyTorch (``npsoftmax.torch_adapter.to_torch``: nn.Conv2d, nn.BatchNorm2d,
    ... and nn.Linear + cross-entropy for the head, the npsoftmax model's weights copied in),
    trained with ``torch.optim.SGD`` with the same momentum."""

    def __init__(self, numpy_model, x, y):
        import torch

        from npsoftmax.torch_adapter import to_torch

        self.torch = torch
        self.model = to_torch(numpy_model)
        assert all(p.dtype == torch.float32 for p in self.model.parameters())
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
        self.x = torch.from_numpy(x)
        self.y = torch.from_numpy(y)

    def train_step(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(self.x, self.y)  # mean cross-entropy, as npsoftmax's softmax head
        loss.backward()
        self.optimizer.step()
        return loss.detach().item()

    def infer(self):
        with self.torch.inference_mode():
            return self.model.log_prob(self.x)


def set_modes(runners, training):
    for runner in runners.values():
        runner.model.train() if training else runner.model.eval()


# ----------------------------------------------------------------------------
# Profile: per-layer table and conv GEMM efficiency vs a plain numpy GEMM
# ----------------------------------------------------------------------------
def conv_layers(model, batch):
    """(label, module, input shape (N, C, H, W)) for each Conv2d of the body, following
    the spatial size through the convs and pools of the default CNN."""
    channels, height, width = IMAGE_SHAPE
    for index, module in enumerate(model.body):
        kind = type(module).__name__
        if kind == "Conv2d":
            yield f"{index}: Conv2d", module, (batch, channels, height, width)
            (KH, KW), stride, pad = module.kernel_size, module.stride, module.pad
            height, width = (height + 2 * pad - KH) // stride + 1, (width + 2 * pad - KW) // stride + 1
            channels = module.out_channels
        elif kind == "MaxPool2d":
            height = (height - module.size) // module.stride + 1
            width = (width - module.size) // module.stride + 1


def plain_gemm_gflops(model, batch, repeats):
    """GFLOP/s of a plain product on random float32 operands of each conv's whole-batch forward
    shape: W (F, C*KH*KW) @ cols (C*KH*KW, N*OH*OW) for an im2col layer, the 16 products
    U (16, F, C) @ V (16, C, N*TH*TW) for a Winograd layer: what BLAS gives at that size.
    Returns (label, shape text, GFLOP/s) per conv layer."""
    import numpy as np

    from npsoftmax.functional import conv_algorithm, conv_output_size
    from npsoftmax.profiler import conv_gemm_flops
    from npsoftmax.timing import interleaved_medians

    rng = np.random.default_rng(1)
    results = []
    for label, module, x_shape in conv_layers(model, batch):
        rows, inner = module.out_channels, module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        flops = conv_gemm_flops(module, x_shape)[0]
        w_shape = (rows, module.in_channels, *module.kernel_size)
        output_size = tuple(conv_output_size(size, k, module.stride, module.pad)
                            for size, k in zip(x_shape[2:], module.kernel_size))
        if conv_algorithm(w_shape, module.stride, module.algorithm, output_size=output_size) == "winograd":
            inner = module.in_channels
            columns = flops // (2 * 16 * rows * inner)
            a = rng.standard_normal((16, rows, inner), dtype=np.float32)
            b = rng.standard_normal((16, inner, columns), dtype=np.float32)
            shape = f"16 x ({rows} x {inner}) @ ({inner} x {columns})"
        else:
            columns = flops // (2 * rows * inner)
            a = rng.standard_normal((rows, inner), dtype=np.float32)
            b = rng.standard_normal((inner, columns), dtype=np.float32)
            shape = f"({rows} x {inner}) @ ({inner} x {columns})"
        seconds = interleaved_medians({"gemm": lambda: a @ b}, repeats)["gemm"]
        results.append((label, shape, flops / seconds / 1e9))
    return results


def run_profile(runner, steps):
    """Profile ``steps`` training steps of the npsoftmax runner (after one untimed step)."""
    from npsoftmax.profiler import profile

    runner.train_step()
    with profile(runner.model, runner.optimizer) as profiler:
        profiler.reset()
        for _ in range(steps):
            runner.train_step()  # its optimizer step counts the step
    return profiler


def profile_lines(numpy_runners, args):
    """The per-layer profile of each npsoftmax runner and the plain-GEMM GFLOP/s, as report lines."""
    lines = []
    for name, runner in numpy_runners.items():
        profiler = run_profile(runner, args.profile_steps)
        lines.append(f"\n[{name}] " + profiler.table())
    model = next(iter(numpy_runners.values())).model
    lines.append("\nplain numpy GEMM of each conv's whole-batch forward shape (im2col: W @ cols; Winograd: "
                 "its 16 products), same process:")
    for label, shape, gflops in plain_gemm_gflops(model, args.batch, max(args.repeats // 3, 3)):
        lines.append(f"  {label:<12} {shape}: {gflops:6.1f} GFLOP/s")
    return lines


# ----------------------------------------------------------------------------
# A worker: one side, one variant, one thread count, alone in this process
# ----------------------------------------------------------------------------
def worker(args):
    """Build, take the first step (its loss is reported), warm up, time; print one JSON line."""
    env_at_start = processes.environment_at_start()
    threads = args.threads[0]
    versions = {"python": sys.version.split()[0]}
    if args.worker == "torch":
        import torch  # first: its OpenMP runtime reads the environment the parent passed, untouched

        torch.set_num_threads(threads)
        versions["torch"] = torch.__version__
        omp_wait_policy = os.environ.get("OMP_WAIT_POLICY")
    import npsoftmax  # before numpy, as the examples do: its thread defaults reach numpy's OpenBLAS
    import numpy as np

    if args.worker == "numpy":
        omp_wait_policy = os.environ.get("OMP_WAIT_POLICY")  # npsoftmax's own default, set on import
        from npsoftmax.parallel import set_threads

        set_threads(threads)  # as train_np.py --threads does: the conv chunks' pool, BLAS single-threaded
    from npsoftmax.kernels import BACKEND
    from npsoftmax.timing import interleaved_samples, thread_report

    versions.update(numpy=np.__version__, npsoftmax=f"{npsoftmax.__version__} (im2col {BACKEND})")
    x, y = make_batch(args.batch, args.seed)
    runner = NumpyRunner(VARIANTS[args.variant], x, y, args.seed, args.conv_algorithm, not args.no_fuse)
    if args.worker == "torch":
        runner = TorchRunner(runner.model, x, y)
        if args.debug_perturb:  # a deliberately different twin, to see the loss check refuse it
            with torch.no_grad():
                for parameter in runner.model.head.parameters():
                    parameter.mul_(1.5)
    runner.model.train()
    first_loss = runner.train_step()
    train = interleaved_samples({"train": runner.train_step}, args.repeats, args.warmup)["train"]
    runner.model.eval()
    infer = interleaved_samples({"infer": runner.infer}, args.repeats, args.warmup)["infer"]
    samples_ms = {"train": [1e3 * s for s in train], "infer": [1e3 * s for s in infer]}
    median_ms = {key: float(np.median(values)) for key, values in samples_ms.items()}
    report = thread_report()
    if args.worker == "torch":
        report += f" torch={torch.get_num_threads()}"
    processes.print_result({
        "side": SIDES[args.worker], "variant": args.variant, "threads": threads, "batch": args.batch,
        "first_loss": first_loss, "median_ms": median_ms, "samples_ms": samples_ms,
        "summary": f"train {median_ms['train']:.1f} ms, infer {median_ms['infer']:.1f} ms, loss {first_loss:.5f}",
        "versions": versions, "thread_report": report, "env_at_start": env_at_start,
        "omp_wait_policy": omp_wait_policy, "torch_imported": "torch" in sys.modules, "pid": os.getpid(),
    })
    return 0


# ----------------------------------------------------------------------------
# The parent: workers in alternation, per thread count, unloaded and loaded
# ----------------------------------------------------------------------------
def worker_argv(side, variant, threads, args):
    argv = [sys.executable, os.path.abspath(__file__), "--worker", side, "--variant", variant,
            "--threads", str(threads), "--batch", str(args.batch), "--repeats", str(args.repeats),
            "--warmup", str(args.warmup), "--seed", str(args.seed), "--conv-algorithm", args.conv_algorithm]
    argv += ["--no-fuse"] if args.no_fuse else []
    return argv + (["--debug-perturb"] if args.debug_perturb and side == "torch" else [])


def loss_check(variants, threads, load):
    """The ``on_round`` check of :func:`_processes.alternate`: each variant's twins give the same first loss."""
    def check(round_index, results):
        for variant in variants:
            pair = results.get(f"{variant} npsoftmax"), results.get(f"{variant} torch")
            if None not in pair:
                processes.check_losses_agree(pair[0]["first_loss"], pair[1]["first_loss"],
                                             f"{variant} model, {threads} threads, load {load}, "
                                             f"round {round_index + 1}")
    return check


def measure(args, variants, thread_counts, with_torch):
    """Every (threads, load) measurement; returns a list of (threads, load, Alternation, load_note)."""
    measurements = []
    for threads in thread_counts:
        commands = {}
        for variant in variants:
            for side in ("numpy", "torch") if with_torch else ("numpy",):
                commands[f"{variant} {SIDES[side]}"] = worker_argv(side, variant, threads, args)
        env = processes.thread_env(threads)
        for load in sorted({0, args.load}):
            processes.log_to_stderr(f"-- {threads} threads, {load} busy processes beside")
            with processes.BusyLoad(load, args.load_max_seconds) as busy:  # load 0: no process at all
                outcome = processes.alternate(commands, args.rounds, env, on_round=loss_check(variants, threads, load),
                                              log=processes.log_to_stderr)
                note = None if busy.all_alive() else (
                    f"a busy process stopped before the measurement ended (--load-max-seconds "
                    f"{args.load_max_seconds}): the loaded figures at {threads} threads understate the load")
            measurements.append((threads, load, outcome, note))
    return measurements


def spread_text(outcome, label, key):
    low, high = outcome.spread(label, key)
    return f"({low:.1f}-{high:.1f})"


def results_table(measurements, variants, batch):
    header = (f"{'threads':>7} {'load':>4}  {'model':<6}{'impl':<11}{'train ms':>9} {'spread':<13}{'img/s':>6}"
              f"{'infer ms':>10} {'spread':<13}{'first loss':>11}")
    lines = [header]
    for threads, load, outcome, _ in measurements:
        for variant in variants:
            medians = {}
            for side in SIDES.values():
                label = f"{variant} {side}"
                if label not in outcome.by_label:
                    continue
                train, infer = outcome.median(label, "median_ms.train"), outcome.median(label, "median_ms.infer")
                medians[side] = train, infer
                losses = sorted(set(outcome.values(label, "first_loss")))
                loss_text = f"{losses[0]:.5f}" + ("" if len(losses) == 1 else f"..{losses[-1]:.5f}")
                lines.append(f"{threads:>7} {load:>4}  {variant:<6}{side:<11}{train:>9.1f} "
                             f"{spread_text(outcome, label, 'median_ms.train'):<13}{1e3 * batch / train:>6.0f}"
                             f"{infer:>10.1f} {spread_text(outcome, label, 'median_ms.infer'):<13}{loss_text:>11}")
            if len(medians) == 2:
                (np_train, np_infer), (torch_train, torch_infer) = medians["npsoftmax"], medians["torch"]
                lines.append(f"{threads:>7} {load:>4}  {variant:<6}{'np/torch':<11}{np_train / torch_train:>9.2f} "
                             f"{'':<13}{'':>6}{np_infer / torch_infer:>10.2f}")
    return lines


def slowdown_table(measurements, variants, load):
    """Each side's loaded / unloaded median train step, at each thread count, and the loaded ratio."""
    by_key = {(threads, n): outcome for threads, n, outcome, _ in measurements}
    lines = [f"slowdown beside {load} busy process(es): loaded / unloaded median train ms, each side "
             f"against its own unloaded time",
             f"{'threads':>7}  {'model':<6}{'npsoftmax':>10}{'torch':>8}{'loaded np/torch':>17}"]
    for threads in sorted({threads for threads, _ in by_key}):
        unloaded, loaded = by_key[(threads, 0)], by_key[(threads, load)]
        for variant in variants:
            factors, loaded_ms = {}, {}
            for side in SIDES.values():
                label = f"{variant} {side}"
                if label in loaded.by_label:
                    loaded_ms[side] = loaded.median(label, "median_ms.train")
                    factors[side] = loaded_ms[side] / unloaded.median(label, "median_ms.train")
            ratio = loaded_ms["npsoftmax"] / loaded_ms["torch"] if "torch" in loaded_ms else None
            lines.append(f"{threads:>7}  {variant:<6}{factors['npsoftmax']:>9.2f}x"
                         + (f"{factors['torch']:>7.2f}x{ratio:>17.2f}" if ratio is not None else f"{'-':>8}"))
    return lines


def run_processes(args, argv, variants, with_torch, torch_missing):
    lines, thread_counts = processes.start_report("bench_train.py: one training step of the default CIFAR CNN, each side alone in its own process", __file__, argv, args.threads,
                                                  None if with_torch else torch_missing)
    order = ", ".join(f"{variant} {side}" for variant in variants
                      for side in (("npsoftmax", "torch") if with_torch else ("npsoftmax",)))
    lines.append(f"method: batch {args.batch}, float32, npsoftmax conv algorithm {args.conv_algorithm!r}, batch norm + "
                 f"max pool {'apart (--no-fuse)' if args.no_fuse else 'fused'}; "
                 f"per thread count {args.rounds} round(s) of fresh worker processes alternating {order}; "
                 f"each worker: 1 step (its loss is the first loss), {args.warmup} warm-up, {args.repeats} timed "
                 f"steps, then the same for inference; figure = median of the processes' medians, spread = "
                 f"their min-max")
    if args.load:
        lines.append(f"load: {args.load} single-threaded busy loop process(es) beside the 'load {args.load}' rows")
    if not thread_counts:
        lines.append("nothing to measure")
        return lines, [], 0
    try:
        measurements = measure(args, variants, thread_counts, with_torch)
    except processes.LossMismatch as error:
        lines.append(f"REFUSED: {error}")
        return lines, [], EXIT_REFUSED
    runs = [result for _, _, outcome, _ in measurements for result in outcome.runs]
    lines.append(processes.versions_line(runs))
    lines.append("threads, as the workers' pools reported them:")
    lines += processes.threads_lines(runs)
    lines.append(f"load average after: {processes.load_average()}")
    lines.append("")
    lines += results_table(measurements, variants, args.batch)
    lines += [f"note: {note}" for _, _, _, note in measurements if note]
    if args.load:
        lines.append("")
        lines += slowdown_table(measurements, variants, args.load)
    if args.profile:
        import npsoftmax  # noqa: F401  (loads numpy's OpenBLAS and the OpenMP runtime, so that the limit reaches them)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=thread_counts[0]):
            x, y = make_batch(args.batch, args.seed)
            runners = {variant: NumpyRunner(VARIANTS[variant], x, y, args.seed, args.conv_algorithm, not args.no_fuse)
                       for variant in variants}
            lines.append(f"\nper-layer profile: npsoftmax alone in the parent process, {thread_counts[0]} threads")
            lines += profile_lines(runners, args)
    return lines, runs, 0


# ----------------------------------------------------------------------------
# The old way: both sides interleaved in this one process (flatters npsoftmax)
# ----------------------------------------------------------------------------
def run_same_process(args, argv, variants, with_torch, torch_missing):
    # Before numpy, npsoftmax or torch load an OpenMP runtime (it reads this once).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from npsoftmax.timing import interleaved_medians, thread_report

    threads = args.threads[0]
    torch = None
    if with_torch:
        import torch

        torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    limits = threadpool_limits(limits=threads) if threadpool_limits else None

    x, y = make_batch(args.batch, args.seed)
    lines = processes.report_header(
        "bench_train.py --same-process: npsoftmax and torch interleaved in ONE process", __file__, argv)
    lines.append("warning: this mode flatters npsoftmax; torch's step is slowed by npsoftmax's spinning OpenBLAS "
                 "workers and runs under OMP_WAIT_POLICY=PASSIVE; the default mode times each side alone")
    lines.append(f"training step, batch {args.batch}, float32, median of {args.repeats} interleaved steps after "
                 f"{args.warmup} warm-up")
    if threadpool_limits is None:
        lines.append("threadpoolctl is not installed: BLAS/OpenMP threads are left at their defaults")
    lines.append(thread_report() + (f" torch={torch.get_num_threads()} (torch {torch.__version__})" if torch else ""))
    lines.append("env: " + " ".join(f"{name}={os.environ.get(name, 'unset')}"
                                    for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")))
    if torch is None:
        lines.append(f"npsoftmax alone: {torch_missing}")

    rows, numpy_runners, status = [], {}, 0
    for name in variants:
        runners = {"npsoftmax": NumpyRunner(VARIANTS[name], x, y, args.seed, args.conv_algorithm, not args.no_fuse)}
        if torch is not None:
            runners["torch"] = TorchRunner(runners["npsoftmax"].model, x, y)
            # Same weights, same data: the first losses agree (a check that the networks are the same).
            losses = {label: runner.train_step() for label, runner in runners.items()}
            lines.append(f"[{name}] first-step loss: npsoftmax {losses['npsoftmax']:.5f}, torch {losses['torch']:.5f}")
            if not processes.losses_agree(losses["npsoftmax"], losses["torch"]):
                lines.append(f"REFUSED: [{name}] the first-step losses differ; no ratio for this variant")
                status = EXIT_REFUSED
        numpy_runners[name] = runners["npsoftmax"]
        set_modes(runners, training=True)
        train = interleaved_medians({label: r.train_step for label, r in runners.items()}, args.repeats, args.warmup)
        set_modes(runners, training=False)
        infer = interleaved_medians({label: r.infer for label, r in runners.items()}, args.repeats, args.warmup)
        set_modes(runners, training=True)
        rows.append((name, train, infer, status == 0))

    lines.append("")
    lines.append(f"{'model':<7}{'impl':<11}{'train ms':>10}{'img/s':>9}{'infer ms':>10}{'img/s':>9}")
    for name, train, infer, agree in rows:
        for label in train:
            lines.append(f"{name:<7}{label:<11}{train[label] * 1e3:>10.1f}{args.batch / train[label]:>9.0f}"
                         f"{infer[label] * 1e3:>10.1f}{args.batch / infer[label]:>9.0f}")
        if "torch" in train and agree:
            lines.append(f"{name:<7}{'ratio np/torch':<18}{train['npsoftmax'] / train['torch']:>7.2f}"
                         f"{'':>9}{infer['npsoftmax'] / infer['torch']:>10.2f}")
    if args.profile:
        lines += profile_lines(numpy_runners, args)
    if limits is not None:
        limits.restore_original_limits()
    return lines, [], status


# ----------------------------------------------------------------------------
def thread_list(text):
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated thread counts, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return counts


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per worker process (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="worker processes per side and thread count, alternating (default 5)")
    parser.add_argument("--threads", type=thread_list, default=[os.cpu_count() or 1],
                        help="thread count(s) for BLAS, OpenMP and torch, e.g. 1,2,4,8,16 (default: all cores)")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="also measure beside N busy-loop processes and print each side's slowdown")
    parser.add_argument("--load-max-seconds", type=float, default=3600.0,
                        help="each busy loop stops by itself after this long (default 3600)")
    parser.add_argument("--variant", choices=["both", "bn", "plain"], default="both",
                        help="with batch norm, the plain CNN, or both (default)")
    parser.add_argument("--conv-algorithm", choices=["auto", "im2col", "winograd"], default="auto",
                        help="npsoftmax's conv layers: 'auto' (default: Winograd F(2x2,3x3) for the 3x3 convs with "
                             ">= 16 input channels and outputs >= 8x8, im2col for the first) or one algorithm "
                             "wherever it applies "
                             "('winograd' needs 3x3 kernels: all of this model's convs are)")
    parser.add_argument("--no-fuse", action="store_true",
                        help="run npsoftmax's batch norm and the max pool after it as two passes (the default "
                             "fuses them: layers.Sequential.fuse_batchnorm_max_pool)")
    parser.add_argument("--profile", action="store_true", help="also print the per-layer npsoftmax profile")
    parser.add_argument("--profile-steps", type=int, default=5, help="steps averaged by --profile (default 5)")
    parser.add_argument("--no-torch", action="store_true", help="time npsoftmax alone even if torch is installed")
    parser.add_argument("--same-process", action="store_true",
                        help="the old way: both sides interleaved in this one process (flatters npsoftmax)")
    parser.add_argument("--out", metavar="FILE", help="also write the report and every worker's raw output to FILE")
    parser.add_argument("--save", action="store_true",
                        help="as --out benchmarks/results/bench_train-<UTC date>.txt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=sorted(SIDES), help=argparse.SUPPRESS)  # internal: one side, one run
    parser.add_argument("--debug-perturb", action="store_true", help=argparse.SUPPRESS)  # torch twin made different
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, value in (("--batch", args.batch), ("--repeats", args.repeats), ("--rounds", args.rounds)):
        if value < 1:
            parser.error(f"{option} must be >= 1, got {value}")
    if args.warmup < 0 or args.load < 0:
        parser.error("--warmup and --load must be >= 0")
    if args.worker:
        if args.variant == "both" or len(args.threads) != 1:
            parser.error("--worker needs one --variant and one thread count")
        return worker(args)
    if args.same_process and (len(args.threads) != 1 or args.load):
        parser.error("--same-process takes one thread count and no --load")

    torch_missing = "--no-torch was given"
    with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    if not args.no_torch and not with_torch:
        torch_missing = "torch is not installed; `pip install torch==2.13.0` for the comparison"
    variants = list(VARIANTS) if args.variant == "both" else [args.variant]
    run = run_same_process if args.same_process else run_processes
    try:
        lines, runs, status = run(args, argv, variants, with_torch, torch_missing)
    except processes.WorkerFailed as error:
        print(f"error: a worker failed: {error}", file=sys.stderr)
        return EXIT_WORKER_FAILED
    processes.publish(lines, runs, "bench_train", save=args.save, out=args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
