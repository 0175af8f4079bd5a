"""Smoke tests of the benchmark scripts at a tiny size: each mode runs and prints its table.

Nothing here asserts on a time (STYLE.md: timings live in benchmarks/ and tests never
assert on them). What is checked: the rows and the evidence lines come out, every
worker's raw samples reach ``--out``, each side ran with its own OpenMP wait policy,
the busy-loop processes of ``--load`` never outlive the block, and a pair of twins
whose first-step losses differ gets no ratio.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
TINY_STEP = ["--batch", "8", "--repeats", "2", "--warmup", "1", "--rounds", "1", "--threads", "1", "--variant", "plain"]


def load_processes():
    spec = importlib.util.spec_from_file_location("_processes", os.path.join(BENCHMARKS, "_processes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script, *args, expect=0):
    """Run a benchmark script as a user would; the environment without OMP_WAIT_POLICY
    (another test in this session may have imported npsoftmax, which sets it)."""
    env = {name: value for name, value in os.environ.items() if name != "OMP_WAIT_POLICY"}
    completed = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), *args], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == expect, completed.stdout + completed.stderr
    return completed.stdout


def rows(text, *words):
    """The lines of ``text`` whose whitespace-separated fields start with ``words``, after the numeric ones."""
    found = []
    for line in text.splitlines():
        fields = [field for field in line.split() if not field.replace(".", "").isdigit()]
        if fields[:len(words)] == list(words):
            found.append(line)
    return found


def raw_results(path):
    lines = open(path).read().split("# raw output", 1)[1].splitlines()[1:]
    return [json.loads(line) for line in lines if line.strip()]


def test_losses_agree_within_float32_noise_and_not_beyond():
    processes = load_processes()
    assert processes.losses_agree(4.6051702, 4.6051707)
    assert not processes.losses_agree(4.6051702, 4.6102)
    assert not processes.losses_agree(float("nan"), float("nan"))
    assert not processes.losses_agree(float("inf"), float("inf"))
    with pytest.raises(processes.LossMismatch, match="npsoftmax 4.6 vs torch 4.7"):
        processes.check_losses_agree(4.6, 4.7, "bn model")


def test_thread_env_sets_every_thread_count_and_adds_no_wait_policy():
    processes = load_processes()
    env = processes.thread_env(3, base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", **{name: "3" for name in processes.THREAD_VARIABLES}}


def test_busy_load_processes_end_with_the_block_and_by_themselves():
    processes = load_processes()
    with processes.BusyLoad(2, max_seconds=60) as busy:
        started = list(busy.processes)
        assert len(started) == 2 and busy.all_alive()
    assert all(process.poll() is not None for process in started)
    with processes.BusyLoad(1, max_seconds=0.1) as busy:
        deadline = time.monotonic() + 10
        while busy.all_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not busy.all_alive()  # it stopped itself, before the block ended


def test_bench_train_times_each_side_in_its_own_process_loaded_and_unloaded(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench_train.txt"
    text = run_script("bench_train.py", *TINY_STEP, "--load", "1", "--out", str(out))
    for field in ("command:", "date:", "machine:", "versions:", "load average before"):
        assert field in text
    assert "torch 2." in text and "numpy" in text
    for load in ("0", "1"):
        for impl in ("npsoftmax", "torch", "np/torch"):
            assert [line for line in rows(text, "plain", impl) if line.split()[1] == load], (load, impl, text)
    assert "slowdown beside 1 busy process" in text
    assert len(rows(text, "plain")) == 6 + 1  # three rows per load, and one slowdown row
    results = raw_results(out)
    assert [(r["side"], r["round"]) for r in results] == [("npsoftmax", 0), ("torch", 0)] * 2
    assert all(len(r["samples_ms"]["train"]) == 2 and r["threads"] == 1 for r in results)
    # Each side with its own defaults: npsoftmax sets PASSIVE for itself; torch's runtime never saw it.
    assert {r["side"]: r["omp_wait_policy"] for r in results} == {"npsoftmax": "PASSIVE", "torch": None}
    assert not any(r["torch_imported"] for r in results if r["side"] == "npsoftmax")


def test_bench_train_refuses_a_ratio_when_the_first_step_losses_differ():
    pytest.importorskip("torch")
    text = run_script("bench_train.py", *TINY_STEP, "--debug-perturb", expect=1)
    assert "REFUSED" in text and "first-step losses differ" in text
    assert "np/torch" not in text


def test_bench_train_without_torch_prints_the_npsoftmax_rows_alone():
    text = run_script("bench_train.py", *TINY_STEP, "--no-torch")
    assert len(rows(text, "plain", "npsoftmax")) == 1
    assert "np/torch" not in text and "npsoftmax alone" in text


def test_bench_train_no_fuse_runs_batch_norm_and_pool_apart():
    args = [a if a != "plain" else "bn" for a in TINY_STEP]
    fused = run_script("bench_train.py", *args, "--no-torch")
    apart = run_script("bench_train.py", *args, "--no-torch", "--no-fuse")
    assert "batch norm + max pool fused" in fused and "batch norm + max pool apart (--no-fuse)" in apart
    # the same model and data: the same first-step loss either way
    assert rows(fused, "bn", "npsoftmax")[0].split()[-1] == rows(apart, "bn", "npsoftmax")[0].split()[-1]


def test_bench_epoch_compare_torch_prints_seconds_and_peak_memory_of_each(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench_epoch.txt"
    text = run_script("bench_epoch.py", "--compare-torch", "--train", "256", "--test", "100", "--batch-size", "8",
                      "--rounds", "1", "--threads", "1", "--out", str(out))
    assert "peak RSS MiB" in text and "machine:" in text
    for impl in ("npsoftmax", "torch", "np/torch"):
        assert len(rows(text, impl)) == 1, (impl, text)
    results = raw_results(out)
    assert [r["side"] for r in results] == ["npsoftmax", "torch"]
    assert all(r["peak_rss_mib"] > 0 and r["epoch_seconds"] > 0 and r["train_images"] == 256 for r in results)


def test_bench_heads_versus_torch_times_each_head_alone_and_refuses_twins_that_differ(tmp_path):
    tiny = ["--versus-torch", "--threads", "1", "--classes", "2000", "--batch", "16", "--cutoffs", "40,200,1000",
            "--repeats", "2", "--softmax-repeats", "2", "--warmup", "1", "--rounds", "1"]
    out = tmp_path / "bench_heads.txt"

    def timed(head):  # the head's own row (its ms figure follows the name), not a ratio row
        return [line for line in rows(text, "2,000", head) if line.split()[2][0].isdigit()]
    text = run_script("bench_heads.py", *tiny, "--save-to", str(out))
    for field in ("command:", "date:", "machine:", "versions:", "threads, as the workers", "targets"):
        assert field in text
    assert "slower with more threads?" in text
    for head in ("softmax", "hierarchical", "adaptive"):
        assert len(timed(head)) == 1, (head, text)
    assert len(rows(text, "2,000", "hierarchical", "speed-up")) == 1
    numpy_results = [r for r in raw_results(out) if r["side"] == "npsoftmax"]
    assert [r["head"] for r in numpy_results] == ["softmax", "hierarchical", "adaptive"]
    assert all(len(r["samples_ms"]) == 2 and r["threads"] == 1 and r["batch"] == 16 for r in numpy_results)
    assert not any(r["torch_imported"] for r in numpy_results)

    pytest.importorskip("torch")
    results = raw_results(out)
    assert [r["head"] for r in results] == ["softmax", "hierarchical", "adaptive", "torch-adaptive", "torch-softmax"]
    for head in ("torch-adaptive", "torch-softmax"):
        assert len(timed(head)) == 1, (head, text)
    assert len(rows(text, "2,000", "adaptive", "np/torch")) == 1
    by_head = {r["head"]: r for r in results}
    assert by_head["torch-adaptive"]["omp_wait_policy"] is None and "torch 2." in text
    # The twins hold the same weights: the same first loss, as the script checked before any ratio.
    assert by_head["adaptive"]["first_loss"] == pytest.approx(by_head["torch-adaptive"]["first_loss"], rel=1e-4)
    refused = run_script("bench_heads.py", *tiny, "--heads", "adaptive,torch-adaptive", "--debug-perturb", expect=1)
    assert "REFUSED" in refused and "first-step losses differ" in refused
    assert "np/torch" not in refused


def test_many_cores_script_runs_both_sweeps_and_keeps_their_reports(tmp_path):
    """benchmarks/many_cores.sh (prepared for a 16-core machine), shrunk to a smoke run: both
    reports land in the output folder, with the thread counts it was given."""
    pytest.importorskip("torch")
    env = {name: value for name, value in os.environ.items() if name != "OMP_WAIT_POLICY"}
    env.update(THREADS="1", ROUNDS="1", SKIP_BUILD="1", PYTHON=sys.executable,
               TRAIN_ARGS="--batch 8 --repeats 2 --warmup 1 --variant plain",
               HEADS_ARGS="--classes 1000 --cutoffs 100,400 --repeats 2 --warmup 1 --heads adaptive,torch-adaptive")
    completed = subprocess.run(["bash", os.path.join(BENCHMARKS, "many_cores.sh"), str(tmp_path)], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    reports = sorted(path.name for path in tmp_path.glob("*-many-cores-*.txt"))
    assert [name.split("-many-cores-")[0] for name in reports] == ["bench_heads", "bench_train"], reports
    train = (tmp_path / reports[1]).read_text()
    assert rows(train, "plain", "np/torch") and "--threads 1" in train
    heads = (tmp_path / reports[0]).read_text()
    assert "adaptive np/torch" in heads
