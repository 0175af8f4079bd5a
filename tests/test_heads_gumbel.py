"""Gumbel noise, the gumbel_softmax sampling API (soft and straight-through hard) and the head."""

import numpy as np
import pytest
from scipy import special

from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors
from npsoftmax.heads import GumbelSoftmaxHead, gumbel_softmax, gumbel_softmax_backward, sample_gumbel
from npsoftmax.heads.gumbel import gumbel_from_uniform

EULER_GAMMA = 0.5772156649015329


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noise_is_finite_even_for_uniforms_at_the_boundaries(dtype):
    one_below = np.nextafter(dtype(1), dtype(0))
    u = np.array([0.0, np.finfo(dtype).tiny, 0.5, one_below, 1.0], dtype=dtype)
    noise = gumbel_from_uniform(u)
    assert noise.dtype == dtype and np.all(np.isfinite(noise))
    assert noise[0] == noise[1] and noise[-1] == noise[-2]  # clipped to the extremes
    assert noise[2] == pytest.approx(-np.log(np.log(2.0)), rel=1e-6)


def test_ten_million_draws_are_finite_and_gumbel_distributed():
    noise = sample_gumbel((10_000_000,), np.random.default_rng(0), np.float32)
    assert noise.dtype == np.float32
    assert np.all(np.isfinite(noise))
    # Gumbel(0, 1): mean = Euler's gamma, variance = pi^2 / 6 (std error ~4e-4 here).
    assert noise.mean(dtype=np.float64) == pytest.approx(EULER_GAMMA, abs=3e-3)
    assert noise.var(dtype=np.float64) == pytest.approx(np.pi ** 2 / 6, abs=1e-2)
    assert np.all(np.isfinite(sample_gumbel((1_000_000,), np.random.default_rng(1), np.float64)))


def test_hard_samples_follow_the_categorical_distribution():
    """Gumbel-max: argmax(z + g) ~ Categorical(softmax(z)), whatever tau is."""
    logits = np.array([[1.0, 0.0, -1.0, 2.0]])
    rng = np.random.default_rng(3)
    n_draws = 100_000
    sample, _ = gumbel_softmax(np.repeat(logits, n_draws, axis=0), tau=0.3, hard=True, rng=rng)
    assert set(np.unique(sample)) == {0.0, 1.0} and np.all(sample.sum(axis=1) == 1)
    frequencies = sample.mean(axis=0)
    expected = special.softmax(logits[0])
    assert np.all(np.abs(frequencies - expected) < 5 * np.sqrt(expected / n_draws))


@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5])
def test_soft_sample_backward_uses_the_full_jacobian(tau):
    """Random upstream gradient: a diagonal-only Jacobian (y(1-y)) fails this check."""
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((3, 5))
    noise = sample_gumbel(logits.shape, rng, np.float64)
    upstream = rng.standard_normal(logits.shape)
    sample, cache = gumbel_softmax(logits, tau, noise=noise)
    np.testing.assert_allclose(sample, special.softmax((logits + noise) / tau, axis=1), rtol=1e-13)
    dlogits = gumbel_softmax_backward(upstream, cache)
    loss = lambda: np.sum(gumbel_softmax(logits, tau, noise=noise)[0] * upstream)  # noqa: E731
    errors = gradient_errors(loss, {"z": logits}, {"z": dlogits})
    assert errors["z"] < HEAD_TOLERANCE
    diagonal_only = upstream * sample * (1 - sample) / tau
    assert not np.allclose(dlogits, diagonal_only)


def test_hard_sample_is_one_hot_with_straight_through_gradient():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((6, 4))
    noise = sample_gumbel(logits.shape, rng, np.float64)
    upstream = rng.standard_normal(logits.shape)
    hard, hard_cache = gumbel_softmax(logits, 0.5, hard=True, noise=noise)
    soft, soft_cache = gumbel_softmax(logits, 0.5, hard=False, noise=noise)
    np.testing.assert_array_equal(hard, np.eye(4)[np.argmax(logits + noise, axis=1)])
    # Straight-through: the hard sample's gradient is the relaxed sample's gradient.
    np.testing.assert_array_equal(gumbel_softmax_backward(upstream, hard_cache),
                                  gumbel_softmax_backward(upstream, soft_cache))
    assert hard_cache["noise"] is noise


def test_sampling_api_validation_and_dtype():
    logits = np.zeros((2, 3), dtype=np.float32)
    sample, cache = gumbel_softmax(logits, 1.0, rng=np.random.default_rng(0))
    assert sample.dtype == np.float32 and cache["noise"].dtype == np.float32
    np.testing.assert_allclose(sample.sum(axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="needs rng"):
        gumbel_softmax(logits, 1.0)
    with pytest.raises(ValueError, match="tau must be finite and > 0, got 0.0"):
        gumbel_softmax(logits, 0.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 3\)"):
        gumbel_softmax(logits, 1.0, noise=np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="noise must be finite"):
        gumbel_softmax(logits, 1.0, noise=np.full((2, 3), np.inf, dtype=np.float32))
    with pytest.raises(TypeError, match="logits must be a float array"):
        gumbel_softmax(np.zeros((2, 3), dtype=int), 1.0, rng=np.random.default_rng(0))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_temperature_must_be_positive_and_finite(bad):
    head = GumbelSoftmaxHead(3, 4, rng=np.random.default_rng(0), tau=2.0)
    with pytest.raises(ValueError, match="tau must be finite and > 0"):
        head.tau = bad
    assert head.tau == 2.0  # a rejected value leaves the old one
    with pytest.raises(ValueError, match="tau must be finite and > 0"):
        GumbelSoftmaxHead(3, 4, rng=np.random.default_rng(0), tau=bad)


def test_temperature_rejects_non_numbers():
    head = GumbelSoftmaxHead(3, 4, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="tau must be a real number"):
        head.tau = "0.5"
    head.tau = np.float32(0.25)  # what a schedule may compute
    assert head.tau == 0.25 and isinstance(head.tau, float)


def test_training_loss_is_the_tempered_noisy_cross_entropy():
    rng = np.random.default_rng(6)
    head = GumbelSoftmaxHead(4, 6, rng=rng, dtype=np.float64, tau=0.4)
    h = rng.standard_normal((5, 4))
    y = rng.integers(0, 6, 5)
    noise = sample_gumbel((5, 6), rng, np.float64)
    logits = h @ head.params["W"] + head.params["b"]
    expected = -special.log_softmax((logits + noise) / 0.4, axis=1)[np.arange(5), y].mean()
    assert head.forward(h, y, noise=noise) == pytest.approx(expected, rel=1e-13)
    head.backward()
    # d/dz = (p - onehot) / tau, averaged over the batch: check through dW = h^T dz.
    dlogits = (special.softmax((logits + noise) / 0.4, axis=1) - np.eye(6)[y]) / (0.4 * 5)
    np.testing.assert_allclose(head.grads["W"], h.T @ dlogits, rtol=1e-12)
    # A new temperature changes the loss (it is read at every call, e.g. from a schedule).
    head.tau = 2.0
    expected = -special.log_softmax((logits + noise) / 2.0, axis=1)[np.arange(5), y].mean()
    assert head.forward(h, y, noise=noise) == pytest.approx(expected, rel=1e-13)


def test_training_loss_is_stochastic_and_reproducible_with_the_last_noise():
    rng = np.random.default_rng(7)
    head = GumbelSoftmaxHead(4, 6, rng=rng, dtype=np.float64)
    h, y = rng.standard_normal((8, 4)), rng.integers(0, 6, 8)
    first = head.forward(h, y)
    noise = head.last_noise.copy()
    second = head.forward(h, y)
    assert first != second
    assert not np.array_equal(noise, head.last_noise)
    assert head.forward(h, y, noise=noise) == first


def test_evaluation_is_noise_free_and_deterministic():
    rng = np.random.default_rng(8)
    head = GumbelSoftmaxHead(4, 6, rng=rng, dtype=np.float64, tau=0.1)
    head.params["W"] *= 5
    h, y = rng.standard_normal((50, 4)), rng.integers(0, 6, 50)
    state = head.rng.bit_generator.state
    expected = special.log_softmax(h @ head.params["W"] + head.params["b"], axis=1)
    for mode in (head.train, head.eval):
        mode()
        np.testing.assert_allclose(head.log_prob(h), expected, rtol=1e-13)
        np.testing.assert_array_equal(head.predict(h), np.argmax(expected, axis=1))
        np.testing.assert_array_equal(head.predict(h), head.predict(h))
    head.eval()
    assert head.forward(h, y) == head.forward(h, y) == pytest.approx(
        -expected[np.arange(50), y].mean(), rel=1e-13)
    assert head.rng.bit_generator.state == state  # no noise was drawn
    with pytest.raises(ValueError, match="eval mode"):
        head.forward(h, y, noise=np.zeros((50, 6)))
    # log_prob does not depend on the temperature.
    head.tau = 7.0
    np.testing.assert_allclose(head.log_prob(h), expected, rtol=1e-13)


def test_head_sample_api():
    head = GumbelSoftmaxHead(3, 5, rng=np.random.default_rng(9))
    h = np.ones((4, 3), dtype=np.float32)
    hard = head.sample(h, hard=True)
    assert hard.dtype == np.float32 and np.all(hard.sum(axis=1) == 1) and set(np.unique(hard)) <= {0, 1}
    soft = head.sample(h)
    np.testing.assert_allclose(soft.sum(axis=1), 1, rtol=1e-6)
