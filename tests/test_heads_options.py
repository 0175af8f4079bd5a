"""class_weights (every head), label_smoothing (softmax, gumbel), and non-finite features.

Oracles: a per-sample loop of the definition (torch's formula, written out), central
differences in float64 with random data (odd shapes, batch 1). Torch parity is in
``test_heads_torch.py``.
"""

import numpy as np
import pytest

from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors
from npsoftmax.heads import HEADS, make_head, softmax_cross_entropy

K, D = 13, 5

OPTIONS = {
    "softmax": [{"class_weights": "w"}, {"label_smoothing": 0.2}, {"class_weights": "w", "label_smoothing": 0.3}],
    "gumbel": [{"class_weights": "w", "tau": 0.6}, {"label_smoothing": 0.1, "tau": 0.6},
               {"class_weights": "w", "label_smoothing": 0.25, "tau": 1.7}],
    "hierarchical": [{"class_weights": "w"}, {"class_weights": "w", "branching": 3}],
    "adaptive": [{"class_weights": "w", "cutoffs": [3, 8], "div_value": 2.0}],
    "sampled": [{"class_weights": "w", "n_samples": 6}],
}
CASES = [(name, i) for name, variants in OPTIONS.items() for i in range(len(variants))]


def build(name, variant, seed=0, n_classes=K):
    rng = np.random.default_rng(seed)
    options = dict(OPTIONS[name][variant])
    if options.get("class_weights") == "w":
        options["class_weights"] = rng.uniform(0.1, 3.0, n_classes)
    head = make_head(name, D, n_classes, rng=rng, dtype=np.float64, **options)
    for value in head.params.values():
        value += 0.5 * rng.standard_normal(value.shape)
    return head


def loop_oracle(log_prob, y, weights, eps):
    """torch's cross_entropy(weight=w, label_smoothing=eps), one sample at a time."""
    n_classes = log_prob.shape[1]
    weights = np.ones(n_classes) if weights is None else weights
    numerator = denominator = 0.0
    for i, label in enumerate(y):
        numerator += (1 - eps) * weights[label] * -log_prob[i, label]
        numerator += eps / n_classes * sum(weights[k] * -log_prob[i, k] for k in range(n_classes))
        denominator += weights[label]
    return numerator / denominator


@pytest.mark.parametrize("n_samples", [1, 6])
@pytest.mark.parametrize("name,variant", CASES)
def test_gradients_with_options(name, variant, n_samples):
    head = build(name, variant, seed=n_samples)
    rng = np.random.default_rng(10 + n_samples)
    h = rng.standard_normal((n_samples, D))
    y = rng.integers(0, K, n_samples)
    head.forward(h, y)
    keyword = head.randomness_argument
    fixed = {keyword: getattr(head, f"last_{keyword}")} if keyword else {}
    analytic = {"h": head.backward().copy(), **{n: g.copy() for n, g in head.grads.items()}}
    errors = gradient_errors(lambda: head.forward(h, y, **fixed), {"h": h, **head.params}, analytic)
    assert max(errors.values()) < HEAD_TOLERANCE, errors


@pytest.mark.parametrize("name,variant", CASES)
def test_eval_loss_is_the_weighted_smoothed_nll(name, variant):
    head = build(name, variant).eval()
    rng = np.random.default_rng(3)
    h, y = rng.standard_normal((7, D)), rng.integers(0, K, 7)
    expected = loop_oracle(head.log_prob(h), y, head.class_weights, head.label_smoothing)
    assert head.forward(h, y) == pytest.approx(expected, rel=1e-12)


def test_weights_change_the_loss_as_a_weighted_mean_of_per_sample_losses():
    rng = np.random.default_rng(4)
    logits, y = rng.standard_normal((5, 4)), np.array([0, 1, 1, 3, 2])
    weights = np.array([1.0, 0.0, 2.0, 0.5])
    per_sample = [softmax_cross_entropy(logits[i:i + 1], y[i:i + 1])[0] for i in range(5)]
    loss, _ = softmax_cross_entropy(logits, y, class_weights=weights)
    assert loss == pytest.approx(np.dot(weights[y], per_sample) / weights[y].sum(), rel=1e-13)
    # uniform weights are the plain mean; smoothing 0 is no smoothing
    plain, dplain = softmax_cross_entropy(logits, y)
    same, dsame = softmax_cross_entropy(logits, y, class_weights=np.full(4, 3.0), label_smoothing=0.0)
    assert same == pytest.approx(plain, rel=1e-14)
    np.testing.assert_allclose(dsame, dplain, rtol=1e-13, atol=1e-16)


def test_smoothing_hand_computed():
    # two classes, logits (0, 0): every log p = log 1/2, so any smoothing gives log 2
    loss, dlogits = softmax_cross_entropy(np.zeros((1, 2)), np.array([0]), label_smoothing=0.4)
    assert loss == pytest.approx(np.log(2), rel=1e-14)
    # target (1 - eps) onehot + eps / K = (0.8, 0.2); gradient p - target = (-0.3, 0.3)
    np.testing.assert_allclose(dlogits, [[-0.3, 0.3]], rtol=1e-14)


@pytest.mark.parametrize("name", list(HEADS))
def test_option_validation_names_argument_expected_and_received(name):
    rng = np.random.default_rng(0)
    extra = {"n_samples": 3} if name == "sampled" else {}
    with pytest.raises(ValueError, match=r"class_weights must have shape \(n_classes,\) = \(6,\), got \(5,\)"):
        make_head(name, 4, 6, rng=rng, class_weights=np.ones(5), **extra)
    with pytest.raises(ValueError, match=r"class_weights must be finite, got 1 NaN/inf entries \(first at class 2\)"):
        make_head(name, 4, 6, rng=rng, class_weights=[1, 1, np.nan, 1, 1, 1], **extra)
    with pytest.raises(ValueError, match=r"class_weights must be >= 0, got -1 at class 3"):
        make_head(name, 4, 6, rng=rng, class_weights=[1, 1, 1, -1, 1, 1], **extra)
    with pytest.raises(ValueError, match=r"class_weights must have a positive sum, got 0"):
        make_head(name, 4, 6, rng=rng, class_weights=np.zeros(6), **extra)
    with pytest.raises(TypeError, match=r"class_weights must be a real array of shape \(6,\), got dtype <U1"):
        make_head(name, 4, 6, rng=rng, class_weights=list("abcdef"), **extra)
    with pytest.raises(TypeError, match=r"label_smoothing must be a real number in \[0, 1\), got str"):
        make_head(name, 4, 6, rng=rng, label_smoothing="0.1", **extra)
    for bad in (1.0, -0.1, np.nan):
        with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\), got"):
            make_head(name, 4, 6, rng=rng, label_smoothing=bad, **extra)
    if name in ("softmax", "gumbel"):
        assert make_head(name, 4, 6, rng=rng, label_smoothing=0.1).label_smoothing == 0.1
    else:
        with pytest.raises(ValueError, match=rf"{HEADS[name].__name__} does not support label_smoothing "
                                             r"\(got 0.1\)"):
            make_head(name, 4, 6, rng=rng, label_smoothing=0.1, **extra)


def test_weights_are_copied_and_a_zero_weight_batch_is_refused():
    rng = np.random.default_rng(0)
    weights = np.array([0.0, 1.0, 1.0, 1.0])
    head = make_head("hierarchical", 3, 4, rng=rng, dtype=np.float64, class_weights=weights)
    weights[1] = 100.0
    assert head.class_weights[1] == 1.0 and not head.class_weights.flags.writeable
    with pytest.raises(ValueError, match=r"class_weights of this batch's labels sum to 0"):
        head.forward(np.ones((2, 3)), [0, 0])


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused_with_count_and_row(name, bad):
    rng = np.random.default_rng(0)
    head = make_head(name, 4, 6, rng=rng, dtype=np.float64, **({"n_samples": 3} if name == "sampled" else {}))
    h = rng.standard_normal((5, 4))
    h[3, 1] = bad
    h[4, 0] = bad
    message = r"h must be finite: 2 of its 20 entries are NaN or inf, the first in row 3"
    with pytest.raises(ValueError, match=message):
        head.forward(h, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match=message):
        head.log_prob(h)
    with pytest.raises(ValueError, match=message):
        head.predict(h)


def test_huge_finite_features_are_accepted():
    """Values near the dtype's maximum are finite features, accepted without warnings."""
    head = make_head("softmax", 3, 4, rng=np.random.default_rng(0), dtype=np.float32)
    head.params["W"][...] = 0  # finite logits, so only the features' own sum overflows
    h = np.full((2, 3), 3e38, dtype=np.float32)
    with np.errstate(all="raise"):
        np.testing.assert_array_equal(head.predict(h), [0, 0])
