"""Channel statistics, normalisation to NCHW float and the crop / flip augmentations."""

import numpy as np
import pytest

from npsoftmax.data import transforms
from npsoftmax.data.transforms import augment, channel_mean_std, normalize, random_crop, random_flip

DTYPES = [np.float32, np.float64]


def uint8_images(seed, shape):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# --------------------------------------------------------------- statistics
def test_stats_by_hand():
    # One channel holding 0 and 255: mean 0.5, std 0.5 on the 0..1 scale.
    mean, std = channel_mean_std(np.array([[[[0], [255]]]], dtype=np.uint8))
    np.testing.assert_array_equal(mean, [0.5])
    np.testing.assert_array_equal(std, [0.5])
    # Two channels over three pixels: (0, 51, 102) and (255, 255, 255).
    images = np.array([[[[0, 255], [51, 255], [102, 255]]]], dtype=np.uint8)  # (1, 1, 3, 2)
    mean, std = channel_mean_std(images)
    np.testing.assert_allclose(mean, [0.2, 1.0], rtol=1e-15)
    np.testing.assert_allclose(std, [np.sqrt(2 / 3) * 0.2, 0.0], rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("chunk", [2, 4096])
def test_stats_match_float64_numpy_on_odd_shapes(monkeypatch, chunk):
    monkeypatch.setattr(transforms, "_STATS_CHUNK", chunk)  # several chunks, and one
    images = uint8_images(0, (7, 5, 3, 4))
    mean, std = channel_mean_std(images)
    as_float = images.astype(np.float64) / 255
    assert mean.shape == std.shape == (4,) and mean.dtype == std.dtype == np.float64
    np.testing.assert_allclose(mean, as_float.mean(axis=(0, 1, 2)), rtol=1e-13)
    np.testing.assert_allclose(std, as_float.std(axis=(0, 1, 2)), rtol=1e-12)


# --------------------------------------------------------------- normalize
@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-6), (np.float64, 1e-13)])
def test_normalize_matches_the_formula_and_layout(dtype, rtol):
    images = uint8_images(1, (3, 5, 4, 3))  # H != W so a swapped axis shows
    mean, std = np.array([0.3, 0.5, 0.7]), np.array([0.2, 0.25, 0.1])
    out = normalize(images, mean, std, dtype=dtype)
    assert out.shape == (3, 3, 5, 4) and out.dtype == dtype and out.flags.c_contiguous
    expected = ((images.astype(np.float64) / 255 - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=rtol)
    # Pixel (n=2, row 4, column 1), channel 1, by hand.
    assert np.isclose(out[2, 1, 4, 1], (images[2, 4, 1, 1] / 255 - 0.5) / 0.25, rtol=rtol)


def test_normalized_training_set_has_zero_mean_unit_std():
    images = uint8_images(2, (20, 6, 6, 3))
    out = normalize(images, *channel_mean_std(images), dtype=np.float64)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1, rtol=1e-12)


def test_normalize_rejects_bad_input():
    images = uint8_images(3, (2, 4, 4, 3))
    with pytest.raises(TypeError, match="images must be a uint8 array.*float32"):
        normalize(images.astype(np.float32), np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\).*\(1,\)"):
        normalize(images, np.zeros(1), np.ones(3))
    with pytest.raises(ValueError, match="std must be positive"):
        normalize(images, np.zeros(3), np.array([1.0, 0.0, 1.0]))
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got int32"):
        normalize(images, np.zeros(3), np.ones(3), dtype=np.int32)


# --------------------------------------------------------------- random_crop
@pytest.mark.parametrize("dtype", DTYPES)
def test_crop_keeps_shape_dtype_and_input(dtype):
    x = np.random.default_rng(4).standard_normal((5, 2, 7, 4)).astype(dtype)
    before = x.copy()
    out = random_crop(x, pad=3, rng=np.random.default_rng(0))
    assert out.shape == x.shape and out.dtype == dtype
    np.testing.assert_array_equal(x, before)


def test_crop_with_zero_pad_is_identity():
    x = np.random.default_rng(5).standard_normal((3, 1, 5, 6))
    out = random_crop(x, pad=0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out, x)
    assert out is not x


def test_every_crop_is_a_window_of_the_zero_padded_image_and_all_offsets_occur():
    pad, n = 2, 300
    # Positive values so the zero padding is recognisable.
    x = np.random.default_rng(6).uniform(1, 2, (n, 3, 5, 4))
    out = random_crop(x, pad=pad, rng=np.random.default_rng(1))
    padded = np.zeros((n, 3, 5 + 2 * pad, 4 + 2 * pad))
    padded[:, :, pad:-pad, pad:-pad] = x
    seen = set()
    for i in range(n):  # the oracle loops; the code under test does not
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if np.array_equal(out[i], padded[i, :, dy:dy + 5, dx:dx + 4])]
        assert len(matches) == 1, f"image {i} is not a window of its padded input"
        seen.add(matches[0])
    assert len(seen) == (2 * pad + 1) ** 2


def test_crop_is_reproducible_from_the_seed():
    x = np.random.default_rng(7).standard_normal((16, 3, 8, 8)).astype(np.float32)
    first = random_crop(x, rng=np.random.default_rng(42))
    np.testing.assert_array_equal(first, random_crop(x, rng=np.random.default_rng(42)))
    assert not np.array_equal(first, random_crop(x, rng=np.random.default_rng(43)))


def test_crop_rejects_bad_arguments():
    x = np.zeros((1, 1, 3, 3))
    with pytest.raises(ValueError, match="pad must be a non-negative int, got -1"):
        random_crop(x, pad=-1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"x must be an array of shape \(N, C, H, W\).*\(3, 3\)"):
        random_crop(x[0, 0], rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        random_crop(x, rng=0)


# --------------------------------------------------------------- random_flip
@pytest.mark.parametrize("dtype", DTYPES)
def test_flip_twice_with_the_same_draws_is_identity(dtype):
    x = np.random.default_rng(8).standard_normal((9, 2, 3, 5)).astype(dtype)
    once = random_flip(x, rng=np.random.default_rng(3))
    twice = random_flip(once, rng=np.random.default_rng(3))
    assert once.dtype == dtype
    np.testing.assert_array_equal(twice, x)


def test_flip_mirrors_columns_of_a_random_half():
    x = np.random.default_rng(9).standard_normal((400, 2, 3, 5))
    before = x.copy()
    out = random_flip(x, rng=np.random.default_rng(4))
    np.testing.assert_array_equal(x, before)
    unchanged = np.all(out == x, axis=(1, 2, 3))
    mirrored = np.all(out == x[:, :, :, ::-1], axis=(1, 2, 3))
    assert np.all(unchanged ^ mirrored)  # each image is exactly one of the two
    assert 140 < mirrored.sum() < 260   # Binomial(400, 0.5): mean 200, sd 10
    np.testing.assert_array_equal(random_flip(x, rng=np.random.default_rng(0), probability=1.0),
                                  x[:, :, :, ::-1])
    np.testing.assert_array_equal(random_flip(x, rng=np.random.default_rng(0), probability=0.0), x)


def test_augment_is_seeded_and_shape_preserving():
    x = np.random.default_rng(10).standard_normal((6, 3, 8, 8)).astype(np.float32)
    first = augment(x, rng=np.random.default_rng(5))
    assert first.shape == x.shape and first.dtype == np.float32
    np.testing.assert_array_equal(first, augment(x, rng=np.random.default_rng(5)))
