"""Modules: gradient checks through the stateful API, the params/grads/buffers protocol, modes, init."""

import numpy as np
import pytest

from naive_reference import naive_affine, naive_conv, naive_max_pool, naive_relu, naive_spatial_batchnorm
from npsoftmax import layers as L
from npsoftmax.gradcheck import LAYER_TOLERANCE, check_module_gradients, gradient_errors


def random_array(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def assert_gradients_match(errors):
    failing = {name: error for name, error in errors.items() if not error < LAYER_TOLERANCE}
    assert not failing, f"relative errors above {LAYER_TOLERANCE}: {failing} (all: {errors})"


def randomise_parameters(module, rng):
    """Random params and running statistics (not the init values), written in place."""
    for name, value in module.params.items():
        value[...] = rng.standard_normal(value.shape) + (1.0 if name.endswith("gamma") else 0.0)
    for name, value in module.buffers.items():
        value[...] = 0.5 + rng.random(value.shape) if name.endswith("running_var") else rng.standard_normal(value.shape)
    return module


# Modules and inputs for the shared tests; each builder takes (rng, dtype).
MODULE_CASES = {
    "linear": lambda rng, dtype: (L.Linear(6, 4, rng=rng, dtype=dtype), (3, 2, 3)),
    "linear_no_bias": lambda rng, dtype: (L.Linear(5, 3, rng=rng, dtype=dtype, bias=False), (4, 5)),
    "conv_3x5_stride2_pad1": lambda rng, dtype: (
        L.Conv2d(2, 3, (3, 5), stride=2, pad=1, rng=rng, dtype=dtype),
        (2, 2, 5, 6),
    ),
    "conv_batch1_channel1_pad2": lambda rng, dtype: (L.Conv2d(1, 2, 3, pad=2, rng=rng, dtype=dtype), (1, 1, 3, 4)),
    "max_pool_2": lambda rng, dtype: (L.MaxPool2d(2), (2, 2, 4, 6)),
    "max_pool_3_stride_2": lambda rng, dtype: (L.MaxPool2d(3, stride=2), (1, 2, 7, 5)),
    "relu": lambda rng, dtype: (L.ReLU(), (3, 7)),
    "batchnorm2d_train": lambda rng, dtype: (L.BatchNorm2d(3, dtype=dtype), (2, 3, 3, 2)),
    "batchnorm2d_eval": lambda rng, dtype: (L.BatchNorm2d(3, dtype=dtype).eval(), (2, 3, 3, 2)),
    "batchnorm1d_train": lambda rng, dtype: (L.BatchNorm1d(4, dtype=dtype), (5, 4)),
    "batchnorm1d_eval": lambda rng, dtype: (L.BatchNorm1d(4, dtype=dtype).eval(), (5, 4)),
    "dropout_eval": lambda rng, dtype: (L.Dropout(0.5, rng=rng).eval(), (3, 4)),
    "flatten": lambda rng, dtype: (L.Flatten(), (2, 3, 2, 2)),
    "sequential": lambda rng, dtype: (
        L.Sequential(
            # No conv bias: batch norm in training mode subtracts it again, so its true
            # gradient is exactly 0 and a relative error of two ~0 vectors means nothing.
            L.Conv2d(2, 3, (3, 2), pad=1, rng=rng, dtype=dtype, bias=False),
            L.BatchNorm2d(3, dtype=dtype),
            L.ReLU(),
            L.MaxPool2d(3, stride=2),
            L.Flatten(),
            L.Linear(12, 4, rng=rng, dtype=dtype),
        ),
        (2, 2, 5, 4),
    ),
    # Batch norm followed by a pool that tiles its input: Sequential runs the pair as one pass.
    "sequential_fused_batchnorm_pool": lambda rng, dtype: (
        L.Sequential(
            L.Conv2d(2, 3, (3, 2), pad=1, rng=rng, dtype=dtype, bias=False),
            L.BatchNorm2d(3, dtype=dtype),
            L.MaxPool2d(3),
            L.ReLU(),
            L.Flatten(),
            L.Linear(6, 4, rng=rng, dtype=dtype),
        ),
        (1, 2, 6, 2),
    ),
}


def build(name, rng, dtype):
    module, x_shape = MODULE_CASES[name](rng, dtype)
    randomise_parameters(module, rng)
    return module, random_array(rng, x_shape, dtype)


@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_module_gradients_match_numerical_gradients(name, rng):
    module, x = build(name, rng, np.float64)
    errors = check_module_gradients(module, x, rng)
    assert set(errors) == {"x", *module.params}
    assert_gradients_match(errors)


def test_dropout_module_gradient_with_a_fixed_seed(rng):
    layer = L.Dropout(0.4, rng=np.random.default_rng(3))
    x = random_array(rng, (4, 5))

    def forward():
        layer.rng = np.random.default_rng(3)  # the same mask on every call
        return layer.forward(x)

    dout = rng.standard_normal(x.shape)
    forward()
    dx = layer.backward(dout)
    assert np.count_nonzero(dx == 0) > 0  # some units were dropped: the check is not the identity
    assert_gradients_match(gradient_errors(lambda: np.sum(forward() * dout), {"x": x}, {"x": dx}))


@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_module_dtype_is_preserved(name, rng, dtype):
    module, x = build(name, rng, dtype)
    out = module.forward(x)
    dx = module.backward(random_array(rng, out.shape, dtype))
    assert out.dtype == dtype and dx.dtype == dtype
    for collection in (module.params, module.grads, module.buffers):
        assert {key: value.dtype for key, value in collection.items()} == {key: dtype for key in collection}


@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_module_does_not_mutate_x_or_dout(name, rng):
    module, x = build(name, rng, np.float64)
    x_original = x.copy()
    out = module.forward(x)
    dout = rng.standard_normal(out.shape)
    dout_original = dout.copy()
    module.backward(dout)
    np.testing.assert_array_equal(x, x_original)
    np.testing.assert_array_equal(dout, dout_original)


# ----------------------------------------------------------------------------
# Forward vs the naive loops, through the modules
# ----------------------------------------------------------------------------
def test_module_forwards_match_loops(rng, dtype, forward_tolerance):
    x = random_array(rng, (2, 2, 6, 5), dtype)
    conv = randomise_parameters(L.Conv2d(2, 3, (3, 5), stride=2, pad=2, rng=rng, dtype=dtype), rng)
    expected = naive_conv(x, conv.params["w"], conv.params["b"], 2, 2)
    np.testing.assert_allclose(conv.forward(x), expected, **forward_tolerance)

    batchnorm = randomise_parameters(L.BatchNorm2d(2, eps=1e-3, dtype=dtype), rng).eval()
    expected = naive_spatial_batchnorm(
        x, batchnorm.params["gamma"], batchnorm.params["beta"],
        batchnorm.buffers["running_mean"], batchnorm.buffers["running_var"], 1e-3,
    )
    np.testing.assert_allclose(batchnorm.forward(x), expected, **forward_tolerance)

    np.testing.assert_array_equal(L.MaxPool2d(3, stride=2).forward(x), naive_max_pool(x, 3, 2))
    np.testing.assert_array_equal(L.ReLU().forward(x), naive_relu(x))

    linear = randomise_parameters(L.Linear(60, 4, rng=rng, dtype=dtype), rng)
    expected = naive_affine(x, linear.params["w"], linear.params["b"])
    np.testing.assert_allclose(linear.forward(L.Flatten().forward(x)), expected, **forward_tolerance)


# ----------------------------------------------------------------------------
# The params / grads / buffers protocol
# ----------------------------------------------------------------------------
def test_parameter_names_and_shapes(rng):
    linear = L.Linear(5, 3, rng=rng)
    conv = L.Conv2d(2, 4, (3, 5), rng=rng)
    batchnorm = L.BatchNorm2d(4)
    assert {k: v.shape for k, v in linear.params.items()} == {"w": (5, 3), "b": (3,)}
    assert {k: v.shape for k, v in conv.params.items()} == {"w": (4, 2, 3, 5), "b": (4,)}
    assert {k: v.shape for k, v in batchnorm.params.items()} == {"gamma": (4,), "beta": (4,)}
    assert {k: v.shape for k, v in batchnorm.buffers.items()} == {"running_mean": (4,), "running_var": (4,)}
    assert list(L.Conv2d(2, 4, 3, rng=rng, bias=False).params) == ["w"]
    for module in (linear, conv, batchnorm, L.ReLU(), L.MaxPool2d(), L.Flatten(), L.Dropout(0.1, rng=rng)):
        assert set(module.grads) == set(module.params)
        assert all(module.grads[k].shape == v.shape for k, v in module.params.items())
    for module in (linear, conv, L.ReLU(), L.MaxPool2d(), L.Flatten(), L.Dropout(0.1, rng=rng)):
        assert module.buffers == {}


def test_params_are_live_and_grads_are_updated_in_place(rng):
    linear = L.Linear(3, 2, rng=rng, dtype=np.float64)
    x = random_array(rng, (4, 3))
    w, b, dw_array = linear.params["w"], linear.params["b"], linear.grads["w"]
    linear.params["b"][...] = 10.0  # writing into params changes the layer
    np.testing.assert_allclose(linear.forward(x), x @ w + 10.0, rtol=1e-14)
    dout = rng.standard_normal((4, 2))
    linear.backward(dout)
    assert linear.params["w"] is w and linear.params["b"] is b and linear.grads["w"] is dw_array
    np.testing.assert_allclose(dw_array, x.T @ dout, rtol=1e-14)
    linear.backward(2 * dout)  # the next backward overwrites (does not accumulate into) grads
    np.testing.assert_allclose(dw_array, 2 * x.T @ dout, rtol=1e-14)


def test_kaiming_initialisation(rng):
    linear = L.Linear(400, 300, rng=np.random.default_rng(0))
    conv = L.Conv2d(16, 64, (3, 5), rng=np.random.default_rng(1))
    # 120,000 and 15,360 draws: the sample std is within ~0.6% of sqrt(2 / fan_in).
    assert abs(linear.params["w"].std() / np.sqrt(2 / 400) - 1) < 0.01
    assert abs(conv.params["w"].std() / np.sqrt(2 / (16 * 3 * 5)) - 1) < 0.02
    assert abs(linear.params["w"].mean()) < 0.05 * np.sqrt(2 / 400)  # zero-mean: the mean's std is 0.3% of that
    assert not linear.params["b"].any() and not conv.params["b"].any()
    same = L.Linear(400, 300, rng=np.random.default_rng(0), dtype=np.float64)
    np.testing.assert_array_equal(linear.params["w"], same.params["w"].astype(np.float32))
    other = L.Linear(400, 300, rng=np.random.default_rng(2))
    assert not np.array_equal(linear.params["w"], other.params["w"])


def test_backward_before_forward_is_a_clear_error(rng):
    modules = [
        L.Linear(2, 2, rng=rng), L.Conv2d(1, 1, 1, rng=rng), L.MaxPool2d(), L.ReLU(),
        L.BatchNorm1d(2), L.BatchNorm2d(2), L.Dropout(0.5, rng=rng), L.Flatten(),
        L.Sequential(L.ReLU(), L.Flatten()),
    ]
    for module in modules:
        with pytest.raises(RuntimeError, match="backward was called before forward"):
            module.backward(np.zeros((1, 2), np.float32))


def test_train_and_eval_return_self_and_reach_every_child(rng):
    model = L.Sequential(L.Linear(3, 3, rng=rng), L.Sequential(L.BatchNorm1d(3), L.Dropout(0.5, rng=rng)))
    assert model.eval() is model
    assert not model.training and not model[0].training and not model[1][0].training and not model[1][1].training
    assert model.train() is model
    assert model.training and model[1][1].training


# ----------------------------------------------------------------------------
# Sequential
# ----------------------------------------------------------------------------
def test_sequential_flattens_names_and_shares_live_arrays(rng):
    linear, batchnorm = L.Linear(3, 4, rng=rng), L.BatchNorm1d(4)
    model = L.Sequential(linear, batchnorm, L.ReLU(), L.Sequential(L.Linear(4, 2, rng=rng)))
    assert list(model.params) == ["0.w", "0.b", "1.gamma", "1.beta", "3.0.w", "3.0.b"]
    assert list(model.grads) == list(model.params)
    assert list(model.buffers) == ["1.running_mean", "1.running_var"]
    assert model.params["0.w"] is linear.params["w"] and model.grads["1.gamma"] is batchnorm.grads["gamma"]
    assert model.buffers["1.running_var"] is batchnorm.buffers["running_var"]
    assert len(model) == 4 and model[1] is batchnorm and list(model)[2] is model[2]
    assert isinstance(model[:2], L.Sequential) and model[:2][0] is linear
    model.params["0.b"][...] = 1.0  # writing through the flattened dict reaches the child
    assert np.all(linear.params["b"] == 1.0)


def test_sequential_backward_is_the_chain_rule_of_its_children(rng):
    first, second = L.Linear(3, 4, rng=rng, dtype=np.float64), L.Linear(4, 2, rng=rng, dtype=np.float64)
    model = L.Sequential(first, L.ReLU(), second)
    x = random_array(rng, (5, 3))
    out = model.forward(x)
    dout = rng.standard_normal(out.shape)
    dx = model.backward(dout)
    hidden = x @ first.params["w"] + first.params["b"]
    dhidden = (dout @ second.params["w"].T) * (hidden > 0)
    np.testing.assert_allclose(dx, dhidden @ first.params["w"].T, rtol=1e-12)
    np.testing.assert_allclose(model.grads["2.w"], np.maximum(hidden, 0).T @ dout, rtol=1e-12)


# ----------------------------------------------------------------------------
# Batch norm and dropout modules: modes
# ----------------------------------------------------------------------------
def test_batchnorm_module_updates_buffers_only_in_training(rng):
    layer = L.BatchNorm2d(2, momentum=0.25)
    x = (3.0 + rng.standard_normal((4, 2, 3, 3))).astype(np.float32)
    layer.forward(x)
    expected_mean = 0.25 * x.astype(np.float64).mean(axis=(0, 2, 3))
    expected_var = 0.75 + 0.25 * x.astype(np.float64).var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(layer.buffers["running_mean"], expected_mean, rtol=1e-5)
    np.testing.assert_allclose(layer.buffers["running_var"], expected_var, rtol=1e-5)
    frozen = {name: value.copy() for name, value in layer.buffers.items()}
    layer.eval()
    first = layer.forward(x)
    np.testing.assert_array_equal(layer.forward(x[:1]), first[:1])  # independent of the batch
    for name, value in layer.buffers.items():
        np.testing.assert_array_equal(value, frozen[name])


def test_dropout_module_modes(rng):
    x = random_array(rng, (50, 40), np.float32)
    layer = L.Dropout(0.25, rng=np.random.default_rng(9)).eval()
    np.testing.assert_array_equal(layer.forward(x), x)
    layer.train()
    out = layer.forward(x)
    kept = out != 0
    np.testing.assert_array_equal(out[kept], x[kept] * np.float32(1 / 0.75))
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_array_equal(L.Dropout(0.25, rng=np.random.default_rng(9)).forward(x), out)


# ----------------------------------------------------------------------------
# Constructor errors
# ----------------------------------------------------------------------------
def test_constructors_reject_bad_arguments(rng):
    with pytest.raises(TypeError, match=r"rng must be a numpy.random.Generator.*got int"):
        L.Linear(2, 3, rng=0)
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got int64"):
        L.Conv2d(1, 2, 3, rng=rng, dtype=np.int64)
    with pytest.raises(TypeError, match=r"kernel_size must be an int or a \(KH, KW\) pair, got \(3, 3, 3\)"):
        L.Conv2d(1, 2, (3, 3, 3), rng=rng)
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        L.Conv2d(1, 2, 3, stride=0, rng=rng)
    with pytest.raises(ValueError, match="p must be in \\[0, 1\\), got 1.0"):
        L.Dropout(1.0, rng=rng)
    with pytest.raises(ValueError, match="momentum must be a number in \\[0, 1\\], got 1.5"):
        L.BatchNorm2d(3, momentum=1.5)


def test_conv_module_reports_channel_mismatch_with_both_shapes(rng):
    conv = L.Conv2d(3, 2, 3, rng=rng)
    with pytest.raises(ValueError, match=r"x has C = 1 .*x shape \(2, 1, 5, 5\).*w shape \(2, 3, 3, 3\)"):
        conv.forward(np.zeros((2, 1, 5, 5), np.float32))


# ----------------------------------------------------------------------------
# Sequential's fused batch norm + max pool
# ----------------------------------------------------------------------------
def fused_pair_model(rng, dtype, fuse):
    model = L.Sequential(L.Conv2d(3, 4, 3, pad=1, rng=rng, dtype=dtype, bias=False), L.BatchNorm2d(4, dtype=dtype),
                         L.MaxPool2d(2), L.ReLU(), L.Flatten(), L.Linear(4 * 3 * 2, 5, rng=rng, dtype=dtype))
    model.fuse_batchnorm_max_pool = fuse
    randomise_parameters(model[1], rng)  # gamma around 1 (some negative), random running statistics
    return model


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sequential_fuses_batchnorm_and_pool_with_the_same_results(training, rng, dtype):
    x = random_array(rng, (3, 3, 6, 4), dtype)
    dout = random_array(rng, (3, 5), dtype)
    results = []
    for fuse in (True, False):
        model = fused_pair_model(np.random.default_rng(1), dtype, fuse)
        model.train() if training else model.eval()
        out = model.forward(x)
        assert (model[2]._cache == "pooled by the batch norm before it") == fuse  # the pool did not run by itself
        dx = model.backward(dout)
        results.append([out, dx, *(model.grads[name] for name in sorted(model.grads)),
                        *(model.buffers[name] for name in sorted(model.buffers))])
    for fused, apart in zip(*results):
        np.testing.assert_allclose(fused, apart, rtol=1e-5 if dtype == np.float32 else 1e-12,
                                   atol=1e-6 if dtype == np.float32 else 1e-14)


def test_sequential_runs_the_pair_apart_when_the_pool_does_not_tile(rng):
    model = L.Sequential(L.BatchNorm2d(2), L.MaxPool2d(2))
    model.forward(random_array(rng, (2, 2, 5, 4), np.float32))  # 5 rows: 2x2 windows do not tile them
    assert not isinstance(model[0]._cache, L.F.BatchNormMaxPoolCache)
    assert model[1]._cache.path == "im2col"


def test_fused_batchnorm_refuses_mismatched_pools_and_gradients(rng):
    batch_norm, x = L.BatchNorm2d(2), random_array(rng, (2, 2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="pool must be a MaxPool2d whose windows tile x"):
        batch_norm.forward(x, pool=L.MaxPool2d(3))
    with pytest.raises(ValueError, match="pool must be a MaxPool2d"):
        batch_norm.forward(x, pool=L.ReLU())
    pool = L.MaxPool2d(2)
    out = batch_norm.forward(x, pool=pool)
    assert out.shape == (2, 2, 2, 2)
    with pytest.raises(TypeError, match="takes what that pool's backward returned"):
        batch_norm.backward(np.ones_like(out))
    gradient = pool.backward(np.ones_like(out))
    assert isinstance(gradient, L.PooledGradient)
    assert batch_norm.backward(gradient).shape == x.shape
