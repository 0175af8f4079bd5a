"""Each side alone in a process of its own: the harness of ``bench_train.py`` and ``bench_epoch.py --compare-torch``.

Why not time npsoftmax and torch interleaved in one process? Because they are not
alone there. npsoftmax's OpenBLAS workers keep spinning for a while after each
GEMM, so torch's next step finds the cores taken; and ``import npsoftmax`` sets
``OMP_WAIT_POLICY=PASSIVE`` (good for npsoftmax's own pools, but not torch's
default). Timed that way torch read ~122 ms for a step it does in ~71 ms alone
(PERFORMANCE-NOTES.md). So here every measurement runs in a fresh child process:

* the child is ``python <script> --worker numpy|torch ...``; it builds its model,
  warms up, times its steps and prints **one JSON line** (its last stdout line);
* the child's environment is the parent's *as it was when this module was first
  imported* (``STARTING_ENVIRON``: the scripts import it before anything else), plus
  the thread counts (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``) -
  nothing else, and in particular no ``OMP_WAIT_POLICY``, even if the parent has
  imported npsoftmax since (which sets it): each side runs with its own defaults;
* the sides alternate, A B A B ... for ``rounds`` rounds, so a slow minute of the
  machine hits both; each side's figure is the median of its processes' medians.

Everything a worker printed is kept (``Alternation.runs``), and :func:`write_report`
saves it under the printed table, so a figure quoted elsewhere can be traced to
the raw samples, the command, the date and the machine that produced it.

This module never imports numpy, npsoftmax or torch (see above); the timing of
steps inside a worker is :func:`npsoftmax.timing.interleaved_samples`.
"""

import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

#: The thread-count variables a worker gets from ``--threads`` (OpenMP, OpenBLAS, MKL, Apple Accelerate).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
#: Environment variables recorded as a worker saw them when it started.
WATCHED_VARIABLES = THREAD_VARIABLES + ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT")
#: This process's environment before npsoftmax could add to it; what workers start from.
STARTING_ENVIRON = dict(os.environ)
#: Where ``--save`` writes.
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: Relative tolerance of "the two first-step losses agree": float32 keeps ~7 digits, and the two
#: sides sum the same products in different orders (measured agreement ~1e-7 relative).
LOSS_RTOL = 1e-4


# ----------------------------------------------------------------------------
# Environment and workers
# ----------------------------------------------------------------------------
def usable_cores():
    """Cores this process may run on (its CPU affinity), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_env(threads, base=None):
    """A copy of ``base`` (default ``STARTING_ENVIRON``) with every thread-count variable set to ``threads``.

    Nothing else is added or removed: a variable the user set (``OMP_WAIT_POLICY=ACTIVE``,
    say) reaches both sides alike.
    """
    env = dict(STARTING_ENVIRON if base is None else base)
    for name in THREAD_VARIABLES:
        env[name] = str(threads)
    return env


def environment_at_start():
    """The watched variables as this process started (before npsoftmax could set OMP_WAIT_POLICY)."""
    return {name: STARTING_ENVIRON.get(name) for name in WATCHED_VARIABLES}


class WorkerFailed(RuntimeError):
    """A worker exited with an error or printed no JSON line."""


def run_worker(argv, env, timeout=None):
    """Run one worker to completion; return the dict of the last stdout line that is a JSON object.

    Raises WorkerFailed with the command and the end of its stderr.
    """
    try:
        completed = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   timeout=timeout)
    except subprocess.TimeoutExpired:
        raise WorkerFailed(f"{shlex.join(argv)} ran longer than {timeout} s") from None
    if completed.returncode != 0:
        raise WorkerFailed(f"{shlex.join(argv)} exited with status {completed.returncode}:\n"
                           f"{completed.stderr[-3000:]}")
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise WorkerFailed(f"{shlex.join(argv)} printed no JSON line; stdout ends:\n{completed.stdout[-2000:]}")


def print_result(result):
    """A worker's last act: its result as one JSON line on stdout."""
    print(json.dumps(result), flush=True)


class Alternation:
    """The outcome of :func:`alternate`: every worker's JSON, by label and in the order they ran."""

    def __init__(self, labels):
        self.by_label = {label: [] for label in labels}
        self.runs = []  # every result, in run order, with "label" and "round" added

    def add(self, label, round_index, result):
        result = {"label": label, "round": round_index, **result}
        self.by_label[label].append(result)
        self.runs.append(result)

    def values(self, label, key):
        """``key`` of each process of ``label`` (``"median_ms.train"`` reaches into a nested dict)."""
        values = []
        for result in self.by_label[label]:
            value = result
            for part in key.split("."):
                value = value[part]
            values.append(value)
        return values

    def median(self, label, key):
        """The median over ``label``'s processes of ``key`` (for a per-process median: the median of medians)."""
        return statistics.median(self.values(label, key))

    def spread(self, label, key):
        """(min, max) of ``key`` over ``label``'s processes."""
        values = self.values(label, key)
        return min(values), max(values)


def alternate(commands, rounds, env, *, on_round=None, log=None, timeout=None):
    """Run each command once per round, in the dict's order (A B A B ... for two), in fresh processes.

    Parameters
    ----------
    commands : dict label -> argv (a list, e.g. ``[sys.executable, script, "--worker", "numpy", ...]``)
    rounds : int
    env : dict, the workers' environment (:func:`thread_env`)
    on_round : callable(round_index, {label: result}), optional
        Called after each round; it may raise to stop early (a failed check).
    log : callable(str), optional
        Progress lines (the scripts pass one that writes to stderr).

    Returns
    -------
    Alternation
    """
    outcome = Alternation(commands)
    for round_index in range(rounds):
        this_round = {}
        for label, argv in commands.items():
            start = time.perf_counter()
            result = run_worker(argv, env, timeout=timeout)
            outcome.add(label, round_index, result)
            this_round[label] = result
            if log is not None:
                log(f"round {round_index + 1}/{rounds} {label}: {result.get('summary', '')} "
                    f"(process {time.perf_counter() - start:.1f} s)")
        if on_round is not None:
            on_round(round_index, this_round)
    return outcome


# ----------------------------------------------------------------------------
# The twins must be twins
# ----------------------------------------------------------------------------
class LossMismatch(ValueError):
    """The two sides' first-step losses differ: they are not the same network on the same data."""


def losses_agree(first, second, rtol=LOSS_RTOL):
    """True when two losses agree to ``rtol`` (relative); NaN or inf never agrees."""
    return math.isfinite(first) and math.isfinite(second) and math.isclose(first, second, rel_tol=rtol, abs_tol=0.0)


def check_losses_agree(first, second, what, rtol=LOSS_RTOL):
    """Raise LossMismatch (naming ``what`` and both values) unless the losses agree."""
    if not losses_agree(first, second, rtol):
        raise LossMismatch(f"{what}: first-step losses differ: npsoftmax {first!r} vs torch {second!r} "
                           f"(relative tolerance {rtol:g}); the two sides are not the same network on the "
                           f"same data, so no ratio is reported")


# ----------------------------------------------------------------------------
# Load: busy processes beside the measurement
# ----------------------------------------------------------------------------
# A pure-Python spin that stops by itself: after max_seconds, or as soon as its parent is gone
# (it is re-parented, getppid changes), so a killed benchmark never leaves one behind.
_BUSY_LOOP = """
import os, time
parent, end, n = {parent}, time.monotonic() + {max_seconds}, 0
while True:
    n += 1
    if n % 200000 == 0 and (time.monotonic() > end or os.getppid() != parent):
        break
"""


class BusyLoad:
    """``with BusyLoad(n, max_seconds):`` - ``n`` single-threaded busy loops run inside the block.

    Each loop exits by itself after ``max_seconds`` or when this process dies; leaving
    the block (normally or by an exception) terminates them and waits for them.
    ``all_alive()`` says whether every loop was still running (call it before leaving).
    """

    def __init__(self, n, max_seconds):
        self.n, self.max_seconds = n, max_seconds
        self.processes = []

    def __enter__(self):
        code = _BUSY_LOOP.format(parent=os.getpid(), max_seconds=float(self.max_seconds))
        try:
            for _ in range(self.n):
                self.processes.append(subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        except BaseException:
            self.stop()
            raise
        if self.processes:
            time.sleep(0.2)  # let them reach their loop before anything is timed
        return self

    def all_alive(self):
        return all(process.poll() is None for process in self.processes)

    def stop(self):
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []

    def __exit__(self, *exc_info):
        self.stop()
        return False


# ----------------------------------------------------------------------------
# The report: command, date, machine, versions, threads; saved with the raw output
# ----------------------------------------------------------------------------
def cpu_model():
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def memory_gib():
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2 ** 20
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average():
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except (AttributeError, OSError):
        return "unknown"


def machine_description():
    memory = memory_gib()
    return (f"{cpu_model()}, {os.cpu_count()} logical cores ({usable_cores()} usable here)"
            + (f", {memory:.1f} GiB RAM" if memory else "") + f", {platform.system()} {platform.release()}")


def report_header(title, script, argv):
    """The lines that say what produced a table: title, command, date, machine, Python, load average."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return [
        f"# {title}",
        f"command: {shlex.join(['python', os.path.relpath(script), *argv])}",
        f"date: {now.isoformat(timespec='seconds')}",
        f"machine: {machine_description()}",
        f"python: {platform.python_version()} ({sys.executable})",
        f"load average before (1, 5, 15 min): {load_average()}",
    ]


def versions_line(runs):
    """The versions the workers reported (``runs``: their results, e.g. ``Alternation.runs``)."""
    versions = {}
    for result in runs:
        for name, version in result.get("versions", {}).items():
            versions.setdefault(name, version)
    return "versions: " + ", ".join(f"{name} {version}" for name, version in sorted(versions.items()))


def threads_lines(runs):
    """One line per distinct (side, thread pools, environment) among the workers: what they really ran with."""
    seen = {}
    for result in runs:
        report = result.get("thread_report", "")
        env = {name: value for name, value in (result.get("env_at_start") or {}).items() if value is not None}
        policy = result.get("omp_wait_policy", "not reported")
        line = (f"  {result.get('side', result['label'])}: {report}; OMP_WAIT_POLICY when its OpenMP runtime "
                f"started: {policy or 'unset (the runtime default)'}; env at start: "
                + " ".join(f"{name}={value}" for name, value in env.items()))
        # The pools are listed in the order the libraries loaded, which can differ between processes.
        seen.setdefault((result.get("side"), tuple(sorted(report.split())), json.dumps(env), policy), line)
    return list(seen.values())


def default_result_path(name):
    """``benchmarks/results/<name>-<UTC date and time>.txt`` (what ``--save`` writes)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%SZ")
    return os.path.join(RESULTS_DIR, f"{name}-{stamp}.txt")


def start_report(title, script, argv, requested_threads, torch_missing=None):
    """The report header plus notes on skipped thread counts and a missing torch.

    Returns ``(lines, thread_counts)``: the counts of ``requested_threads`` this machine
    can run (at most its usable cores).
    """
    cores = usable_cores()
    thread_counts = [t for t in requested_threads if t <= cores]
    skipped = [t for t in requested_threads if t > cores]
    lines = report_header(title, script, argv)
    if skipped:
        lines.append(f"note: skipped --threads {','.join(map(str, skipped))}: this machine gives this process "
                     f"{cores} cores")
    if torch_missing:
        lines.append(f"npsoftmax alone: {torch_missing}")
    return lines, thread_counts


def publish(lines, runs, name, save=False, out=None):
    """Print the report (``lines``) and, with ``save`` or ``out``, write it and the raw runs to a file.

    ``save`` picks :func:`default_result_path` ``(name)``; ``out`` names the file itself.
    """
    text = "\n".join(lines)
    print(text)
    path = out or (default_result_path(name) if save else None)
    if path:
        print(f"wrote {write_report(path, text, runs)}")


def write_report(path, text, runs):
    """Write the printed report, then every worker's raw JSON line (run order), to ``path``."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as stream:
        stream.write(text.rstrip("\n") + "\n\n")
        stream.write(f"# raw output: one JSON line per worker process, in the order they ran ({len(runs)})\n")
        for result in runs:
            stream.write(json.dumps(result) + "\n")
    return path


def log_to_stderr(line):
    print(line, file=sys.stderr, flush=True)
