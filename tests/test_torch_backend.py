"""The torch backend drives the same Trainer loop as the NumPy one (needs torch; skipped without it)."""

import importlib.util
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "digits", "--subset", "300", "--widths", "4,8", "--feature-dim", "12", "--threads", "1",
        "--no-progress", "--batch-size", "64", "--epochs", "2", "--val", "60"]


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPOSITORY, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("options", [[], ["--head-lr-scale", "0.3"]], ids=["plain", "head-lr-scale"])
def test_float64_torch_run_matches_the_numpy_run_record_for_record(tmp_path, options):
    """With --head-lr-scale the torch side gets two param groups, and its schedule keeps the ratio."""
    from npsoftmax.cli import main

    argv = TINY + ["--dtype", "float64"] + options
    assert main(argv + ["--run-dir", str(tmp_path / "np")]) == 0
    assert load_example("train_torch").main(argv + ["--run-dir", str(tmp_path / "pt")]) == 0
    numpy_history = json.loads((tmp_path / "np" / "history.json").read_text())
    torch_history = json.loads((tmp_path / "pt" / "history.json").read_text())
    timing = {"epoch_seconds", "head_seconds", "head_ms_per_batch", "images_per_second"}
    for ours, theirs in zip(numpy_history, torch_history):
        assert set(ours) == set(theirs)                      # one loop: the same records
        for key in set(ours) - timing:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-9, abs=1e-12), key
    assert (tmp_path / "pt" / "model.pt").exists()


def test_torch_weights_re_evaluate_in_numpy(tmp_path, capsys):
    assert load_example("train_torch").main(TINY + ["--softmax", "adaptive", "--run-dir", str(tmp_path)]) == 0
    history = json.loads((tmp_path / "history.json").read_text())
    best = max(history, key=lambda record: record["val_top1"])
    result = load_example("evaluate").evaluate_weights(str(tmp_path / "weights.npz"))
    assert result["epoch"] == best["epoch"]
    assert abs(result["test_top1"] - best["test_top1"]) <= 1.0 / result["n_test"]   # float32, two libraries
    assert result["nll"] == pytest.approx(best["test_loss"], rel=1e-4)


def test_torch_runs_refuse_resume(tmp_path, capsys):
    assert load_example("train_torch").main(TINY + ["--resume", "--run-dir", str(tmp_path)]) == 2
    assert "does not resume" in capsys.readouterr().err
