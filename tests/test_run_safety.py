"""A run folder is never silently mixed, overwritten or trusted blindly; bad options never end in a traceback.

Each test is one reproduction from the reliability review, driven through ``cli.main(argv)``
(the ``train_np.py`` entry point) on a tiny model over the offline digits, so the whole
file runs in seconds. Exit codes: 0 ok, 2 usage/data/run-folder/checkpoint error, 3 diverged.
"""

import json
import os
import zipfile

import numpy as np
import pytest

from npsoftmax.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from npsoftmax.cli import main

TINY = ["--dataset", "digits", "--subset", "300", "--widths", "4,8", "--feature-dim", "12", "--threads", "1",
        "--no-progress", "--batch-size", "64"]


def train(run_dir, *extra, epochs=1):
    return main(TINY + ["--epochs", str(epochs), "--run-dir", str(run_dir), *extra])


def read_history(run_dir):
    with open(os.path.join(run_dir, "history.json")) as stream:
        return json.load(stream)


def test_resume_with_another_head_is_refused_and_names_each_difference(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(run_dir, epochs=2) == 0
    history, args_json = read_history(run_dir), (run_dir / "args.json").read_text()
    capsys.readouterr()
    assert train(run_dir, "--softmax", "gumbel", "--resume", epochs=2) == 2
    err = capsys.readouterr().err
    assert "belongs to a different run" in err
    assert "softmax: checkpoint has 'softmax', this run has 'gumbel'" in err
    assert "Traceback" not in err
    assert read_history(run_dir) == history                   # nothing of the earlier run changed
    assert (run_dir / "args.json").read_text() == args_json


@pytest.mark.parametrize("first, second, option", [
    (["--softmax", "hierarchical", "--tree", "balanced"], ["--softmax", "hierarchical", "--tree", "huffman"], "tree"),
    ([], ["--widths", "4,4"], "widths"),
    ([], ["--optimizer", "adam"], "optimizer"),
    (["--softmax", "adaptive"], ["--softmax", "adaptive", "--cutoffs", "3"], "cutoffs"),
    ([], ["--lr", "0.01"], "lr"),
    ([], ["--seed", "1"], "seed"),
    ([], ["--head-lr-scale", "0.5"], "head_lr_scale"),
    ([], ["--convs-per-block", "2"], "convs_per_block"),
])
def test_resume_refuses_any_change_of_identity(tmp_path, capsys, first, second, option):
    run_dir = tmp_path / "run"
    assert train(run_dir, *first) == 0
    capsys.readouterr()
    assert train(run_dir, *second, "--resume", epochs=1) == 2
    err = capsys.readouterr().err
    assert f"  {option}: checkpoint has" in err and "Traceback" not in err


def test_resume_continues_the_same_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(run_dir, epochs=2) == 0
    assert train(run_dir, "--resume", epochs=2) == 0          # finished: re-checked, not retrained
    assert len(read_history(run_dir)) == 2
    assert "resuming" in capsys.readouterr().out


def test_a_new_run_never_overwrites_an_old_one_without_overwrite(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(run_dir, epochs=2) == 0
    history = read_history(run_dir)
    capsys.readouterr()
    assert train(run_dir, epochs=1) == 2
    err = capsys.readouterr().err
    assert "already holds a run (2 epochs done)" in err and "--resume" in err and "--overwrite" in err
    assert read_history(run_dir) == history
    (run_dir / "notes.txt").write_text("mine")
    assert train(run_dir, "--overwrite", epochs=1) == 0
    assert len(read_history(run_dir)) == 1
    assert (run_dir / "notes.txt").read_text() == "mine"      # only the run's own files are replaced


def test_resume_without_a_checkpoint_prints_the_note(tmp_path, capsys):
    assert train(tmp_path / "new", "--resume") == 0
    assert "--resume: no checkpoint in" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--momentum", "5"], "--momentum must be a finite number >= 0.0 and <= 0.999"),
    (["--softmax", "adaptive", "--div-value", "0"], "--div-value must be a finite number > 0"),
    (["--softmax", "adaptive", "--cutoffs", "5,3"], "cutoffs must be strictly increasing"),
    (["--softmax", "adaptive", "--cutoffs", "200"], "cutoffs must lie in [1, n_classes - 1] = [1, 9]"),
    (["--feature-dim", "-5"], "--feature-dim must be >= 1, got -5"),
    (["--feature-dim", "0"], "--feature-dim must be >= 1, got 0"),
    (["--widths", "0"], "--widths must list at least one conv width, each >= 1"),
    (["--widths", ","], "--widths must list at least one conv width"),
    (["--widths", "4,4,4,4"], "allows at most 3 blocks"),
    (["--warmup-epochs", "-3"], "--warmup-epochs must be a finite number >= 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--val", "-1"], "--val must be >= 0, got -1"),
    (["--early-stop", "2"], "--early-stop needs a validation split"),
    (["--tau", "0"], "--tau must be a finite number > 0"),
    (["--resume", "--overwrite"], "exclude each other"),
    (["--dataset", "cifar100", "--subset", "50"], "every class needs one: use --subset >= 105"),
    (["--softmax", "hierarchical", "--label-smoothing", "0.1"], "the hierarchical head does not support it"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be a finite number >= 0.0 and <= 0.999"),
    (["--head-lr-scale", "0"], "--head-lr-scale must be a finite number > 0.0, got 0.0"),
    (["--convs-per-block", "0"], "--convs-per-block must be >= 1, got 0"),
    (["--head-lr-scale", "nan"], "--head-lr-scale must be a finite number > 0.0, got nan"),
    (["--softmax", "sampled", "--samples", "0"], "--samples must be in [1, 10]"),
    (["--class-weights", "no-such-file.txt"], "--class-weights must be 'balanced' or a file"),
])
def test_impossible_options_end_in_usage_and_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(TINY[:2] + argv + ["--no-progress", "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err, err
    assert not (tmp_path / "run").exists()                    # nothing was created


def test_a_deeper_body_trains_and_its_weights_file_rebuilds_it(tmp_path):
    from npsoftmax.layers import Conv2d
    from npsoftmax.weights import load_weights

    assert train(tmp_path / "deep", "--convs-per-block", "2") == 0
    model, info = load_weights(tmp_path / "deep" / "weights.npz")
    assert info["model"]["convs_per_block"] == 2 and info["identity"]["convs_per_block"] == 2
    convs = [module for module in model.body.modules if isinstance(module, Conv2d)]
    assert [(conv.in_channels, conv.out_channels) for conv in convs] == [(1, 4), (4, 4), (4, 8), (8, 8)]


def test_class_weights_from_a_file_and_head_options_reach_the_head(tmp_path, capsys):
    weights = tmp_path / "w.txt"
    weights.write_text(" ".join(str(k + 1) for k in range(10)))
    assert train(tmp_path / "ok", "--softmax", "gumbel", "--class-weights", str(weights),
                 "--label-smoothing", "0.1") == 0
    from npsoftmax.weights import load_weights

    model, info = load_weights(tmp_path / "ok" / "weights.npz")
    np.testing.assert_array_equal(model.head.class_weights, np.arange(1, 11))
    assert model.head.label_smoothing == 0.1 and info["identity"]["class_weights"] == str(weights)
    weights.write_text("1 2 3")
    capsys.readouterr()
    assert train(tmp_path / "bad", "--class-weights", str(weights)) == 2
    assert "expected 10 numbers (one per class), got shape (3,)" in capsys.readouterr().err
    assert train(tmp_path / "sampled", "--softmax", "sampled", "--samples", "3", "--sampler", "unigram") == 0


def test_run_dir_and_data_dir_are_checked_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(TINY + ["--run-dir", str(a_file)])
    assert exit_info.value.code == 2 and "is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--dataset", "cifar100", "--data-dir", str(a_file), "--no-download", "--run-dir", str(tmp_path / "r")])
    assert exit_info.value.code == 2 and "--data-dir" in capsys.readouterr().err
    assert train(a_file / "below") == 2                       # cannot be created: a file is in the way
    assert "cannot create the run folder" in capsys.readouterr().err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_dir_fails_before_training(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o500)
    try:
        assert train(run_dir) == 2
    finally:
        run_dir.chmod(0o700)
    assert "not writable" in capsys.readouterr().err


def test_missing_data_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    code = main(["--dataset", "cifar100", "--data-dir", str(tmp_path), "--no-download", "--run-dir",
                 str(tmp_path / "run"), "--no-progress", "--threads", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CIFAR-100 not found") and "Traceback" not in err


def corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        # Flip one bit inside the first parameter array (past its .npy header), not in the zip directory.
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(next(name for name in archive.namelist() if name.startswith("param/")))
        offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
        data[offset] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, message", [("truncate", "unreadable or truncated"),
                                          ("flip", "")])
def test_a_damaged_checkpoint_is_refused_with_one_message(tmp_path, capsys, how, message):
    run_dir = tmp_path / "run"
    assert train(run_dir) == 0
    corrupt(run_dir / "checkpoint.npz", how)
    capsys.readouterr()
    assert train(run_dir, "--resume", epochs=2) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and message in err and "Traceback" not in err
    assert any(word in err for word in ("truncated", "damaged", "unreadable"))


def test_checkpoint_checks_required_keys_checksum_and_finite_values(tmp_path, rng):
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, params={"w": rng.standard_normal(4)}, meta={"epoch": 1})
    with pytest.raises(CheckpointError, match=r"lacks \['rng_states'\]"):
        load_checkpoint(path, required_meta=("epoch", "rng_states"))
    save_checkpoint(path, params={"w": np.array([1.0, np.nan])}, buffers={"v": np.array([np.inf])},
                    meta={"epoch": 1})
    with pytest.raises(CheckpointError, match=r"NaN or inf in \['v', 'w'\]"):
        load_checkpoint(path)
    # Replace one array with a well-formed one of the same shape: only the checksum notices.
    save_checkpoint(path, params={"w": np.zeros(3)}, meta={"epoch": 1})
    with np.load(path) as archive:
        contents = dict(archive)
    contents["param/w"] = np.ones(3)
    np.savez(path, **contents)
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_checkpoint(path)


def test_divergence_exits_3_and_names_a_checkpoint_only_if_it_is_finite(tmp_path, capsys):
    assert train(tmp_path / "hot", "--lr", "1e6", "--momentum", "0.99") == 3
    err = capsys.readouterr().err
    assert "error:" in err and "there is no checkpoint yet" in err


def test_a_diverged_epoch_is_never_saved_and_the_named_checkpoint_resumes(tmp_path):
    from npsoftmax.data import load_digits_images, subset
    from npsoftmax.models import build_model
    from npsoftmax.optim import SGD
    from npsoftmax.train import Trainer, TrainingDiverged

    dataset = subset(load_digits_images(seed=0), 200, seed=0)
    model = build_model("softmax", 10, (1, 8, 8), rng=np.random.default_rng(0), widths=(4, 8), feature_dim=12)
    optimizer = SGD(model.params, lr=0.05, momentum=0.9)
    trainer = Trainer(model, optimizer, dataset, epochs=1, batch_size=50, run_dir=tmp_path, progress=False)
    trainer.fit()
    saved = (tmp_path / "checkpoint.npz").read_bytes()
    trainer.epochs = 2
    model.buffers["body.1.running_var"][0] = np.inf          # a BN statistic blown up during the epoch
    optimizer.lr = 1e-12
    with pytest.raises(TrainingDiverged, match="last finite checkpoint is .*checkpoint.npz \\(end of epoch 1\\)"):
        trainer.fit()
    assert (tmp_path / "checkpoint.npz").read_bytes() == saved   # the non-finite epoch was not saved
    load_checkpoint(tmp_path / "checkpoint.npz")                  # and the one named is finite


def test_stray_temporaries_of_an_interrupted_save_are_removed_on_the_next_start(tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir) == 0
    stray = run_dir / ".checkpoint-abc123.npz"
    stray.write_bytes(b"half a checkpoint")
    assert train(run_dir, "--resume") == 0
    assert not stray.exists()


def test_compare_has_no_options_that_do_nothing(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "compare", os.path.join(os.path.dirname(__file__), "..", "examples", "compare.py"))
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    for argv in (["--heads", ","], ["--softmax", "gumbel"], ["--run-dir", "x"], ["--profile", "2"],
                 ["--heads", "hierarchical-oak"], ["--jobs", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            compare.main(["--dataset", "digits"] + argv)
        assert exit_info.value.code == 2, argv
        assert "usage:" in capsys.readouterr().err

