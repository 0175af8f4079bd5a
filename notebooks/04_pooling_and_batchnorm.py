# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Max pooling and batch normalisation
#
# Two layers of the CNN body whose backward passes are less obvious than their forward:
#
# * **max pooling** has no parameters and its gradient is a *routing* problem: each window's
#   gradient goes to the one element that was the maximum;
# * **batch normalisation** normalises with statistics *of the batch*, so every output
#   depends on every input of the batch, and the backward pass must follow the mean and the
#   variance too.
#
# Both are checked numerically with `npsoftmax.gradcheck`.

# %%
import numpy as np
import matplotlib.pyplot as plt
from threadpoolctl import threadpool_limits

from npsoftmax.functional import (batchnorm_backward, batchnorm_forward, max_pool_backward,
                                  max_pool_forward, spatial_batchnorm_backward,
                                  spatial_batchnorm_forward)
from npsoftmax.gradcheck import LAYER_TOLERANCE, check_module_gradients, gradient_errors
from npsoftmax.layers import BatchNorm2d, MaxPool2d

rng = np.random.default_rng(0)
# One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
# which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
thread_limits = threadpool_limits(limits=1)
np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. Max pooling: forward keeps the maximum, backward routes to it
#
# $2\times2$ pooling with stride 2 keeps the largest of every window:
# $\mathrm{out}[o_h, o_w] = \max_{i,j} x[2o_h + i,\ 2o_w + j]$. Locally the max is just *one*
# of its inputs, $\mathrm{out} = x_{a}$ with $a$ the argmax, so
# $$\frac{\partial\, \mathrm{out}}{\partial x_{k}} = [k = a]
# \qquad\Rightarrow\qquad dx_k = d\mathrm{out} \text{ if } k \text{ is its window's argmax, else } 0 .$$
# The forward pass records the argmax of each window (`cache`), and the backward pass
# scatters each `dout` entry to it: one write per window.

# %%
x = rng.permutation(16).astype(np.float64).reshape(1, 1, 4, 4)    # distinct values: no ties
out, cache = max_pool_forward(x, size=2, stride=2)
dout = np.array([[[[1.0, -2.0], [3.0, 0.5]]]])                   # distinct, signed upstream gradient
dx = max_pool_backward(dout, cache)

fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
panels = [(x[0, 0], "x (4 x 4)", "Greys", 24), (dout[0, 0], "dout (2 x 2)", "coolwarm", 4),
          (dx[0, 0], "dx = max_pool_backward(dout)", "coolwarm", 4)]
for axis, (values, title, colormap, limit) in zip(axes, panels):
    axis.imshow(values, cmap=colormap, vmin=-limit, vmax=limit)
    for (row, column), value in np.ndenumerate(values):
        axis.text(column, row, f"{value:g}", ha="center", va="center", fontsize=12)
    axis.set(title=title, xticks=[], yticks=[])
for axis in (axes[0], axes[2]):        # the 2 x 2 window grid
    axis.axhline(1.5, color="k", lw=2); axis.axvline(1.5, color="k", lw=2)
winners = np.argwhere(dx[0, 0] != 0)
axes[0].scatter(winners[:, 1], winners[:, 0], s=700, facecolors="none", edgecolors="tab:red", lw=2.5)
fig.suptitle("each window's gradient goes to its maximum (circled)")
fig.tight_layout()
plt.show()

windows = x[0, 0].reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(2, 2, 4)        # (o_h, o_w, 4 values)
np.testing.assert_array_equal(out[0, 0], windows.max(axis=2))
dx_windows = dx[0, 0].reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(2, 2, 4)
np.testing.assert_array_equal(dx_windows.sum(axis=2), dout[0, 0])                  # nothing lost or added
np.testing.assert_array_equal(np.abs(dx_windows).argmax(axis=2), windows.argmax(axis=2))   # at the argmax ...
assert np.count_nonzero(dx) == 4                                                     # ... and only there

# %% [markdown]
# **Overlapping windows accumulate.** With $3\times3$ windows and stride 2 neighbouring windows
# share a row or column. If one pixel is the maximum of several windows, it receives the
# sum of their gradients (the same rule as col2im in notebook 03). **Ties** go to the first
# maximum in row-major order, as in PyTorch: exactly one element per window gets the gradient.

# %%
x = rng.standard_normal((1, 1, 5, 5))
x[0, 0, 2, 2] = 10.0                     # the centre pixel belongs to all four 3 x 3 windows
out, cache = max_pool_forward(x, size=3, stride=2)
dout = rng.standard_normal(out.shape)
dx = max_pool_backward(dout, cache)
print("out shape", out.shape, "| dx at the centre:", dx[0, 0, 2, 2], "= sum(dout):", dout.sum())
np.testing.assert_allclose(dx[0, 0, 2, 2], dout.sum(), rtol=1e-15)
assert np.count_nonzero(dx) == 1

ties = np.zeros((1, 1, 4, 4))            # every element of every window ties
dx_ties = max_pool_backward(np.ones((1, 1, 2, 2)), max_pool_forward(ties, 2, 2)[1])
print("gradient with ties:\n", dx_ties[0, 0])
np.testing.assert_array_equal(np.argwhere(dx_ties[0, 0]), [[0, 0], [0, 2], [2, 0], [2, 2]])

# %% [markdown]
# **Gradient check.** With random (hence distinct) inputs the max is differentiable, and the
# check passes for both paths of `max_pool_forward`: windows that tile the input (a reshape,
# no copy) and overlapping windows (im2col). A tie within $h = 10^{-6}$ would put a kink inside
# the finite difference; with continuous random values that has probability ~0.

# %%
for shape, size, stride in [((2, 3, 6, 8), 2, 2), ((2, 3, 7, 7), 3, 2)]:
    x = rng.standard_normal(shape)
    out, cache = max_pool_forward(x, size, stride)
    dout = rng.standard_normal(out.shape)
    errors = gradient_errors(lambda: np.sum(max_pool_forward(x, size, stride)[0] * dout),
                             {"x": x}, {"x": max_pool_backward(dout, cache)})
    print(f"x {shape}, size {size}, stride {stride}: relative error {errors['x']:.1e}")
    assert errors["x"] < LAYER_TOLERANCE

module_errors = check_module_gradients(MaxPool2d(2), rng.standard_normal((2, 2, 4, 6)), rng)
assert module_errors["x"] < LAYER_TOLERANCE

# %% [markdown]
# ## 2. Batch normalisation
#
# For one feature (drop the feature index) and a batch $x_1, \dots, x_N$, training mode computes
# $$\mu = \frac1N \sum_n x_n, \qquad \sigma^2 = \frac1N \sum_n (x_n - \mu)^2, \qquad
# \hat x_n = \frac{x_n - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad y_n = \gamma\, \hat x_n + \beta .$$
# Every feature comes out with mean $\beta$ and standard deviation $\approx\gamma$, whatever the
# scale of the layer before — which is what makes deep networks easier to train.

# %%
N, D = 500, 3
x = rng.normal(loc=[-5.0, 0.0, 10.0], scale=[0.5, 3.0, 8.0], size=(N, D))   # three badly scaled features
gamma, beta = np.ones(D), np.zeros(D)
running_mean, running_var = np.zeros(D), np.ones(D)
y, cache = batchnorm_forward(x, gamma, beta, running_mean, running_var, training=True)

fig, (before, after) = plt.subplots(1, 2, figsize=(10, 3.2))
for feature in range(D):
    before.hist(x[:, feature], bins=40, alpha=0.6, label=f"feature {feature}")
    after.hist(y[:, feature], bins=40, alpha=0.6, label=f"feature {feature}")
before.set(title="before batch norm"); after.set(title="after: mean 0, standard deviation 1")
before.legend()
plt.show()

np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-12)
np.testing.assert_allclose(y.std(axis=0), 1.0, rtol=1e-4)          # sqrt(var / (var + eps))
# The running statistics (used in eval mode) were updated in place with momentum 0.1.
np.testing.assert_allclose(running_mean, 0.1 * x.mean(axis=0), rtol=1e-12)

# %% [markdown]
# ### The backward pass
#
# Write $s = (\sigma^2 + \epsilon)^{-1/2}$ and $g_n = \partial L/\partial \hat x_n = \gamma\, \partial L/\partial y_n$.
# The parameters are easy: $\partial L/\partial\beta = \sum_n \partial L/\partial y_n$ and
# $\partial L/\partial\gamma = \sum_n \hat x_n\, \partial L/\partial y_n$. For $x$, every $\hat x_m$
# depends on $x_n$ three ways — directly, through $\mu$ ($\partial\mu/\partial x_n = 1/N$) and
# through $\sigma^2$ ($\partial \sigma^2/\partial x_n = 2(x_n - \mu)/N$):
# $$\frac{\partial \hat x_m}{\partial x_n} = s\Big([m = n] - \frac1N\Big) - \frac{s}{N}\,\hat x_m \hat x_n .$$
# Summing $g_m\, \partial \hat x_m / \partial x_n$ over $m$ gives the compact form used by
# `batchnorm_backward`:
# $$\frac{\partial L}{\partial x_n} = \frac{s}{N}\Big(N g_n - \sum_m g_m - \hat x_n \sum_m g_m \hat x_m\Big).$$
# The three terms are the three paths: direct, through the mean, through the variance.

# %%
N, D = 8, 5
x = 2.0 * rng.standard_normal((N, D)) + 1.0
gamma, beta = rng.standard_normal(D), rng.standard_normal(D)
running_mean, running_var = np.zeros(D), np.ones(D)    # updated in place by every forward; not checked

def forward():
    return batchnorm_forward(x, gamma, beta, running_mean, running_var, training=True)

y, cache = forward()
dout = rng.standard_normal(y.shape)
dx, dgamma, dbeta = batchnorm_backward(dout, cache)
errors = gradient_errors(lambda: np.sum(forward()[0] * dout), {"x": x, "gamma": gamma, "beta": beta},
                         {"x": dx, "gamma": dgamma, "beta": dbeta})
print({name: f"{error:.1e}" for name, error in errors.items()})
assert all(error < LAYER_TOLERANCE for error in errors.values())

# %% [markdown]
# **The classic mistake** is to treat $\mu$ and $\sigma^2$ as constants, giving
# $\partial L/\partial x_n = s\, g_n$ — which is in fact the correct backward of *eval* mode,
# where the statistics are fixed running averages. In training mode it is wrong, and the
# check says so. One visible consequence of the correct formula: shifting a whole feature by
# a constant does not change the output, so the gradient is orthogonal to that shift —
# $\sum_n \partial L/\partial x_n = 0$ for every feature.

# %%
_, _, inv_std, _ = cache
constant_statistics = dout * gamma * inv_std          # ignores the paths through mu and sigma^2
wrong = gradient_errors(lambda: np.sum(forward()[0] * dout), {"x": x}, {"x": constant_statistics})["x"]
print(f"relative error treating mean and variance as constants: {wrong:.2f}")
assert wrong > 0.1
print("column sums of dx:", dx.sum(axis=0))
np.testing.assert_allclose(dx.sum(axis=0), 0.0, atol=1e-12)

# In eval mode that simple formula *is* the gradient.
y_eval, cache_eval = batchnorm_forward(x, gamma, beta, running_mean, running_var, training=False)
dx_eval, _, _ = batchnorm_backward(dout, cache_eval)
np.testing.assert_allclose(dx_eval, dout * gamma / np.sqrt(running_var + 1e-5), rtol=1e-12)

# %% [markdown]
# ### Spatial batch norm
#
# For images, `BatchNorm2d` keeps one $\mu, \sigma^2, \gamma, \beta$ per **channel** and averages
# over the $N \cdot H \cdot W$ values of that channel: the same formulas with $N$ replaced by
# $NHW$. The functional pair and the module are checked in both modes.

# %%
x = rng.standard_normal((3, 4, 3, 2)) * 3.0 + 0.5          # N=3, C=4, H=3, W=2
gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
buffers = np.zeros(4), np.ones(4)

out, cache = spatial_batchnorm_forward(x, gamma, beta, *buffers, training=True)
dout = rng.standard_normal(out.shape)
dx, dgamma, dbeta = spatial_batchnorm_backward(dout, cache)
loss = lambda: np.sum(spatial_batchnorm_forward(x, gamma, beta, *buffers, training=True)[0] * dout)
errors = gradient_errors(loss, {"x": x, "gamma": gamma, "beta": beta}, {"x": dx, "gamma": dgamma, "beta": dbeta})
print("spatial_batchnorm:", {name: f"{error:.1e}" for name, error in errors.items()})
assert all(error < LAYER_TOLERANCE for error in errors.values())

layer = BatchNorm2d(4, dtype=np.float64)
for mode in ("train", "eval"):
    getattr(layer, mode)()
    module_errors = check_module_gradients(layer, x, rng)
    print(f"BatchNorm2d ({mode}):", {name: f"{error:.1e}" for name, error in module_errors.items()})
    assert all(error < LAYER_TOLERANCE for error in module_errors.values())

# %% [markdown]
# ### Batch norm and max pool in one pass
#
# In the CNN a batch norm is followed by a 2x2 max pool. Run as two layers, the batch norm
# writes its whole normalised output `y` and the pool reads it back; backward, the pool writes
# a full-size gradient `d` that is **zero in 3 of every 4 places** (only each window's argmax
# gets a gradient), and the batch norm reads it twice (for its two sums, then for `dx`).
#
# The batch norm backward only needs two sums of `d` per channel,
#
# $$\sum_{n,h,w} d = \sum_{\text{windows}} g, \qquad \sum_{n,h,w} d\,\hat x = \sum_{\text{windows}} g\,\hat x_{\text{argmax}},$$
#
# where `g` is the pooled gradient: the zeros add nothing, so each sum has one term per window.
# Then `dx = gamma * inv_std * (d - mean(d) - xhat * mean(d * xhat))` is written directly, with
# `d = g` at each argmax and 0 elsewhere. The forward normalises each band of input rows into a
# small buffer and pools it there. `functional.spatial_batchnorm_max_pool_forward` /
# `_backward` do exactly this (compiled kernels), and `Sequential` runs every batch norm followed by
# a tiling max pool that way. The results are the same numbers as the two layers apart:

# %%
from npsoftmax.functional import spatial_batchnorm_max_pool_backward, spatial_batchnorm_max_pool_forward

x = rng.standard_normal((3, 4, 6, 4)) * 2.0 - 1.0          # N=3, C=4, H=6, W=4; 2x2 windows tile it
gamma, beta = rng.standard_normal(4), rng.standard_normal(4)  # some gamma < 0: the pool then picks the smallest x

fused, fused_cache = spatial_batchnorm_max_pool_forward(x, gamma, beta, np.zeros(4), np.ones(4), 2)
normalised, norm_cache = spatial_batchnorm_forward(x, gamma, beta, np.zeros(4), np.ones(4))
pooled, pool_cache = max_pool_forward(normalised, 2, 2)
assert np.array_equal(fused, pooled)                        # bitwise: the same formula, the same comparisons

g = rng.standard_normal(fused.shape)
dx, dgamma, dbeta = spatial_batchnorm_max_pool_backward(g, fused_cache)
d = max_pool_backward(g, pool_cache)                        # the full-size, mostly-zero gradient...
print(f"share of zeros in the pool's full-size gradient: {np.mean(d == 0):.2f}")
dx_apart, dgamma_apart, dbeta_apart = spatial_batchnorm_backward(d, norm_cache)   # ...that the fused pass never builds
print("largest difference to the two layers apart:",
      max(np.abs(a - b).max() for a, b in [(dx, dx_apart), (dgamma, dgamma_apart), (dbeta, dbeta_apart)]))
assert np.allclose(dx, dx_apart, atol=1e-12) and np.allclose(dgamma, dgamma_apart) and np.allclose(dbeta, dbeta_apart)

loss = lambda: np.sum(spatial_batchnorm_max_pool_forward(x, gamma, beta, np.zeros(4), np.ones(4), 2)[0] * g)
errors = gradient_errors(loss, {"x": x, "gamma": gamma, "beta": beta}, {"x": dx, "gamma": dgamma, "beta": dbeta})
print("fused batch norm + pool:", {name: f"{error:.1e}" for name, error in errors.items()})
assert all(error < LAYER_TOLERANCE for error in errors.values())

# %% [markdown]
# What it saves, in full-size arrays of `x`'s shape read or written per step (the pooled
# arrays are a quarter of that): forward, the normalised image written and read back (2);
# backward, the pool's gradient zeroed-and-written and read twice (3). On the CNN's first block
# (128 x 32 x 32 x 32, float32, 16 MiB per array) the two kernels took 7.3 -> 4.6 ms forward
# and 23.9 -> 8.6 ms backward on one core of the build VM (README, Benchmarks).

# %% [markdown]
# ### Takeaways
# * Max pooling's backward scatters each window's gradient to its recorded argmax; overlapping
#   windows accumulate, ties go to the first maximum.
# * Batch norm's training-mode backward has three paths (direct, mean, variance); dropping the
#   last two gives the eval-mode gradient, which the gradient check rejects in training mode.
# * A batch norm followed by a max pool needs only sums over the pooled gradient: fused, neither
#   the normalised image nor the mostly-zero pool gradient is ever stored, for the same numbers.

# %% [markdown]
# **Next:** [05_gumbel_softmax.ipynb](05_gumbel_softmax.ipynb) — sampling through a softmax: the Gumbel-max trick and its relaxation.
