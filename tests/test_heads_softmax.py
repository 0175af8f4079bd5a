"""softmax / log_softmax / logsumexp / softmax_cross_entropy and the full SoftmaxHead.

Oracles: hand-computed values, scipy.special, and central differences.
"""

import numpy as np
import pytest
from scipy import special

from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors
from npsoftmax.heads import (SoftmaxHead, log_softmax, logsumexp, softmax,
                             softmax_cross_entropy)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functions_match_scipy_and_keep_dtype(dtype):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5, 7)) * 4).astype(dtype)
    tolerance = 1e-6 if dtype == np.float32 else 1e-13
    for ours, reference in [(softmax, special.softmax), (log_softmax, special.log_softmax)]:
        out = ours(logits)
        assert out.dtype == dtype
        np.testing.assert_allclose(out, reference(logits.astype(np.float64), axis=-1),
                                   rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(logsumexp(logits), special.logsumexp(logits.astype(np.float64), axis=-1),
                               rtol=tolerance)
    assert logsumexp(logits).dtype == dtype
    np.testing.assert_allclose(softmax(logits, axis=0),
                               special.softmax(logits.astype(np.float64), axis=0),
                               rtol=tolerance, atol=tolerance)
    assert logsumexp(logits, axis=0, keepdims=True).shape == (1, 7)


def test_cross_entropy_hand_computed():
    # logits (1000, 1001, 1002) are (0, 1, 2) shifted: loss of class 2 is log(1 + e^-1 + e^-2).
    loss, dlogits = softmax_cross_entropy(np.array([[1000.0, 1001.0, 1002.0]]), np.array([2]))
    assert loss == pytest.approx(np.log(1 + np.exp(-1) + np.exp(-2)), rel=1e-14)
    e = np.exp([0.0, 1.0, 2.0])
    np.testing.assert_allclose(dlogits, [e / e.sum() - [0, 0, 1]], rtol=1e-14)
    # Two samples: the mean, and the gradient divided by N = 2.
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    loss, dlogits = softmax_cross_entropy(logits, np.array([0, 1]))
    assert loss == pytest.approx((np.log(2) + np.log(4)) / 2, rel=1e-14)
    np.testing.assert_allclose(dlogits, [[-0.25, 0.25], [0.375, -0.375]], rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("row,label,expected", [
    ([1000.0, 1001.0, 1002.0], 0, 2 + np.log(1 + np.exp(-1) + np.exp(-2))),
    ([-1e4, 0.0, 1e4], 0, 2e4),
    ([-1e4, 0.0, 1e4], 2, 0.0),
])
def test_cross_entropy_is_stable_for_extreme_logits(dtype, row, label, expected):
    loss, dlogits = softmax_cross_entropy(np.array([row], dtype=dtype), np.array([label]))
    assert np.isfinite(loss) and np.all(np.isfinite(dlogits)) and dlogits.dtype == dtype
    assert loss == pytest.approx(expected, rel=1e-6, abs=1e-6)
    probabilities = special.softmax(np.array(row))
    np.testing.assert_allclose(dlogits[0], probabilities - np.eye(3)[label], atol=1e-6)
    assert np.all(np.isfinite(log_softmax(np.array([row], dtype=dtype))))
    assert np.all(np.isfinite(softmax(np.array([row], dtype=dtype))))


def test_logsumexp_of_all_minus_infinity_is_minus_infinity():
    out = logsumexp(np.array([[-np.inf, -np.inf], [0.0, -np.inf]]))
    assert out[0] == -np.inf and out[1] == 0.0


def test_cross_entropy_gradient_numerically():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, 5)) * 3
    y = rng.integers(0, 5, 6)
    _, dlogits = softmax_cross_entropy(logits, y)
    errors = gradient_errors(lambda: softmax_cross_entropy(logits, y)[0], {"z": logits}, {"z": dlogits})
    assert errors["z"] < HEAD_TOLERANCE


def test_cross_entropy_validation():
    with pytest.raises(ValueError, match=r"logits must have shape \(N, K\)"):
        softmax_cross_entropy(np.zeros(3), np.array([0]))
    with pytest.raises(TypeError, match="logits must be a float array, got dtype int64"):
        softmax_cross_entropy(np.zeros((2, 3), dtype=np.int64), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"y must lie in \[0, 3\)"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="expected length 2, got 3"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 1, 2]))


def test_softmax_head_against_independent_formulas():
    rng = np.random.default_rng(2)
    head = SoftmaxHead(5, 9, rng=rng, dtype=np.float64)
    assert head.params["W"].shape == (5, 9) and head.params["b"].shape == (9,)
    head.params["b"][...] = rng.standard_normal(9)
    h = rng.standard_normal((4, 5))
    y = np.array([0, 8, 3, 3])
    logits = h @ head.params["W"] + head.params["b"]
    reference = special.log_softmax(logits, axis=1)
    np.testing.assert_allclose(head.log_prob(h), reference, rtol=1e-13, atol=1e-13)
    assert head.forward(h, y) == pytest.approx(-reference[np.arange(4), y].mean(), rel=1e-13)
    dh = head.backward()
    dlogits = (special.softmax(logits, axis=1) - np.eye(9)[y]) / 4
    np.testing.assert_allclose(head.grads["W"], h.T @ dlogits, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(head.grads["b"], dlogits.sum(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dh, dlogits @ head.params["W"].T, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_head_is_stable_with_huge_logits(dtype):
    head = SoftmaxHead(2, 3, rng=np.random.default_rng(0), dtype=dtype)
    head.params["W"][...] = [[1e4, 0.0, -1e4], [0.0, 1.0, 2.0]]
    head.params["b"][...] = [1000.0, 1001.0, 1002.0]
    h = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    loss = head.forward(h, np.array([2, 2, 0]))
    dh = head.backward()
    assert np.isfinite(loss) and np.all(np.isfinite(dh))
    assert all(np.all(np.isfinite(g)) for g in head.grads.values())
    assert np.all(np.isfinite(head.log_prob(h)))
