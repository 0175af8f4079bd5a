"""Training stack: checkpoints, exact resume, NaN stop, and short end-to-end runs per head."""

import json
import os

import numpy as np
import pytest

from npsoftmax.checkpoint import load_checkpoint, save_checkpoint
from npsoftmax.data import load_digits_images, subset
from npsoftmax.models import build_model
from npsoftmax.optim import SGD, CosineSchedule, ExponentialTemperatureSchedule
from npsoftmax.train import Trainer, TrainingDiverged

TIMING_KEYS = {"epoch_seconds", "head_seconds", "head_ms_per_batch", "images_per_second"}


@pytest.fixture(scope="module")
def digits():
    """A small stratified subset of scikit-learn's real 8x8 digits (offline)."""
    return subset(load_digits_images(seed=0), 400, n_test=200, seed=0)


def make_trainer(dataset, run_dir, head="gumbel", epochs=3, seed=7, lr=0.05, **trainer_options):
    rng = np.random.default_rng(seed)
    options = {"tau": 1.0} if head == "gumbel" else {}
    if head == "adaptive":
        options = {"cutoffs": [3, 6]}
    model = build_model(head, dataset.n_classes, (1, 8, 8), rng=rng, widths=(4, 8, 8), feature_dim=24,
                        head_options=options)
    optimizer = SGD(model.params, lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * -(-len(dataset.train) // 32)
    schedules = {"lr_schedule": CosineSchedule(lr, steps)}
    if head == "gumbel":
        schedules["tau_schedule"] = ExponentialTemperatureSchedule(1.0, 0.5, 0.01)
    return Trainer(model, optimizer, dataset, epochs=epochs, batch_size=32, run_dir=run_dir, seed=seed,
                   progress=False, **schedules, **trainer_options)


def without_timing(history):
    return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in history]


def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path, rng):
    params = {"body.0.w": rng.standard_normal((3, 2, 3, 5)).astype(np.float32), "head.b": rng.standard_normal(4)}
    buffers = {"body.1.running_mean": rng.standard_normal(3)}
    optimizer_state = {"step": np.array(5), "momentum/head.b": rng.standard_normal(4)}
    meta = {"epoch": 2, "rng_states": {"trainer": np.random.default_rng(3).bit_generator.state}}
    path = tmp_path / "run" / "checkpoint.npz"
    save_checkpoint(path, params=params, buffers=buffers, optimizer_state=optimizer_state, meta=meta)
    loaded = load_checkpoint(path)
    for name, value in params.items():
        assert loaded["params"][name].dtype == value.dtype
        np.testing.assert_array_equal(loaded["params"][name], value)
    np.testing.assert_array_equal(loaded["buffers"]["body.1.running_mean"], buffers["body.1.running_mean"])
    np.testing.assert_array_equal(loaded["optimizer_state"]["momentum/head.b"], optimizer_state["momentum/head.b"])
    assert loaded["meta"]["epoch"] == 2
    assert loaded["meta"]["rng_states"]["trainer"] == meta["rng_states"]["trainer"]
    assert sorted(os.listdir(path.parent)) == ["checkpoint.npz"]  # no temporary file left behind


def test_truncated_checkpoint_gives_clear_error(tmp_path, rng):
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, params={"w": rng.standard_normal(100)}, meta={"epoch": 1})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="unreadable or truncated"):
        load_checkpoint(path)


def test_resume_after_kill_reproduces_the_uninterrupted_history(tmp_path, digits):
    """Kill a run after epoch 1 (an exception from the epoch hook), resume it, compare."""
    reference = make_trainer(digits, tmp_path / "reference", augment=True, crop_pad=1)
    reference_history = reference.fit()

    class Killed(Exception):
        pass

    def kill_after_first_epoch(trainer, record):
        if trainer.epoch == 1:
            raise Killed

    interrupted = make_trainer(digits, tmp_path / "resumed", augment=True, crop_pad=1,
                               on_epoch_end=kill_after_first_epoch)
    with pytest.raises(Killed):
        interrupted.fit()
    # A brand-new process would rebuild everything from the seed, then load the checkpoint.
    resumed = make_trainer(digits, tmp_path / "resumed", augment=True, crop_pad=1)
    resumed_history = resumed.fit(resume=True)

    assert len(resumed_history) == 3
    assert without_timing(resumed_history) == without_timing(reference_history)
    for name, value in reference.model.params.items():
        np.testing.assert_array_equal(resumed.model.params[name], value, err_msg=name)
    saved = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert without_timing(saved) == without_timing(reference_history)


def test_nan_loss_stops_with_a_clear_message(tmp_path, digits):
    trainer = make_trainer(digits, tmp_path, head="softmax", epochs=1)
    trainer.model.params["head.W"][0, 0] = np.nan
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1, step 0 .*smaller learning rate"):
        trainer.fit()


def test_float32_training_keeps_every_array_float32(tmp_path, digits):
    trainer = make_trainer(digits, tmp_path, head="softmax", epochs=1)
    trainer.train_epoch()
    for name, value in {**trainer.model.params, **trainer.model.grads, **trainer.model.buffers}.items():
        assert value.dtype == np.float32, name


@pytest.mark.parametrize("head", ["softmax", "gumbel", "hierarchical", "adaptive"])
def test_short_training_run_learns(tmp_path, digits, head):
    """Eight epochs on 400 real digit images: the loss falls and accuracy is far above chance (0.1)."""
    trainer = make_trainer(digits, tmp_path, head=head, epochs=8, lr=0.1)
    history = trainer.fit()
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    assert history[-1]["test_top1"] > 0.6
    assert history[-1]["head_seconds"] > 0
    assert (tmp_path / "checkpoint.npz").exists() and (tmp_path / "history.json").exists()


def test_cli_runs_end_to_end_and_writes_plots(tmp_path, capsys):
    from npsoftmax.cli import main

    code = main(["--softmax", "hierarchical", "--dataset", "digits", "--epochs", "1", "--subset", "300",
                 "--widths", "4,8,8", "--feature-dim", "16", "--no-progress", "--run-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "test_top1" in out
    for name in ("curves.png", "confusion.png", "history.json", "checkpoint.npz"):
        assert (tmp_path / name).exists(), name


def test_cli_no_download_never_touches_the_network(tmp_path, capsys, monkeypatch):
    import urllib.request

    from npsoftmax.cli import main

    def no_network(*args, **kwargs):
        raise AssertionError("--no-download must not open a connection")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    code = main(["--dataset", "cifar100", "--no-download", "--data-dir", str(tmp_path), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cifar-100-python.tar.gz" in err and str(tmp_path) in err


def test_cli_profile_prints_where_the_time_goes(tmp_path, capsys):
    from npsoftmax.cli import main

    code = main(["--dataset", "digits", "--subset", "200", "--widths", "4,8,8", "--feature-dim", "16",
                 "--profile", "3", "--threads", "1", "--run-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "profile of 3 training steps" in out
    for row in ("im2col", "conv GEMM", "col2im", "max pool", "batch norm", "relu", "head", "optimizer"):
        assert row in out, row
    assert not (tmp_path / "checkpoint.npz").exists()  # profiling trains nothing to keep


def test_default_body_skips_the_image_gradient_but_can_compute_it(rng):
    from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors

    x = rng.standard_normal((2, 1, 8, 8))
    y = np.array([3, 7])
    default = build_model("softmax", 10, (1, 8, 8), rng=np.random.default_rng(0), dtype=np.float64,
                          widths=(2, 3, 3), feature_dim=5)
    default.forward(x, y)
    assert default.backward() is None
    model = build_model("softmax", 10, (1, 8, 8), rng=np.random.default_rng(0), dtype=np.float64,
                        widths=(2, 3, 3), feature_dim=5, input_gradient=True, batch_norm=False)
    model.forward(x, y)
    dx = model.backward()
    errors = gradient_errors(lambda: model.forward(x, y), {"x": x}, {"x": dx})
    assert errors["x"] < HEAD_TOLERANCE  # the whole model ends in a head


def test_two_convs_per_block_pool_only_the_last_and_match_numerical_gradients(rng):
    """A VGG-style body: [conv -> BN -> ReLU -> conv -> BN -> pool -> ReLU] per block; every
    parameter's and the image's gradient against central differences (float64)."""
    from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors
    from npsoftmax.layers import BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU

    x = rng.standard_normal((3, 2, 8, 8))
    y = np.array([3, 7, 0])
    model = build_model("softmax", 10, (2, 8, 8), rng=np.random.default_rng(1), dtype=np.float64,
                        widths=(3, 2), feature_dim=5, convs_per_block=2, input_gradient=True)
    kinds = [type(module) for module in model.body.modules]
    block = [Conv2d, BatchNorm2d, ReLU, Conv2d, BatchNorm2d, MaxPool2d, ReLU]
    assert kinds == block + block + [Flatten, Linear, ReLU]
    convs = [module for module in model.body.modules if isinstance(module, Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(2, 3), (3, 3), (3, 2), (2, 2)]
    model.forward(x, y)
    dx = model.backward()
    analytic = {"x": dx, **{name: grad.copy() for name, grad in model.grads.items()}}
    errors = gradient_errors(lambda: model.forward(x, y), {"x": x, **model.params}, analytic)
    assert max(errors.values()) < HEAD_TOLERANCE, errors
    with pytest.raises(ValueError, match="convs_per_block must be >= 1, got 0"):
        build_model("softmax", 10, (2, 8, 8), rng=rng, widths=(3,), convs_per_block=0)
    with pytest.raises(TypeError, match="convs_per_block must be an int, got float 2.0"):
        build_model("softmax", 10, (2, 8, 8), rng=rng, widths=(3,), convs_per_block=2.0)


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--subset", "-3"], "--subset must be >= 1, got -3"),
    (["--tau", "0"], "--tau must be a finite number > 0"),
    (["--dataset", "digits", "--softmax", "hierarchical", "--tree", "superclass"], "needs --dataset cifar100"),
])
def test_cli_rejects_impossible_options_with_usage(argv, message, capsys):
    from npsoftmax.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err


def test_default_threads_are_the_free_cores(monkeypatch):
    from npsoftmax import cli

    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (1.1, 1.0, 1.0))
    threads, note = cli.default_threads()
    assert threads == 1 and "using 1 thread" in note
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.3, 1.0, 1.0))
    assert cli.default_threads() == (2, None)
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (40.0, 1.0, 1.0))
    assert cli.default_threads()[0] == 1
