"""Tests for npsoftmax.optim: hand-computed trajectories, torch parity, in-place updates,
dtype preservation, state_dict round trips, schedules and validation."""

import math

import numpy as np
import pytest

from npsoftmax.optim import (
    SGD,
    Adam,
    ConstantSchedule,
    CosineSchedule,
    ExponentialTemperatureSchedule,
    Scheduler,
    StepSchedule,
)


def float64(*values):
    return np.array(values, dtype=np.float64)


# Shared hand example: two scalar-ish coordinates, three gradients, lr = 0.1.
P0 = float64(1.0, -2.0)
G1 = float64(0.5, 1.0)
G2 = float64(-1.0, 2.0)
G3 = float64(0.0, -1.0)


def run_steps(optimizer, name, gradients):
    """Step ``optimizer`` once per gradient; return the param after each step (copies)."""
    trajectory = []
    for gradient in gradients:
        optimizer.step({name: gradient})
        trajectory.append(optimizer.params[name].copy())
    return trajectory


# ----------------------------------------------------------------------------------
# SGD, hand-computed
# ----------------------------------------------------------------------------------

def test_sgd_plain_hand_trajectory():
    # p1 = p0 - 0.1 g1 = [1 - 0.05, -2 - 0.1]  = [0.95, -2.1]
    # p2 = p1 - 0.1 g2 = [0.95 + 0.1, -2.1 - 0.2] = [1.05, -2.3]
    p = P0.copy()
    trajectory = run_steps(SGD({"p": p}, lr=0.1), "p", [G1, G2])
    np.testing.assert_allclose(trajectory[0], [0.95, -2.1], rtol=1e-15)
    np.testing.assert_allclose(trajectory[1], [1.05, -2.3], rtol=1e-15)


def test_sgd_momentum_hand_trajectory():
    # momentum 0.9, buffer starts AT the first gradient (torch), not at 0:
    # step 1: buf = g1 = [0.5, 1.0];                             p1 = p0 - 0.1 buf = [0.95, -2.1]
    # step 2: buf = 0.9 [0.5, 1.0] + [-1, 2] = [-0.55, 2.9];     p2 = [0.95 + 0.055, -2.1 - 0.29] = [1.005, -2.39]
    # step 3: buf = 0.9 [-0.55, 2.9] + [0, -1] = [-0.495, 1.61]; p3 = [1.005 + 0.0495, -2.39 - 0.161] = [1.0545, -2.551]
    optimizer = SGD({"p": P0.copy()}, lr=0.1, momentum=0.9)
    trajectory = run_steps(optimizer, "p", [G1, G2, G3])
    np.testing.assert_allclose(trajectory[0], [0.95, -2.1], rtol=1e-14)
    np.testing.assert_allclose(trajectory[1], [1.005, -2.39], rtol=1e-14)
    np.testing.assert_allclose(trajectory[2], [1.0545, -2.551], rtol=1e-14)
    np.testing.assert_allclose(optimizer.state["momentum_buffer"]["p"], [-0.495, 1.61], rtol=1e-14)


def test_sgd_nesterov_hand_trajectory():
    # step 1: buf = g1 = [0.5, 1];      d = g1 + 0.9 buf = [0.95, 1.9];              p1 = [0.905, -2.19]
    # step 2: buf = [-0.55, 2.9];       d = g2 + 0.9 buf = [-1.495, 4.61];           p2 = [0.905 + 0.1495, -2.19 - 0.461]
    #                                                                                     = [1.0545, -2.651]
    optimizer = SGD({"p": P0.copy()}, lr=0.1, momentum=0.9, nesterov=True)
    trajectory = run_steps(optimizer, "p", [G1, G2])
    np.testing.assert_allclose(trajectory[0], [0.905, -2.19], rtol=1e-14)
    np.testing.assert_allclose(trajectory[1], [1.0545, -2.651], rtol=1e-14)


def test_sgd_weight_decay_hand_trajectory():
    # weight decay 0.1 adds 0.1 p to the gradient:
    # step 1: d = [0.5 + 0.1, 1.0 - 0.2] = [0.6, 0.8];          p1 = [0.94, -2.08]
    # step 2: d = [-1 + 0.094, 2 - 0.208] = [-0.906, 1.792];    p2 = [0.94 + 0.0906, -2.08 - 0.1792] = [1.0306, -2.2592]
    trajectory = run_steps(SGD({"p": P0.copy()}, lr=0.1, weight_decay=0.1), "p", [G1, G2])
    np.testing.assert_allclose(trajectory[0], [0.94, -2.08], rtol=1e-14)
    np.testing.assert_allclose(trajectory[1], [1.0306, -2.2592], rtol=1e-14)


def test_sgd_momentum_with_weight_decay_hand_trajectory():
    # momentum 0.5, weight decay 0.1, lr 0.1:
    # step 1: d = [0.6, 0.8] (as above); buf = d;                        p1 = [0.94, -2.08]
    # step 2: d = [-0.906, 1.792]; buf = 0.5 [0.6, 0.8] + d = [-0.606, 2.192];
    #         p2 = [0.94 + 0.0606, -2.08 - 0.2192] = [1.0006, -2.2992]
    trajectory = run_steps(SGD({"p": P0.copy()}, lr=0.1, momentum=0.5, weight_decay=0.1), "p", [G1, G2])
    np.testing.assert_allclose(trajectory[0], [0.94, -2.08], rtol=1e-14)
    np.testing.assert_allclose(trajectory[1], [1.0006, -2.2992], rtol=1e-14)


# ----------------------------------------------------------------------------------
# Adam, hand-computed
# ----------------------------------------------------------------------------------

def test_adam_hand_trajectory():
    # lr 0.1, betas (0.9, 0.999), eps 1e-8, p0 = [1, -1], g1 = [0.5, -2], g2 = [0.5, 1].
    # step 1: m = 0.1 g1 = [0.05, -0.2];  v = 0.001 g1^2 = [0.00025, 0.004]
    #         bias corrections 1 - 0.9 = 0.1 and 1 - 0.999 = 0.001 give m/0.1 = g1, sqrt(v/0.001) = |g1|,
    #         so the first step is lr * g / (|g| + eps): p1 = [1 - 0.1*0.5/(0.5+eps), -1 + 0.1*2/(2+eps)]
    # step 2: m = 0.9 [0.05, -0.2] + 0.1 [0.5, 1] = [0.095, -0.08]
    #         v = 0.999 [0.00025, 0.004] + 0.001 [0.25, 1] = [0.00049975, 0.004996]
    #         1 - 0.9^2 = 0.19,  1 - 0.999^2 = 0.001999
    #         p2 = p1 - 0.1 * (m / 0.19) / (sqrt(v) / sqrt(0.001999) + eps)
    #         (coordinate 0: v/0.001999 = 0.25 exactly in reals, m/0.19 = 0.5 -> step ~ 0.1)
    eps = 1e-8
    p = float64(1.0, -1.0)
    optimizer = Adam({"p": p}, lr=0.1, betas=(0.9, 0.999), eps=eps)

    optimizer.step({"p": float64(0.5, -2.0)})
    p1 = float64(1 - 0.1 * 0.5 / (0.5 + eps), -1 + 0.1 * 2.0 / (2.0 + eps))
    np.testing.assert_allclose(optimizer.state["exp_avg"]["p"], [0.05, -0.2], rtol=1e-14)
    np.testing.assert_allclose(optimizer.state["exp_avg_sq"]["p"], [0.00025, 0.004], rtol=1e-12)
    np.testing.assert_allclose(p, p1, rtol=1e-12)

    optimizer.step({"p": float64(0.5, 1.0)})
    m2 = float64(0.095, -0.08)
    v2 = float64(0.00049975, 0.004996)
    np.testing.assert_allclose(optimizer.state["exp_avg"]["p"], m2, rtol=1e-13)
    np.testing.assert_allclose(optimizer.state["exp_avg_sq"]["p"], v2, rtol=1e-12)
    p2 = p1 - 0.1 * (m2 / 0.19) / (np.sqrt(v2) / math.sqrt(0.001999) + eps)
    np.testing.assert_allclose(p, p2, rtol=1e-10)
    assert p[0] == pytest.approx(p1[0] - 0.1, rel=1e-7)     # the coordinate-0 shortcut


def test_adam_weight_decay_is_added_to_the_gradient():
    # With weight decay 0.5 and g = 0 at p = [2, -4], the effective gradient is 0.5 p = [1, -2];
    # the first Adam step moves each coordinate by lr * sign(effective gradient) (up to eps).
    p = float64(2.0, -4.0)
    Adam({"p": p}, lr=0.01, weight_decay=0.5, eps=0.0).step({"p": float64(0.0, 0.0)})
    np.testing.assert_allclose(p, [1.99, -3.99], rtol=1e-14)


# ----------------------------------------------------------------------------------
# Independent reference (torch's documented algorithms, element by element in float64)
# ----------------------------------------------------------------------------------

def reference_sgd(initial, gradients, lr, momentum, nesterov, weight_decay):
    params = {name: [float(x) for x in value.ravel()] for name, value in initial.items()}
    buffers = {}
    for grads in gradients:
        for name in params:
            g = [float(x) for x in grads[name].ravel()]
            p = params[name]
            d = [g[i] + weight_decay * p[i] for i in range(len(p))]
            if momentum != 0:
                if name not in buffers:
                    buffers[name] = list(d)
                else:
                    buffers[name] = [momentum * b + di for b, di in zip(buffers[name], d)]
                if nesterov:
                    d = [di + momentum * b for di, b in zip(d, buffers[name])]
                else:
                    d = list(buffers[name])
            params[name] = [p[i] - lr * d[i] for i in range(len(p))]
    return {name: np.array(value).reshape(initial[name].shape) for name, value in params.items()}


def reference_adam(initial, gradients, lr, beta1, beta2, eps, weight_decay):
    params = {name: [float(x) for x in value.ravel()] for name, value in initial.items()}
    first = {name: [0.0] * len(value) for name, value in params.items()}
    second = {name: [0.0] * len(value) for name, value in params.items()}
    for t, grads in enumerate(gradients, start=1):
        for name in params:
            p = params[name]
            for i, g in enumerate(float(x) for x in grads[name].ravel()):
                g = g + weight_decay * p[i]
                first[name][i] = beta1 * first[name][i] + (1 - beta1) * g
                second[name][i] = beta2 * second[name][i] + (1 - beta2) * g * g
                m_hat = first[name][i] / (1 - beta1 ** t)
                v_hat = second[name][i] / (1 - beta2 ** t)
                p[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return {name: np.array(value).reshape(initial[name].shape) for name, value in params.items()}


def random_problem(rng, dtype, n_steps):
    """Two parameters of odd shapes and ``n_steps`` random gradient dicts."""
    initial = {"w": rng.standard_normal((3, 5)).astype(dtype), "b": rng.standard_normal(7).astype(dtype)}
    gradients = [{name: rng.standard_normal(value.shape).astype(dtype) for name, value in initial.items()}
                 for _ in range(n_steps)]
    return initial, gradients


SGD_CONFIGS = [
    dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0),
    dict(lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.0),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.0),
    dict(lr=0.03, momentum=0.8, nesterov=True, weight_decay=0.01),
    dict(lr=0.2, momentum=0.0, nesterov=False, weight_decay=0.3),
]
ADAM_CONFIGS = [
    dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    dict(lr=0.01, betas=(0.0, 0.5), eps=1e-3, weight_decay=0.0),
]


def adam_reference(initial, gradients, lr, betas, eps, weight_decay):
    return reference_adam(initial, gradients, lr, betas[0], betas[1], eps, weight_decay)


@pytest.mark.parametrize("optimizer_class, reference, config", [
    *[(SGD, reference_sgd, config) for config in SGD_CONFIGS],
    *[(Adam, adam_reference, config) for config in ADAM_CONFIGS],
])
def test_optimizer_matches_elementwise_reference(optimizer_class, reference, config):
    initial, gradients = random_problem(np.random.default_rng(3 if optimizer_class is SGD else 4), np.float64, 6)
    params = {name: value.copy() for name, value in initial.items()}
    optimizer = optimizer_class(params, **config)
    for grads in gradients:
        optimizer.step(grads)
    expected = reference(initial, gradients, **config)
    for name in params:
        np.testing.assert_allclose(params[name], expected[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer_class, reference, config", [
    (SGD, reference_sgd, SGD_CONFIGS[3]), (Adam, adam_reference, ADAM_CONFIGS[1])])
def test_lr_scales_give_one_param_a_scaled_learning_rate(optimizer_class, reference, config):
    """lr_scales={"b": 0.3}: "b" follows the reference run at 0.3 * lr (weight decay included),
    "w" the run at lr, also after the schedule changes lr."""
    initial, gradients = random_problem(np.random.default_rng(7), np.float64, 6)
    params = {name: value.copy() for name, value in initial.items()}
    optimizer = optimizer_class(params, **config, lr_scales={"b": 0.3})
    for grads in gradients:
        optimizer.step(grads)
    scaled = reference(initial, gradients, **{**config, "lr": 0.3 * config["lr"]})
    plain = reference(initial, gradients, **config)
    np.testing.assert_allclose(params["b"], scaled["b"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(params["w"], plain["w"], rtol=1e-12, atol=1e-14)
    assert not np.allclose(params["b"], plain["b"])  # the scale made a difference
    assert "lr_scales={'b': 0.3}" in repr(optimizer)


@pytest.mark.parametrize("lr_scales, error, message", [
    ({"nope": 0.5}, ValueError, r"lr_scales names \['nope'\], which are not params"),
    ({"w": 0.0}, ValueError, r"lr_scales\['w'\] must be > 0, got 0.0"),
    ({"w": -1.0}, ValueError, r"lr_scales\['w'\] must be >= 0.0"),
    ({"w": float("nan")}, ValueError, r"lr_scales\['w'\]"),
    ([("w", 0.5)], TypeError, "lr_scales must be a dict param name -> float, got list"),
])
def test_lr_scales_are_validated(lr_scales, error, message):
    params = {"w": np.zeros(3)}
    for optimizer_class in (SGD, Adam):
        with pytest.raises(error, match=message):
            optimizer_class(params, lr=0.1, lr_scales=lr_scales)


# ----------------------------------------------------------------------------------
# torch parity (skipped when torch is not installed)
# ----------------------------------------------------------------------------------

# float32: each step adds ~1 ulp of rounding-order difference; 6 steps stay well inside these.
TORCH_TOLERANCES = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}


def run_torch(torch_optimizer_class, initial, gradients, **config):
    torch = pytest.importorskip("torch")
    names = sorted(initial)
    tensors = [torch.tensor(initial[name].copy(), requires_grad=True) for name in names]
    optimizer = torch_optimizer_class(tensors, **config)
    for grads in gradients:
        for name, tensor in zip(names, tensors):
            tensor.grad = torch.tensor(grads[name].copy())
        optimizer.step()
    return {name: tensor.detach().numpy() for name, tensor in zip(names, tensors)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("optimizer_class, torch_name, config, torch_only", [
    *[(SGD, "SGD", config, {"dampening": 0.0}) for config in SGD_CONFIGS],
    *[(Adam, "Adam", config, {"amsgrad": False}) for config in ADAM_CONFIGS],
])
def test_optimizer_matches_torch(optimizer_class, torch_name, config, torch_only, dtype):
    torch = pytest.importorskip("torch")
    initial, gradients = random_problem(np.random.default_rng(5 if optimizer_class is SGD else 6), dtype, 6)
    params = {name: value.copy() for name, value in initial.items()}
    optimizer = optimizer_class(params, **config)
    for grads in gradients:
        optimizer.step(grads)
    expected = run_torch(getattr(torch.optim, torch_name), initial, gradients, **torch_only, **config)
    for name in params:
        assert params[name].dtype == dtype
        np.testing.assert_allclose(params[name], expected[name], **TORCH_TOLERANCES[dtype])


# ----------------------------------------------------------------------------------
# In-place updates, untouched gradients, dtype preservation
# ----------------------------------------------------------------------------------

class TinyLinear:
    """A minimal module following the params/grads protocol: out = x @ W."""

    def __init__(self, weight):
        self.weight = weight
        self.params = {"W": self.weight}

    def forward(self, x):
        return x @ self.weight


@pytest.mark.parametrize("make_optimizer", [
    lambda params: SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda params: Adam(params, lr=0.1, weight_decay=0.01),
])
def test_updates_are_in_place_and_grads_untouched(make_optimizer):
    rng = np.random.default_rng(7)
    module = TinyLinear(rng.standard_normal((4, 3)).astype(np.float32))
    weight_object = module.weight
    optimizer = make_optimizer(module.params)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    before = module.forward(x)
    grad = rng.standard_normal((4, 3)).astype(np.float32)
    grad_copy = grad.copy()
    for _ in range(2):
        optimizer.step({"W": grad})
    assert module.weight is weight_object and module.params["W"] is weight_object
    assert optimizer.params["W"] is weight_object
    assert not np.allclose(module.forward(x), before)         # the module sees the update
    np.testing.assert_array_equal(grad, grad_copy)            # gradients are not modified


def test_writing_into_params_is_seen_by_the_optimizer():
    weight = np.zeros(3, dtype=np.float64)
    optimizer = SGD({"W": weight}, lr=1.0)
    weight[...] = [1.0, 2.0, 3.0]                               # e.g. a checkpoint load
    optimizer.step({"W": float64(1.0, 1.0, 1.0)})
    np.testing.assert_array_equal(weight, [0.0, 1.0, 2.0])


@pytest.mark.parametrize("make_optimizer", [
    lambda params: SGD(params, lr=0.1),
    lambda params: SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda params: Adam(params, lr=1e-2, weight_decay=1e-3),
])
def test_float32_stays_float32_and_tracks_float64(make_optimizer):
    initial, gradients = random_problem(np.random.default_rng(8), np.float32, 5)
    params32 = {name: value.copy() for name, value in initial.items()}
    params64 = {name: value.astype(np.float64) for name, value in initial.items()}
    optimizer32, optimizer64 = make_optimizer(params32), make_optimizer(params64)
    for grads in gradients:
        optimizer32.step(grads)
        optimizer64.step({name: value.astype(np.float64) for name, value in grads.items()})
    for name in params32:
        assert params32[name].dtype == np.float32
        np.testing.assert_allclose(params32[name], params64[name], rtol=1e-5, atol=1e-6)
    for buffers in optimizer32.state.values():
        for buffer in buffers.values():
            assert buffer.dtype == np.float32


def test_sgd_float32_arithmetic_is_float32():
    # A float64 intermediate rounded back to float32 differs from true float32 arithmetic
    # in the last bit for some of these 10_000 elements; bitwise equality rules it out.
    rng = np.random.default_rng(9)
    p = rng.standard_normal(10_000).astype(np.float32)
    g1, g2 = (rng.standard_normal(10_000).astype(np.float32) for _ in range(2))
    expected = p.copy()
    lr, momentum, weight_decay = np.float32(0.1), np.float32(0.9), np.float32(0.01)
    d1 = g1 + weight_decay * expected
    buffer = d1.copy()
    expected = expected - lr * buffer
    d2 = g2 + weight_decay * expected
    buffer = momentum * buffer + d2
    expected = expected - lr * buffer
    optimizer = SGD({"p": p}, lr=0.1, momentum=0.9, weight_decay=0.01)
    optimizer.step({"p": g1})
    optimizer.step({"p": g2})
    np.testing.assert_array_equal(p, expected)


# ----------------------------------------------------------------------------------
# state_dict round trips
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make_optimizer", [
    lambda params: SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda params: SGD(params, lr=0.05),
    lambda params: Adam(params, lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-3),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_dict_round_trip_through_npz_continues_identically(make_optimizer, dtype, tmp_path):
    initial, gradients = random_problem(np.random.default_rng(10), dtype, 6)
    params = {name: value.copy() for name, value in initial.items()}
    optimizer = make_optimizer(params)
    for grads in gradients[:3]:
        optimizer.step(grads)

    np.savez(tmp_path / "optimizer.npz", **optimizer.state_dict())
    resumed_params = {name: value.copy() for name, value in params.items()}
    resumed = make_optimizer(resumed_params)
    resumed.lr = 123.0                                   # overwritten by the loaded lr
    with np.load(tmp_path / "optimizer.npz") as saved:
        resumed.load_state_dict(saved)
    assert resumed.lr == optimizer.lr and resumed.step_count == 3

    for grads in gradients[3:]:
        optimizer.step(grads)
        resumed.step(grads)
    for name in params:
        assert resumed_params[name].dtype == dtype
        np.testing.assert_array_equal(resumed_params[name], params[name])


def test_state_dict_is_a_snapshot_of_plain_values():
    params = {"w": np.ones(4)}
    optimizer = SGD(params, lr=0.1, momentum=0.9)
    assert "momentum_buffer/w" not in optimizer.state_dict()   # no buffer before the first step
    optimizer.step({"w": np.ones(4)})
    state = optimizer.state_dict()
    assert state["optimizer"] == "SGD" and state["step"] == 1
    assert state["lr"] == 0.1 and state["momentum"] == 0.9 and state["nesterov"] is False
    saved_buffer = state["momentum_buffer/w"].copy()
    optimizer.step({"w": np.ones(4)})
    np.testing.assert_array_equal(state["momentum_buffer/w"], saved_buffer)   # a copy, not a view
    for value in state.values():
        assert isinstance(value, (np.ndarray, str, bool, int, float))


def test_load_state_dict_errors_leave_the_optimizer_unchanged():
    params = {"w": np.ones(4), "b": np.zeros(2)}
    optimizer = SGD(params, lr=0.1, momentum=0.9)
    optimizer.step({"w": np.ones(4), "b": np.ones(2)})
    good = optimizer.state_dict()

    with pytest.raises(ValueError, match="saved by optimizer 'Adam'"):
        optimizer.load_state_dict(Adam({"w": np.ones(4), "b": np.zeros(2)}).state_dict())
    bad = dict(good, **{"momentum_buffer/w": np.ones(5)})
    with pytest.raises(ValueError, match=r"'momentum_buffer/w' has shape \(5,\), expected \(4,\)"):
        optimizer.load_state_dict(bad)
    bad = {key: value for key, value in good.items() if key != "momentum_buffer/b"}
    with pytest.raises(ValueError, match=r"lacks 'momentum_buffer' buffers for params \['b'\]"):
        optimizer.load_state_dict(bad)
    bad = dict(good, **{"momentum_buffer/conv9": np.ones(4)})
    with pytest.raises(ValueError, match="'momentum_buffer/conv9' is not a buffer"):
        optimizer.load_state_dict(bad)
    bad = {key: value for key, value in good.items() if key != "lr"}
    with pytest.raises(ValueError, match="missing the entry 'lr'"):
        optimizer.load_state_dict(bad)
    # step > 0 with momentum but no buffers at all, and a new lr that would be valid:
    bad = {key: value for key, value in good.items() if not key.startswith("momentum_buffer/")}
    bad["lr"] = 0.5
    with pytest.raises(ValueError, match="no momentum_buffer entries"):
        optimizer.load_state_dict(bad)
    assert optimizer.lr == 0.1 and optimizer.step_count == 1
    np.testing.assert_array_equal(optimizer.state["momentum_buffer"]["w"], good["momentum_buffer/w"])


# ----------------------------------------------------------------------------------
# Optimizer validation
# ----------------------------------------------------------------------------------

def test_step_validation_names_the_problem():
    optimizer = SGD({"w": np.ones((2, 3)), "b": np.ones(3)}, lr=0.1)
    with pytest.raises(ValueError, match=r"missing from grads: \['b'\], not in params: \['bias'\]"):
        optimizer.step({"w": np.ones((2, 3)), "bias": np.ones(3)})
    with pytest.raises(ValueError, match=r"grads\['w'\] has shape \(3, 2\), expected .*\(2, 3\)"):
        optimizer.step({"w": np.ones((3, 2)), "b": np.ones(3)})
    with pytest.raises(TypeError, match=r"grads\['b'\] has dtype float32, expected .*float64"):
        optimizer.step({"w": np.ones((2, 3)), "b": np.ones(3, dtype=np.float32)})
    with pytest.raises(TypeError, match="grads must be a dict"):
        optimizer.step([np.ones((2, 3)), np.ones(3)])
    assert optimizer.step_count == 0                              # nothing happened


def test_constructor_validation():
    params = {"w": np.ones(3)}
    with pytest.raises(ValueError, match="lr must be >= 0.0, got -0.1"):
        SGD(params, lr=-0.1)
    with pytest.raises(ValueError, match="momentum must be >= 0.0, got -0.5"):
        SGD(params, momentum=-0.5)
    with pytest.raises(ValueError, match="nesterov=True requires momentum > 0"):
        SGD(params, nesterov=True)
    with pytest.raises(ValueError, match="weight_decay must be >= 0.0"):
        SGD(params, weight_decay=-1.0)
    with pytest.raises(ValueError, match="lr must be finite"):
        Adam(params, lr=float("nan"))
    with pytest.raises(ValueError, match=r"betas\[1\] must be < 1.0, got 1.0"):
        Adam(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"betas\[0\] must be >= 0.0"):
        Adam(params, betas=(-0.1, 0.9))
    with pytest.raises(ValueError, match="betas must be a pair"):
        Adam(params, betas=0.9)
    with pytest.raises(ValueError, match="eps must be >= 0.0"):
        Adam(params, eps=-1e-8)
    with pytest.raises(ValueError, match="params is empty"):
        SGD({})
    with pytest.raises(TypeError, match=r"params\['w'\] must be a floating array, got dtype int64"):
        SGD({"w": np.ones(3, dtype=np.int64)})
    read_only = np.ones(3)
    read_only.setflags(write=False)
    with pytest.raises(ValueError, match=r"params\['w'\] is read-only"):
        Adam({"w": read_only})


def test_lr_is_settable_and_validated():
    params = {"w": np.ones(2)}
    optimizer = SGD(params, lr=0.1)
    optimizer.lr = 0.5
    optimizer.step({"w": float64(1.0, 2.0)})
    np.testing.assert_allclose(params["w"], [0.5, 0.0])
    optimizer.lr = np.float64(0.25)
    assert type(optimizer.lr) is float                         # stored as a python float
    with pytest.raises(ValueError, match="lr must be >= 0.0"):
        optimizer.lr = -1.0
    with pytest.raises(ValueError, match="lr must be finite"):
        optimizer.lr = float("inf")
    assert optimizer.lr == 0.25


# ----------------------------------------------------------------------------------
# Schedules, values computed by hand
# ----------------------------------------------------------------------------------

def test_constant_schedule():
    schedule = ConstantSchedule(0.1)
    assert schedule(0) == 0.1 and schedule(10_000) == 0.1


def test_cosine_schedule_with_warmup_hand_values():
    # base 1, T = 10, W = 2, final 0:
    #   t = 0, 1: warm-up 1 * (t + 1) / 2 = 0.5, 1.0
    #   t >= 2:   0.5 (1 + cos(pi (t - 2) / 8))
    #   t = 2: cos 0 = 1 -> 1.0;  t = 4: cos(pi/4) -> 0.5 (1 + 0.70710678) = 0.85355339
    #   t = 6: cos(pi/2) = 0 -> 0.5;  t = 10: cos(pi) = -1 -> 0;  t = 25: clamped -> 0
    schedule = CosineSchedule(1.0, total_steps=10, warmup_steps=2)
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.8535533905932737, 6: 0.5, 10: 0.0, 25: 0.0}
    for step, value in expected.items():
        assert schedule(step) == pytest.approx(value, abs=1e-15), step


def test_cosine_schedule_with_final_value():
    # base 1, final 0.1, T = 4, no warm-up: 0.1 + 0.9 * 0.5 (1 + cos(pi t / 4))
    #   t = 0 -> 1.0;  t = 2 -> 0.1 + 0.45 = 0.55;  t = 4 -> 0.1;  t = 100 -> 0.1
    schedule = CosineSchedule(1.0, total_steps=4, final=0.1)
    for step, value in {0: 1.0, 2: 0.55, 4: 0.1, 100: 0.1}.items():
        assert schedule(step) == pytest.approx(value, abs=1e-15), step


def test_step_schedule_hand_values():
    # base 0.1, step_size 3, gamma 0.5: 0.1 for t in 0..2, 0.05 for 3..5, 0.025 for 6..8
    schedule = StepSchedule(0.1, step_size=3, gamma=0.5)
    expected = [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025]
    assert [schedule(t) for t in range(7)] == pytest.approx(expected, abs=1e-15)
    # with a 2-step warm-up: 0.05, 0.1, then the decay counted from t = 2
    schedule = StepSchedule(0.1, step_size=3, gamma=0.5, warmup_steps=2)
    expected = [0.05, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025]
    assert [schedule(t) for t in range(9)] == pytest.approx(expected, abs=1e-15)


def test_exponential_temperature_schedule_hand_values():
    # tau0 1, tau_min 0.5, rate 0.1: exp(-0.1 t) until it drops below 0.5 (t > ln 2 / 0.1 = 6.93)
    #   t = 0 -> 1;  t = 1 -> exp(-0.1) = 0.904837418;  t = 5 -> exp(-0.5) = 0.60653066
    #   t = 6 -> exp(-0.6) = 0.548811636;  t = 7 -> exp(-0.7) = 0.4966 < 0.5 -> 0.5
    schedule = ExponentialTemperatureSchedule(tau0=1.0, tau_min=0.5, rate=0.1)
    expected = {0: 1.0, 1: 0.9048374180359595, 5: 0.6065306597126334,
                6: 0.5488116360940264, 7: 0.5, 1000: 0.5}
    for step, value in expected.items():
        assert schedule(step) == pytest.approx(value, rel=1e-14), step
    frozen = ExponentialTemperatureSchedule(tau0=2.0, tau_min=0.1, rate=0.0)
    assert frozen(0) == frozen(10_000) == 2.0


def test_schedule_validation():
    for bad in (dict(tau0=0.0, tau_min=0.1, rate=0.1), dict(tau0=-1.0, tau_min=0.1, rate=0.1)):
        with pytest.raises(ValueError, match="tau0 must be > 0.0"):
            ExponentialTemperatureSchedule(**bad)
    with pytest.raises(ValueError, match="tau_min must be > 0.0"):
        ExponentialTemperatureSchedule(1.0, 0.0, 0.1)
    with pytest.raises(ValueError, match="rate must be >= 0.0, got -0.1"):
        ExponentialTemperatureSchedule(1.0, 0.5, -0.1)
    with pytest.raises(ValueError, match="tau0 must be finite"):
        ExponentialTemperatureSchedule(float("inf"), 0.5, 0.1)
    with pytest.raises(ValueError, match="rate must be finite"):
        ExponentialTemperatureSchedule(1.0, 0.5, float("nan"))
    with pytest.raises(ValueError, match="tau_min must be <= tau0=1.0, got 2.0"):
        ExponentialTemperatureSchedule(1.0, 2.0, 0.1)
    with pytest.raises(ValueError, match="warmup_steps must be < total_steps=5, got 5"):
        CosineSchedule(0.1, total_steps=5, warmup_steps=5)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        CosineSchedule(0.1, total_steps=0)
    with pytest.raises(ValueError, match="step_size must be >= 1"):
        StepSchedule(0.1, step_size=0)
    with pytest.raises(ValueError, match="gamma must be > 0.0"):
        StepSchedule(0.1, step_size=2, gamma=0.0)
    with pytest.raises(ValueError, match="base must be >= 0.0"):
        StepSchedule(-0.1, step_size=2)
    schedule = ConstantSchedule(1.0)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        schedule(-1)
    with pytest.raises(TypeError, match="step must be an int, got float"):
        schedule(1.5)
    assert schedule(np.int64(3)) == 1.0


# ----------------------------------------------------------------------------------
# Scheduler: lr and tau from one hook
# ----------------------------------------------------------------------------------

class TemperatureHead:
    """Stand-in for the Gumbel head: a validated ``tau`` property."""

    def __init__(self, tau):
        self.tau = tau

    @property
    def tau(self):
        return self._tau

    @tau.setter
    def tau(self, value):
        if not value > 0:
            raise ValueError(f"tau must be > 0, got {value}")
        self._tau = value


def test_scheduler_sets_lr_and_tau():
    optimizer = SGD({"w": np.ones(2)}, lr=1.0)
    head = TemperatureHead(5.0)
    lr_schedule = StepSchedule(0.1, step_size=3, gamma=0.5)
    tau_schedule = ExponentialTemperatureSchedule(tau0=1.0, tau_min=0.5, rate=0.1)
    scheduler = Scheduler(optimizer, lr_schedule, head, tau_schedule)
    values = scheduler.apply(0)
    assert values == {"lr": 0.1, "tau": 1.0}
    assert optimizer.lr == 0.1 and head.tau == 1.0
    # Stateless: jumping straight to step 5 (a resume) gives the values of step 5.
    values = scheduler.apply(5)
    assert values["lr"] == pytest.approx(0.05) and optimizer.lr == pytest.approx(0.05)
    assert head.tau == pytest.approx(math.exp(-0.5))
    # A scheduler with only a temperature schedule leaves the learning rate alone.
    Scheduler(optimizer, None, head, tau_schedule).apply(7)
    assert head.tau == 0.5 and optimizer.lr == pytest.approx(0.05)     # lr untouched without a schedule
    assert Scheduler().apply(3) == {}


def test_scheduler_validation():
    class HeadWithoutTemperature:
        pass

    with pytest.raises(ValueError, match="tau_schedule needs a head with a 'tau' attribute.*HeadWithoutTemperature"):
        Scheduler(head=HeadWithoutTemperature(), tau_schedule=ConstantSchedule(1.0))
    with pytest.raises(ValueError, match="lr_schedule needs an optimizer"):
        Scheduler(lr_schedule=ConstantSchedule(0.1))
    with pytest.raises(TypeError, match="lr_schedule must be callable"):
        Scheduler(SGD({"w": np.ones(1)}), lr_schedule=0.1)
    with pytest.raises(ValueError, match="step must be >= 0"):
        Scheduler().apply(-3)
