"""Functional layers: forward vs naive loops, backward vs numerical gradients, contracts, errors."""

import numpy as np
import pytest

from naive_reference import (
    naive_affine,
    naive_batch_statistics,
    naive_batchnorm,
    naive_channel_rows,
    naive_conv,
    naive_flatten,
    naive_max_pool,
    naive_relu,
    naive_spatial_batchnorm,
)
from npsoftmax import functional as F
from npsoftmax.gradcheck import LAYER_TOLERANCE, gradient_errors, numerical_gradient, relative_error

CONV_GEOMETRIES = [
    # (N, C, H, W, F, KH, KW, stride, pad)
    pytest.param((2, 2, 6, 7, 3, 3, 5, 1, 1), id="kernel3x5-pad1"),
    pytest.param((1, 1, 5, 5, 2, 3, 3, 2, 0), id="batch1-channel1-stride2"),
    pytest.param((2, 2, 5, 4, 2, 3, 3, 2, 2), id="stride2-pad2"),
    pytest.param((2, 3, 6, 6, 2, 3, 3, 2, 0), id="stride-floors"),  # (6 - 3) / 2 is not an integer
    pytest.param((1, 3, 4, 5, 2, 5, 3, 3, 1), id="kernel5x3-stride3-floors"),
    pytest.param((2, 3, 3, 4, 2, 1, 1, 1, 0), id="kernel1x1"),
]

# 3x3 kernels with stride 1, the only ones Winograd's F(2x2, 3x3) computes (npsoftmax.winograd):
# odd and even output sizes (the last row/column of 2x2 tiles half used), every padding.
WINOGRAD_GEOMETRIES = [
    pytest.param((2, 2, 6, 7, 3, 3, 3, 1, 1), id="3x3-pad1-odd-width"),
    pytest.param((1, 1, 5, 5, 1, 3, 3, 1, 0), id="3x3-batch1-channel1-pad0-odd"),
    pytest.param((3, 2, 4, 9, 2, 3, 3, 1, 2), id="3x3-pad2"),
    pytest.param((2, 3, 3, 3, 4, 3, 3, 1, 0), id="3x3-single-output-pixel"),
]
# (geometry, algorithm): the default choice for every geometry, both algorithms for 3x3 stride 1
CONV_CASES = [pytest.param(g.values[0], "auto", id=g.id) for g in CONV_GEOMETRIES] + [
    pytest.param(g.values[0], algorithm, id=f"{g.id}-{algorithm}")
    for g in WINOGRAD_GEOMETRIES for algorithm in ("im2col", "winograd")]

POOL_GEOMETRIES = [
    # (N, C, H, W, size, stride, path the dispatcher must take)
    pytest.param((2, 2, 4, 6, 2, 2, "reshape"), id="2/2-tiles"),
    pytest.param((1, 3, 6, 3, 3, 3, "reshape"), id="3/3-tiles"),
    pytest.param((2, 2, 7, 7, 3, 2, "im2col"), id="3/2-overlapping-odd"),
    pytest.param((1, 2, 5, 5, 2, 2, "im2col"), id="2/2-odd-floors"),
    pytest.param((2, 1, 4, 5, 2, 1, "im2col"), id="2/1-overlapping"),
    pytest.param((1, 2, 7, 8, 2, 3, "im2col"), id="2/3-gapped"),
]


def random_array(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def away_from_zero(rng, shape, dtype=np.float64):
    """Random values with |x| >= 0.1: ReLU's kink is never within a finite-difference step."""
    values = rng.standard_normal(shape)
    return (np.sign(values) * (0.1 + np.abs(values))).astype(dtype)


# ----------------------------------------------------------------------------
# One registry of layer cases: (forward(*arrays) -> (out, cache), backward, arrays).
# The gradient, dtype and no-mutation tests all run over it (one helper, many layers).
# ----------------------------------------------------------------------------
def affine_case(rng, dtype):
    arrays = {
        "x": random_array(rng, (3, 2, 3), dtype),
        "w": random_array(rng, (6, 4), dtype),
        "b": random_array(rng, 4, dtype),
    }
    return F.affine_forward, F.affine_backward, arrays


def relu_case(rng, dtype):
    return F.relu_forward, F.relu_backward, {"x": away_from_zero(rng, (3, 2, 4), dtype)}


def conv_case(rng, dtype):
    arrays = {
        "x": random_array(rng, (2, 2, 6, 7), dtype),
        "w": random_array(rng, (3, 2, 3, 5), dtype),
        "b": random_array(rng, 3, dtype),
    }
    return (lambda x, w, b: F.conv_forward(x, w, b, stride=2, pad=1)), F.conv_backward, arrays


def max_pool_case(rng, dtype):
    return (lambda x: F.max_pool_forward(x, 3, 2)), F.max_pool_backward, {"x": random_array(rng, (2, 2, 7, 5), dtype)}


def max_pool_reshape_case(rng, dtype):
    x = random_array(rng, (2, 2, 4, 6), dtype)
    return (lambda x: F.max_pool_forward_reshape(x, 2)), F.max_pool_backward, {"x": x}


def batchnorm_case(rng, dtype, training):
    D = 3
    running_mean = random_array(rng, D, dtype)
    running_var = (0.5 + rng.random(D)).astype(dtype)

    def forward(x, gamma, beta):
        return F.batchnorm_forward(x, gamma, beta, running_mean, running_var, training=training)

    arrays = {
        "x": (2.0 * rng.standard_normal((5, D)) + 1.0).astype(dtype),
        "gamma": (1.0 + rng.standard_normal(D)).astype(dtype),
        "beta": random_array(rng, D, dtype),
    }
    return forward, F.batchnorm_backward, arrays


def spatial_batchnorm_case(rng, dtype, training):
    C = 2
    running_mean = random_array(rng, C, dtype)
    running_var = (0.5 + rng.random(C)).astype(dtype)

    def forward(x, gamma, beta):
        return F.spatial_batchnorm_forward(x, gamma, beta, running_mean, running_var, training=training)

    arrays = {
        "x": (1.5 * rng.standard_normal((2, C, 3, 2)) - 0.5).astype(dtype),
        "gamma": (1.0 + rng.standard_normal(C)).astype(dtype),
        "beta": random_array(rng, C, dtype),
    }
    return forward, F.spatial_batchnorm_backward, arrays


def spatial_batchnorm_max_pool_case(rng, dtype, training, x_shape=(2, 2, 4, 6), size=2):
    C = x_shape[1]
    running_mean = random_array(rng, C, dtype)
    running_var = (0.5 + rng.random(C)).astype(dtype)

    def forward(x, gamma, beta):
        return F.spatial_batchnorm_max_pool_forward(x, gamma, beta, running_mean, running_var, size,
                                                    training=training)

    arrays = {
        "x": (1.5 * rng.standard_normal(x_shape) - 0.5).astype(dtype),
        "gamma": (1.0 + rng.standard_normal(C)).astype(dtype),  # some negative: the pool then picks the min of x
        "beta": random_array(rng, C, dtype),
    }
    return forward, F.spatial_batchnorm_max_pool_backward, arrays


def dropout_case(rng, dtype):
    # A fresh Generator with a fixed seed on every call: the same mask each time,
    # so the finite differences see one fixed function.
    forward = lambda x: F.dropout_forward(x, 0.4, True, np.random.default_rng(7))  # noqa: E731
    return forward, F.dropout_backward, {"x": random_array(rng, (4, 5), dtype)}


def flatten_case(rng, dtype):
    return F.flatten_forward, F.flatten_backward, {"x": random_array(rng, (2, 3, 2, 2), dtype)}


LAYER_CASES = {
    "affine": affine_case,
    "relu": relu_case,
    "conv": conv_case,
    "max_pool_overlapping": max_pool_case,
    "max_pool_reshape": max_pool_reshape_case,
    "batchnorm_train": lambda rng, dtype: batchnorm_case(rng, dtype, True),
    "batchnorm_eval": lambda rng, dtype: batchnorm_case(rng, dtype, False),
    "spatial_batchnorm_train": lambda rng, dtype: spatial_batchnorm_case(rng, dtype, True),
    "spatial_batchnorm_eval": lambda rng, dtype: spatial_batchnorm_case(rng, dtype, False),
    "spatial_batchnorm_max_pool_train": lambda rng, dtype: spatial_batchnorm_max_pool_case(rng, dtype, True),
    "spatial_batchnorm_max_pool_eval": lambda rng, dtype: spatial_batchnorm_max_pool_case(rng, dtype, False),
    "spatial_batchnorm_max_pool_3x3_batch1_channel1": lambda rng, dtype: spatial_batchnorm_max_pool_case(
        rng, dtype, True, (1, 1, 6, 3), 3),
    "dropout": dropout_case,
    "flatten": flatten_case,
}


def as_tuple(grads):
    return grads if isinstance(grads, tuple) else (grads,)


def pair_gradient_errors(forward, backward, arrays, rng):
    """Relative error of backward's gradients vs central differences, for every array.

    The scalar checked is ``sum(forward(...) * dout)`` with a random ``dout``, whose
    gradient is exactly what ``backward(dout)`` returns.
    """
    out, cache = forward(*arrays.values())
    dout = rng.standard_normal(out.shape)
    analytic = dict(zip(arrays, as_tuple(backward(dout, cache))))
    return gradient_errors(lambda: np.sum(forward(*arrays.values())[0] * dout), arrays, analytic)


def assert_gradients_match(errors):
    failing = {name: error for name, error in errors.items() if not error < LAYER_TOLERANCE}
    assert not failing, f"relative errors above {LAYER_TOLERANCE}: {failing} (all: {errors})"


# ----------------------------------------------------------------------------
# Forward vs naive loops (float32 and float64)
# ----------------------------------------------------------------------------
def test_affine_forward_matches_loops(rng, dtype, forward_tolerance):
    x, w, b = random_array(rng, (3, 2, 3), dtype), random_array(rng, (6, 4), dtype), random_array(rng, 4, dtype)
    out, _ = F.affine_forward(x, w, b)
    np.testing.assert_allclose(out, naive_affine(x, w, b), **forward_tolerance)
    out_no_bias, _ = F.affine_forward(x, w, None)
    np.testing.assert_allclose(out_no_bias, naive_affine(x, w, None), **forward_tolerance)


def test_relu_forward_matches_loops(rng, dtype):
    x = random_array(rng, (3, 2, 4), dtype)
    x[0, 0, 0] = 0.0
    out, _ = F.relu_forward(x)
    np.testing.assert_array_equal(out, naive_relu(x))


@pytest.mark.parametrize("geometry, algorithm", CONV_CASES)
def test_conv_forward_matches_loops(geometry, algorithm, rng, dtype, forward_tolerance):
    N, C, H, W, num_filters, KH, KW, stride, pad = geometry
    x = random_array(rng, (N, C, H, W), dtype)
    w = random_array(rng, (num_filters, C, KH, KW), dtype)
    b = random_array(rng, num_filters, dtype)
    out, _ = F.conv_forward(x, w, b, stride=stride, pad=pad, algorithm=algorithm)
    np.testing.assert_allclose(out, naive_conv(x, w, b, stride, pad), **forward_tolerance)
    assert out.flags.c_contiguous


@pytest.mark.parametrize("geometry", POOL_GEOMETRIES)
def test_max_pool_forward_matches_loops(geometry, rng, dtype):
    N, C, H, W, size, stride, path = geometry
    x = random_array(rng, (N, C, H, W), dtype)
    out, cache = F.max_pool_forward(x, size, stride)
    assert cache.path == path
    np.testing.assert_array_equal(out, naive_max_pool(x, size, stride))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_forward_matches_formula(training, rng, dtype, forward_tolerance):
    x = (3.0 * rng.standard_normal((6, 4)) + 2.0).astype(dtype)
    gamma, beta = random_array(rng, 4, dtype), random_array(rng, 4, dtype)
    running_mean, running_var = random_array(rng, 4, dtype), (0.5 + rng.random(4)).astype(dtype)
    if training:
        mean, var, _ = naive_batch_statistics(x)
    else:
        mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)
    out, _ = F.batchnorm_forward(x, gamma, beta, running_mean, running_var, training=training, eps=1e-3)
    np.testing.assert_allclose(out, naive_batchnorm(x, gamma, beta, mean, var, 1e-3), **forward_tolerance)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_spatial_batchnorm_forward_matches_formula(training, rng, dtype, forward_tolerance):
    x = (2.0 * rng.standard_normal((3, 2, 4, 5)) - 1.0).astype(dtype)
    gamma, beta = random_array(rng, 2, dtype), random_array(rng, 2, dtype)
    running_mean, running_var = random_array(rng, 2, dtype), (0.5 + rng.random(2)).astype(dtype)
    if training:
        mean, var, _ = naive_batch_statistics(naive_channel_rows(x))
    else:
        mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)
    out, _ = F.spatial_batchnorm_forward(x, gamma, beta, running_mean, running_var, training=training)
    np.testing.assert_allclose(out, naive_spatial_batchnorm(x, gamma, beta, mean, var, 1e-5), **forward_tolerance)


def test_flatten_forward_matches_loops(rng, dtype):
    x = random_array(rng, (2, 3, 2, 4), dtype)
    out, cache = F.flatten_forward(x)
    np.testing.assert_array_equal(out, naive_flatten(x))
    np.testing.assert_array_equal(F.flatten_backward(out, cache), x)


# ----------------------------------------------------------------------------
# Backward vs numerical gradients (float64)
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_backward_matches_numerical_gradient(name, rng):
    forward, backward, arrays = LAYER_CASES[name](rng, np.float64)
    assert_gradients_match(pair_gradient_errors(forward, backward, arrays, rng))


def test_affine_backward_without_bias(rng):
    arrays = {"x": random_array(rng, (4, 3)), "w": random_array(rng, (3, 5))}
    out, cache = F.affine_forward(arrays["x"], arrays["w"], None)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = F.affine_backward(dout, cache)
    assert db is None
    errors = gradient_errors(
        lambda: np.sum(F.affine_forward(arrays["x"], arrays["w"], None)[0] * dout), arrays, {"x": dx, "w": dw}
    )
    assert_gradients_match(errors)


def test_affine_backward_with_a_square_weight(rng):
    """D_in == D_out: a transposed w in dx or dw would have the right shape, so check it here."""
    arrays = {"x": random_array(rng, (3, 4)), "w": random_array(rng, (4, 4)), "b": random_array(rng, 4)}
    assert_gradients_match(pair_gradient_errors(F.affine_forward, F.affine_backward, arrays, rng))


def test_relu_backward_by_hand():
    """The gradient passes only where x > 0; at exactly 0 it is 0 (PyTorch's convention)."""
    x = np.array([[-2.0, -1e-3, 0.0, 1e-3, 3.0]])
    _, cache = F.relu_forward(x)
    dx = F.relu_backward(np.array([[1.0, 2.0, 3.0, 4.0, 5.0]]), cache)
    np.testing.assert_array_equal(dx, [[0.0, 0.0, 0.0, 4.0, 5.0]])


@pytest.mark.parametrize("geometry, algorithm", CONV_CASES)
def test_conv_backward_matches_numerical_gradient(geometry, algorithm, rng):
    N, C, H, W, num_filters, KH, KW, stride, pad = geometry
    arrays = {
        "x": random_array(rng, (N, C, H, W)),
        "w": random_array(rng, (num_filters, C, KH, KW)),
        "b": random_array(rng, num_filters),
    }
    forward = lambda x, w, b: F.conv_forward(x, w, b, stride=stride, pad=pad, algorithm=algorithm)  # noqa: E731
    assert_gradients_match(pair_gradient_errors(forward, F.conv_backward, arrays, rng))


def test_conv_stride_that_floors_gives_no_gradient_to_dropped_pixels(rng):
    """H = W = 6, 3x3 kernel, stride 2: windows start at 0 and 2, so row/column 5 is never read."""
    x, w, b = random_array(rng, (1, 2, 6, 6)), random_array(rng, (2, 2, 3, 3)), random_array(rng, 2)
    out, cache = F.conv_forward(x, w, b, stride=2)
    assert out.shape == (1, 2, 2, 2)
    dx, _, _ = F.conv_backward(rng.standard_normal(out.shape), cache)
    assert np.all(dx[:, :, 5, :] == 0) and np.all(dx[:, :, :, 5] == 0)
    assert np.all(dx[:, :, :5, :5] != 0)


@pytest.mark.parametrize("geometry", POOL_GEOMETRIES)
def test_max_pool_backward_matches_numerical_gradient(geometry, rng):
    N, C, H, W, size, stride, _ = geometry
    arrays = {"x": random_array(rng, (N, C, H, W))}
    forward = lambda x: F.max_pool_forward(x, size, stride)  # noqa: E731
    assert_gradients_match(pair_gradient_errors(forward, F.max_pool_backward, arrays, rng))


# ----------------------------------------------------------------------------
# The suite can fail: wrong gradients are caught by the same tolerance
# ----------------------------------------------------------------------------
def conv_gradients(rng):
    x, w, b = random_array(rng, (2, 2, 5, 5)), random_array(rng, (3, 2, 3, 3)), random_array(rng, 3)
    out, cache = F.conv_forward(x, w, b, stride=1, pad=1)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = F.conv_backward(dout, cache)
    loss = lambda: np.sum(F.conv_forward(x, w, b, stride=1, pad=1)[0] * dout)  # noqa: E731
    return {"x": (dx, x), "w": (dw, w), "b": (db, b)}, loss


def batchnorm_dx(rng):
    x, gamma, beta = random_array(rng, (6, 3)), random_array(rng, 3), random_array(rng, 3)
    running_mean, running_var = np.zeros(3), np.ones(3)
    out, cache = F.batchnorm_forward(x, gamma, beta, running_mean, running_var)
    dout = rng.standard_normal(out.shape)
    dx, _, _ = F.batchnorm_backward(dout, cache)
    xhat, _, inv_std, _ = cache
    dxhat = dout * gamma
    # The classic slip: forget that the variance depends on x (drop the xhat * sum(...) term).
    dx_missing_variance_path = inv_std * (dxhat - dxhat.mean(axis=0))
    loss = lambda: np.sum(F.batchnorm_forward(x, gamma, beta, running_mean, running_var)[0] * dout)  # noqa: E731
    return dx, dx_missing_variance_path, x, loss


def affine_square_dw(rng):
    x, w, b = random_array(rng, (5, 4)), random_array(rng, (4, 4)), random_array(rng, 4)
    out, cache = F.affine_forward(x, w, b)
    dout = rng.standard_normal(out.shape)
    _, dw, _ = F.affine_backward(dout, cache)
    loss = lambda: np.sum(F.affine_forward(x, w, b)[0] * dout)  # noqa: E731
    return dw, dw.T, w, loss


def mutant_conv(rng, which, mutate):
    gradients, loss = conv_gradients(rng)
    correct, array = gradients[which]
    return correct, mutate(correct), array, loss


MUTANTS = {
    "conv dx doubled": lambda rng: mutant_conv(rng, "x", lambda dx: 2 * dx),
    "conv db missing": lambda rng: mutant_conv(rng, "b", np.zeros_like),
    "conv dw kernel flipped": lambda rng: mutant_conv(rng, "w", lambda dw: dw[:, :, ::-1, ::-1]),
    "affine dw transposed": affine_square_dw,
    "batchnorm dx missing the variance term": batchnorm_dx,
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_wrong_gradients_exceed_the_tolerance(mutant, rng):
    correct, wrong, array, loss = MUTANTS[mutant](rng)
    numeric = numerical_gradient(loss, array)
    assert relative_error(correct, numeric) < LAYER_TOLERANCE
    assert relative_error(wrong, numeric) > LAYER_TOLERANCE


# ----------------------------------------------------------------------------
# Contracts: no mutation, dtype preserved
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_forward_and_backward_do_not_mutate_inputs(name, rng):
    forward, backward, arrays = LAYER_CASES[name](rng, np.float64)
    originals = {key: value.copy() for key, value in arrays.items()}
    out, cache = forward(*arrays.values())
    dout = rng.standard_normal(out.shape)
    dout_original = dout.copy()
    grads = as_tuple(backward(dout, cache))
    backward(dout, cache)  # a second backward from the same cache gives the same gradients
    for key, value in arrays.items():
        np.testing.assert_array_equal(value, originals[key], err_msg=f"{name} mutated {key}")
    np.testing.assert_array_equal(dout, dout_original, err_msg=f"{name} mutated dout")
    for first, second in zip(grads, as_tuple(backward(dout, cache))):
        np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_dtype_is_preserved(name, rng, dtype):
    forward, backward, arrays = LAYER_CASES[name](rng, dtype)
    out, cache = forward(*arrays.values())
    assert out.dtype == dtype
    grads = as_tuple(backward(rng.standard_normal(out.shape).astype(dtype), cache))
    assert [grad.dtype for grad in grads] == [dtype] * len(grads)


def test_batchnorm_keeps_float32_buffers_with_numpy_scalar_options(rng):
    """np.float64 momentum/eps must not upcast a float32 layer (NumPy 2 scalar promotion)."""
    x = random_array(rng, (4, 3), np.float32)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    out, _ = F.batchnorm_forward(
        x, gamma, beta, running_mean, running_var, momentum=np.float64(0.2), eps=np.float64(1e-3)
    )
    assert out.dtype == np.float32 and running_mean.dtype == np.float32 and running_var.dtype == np.float32


def test_backward_rejects_dout_of_the_wrong_shape_or_dtype(rng):
    x, w, b = random_array(rng, (2, 3)), random_array(rng, (3, 4)), random_array(rng, 4)
    _, cache = F.affine_forward(x, w, b)
    with pytest.raises(ValueError, match=r"dout must have the forward output's shape \(2, 4\), got \(4, 2\)"):
        F.affine_backward(rng.standard_normal((4, 2)), cache)
    with pytest.raises(TypeError, match="dout must have the forward output's dtype float64, got float32"):
        F.affine_backward(rng.standard_normal((2, 4)).astype(np.float32), cache)


# ----------------------------------------------------------------------------
# Max pooling: argmax routing, overlap accumulation, the two paths agree
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "forward",
    [F.max_pool_forward_reshape, lambda x, size: F.max_pool_forward_im2col(x, size, size)],
    ids=["reshape", "im2col"],
)
def test_max_pool_gives_a_tied_window_gradient_to_exactly_one_element(forward):
    """All four entries tie: the first (row-major) gets the whole gradient, as in PyTorch."""
    x = np.ones((1, 1, 2, 2))
    out, cache = forward(x, 2)
    dx = F.max_pool_backward(np.array([[[[5.0]]]]), cache)
    np.testing.assert_array_equal(dx, [[[[5.0, 0.0], [0.0, 0.0]]]])


def test_max_pool_overlapping_windows_accumulate_at_a_shared_max():
    """Size 2, stride 1 on a 3x3 image whose max is the centre: all four windows pick it."""
    x = np.array([[[[1.0, 2.0, 3.0], [4.0, 9.0, 5.0], [6.0, 7.0, 8.0]]]])
    out, cache = F.max_pool_forward(x, 2, 1)
    np.testing.assert_array_equal(out, [[[[9.0, 9.0], [9.0, 9.0]]]])
    dx = F.max_pool_backward(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]), cache)
    expected = np.zeros((1, 1, 3, 3))
    expected[0, 0, 1, 1] = 10.0
    np.testing.assert_array_equal(dx, expected)


def test_max_pool_reshape_and_im2col_paths_agree(rng, dtype):
    x = random_array(rng, (2, 3, 6, 4), dtype)
    x[0, 0, :2, :2] = 1.0  # a tied window: both paths must pick the same element
    fast_out, fast_cache = F.max_pool_forward_reshape(x, 2)
    general_out, general_cache = F.max_pool_forward_im2col(x, 2, 2)
    np.testing.assert_array_equal(fast_out, general_out)
    dout = random_array(rng, fast_out.shape, dtype)
    np.testing.assert_array_equal(F.max_pool_backward(dout, fast_cache), F.max_pool_backward(dout, general_cache))


# ----------------------------------------------------------------------------
# Batch norm semantics
# ----------------------------------------------------------------------------
def test_batchnorm_training_step_by_hand():
    """x = [1, 2, 3, 6]: mean 3, biased var 3.5, unbiased var 14/3; momentum 0.1 from (0, 1)."""
    x = np.array([[1.0], [2.0], [3.0], [6.0]])
    running_mean, running_var = np.array([0.0]), np.array([1.0])
    out, _ = F.batchnorm_forward(x, np.array([1.0]), np.array([0.0]), running_mean, running_var, momentum=0.1, eps=1e-5)
    np.testing.assert_allclose(out, (x - 3.0) / np.sqrt(3.5 + 1e-5), rtol=1e-14)
    np.testing.assert_allclose(running_mean, [0.9 * 0.0 + 0.1 * 3.0], rtol=1e-14)
    np.testing.assert_allclose(running_var, [0.9 * 1.0 + 0.1 * 14.0 / 3.0], rtol=1e-14)


def test_spatial_batchnorm_running_statistics_follow_the_pytorch_update(rng, dtype, forward_tolerance):
    C, momentum = 3, 0.3
    running_mean, running_var = np.zeros(C, dtype), np.ones(C, dtype)
    expected_mean, expected_var = np.zeros(C), np.ones(C)
    gamma, beta = np.ones(C, dtype), np.zeros(C, dtype)
    for _ in range(3):
        x = (2.0 * rng.standard_normal((2, C, 3, 4)) + 1.0).astype(dtype)
        F.spatial_batchnorm_forward(x, gamma, beta, running_mean, running_var, momentum=momentum)
        batch_mean, _, batch_unbiased_var = naive_batch_statistics(naive_channel_rows(x))
        expected_mean = (1 - momentum) * expected_mean + momentum * batch_mean
        expected_var = (1 - momentum) * expected_var + momentum * batch_unbiased_var
    np.testing.assert_allclose(running_mean, expected_mean, **forward_tolerance)
    np.testing.assert_allclose(running_var, expected_var, **forward_tolerance)


def test_spatial_batchnorm_eval_uses_running_statistics_and_ignores_the_batch(rng):
    gamma, beta = random_array(rng, 2), random_array(rng, 2)
    running_mean, running_var = random_array(rng, 2), 0.5 + rng.random(2)
    buffers_before = (running_mean.copy(), running_var.copy())
    x = random_array(rng, (4, 2, 3, 3))
    out, _ = F.spatial_batchnorm_forward(x, gamma, beta, running_mean, running_var, training=False)
    alone, _ = F.spatial_batchnorm_forward(x[1:2], gamma, beta, running_mean, running_var, training=False)
    np.testing.assert_array_equal(out[1:2], alone)
    np.testing.assert_array_equal(running_mean, buffers_before[0])
    np.testing.assert_array_equal(running_var, buffers_before[1])
    # Training mode on the same batch normalises with the batch's own statistics instead.
    train_out, _ = F.spatial_batchnorm_forward(x, gamma, beta, running_mean.copy(), running_var.copy())
    normalised = (train_out - beta[None, :, None, None]) / gamma[None, :, None, None]
    np.testing.assert_allclose(normalised.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
    assert not np.allclose(train_out, out)


def test_batchnorm_training_needs_more_than_one_value_per_feature(rng):
    with pytest.raises(ValueError, match=r"more than one value per channel.*x shape \(1, 2, 1, 1\)"):
        F.spatial_batchnorm_forward(random_array(rng, (1, 2, 1, 1)), np.ones(2), np.zeros(2), np.zeros(2), np.ones(2))


# ----------------------------------------------------------------------------
# Dropout semantics
# ----------------------------------------------------------------------------
def test_dropout_is_the_identity_in_eval(rng, dtype):
    x = random_array(rng, (3, 4), dtype)
    out, cache = F.dropout_forward(x, 0.5, False, rng)
    np.testing.assert_array_equal(out, x)
    assert out is not x
    dout = random_array(rng, (3, 4), dtype)
    np.testing.assert_array_equal(F.dropout_backward(dout, cache), dout)


def test_dropout_scales_kept_units_by_exactly_one_over_keep_probability(rng, dtype):
    p = 0.3
    x = away_from_zero(rng, (100, 100), dtype)
    out, cache = F.dropout_forward(x, p, True, np.random.default_rng(5))
    kept = out != 0
    np.testing.assert_array_equal(out[kept], x[kept] * dtype.type(1.0 / (1.0 - p)))
    assert abs(kept.mean() - (1 - p)) < 0.02  # 10,000 draws: the standard deviation is 0.005
    dout = random_array(rng, x.shape, dtype)
    dx = F.dropout_backward(dout, cache)
    np.testing.assert_array_equal(dx[kept], dout[kept] * dtype.type(1.0 / (1.0 - p)))
    np.testing.assert_array_equal(dx[~kept], 0)
    again, _ = F.dropout_forward(x, p, True, np.random.default_rng(5))
    np.testing.assert_array_equal(again, out)  # same seed, same mask
    other, _ = F.dropout_forward(x, p, True, np.random.default_rng(6))
    assert not np.array_equal(other, out)


@pytest.mark.parametrize("p, error", [(1.0, ValueError), (-0.1, ValueError), ("0.5", TypeError)])
def test_dropout_rejects_bad_probabilities(p, error, rng):
    with pytest.raises(error, match="p must be"):
        F.dropout_forward(np.ones((2, 2)), p, True, rng)


# ----------------------------------------------------------------------------
# Bad input raises, naming the argument and the shapes
# ----------------------------------------------------------------------------
def conv_arrays(rng, x_shape=(2, 3, 5, 5), w_shape=(4, 3, 3, 3), dtype=np.float64):
    return random_array(rng, x_shape, dtype), random_array(rng, w_shape, dtype), random_array(rng, w_shape[0], dtype)


def test_conv_rejects_wrong_ndim(rng):
    x, w, b = conv_arrays(rng)
    with pytest.raises(ValueError, match=r"x must be 4-D \(N, C, H, W\), got shape \(3, 5, 5\)"):
        F.conv_forward(x[0], w, b)
    with pytest.raises(ValueError, match=r"w must be 4-D \(F, C, KH, KW\), got shape \(4, 3, 3\)"):
        F.conv_forward(x, w[:, 0], b)


def test_conv_rejects_channel_mismatch(rng):
    x, w, b = conv_arrays(rng, w_shape=(4, 2, 3, 3))
    message = r"channel mismatch: x has C = 3 .*x shape \(2, 3, 5, 5\).*w shape \(4, 2, 3, 3\)"
    with pytest.raises(ValueError, match=message):
        F.conv_forward(x, w, b)


def test_conv_rejects_a_kernel_larger_than_the_padded_input(rng):
    x, w, b = conv_arrays(rng, x_shape=(1, 3, 3, 4), w_shape=(2, 3, 5, 3))
    message = r"kernel \(5, 3\).*w shape \(2, 3, 5, 3\).*padded input \(3, 4\).*x shape \(1, 3, 3, 4\)"
    with pytest.raises(ValueError, match=message):
        F.conv_forward(x, w, b, pad=0)
    out, _ = F.conv_forward(x, w, b, pad=1)  # padded to 5x6 the kernel fits
    assert out.shape == (1, 2, 1, 4)


@pytest.mark.parametrize("stride", [0, -1])
def test_conv_rejects_non_positive_stride(stride, rng):
    with pytest.raises(ValueError, match=f"stride must be >= 1, got {stride}"):
        F.conv_forward(*conv_arrays(rng), stride=stride)


def test_conv_rejects_negative_pad_and_mismatched_bias_and_dtype(rng):
    x, w, b = conv_arrays(rng)
    with pytest.raises(ValueError, match="pad must be >= 0, got -1"):
        F.conv_forward(x, w, b, pad=-1)
    with pytest.raises(ValueError, match=r"b must have shape \(4,\), got \(3,\)"):
        F.conv_forward(x, w, b[:3])
    with pytest.raises(TypeError, match=r"x must have the dtype of w \(float64\), got float32"):
        F.conv_forward(x.astype(np.float32), w, b)


def test_affine_rejects_mismatched_features(rng):
    with pytest.raises(ValueError, match=r"x has 6 features.*x shape \(2, 2, 3\).*D_in = 5 \(w shape \(5, 4\)\)"):
        F.affine_forward(random_array(rng, (2, 2, 3)), random_array(rng, (5, 4)), random_array(rng, 4))


def test_max_pool_reshape_rejects_windows_that_do_not_tile(rng):
    with pytest.raises(ValueError, match=r"size=2 does not divide the spatial size \(5, 6\) of x shape \(1, 2, 5, 6\)"):
        F.max_pool_forward_reshape(random_array(rng, (1, 2, 5, 6)), 2)


def test_max_pool_rejects_bad_arguments(rng):
    with pytest.raises(ValueError, match=r"x must be 4-D \(N, C, H, W\), got shape \(2, 4, 4\)"):
        F.max_pool_forward(random_array(rng, (2, 4, 4)))
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        F.max_pool_forward(random_array(rng, (1, 1, 4, 4)), 2, 0)
    with pytest.raises(ValueError, match=r"pool size 5 is larger than .*\(4, 6\).*x shape \(1, 1, 4, 6\)"):
        F.max_pool_forward(random_array(rng, (1, 1, 4, 6)), 5, 1)


def test_batchnorm_rejects_mismatched_parameters(rng):
    x = random_array(rng, (4, 3))
    with pytest.raises(ValueError, match=r"gamma must have shape \(3,\) to match x shape \(4, 3\), got \(2,\)"):
        F.batchnorm_forward(x, np.ones(2), np.zeros(3), np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match=r"x must be 4-D \(N, C, H, W\), got shape \(4, 3\)"):
        F.spatial_batchnorm_forward(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3))
    message = r"running_var must have shape \(2,\) to match x shape \(4, 2, 3, 3\), got \(3,\)"
    with pytest.raises(ValueError, match=message):
        F.spatial_batchnorm_forward(random_array(rng, (4, 2, 3, 3)), np.ones(2), np.zeros(2), np.zeros(2), np.ones(3))
    with pytest.raises(ValueError, match=r"more than one value per feature, got x shape \(1, 3\)"):
        F.batchnorm_forward(x[:1], np.ones(3), np.zeros(3), np.zeros(3), np.ones(3))


# ----------------------------------------------------------------------------
# Batch norm + tiled max pool in one pass = the two layers apart
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("x_shape, size", [((3, 4, 6, 8), 2), ((1, 1, 6, 3), 3), ((2, 3, 5, 5), 1), ((2, 2, 2, 2), 2)])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
def test_fused_batchnorm_max_pool_equals_the_two_layers(training, x_shape, size, compiled, rng, dtype, monkeypatch):
    from npsoftmax import kernels

    if compiled and not kernels.HAVE_EXTENSION:
        pytest.skip("the Cython extension is not built")
    if not compiled:
        monkeypatch.setattr(kernels, "_extension", None)
    C = x_shape[1]
    x = (2 * rng.standard_normal(x_shape) + 1).astype(dtype)
    gamma, beta = (rng.standard_normal(C) + 0.5).astype(dtype), rng.standard_normal(C).astype(dtype)
    buffers = [(rng.standard_normal(C).astype(dtype), (0.5 + rng.random(C)).astype(dtype)) for _ in range(2)]
    buffers[1] = (buffers[0][0].copy(), buffers[0][1].copy())
    fused, fused_cache = F.spatial_batchnorm_max_pool_forward(x, gamma, beta, *buffers[0], size, training=training)
    normalised, norm_cache = F.spatial_batchnorm_forward(x, gamma, beta, *buffers[1], training=training)
    pooled, pool_cache = F.max_pool_forward(normalised, size, size)
    np.testing.assert_array_equal(fused, pooled)  # the same formula and comparisons: identical
    np.testing.assert_array_equal(fused_cache.argmax, pool_cache.argmax)
    for (fused_buffer, buffer) in zip(buffers[0], buffers[1]):
        np.testing.assert_array_equal(fused_buffer, buffer)
    dout = rng.standard_normal(fused.shape).astype(dtype)
    got = F.spatial_batchnorm_max_pool_backward(dout, fused_cache)
    expected = F.spatial_batchnorm_backward(F.max_pool_backward(dout, pool_cache), norm_cache)
    for name, g, e in zip(("dx", "dgamma", "dbeta"), got, expected):
        assert g.dtype == dtype, name
        np.testing.assert_allclose(g, e, rtol=2e-5 if dtype == np.float32 else 1e-12,
                                   atol=2e-6 if dtype == np.float32 else 1e-13, err_msg=name)


def test_fused_batchnorm_max_pool_treats_nan_like_the_pool(rng, dtype):
    x = rng.standard_normal((2, 2, 4, 4)).astype(dtype)
    x[0, 1, 2, 3] = np.nan
    gamma, beta = np.ones(2, dtype), np.zeros(2, dtype)
    stats = [(np.zeros(2, dtype), np.ones(2, dtype)) for _ in range(2)]
    fused, cache = F.spatial_batchnorm_max_pool_forward(x, gamma, beta, *stats[0], 2, training=False)
    pooled, pool_cache = F.max_pool_forward(F.spatial_batchnorm_forward(x, gamma, beta, *stats[1], training=False)[0])
    np.testing.assert_array_equal(fused, pooled)  # NaN in the same window, the rest equal
    np.testing.assert_array_equal(cache.argmax, pool_cache.argmax)
    assert cache.argmax[0, 1, 1, 1] == 1  # the NaN's place in its window, as numpy.argmax


def test_fused_batchnorm_max_pool_rejects_pools_that_do_not_tile_and_wrong_gradients(rng):
    x = rng.standard_normal((2, 3, 4, 6))
    args = (np.ones(3), np.zeros(3), np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match=r"size must be at most 8 and divide the spatial size \(4, 6\)"):
        F.spatial_batchnorm_max_pool_forward(x, *args, 4)
    with pytest.raises(ValueError, match="size must be at most 8"):
        F.spatial_batchnorm_max_pool_forward(rng.standard_normal((1, 3, 9, 9)), *args, 9)
    out, cache = F.spatial_batchnorm_max_pool_forward(x, *args, 2)
    with pytest.raises(ValueError, match="dout"):
        F.spatial_batchnorm_max_pool_backward(np.ones((2, 3, 4, 6)), cache)
