# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Convolution as one matrix product: im2col and col2im
#
# A convolution layer slides $F$ filters of shape $(C, K_H, K_W)$ over a zero-padded image
# and takes a dot product at every position:
# $$\mathrm{out}[n, f, o_h, o_w] = b_f + \sum_{c, i, j} w[f, c, i, j]\;
# x_{\text{pad}}[n, c,\; o_h s + i,\; o_w s + j],$$
# with stride $s$ and padding $p$, so the output is $O_H = \lfloor (H + 2p - K_H)/s \rfloor + 1$
# rows high (likewise $O_W$). (Strictly this is a cross-correlation — the filter is not
# flipped — exactly as in PyTorch.)
#
# Six nested loops are slow in Python. **im2col** ("image to columns") copies every
# receptive field into one column of a matrix, so that the whole convolution becomes a single
# matrix product (GEMM), which BLAS does at close to peak speed. In this notebook:
# what im2col does (drawn), conv as one GEMM, the backward pass through **col2im**, a gradient
# check, and the speed of the package's Cython kernel against its NumPy reference and a naive loop.

# %%
import os
import time

import numpy as np
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle
from threadpoolctl import threadpool_limits

from npsoftmax.functional import conv_algorithm, conv_backward, conv_forward
from npsoftmax.gradcheck import LAYER_TOLERANCE, check_module_gradients, gradient_errors
from npsoftmax.kernels import BACKEND, col2im, col2im_numpy, im2col, im2col_numpy
from npsoftmax.layers import Conv2d

rng = np.random.default_rng(0)
# One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
# which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
thread_limits = threadpool_limits(limits=1)
print("im2col backend:", BACKEND)   # "cython" when the extension is built, else "numpy"

# %% [markdown]
# ## What im2col does
#
# The layout (see `npsoftmax/kernels.py`): for an input $x$ of shape $(N, C, H, W)$,
# `im2col(x, KH, KW, stride, pad)` returns `cols` of shape $(C K_H K_W,\ N O_H O_W)$:
#
# * **column** $(n\,O_H + o_h)\,O_W + o_w$ is the receptive field of output pixel $(o_h, o_w)$
#   of image $n$, flattened;
# * **row** $(c\,K_H + i)\,K_W + j$ holds channel $c$ at kernel offset $(i, j)$.
#
# The picture: a $4\times4$ one-channel image, $2\times2$ windows, stride 1, gives
# $3\times3 = 9$ windows, so `cols` is $4 \times 9$. Three windows and their columns are outlined
# in matching colours. Neighbouring windows overlap, so most pixels appear in several columns.

# %%
image = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)    # N = C = 1, H = W = 4
cols = im2col(image, 2, 2, stride=1, pad=0)
print("cols shape:", cols.shape)

fig, (image_axis, cols_axis) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 2.2]})
for axis, values in ((image_axis, image[0, 0]), (cols_axis, cols)):
    axis.imshow(values, cmap="Greys", vmin=-10, vmax=40)
    for (row, column), value in np.ndenumerate(values):
        axis.text(column, row, f"{value:.0f}", ha="center", va="center", fontsize=11)
for column, color in zip([0, 4, 8], ["tab:blue", "tab:orange", "tab:red"]):
    o_h, o_w = divmod(column, 3)
    image_axis.add_patch(Rectangle((o_w - 0.45, o_h - 0.45), 1.9, 1.9, fill=False, edgecolor=color, lw=3))
    cols_axis.add_patch(Rectangle((column - 0.45, -0.45), 0.9, 3.9, fill=False, edgecolor=color, lw=3))
image_axis.set(title="x (4 x 4), three 2 x 2 windows", xticks=[], yticks=[])
cols_axis.set(title="cols = im2col(x): one column per window", xlabel="column (n, o_h, o_w)",
              ylabel="row (c, i, j)", yticks=range(4), yticklabels=["(0,0,0)", "(0,0,1)", "(0,1,0)", "(0,1,1)"],
              xticks=range(9), xticklabels=[f"(0,{r},{c})" for r in range(3) for c in range(3)])
fig.tight_layout()
plt.show()

np.testing.assert_array_equal(cols[:, 0], [0, 1, 4, 5])    # the top-left window, row by row
np.testing.assert_array_equal(cols[:, 8], [10, 11, 14, 15])  # the bottom-right window

# %% [markdown]
# An independent oracle for the layout: a plain loop over windows that copies each receptive
# field into a column. We compare it with the package on an awkward case — batch of 2,
# 3 channels, non-square kernel, stride 2, padding 1 — for both the dispatching `im2col`
# (the Cython kernel when built) and the NumPy reference `im2col_numpy`.

# %%
def naive_im2col(x, kernel_height, kernel_width, stride, pad):
    # One column per window, in (n, o_h, o_w) order; each column is the window's (c, i, j) values.
    N, C, H, W = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_height = (H + 2 * pad - kernel_height) // stride + 1
    out_width = (W + 2 * pad - kernel_width) // stride + 1
    columns = []
    for n in range(N):
        for o_h in range(out_height):
            for o_w in range(out_width):
                window = padded[n, :, o_h * stride:o_h * stride + kernel_height,
                                o_w * stride:o_w * stride + kernel_width]
                columns.append(window.reshape(-1))
    return np.stack(columns, axis=1)

x = rng.standard_normal((2, 3, 5, 7))
for dtype in (np.float64, np.float32):
    expected = naive_im2col(x.astype(dtype), 3, 2, stride=2, pad=1)
    for unfold in (im2col, im2col_numpy):
        result = unfold(x.astype(dtype), 3, 2, stride=2, pad=1)
        assert result.dtype == dtype
        np.testing.assert_array_equal(result, expected)
print("cols shape for x", x.shape, "kernel (3, 2), stride 2, pad 1:", expected.shape)

# %% [markdown]
# ## Convolution = one GEMM
#
# Reshape the filters to a matrix $W_{\text{rows}}$ of shape $(F,\ C K_H K_W)$: row $f$ is
# filter $f$ flattened in the same $(c, i, j)$ order as the rows of `cols`. Then
# $$\mathrm{out}_{\text{rows}} = W_{\text{rows}}\; \mathrm{cols} + b \quad (F,\ N O_H O_W),$$
# and a reshape/transpose to $(N, F, O_H, O_W)$ gives the output: entry $(f, \text{column})$ is
# exactly the dot product of filter $f$ with one receptive field. That is all
# `npsoftmax.functional.conv_forward` does. We check it against the six-loop definition.

# %%
def naive_conv(x, w, b, stride, pad):
    # The definition, loop by loop: an independent oracle for conv_forward.
    N, C, H, W = x.shape
    F, _, kernel_height, kernel_width = w.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((N, F, (H + 2 * pad - kernel_height) // stride + 1, (W + 2 * pad - kernel_width) // stride + 1))
    for n in range(N):
        for f in range(F):
            for o_h in range(out.shape[2]):
                for o_w in range(out.shape[3]):
                    window = padded[n, :, o_h * stride:o_h * stride + kernel_height,
                                    o_w * stride:o_w * stride + kernel_width]
                    out[n, f, o_h, o_w] = np.sum(window * w[f]) + b[f]
    return out

x = rng.standard_normal((2, 3, 7, 6))
w = rng.standard_normal((4, 3, 3, 2))        # F = 4 filters, non-square 3 x 2 kernel
b = rng.standard_normal(4)
out, cache = conv_forward(x, w, b, stride=2, pad=1)
print("out shape:", out.shape)
np.testing.assert_allclose(out, naive_conv(x, w, b, stride=2, pad=1), rtol=1e-12, atol=1e-12)

# %% [markdown]
# ## Backward: col2im, the adjoint of im2col
#
# Forward: $\mathrm{cols} = \mathrm{im2col}(x)$, $\mathrm{out}_{\text{rows}} = W_{\text{rows}}\,\mathrm{cols} + b$.
# The GEMM's backward is the same as an affine layer's (notebook 02):
# $$dW_{\text{rows}} = d\mathrm{out}_{\text{rows}}\; \mathrm{cols}^\top, \qquad
# d\mathrm{cols} = W_{\text{rows}}^\top\; d\mathrm{out}_{\text{rows}}, \qquad db = \textstyle\sum_{\text{columns}} d\mathrm{out}_{\text{rows}} .$$
# What remains is the gradient through im2col itself. im2col is a *linear* map
# $\mathrm{cols} = A\,x$, where $A$ is a 0/1 matrix that copies pixels; its backward is the
# transpose $A^\top$, which **adds** every column entry back into the pixel it was copied from.
# That is `col2im`. A pixel covered by several windows receives the sum of their
# gradients — the chain rule for a variable used several times.
#
# "Adjoint" can be checked with two random vectors: $\langle A x, c\rangle = \langle x, A^\top c\rangle$.

# %%
x = rng.standard_normal((2, 3, 5, 7))
c = rng.standard_normal(im2col(x, 3, 2, stride=2, pad=1).shape)
left = np.sum(im2col(x, 3, 2, stride=2, pad=1) * c)
right = np.sum(x * col2im(c, x.shape, 3, 2, stride=2, pad=1))
print(f"<im2col(x), c> = {left:.12f}\n<x, col2im(c)> = {right:.12f}")
np.testing.assert_allclose(left, right, rtol=1e-12)
np.testing.assert_allclose(col2im(c, x.shape, 3, 2, stride=2, pad=1),
                           col2im_numpy(c, x.shape, 3, 2, stride=2, pad=1), rtol=1e-12, atol=1e-12)

# %% [markdown]
# Fold a matrix of ones back with col2im and every pixel receives the **number of windows
# that cover it**. With $3\times3$ windows, stride 1 and padding 1 on a $6\times6$ image, a
# corner pixel is in 4 windows, an edge pixel in 6 and an interior pixel in 9 — so an interior
# pixel's gradient is a sum of 9 contributions.

# %%
shape = (1, 1, 6, 6)
coverage = col2im(np.ones(im2col(np.zeros(shape), 3, 3, stride=1, pad=1).shape), shape, 3, 3, stride=1, pad=1)[0, 0]

fig, axis = plt.subplots(figsize=(3.6, 3.4))
axis.imshow(coverage, cmap="viridis", vmin=0, vmax=9)
for (row, column), value in np.ndenumerate(coverage):
    axis.text(column, row, f"{value:.0f}", ha="center", va="center", color="white", fontsize=12)
axis.set(title="col2im(ones): windows per pixel", xticks=[], yticks=[])
plt.show()

assert coverage[0, 0] == 4 and coverage[0, 2] == 6 and coverage[2, 2] == 9

# %% [markdown]
# ## Gradient check
#
# `conv_backward(dout, cache)` returns `dx, dw, db`. We check all three against central
# differences of $L = \sum \mathrm{out} \odot d\mathrm{out}$ with a random `dout`, on the
# awkward case above (stride 2, padding 1, non-square kernel), then the `Conv2d` module.

# %%
x = rng.standard_normal((2, 3, 7, 6))
w = rng.standard_normal((4, 3, 3, 2))
b = rng.standard_normal(4)
out, cache = conv_forward(x, w, b, stride=2, pad=1)
dout = rng.standard_normal(out.shape)
dx, dw, db = conv_backward(dout, cache)
errors = gradient_errors(lambda: np.sum(conv_forward(x, w, b, stride=2, pad=1)[0] * dout),
                         {"x": x, "w": w, "b": b}, {"x": dx, "w": dw, "b": db})
print("conv_backward:", {name: f"{error:.1e}" for name, error in errors.items()})
assert all(error < LAYER_TOLERANCE for error in errors.values())

layer = Conv2d(2, 3, (2, 3), stride=1, pad=1, rng=rng, dtype=np.float64)
module_errors = check_module_gradients(layer, rng.standard_normal((2, 2, 5, 4)), rng)
print("Conv2d module:", {name: f"{error:.1e}" for name, error in module_errors.items()})
assert all(error < LAYER_TOLERANCE for error in module_errors.values())

# %% [markdown]
# One subtlety the check also covers: when the stride does not tile the padded input, the
# last partial window is dropped (floor division, as in PyTorch), so the last rows or
# columns of $x$ feed no output and correctly receive a zero gradient.

# %%
x = rng.standard_normal((1, 1, 6, 6))
w = rng.standard_normal((1, 1, 3, 3))
out, cache = conv_forward(x, w, None, stride=2, pad=0)      # windows start at rows 0 and 2: row 5 is unused
dx, dw, _ = conv_backward(rng.standard_normal(out.shape), cache)
print("out shape", out.shape, "| sum |dx| over the last row and the last column:",
      np.abs(dx[0, 0, 5]).sum(), np.abs(dx[0, 0, :, 5]).sum())
assert out.shape == (1, 1, 2, 2)
assert np.all(dx[0, 0, 5] == 0) and np.all(dx[0, 0, :, 5] == 0) and np.any(dx[0, 0, 4] != 0)

# %% [markdown]
# ## Speed: naive loop vs NumPy reference vs the Cython kernel
#
# A CIFAR-sized case: 16 images, 16 channels, $32 \times 32$, $3 \times 3$ kernel, padding 1, in
# float32. `cols` is $(144,\ 16384)$, 9.4 MB. We time
#
# * the naive Python loop above (one slice per window),
# * the NumPy reference `im2col_numpy` (`sliding_window_view` + one transposing copy),
# * the dispatching `im2col`: the compiled Cython kernel when it is built (one C loop, one
#   image per OpenMP thread), with one thread like everything else in this notebook, and
#   with one thread per core.
#
# All of them must produce the same matrix first. The candidates are timed interleaved
# (A, B, C, A, B, C, ...) and we report medians, on whatever machine executes this notebook —
# read the *ratios*, not the milliseconds. The copy is memory-bound, so the NumPy reference,
# a single strided copy inside NumPy, is already close to the compiled loop; the big factor
# is the price of the Python loop. Threads help on an idle multi-core machine, but a parallel
# region waits for its slowest thread, so on a busy one (a shared CI runner, a laptop doing
# something else) the multi-threaded row can be the slowest of the compiled ones.
# `benchmarks/bench_im2col.py` measures this more carefully.

# %% tags=["varies"]
# Median seconds per call of each zero-argument function, timed A, B, C, A, B, C, ...
# after warm-up calls (page faults, caches, thread start-up): the package's own helper.
from npsoftmax.timing import interleaved_medians

x_big = rng.standard_normal((16, 16, 32, 32)).astype(np.float32)
reference = naive_im2col(x_big, 3, 3, 1, 1)
np.testing.assert_array_equal(im2col_numpy(x_big, 3, 3, 1, 1), reference)
np.testing.assert_array_equal(im2col(x_big, 3, 3, 1, 1), reference)

seconds = interleaved_medians({
    "naive loop": lambda: naive_im2col(x_big, 3, 3, 1, 1),
    "NumPy reference": lambda: im2col_numpy(x_big, 3, 3, 1, 1),
    f"im2col ({BACKEND}, 1 thread)": lambda: im2col(x_big, 3, 3, 1, 1),
}, repeats=7)
if BACKEND == "cython":
    cores = os.cpu_count()
    with threadpool_limits(limits=cores, user_api="openmp"):
        threaded = interleaved_medians({"threaded": lambda: im2col(x_big, 3, 3, 1, 1)}, repeats=7)
    seconds[f"im2col (cython, {cores} threads)"] = threaded["threaded"]

slowest = seconds["naive loop"]
for name, value in seconds.items():
    print(f"{name:<28} {1e3 * value:8.2f} ms   {slowest / value:6.1f}x the naive loop's speed")

fig, axis = plt.subplots(figsize=(6.5, 2.8))
axis.barh(list(seconds), [1e3 * value for value in seconds.values()],
          color=["tab:gray", "tab:blue", "tab:green", "tab:olive"][:len(seconds)])
axis.set_xscale("log")
axis.set(xlabel="milliseconds per call (log scale)", title="im2col of a (16, 16, 32, 32) float32 batch")
axis.invert_yaxis()
plt.show()

# %% [markdown]
# ### Fewer multiplications: Winograd's F(2x2, 3x3)
#
# im2col spends 9 multiply-adds per output pixel, input channel and filter (a 3x3 window).
# Winograd's minimal filtering does the same work with fewer. In one dimension, two outputs
# of a 3-tap filter $g$ over four inputs $d_0 \dots d_3$ take 6 multiplications directly and
# 4 this way:
#
# $$m_1 = (d_0 - d_2) g_0,\quad m_2 = (d_1 + d_2)\tfrac{g_0 + g_1 + g_2}{2},\quad
#   m_3 = (d_2 - d_1)\tfrac{g_0 - g_1 + g_2}{2},\quad m_4 = (d_1 - d_3) g_2$$
# $$y_0 = m_1 + m_2 + m_3, \qquad y_1 = m_2 - m_3 - m_4 .$$
#
# The filter terms depend only on $g$: they are computed once per filter, not per pixel.
# Nested over rows and columns, a 4x4 input tile gives a 2x2 output block with 16
# multiplications instead of 36. Summed over input channels, entry $k$ of every tile becomes
# one matrix product $U_k (F, C) \cdot V_k (C, \text{tiles})$: 16 small GEMMs with 2.25x
# fewer multiply-adds than im2col's one (`npsoftmax/winograd.py` has the whole derivation,
# backward pass included). First the 1-D formula against the direct sum:

# %%
d = rng.standard_normal(4)
g = rng.standard_normal(3)
direct = np.array([d[0] * g[0] + d[1] * g[1] + d[2] * g[2], d[1] * g[0] + d[2] * g[1] + d[3] * g[2]])
m1, m4 = (d[0] - d[2]) * g[0], (d[1] - d[3]) * g[2]
m2, m3 = (d[1] + d[2]) * (g[0] + g[1] + g[2]) / 2, (d[2] - d[1]) * (g[0] - g[1] + g[2]) / 2
winograd_1d = np.array([m1 + m2 + m3, m2 - m3 - m4])
print("direct:  ", direct, "\nWinograd:", winograd_1d)
np.testing.assert_allclose(winograd_1d, direct, rtol=1e-12)

# %% [markdown]
# `conv_forward` runs it for 3x3, stride-1 kernels: `algorithm="auto"` picks it when the layer
# has at least 16 input channels (with 3, a first layer, the 16 products are too thin to
# gain) and an output of at least 8x8 pixels (on tiny images the transforms' overheads win). Both algorithms compute the same convolution and its exact gradients, up to rounding:

# %%
x_w = rng.standard_normal((4, 16, 9, 10))
w_w, b_w = rng.standard_normal((8, 16, 3, 3)), rng.standard_normal(8)
dout_w = rng.standard_normal((4, 8, 9, 10))
results = {}
for algorithm in ("im2col", "winograd"):
    out_w, cache_w = conv_forward(x_w, w_w, b_w, stride=1, pad=1, algorithm=algorithm)
    results[algorithm] = (out_w, *conv_backward(dout_w, cache_w))
for name, a, b in zip(("out", "dx", "dw", "db"), results["im2col"], results["winograd"]):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
    print(f"{name:>3} {a.shape}: im2col and Winograd agree to 1e-11")
print("auto picks:", conv_algorithm(w_w.shape, 1), "for 16 input channels,",
      conv_algorithm((8, 3, 3, 3), 1), "for 3")

# %% [markdown]
# ### Takeaways
# * im2col turns a convolution into one GEMM: `out_rows = w.reshape(F, -1) @ cols`.
# * Its backward is col2im, the adjoint, which *adds* overlapping contributions — exactly the
#   chain rule for pixels shared by several windows.
# * The naive loop is the oracle, the NumPy reference documents the layout, the Cython kernel
#   is the fast path; all three agree bit for bit.
# * For 3x3, stride-1 kernels Winograd's F(2x2, 3x3) trades multiplications for additions:
#   16 products per 2x2 output block instead of 36, the same convolution up to rounding.

# %% [markdown]
# **Next:** [04_pooling_and_batchnorm.ipynb](04_pooling_and_batchnorm.ipynb) — max-pool gradient routing and batch norm's backward.
