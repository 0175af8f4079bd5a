"""npsoftmax's own threads: the batch of a convolution split into chunks, one chunk per task.

How many threads a training step uses is set here, once per process, by
:func:`set_threads` (the CLI's ``--threads``; the benchmarks call it too)::

    set_threads(1)   # everything on the calling thread: BLAS and OpenMP single-threaded
    set_threads(n)   # n > 1: a pool of n worker threads runs the conv chunks (below);
                     # BLAS stays single-threaded, the elementwise kernels use n OpenMP threads

Why a pool of our own instead of OpenBLAS's threads: a multi-threaded OpenBLAS GEMM cuts
its matrix into one equal share per thread and waits for the slowest share; between calls
its workers spin. On a machine where another program is running, the OS takes a core away
from one worker now and then, and every GEMM of the step waits for that worker: a 2-core
step got several times slower with one busy program beside it (PERFORMANCE-NOTES.md). Here
the images of the batch are cut into more chunks than threads (``chunk_size``); an idle
worker takes the next chunk from a queue, computes it with single-threaded kernels
(im2col, GEMM, col2im) and sleeps in the queue when none is left. A worker that loses its
core delays only the chunk it holds, and nothing spins.

A chunk task must write only its own images' slice of shared outputs; a sum over the batch
(the weight gradient) is returned per chunk and added in chunk order, so the result does
not depend on which thread ran which chunk, nor on the thread count's scheduling.

NumPy's matmul and the Cython kernels release the GIL, so the workers run in parallel;
the Python between those calls (slicing, allocation) is a few microseconds per chunk.
"""

import concurrent.futures
import math
import threading

from .validation import check_int

__all__ = ["set_threads", "get_threads", "chunk_size", "map_chunks", "CHUNKS_PER_THREAD"]

#: A pool of n threads gets at least this many chunks per thread and layer, so that a
#: thread that was descheduled hands its share to the others (dynamic scheduling).
CHUNKS_PER_THREAD = 3

_lock = threading.Lock()
_threads = 1
_pool = None


def _single_threaded_worker():
    """Pool-thread initialiser: this thread's OpenMP regions use one thread (the ICV is per thread)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="openmp")


def set_threads(threads):
    """Use ``threads`` threads for training and evaluation steps in this process.

    BLAS is limited to one thread (threadpoolctl: it is a process-wide setting); the
    calling thread's OpenMP kernels (batch norm, pooling, ReLU) get ``threads`` threads;
    with ``threads > 1`` the conv layers' chunks run on a pool of ``threads`` workers.
    Call it from the thread that runs the training loop. Returns None.
    """
    global _threads, _pool
    threads = check_int(threads, "threads", 1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    threadpool_limits(limits=threads, user_api="openmp")
    with _lock:
        old, _pool, _threads = _pool, None, threads
        if threads > 1:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="npsoftmax-chunk",
                initializer=_single_threaded_worker)
    if old is not None:
        old.shutdown(wait=True)


def get_threads():
    """The thread count :func:`set_threads` chose (1 before any call: no pool)."""
    return _threads


def chunk_size(n_items, largest):
    """Images per chunk: at most ``largest`` (the cache-sized chunk), and with a pool small
    enough to make ``CHUNKS_PER_THREAD`` chunks per thread."""
    if _pool is None:
        return max(1, min(n_items, largest))
    return max(1, min(largest, math.ceil(n_items / (CHUNKS_PER_THREAD * _threads))))


def map_chunks(task, n_items, size):
    """``[task(start, stop) for each chunk]`` over ``range(n_items)`` cut in chunks of ``size``.

    Results come back in chunk order. With a pool the tasks run on its threads (the caller
    waits); otherwise, or for a single chunk, on the calling thread. An exception in a task
    is raised here after every task has finished (no chunk is left running).
    """
    bounds = [(start, min(start + size, n_items)) for start in range(0, n_items, size)]
    pool = _pool
    if pool is None or len(bounds) == 1:
        return [task(start, stop) for start, stop in bounds]
    futures = [pool.submit(task, start, stop) for start, stop in bounds]
    concurrent.futures.wait(futures)
    return [future.result() for future in futures]
