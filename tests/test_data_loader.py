"""CIFAR-100 official-format reading/writing, load_cifar100 from disk, digits, subset.

Nothing here touches the network: datasets are small files written in the official
format (checked against hand-built pickles), and every path that could download is
either forbidden (download=False / NPSOFTMAX_OFFLINE) or guarded by a urlopen that fails.
"""

import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from npsoftmax.data import (COARSE_NAMES, COARSE_OF_FINE, FINE_NAMES, DatasetCorruptError,
                            DatasetNotFoundError, ImageDataset, ImageSplit, load_cifar100,
                            load_digits_images, make_cifar100_archive, read_batch_file,
                            read_meta_file, stratified_indices, subset, write_cifar100_files)
from npsoftmax.data import download as download_module
from npsoftmax.data.official_format import write_batch_file

#: A copy of the official CIFAR-100 ``meta`` file (1,473 bytes), kept so this check always runs.
REAL_META = Path(__file__).resolve().parent / "data" / "cifar-100-meta"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to download in this file is a test failure, and the env is clean."""
    def refuse(*args, **kwargs):
        raise AssertionError("test_data_loader must not open a URL")
    monkeypatch.setattr(download_module.urllib.request, "urlopen", refuse)
    monkeypatch.delenv("NPSOFTMAX_OFFLINE", raising=False)
    monkeypatch.delenv("NPSOFTMAX_DATA", raising=False)


def random_split(rng, n):
    """(images (n,32,32,3) uint8, fine (n,), coarse (n,)) with coarse = COARSE_OF_FINE[fine]."""
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    fine = rng.integers(0, 100, size=n)
    return images, fine, COARSE_OF_FINE[fine]


@pytest.fixture
def small_cifar(tmp_path):
    rng = np.random.default_rng(7)
    train, test = random_split(rng, 13), random_split(rng, 5)
    write_cifar100_files(tmp_path, train=train, test=test)
    return tmp_path, train, test


def hand_pickle(path, content):
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=2)


# --------------------------------------------------------------- official format
def test_channel_major_rows_become_nhwc_with_distinct_planes(tmp_path):
    # Build the official row by hand: all 1024 red values, then green, then blue,
    # each plane row-major. Planes differ so any transpose mistake shows.
    ramp = np.arange(1024, dtype=np.int64).reshape(32, 32)
    red, green, blue = (ramp % 251).astype(np.uint8), ((3 * ramp + 7) % 256).astype(np.uint8), \
        (255 - ramp % 200).astype(np.uint8)
    second = np.full((32, 32), 9, np.uint8)
    rows = np.stack([np.concatenate([red.ravel(), green.ravel(), blue.ravel()]),
                     np.concatenate([second.ravel(), 2 * second.ravel(), 3 * second.ravel()])])
    hand_pickle(tmp_path / "train", {"data": rows, "fine_labels": [3, 99], "coarse_labels": [8, 13],
                                     "filenames": ["a.png", "b.png"], "batch_label": "x"})
    images, fine, coarse = read_batch_file(tmp_path / "train")
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8 and images.flags.c_contiguous
    np.testing.assert_array_equal(images[0, :, :, 0], red)
    np.testing.assert_array_equal(images[0, :, :, 1], green)
    np.testing.assert_array_equal(images[0, :, :, 2], blue)
    assert tuple(images[0, 1, 2]) == (red[1, 2], green[1, 2], blue[1, 2])  # row 1, column 2
    assert tuple(images[1, 31, 0]) == (9, 18, 27)
    assert fine.dtype == np.int64 and fine.tolist() == [3, 99] and coarse.tolist() == [8, 13]


def test_files_pickled_by_numpy_1_load_without_warnings(tmp_path):
    # Python 2 / numpy 1 pickles (the real files) name numpy.core.multiarray._reconstruct.
    rows = np.arange(2 * 3072).reshape(2, 3072).astype(np.uint8)
    content = pickle.dumps({"data": rows, "fine_labels": [5, 6], "coarse_labels": [1, 2]}, protocol=2)
    assert b"numpy._core.multiarray" in content
    (tmp_path / "test").write_bytes(content.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images, fine, _ = read_batch_file(tmp_path / "test")
    np.testing.assert_array_equal(images[1, 0, 0], rows[1, [0, 1024, 2048]])
    assert fine.tolist() == [5, 6]


def test_writer_produces_the_official_structure(small_cifar):
    root, train, test = small_cifar
    with open(root / "cifar-100-python" / "train", "rb") as handle:
        raw = pickle.load(handle, encoding="latin1")
    assert set(raw) == {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"}
    images, fine, coarse = train
    assert raw["data"].dtype == np.uint8 and raw["data"].shape == (13, 3072)
    # Row 4 is the red plane, then green, then blue, each row-major.
    expected_row = np.concatenate([images[4, :, :, channel].ravel() for channel in range(3)])
    np.testing.assert_array_equal(raw["data"][4], expected_row)
    assert isinstance(raw["fine_labels"], list) and all(type(v) is int for v in raw["fine_labels"])
    assert raw["fine_labels"] == fine.tolist() and raw["coarse_labels"] == coarse.tolist()
    assert len(raw["filenames"]) == 13 and isinstance(raw["batch_label"], str)
    with open(root / "cifar-100-python" / "meta", "rb") as handle:
        meta = pickle.load(handle, encoding="latin1")
    assert meta == {"fine_label_names": list(FINE_NAMES), "coarse_label_names": list(COARSE_NAMES)}


def test_round_trip_is_bit_for_bit(small_cifar):
    root, train, test = small_cifar
    data = load_cifar100(root, download=False)
    assert isinstance(data, ImageDataset)
    for split, (images, fine, coarse) in ((data.train, train), (data.test, test)):
        assert split.images.dtype == np.uint8 and split.images.shape == images.shape
        assert split.labels.dtype == np.int64 and split.coarse_labels.dtype == np.int64
        np.testing.assert_array_equal(split.images, images)
        np.testing.assert_array_equal(split.labels, fine)
        np.testing.assert_array_equal(split.coarse_labels, coarse)
    assert data.fine_names == FINE_NAMES and data.coarse_names == COARSE_NAMES
    assert data.n_classes == 100


def test_real_meta_file_matches_constants_and_writer(tmp_path):
    from npsoftmax.data.download import FILE_MD5, file_md5

    assert file_md5(REAL_META) == FILE_MD5["meta"]  # it is the official file
    assert read_meta_file(REAL_META) == (FINE_NAMES, COARSE_NAMES)
    write_cifar100_files(tmp_path, train=random_split(np.random.default_rng(0), 1),
                         test=random_split(np.random.default_rng(1), 1))
    with open(REAL_META, "rb") as real, open(tmp_path / "cifar-100-python" / "meta", "rb") as ours:
        assert pickle.load(real, encoding="latin1") == pickle.load(ours, encoding="latin1")


def test_custom_names_and_subset_files_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    fine, coarse = np.array([0, 1, 2, 2, 1, 0]), np.array([0, 0, 1, 1, 0, 0])
    write_cifar100_files(tmp_path, train=(images, fine, coarse), test=(images[:2], fine[:2], coarse[:2]),
                         fine_names=("cat", "dog", "car"), coarse_names=("animal", "vehicle"))
    data = load_cifar100(tmp_path, download=False)
    assert data.fine_names == ("cat", "dog", "car") and data.coarse_names == ("animal", "vehicle")
    np.testing.assert_array_equal(data.coarse_of_fine(), [0, 0, 1])


def test_coarse_of_fine_recovers_the_superclass_table(tmp_path):
    fine = np.arange(100).repeat(2)
    images = np.zeros((200, 32, 32, 3), np.uint8)
    write_cifar100_files(tmp_path, train=(images, fine, COARSE_OF_FINE[fine]),
                         test=(images[:3], fine[:3], COARSE_OF_FINE[fine[:3]]))
    np.testing.assert_array_equal(load_cifar100(tmp_path, download=False).coarse_of_fine(), COARSE_OF_FINE)


# --------------------------------------------------------------- damaged / missing files
def test_truncated_pickle_names_the_file(small_cifar):
    root, _, _ = small_cifar
    path = root / "cifar-100-python" / "train"
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(DatasetCorruptError) as info:
        load_cifar100(root, download=False)
    message = str(info.value)
    assert str(path) in message and "truncated or corrupt" in message and "Delete" in message


def test_garbage_and_non_dict_pickles_are_rejected(tmp_path):
    (tmp_path / "garbage").write_bytes(b"\x00not a pickle at all" * 10)
    with pytest.raises(DatasetCorruptError, match="garbage"):
        read_batch_file(tmp_path / "garbage")
    hand_pickle(tmp_path / "alist", [1, 2, 3])
    with pytest.raises(DatasetCorruptError, match="expected a pickled dict"):
        read_batch_file(tmp_path / "alist")


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but any callable outside numpy must be refused


def test_pickle_with_foreign_global_is_refused(tmp_path):
    hand_pickle(tmp_path / "train", {"data": _RunsCode()})
    with pytest.raises(DatasetCorruptError, match="posix.getcwd is not allowed|getcwd is not allowed"):
        read_batch_file(tmp_path / "train")


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.pop("coarse_labels"), "missing \\['coarse_labels'\\]"),
    (lambda d: d.update(data=d["data"].astype(np.int16)), "uint8 array \\(N, 3072\\), found int16"),
    (lambda d: d.update(data=d["data"][:, :3000]), "found uint8 array of shape \\(2, 3000\\)"),
    (lambda d: d.update(fine_labels=[1]), "'fine_labels' as 2 integers"),
])
def test_malformed_batch_dicts_are_rejected(tmp_path, change, expected):
    content = {"data": np.zeros((2, 3072), np.uint8), "fine_labels": [1, 2], "coarse_labels": [0, 1],
               "filenames": ["a", "b"], "batch_label": "x"}
    change(content)
    hand_pickle(tmp_path / "test", content)
    with pytest.raises(DatasetCorruptError, match=expected):
        read_batch_file(tmp_path / "test")


def test_label_outside_meta_names_is_rejected(small_cifar):
    root, (images, fine, coarse), _ = small_cifar
    fine = fine.copy()
    fine[0] = 100
    write_batch_file(root / "cifar-100-python" / "train", images, fine, coarse, n_fine=101)
    with pytest.raises(DatasetCorruptError, match=r"fine_labels in \[0, 100\).*\[\d+, 100\]"):
        load_cifar100(root, download=False)


def test_missing_file_explains_what_and_how(small_cifar):
    root, _, _ = small_cifar
    (root / "cifar-100-python" / "test").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar100(root, download=False)
    message = str(info.value)
    assert "lacks ['test']" in message and "download=False" in message
    assert download_module.CIFAR100_URL in message and download_module.ARCHIVE_MD5 in message
    assert str(root / "cifar-100-python.tar.gz") in message and "169,001,437" in message


def test_offline_env_refuses_to_download_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("NPSOFTMAX_OFFLINE", "1")
    target = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError, match="NPSOFTMAX_OFFLINE"):
        load_cifar100(target, download=True)
    assert not target.exists()


def test_default_data_dir_comes_from_env(small_cifar, monkeypatch):
    root, train, _ = small_cifar
    monkeypatch.setenv("NPSOFTMAX_DATA", str(root))
    np.testing.assert_array_equal(load_cifar100(download=False).train.images, train[0])


# --------------------------------------------------------------- archive on disk
def test_archive_on_disk_is_verified_then_unpacked(small_cifar, tmp_path_factory, monkeypatch):
    source, train, test = small_cifar
    archive, size, md5 = make_cifar100_archive(source)
    target = tmp_path_factory.mktemp("target")
    shutil.copy(archive, target / "cifar-100-python.tar.gz")
    # The real checksums refuse the small archive ...
    with pytest.raises(DatasetCorruptError, match=f"expected {download_module.ARCHIVE_SIZE:,} bytes"):
        load_cifar100(target, download=False)
    assert not (target / "cifar-100-python").exists()
    # ... the small archive's own checksums accept it.
    monkeypatch.setattr(download_module, "ARCHIVE_SIZE", size)
    monkeypatch.setattr(download_module, "ARCHIVE_MD5", md5)
    (target / "cifar-100-python").mkdir()
    shutil.copy(source / "cifar-100-python" / "meta", target / "cifar-100-python" / "meta")  # partial folder
    data = load_cifar100(target, download=False)
    np.testing.assert_array_equal(data.train.images, train[0])
    np.testing.assert_array_equal(data.test.labels, test[1])
    assert sorted(p.name for p in target.iterdir()) == ["cifar-100-python", "cifar-100-python.tar.gz"]


def test_archive_with_wrong_md5_is_refused(small_cifar, tmp_path_factory, monkeypatch):
    source, _, _ = small_cifar
    archive, size, _ = make_cifar100_archive(source)
    target = tmp_path_factory.mktemp("target")
    shutil.copy(archive, target / "cifar-100-python.tar.gz")
    monkeypatch.setattr(download_module, "ARCHIVE_SIZE", size)
    monkeypatch.setattr(download_module, "ARCHIVE_MD5", "0" * 32)
    with pytest.raises(DatasetCorruptError, match="expected md5 0{32}, found md5 [0-9a-f]{32}"):
        load_cifar100(target, download=False)


# --------------------------------------------------------------- containers, subset, digits
def test_containers_validate_their_arrays():
    images = np.zeros((3, 4, 4, 1), np.uint8)
    labels = np.arange(3, dtype=np.int64)
    with pytest.raises(TypeError, match="images must be a uint8 array.*float64"):
        ImageSplit(images.astype(np.float64), labels, labels)
    with pytest.raises(TypeError, match="labels must be an int64 array.*int32"):
        ImageSplit(images, labels.astype(np.int32), labels)
    with pytest.raises(ValueError, match=r"coarse_labels must have shape \(3,\).*\(2,\)"):
        ImageSplit(images, labels, labels[:2])
    with pytest.raises(TypeError, match="images must be uint8, got dtype float32"):
        write_batch_file("unused", np.zeros((1, 32, 32, 3), np.float32), [0], [0])


def test_stratified_indices_keep_class_proportions():
    labels = np.repeat(np.arange(4), [40, 20, 20, 120])  # 200 examples, shares 0.2/0.1/0.1/0.6
    chosen = stratified_indices(labels, 50, np.random.default_rng(1))
    assert chosen.shape == (50,) and chosen.dtype == np.int64
    assert np.all(np.diff(chosen) > 0)  # distinct, increasing
    np.testing.assert_array_equal(np.bincount(labels[chosen], minlength=4), [10, 5, 5, 30])
    again = stratified_indices(labels, 50, np.random.default_rng(1))
    np.testing.assert_array_equal(chosen, again)
    assert not np.array_equal(chosen, stratified_indices(labels, 50, np.random.default_rng(2)))
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 200\], got 201"):
        stratified_indices(labels, 201, 0)


def test_subset_is_stratified_reproducible_and_keeps_rows_intact():
    rng = np.random.default_rng(5)
    n_train, n_test = 300, 60
    labels = np.tile(np.arange(10), n_train // 10)
    images = rng.integers(0, 256, (n_train, 2, 2, 1), dtype=np.uint8)
    # Row id in two pixels (high, low byte), to check images and labels travel together.
    images[:, 0, 0, 0], images[:, 0, 1, 0] = np.divmod(np.arange(n_train), 256)
    split = ImageSplit(images, labels, labels % 2)
    test = ImageSplit(images[:n_test], labels[:n_test], labels[:n_test] % 2)
    data = ImageDataset(split, test, tuple("abcdefghij"), ("even", "odd"))
    small = subset(data, 50, seed=3)
    assert len(small.train) == 50 and len(small.test) == 50
    np.testing.assert_array_equal(np.bincount(small.train.labels), [5] * 10)
    row = 256 * small.train.images[:, 0, 0, 0].astype(np.int64) + small.train.images[:, 0, 1, 0]
    assert np.all(np.diff(row) > 0)  # original order kept
    np.testing.assert_array_equal(small.train.labels, labels[row])
    np.testing.assert_array_equal(small.train.coarse_labels, labels[row] % 2)
    np.testing.assert_array_equal(subset(data, 50, seed=3).train.images, small.train.images)
    assert len(subset(data, 20, n_test=7).test) == 7


def test_digits_load_offline_with_a_seeded_stratified_split():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    reference = load_digits()
    data = load_digits_images(test_fraction=0.2, seed=0)
    assert data.train.images.shape[1:] == (8, 8, 1) and data.train.images.dtype == np.uint8
    assert len(data.train) + len(data.test) == 1797 and len(data.test) == round(0.2 * 1797)
    # 0..16 ink counts scaled to 0..255: 0 -> 0, 16 -> 255, 8 -> 128 (127.5 rounds to even).
    expected = np.rint(reference.images * (255 / 16)).astype(np.uint8)
    both = np.concatenate([data.train.images, data.test.images])[..., 0]
    assert both.min() == 0 and both.max() == 255
    labels = np.concatenate([data.train.labels, data.test.labels])
    # Same (image, label) pairs as scikit-learn's, only reordered into the two splits.
    assert sorted(zip((image.tobytes() for image in both), labels.tolist())) == \
        sorted(zip((image.tobytes() for image in expected), reference.target.tolist()))
    # Stratified: every digit's test share is within one image of 20 %.
    share = np.bincount(data.test.labels, minlength=10) - 0.2 * np.bincount(reference.target)
    assert np.all(np.abs(share) <= 1)
    np.testing.assert_array_equal(data.train.coarse_labels, data.train.labels % 2)
    assert data.fine_names == tuple("0123456789") and data.coarse_names == ("even", "odd")
    np.testing.assert_array_equal(load_digits_images(seed=0).test.images, data.test.images)
    assert not np.array_equal(load_digits_images(seed=1).test.labels, data.test.labels)
