# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · A two-layer network, forward and backward by hand
#
# Backpropagation is the chain rule applied one layer at a time, from the loss back to the
# input. Here we do it for the smallest interesting network,
# $$x \xrightarrow{\ \text{affine}\ } z = xW_1 + b_1 \xrightarrow{\ \text{ReLU}\ } a = \max(z, 0)
# \xrightarrow{\ \text{affine}\ } s = aW_2 + b_2 \xrightarrow{\ \text{softmax CE}\ } L,$$
# on a toy problem whose answer we can draw: three interleaved spirals in the plane.
#
# We write each backward step by hand, compare it with the package's layer functions
# (`npsoftmax.functional.affine_backward`, `relu_backward`), gradient-check the whole network
# with `npsoftmax.gradcheck`, and finally train it with a ten-line gradient-descent loop.

# %%
import numpy as np
import matplotlib.pyplot as plt
from threadpoolctl import threadpool_limits

from npsoftmax.functional import affine_backward, affine_forward, relu_backward, relu_forward
from npsoftmax.gradcheck import LAYER_TOLERANCE, check_module_gradients, gradient_errors
from npsoftmax.heads import softmax, softmax_cross_entropy
from npsoftmax.layers import Linear, ReLU, Sequential

rng = np.random.default_rng(0)
# One BLAS/OpenMP thread: the arrays here are small, so more threads only add synchronisation,
# which stalls when the machine is busy. (After the npsoftmax imports, which load OpenMP.)
thread_limits = threadpool_limits(limits=1)
np.set_printoptions(precision=4, suppress=True)
CLASS_COLORS = ["tab:blue", "tab:orange", "tab:green"]

# %% [markdown]
# ## The data: three spirals
#
# Each class is an arm of a spiral; no straight line separates them, so a linear classifier
# (softmax regression) cannot do well and the hidden ReLU layer has to bend the boundary.

# %%
def spirals(n_per_class, n_classes, rng):
    # Points (N, 2) on n_classes interleaved spiral arms, labels (N,).
    points, labels = [], []
    for k in range(n_classes):
        radius = np.linspace(0.05, 1.0, n_per_class)
        angle = np.linspace(4.0 * k, 4.0 * (k + 1), n_per_class) + 0.2 * rng.standard_normal(n_per_class)
        points.append(np.column_stack([radius * np.sin(angle), radius * np.cos(angle)]))
        labels.append(np.full(n_per_class, k))
    return np.concatenate(points), np.concatenate(labels)

x_all, y_all = spirals(100, 3, rng)
N, D, K = x_all.shape[0], x_all.shape[1], 3
fig, ax = plt.subplots(figsize=(4, 4))
ax.scatter(x_all[:, 0], x_all[:, 1], c=np.take(CLASS_COLORS, y_all), s=12)
ax.set(title=f"{N} points, {K} classes", aspect="equal")
plt.show()

# %% [markdown]
# ## Forward, one layer at a time
#
# Every layer of the package is a pair of functions (CS231n style):
# `out, cache = layer_forward(inputs...)` keeps what the backward pass will need in `cache`;
# `dinputs... = layer_backward(dout, cache)` turns the gradient of the loss with respect to
# the layer's output, `dout`, into gradients with respect to its inputs. Shapes, with
# $N$ examples, $D = 2$ inputs, $H$ hidden units and $K = 3$ classes:
#
# | quantity | shape |
# |---|---|
# | $x$ | $(N, D)$ |
# | $W_1, b_1$ | $(D, H)$, $(H,)$ |
# | $z, a$ | $(N, H)$ |
# | $W_2, b_2$ | $(H, K)$, $(K,)$ |
# | $s$ (scores) | $(N, K)$ |
#
# For the walk-through we use float64 (the dtype of gradient checks) and a small batch.

# %%
H = 10
x, y = x_all[::15], y_all[::15]                      # 20 examples for the walk-through
params = {
    "W1": rng.standard_normal((D, H)) * np.sqrt(2.0 / D),   # He initialisation, float64
    "b1": 0.1 * rng.standard_normal(H),
    "W2": rng.standard_normal((H, K)) * np.sqrt(2.0 / H),
    "b2": 0.1 * rng.standard_normal(K),
}
z, cache_1 = affine_forward(x, params["W1"], params["b1"])
a, cache_relu = relu_forward(z)
s, cache_2 = affine_forward(a, params["W2"], params["b2"])
loss, ds = softmax_cross_entropy(s, y)
print("x", x.shape, "-> z", z.shape, "-> a", a.shape, "-> s", s.shape, f"-> loss {loss:.4f}")

# %% [markdown]
# ## Backward, by hand
#
# Start from the loss and walk back. Notebook 01 gave the first step,
# $\partial L/\partial s = (P - Y)/N$ (`ds` above). Then, for $s = aW_2 + b_2$, i.e.
# $s_{nk} = \sum_h a_{nh} W_{2,hk} + b_{2,k}$:
# $$\frac{\partial L}{\partial W_2} = a^\top \frac{\partial L}{\partial s}, \qquad
# \frac{\partial L}{\partial b_2} = \sum_n \frac{\partial L}{\partial s_n}, \qquad
# \frac{\partial L}{\partial a} = \frac{\partial L}{\partial s} W_2^\top .$$
# A reliable way to get the transposes right: **a gradient has the shape of what it is the
# gradient of**; $a^\top (H, N)$ times $ds\ (N, K)$ is the only product with the shape $(H, K)$
# of $W_2$. The bias gradient sums over the batch because $b_2$ is added to every row.
#
# The ReLU passes the gradient where its input was positive and blocks it elsewhere:
# $\partial L/\partial z = \partial L/\partial a \odot [z > 0]$. The first affine layer repeats
# the pattern: $\partial L/\partial W_1 = x^\top \partial L/\partial z$, and so on.

# %%
# By hand, with plain NumPy ...
dW2 = a.T @ ds
db2 = ds.sum(axis=0)
da = ds @ params["W2"].T
dz = da * (z > 0)
dW1 = x.T @ dz
db1 = dz.sum(axis=0)

# ... and with the package's backward functions, which must agree.
da_package, dW2_package, db2_package = affine_backward(ds, cache_2)
dz_package = relu_backward(da_package, cache_relu)
dx_package, dW1_package, db1_package = affine_backward(dz_package, cache_1)
for mine, theirs in [(dW2, dW2_package), (db2, db2_package), (da, da_package),
                     (dz, dz_package), (dW1, dW1_package), (db1, db1_package)]:
    np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-15)
print("dW1 =\n", dW1)

# %% [markdown]
# ## The whole network as one function, and its gradient check
#
# Composing the pairs gives a function returning the loss and every parameter gradient.
# The gradient check perturbs each of the $2H + H + HK + K$ parameters in turn
# (`gradient_errors` perturbs the live arrays in `params`, so the loss function just reads
# them) and reports one relative error per parameter array.

# %%
def two_layer_loss(x, y, params):
    # Loss and gradients of affine -> ReLU -> affine -> softmax cross-entropy.
    z, cache_1 = affine_forward(x, params["W1"], params["b1"])
    a, cache_relu = relu_forward(z)
    s, cache_2 = affine_forward(a, params["W2"], params["b2"])
    loss, ds = softmax_cross_entropy(s, y)
    da, dW2, db2 = affine_backward(ds, cache_2)
    dx, dW1, db1 = affine_backward(relu_backward(da, cache_relu), cache_1)
    return loss, {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}

loss, grads = two_layer_loss(x, y, params)
errors = gradient_errors(lambda: two_layer_loss(x, y, params)[0], params, grads)
for name, error in errors.items():
    print(f"{name}: relative error {error:.1e}")
assert all(error < LAYER_TOLERANCE for error in errors.values()), errors

# %% [markdown]
# A gradient check is only convincing if it can fail. Drop the ReLU mask from the backward
# pass (a classic slip: "the ReLU has no parameters, so it has no backward") and the first
# layer's gradients are caught immediately:

# %%
def two_layer_loss_without_relu_mask(x, y, params):
    z, cache_1 = affine_forward(x, params["W1"], params["b1"])
    a, _ = relu_forward(z)
    s, cache_2 = affine_forward(a, params["W2"], params["b2"])
    loss, ds = softmax_cross_entropy(s, y)
    da, dW2, db2 = affine_backward(ds, cache_2)
    dx, dW1, db1 = affine_backward(da, cache_1)        # BUG: da was not masked by z > 0
    return loss, {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}

_, wrong_grads = two_layer_loss_without_relu_mask(x, y, params)
wrong_errors = gradient_errors(lambda: two_layer_loss(x, y, params)[0], params, wrong_grads)
print({name: f"{error:.1e}" for name, error in wrong_errors.items()})
assert wrong_errors["W1"] > 1e-2 and wrong_errors["b1"] > 1e-2
assert wrong_errors["W2"] < LAYER_TOLERANCE                # the layers after the ReLU are unaffected

# %% [markdown]
# ## The same network from modules
#
# `npsoftmax.layers` wraps every pair in a stateful module that keeps its own cache:
# `forward(x)`, `backward(dout)`, and `params`/`grads` dicts. `check_module_gradients` checks
# any module with a random upstream gradient (never all ones — see notebook 01) and returns
# the relative error for the input and for every parameter.

# %%
net = Sequential(Linear(D, H, rng=rng, dtype=np.float64), ReLU(), Linear(H, K, rng=rng, dtype=np.float64))
print(net)
module_errors = check_module_gradients(net, x, rng)
print({name: f"{error:.1e}" for name, error in module_errors.items()})
assert set(module_errors) == {"x", "0.w", "0.b", "2.w", "2.b"}
assert all(error < LAYER_TOLERANCE for error in module_errors.values())

# %% [markdown]
# ## Training: gradient descent in ten lines
#
# Training is the loop *forward → backward → step*, with the step
# $\theta \leftarrow \theta - \eta\, \partial L / \partial \theta$ applied **in place** to every
# parameter array (that is all `npsoftmax.optim.SGD` does, plus momentum and weight decay).
# We train in float32, the package's training dtype, on all 300 points.

# %%
H = 100
train_rng = np.random.default_rng(1)
weights = {
    "W1": (train_rng.standard_normal((D, H)) * np.sqrt(2.0 / D)).astype(np.float32),
    "b1": np.zeros(H, dtype=np.float32),
    "W2": (train_rng.standard_normal((H, K)) * np.sqrt(2.0 / H)).astype(np.float32),
    "b2": np.zeros(K, dtype=np.float32),
}
x_train = x_all.astype(np.float32)
learning_rate = 1.0
losses = []
for step in range(1000):
    loss, grads = two_layer_loss(x_train, y_all, weights)
    for name in weights:
        weights[name] -= learning_rate * grads[name]       # in place; a python float keeps float32
    losses.append(loss)

def predict(points, weights):
    hidden = np.maximum(points @ weights["W1"] + weights["b1"], 0)
    return np.argmax(hidden @ weights["W2"] + weights["b2"], axis=1)

accuracy = np.mean(predict(x_train, weights) == y_all)
print(f"loss {losses[0]:.3f} -> {losses[-1]:.4f}, training accuracy {accuracy:.3f}")
assert all(value.dtype == np.float32 for value in weights.values())   # no silent upcast
assert losses[-1] < 0.1 * losses[0]
assert accuracy > 0.95

# %%
grid = np.linspace(-1.1, 1.1, 200, dtype=np.float32)
grid_x, grid_y = np.meshgrid(grid, grid)
regions = predict(np.column_stack([grid_x.ravel(), grid_y.ravel()]), weights).reshape(grid_x.shape)

fig, (loss_axis, boundary_axis) = plt.subplots(1, 2, figsize=(10, 4))
loss_axis.semilogy(losses)
loss_axis.set(xlabel="gradient step", ylabel="training loss (log scale)", title="loss")
loss_axis.grid(alpha=0.3)
boundary_axis.contourf(grid_x, grid_y, regions, levels=[-0.5, 0.5, 1.5, 2.5], colors=CLASS_COLORS, alpha=0.25)
boundary_axis.scatter(x_all[:, 0], x_all[:, 1], c=np.take(CLASS_COLORS, y_all), s=10)
boundary_axis.set(title=f"decision regions (training accuracy {accuracy:.1%})", aspect="equal")
plt.show()

# %% [markdown]
# ### Takeaways
# * Backward = the forward layers in reverse, each turning `dout` into gradients of its inputs.
# * A gradient has the shape of its variable: that fixes every transpose.
# * A ReLU's backward is a mask; forgetting it is caught by the gradient check on the layer
#   *before* it.

# %% [markdown]
# **Next:** [03_convolution_im2col.ipynb](03_convolution_im2col.ipynb) — convolution as one matrix product (im2col), and its backward (col2im).
