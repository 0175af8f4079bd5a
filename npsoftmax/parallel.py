"""npsoftmax's own threads: the batch of a convolution split into chunks, one chunk per task
(and the heads' large products and softmaxes split into blocks).

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

The softmax heads use the same pool through :func:`matmul` (a large product cut into one
block per thread along its cheapest axis) and ``heads.softmax_functions.log_softmax_target``
(one block of rows per thread); work under a few milliseconds stays on the calling thread,
because waking a sleeping pool thread costs 0.1-1 ms. Independent pieces of work too small to
split, such as the adaptive head's head softmax and its tail clusters, are shared out among
the threads whole by :func:`run_concurrently` (each thread takes the next piece not yet started).

A chunk task must write only its own images' slice of shared outputs; a sum over the batch
(the weight gradient) is returned per chunk and added in chunk order, so the result does
not depend on which thread ran which chunk, nor on the thread count's scheduling.

NumPy's matmul and the Cython kernels release the GIL, so the workers run in parallel;
the Python between those calls (slicing, allocation) is a few microseconds per chunk.
"""

import concurrent.futures
import math
import threading

import numpy as np

from .validation import check_int

__all__ = ["set_threads", "get_threads", "chunk_size", "block_size", "map_chunks", "run_concurrently", "matmul",
           "CHUNKS_PER_THREAD", "MIN_PARALLEL_FLOPS"]

#: A pool of n threads gets at least this many chunks per thread and layer, so that a
#: thread that was descheduled hands its share to the others (dynamic scheduling).
CHUNKS_PER_THREAD = 3

#: A matrix product smaller than this many floating-point operations (2 M K N, ~134 MFLOP,
#: about 2 ms on one core) runs as one call on the calling thread. Waking a sleeping pool
#: thread costs 0.1-1 ms on a small VM (more when its core has gone idle between calls), so
#: splitting the hierarchical head's ~50 MFLOP products made its 2-thread step 50% slower.
MIN_PARALLEL_FLOPS = 1 << 27

_lock = threading.Lock()
_threads = 1
_pool = None


#: ``_local.in_pool`` is True on the pool's own threads.
_local = threading.local()


def _single_threaded_worker():
    """Pool-thread initialiser: this thread's OpenMP regions use one thread (the ICV is per thread),
    and work it splits with :func:`map_chunks` runs inline (a pool task never waits on the pool)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="openmp")
    _local.in_pool = True


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


def block_size(n_items):
    """Items per block when work is cut into one block per thread (``n_items`` with no pool).

    For the heads' products and softmaxes (``matmul``, ``heads.softmax_functions``): a GEMM
    cut into more blocks repacks its shared operand once per block and every hand-off to the
    pool costs ~0.1-0.2 ms on a small VM, so for work of a few milliseconds one block per
    thread is faster than the conv layers' ``CHUNKS_PER_THREAD`` chunks per thread.
    """
    return max(1, math.ceil(n_items / _threads)) if _pool is not None else max(1, n_items)


def _pool_for_this_thread():
    """The pool, or None when work must run inline: no pool, or this is one of its threads
    (nested work: the threads are busy already, and a pool task waiting on the pool could
    deadlock it)."""
    return None if getattr(_local, "in_pool", False) else _pool


def map_chunks(task, n_items, size):
    """``[task(start, stop) for each chunk]`` over ``range(n_items)`` cut in chunks of ``size``.

    Results come back in chunk order. With a pool the tasks run on its threads (the caller
    waits); otherwise, for a single chunk, or when called from a pool thread, on the calling
    thread. An exception in a task is raised here after every task has finished (no chunk
    is left running).
    """
    bounds = [(start, min(start + size, n_items)) for start in range(0, n_items, size)]
    pool = _pool_for_this_thread()
    if pool is None or len(bounds) == 1:
        return [task(start, stop) for start, stop in bounds]
    futures = [pool.submit(task, start, stop) for start, stop in bounds]
    concurrent.futures.wait(futures)
    return [future.result() for future in futures]


def run_concurrently(*tasks):
    """``[task() for task in tasks]``, the tasks shared out among the calling thread and the pool.

    For independent parts of one computation, e.g. the adaptive head's head softmax and its
    tail clusters: one hand-off to the pool instead of one per product. At most
    :func:`get_threads` tasks run at a time: the calling thread runs the first task, and it and
    ``threads - 1`` pool threads then take the next task not yet started, in the order given,
    until none is left (dynamic scheduling). Give the longest tasks first: the threads then
    finish close together (the longest-processing-time rule). Results come back in the order
    of ``tasks``; an exception in any task is raised after all have finished (the first
    failed task's, in that order). Without a pool, or from a pool thread, the tasks run in
    turn on the calling thread.
    """
    pool = _pool_for_this_thread()
    if pool is None or len(tasks) < 2:
        return [task() for task in tasks]
    outcomes = [None] * len(tasks)    # (True, result) or (False, exception), by task
    next_task = iter(range(1, len(tasks)))
    take_lock = threading.Lock()

    def run(index):
        try:
            outcomes[index] = (True, tasks[index]())
        except BaseException as error:  # re-raised below, once every task has finished
            outcomes[index] = (False, error)

    def drain():
        while True:
            with take_lock:
                index = next(next_task, None)
            if index is None:
                return
            run(index)

    helpers = [pool.submit(drain) for _ in range(min(_threads, len(tasks)) - 1)]
    try:
        run(0)
        drain()
    finally:
        concurrent.futures.wait(helpers)
    for finished, value in outcomes:
        if not finished:
            raise value
    return [value for _, value in outcomes]


def matmul(a, b, out=None):
    """``a @ b`` for 2-D ``a (M, K)`` and ``b (K, N)``, on the pool's threads when there is one.

    The product is cut into one block per thread (``block_size``) along one of its three
    axes, each block one single-threaded GEMM:

    * rows:    ``out[r] = a[r] @ b``          every block reads all of ``b``;
    * columns: ``out[:, c] = a @ b[:, c]``    every block reads all of ``a``;
    * the sum: ``out = sum_k a[:, k] @ b[k]`` every block writes an (M, N) partial sum,
      added in block order (the same answer whichever thread ran which block).

    The axis chosen is the one whose extra memory traffic is smallest: re-reading ``b``
    (K N per extra block), re-reading ``a`` (M K), or writing and adding the partial sums
    (2 M N). For the heads' products that means: ``h @ W`` and ``h.T @ dz`` (N = classes,
    huge) by columns, ``dz @ W.T`` (K = classes) by the sum. Without a pool, or for a
    product under ``MIN_PARALLEL_FLOPS``, it is one ``np.matmul`` call.

    BLAS is single-threaded under :func:`set_threads`; this is how the heads' large
    products use the other threads. ``out``: optional C-contiguous (M, N) array of the
    result dtype. Returns the (M, N) product.
    """
    if out is None:
        out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
    M, K = a.shape
    N = b.shape[1]
    if _pool is None or 2 * M * K * N < MIN_PARALLEL_FLOPS:
        return np.matmul(a, b, out=out)
    extra_traffic = {"rows": K * N, "columns": M * K, "sum": 2 * M * N}
    axis = min(extra_traffic, key=extra_traffic.get)
    if axis == "rows":
        def block(start, stop):
            np.matmul(a[start:stop], b, out=out[start:stop])
        map_chunks(block, M, block_size(M))
    elif axis == "columns":
        def block(start, stop):
            np.matmul(a, b[:, start:stop], out=out[:, start:stop])
        map_chunks(block, N, block_size(N))
    else:
        parts = map_chunks(lambda start, stop: a[:, start:stop] @ b[start:stop], K, block_size(K))
        np.copyto(out, parts[0])
        for part in parts[1:]:
            out += part
    return out
