"""im2col/col2im: compiled kernels vs the NumPy reference vs a naive loop, both dtypes."""

import numpy as np
import pytest

from npsoftmax import kernels

GEOMETRIES = [
    # (N, C, H, W, KH, KW, stride, pad)
    (2, 3, 7, 9, 3, 5, 2, 1),  # non-square kernel, stride 2, padding 1
    (1, 1, 5, 5, 5, 5, 1, 0),  # batch 1, one channel, kernel = image
    (3, 2, 8, 6, 3, 3, 1, 2),  # padding 2
    (2, 3, 9, 9, 2, 3, 3, 0),  # stride 3 that does not tile (floor)
    (2, 2, 4, 4, 3, 3, 2, 2),  # padding larger than half the kernel
    (1, 4, 6, 11, 1, 1, 1, 0),  # 1x1 kernel
]


def naive_im2col(x, kernel_height, kernel_width, stride, pad):
    """Loop over every (row, column) of cols: the definition, written out."""
    N, C, H, W = x.shape
    OH = (H + 2 * pad - kernel_height) // stride + 1
    OW = (W + 2 * pad - kernel_width) // stride + 1
    cols = np.zeros((C * kernel_height * kernel_width, N * OH * OW), dtype=x.dtype)
    for c in range(C):
        for i in range(kernel_height):
            for j in range(kernel_width):
                for n in range(N):
                    for oh in range(OH):
                        for ow in range(OW):
                            h, w = oh * stride + i - pad, ow * stride + j - pad
                            if 0 <= h < H and 0 <= w < W:
                                row = (c * kernel_height + i) * kernel_width + j
                                cols[row, (n * OH + oh) * OW + ow] = x[n, c, h, w]
    return cols


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_reference_matches_naive_loop(geometry, dtype, rng):
    N, C, H, W, KH, KW, stride, pad = geometry
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    expected = naive_im2col(x, KH, KW, stride, pad)
    np.testing.assert_array_equal(kernels.im2col_numpy(x, KH, KW, stride, pad), expected)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_col2im_is_the_adjoint_of_im2col(geometry, dtype, rng):
    """<im2col(x), c> == <x, col2im(c)> for random x, c: col2im is the exact transpose."""
    N, C, H, W, KH, KW, stride, pad = geometry
    x = rng.standard_normal((N, C, H, W))
    cols = rng.standard_normal(kernels.im2col_numpy(x, KH, KW, stride, pad).shape)
    for col2im in (kernels.col2im_numpy, kernels.col2im):
        left = np.sum(kernels.im2col(x.astype(dtype), KH, KW, stride, pad) * cols)
        right = np.sum(x * col2im(cols.astype(dtype), x.shape, KH, KW, stride, pad))
        assert left == pytest.approx(right, rel=1e-5 if dtype == np.float32 else 1e-12)


def test_compiled_extension_is_used():
    """CI builds the extension: the fast path must be what the package dispatches to."""
    assert kernels.HAVE_EXTENSION, "npsoftmax._im2col is not built; run `pip install -e .`"
    assert kernels.BACKEND == "cython"


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cython_matches_numpy_fallback(geometry, dtype, rng):
    extension = pytest.importorskip("npsoftmax._im2col")
    N, C, H, W, KH, KW, stride, pad = geometry
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    cols = extension.im2col(x, KH, KW, stride, pad)
    assert cols.dtype == dtype
    np.testing.assert_array_equal(cols, kernels.im2col_numpy(x, KH, KW, stride, pad))

    upstream = rng.standard_normal(cols.shape).astype(dtype)
    folded = extension.col2im(upstream, N, C, H, W, KH, KW, stride, pad)
    assert folded.dtype == dtype
    # Summation order differs between the two, so equality is to rounding.
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(
        folded, kernels.col2im_numpy(upstream, x.shape, KH, KW, stride, pad), rtol=tolerance, atol=tolerance
    )


def test_non_contiguous_input_is_accepted(rng):
    x = rng.standard_normal((3, 5, 8, 8))[:, ::2, :, ::-1]
    np.testing.assert_array_equal(kernels.im2col(x, 3, 3, 1, 1), kernels.im2col_numpy(x, 3, 3, 1, 1))


def test_inputs_are_not_mutated(rng):
    x = rng.standard_normal((2, 3, 6, 6))
    x_copy = x.copy()
    cols = kernels.im2col(x, 3, 3, 1, 1)
    cols_copy = cols.copy()
    kernels.col2im(cols, x.shape, 3, 3, 1, 1)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(cols, cols_copy)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: kernels.im2col(x[0], 3, 3), r"x must be 4-D .*got shape \(3, 6, 6\)"),
        (lambda x: kernels.im2col(x, 3, 3, stride=0), r"stride must be >= 1, got 0"),
        (lambda x: kernels.im2col(x, 3, 3, stride=-2), r"stride must be >= 1, got -2"),
        (lambda x: kernels.im2col(x, 3, 3, pad=-1), r"pad must be >= 0, got -1"),
        (lambda x: kernels.im2col(x, 9, 3, pad=1), r"kernel \(9, 3\) is larger than the padded input \(8, 8\)"),
        (lambda x: kernels.col2im(np.zeros((5, 5)), x.shape, 3, 3), r"cols must have shape .* got \(5, 5\)"),
    ],
)
def test_bad_geometry_raises_value_error(call, message, rng):
    with pytest.raises(ValueError, match=message):
        call(rng.standard_normal((2, 3, 6, 6)))


def test_integer_input_raises_type_error():
    with pytest.raises(TypeError, match="x must be float32 or float64, got dtype int64"):
        kernels.im2col(np.zeros((1, 1, 4, 4), dtype=np.int64), 2, 2)


def test_without_the_extension_the_package_works_and_says_so_once():
    """Block the compiled module in a fresh interpreter: one warning, then a correct NumPy step."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["npsoftmax._im2col"] = None          # as if the extension was never built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import numpy as np
            import npsoftmax, npsoftmax.functional, npsoftmax.layers, npsoftmax.kernels as kernels
            from npsoftmax.models import build_model
            model = build_model("softmax", 10, (1, 8, 8), rng=np.random.default_rng(0), widths=(2, 3, 3),
                                feature_dim=4)
            loss = model.forward(np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32),
                                 np.array([1, 2, 3]))
            model.backward()
        messages = [str(w.message) for w in caught if "not built" in str(w.message)]
        print(kernels.BACKEND, len(messages), np.isfinite(loss))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["numpy", "1", "True"], result.stdout + result.stderr
