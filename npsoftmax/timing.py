"""Timing helpers shared by the benchmark scripts and the notebooks: interleaved medians, thread report.

These VMs are noisy, so every benchmark times its candidates *interleaved* in one
process (A, B, A, B, ...) and reports medians and ratios, never absolute claims.

Interleaving in one process is fair only between candidates that share that
process's thread pools (two numpy kernels, say). npsoftmax against torch is timed
with each side alone in a process of its own, the processes alternating; that
is ``benchmarks/_processes.py``, and each of its worker processes times its
steps with :func:`interleaved_samples` here.
"""

import os
import time

import numpy as np


def thread_report():
    """One line describing the BLAS/OpenMP thread pools (threadpoolctl if installed)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} (install threadpoolctl for details)"
    pools = [f"{info['internal_api']}={info['num_threads']}" for info in threadpool_info()]
    return f"threads: cpu_count={os.cpu_count()} " + " ".join(pools)


def interleaved_samples(candidates, repeats, warmup=2):
    """Time each zero-argument callable ``repeats`` times, interleaved; return every sample.

    Parameters
    ----------
    candidates : dict name -> callable
    repeats : int
    warmup : int
        Untimed calls of each candidate first (caches, page faults, thread start-up).

    Returns
    -------
    dict name -> list of ``repeats`` seconds, in the order they were taken
    """
    for _ in range(warmup):
        for function in candidates.values():
            function()
    samples = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, function in candidates.items():
            start = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - start)
    return samples


def interleaved_medians(candidates, repeats, warmup=2):
    """:func:`interleaved_samples` reduced to ``dict name -> median seconds per call``."""
    samples = interleaved_samples(candidates, repeats, warmup)
    return {name: float(np.median(times)) for name, times in samples.items()}
