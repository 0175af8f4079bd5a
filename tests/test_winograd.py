"""Winograd's F(2x2, 3x3) convolution (npsoftmax.winograd): tile transforms, algorithm choice, layer.

The forward and the numerical-gradient checks of the whole convolution are in test_functional.py
(``WINOGRAD_GEOMETRIES``, both algorithms against the loop oracle). Here: the four compiled tile
transforms against their NumPy references and against the definition of an adjoint, the
filter transforms against the 1-D formulas, the choice of algorithm and its errors, the layer,
the thread pool, and the pure-NumPy fallback.
"""

import numpy as np
import pytest

from naive_reference import naive_conv
from npsoftmax import functional as F
from npsoftmax import kernels, parallel, winograd
from npsoftmax import layers as L

needs_extension = pytest.mark.skipif(not kernels.HAVE_EXTENSION, reason="the Cython extension is not built")

# (n, C, H, W, pad): odd and even sizes, every padding, batch 1, one channel, images wider than tall
TRANSFORM_SHAPES = [
    pytest.param((2, 3, 5, 7, 1), id="odd-pad1"),
    pytest.param((1, 1, 4, 4, 0), id="batch1-channel1-pad0"),
    pytest.param((3, 5, 6, 5, 2), id="pad2"),
    pytest.param((1, 2, 3, 3, 0), id="one-tile"),
    pytest.param((2, 4, 9, 16, 1), id="wide"),
]


def slabs_of(array):
    """A kernels.winograd_slabs copy of a (16, R, T) array (padded between slabs, as the layer uses)."""
    out = kernels.winograd_slabs(array.shape[1], array.shape[2], array.dtype)
    out[...] = array
    return out


@needs_extension
@pytest.mark.parametrize("shape", TRANSFORM_SHAPES)
def test_compiled_tile_transforms_match_the_numpy_references(shape, rng, dtype):
    n, C, H, W, pad = shape
    F_out = 3
    TH, TW = kernels.winograd_tiles(H, W, pad)
    T, OH, OW = n * TH * TW, H + 2 * pad - 2, W + 2 * pad - 2
    x = rng.standard_normal((n, C, H, W)).astype(dtype)

    # input transform, written at an offset into a bigger buffer: nothing else is touched
    V = kernels.winograd_slabs(C, T + 9, dtype)
    V[...] = 7
    kernels.winograd_input_transform(x, pad, V, first_tile=4)
    np.testing.assert_array_equal(V[:, :, 4:4 + T], kernels.winograd_input_transform_numpy(x, pad))
    assert np.all(V[:, :, :4] == 7) and np.all(V[:, :, 4 + T:] == 7)

    M = rng.standard_normal((16, F_out, T)).astype(dtype)
    bias = rng.standard_normal(F_out).astype(dtype)
    out = np.empty((n, F_out, OH, OW), dtype)
    kernels.winograd_output_transform(slabs_of(M), out, bias)
    np.testing.assert_allclose(out, kernels.winograd_output_transform_numpy(M, n, OH, OW, bias),
                               rtol=1e-6, atol=1e-6)

    dout = rng.standard_normal((n, F_out, OH, OW)).astype(dtype)
    dM, dbias = kernels.winograd_slabs(F_out, T, dtype), np.empty(F_out, dtype)
    kernels.winograd_output_gradient(dout, dM, dbias)
    expected_dM, expected_dbias = kernels.winograd_output_gradient_numpy(dout)
    np.testing.assert_array_equal(dM, expected_dM)
    np.testing.assert_allclose(dbias, expected_dbias, rtol=1e-6, atol=1e-5)

    dV = rng.standard_normal((16, C, T)).astype(dtype)
    dx = np.full((n, C, H, W), np.nan, dtype)  # every pixel must be overwritten
    kernels.winograd_input_gradient(slabs_of(dV), pad, dx)
    np.testing.assert_allclose(dx, kernels.winograd_input_gradient_numpy(dV, (n, C, H, W), pad),
                               rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape", TRANSFORM_SHAPES)
def test_gradient_transforms_are_the_adjoints_of_the_forward_transforms(shape, rng):
    """<T(a), b> == <a, T*(b)> for random a, b: the backward transforms are exactly the transposes
    of the forward ones (the chain rule for a linear map), checked on the dispatching functions."""
    n, C, H, W, pad = shape
    TH, TW = kernels.winograd_tiles(H, W, pad)
    T, OH, OW = n * TH * TW, H + 2 * pad - 2, W + 2 * pad - 2
    x = rng.standard_normal((n, C, H, W))
    dV = rng.standard_normal((16, C, T))
    V = kernels.winograd_input_transform(x, pad, kernels.winograd_slabs(C, T, np.float64))
    dx = kernels.winograd_input_gradient(slabs_of(dV), pad, np.empty_like(x))
    np.testing.assert_allclose(np.sum(V * dV), np.sum(x * dx), rtol=1e-12)

    M = rng.standard_normal((16, 2, T))
    dout = rng.standard_normal((n, 2, OH, OW))
    out = kernels.winograd_output_transform(slabs_of(M), np.empty((n, 2, OH, OW)))
    dM, dbias = kernels.winograd_output_gradient(dout, kernels.winograd_slabs(2, T, np.float64), np.empty(2))
    np.testing.assert_allclose(np.sum(out * dout), np.sum(M * dM), rtol=1e-12)
    np.testing.assert_allclose(dbias, dout.sum(axis=(0, 2, 3)), rtol=1e-12)


def test_filter_transform_gives_the_one_dimensional_formulas_and_its_adjoint(rng):
    """G g = (g0, (g0 + g1 + g2)/2, (g0 - g1 + g2)/2, g2) along each axis (module docstring)."""
    w = rng.standard_normal((2, 3, 3, 3))
    U = winograd.filter_transform(w).reshape(4, 4, 2, 3)
    Gg = np.stack([w[..., 0, :], (w[..., 0, :] + w[..., 1, :] + w[..., 2, :]) / 2,
                   (w[..., 0, :] - w[..., 1, :] + w[..., 2, :]) / 2, w[..., 2, :]], axis=-2)  # (2, 3, 4, 3)
    GgGt = np.stack([Gg[..., 0], (Gg[..., 0] + Gg[..., 1] + Gg[..., 2]) / 2,
                     (Gg[..., 0] - Gg[..., 1] + Gg[..., 2]) / 2, Gg[..., 2]], axis=-1)  # (2, 3, 4, 4)
    np.testing.assert_allclose(U, GgGt.transpose(2, 3, 0, 1), rtol=1e-14, atol=1e-14)
    dU = rng.standard_normal((16, 2, 3))
    np.testing.assert_allclose(np.sum(winograd.filter_transform(w) * dU),
                               np.sum(w * winograd.filter_transform_backward(dU)), rtol=1e-12)


def test_one_output_tile_by_hand():
    """A 4x4 image of ones, 3x3 filter of ones, no padding: every output is 9 (the minimal case,
    where F(2x2, 3x3) computes exactly one tile)."""
    x = np.ones((1, 1, 4, 4))
    w = np.ones((1, 1, 3, 3))
    out, cache = F.conv_forward(x, w, None, algorithm="winograd")
    np.testing.assert_allclose(out, np.full((1, 1, 2, 2), 9.0), rtol=1e-15)
    dx, dw, db = F.conv_backward(np.ones((1, 1, 2, 2)), cache)
    # each input pixel is read by as many of the 4 windows as contain it
    np.testing.assert_allclose(dx[0, 0], [[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]], rtol=1e-15)
    np.testing.assert_allclose(dw, np.full((1, 1, 3, 3), 4.0), rtol=1e-15)
    assert db is None


def test_auto_picks_winograd_for_3x3_stride_1_with_enough_channels():
    C = winograd.MIN_CHANNELS
    assert F.conv_algorithm((8, C, 3, 3), 1) == "winograd"
    assert F.conv_algorithm((8, C - 1, 3, 3), 1) == "im2col"  # a first layer's 3 channels
    assert F.conv_algorithm((8, C, 3, 3), 2) == "im2col"
    assert F.conv_algorithm((8, C, 5, 5), 1) == "im2col"
    size = winograd.MIN_OUTPUT_SIZE
    assert F.conv_algorithm((8, C, 3, 3), 1, output_size=(size, size)) == "winograd"
    assert F.conv_algorithm((8, C, 3, 3), 1, output_size=(size, size - 1)) == "im2col"  # tiny images
    assert F.conv_algorithm((8, C, 3, 3), 1, "winograd", output_size=(2, 2)) == "winograd"
    assert F.conv_algorithm((8, 1, 3, 3), 1, "winograd") == "winograd"
    assert F.conv_algorithm((8, C, 3, 3), 1, "im2col") == "im2col"


def test_layer_and_functional_choose_by_the_output_size(rng):
    """auto in a layer: Winograd for 16 channels of 8x8 outputs, im2col for 4x4 (what it keeps says which)."""
    layer = L.Conv2d(16, 4, 3, pad=1, rng=rng)
    layer.forward(rng.standard_normal((2, 16, 8, 8)).astype(np.float32))
    assert list(layer._buffers) == ["tiles"] and isinstance(layer._cache, winograd.WinogradCache)
    layer.forward(rng.standard_normal((2, 16, 4, 4)).astype(np.float32))
    assert list(layer._buffers) == ["cols"] and isinstance(layer._cache, F.ConvCache)


def test_bad_algorithm_choices_are_clear_errors(rng):
    x, w = rng.standard_normal((1, 2, 6, 6)), rng.standard_normal((2, 2, 3, 3))
    with pytest.raises(ValueError, match="algorithm must be one of"):
        F.conv_forward(x, w, None, algorithm="fft")
    with pytest.raises(ValueError, match=r"needs a 3x3 kernel and stride 1, got kernel \(3, 3\) and stride 2"):
        F.conv_forward(x, w, None, stride=2, algorithm="winograd")
    with pytest.raises(ValueError, match=r"got kernel \(5, 3\)"):
        F.conv_forward(x, rng.standard_normal((2, 2, 5, 3)), None, algorithm="winograd")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        L.Conv2d(2, 2, 3, rng=rng, algorithm="direct")


def test_buffer_of_the_wrong_layout_is_refused(rng):
    x, w = rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3))
    shape = winograd.buffer_shape(x.shape, 1)
    with pytest.raises(ValueError, match="cols_out must be a float64 array of shape"):
        F.conv_forward(x, w, None, pad=1, cols_out=np.empty(shape[::-1]), algorithm="winograd")
    with pytest.raises(ValueError, match="16 C-contiguous slabs"):
        F.conv_forward(x, w, None, pad=1, cols_out=np.empty(shape, np.float32), algorithm="winograd")
    strided = np.empty((16, shape[1], 2 * shape[2]))[:, :, ::2]
    with pytest.raises(ValueError, match="strides"):
        F.conv_forward(x, w, None, pad=1, cols_out=strided, algorithm="winograd")
    flat = np.empty(shape[1] * shape[2] + 15)  # 16 "slabs" one element apart: they would overlap
    overlapping = np.lib.stride_tricks.as_strided(flat, shape, (8, shape[2] * 8, 8))
    with pytest.raises(ValueError, match="strides"):
        F.conv_forward(x, w, None, pad=1, cols_out=overlapping, algorithm="winograd")
    with pytest.raises(ValueError, match="16 slabs of C-contiguous matrices"):
        kernels.winograd_input_transform(x, 1, overlapping)


def test_inference_forward_recomputes_the_tiles_for_a_backward(rng):
    """keep_cols=False keeps x, not the tiles: a backward then recomputes them, same gradients."""
    x, w, b = rng.standard_normal((3, 2, 5, 6)), rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(4)
    out_kept, kept = F.conv_forward(x, w, b, pad=1, algorithm="winograd")
    out_lean, lean = F.conv_forward(x, w, b, pad=1, keep_cols=False, algorithm="winograd")
    assert kept.V is not None and lean.V is None and lean.x is x
    np.testing.assert_array_equal(out_kept, out_lean)
    dout = rng.standard_normal(out_kept.shape)
    for from_kept, from_lean in zip(F.conv_backward(dout, kept), F.conv_backward(dout, lean)):
        np.testing.assert_array_equal(from_kept, from_lean)


def test_backward_rejects_an_upstream_gradient_of_the_wrong_shape(rng):
    x, w = rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3))
    out, cache = F.conv_forward(x, w, None, algorithm="winograd")
    with pytest.raises(ValueError, match=r"\(2, 3, 3, 3\)"):
        F.conv_backward(np.zeros((2, 3, 5, 5)), cache)


def test_layer_trains_the_same_with_either_algorithm(rng):
    """Two Conv2d layers with the same weights, one per algorithm, float64: same outputs and
    gradients over two steps (the layer keeps and reuses its tile buffer between steps)."""
    layers = {algorithm: L.Conv2d(16, 5, 3, pad=1, rng=np.random.default_rng(0), dtype=np.float64,
                                  algorithm=algorithm) for algorithm in ("im2col", "winograd")}
    for step in range(2):
        x = rng.standard_normal((3, 16, 7, 6))
        dout = rng.standard_normal((3, 5, 7, 6))
        results = {}
        for algorithm, layer in layers.items():
            out = layer.forward(x)
            dx = layer.backward(dout)
            results[algorithm] = (out, dx, layer.grads["w"], layer.grads["b"])
        for a, b in zip(results["im2col"], results["winograd"]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert list(layers["winograd"]._buffers) == ["tiles"] and list(layers["im2col"]._buffers) == ["cols"]
    assert "algorithm='winograd'" in repr(layers["winograd"]) and "algorithm" not in repr(
        L.Conv2d(16, 5, 3, rng=rng))


def test_float32_result_stays_close_to_the_float64_loops(rng):
    """Rounding: the transforms add up to 9 values per entry; on O(1) data with 32 channels the
    float32 result stays within 2e-5 of the exact convolution, as close as im2col's."""
    x = rng.standard_normal((2, 32, 8, 8))
    w = rng.standard_normal((4, 32, 3, 3)) / np.sqrt(32 * 9)
    exact = naive_conv(x, w, None, 1, 1)
    errors = {}
    for algorithm in ("im2col", "winograd"):
        out, _ = F.conv_forward(x.astype(np.float32), w.astype(np.float32), None, pad=1, algorithm=algorithm)
        errors[algorithm] = np.abs(out - exact).max()
    assert errors["winograd"] < 2e-5, errors
    assert errors["winograd"] < 4 * errors["im2col"] + 1e-6, errors


def test_same_answers_on_the_thread_pool(rng):
    """Chunks on a 3-thread pool: the same convolution and gradients as without a pool."""
    x, w, b = rng.standard_normal((11, 16, 6, 5)), rng.standard_normal((4, 16, 3, 3)), rng.standard_normal(4)
    dout = rng.standard_normal((11, 4, 6, 5))

    def run():
        out, cache = F.conv_forward(x, w, b, pad=1, algorithm="winograd")
        return (out, *F.conv_backward(dout, cache))

    alone = run()
    saved = (F.CONV_CHUNK_BYTES, parallel.get_threads())
    try:
        F.CONV_CHUNK_BYTES = 1  # one image per chunk: 11 chunks on 3 threads
        parallel.set_threads(3)
        pooled = run()
    finally:
        F.CONV_CHUNK_BYTES = saved[0]
        parallel.set_threads(saved[1])
    for a, b_ in zip(alone, pooled):
        np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-12)


def test_numpy_fallback_gives_the_same_convolution(rng, monkeypatch):
    """Without the extension the NumPy references run the same algorithm."""
    x, w, b = rng.standard_normal((2, 3, 5, 6)), rng.standard_normal((2, 3, 3, 3)), rng.standard_normal(2)
    dout = rng.standard_normal((2, 2, 5, 6))
    out, cache = F.conv_forward(x, w, b, pad=1, algorithm="winograd")
    compiled = (out, *F.conv_backward(dout, cache))
    monkeypatch.setattr(kernels, "_extension", None)
    out, cache = F.conv_forward(x, w, b, pad=1, algorithm="winograd")
    fallback = (out, *F.conv_backward(dout, cache))
    for a, b_ in zip(compiled, fallback):
        np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fallback[0], naive_conv(x, w, b, 1, 1), rtol=1e-12, atol=1e-12)


def test_slabs_are_padded_apart_and_contiguous_inside():
    slabs = kernels.winograd_slabs(32, 1024, np.float32)
    assert slabs.shape == (16, 32, 1024) and slabs.strides[1:] == (4096, 4)
    assert slabs.strides[0] % 4096 == 128  # 32 elements past a multiple of 1024: not 4 KiB apart
    assert slabs.ctypes.data % 4096 == 0  # large: page-aligned, like kernels.empty
