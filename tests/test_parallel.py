"""The conv layers' own thread pool (npsoftmax.parallel): same answers as one thread, checked
against loops and numerical gradients while the pool runs, deterministic, clear errors."""

import threading
import time

import numpy as np
import pytest
from naive_reference import naive_conv
from test_functional import CONV_GEOMETRIES, assert_gradients_match, pair_gradient_errors, random_array
from threadpoolctl import threadpool_info, threadpool_limits

from npsoftmax import functional as F
from npsoftmax import parallel


@pytest.fixture
def pool():
    """Yields ``parallel.set_threads``; afterwards no pool and the BLAS/OpenMP limits of before."""
    saved = threadpool_limits(limits=None)  # records the current limits, changes nothing
    yield parallel.set_threads
    parallel.set_threads(1)
    saved.restore_original_limits()


def conv_results(x, w, b, dout, stride, pad):
    out, cache = F.conv_forward(x, w, b, stride=stride, pad=pad)
    inference, _ = F.conv_forward(x, w, b, stride=stride, pad=pad, keep_cols=False)
    return (out, inference, *F.conv_backward(dout, cache))


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
def test_pooled_conv_gradients_match_numerical_gradients(pool, threads, geometry, rng):
    N, C, H, W, num_filters, KH, KW, stride, pad = geometry
    pool(threads)
    arrays = {"x": random_array(rng, (N, C, H, W)), "w": random_array(rng, (num_filters, C, KH, KW)),
              "b": random_array(rng, num_filters)}
    forward = lambda x, w, b: F.conv_forward(x, w, b, stride=stride, pad=pad)  # noqa: E731
    assert_gradients_match(pair_gradient_errors(forward, F.conv_backward, arrays, rng))
    out, _ = forward(*arrays.values())
    np.testing.assert_allclose(out, naive_conv(*arrays.values(), stride, pad), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, tolerance", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_pool_gives_the_one_thread_answers_in_many_chunks(pool, rng, dtype, tolerance):
    """A batch of 37 odd images cut into 5 to 13 chunks: every output and gradient as with one thread."""
    x = random_array(rng, (37, 3, 9, 8), dtype)
    w, b = random_array(rng, (5, 3, 3, 2), dtype), random_array(rng, 5, dtype)
    dout = random_array(rng, (37, 5, 5, 5), dtype)
    pool(1)
    expected = conv_results(x, w, b, dout, stride=2, pad=1)
    for threads in (2, 3, 4):
        pool(threads)
        assert parallel.chunk_size(37, 1000) == -(-37 // (parallel.CHUNKS_PER_THREAD * threads))
        for name, got, want in zip(["out", "inference out", "dx", "dw", "db"],
                                   conv_results(x, w, b, dout, stride=2, pad=1), expected):
            assert got.dtype == dtype
            np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance, err_msg=f"{name}, {threads} threads")


def test_pooled_weight_gradient_is_the_same_bits_every_time(pool, rng):
    """Chunk sums are added in chunk order, so thread timing cannot change a single bit."""
    pool(3)
    x, w, b = random_array(rng, (50, 4, 8, 8), np.float32), random_array(rng, (6, 4, 3, 3), np.float32), None
    out, cache = F.conv_forward(x, w, b, stride=1, pad=1)
    dout = random_array(rng, out.shape, np.float32)
    first = F.conv_backward(dout, cache)
    for _ in range(5):
        again = F.conv_backward(dout, cache)
        np.testing.assert_array_equal(again[0], first[0])
        np.testing.assert_array_equal(again[1], first[1])
        assert again[2] is None


def test_map_chunks_covers_every_item_in_order(pool):
    pool(3)
    seen = []
    lock = threading.Lock()

    def task(start, stop):
        with lock:
            seen.append((start, stop))
        return list(range(start, stop))

    results = parallel.map_chunks(task, 23, 4)
    assert [item for chunk in results for item in chunk] == list(range(23))
    assert sorted(seen) == [(s, min(s + 4, 23)) for s in range(0, 23, 4)]


def test_a_failing_chunk_raises_after_every_chunk_finished(pool):
    pool(2)
    finished = []

    def task(start, stop):
        if start == 0:
            raise ValueError("chunk 0 failed")
        finished.append(start)
        return start

    with pytest.raises(ValueError, match="chunk 0 failed"):
        parallel.map_chunks(task, 10, 1)
    assert sorted(finished) == list(range(1, 10))


def test_pool_threads_run_single_threaded_kernels(pool):
    """BLAS is limited to one thread, and each pool thread's OpenMP regions to one thread."""
    pool(2)
    blas = [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]
    assert blas and set(blas) == {1}

    def worker_openmp(start, stop):
        return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "openmp"]

    from npsoftmax.kernels import HAVE_EXTENSION

    if HAVE_EXTENSION and any(info["user_api"] == "openmp" for info in threadpool_info()):
        for counts in parallel.map_chunks(worker_openmp, 4, 1):
            assert set(counts) == {1}
        main = {info["num_threads"] for info in threadpool_info() if info["user_api"] == "openmp"}
        assert main == {2}  # the calling thread's elementwise kernels use both threads


@pytest.mark.parametrize("value, error, message", [
    (0, ValueError, "threads must be >= 1, got 0"),
    (-2, ValueError, "threads must be >= 1, got -2"),
    (2.0, TypeError, "threads must be an int, got float 2.0"),
    (True, TypeError, "threads must be an int, got bool True"),
])
def test_set_threads_refuses_bad_counts(pool, value, error, message):
    with pytest.raises(error, match=message):
        parallel.set_threads(value)
    assert parallel.get_threads() == 1


# ----------------------------------------------------------------------------
# The heads' products and softmaxes on the pool (parallel.matmul, log_softmax_target)
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape, axis_length", [
    ((37, 5, 11), 37),    # re-reading b (5 x 11) is the cheapest: blocks of rows
    ((3, 7, 41), 41),     # re-reading a (3 x 7): blocks of columns
    ((1, 4, 9), 9),
    ((6, 300, 4), 300),   # long sums, small output: blocks of the sum, added in order
])
def test_pooled_matmul_splits_the_cheapest_axis_and_gives_the_product(pool, rng, monkeypatch, shape, axis_length):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_FLOPS", 0)  # split even these small products
    M, K, N = shape
    a, b = random_array(rng, (M, K)), random_array(rng, (K, N))
    expected = np.einsum("mk,kn->mn", a, b)
    original = parallel.map_chunks
    for threads in (2, 3):
        pool(threads)
        calls = []
        monkeypatch.setattr(parallel, "map_chunks", lambda task, n, size: calls.append((n, size)) or
                            original(task, n, size))
        got = parallel.matmul(a, b)
        monkeypatch.setattr(parallel, "map_chunks", original)
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13)
        assert calls == [(axis_length, -(-axis_length // threads))]  # one block per thread
        # out= with transposed operands (the heads' h.T @ dlogits and dlogits @ W.T)
        out = np.empty((N, M))
        assert parallel.matmul(b.T, a.T, out=out) is out
        np.testing.assert_allclose(out, expected.T, rtol=1e-13, atol=1e-13)


def test_matmul_without_a_pool_or_below_the_threshold_is_one_call(pool, rng, monkeypatch):
    a, b = random_array(rng, (6, 5)), random_array(rng, (5, 4))
    calls = []
    original = np.matmul
    monkeypatch.setattr(parallel.np, "matmul", lambda x, y, out=None: calls.append(1) or original(x, y, out=out))
    pool(1)
    parallel.matmul(a, b)
    pool(2)  # a pool, but 240 flops are far below MIN_PARALLEL_FLOPS
    parallel.matmul(a, b)
    assert calls == [1, 1]


def reference_log_softmax_target(z, target, scale):
    """Independent oracle: float64 log-probabilities from the definition, then the gradient formula."""
    z = z.astype(np.float64)
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    rows = np.arange(len(z))
    grad = np.exp(log_p) * scale[:, None]
    grad[rows, target] -= scale
    return log_p[rows, target], grad


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype, tolerance", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_log_softmax_target_in_row_blocks_matches_the_definition(pool, rng, monkeypatch, threads, dtype, tolerance):
    from npsoftmax.heads import softmax_functions

    monkeypatch.setattr(softmax_functions, "PARALLEL_MIN_LOGITS", 0)  # split these small matrices too
    pool(threads)
    n, k = 23, 17
    z = (random_array(rng, (n, k)) * 5).astype(dtype)
    z[3] += 1e3  # a row far from 0: the max shift keeps it exact
    target = rng.integers(0, k, n)
    scale = rng.uniform(0.1, 2.0, n)
    picked, grad = softmax_functions.log_softmax_target(z, target, scale)
    want_picked, want_grad = reference_log_softmax_target(z, target, scale)
    assert picked.dtype == dtype and grad.dtype == dtype and grad.flags.c_contiguous
    np.testing.assert_allclose(picked, want_picked, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(grad, want_grad, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("head_name, split", [("softmax", "products"), ("adaptive", "products"),
                                              ("adaptive", "branches")])
def test_heads_on_the_pool_match_numerical_gradients_and_one_thread(pool, rng, monkeypatch, head_name, split):
    """3 threads, with every product and softmax of the head split into blocks ("products",
    thresholds 0), or the adaptive head's head and tails run side by side ("branches"): loss
    and gradients equal the single-threaded ones and the numerical gradient."""
    from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors
    from npsoftmax.heads import AdaptiveSoftmaxHead, SoftmaxHead, adaptive, softmax_functions

    concurrent_calls = []
    if split == "products":
        monkeypatch.setattr(softmax_functions, "PARALLEL_MIN_LOGITS", 0)
        monkeypatch.setattr(parallel, "MIN_PARALLEL_FLOPS", 0)
    else:
        monkeypatch.setattr(adaptive, "CONCURRENT_MIN_FLOPS", 0)
        original = parallel.run_concurrently
        monkeypatch.setattr(parallel, "run_concurrently",
                            lambda *tasks: concurrent_calls.append(parallel.get_threads()) or original(*tasks))
    n, d, k = 19, 9, 40

    def build():
        if head_name == "softmax":
            return SoftmaxHead(d, k, rng=np.random.default_rng(5), dtype=np.float64)
        return AdaptiveSoftmaxHead(d, k, rng=np.random.default_rng(5), dtype=np.float64, cutoffs=[6, 15, 30],
                                   div_value=2.0)
    h = random_array(rng, (n, d))
    y = rng.integers(0, k, n)
    y[:4] = [0, 10, 20, 35]  # the shortlist and every tail cluster
    results = {}
    for threads in (1, 3):
        pool(threads)
        head = build()
        loss = head.forward(h, y)
        dh = head.backward()
        results[threads] = (loss, dh, {name: g.copy() for name, g in head.grads.items()})
    # forward and backward, at 1 thread (in turn) and at 3 (side by side)
    assert concurrent_calls == ([1, 1, 3, 3] if split == "branches" else [])
    loss1, dh1, grads1 = results[1]
    loss3, dh3, grads3 = results[3]
    assert loss3 == pytest.approx(loss1, rel=1e-13)
    np.testing.assert_allclose(dh3, dh1, rtol=1e-12, atol=1e-13)
    for name in grads1:
        np.testing.assert_allclose(grads3[name], grads1[name], rtol=1e-12, atol=1e-13, err_msg=name)
    # The numerical gradient, with the pool running (3 threads).
    head = build()
    head.forward(h, y)
    analytic = {"h": head.backward().copy(), **{name: g.copy() for name, g in head.grads.items()}}
    errors = gradient_errors(lambda: head.forward(h, y), {"h": h, **head.params}, analytic)
    assert max(errors.values()) < HEAD_TOLERANCE, errors


def test_adaptive_head_runs_small_tasks_together_longest_first_and_splitting_tasks_alone(pool, monkeypatch):
    """``AdaptiveSoftmaxHead._run_tasks``: tasks that do not split themselves go to one
    ``run_concurrently`` call, longest first; a task that splits itself runs alone, in turn;
    below ``CONCURRENT_MIN_FLOPS`` in all, everything runs in turn; results in task order."""
    from npsoftmax.heads import AdaptiveSoftmaxHead, adaptive

    pool(2)
    head = AdaptiveSoftmaxHead(16, 20, rng=np.random.default_rng(0), cutoffs=[5, 10])
    calls = []
    original = parallel.run_concurrently

    def recording(*tasks):
        calls.append([task() for task in tasks])  # what it was given, in its order
        return original(*tasks)
    monkeypatch.setattr(parallel, "run_concurrently", recording)
    tasks = [lambda value=value: value for value in "abcd"]
    costs = [(5, False), (100, True), (7, False), (6, False)]
    monkeypatch.setattr(adaptive, "CONCURRENT_MIN_FLOPS", 18)
    assert head._run_tasks(tasks, costs) == list("abcd")
    assert calls == [["c", "d", "a"]]
    calls.clear()
    monkeypatch.setattr(adaptive, "CONCURRENT_MIN_FLOPS", 19)  # 5 + 7 + 6 = 18 < 19
    assert head._run_tasks(tasks, costs) == list("abcd")
    assert calls == []


def test_run_concurrently_returns_in_order_runs_on_the_pool_and_raises_after_all(pool):
    pool(2)
    caller = threading.current_thread().name
    finished = []

    def named(value):
        def task():
            finished.append(value)
            return value, threading.current_thread().name
        return task
    results = parallel.run_concurrently(named("a"), named("b"), named("c"))
    assert [value for value, _ in results] == ["a", "b", "c"]
    assert results[0][1] == caller  # the first task runs on the calling thread

    finished.clear()

    def failing():
        raise RuntimeError("branch failed")
    with pytest.raises(RuntimeError, match="branch failed"):
        parallel.run_concurrently(failing, named("late"))
    assert finished == ["late"]  # the other branch ran to the end before the error surfaced
    pool(1)
    assert [value for value, _ in parallel.run_concurrently(named("x"), named("y"))] == ["x", "y"]


@pytest.mark.parametrize("threads", [2, 3])
def test_run_concurrently_shares_the_tasks_among_at_most_threads_threads(pool, threads):
    """Dynamic scheduling: the first ``threads`` tasks run at the same time (a barrier of that
    many parties would time out otherwise), never more than ``threads`` at once, every task
    exactly once, in the order given, and the results in the order of the tasks."""
    pool(threads)
    barrier = threading.Barrier(threads, timeout=10)
    lock = threading.Lock()
    running, most, started = [0], [0], []

    def task(index):
        def run():
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
                started.append(index)
            if index < threads:
                barrier.wait()  # BrokenBarrierError unless `threads` tasks run together
            time.sleep(0.002)
            with lock:
                running[0] -= 1
            return index, threading.current_thread().name
        return run
    results = parallel.run_concurrently(*(task(index) for index in range(7)))
    assert [index for index, _ in results] == list(range(7))
    assert most[0] == threads
    assert sorted(started) == list(range(7))
    names = {name for _, name in results}
    assert threading.current_thread().name in names
    assert len(names) == threads


def test_work_split_inside_a_pool_task_runs_inline(pool):
    """A pool task that splits work (map_chunks, matmul) does it on its own thread: it never waits
    on the pool it runs in (which could deadlock it)."""
    pool(2)

    together = threading.Barrier(2, timeout=10)  # so that `outer` runs on the pool, beside the first task

    def outer():
        together.wait()
        names = parallel.map_chunks(lambda start, stop: threading.current_thread().name, 10, 1)
        return threading.current_thread().name, names
    _, (worker, inner_names) = parallel.run_concurrently(together.wait, outer)
    assert worker.startswith("npsoftmax-chunk")
    assert inner_names == [worker] * 10
