"""One training step of the default CIFAR CNN: npsoftmax vs PyTorch, side by side.

Builds the default body (conv 32/64/128, each 3x3 pad 1 -> [batch norm] -> ReLU ->
2x2 max pool; Flatten -> Linear 2048->256 -> ReLU) with the full softmax head
(Linear 256->100 + cross-entropy) in npsoftmax, and its identical twin in torch
(``npsoftmax.torch_adapter.to_torch``: same layers, same initial weights,
float32), and times

* a training step: forward, softmax head, backward, SGD momentum update;
* inference: forward to log-probabilities in eval mode;

at batch 128 on random CIFAR-shaped data, for the batch-norm model and the
plain variant without batch norm. The two implementations run *interleaved*
(np, torch, np, torch, ...) in this one process, with the same number of
threads, so a noisy neighbour slows both; the figures are medians.

    python benchmarks/bench_train.py                 # both variants, train + inference
    python benchmarks/bench_train.py --profile       # + per-layer table and conv GFLOP/s
    python benchmarks/bench_train.py --no-torch      # npsoftmax figures alone

With torch not installed the script prints the npsoftmax figures alone and
says so (install the CPU build with ``pip install torch==2.13.0``).

Threads: both sides get ``--threads`` (default: every core) for BLAS, OpenMP
and torch; the thread pools are printed (threadpoolctl). Unless you set it,
``OMP_WAIT_POLICY=PASSIVE`` is set before anything starts an OpenMP runtime:
npsoftmax's kernels, torch and OpenBLAS are three thread pools in one process,
and a pool whose idle threads spin steals the cores the next pool needs (with
torch's OpenMP spinning, the npsoftmax step was 4-5x slower here, and torch's
own step slower too). Both implementations run under the same setting; run
with ``OMP_WAIT_POLICY=ACTIVE`` to see the other one.
"""

import argparse
import os

# Before numpy, npsoftmax or torch load an OpenMP runtime (it reads this once).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from npsoftmax.models import build_model  # noqa: E402
from npsoftmax.optim import SGD  # noqa: E402
from npsoftmax.profiler import conv_gemm_flops, profile  # noqa: E402
from npsoftmax.timing import interleaved_medians, thread_report  # noqa: E402

N_CLASSES = 100
IMAGE_SHAPE = (3, 32, 32)
LEARNING_RATE = 0.01
MOMENTUM = 0.9


# ----------------------------------------------------------------------------
# The two implementations
# ----------------------------------------------------------------------------
class NumpyRunner:
    """npsoftmax model + SGD; ``train_step()`` and ``infer()`` on fixed data."""

    def __init__(self, batch_norm, x, y, seed):
        self.model = build_model("softmax", N_CLASSES, IMAGE_SHAPE, rng=np.random.default_rng(seed),
                                 dtype=np.float32, batch_norm=batch_norm)
        # torch computes no gradient for the images (they do not require grad); neither
        # does the default npsoftmax body (its first conv skips dx: one GEMM and a col2im).
        assert not self.model.body[0].input_gradient
        self.optimizer = SGD(self.model.params, lr=LEARNING_RATE, momentum=MOMENTUM)
        self.x, self.y = x, y

    def train_step(self):
        loss = self.model.forward(self.x, self.y)
        self.model.backward()
        self.optimizer.step(self.model.grads)
        return loss

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
    """GFLOP/s of a plain ``a @ b`` on random float32 operands of each conv's whole-batch
    forward shape, W (F, C*KH*KW) @ cols (C*KH*KW, N*OH*OW): what BLAS gives at that size."""
    rng = np.random.default_rng(1)
    results = []
    for label, module, x_shape in conv_layers(model, batch):
        rows, inner = module.out_channels, module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        columns = conv_gemm_flops(module, x_shape)[0] // (2 * rows * inner)
        a = rng.standard_normal((rows, inner), dtype=np.float32)
        b = rng.standard_normal((inner, columns), dtype=np.float32)
        seconds = interleaved_medians({"gemm": lambda: a @ b}, repeats)["gemm"]
        results.append((label, rows, inner, columns, 2 * rows * inner * columns / seconds / 1e9))
    return results


def run_profile(runner, steps):
    """Profile ``steps`` training steps of the npsoftmax runner (after one untimed step)."""
    runner.train_step()
    with profile(runner.model, runner.optimizer) as profiler:
        profiler.reset()
        for _ in range(steps):
            runner.train_step()  # its optimizer step counts the step
    return profiler


# ----------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per implementation (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for BLAS, OpenMP and torch (default: all cores)")
    parser.add_argument("--variant", choices=["both", "bn", "plain"], default="both",
                        help="with batch norm, the plain CNN, or both (default)")
    parser.add_argument("--profile", action="store_true", help="also print the per-layer npsoftmax profile")
    parser.add_argument("--profile-steps", type=int, default=5, help="steps averaged by --profile (default 5)")
    parser.add_argument("--no-torch", action="store_true", help="time npsoftmax alone even if torch is installed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch = None
    torch_missing = "--no-torch was given"
    if not args.no_torch:
        try:
            import torch
        except ImportError as error:
            torch_missing = f"torch is not installed ({error}); `pip install torch==2.13.0` for the comparison"
    if torch is not None:
        torch.set_num_threads(args.threads)

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
        print("threadpoolctl is not installed: BLAS/OpenMP threads are left at their defaults")
    limits = threadpool_limits(limits=args.threads) if threadpool_limits else None

    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, *IMAGE_SHAPE), dtype=np.float32)
    y = rng.integers(0, N_CLASSES, size=args.batch)

    print(f"training step of the default CIFAR CNN, batch {args.batch}, float32, "
          f"median of {args.repeats} interleaved steps after {args.warmup} warm-up")
    print(thread_report() + (f" torch={torch.get_num_threads()} (torch {torch.__version__})" if torch else ""))
    print("env: " + " ".join(f"{name}={os.environ.get(name, 'unset')}"
                             for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")))
    print("npsoftmax's first Conv2d skips the gradient of the images (input_gradient=False), as torch does")
    if torch is None:
        print(f"npsoftmax alone: {torch_missing}")

    variants = {"bn": True, "plain": False}
    if args.variant != "both":
        variants = {args.variant: variants[args.variant]}
    rows = []
    numpy_runners = {}
    for name, batch_norm in variants.items():
        runners = {"npsoftmax": NumpyRunner(batch_norm, x, y, args.seed)}
        if torch is not None:
            runners["torch"] = TorchRunner(runners["npsoftmax"].model, x, y)
            # Same weights, same data: the first losses agree (a check that the networks are the same).
            losses = {label: runner.train_step() for label, runner in runners.items()}
            print(f"[{name}] first-step loss: npsoftmax {losses['npsoftmax']:.5f}, torch {losses['torch']:.5f}")
        numpy_runners[name] = runners["npsoftmax"]
        set_modes(runners, training=True)
        train = interleaved_medians({label: r.train_step for label, r in runners.items()}, args.repeats,
                                    args.warmup)
        set_modes(runners, training=False)
        infer = interleaved_medians({label: r.infer for label, r in runners.items()}, args.repeats, args.warmup)
        set_modes(runners, training=True)
        rows.append((name, train, infer))

    header = f"{'model':<7}{'impl':<11}{'train ms':>10}{'img/s':>9}{'infer ms':>10}{'img/s':>9}"
    print("\n" + header)
    for name, train, infer in rows:
        for label in train:
            print(f"{name:<7}{label:<11}{train[label] * 1e3:>10.1f}{args.batch / train[label]:>9.0f}"
                  f"{infer[label] * 1e3:>10.1f}{args.batch / infer[label]:>9.0f}")
        if "torch" in train:
            print(f"{name:<7}{'ratio np/torch':<18}{train['npsoftmax'] / train['torch']:>7.2f}"
                  f"{'':>9}{infer['npsoftmax'] / infer['torch']:>10.2f}")

    if args.profile:
        for name, runner in numpy_runners.items():
            profiler = run_profile(runner, args.profile_steps)
            print(f"\n[{name}] " + profiler.table())
        model = next(iter(numpy_runners.values())).model
        print("\nplain numpy GEMM of each conv's whole-batch forward shape (W @ cols), same process:")
        for label, rows_, inner, columns, gflops in plain_gemm_gflops(model, args.batch, max(args.repeats // 3, 3)):
            print(f"  {label:<12} ({rows_} x {inner}) @ ({inner} x {columns}): {gflops:6.1f} GFLOP/s")
    if limits is not None:
        limits.restore_original_limits()


if __name__ == "__main__":
    main()
