"""Per-layer timing of a training step: where does the time go?

Two levels of detail, both off (and free) unless a :class:`Profiler` is active:

* **Modules.** ``profile(model, optimizer)`` wraps the ``forward``/``backward``
  of every module of ``model.body`` (a :class:`~npsoftmax.layers.Sequential`),
  of the head, and the optimizer's ``step``, and times each call.
* **Sections inside a layer.** The functional layers mark their expensive
  steps with ``with section("im2col"): ...`` (also ``"conv GEMM"``,
  ``"col2im"``; see :mod:`npsoftmax.sections`, the hook below the layers that
  an attached profiler fills). Without a profiler the marks cost ~0.1 µs each.

Usage (what ``benchmarks/bench_train.py --profile`` and ``train_np.py
--profile`` do)::

    with profile(model, optimizer) as profiler:
        for x, y in batches:
            loss = model.forward(x, y)
            model.backward()
            optimizer.step(model.grads)   # each optimizer step counts as one training step
    print(profiler.table())

(Without an optimizer, call ``profiler.step_done()`` after each step instead.)

Times are wall-clock (``time.perf_counter``) sums over the profiled steps; the
tables report them per step. Nothing is synchronised or sampled, so a module's
time includes the sections it contains, and ``other`` in the summary is the
step time not covered by any module (Python glue, the loss, data handling).
"""

import contextlib
import threading
import time
from collections import defaultdict

from . import sections
from .functional import conv_algorithm
from .kernels import winograd_tiles
from .sections import section  # noqa: F401  (re-exported: profiler.section is the documented name)

__all__ = ["Profiler", "profile", "section", "conv_gemm_flops"]

def conv_gemm_flops(module, x_shape):
    """Floating-point operations of the GEMMs of one Conv2d forward + backward.

    Forward ``out = W (F, C*KH*KW) @ cols (C*KH*KW, N*OH*OW)`` costs ``2 F CKK NP``
    (NP = N*OH*OW); backward does two GEMMs of the same size (``dW`` and
    ``dcols``), so forward + backward is ``3 * 2 F CKK NP`` -- or ``2 * 2 F CKK NP``
    when the layer skips its input gradient (``input_gradient=False``: no ``dcols``).
    A layer that runs Winograd's F(2x2, 3x3) (``functional.conv_algorithm``) does 16
    products ``(F, C) @ (C, N*TH*TW)`` per pass instead: ``2 * 16 F C N TH TW`` each.

    Parameters
    ----------
    module : Conv2d
    x_shape : tuple (N, C, H, W), the module's input shape

    Returns
    -------
    (forward_flops, backward_flops) : tuple of int
    """
    N, C, H, W = x_shape
    KH, KW = module.kernel_size
    OH = (H + 2 * module.pad - KH) // module.stride + 1
    OW = (W + 2 * module.pad - KW) // module.stride + 1
    forward = 2 * module.out_channels * C * KH * KW * N * OH * OW
    w_shape = (module.out_channels, C, KH, KW)
    if conv_algorithm(w_shape, module.stride, getattr(module, "algorithm", "auto"), output_size=(OH, OW)) == "winograd":
        TH, TW = winograd_tiles(H, W, module.pad)
        forward = 2 * 16 * module.out_channels * C * N * TH * TW
    return forward, (2 if getattr(module, "input_gradient", True) else 1) * forward


# Summary rows: module class name -> category in the per-kind table.
_KIND_OF_MODULE = {
    "Conv2d": "conv (rest)",
    "BatchNorm2d": "batch norm",
    "BatchNorm1d": "batch norm",
    "ReLU": "relu",
    "MaxPool2d": "max pool",
    "Linear": "linear",
    "Flatten": "flatten",
    "Dropout": "dropout",
}
_SECTION_ORDER = ("im2col", "winograd transforms", "conv GEMM", "col2im")


class Profiler:
    """Accumulates per-module and per-section wall time; build it with :func:`profile`.

    Attributes
    ----------
    modules : list of (label, module) that are timed
    times : dict (label, "forward" | "backward") -> seconds (sums over all calls)
    sections : dict section name -> seconds
    steps : int, training steps seen: calls of the profiled optimizer's ``step``,
        or of :meth:`step_done` if it is ever called (then it alone counts)
    conv_flops : float, GEMM flops of all Conv2d forward + backward calls seen
    """

    def __init__(self):
        self.modules = []
        self.times = defaultdict(float)
        self.sections = defaultdict(float)
        self._section_lock = threading.Lock()
        self.steps = 0
        self.conv_flops = 0.0
        self.elapsed = 0.0
        self._manual_steps = False
        self._patched = []
        self._kinds = {}  # label -> summary category, where it is not the module type's

    # -- recording ---------------------------------------------------------------
    def add_section(self, name, seconds):
        # Conv chunks may run on several pool threads (npsoftmax.parallel): their marks
        # add up the time of every thread, and the lock keeps concurrent additions.
        with self._section_lock:
            self.sections[name] += seconds

    def _wrap(self, owner, attribute, label, phase, flops_of=None, counts_step=False):
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            self.times[(label, phase)] += time.perf_counter() - start
            if flops_of is not None:
                self.conv_flops += flops_of(*args)
            if counts_step and not self._manual_steps:
                self.steps += 1
            return result

        # An instance attribute shadows the class method until it is deleted again.
        had_instance_attribute = attribute in vars(owner)
        self._patched.append((owner, attribute, had_instance_attribute, original))
        setattr(owner, attribute, timed)

    def attach(self, model, optimizer=None):
        """Start timing ``model`` (a Classifier: ``.body`` Sequential and ``.head``) and ``optimizer``."""
        sections.install(self)  # raises if another profiler is attached
        body = getattr(model, "body", model)
        fuses = getattr(body, "fuses_batchnorm_max_pool", lambda index: False)
        for index, module in enumerate(body):
            label = f"{index}: {type(module).__name__}"
            # Sequential runs a BatchNorm2d and the tiling MaxPool2d after it as one pass, timed
            # as the batch norm's (layers.BatchNorm2d.forward(x, pool=...)).
            if fuses(index):
                label += " + pool"
                self._kinds[label] = "batch norm + max pool"
            elif index > 0 and fuses(index - 1):
                label += " (in the batch norm)"
            self.modules.append((label, module))
            if type(module).__name__ == "Conv2d":
                shapes = {}

                def forward_flops(x, module=module, shapes=shapes):
                    shapes["x"] = x.shape
                    return conv_gemm_flops(module, x.shape)[0]

                def backward_flops(dout, module=module, shapes=shapes):
                    return conv_gemm_flops(module, shapes["x"])[1]

                self._wrap(module, "forward", label, "forward", forward_flops)
                self._wrap(module, "backward", label, "backward", backward_flops)
            else:
                self._wrap(module, "forward", label, "forward")
                self._wrap(module, "backward", label, "backward")
        head = getattr(model, "head", None)
        if head is not None:
            label = f"head: {type(head).__name__}"
            self.modules.append((label, head))
            self._wrap(head, "forward", label, "forward")
            self._wrap(head, "backward", label, "backward")
            if hasattr(head, "log_prob"):
                self._wrap(head, "log_prob", label, "forward")
        if optimizer is not None:
            label = f"optimizer: {type(optimizer).__name__}"
            self.modules.append((label, optimizer))
            self._wrap(optimizer, "step", label, "backward", counts_step=True)
        self._started = time.perf_counter()
        return self

    def detach(self):
        """Stop timing: restore every wrapped method."""
        for owner, attribute, had_instance_attribute, original in reversed(self._patched):
            if had_instance_attribute:
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)
        self._patched.clear()
        sections.uninstall(self)
        self.elapsed += time.perf_counter() - self._started

    def step_done(self):
        """Count one finished step by hand (tables report per-step averages); once called,
        optimizer steps no longer count."""
        if not self._manual_steps:
            self._manual_steps = True
            self.steps = 0
        self.steps += 1

    def reset(self):
        """Forget everything recorded so far (e.g. after warm-up steps); keeps timing."""
        self.times.clear()
        self.sections.clear()
        self.steps = 0
        self._manual_steps = False
        self.conv_flops = 0.0
        self.elapsed = 0.0
        self._started = time.perf_counter()

    # -- reporting ---------------------------------------------------------------
    def per_step(self, seconds):
        """Seconds summed over the profiled steps -> milliseconds per step."""
        return 1e3 * seconds / max(self.steps, 1)

    def summary(self):
        """dict category -> ms per step: im2col, conv GEMM, col2im, conv (rest), max pool, ...

        ``conv (rest)`` is the conv modules' time outside the three sections
        (bias, output layout, validation). ``other`` is the step time outside
        every module (only meaningful when every profiled second was a step).
        """
        totals = defaultdict(float)
        for label, module in self.modules:
            seconds = self.times[(label, "forward")] + self.times[(label, "backward")]
            if label.startswith("head"):
                totals["head"] += seconds
            elif label.startswith("optimizer"):
                totals["optimizer"] += seconds
            else:
                kind = self._kinds.get(label) or _KIND_OF_MODULE.get(type(module).__name__, type(module).__name__)
                totals[kind] += seconds
        for name in _SECTION_ORDER:
            totals[name] = self.sections.get(name, 0.0)
        # Sections run inside conv modules: take them out of the conv total.
        totals["conv (rest)"] -= sum(self.sections.get(name, 0.0) for name in _SECTION_ORDER)
        for name, seconds in self.sections.items():
            if name not in _SECTION_ORDER:
                totals[name] = seconds
        covered = sum(totals.values())
        totals["other"] = max(self.elapsed_seconds() - covered, 0.0)
        order = list(_SECTION_ORDER) + ["conv (rest)", "max pool", "batch norm", "batch norm + max pool", "relu",
                                        "linear", "flatten", "dropout", "head", "optimizer"]
        ordered = {name: self.per_step(totals[name]) for name in order if name in totals}
        ordered.update({name: self.per_step(seconds) for name, seconds in totals.items() if name not in ordered})
        return ordered

    def elapsed_seconds(self):
        """Wall time since attach (or the last reset)."""
        running = time.perf_counter() - self._started if sections.active() is self else 0.0
        return self.elapsed + running

    def conv_gemm_gflops(self):
        """Achieved GFLOP/s of the conv GEMMs (flops seen / time in the "conv GEMM" section)."""
        seconds = self.sections.get("conv GEMM", 0.0)
        return self.conv_flops / seconds / 1e9 if seconds > 0 else float("nan")

    def table(self):
        """Two text tables: per module (forward / backward ms per step), and per kind of work."""
        lines = [f"per-layer profile, ms per step (mean of {self.steps} steps)",
                 f"{'module':<28}{'forward':>10}{'backward':>10}{'total':>10}"]
        for label, _ in self.modules:
            forward = self.per_step(self.times[(label, "forward")])
            backward = self.per_step(self.times[(label, "backward")])
            lines.append(f"{label:<28}{forward:>10.2f}{backward:>10.2f}{forward + backward:>10.2f}")
        summary = self.summary()
        total = sum(summary.values())
        lines += ["", f"{'where the time goes':<28}{'ms/step':>10}{'share':>10}"]
        for name, milliseconds in summary.items():
            if milliseconds > 0 or name in _SECTION_ORDER:
                lines.append(f"{name:<28}{milliseconds:>10.2f}{milliseconds / total:>10.1%}")
        lines.append(f"{'total (wall)':<28}{total:>10.2f}")
        if self.conv_flops:
            lines.append(f"conv GEMMs: {self.conv_flops / max(self.steps, 1) / 1e9:.2f} GFLOP per step, "
                         f"{self.conv_gemm_gflops():.1f} GFLOP/s achieved")
        return "\n".join(lines)


@contextlib.contextmanager
def profile(model, optimizer=None):
    """Context manager: time every module of ``model`` (and ``optimizer.step``) while inside.

    Yields the :class:`Profiler`; print ``table()`` at the end. Steps are counted
    by ``optimizer.step`` (or by ``step_done()`` when there is no optimizer). The
    wrapped methods are restored on exit, even on error.
    """
    profiler = Profiler().attach(model, optimizer)
    try:
        yield profiler
    finally:
        profiler.detach()
