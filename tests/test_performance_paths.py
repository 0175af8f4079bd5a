"""The fast paths of a training step give the same numbers as the plain NumPy references.

* every compiled kernel (max pool, ReLU backward, batch norm, the conv layout
  swap) against its NumPy reference in ``npsoftmax.kernels`` and, for the
  forward passes, against the explicit loops of ``naive_reference``;
* a float32 training step keeps every activation, gradient, parameter and
  buffer float32 (float64 stays float64);
* the reused im2col / dcols buffers of ``Conv2d`` never leak into results:
  repeated steps, changing batch sizes and explicit ``cols_out``/``dcols_out``
  agree with a layer that allocates fresh arrays;
* the profiler restores what it wraps and attributes time to the right rows.

No test asserts on wall time.
"""

import numpy as np
import pytest

from naive_reference import naive_conv, naive_max_pool, naive_relu
from npsoftmax import functional as F
from npsoftmax import kernels
from npsoftmax import layers as L
from npsoftmax.heads import Tree, balanced_tree
from npsoftmax.models import build_model
from npsoftmax.optim import SGD
from npsoftmax.profiler import Profiler, conv_gemm_flops, profile, section

compiled_only = pytest.mark.skipif(not kernels.HAVE_EXTENSION, reason="the Cython extension is not built")


def tolerance(dtype):
    """Kernel vs reference: the same formula, only the summation order differs."""
    return {"rtol": 2e-5, "atol": 2e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-13}


# ----------------------------------------------------------------------------
# Max pooling, windows that tile the input
# ----------------------------------------------------------------------------
@compiled_only
@pytest.mark.parametrize("shape, size", [((2, 3, 4, 6), 2), ((1, 1, 6, 3), 3), ((3, 2, 2, 2), 2), ((2, 2, 5, 5), 1)])
def test_tiled_max_pool_kernel_matches_the_reshape_reference_and_loops(shape, size, rng, dtype):
    # Small integers make ties common: the kernel must pick the same (first) maximum.
    x = rng.integers(-3, 4, size=shape).astype(dtype)
    out, argmax = kernels.max_pool_tiled_forward(x, size)
    reference_out, reference_argmax = kernels.max_pool_tiled_forward_numpy(x, size)
    assert out.dtype == dtype and argmax.dtype == np.int32
    np.testing.assert_array_equal(out, reference_out)
    np.testing.assert_array_equal(argmax, reference_argmax)
    np.testing.assert_array_equal(out, naive_max_pool(x, size, size))

    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = kernels.max_pool_tiled_backward(dout, argmax, size)
    assert dx.dtype == dtype and dx.shape == shape
    np.testing.assert_array_equal(dx, kernels.max_pool_tiled_backward_numpy(dout, reference_argmax, size))
    # Every window passes its whole gradient on to exactly one element.
    np.testing.assert_allclose(dx.sum(), dout.sum(), rtol=1e-5)
    assert np.count_nonzero(dx) == np.count_nonzero(dout)


@compiled_only
def test_tiled_max_pool_kernel_treats_nan_as_the_maximum_like_numpy_argmax(dtype):
    x = np.array([[[[1.0, np.nan, 7.0, 2.0], [np.nan, 5.0, 3.0, -1.0]]]], dtype=dtype)
    out, argmax = kernels.max_pool_tiled_forward(x, 2)
    reference_out, reference_argmax = kernels.max_pool_tiled_forward_numpy(x, 2)
    np.testing.assert_array_equal(argmax, reference_argmax)  # [[1, 0]]: the first NaN, then the 7
    np.testing.assert_array_equal(argmax, [[[[1, 0]]]])
    np.testing.assert_array_equal(out, reference_out)  # assert_array_equal treats NaN == NaN


def test_max_pool_layer_hand_computed_case(dtype):
    x = np.array([[[[1, 9, 2, 2], [3, 4, 8, 0], [5, 5, 0, -1], [5, 6, -2, -3]]]], dtype=dtype)
    layer = L.MaxPool2d(2)
    np.testing.assert_array_equal(layer.forward(x), [[[[9, 8], [6, 0]]]])
    dx = layer.backward(np.array([[[[1, 2], [3, 4]]]], dtype=dtype))
    expected = [[[[0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 4, 0], [0, 3, 0, 0]]]]
    np.testing.assert_array_equal(dx, expected)
    assert dx.dtype == dtype


# ----------------------------------------------------------------------------
# ReLU backward
# ----------------------------------------------------------------------------
def test_relu_backward_kernel_matches_the_mask_formula(rng, dtype):
    x = rng.standard_normal((3, 4, 5, 7)).astype(dtype)
    x[0, 0, 0, :3] = [0.0, -0.0, np.nan]  # the derivative at 0 (and for NaN) is 0, as in PyTorch
    dout = rng.standard_normal(x.shape).astype(dtype)
    out, cache = F.relu_forward(x)
    dx = F.relu_backward(dout, cache)
    assert dx.dtype == dtype and dx.shape == x.shape
    np.testing.assert_array_equal(dx, np.where(x > 0, dout, 0))
    np.testing.assert_array_equal(out[1:], naive_relu(x[1:]))


def test_relu_backward_accepts_non_contiguous_arrays(rng, dtype):
    x = rng.standard_normal((6, 8)).astype(dtype)[:, ::2]
    dout = rng.standard_normal((6, 8)).astype(dtype)[::1, 1::2]
    _, cache = F.relu_forward(x)
    np.testing.assert_array_equal(F.relu_backward(dout, cache), np.where(x > 0, dout, 0))


# ----------------------------------------------------------------------------
# Spatial batch norm
# ----------------------------------------------------------------------------
def batchnorm_inputs(rng, dtype, shape=(4, 3, 5, 3)):
    C = shape[1]
    # A large common offset: E[x^2] - E[x]^2 would cancel catastrophically in float32.
    x = (rng.standard_normal(shape) * 0.5 + 1000.0).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return x, gamma, beta


@compiled_only
def test_batchnorm_statistics_kernel_is_accurate_with_a_large_mean(rng, dtype):
    x, _, _ = batchnorm_inputs(rng, dtype)
    mean, var = kernels.batchnorm_statistics(x)
    assert mean.dtype == dtype and var.dtype == dtype and mean.shape == (3,)
    exact = x.astype(np.float64)
    np.testing.assert_allclose(mean, exact.mean(axis=(0, 2, 3)), rtol=1e-7 if dtype == np.float32 else 1e-14)
    # Variance 0.25 against a mean of 1000: relative accuracy only from the two-pass form.
    np.testing.assert_allclose(var, exact.var(axis=(0, 2, 3)), rtol=1e-5 if dtype == np.float32 else 1e-12)


@compiled_only
@pytest.mark.parametrize("shape", [(4, 3, 5, 3), (1, 2, 1, 7), (2, 5, 1, 1)])
def test_batchnorm_kernels_match_the_numpy_references(shape, rng, dtype):
    x, gamma, beta = batchnorm_inputs(rng, dtype, shape)
    x -= dtype.type(1000.0)
    mean, var = kernels.batchnorm_statistics(x)
    reference_mean, reference_var = kernels.batchnorm_statistics_numpy(x)
    np.testing.assert_allclose(mean, reference_mean, **tolerance(dtype))
    np.testing.assert_allclose(var, reference_var, **tolerance(dtype))

    inv_std = (1.0 / np.sqrt(var + 1e-5)).astype(dtype)
    out = kernels.batchnorm_normalize(x, mean, inv_std, gamma, beta)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, kernels.batchnorm_normalize_numpy(x, mean, inv_std, gamma, beta),
                               **tolerance(dtype))

    dout = rng.standard_normal(shape).astype(dtype)
    for training in (True, False):
        got = kernels.batchnorm_backward(dout, x, mean, inv_std, gamma, training)
        expected = kernels.batchnorm_backward_numpy(dout, x, mean, inv_std, gamma, training)
        for name, value, reference in zip(("dx", "dgamma", "dbeta"), got, expected):
            assert value.dtype == dtype, name
            np.testing.assert_allclose(value, reference, err_msg=name, **tolerance(dtype))


def test_spatial_batchnorm_backward_matches_the_row_formulation(rng, dtype):
    """The NCHW kernels against batchnorm_backward on (N*H*W, C) rows (an independent layout)."""
    x, gamma, beta = batchnorm_inputs(rng, dtype, (3, 4, 2, 5))
    x -= dtype.type(1000.0)
    dout = rng.standard_normal(x.shape).astype(dtype)
    for training in (True, False):
        buffers = (np.zeros(4, dtype=dtype), np.ones(4, dtype=dtype))
        out, cache = F.spatial_batchnorm_forward(x, gamma, beta, *buffers, training=training)
        dx, dgamma, dbeta = F.spatial_batchnorm_backward(dout, cache)
        rows = x.transpose(0, 2, 3, 1).reshape(-1, 4)
        row_buffers = (np.zeros(4, dtype=dtype), np.ones(4, dtype=dtype))
        out_rows, row_cache = F.batchnorm_forward(rows, gamma, beta, *row_buffers, training=training)
        dx_rows, dgamma_rows, dbeta_rows = F.batchnorm_backward(dout.transpose(0, 2, 3, 1).reshape(-1, 4), row_cache)
        np.testing.assert_allclose(out, out_rows.reshape(3, 2, 5, 4).transpose(0, 3, 1, 2), **tolerance(dtype))
        np.testing.assert_allclose(dx, dx_rows.reshape(3, 2, 5, 4).transpose(0, 3, 1, 2), **tolerance(dtype))
        np.testing.assert_allclose(dgamma, dgamma_rows, **tolerance(dtype))
        np.testing.assert_allclose(dbeta, dbeta_rows, **tolerance(dtype))
        for buffer, row_buffer in zip(buffers, row_buffers):
            np.testing.assert_allclose(buffer, row_buffer, **tolerance(dtype))


# ----------------------------------------------------------------------------
# The layout swap around the conv GEMM
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_swap_leading_axes_matches_a_transpose(with_bias, rng, dtype):
    source = rng.standard_normal((3, 5, 7)).astype(dtype)
    bias = rng.standard_normal(3).astype(dtype) if with_bias else None
    destination = np.full((5, 3, 7), np.nan, dtype=dtype)
    assert kernels.swap_leading_axes(source, destination, bias) is destination
    expected = source.transpose(1, 0, 2) + (0 if bias is None else bias[None, :, None])
    np.testing.assert_array_equal(destination, expected.astype(dtype))


def test_swap_leading_axes_rejects_a_wrong_destination(rng):
    source = rng.standard_normal((3, 5, 7)).astype(np.float32)
    with pytest.raises(ValueError, match=r"destination .* shape \(5, 3, 7\)"):
        kernels.swap_leading_axes(source, np.empty((3, 5, 7), dtype=np.float32))
    with pytest.raises(ValueError, match="destination"):
        kernels.swap_leading_axes(source, np.empty((5, 3, 7), dtype=np.float64))
    with pytest.raises(ValueError, match="bias"):
        kernels.swap_leading_axes(source, np.empty((5, 3, 7), dtype=np.float32), np.zeros(5, dtype=np.float32))


# ----------------------------------------------------------------------------
# Conv buffers: reuse never corrupts a result
# ----------------------------------------------------------------------------
def fresh_conv_step(layer, x, dout):
    """What the layer should compute, from functional calls that allocate everything afresh."""
    out, cache = F.conv_forward(x, layer.params["w"], layer.params.get("b"), layer.stride, layer.pad)
    dx, dw, db = F.conv_backward(dout, cache)
    return out, dx, dw, db


@pytest.mark.parametrize("batch_sizes", [(4, 4, 4), (4, 2, 5)], ids=["same_batch", "changing_batch"])
def test_conv_layer_buffer_reuse_matches_fresh_allocations(batch_sizes, rng, dtype):
    layer = L.Conv2d(3, 4, (3, 2), stride=1, pad=1, rng=rng, dtype=dtype)
    layer.params["b"][...] = rng.standard_normal(4)
    kept = []
    for N in batch_sizes:
        x = rng.standard_normal((N, 3, 5, 6)).astype(dtype)
        out = layer.forward(x)
        dout = rng.standard_normal(out.shape).astype(dtype)
        dx = layer.backward(dout)
        expected = fresh_conv_step(layer, x, dout)
        np.testing.assert_array_equal(out, expected[0])
        np.testing.assert_array_equal(dx, expected[1])
        np.testing.assert_array_equal(layer.grads["w"], expected[2])
        np.testing.assert_array_equal(layer.grads["b"], expected[3])
        kept.append((out, out.copy(), dx, dx.copy()))
    # Returned arrays are the caller's: later steps never write into them.
    for out, out_copy, dx, dx_copy in kept:
        np.testing.assert_array_equal(out, out_copy)
        np.testing.assert_array_equal(dx, dx_copy)
    assert layer._buffers["cols"].shape == (3 * 3 * 2, batch_sizes[-1] * 5 * 7)


def test_conv_layer_backward_uses_the_latest_forward_even_after_two_forwards(rng, dtype):
    layer = L.Conv2d(2, 3, 3, pad=1, rng=rng, dtype=dtype, bias=False)
    first = rng.standard_normal((2, 2, 4, 4)).astype(dtype)
    second = rng.standard_normal((2, 2, 4, 4)).astype(dtype)
    layer.forward(first)
    out = layer.forward(second)  # overwrites the shared cols buffer
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = layer.backward(dout)
    _, expected_dx, expected_dw, _ = fresh_conv_step(layer, second, dout)
    np.testing.assert_array_equal(dx, expected_dx)
    np.testing.assert_array_equal(layer.grads["w"], expected_dw)
    # A second backward from the same cache gives the same result: backward never writes into cols.
    np.testing.assert_array_equal(layer.backward(dout), expected_dx)
    np.testing.assert_array_equal(layer.grads["w"], expected_dw)


def test_conv_layer_without_input_gradient_keeps_the_weight_gradients(rng, dtype):
    layer = L.Conv2d(3, 4, 3, pad=1, rng=rng, dtype=dtype, input_gradient=False)
    x = rng.standard_normal((2, 3, 5, 5)).astype(dtype)
    dout = rng.standard_normal(layer.forward(x).shape).astype(dtype)
    assert layer.backward(dout) is None
    _, _, expected_dw, expected_db = fresh_conv_step(layer, x, dout)
    np.testing.assert_array_equal(layer.grads["w"], expected_dw)
    np.testing.assert_array_equal(layer.grads["b"], expected_db)
    with pytest.raises(TypeError, match="input_gradient must be a bool"):
        L.Conv2d(3, 4, 3, rng=rng, input_gradient="no")


def conv_gradients_by_loops(x, w, dout, pad):
    """dx, dw, db of a stride-1 convolution by explicit loops: every output (n, f, oh, ow)
    adds dout * x_tap to dw and dout * w_tap to the input pixel the tap reads."""
    x, w, dout = (array.astype(np.float64) for array in (x, w, dout))
    N, C, H, W = x.shape
    F_, _, KH, KW = w.shape
    dx, dw = np.zeros(x.shape), np.zeros(w.shape)
    for n, f, oh, ow in np.ndindex(dout.shape):
        for c, i, j in np.ndindex(C, KH, KW):
            y, v = oh + i - pad, ow + j - pad
            if 0 <= y < H and 0 <= v < W:
                dw[f, c, i, j] += dout[n, f, oh, ow] * x[n, c, y, v]
                dx[n, c, y, v] += dout[n, f, oh, ow] * w[f, c, i, j]
    return dx, dw, dout.sum(axis=(0, 2, 3))


@pytest.mark.parametrize("chunk_bytes", [1, 200, 10**9], ids=["one_image_per_chunk", "some_images", "one_chunk"])
def test_conv_chunking_matches_the_loop_definition(chunk_bytes, rng, dtype, monkeypatch, forward_tolerance):
    """Any chunk size (one image, a remainder chunk, the whole batch) computes the same convolution."""
    monkeypatch.setattr(F, "CONV_CHUNK_BYTES", chunk_bytes)
    x = rng.standard_normal((5, 2, 4, 3)).astype(dtype)
    w = rng.standard_normal((3, 2, 2, 3)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    out, cache = F.conv_forward(x, w, b, stride=1, pad=1)
    np.testing.assert_allclose(out, naive_conv(x, w, b, 1, 1), **forward_tolerance)
    dout = rng.standard_normal(out.shape).astype(dtype)
    for got, expected in zip(F.conv_backward(dout, cache), conv_gradients_by_loops(x, w, dout, 1)):
        np.testing.assert_allclose(got, expected, **forward_tolerance)
    assert F.conv_backward(dout, cache, input_gradient=False)[0] is None


@pytest.mark.parametrize("chunk_bytes", [1, 10**9], ids=["chunked", "one_chunk"])
def test_conv_without_kept_columns_recomputes_them_in_backward(chunk_bytes, rng, dtype, monkeypatch):
    monkeypatch.setattr(F, "CONV_CHUNK_BYTES", chunk_bytes)
    x = rng.standard_normal((3, 2, 5, 4)).astype(dtype)
    w = rng.standard_normal((4, 2, 3, 2)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    kept_out, kept_cache = F.conv_forward(x, w, b, 2, 1)
    out, cache = F.conv_forward(x, w, b, 2, 1, keep_cols=False)
    assert cache.cols is None
    np.testing.assert_array_equal(out, kept_out)
    dout = rng.standard_normal(out.shape).astype(dtype)
    for got, expected in zip(F.conv_backward(dout, cache), F.conv_backward(dout, kept_cache)):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="cols_out is only used with keep_cols=True"):
        F.conv_forward(x, w, b, 2, 1, cols_out=np.empty_like(kept_cache.cols), keep_cols=False)
    with pytest.raises(TypeError, match="keep_cols must be a bool, got int"):
        F.conv_forward(x, w, b, 2, 1, keep_cols=0)
    with pytest.raises(TypeError, match="input_gradient must be a bool, got NoneType"):
        F.conv_backward(dout, cache, input_gradient=None)


def test_conv_layer_in_eval_mode_keeps_no_columns(rng, dtype):
    layer = L.Conv2d(3, 4, 3, pad=1, rng=rng, dtype=dtype)
    train_x = rng.standard_normal((2, 3, 6, 6)).astype(dtype)
    layer.forward(train_x)
    train_buffer = layer._buffers["cols"]
    layer.eval()
    big_x = rng.standard_normal((9, 3, 6, 6)).astype(dtype)
    out = layer.forward(big_x)
    np.testing.assert_allclose(out, naive_conv(big_x, layer.params["w"], layer.params["b"], 1, 1),
                               **tolerance(dtype))
    assert layer._cache.cols is None and layer._buffers["cols"] is train_buffer  # nothing batch-sized kept
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = layer.backward(dout)  # still possible in eval mode: the columns are recomputed
    _, expected_dx, expected_dw, _ = fresh_conv_step(layer, big_x, dout)
    np.testing.assert_array_equal(dx, expected_dx)
    np.testing.assert_array_equal(layer.grads["w"], expected_dw)


def test_conv_functional_cols_buffer_is_used_and_validated(rng, dtype):
    x = rng.standard_normal((2, 3, 5, 4)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    cols = np.empty((27, 2 * 5 * 4), dtype=dtype)
    out, cache = F.conv_forward(x, w, b, 1, 1, cols_out=cols)
    expected_out, expected_cache = F.conv_forward(x, w, b, 1, 1)
    assert cache.cols is cols
    np.testing.assert_array_equal(out, expected_out)
    dout = rng.standard_normal(out.shape).astype(dtype)
    for got, expected in zip(F.conv_backward(dout, cache), F.conv_backward(dout, expected_cache)):
        np.testing.assert_array_equal(got, expected)

    with pytest.raises(ValueError, match=r"cols_out must be a C-contiguous .* \(27, 40\)"):
        F.conv_forward(x, w, b, 1, 1, cols_out=np.empty((27, 39), dtype=dtype))
    with pytest.raises(ValueError, match="cols_out"):
        F.conv_forward(x, w, b, 1, 1, cols_out=np.empty((27, 40), dtype=np.float16))
    with pytest.raises(ValueError, match="cols_out .* non-contiguous"):
        F.conv_forward(x, w, b, 1, 1, cols_out=np.empty((40, 27), dtype=dtype).T)


@compiled_only
@pytest.mark.parametrize(
    "geometry",
    [
        # (N, C, H, W, KH, KW, pad): stride 1 and OW == W, the one-copy-per-block path
        (2, 3, 5, 7, 3, 3, 1),  # the default CNN's 3x3 "same" conv
        (2, 2, 6, 4, 5, 3, 1),  # taller kernel than padding: fewer output rows than input rows
        (1, 2, 3, 8, 1, 5, 2),  # wide kernel, two padding columns on each side
        (2, 1, 2, 3, 3, 3, 1),  # tiny plane: the shifted copy is clamped at both ends
        (1, 2, 1, 5, 3, 3, 1),  # one input row: two of the three kernel rows read only padding
        (2, 2, 4, 1, 3, 1, 0),  # one column
        (1, 3, 6, 6, 5, 5, 2),
    ],
)
def test_im2col_same_width_block_path_matches_the_reference(geometry, rng, dtype):
    N, C, H, W, KH, KW, pad = geometry
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    expected = kernels.im2col_numpy(x, KH, KW, 1, pad)
    assert expected.shape[1] == N * (H + 2 * pad - KH + 1) * W  # OW == W: the block path is taken
    out = np.full(expected.shape, np.nan, dtype=dtype)  # every element must be written
    np.testing.assert_array_equal(kernels.im2col(x, KH, KW, 1, pad, out=out), expected)


def test_im2col_and_col2im_write_into_column_blocks_and_given_outputs(rng, dtype):
    """What the chunked conv relies on: im2col into a column block of a bigger buffer,
    col2im into a slice of the batch, both equal to the whole-batch results."""
    x = rng.standard_normal((4, 2, 5, 3)).astype(dtype)
    whole = kernels.im2col(x, 3, 2, 1, 1)
    per_image = whole.shape[1] // 4
    buffer = np.full((whole.shape[0], whole.shape[1] + 7), np.nan, dtype=dtype)
    block = slice(3 + per_image, 3 + 3 * per_image)
    kernels.im2col(x[1:3], 3, 2, 1, 1, out=buffer[:, block])
    np.testing.assert_array_equal(buffer[:, block], whole[:, per_image : 3 * per_image])
    assert np.isnan(buffer[:, : block.start]).all() and np.isnan(buffer[:, block.stop :]).all()

    dcols = rng.standard_normal(whole.shape).astype(dtype)
    dx = np.full(x.shape, np.nan, dtype=dtype)  # col2im must overwrite, not add to, what is there
    kernels.col2im(dcols[:, : 2 * per_image], (2, 2, 5, 3), 3, 2, 1, 1, out=dx[:2])
    np.testing.assert_allclose(dx[:2], kernels.col2im_numpy(dcols, x.shape, 3, 2, 1, 1)[:2], **tolerance(dtype))
    assert np.isnan(dx[2:]).all()
    with pytest.raises(ValueError, match="out must be a C-contiguous"):
        kernels.col2im(dcols, x.shape, 3, 2, 1, 1, out=np.empty(x.shape, dtype=np.float16))


# ----------------------------------------------------------------------------
# A whole training step keeps its dtype
# ----------------------------------------------------------------------------
def assert_dtype(name, array, dtype):
    assert isinstance(array, np.ndarray), f"{name} is {type(array).__name__}, not an ndarray"
    assert array.dtype == dtype, f"{name} has dtype {array.dtype}, expected {dtype}"


@pytest.mark.parametrize("batch_norm", [True, False], ids=["batch_norm", "plain"])
def test_a_training_step_keeps_every_array_in_the_model_dtype(batch_norm, rng, dtype):
    model = build_model("softmax", 10, (3, 16, 16), rng=rng, dtype=dtype, widths=(4, 8), feature_dim=16,
                        batch_norm=batch_norm, input_gradient=True)
    optimizer = SGD(model.params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = rng.standard_normal((5, 3, 16, 16)).astype(dtype)
    y = rng.integers(0, 10, 5)
    for step in range(2):
        activation = x
        for index, module in enumerate(model.body):
            activation = module.forward(activation)
            assert_dtype(f"step {step} output of {index}: {module!r}", activation, dtype)
        loss = model.head.forward(activation, y)
        assert np.isfinite(loss)
        gradient = model.head.backward()
        assert_dtype("head dh", gradient, dtype)
        for index, module in reversed(list(enumerate(model.body))):
            gradient = module.backward(gradient)
            assert_dtype(f"step {step} dx of {index}: {module!r}", gradient, dtype)
        for name, grad in model.grads.items():
            assert_dtype(f"grad {name}", grad, dtype)
        optimizer.step(model.grads)
        for name, value in {**model.params, **model.buffers}.items():
            assert_dtype(name, value, dtype)
        for buffers in optimizer.state.values():
            for name, value in buffers.items():
                assert_dtype(f"optimizer state {name}", value, dtype)
    model.eval()
    assert_dtype("log_prob", model.log_prob(x), dtype)


@compiled_only
@pytest.mark.parametrize("batch_norm", [True, False], ids=["batch_norm", "plain"])
def test_numpy_fallback_step_matches_the_compiled_step(batch_norm, rng, dtype, monkeypatch):
    """Without the extension every dispatch falls back to its NumPy reference: same numbers."""
    def one_step():
        model = build_model("softmax", 10, (3, 8, 8), rng=np.random.default_rng(5), dtype=dtype, widths=(4, 6),
                            feature_dim=8, batch_norm=batch_norm, input_gradient=True)
        model.forward(x, y)
        dx = model.backward()
        model.eval()
        return [dx, model.log_prob(x)] + [model.grads[name] for name in sorted(model.grads)]

    x = rng.standard_normal((3, 3, 8, 8)).astype(dtype)
    y = rng.integers(0, 10, 3)
    compiled = one_step()
    monkeypatch.setattr(kernels, "_extension", None)
    fallback = one_step()
    for got, expected in zip(fallback, compiled):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, expected, rtol=1e-4 if dtype == np.float32 else 1e-10,
                                   atol=1e-5 if dtype == np.float32 else 1e-12)


# ----------------------------------------------------------------------------
# Row-sparse products and tree paths of the hierarchical head
# ----------------------------------------------------------------------------
def _row_pairs(rng, dtype, n_rows=9, n_samples=4, n_pairs=23, features=7):
    """A small table, features and pairs with repeated rows and samples (sample-major, as the head)."""
    table = rng.standard_normal((n_rows, features)).astype(dtype)
    h = rng.standard_normal((n_samples, features)).astype(dtype)
    rows = rng.integers(0, n_rows, n_pairs)
    samples = np.sort(rng.integers(0, n_samples, n_pairs))
    return table, h, rows, samples


@pytest.mark.parametrize("features", [1, 7, 16, 37])
def test_gathered_row_dots_match_a_loop(features, rng, dtype):
    table, h, rows, samples = _row_pairs(rng, dtype, features=features)
    got = kernels.gathered_row_dots(table, rows, h, samples)
    expected = [float(np.dot(table[r].astype(np.float64), h[i].astype(np.float64))) for r, i in zip(rows, samples)]
    assert got.dtype == dtype and got.shape == rows.shape
    np.testing.assert_allclose(got, expected, **tolerance(dtype))


@pytest.mark.parametrize("features", [1, 7, 37])
def test_scatter_row_products_is_the_gradient_of_the_row_dots(features, rng, dtype):
    """dfeatures and dslots are d/d(h) and d/d(table[unique rows]) of sum_c w_c * dots_c, written as
    explicit loops; every pair is added (rows and samples repeat)."""
    table, h, rows, samples = _row_pairs(rng, dtype, features=features)
    unique, slots = np.unique(rows, return_inverse=True)
    weights = rng.standard_normal(rows.size).astype(dtype)
    dfeatures, dslots = kernels.scatter_row_products(weights, table, rows, h, samples, slots, unique.size)
    expected_dfeatures = np.zeros(h.shape)
    expected_dslots = np.zeros((unique.size, features))
    for c in range(rows.size):
        expected_dfeatures[samples[c]] += float(weights[c]) * table[rows[c]]
        expected_dslots[np.searchsorted(unique, rows[c])] += float(weights[c]) * h[samples[c]]
    assert dfeatures.dtype == dslots.dtype == dtype
    np.testing.assert_allclose(dfeatures, expected_dfeatures, **tolerance(dtype))
    np.testing.assert_allclose(dslots, expected_dslots, **tolerance(dtype))
    # and the adjoint identity <w, dots(table + t, h)> is linear in t with gradient dslots
    if dtype == np.float64:
        t = rng.standard_normal((unique.size, features))
        shifted = table.copy()
        shifted[unique] += t
        change = weights @ kernels.gathered_row_dots(shifted, rows, h, samples) - weights @ kernels.gathered_row_dots(
            table, rows, h, samples)
        assert change == pytest.approx(np.sum(t * dslots), rel=1e-10)


def test_row_kernels_agree_with_their_numpy_references_and_fallback(rng, dtype, monkeypatch):
    table, h, rows, samples = _row_pairs(rng, dtype, n_pairs=40)
    unique, slots = np.unique(rows, return_inverse=True)
    weights = rng.standard_normal(rows.size).astype(dtype)
    compiled = [kernels.gathered_row_dots(table, rows, h, samples),
                *kernels.scatter_row_products(weights, table, rows, h, samples, slots, unique.size)]
    references = [kernels.gathered_row_dots_numpy(table, rows, h, samples),
                  *kernels.scatter_row_products_numpy(weights, table, rows, h, samples, slots, unique.size)]
    monkeypatch.setattr(kernels, "_extension", None)
    fallback = [kernels.gathered_row_dots(table, rows, h, samples),
                *kernels.scatter_row_products(weights, table, rows, h, samples, slots, unique.size)]
    for got, reference, numpy_path in zip(compiled, references, fallback):
        np.testing.assert_allclose(got, reference, **tolerance(dtype))
        np.testing.assert_allclose(numpy_path, reference, **tolerance(dtype))


def test_scatter_row_products_gives_zero_rows_to_slots_without_pairs(rng, dtype):
    table, h, rows, samples = _row_pairs(rng, dtype, n_pairs=6)
    slots = np.array([4, 0, 4, 2, 0, 4])  # slots 1 and 3 get no pair
    weights = rng.standard_normal(6).astype(dtype)
    _, dslots = kernels.scatter_row_products(weights, table, rows, h, samples, slots, 5)
    _, expected = kernels.scatter_row_products_numpy(weights, table, rows, h, samples, slots, 5)
    assert not dslots[[1, 3]].any()
    np.testing.assert_allclose(dslots, expected, **tolerance(dtype))


def test_row_kernels_handle_no_pairs_and_reject_bad_indices(rng):
    table, h, _, _ = _row_pairs(rng, np.float32)
    empty = np.zeros(0, dtype=np.int64)
    assert kernels.gathered_row_dots(table, empty, h, empty).shape == (0,)
    dfeatures, dslots = kernels.scatter_row_products(np.zeros(0, np.float32), table, empty, h, empty, empty, 0)
    assert not dfeatures.any() and dslots.shape == (0, table.shape[1])
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 9\)"):
        kernels.gathered_row_dots(table, np.array([0, 9]), h, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"samples must lie in \[0, 4\)"):
        kernels.gathered_row_dots(table, np.array([0, 1]), h, np.array([0, -1]))
    with pytest.raises(ValueError, match="samples must be an integer array of shape"):
        kernels.gathered_row_dots(table, np.array([0, 1]), h, np.array([0]))
    with pytest.raises(ValueError, match="table .* and features .* must be 2-D arrays of one dtype"):
        kernels.gathered_row_dots(table, np.array([0]), h.astype(np.float64), np.array([0]))
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 1\)"):
        kernels.scatter_row_products(np.ones(2, np.float32), table, np.array([0, 1]), h, np.array([0, 1]),
                                     np.array([0, 1]), 1)
    with pytest.raises(ValueError, match="weights must be a float32 array of shape"):
        kernels.scatter_row_products(np.ones(2), table, np.array([0, 1]), h, np.array([0, 1]), np.array([0, 1]), 2)


TREES_FOR_PATHS = {
    "balanced-binary": lambda: balanced_tree(37),
    "ternary": lambda: balanced_tree(50, 3),
    "nested": lambda: Tree.from_nested([[0, 1, [2, 3, 4, 5]], 6, [7, [8, 9]]]),
    "one-node": lambda: balanced_tree(3, 3),
}


@pytest.mark.parametrize("name", list(TREES_FOR_PATHS))
def test_tree_paths_match_the_tree_definition(name, rng, monkeypatch):
    """Leaf to root, sample-major, against Tree.path (root first) reversed; the NumPy fallback too."""
    tree = TREES_FOR_PATHS[name]()
    node_position = np.where(tree.node_edge >= 0, tree.edge_position[tree.node_edge], -1)
    y = rng.integers(0, tree.n_classes, 17)
    y[0] = y[-1]  # a repeated class
    expected = [(i, node, position) for i, k in enumerate(y) for node, position in tree.path(k)[::-1]]
    for extension in (kernels._extension, None):
        monkeypatch.setattr(kernels, "_extension", extension)
        sample, node, position = kernels.tree_paths(y, tree.depth, tree.leaf_parent, tree.leaf_position,
                                                    tree.node_parent, node_position)
        assert list(zip(sample.tolist(), node.tolist(), position.tolist())) == expected


@compiled_only
def test_tree_paths_refuses_a_depth_that_disagrees_with_the_parents():
    tree = balanced_tree(8)
    node_position = np.where(tree.node_edge >= 0, tree.edge_position[tree.node_edge], -1)
    with pytest.raises(ValueError, match="depth disagrees with the parent pointers for 1 of the 2 classes"):
        kernels.tree_paths(np.array([0, 5]), np.where(np.arange(8) == 5, 2, tree.depth), tree.leaf_parent,
                           tree.leaf_position, tree.node_parent, node_position)
    with pytest.raises(ValueError, match=r"y must lie in \[0, 8\)"):
        kernels.tree_paths(np.array([8]), tree.depth, tree.leaf_parent, tree.leaf_position, tree.node_parent,
                           node_position)


# ----------------------------------------------------------------------------
# Profiler
# ----------------------------------------------------------------------------
def test_conv_gemm_flops_by_hand():
    layer = L.Conv2d(3, 8, (3, 5), stride=2, pad=1, rng=np.random.default_rng(0))
    # OH = (9 + 2 - 3) // 2 + 1 = 5, OW = (12 + 2 - 5) // 2 + 1 = 5: 2 * 8 * (3*3*5) * (4*5*5) = 72000
    assert conv_gemm_flops(layer, (4, 3, 9, 12)) == (72000, 144000)
    layer.input_gradient = False  # no dcols GEMM: backward is the dW GEMM alone
    assert conv_gemm_flops(layer, (4, 3, 9, 12)) == (72000, 72000)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-batch-norm-pool", "apart"])
def test_profiler_times_every_module_and_restores_them(rng, fused):
    # input_gradient=True: the only conv must also run col2im for the "col2im" section to appear.
    model = build_model("softmax", 10, (3, 8, 8), rng=rng, widths=(4,), feature_dim=8, input_gradient=True)
    model.body.fuse_batchnorm_max_pool = fused
    optimizer = SGD(model.params, lr=0.1, momentum=0.9)
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 3)
    with profile(model, optimizer) as profiler:
        with pytest.raises(RuntimeError, match="already active"):
            Profiler().attach(model)
        for _ in range(2):
            model.forward(x, y)
            model.backward()
            optimizer.step(model.grads)  # counts the steps
    assert profiler.steps == 2
    labels = [label for label, _ in profiler.modules]
    assert labels[0] == "0: Conv2d" and labels[-2].startswith("head") and labels[-1].startswith("optimizer")
    if fused:  # the batch norm's forward pools too; the pool's own forward never runs
        assert labels[1:3] == ["1: BatchNorm2d + pool", "2: MaxPool2d (in the batch norm)"]
        assert profiler.times[(labels[2], "forward")] == 0
    else:
        assert labels[1:3] == ["1: BatchNorm2d", "2: MaxPool2d"]
    for label in labels[:-1]:
        if not label.endswith("(in the batch norm)"):
            assert profiler.times[(label, "forward")] > 0, label
        assert profiler.times[(label, "backward")] > 0, label
    assert profiler.times[(labels[-1], "backward")] > 0  # the optimizer step
    assert set(profiler.sections) == {"im2col", "conv GEMM", "col2im"}
    # Two steps of one 3x3 conv, 3 -> 4 channels, on 3 images of 8x8: (1 + 2) * 2*4*27*192 each.
    assert profiler.conv_flops == 2 * 3 * 2 * 4 * 27 * 3 * 64
    summary = profiler.summary()
    norm_and_pool = ("batch norm + max pool",) if fused else ("max pool", "batch norm")
    for row in ("im2col", "conv GEMM", "col2im", *norm_and_pool, "relu", "linear", "head", "optimizer"):
        assert summary[row] > 0, row
    assert ("batch norm" in summary) != fused
    table = profiler.table()
    for row in ("im2col", "conv GEMM", "col2im", *norm_and_pool, "relu", "head", "optimizer", "GFLOP/s"):
        assert row in table, row
    # Restored: the instances no longer carry wrappers, and sections are free no-ops again.
    for module in [*model.body, model.head]:
        assert "forward" not in vars(module) and "backward" not in vars(module)
    assert "step" not in vars(optimizer)
    assert section("im2col").__class__.__name__ == "nullcontext"


def test_profiler_counts_steps_by_hand_without_an_optimizer(rng):
    model = build_model("softmax", 10, (3, 8, 8), rng=rng, widths=(4,), feature_dim=8).eval()
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    with profile(model) as profiler:
        for _ in range(3):
            model.log_prob(x)
            profiler.step_done()
    assert profiler.steps == 3
    assert profiler.times[("0: Conv2d", "forward")] > 0 and profiler.times[("0: Conv2d", "backward")] == 0
    assert "per-layer profile" in profiler.table()


@pytest.mark.parametrize("shape, dtype", [((128, 32, 32, 32), np.float32), ((300, 1001), np.float64),
                                          ((7, 5), np.float32), (3, np.int32)])
def test_empty_gives_page_aligned_large_arrays_and_plain_small_ones(shape, dtype):
    a = kernels.empty(shape, dtype)
    expected_shape = shape if isinstance(shape, tuple) else (shape,)
    assert a.shape == expected_shape and a.dtype == dtype
    assert a.flags.c_contiguous and a.flags.writeable
    if a.nbytes >= kernels.ALIGN_MIN_BYTES:
        assert a.ctypes.data % 4096 == 0
    a[...] = 7  # the whole array is usable memory
    assert np.all(a == 7)


def test_large_kernel_and_conv_outputs_are_page_aligned(rng):
    """The outputs the streaming kernels write start on a page (see kernels.empty)."""
    x = rng.standard_normal((64, 16, 32, 32)).astype(np.float32)  # 4 MiB
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    out, cache = F.conv_forward(x, w, None, pad=1)
    normalized, bn_cache = F.spatial_batchnorm_forward(out, np.ones(16, np.float32), np.zeros(16, np.float32),
                                                     np.zeros(16, np.float32), np.ones(16, np.float32))
    dx, _, _ = F.spatial_batchnorm_backward(rng.standard_normal(out.shape).astype(np.float32), bn_cache)
    pooled, _ = F.max_pool_forward(normalized)
    relu, _ = F.relu_forward(normalized)
    conv_dx, _, _ = F.conv_backward(out, cache)
    for name, array in [("conv out", out), ("bn out", normalized), ("bn dx", dx), ("pool out", pooled),
                        ("relu out", relu), ("conv dx", conv_dx)]:
        assert array.ctypes.data % 4096 == 0, name
