"""The head protocol, checked identically for the heads (and several trees).

(The sampled head, and every head with its options, also go through ``npsoftmax.check_head``
in ``test_conformance.py``.)

Gradient checks in float64 for ``h`` and every parameter (batch 1 and 7, random
features and labels), normalised ``log_prob``, ``predict == argmax(log_prob)``,
``forward == mean NLL under log_prob``, live parameters, input validation, dtype
preservation, and a training sanity run per head.
"""

import numpy as np
import pytest

from npsoftmax.data import COARSE_OF_FINE
from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors
from npsoftmax.heads import (HEADS, AdaptiveSoftmaxHead, GumbelSoftmaxHead,
                             HierarchicalSoftmaxHead, SampledSoftmaxHead, SoftmaxHead, balanced_tree,
                             huffman_tree, logsumexp, make_head)

K = 100

# name -> (registry name, options). Trees: K=100 is not a power of two; the grouped
# tree uses a random (non-contiguous) grouping; Huffman uses skewed counts.
CONFIGS = {
    "softmax": ("softmax", {}),
    "gumbel": ("gumbel", {"tau": 0.6}),
    "hierarchical-balanced": ("hierarchical", {}),
    "hierarchical-ternary": ("hierarchical", {"tree": balanced_tree(K, branching=3)}),
    "hierarchical-groups": ("hierarchical", {
        "tree": "groups", "groups": np.random.default_rng(7).integers(0, 9, size=K)}),
    "hierarchical-cifar100": ("hierarchical", {"tree": "groups", "groups": COARSE_OF_FINE}),
    "hierarchical-huffman": ("hierarchical", {
        "tree": huffman_tree(1.0 / np.arange(1, K + 1) ** 1.1)}),
    "adaptive": ("adaptive", {"cutoffs": [10, 40, 70], "div_value": 2.0}),
    "adaptive-head-bias": ("adaptive", {"cutoffs": [25], "head_bias": True}),
}


def build(config, in_features=8, dtype=np.float64, seed=0, n_classes=K):
    name, options = CONFIGS[config]
    return make_head(name, in_features, n_classes, rng=np.random.default_rng(seed),
                     dtype=dtype, **options)


def scale_parameters(head, factor):
    """Make the initial distribution peaked, so that argmax/normalisation are non-trivial."""
    for value in head.params.values():
        value *= factor
    return head


def labels_covering(head, n_samples, rng):
    """Random labels; for the adaptive head at least one in the shortlist and in each cluster."""
    y = rng.integers(0, head.n_classes, size=n_samples)
    if isinstance(head, AdaptiveSoftmaxHead) and n_samples >= len(head.cutoffs):
        bounds = [0] + head.cutoffs
        y[:len(bounds) - 1] = [rng.integers(low, high) for low, high in zip(bounds, bounds[1:])]
        rng.shuffle(y)
    return y


@pytest.mark.parametrize("n_samples", [1, 7])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_backward_matches_numerical_gradient(config, n_samples):
    rng = np.random.default_rng(100 + n_samples)
    head = scale_parameters(build(config), 3.0)
    # Biases start at zero; random values make their gradients (and h's) generic.
    for name, value in head.params.items():
        if name.endswith("b"):
            value[...] = rng.standard_normal(value.shape)
    h = rng.standard_normal((n_samples, head.in_features))
    y = labels_covering(head, n_samples, rng)
    head.forward(h, y)
    if isinstance(head, GumbelSoftmaxHead):
        noise = head.last_noise  # held fixed: the loss is then a deterministic function
        loss_fn = lambda: head.forward(h, y, noise=noise)  # noqa: E731
    else:
        loss_fn = lambda: head.forward(h, y)  # noqa: E731
    dh = head.backward().copy()
    analytic = {"h": dh, **{name: grad.copy() for name, grad in head.grads.items()}}
    errors = gradient_errors(loss_fn, {"h": h, **head.params}, analytic)
    assert set(errors) == {"h", *head.params}
    assert max(errors.values()) < HEAD_TOLERANCE, errors
    # The checked gradient is not trivially zero.
    assert np.linalg.norm(dh) > 1e-3


@pytest.mark.parametrize("config", list(CONFIGS))
def test_gradients_are_correct_after_several_steps(config):
    """grads must describe the *last* forward only (no stale rows, no accumulation)."""
    rng = np.random.default_rng(5)
    head = build(config)
    h = rng.standard_normal((5, head.in_features))
    for _ in range(3):
        head.forward(rng.standard_normal((5, head.in_features)), rng.integers(0, K, 5))
        head.backward()
    y = rng.integers(0, K, 5)
    head.forward(h, y)
    noise = getattr(head, "last_noise", None)
    loss_fn = (lambda: head.forward(h, y, noise=noise)) if noise is not None else (lambda: head.forward(h, y))
    analytic = {"h": head.backward().copy(), **{n: g.copy() for n, g in head.grads.items()}}
    errors = gradient_errors(loss_fn, {"h": h, **head.params}, analytic)
    assert max(errors.values()) < HEAD_TOLERANCE, errors


@pytest.mark.parametrize("config", list(CONFIGS))
def test_log_prob_is_normalised_and_predict_is_its_argmax(config):
    rng = np.random.default_rng(1)
    head = scale_parameters(build(config), 4.0)
    h = rng.standard_normal((64, head.in_features))
    log_prob = head.log_prob(h)
    assert log_prob.shape == (64, K)
    np.testing.assert_allclose(logsumexp(log_prob, axis=1), 0.0, atol=1e-6)
    prediction = head.predict(h)
    assert prediction.shape == (64,)
    np.testing.assert_array_equal(prediction, np.argmax(log_prob, axis=1))
    # Non-trivial: the scaled heads predict many different classes.
    assert np.unique(prediction).size > 5


@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_is_the_mean_nll_of_log_prob(config):
    """Ties the training objective to the exact distribution (catches e.g. softmax twice)."""
    rng = np.random.default_rng(2)
    head = scale_parameters(build(config), 2.0).eval()  # eval: Gumbel noise off
    h = rng.standard_normal((9, head.in_features))
    y = labels_covering(head, 9, rng)
    expected = -np.mean(head.log_prob(h)[np.arange(9), y])
    assert head.forward(h, y) == pytest.approx(expected, rel=1e-12)
    if not isinstance(head, GumbelSoftmaxHead):
        assert head.train().forward(h, y) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_parameter_is_live(config):
    """Writing into params[name] changes the head: an optimizer updating params trains it."""
    rng = np.random.default_rng(3)
    head = build(config)
    h = rng.standard_normal((200, head.in_features))
    assert set(head.grads) == set(head.params)
    for name, value in head.params.items():
        assert head.grads[name].shape == value.shape and head.grads[name].dtype == value.dtype
        before = head.log_prob(h)
        value += rng.standard_normal(value.shape)
        assert not np.allclose(head.log_prob(h), before), f"params[{name!r}] is not used"


@pytest.mark.parametrize("config", list(CONFIGS))
def test_float32_stays_float32(config):
    rng = np.random.default_rng(4)
    head = build(config, dtype=np.float32)
    h = rng.standard_normal((6, head.in_features)).astype(np.float32)
    y = rng.integers(0, K, 6)
    loss = head.forward(h, y)
    assert isinstance(loss, float) and np.isfinite(loss)
    dh = head.backward()
    assert dh.dtype == np.float32 and dh.shape == h.shape
    for name in head.params:
        assert head.params[name].dtype == np.float32
        assert head.grads[name].dtype == np.float32
    assert head.log_prob(h).dtype == np.float32
    np.testing.assert_allclose(logsumexp(head.log_prob(h), axis=1), 0.0, atol=1e-5)
    assert head.predict(h).dtype == np.int64


@pytest.mark.parametrize("config", list(CONFIGS))
def test_input_validation_names_the_argument(config):
    head = build(config)
    h = np.zeros((3, head.in_features))
    with pytest.raises(ValueError, match=r"h must have shape \(N, 8\).*\(3, 5\)"):
        head.forward(np.zeros((3, 5)), [0, 1, 2])
    with pytest.raises(ValueError, match=r"h must have shape"):
        head.log_prob(np.zeros(8))
    with pytest.raises(TypeError, match=r"h must have the head's dtype float64, got float32"):
        head.forward(h.astype(np.float32), [0, 1, 2])
    with pytest.raises(TypeError, match=r"h must be a numpy.ndarray"):
        head.predict([[0.0] * 8])
    with pytest.raises(TypeError, match=r"y must hold integer class indices, got dtype float64"):
        head.forward(h, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"y must lie in \[0, 100\), got values in \[0, 100\]"):
        head.forward(h, [0, 1, 100])
    with pytest.raises(ValueError, match=r"y must lie in"):
        head.forward(h, [0, -1, 2])
    with pytest.raises(ValueError, match=r"expected length 3, got 2"):
        head.forward(h, [0, 1])
    with pytest.raises(RuntimeError, match="backward"):
        build(config).backward()


#: Options a head cannot be built without.
REQUIRED = {"sampled": {"n_samples": 1}}


@pytest.mark.parametrize("name", list(HEADS))
def test_constructor_validation(name):
    rng = np.random.default_rng(0)
    required = REQUIRED.get(name, {})
    with pytest.raises(ValueError, match="in_features must be >= 1, got 0"):
        make_head(name, 0, 10, rng=rng, **required)
    with pytest.raises(ValueError, match="n_classes must be >= 2, got 1"):
        make_head(name, 4, 1, rng=rng, **required)
    with pytest.raises(TypeError, match="in_features must be an int"):
        make_head(name, 4.0, 10, rng=rng, **required)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        make_head(name, 4, 10, rng=0, **required)
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got int64"):
        make_head(name, 4, 10, rng=rng, dtype=np.int64, **required)


@pytest.mark.parametrize("name", list(HEADS))
def test_train_eval_modes(name):
    head = make_head(name, 4, 10, rng=np.random.default_rng(0), **REQUIRED.get(name, {}))
    assert head.training is True
    assert head.eval() is head and head.training is False
    assert head.train() is head and head.training is True
    assert isinstance(head.buffers, dict)


def test_registry():
    assert HEADS == {"softmax": SoftmaxHead, "gumbel": GumbelSoftmaxHead,
                     "hierarchical": HierarchicalSoftmaxHead, "adaptive": AdaptiveSoftmaxHead,
                     "sampled": SampledSoftmaxHead}
    rng = np.random.default_rng(0)
    choices = r"adaptive.*gumbel.*hierarchical.*sampled.*softmax"
    with pytest.raises(ValueError, match=r"unknown head 'sparsemax'; choose one of .*" + choices):
        make_head("sparsemax", 4, 10, rng=rng)
    head = make_head("gumbel", 4, 10, rng=rng, dtype=np.float64, tau=0.25)
    assert isinstance(head, GumbelSoftmaxHead) and head.tau == 0.25 and head.dtype == np.float64
    head = make_head("adaptive", 16, 10, rng=rng, cutoffs=[3, 6])
    assert head.cutoffs == [3, 6, 10] and head.dtype == np.float32
    with pytest.raises(TypeError):
        make_head("softmax", 4, 10, rng=rng, cutoffs=[3])  # options go to the head itself


# -- training sanity: a linearly separable problem, the head alone, plain SGD -----------------
SANITY = {
    "softmax": {},
    "gumbel": {"tau": 1.0},
    "hierarchical": {},
    "hierarchical-huffman": {"tree": "huffman", "class_counts": np.arange(20, 0, -1)},
    "adaptive": {"cutoffs": [10, 15], "div_value": 2.0},
    "sampled": {"n_samples": 6, "sampler": "uniform"},
}


@pytest.mark.parametrize("variant", list(SANITY))
def test_training_reaches_high_accuracy_on_separable_data(variant):
    n_classes, in_features, per_class = 20, 32, 20
    rng = np.random.default_rng(11)
    # 20 class centres in 32 dimensions: any split of them is linearly separable,
    # so every tree node's decision and every softmax is learnable.
    centres = rng.standard_normal((n_classes, in_features)) * 2.0
    y = np.repeat(np.arange(n_classes), per_class)
    h = (centres[y] + 0.3 * rng.standard_normal((y.size, in_features))).astype(np.float32)
    name = variant.split("-")[0]
    head = make_head(name, in_features, n_classes, rng=np.random.default_rng(0),
                     dtype=np.float32, **SANITY[variant])
    assert np.mean(head.predict(h) == y) < 0.5  # the untrained head is not already right
    for epoch in range(60):
        order = rng.permutation(y.size)
        for batch in np.array_split(order, 8):
            head.forward(h[batch], y[batch])
            head.backward()
            for key, value in head.params.items():
                value -= 0.5 * head.grads[key]
    head.eval()
    accuracy = np.mean(head.predict(h) == y)
    assert accuracy > 0.95, accuracy
