"""The real CIFAR-100 images, through the package's own loader, and one short run on them.

Needs the project's shared data folder beside the checkout (``../shared/data/cifar100/``,
whose ``make_cifar100.py`` writes the official layout); skipped cleanly without it. Users
get the same files from the official archive (``load_cifar100`` downloads and md5-checks it).
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKER = os.path.join(REPOSITORY, "..", "shared", "data", "cifar100", "make_cifar100.py")

pytestmark = pytest.mark.skipif(not os.path.isfile(MAKER),
                                reason="the real CIFAR-100 files (../shared/data/cifar100/) are not beside the checkout")

#: The published per-channel mean of the CIFAR-100 training images (0..1 scale).
TRAIN_MEAN = (0.50707516, 0.48654887, 0.44091784)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar100")
    subprocess.run([sys.executable, MAKER, str(folder)], check=True, capture_output=True)
    return folder


@pytest.fixture(scope="module")
def cifar(data_dir):
    from npsoftmax.data import load_cifar100

    return load_cifar100(data_dir, download=False, progress=False)


def test_the_real_splits_have_the_published_sizes_and_class_counts(cifar):
    assert cifar.train.images.shape == (50000, 32, 32, 3) and cifar.train.images.dtype == np.uint8
    assert cifar.test.images.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(cifar.train.labels, minlength=100), np.full(100, 500))
    np.testing.assert_array_equal(np.bincount(cifar.test.labels, minlength=100), np.full(100, 100))
    assert len(cifar.fine_names) == 100 and len(cifar.coarse_names) == 20


def test_superclasses_are_20_groups_of_5_and_match_meta_and_the_carried_table(cifar):
    from npsoftmax.data import COARSE_NAMES, COARSE_OF_FINE, FINE_NAMES

    groups = cifar.coarse_of_fine()                       # raises if a fine class had two superclasses
    np.testing.assert_array_equal(np.bincount(groups, minlength=20), np.full(20, 5))
    np.testing.assert_array_equal(groups, COARSE_OF_FINE)
    assert tuple(cifar.fine_names) == tuple(FINE_NAMES) and tuple(cifar.coarse_names) == tuple(COARSE_NAMES)
    test_groups = np.full(100, -1)
    test_groups[cifar.test.labels] = cifar.test.coarse_labels
    np.testing.assert_array_equal(test_groups, groups)


def test_the_training_mean_is_the_published_one(cifar):
    from npsoftmax.data import channel_mean_std

    mean, _ = channel_mean_std(cifar.train.images)
    np.testing.assert_allclose(mean, TRAIN_MEAN, atol=1e-6, rtol=0)


def test_validation_split_is_stratified_disjoint_and_seeded(cifar):
    from npsoftmax.data import split_validation

    split = split_validation(cifar, 5000, seed=0)
    assert len(split.train) == 45000 and len(split.val) == 5000
    np.testing.assert_array_equal(np.bincount(split.val.labels, minlength=100), np.full(100, 50))
    again = split_validation(cifar, 5000, seed=0)
    np.testing.assert_array_equal(again.val.images, split.val.images)
    # Disjoint: the 50,000 rows are exactly the 45,000 + 5,000 (compare as byte strings).
    rows = {row.tobytes() for row in cifar.train.images[:2000]}
    kept = sum(row.tobytes() in rows for row in split.train.images[:2000])
    held = sum(row.tobytes() in rows for row in split.val.images)
    assert kept + held <= 2000 and held > 0


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPOSITORY, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_short_run_on_the_real_images_and_evaluate_py_reproduces_it_exactly(data_dir, tmp_path, capsys):
    from npsoftmax.cli import main

    run_dir = tmp_path / "run"
    code = main(["--dataset", "cifar100", "--data-dir", str(data_dir), "--no-download", "--subset", "2000",
                 "--epochs", "2", "--softmax", "hierarchical", "--threads", "1", "--no-progress",
                 "--run-dir", str(run_dir)])
    assert code == 0
    history = json.loads((run_dir / "history.json").read_text())
    assert [record["epoch"] for record in history] == [1, 2]
    assert all(0.0 <= record["val_top1"] <= 1.0 and record["test_ece"] >= 0.0 for record in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    best = max(history, key=lambda record: record["val_top1"])

    evaluate = _load_example("evaluate")
    capsys.readouterr()
    assert evaluate.main(["--weights", str(run_dir / "weights.npz"), "--data-dir", str(data_dir),
                          "--no-download", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["head"] == "hierarchical" and result["tree"] == "superclass" and result["n_test"] == 2000
    assert result["epoch"] == best["epoch"]
    for key, history_key in (("test_top1", "test_top1"), ("test_top5", "test_top5"), ("nll", "test_loss"),
                             ("ece", "test_ece"), ("coarse_top1", "test_coarse_top1"),
                             ("in_superclass_error_share", "test_in_superclass_error_share"),
                             ("macro_f1", "test_macro_f1")):
        assert result[key] == best[history_key], key          # the same numbers, not merely close
