"""AdaptiveSoftmaxHead: parameters, cutoff validation, exact log_prob/predict, cluster-local training."""

import numpy as np
import pytest
from scipy import special

from npsoftmax.heads import AdaptiveSoftmaxHead


def oracle_log_prob(head, h):
    """Grave et al.'s formula written out directly from the parameters."""
    p = head.params
    head_scores = h @ p["head_W"] + (p["head_b"] if head.head_bias else 0)
    head_log_prob = special.log_softmax(head_scores, axis=1)
    columns = [head_log_prob[:, :head.shortlist_size]]
    for i in range(head.n_clusters):
        tail = special.log_softmax(h @ p[f"tail{i}_proj"] @ p[f"tail{i}_out"], axis=1)
        columns.append(tail + head_log_prob[:, [head.shortlist_size + i]])
    return np.concatenate(columns, axis=1)


def test_parameter_names_and_shapes_follow_the_design():
    head = AdaptiveSoftmaxHead(64, 1000, rng=np.random.default_rng(0), cutoffs=[50, 200, 600])
    assert head.cutoffs == [50, 200, 600, 1000]
    assert head.shortlist_size == 50 and head.n_clusters == 3 and head.head_size == 53
    assert head.hidden_sizes == [16, 4, 1]  # 64 // 4, 64 // 16, 64 // 64
    shapes = {name: value.shape for name, value in head.params.items()}
    assert shapes == {"head_W": (64, 53),
                      "tail0_proj": (64, 16), "tail0_out": (16, 150),
                      "tail1_proj": (64, 4), "tail1_out": (4, 400),
                      "tail2_proj": (64, 1), "tail2_out": (1, 400)}
    biased = AdaptiveSoftmaxHead(64, 1000, rng=np.random.default_rng(0), cutoffs=[50], head_bias=True,
                                 div_value=2.0)
    assert biased.params["head_b"].shape == (51,) and biased.hidden_sizes == [32]
    assert set(biased.params) == {"head_W", "head_b", "tail0_proj", "tail0_out"}


@pytest.mark.parametrize("cutoffs,error,message", [
    ([], ValueError, "at least one value"),
    ([0, 5], ValueError, r"\[1, 9\]"),
    ([5, 10], ValueError, r"\[1, 9\]"),
    ([5, 5], ValueError, "strictly increasing"),
    ([6, 3], ValueError, "strictly increasing"),
    ([2.5], TypeError, "cutoffs must be ints"),
    ([True], TypeError, "cutoffs must be ints"),
    ("5", TypeError, "sequence of ints"),
    (5, TypeError, "sequence of ints"),
])
def test_cutoffs_are_validated(cutoffs, error, message):
    with pytest.raises(error, match=message):
        AdaptiveSoftmaxHead(16, 10, rng=np.random.default_rng(0), cutoffs=cutoffs)


def test_div_value_and_projection_width_are_validated():
    rng = np.random.default_rng(0)
    for bad in (0, -2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="div_value must be a finite number > 0"):
            AdaptiveSoftmaxHead(16, 10, rng=rng, cutoffs=[5], div_value=bad)
    with pytest.raises(ValueError, match=r"cluster 1 would project to .* = 0 dimensions"):
        AdaptiveSoftmaxHead(8, 10, rng=rng, cutoffs=[3, 6])  # 8 // 16 = 0
    assert AdaptiveSoftmaxHead(8, 10, rng=rng).hidden_sizes == [2]  # default drops that cluster
    assert AdaptiveSoftmaxHead(16, np.int64(10), rng=rng, cutoffs=np.array([2, 5])).cutoffs == [2, 5, 10]


@pytest.mark.parametrize("head_bias", [False, True])
def test_log_prob_forward_and_output_match_the_formula(head_bias):
    rng = np.random.default_rng(1)
    head = AdaptiveSoftmaxHead(16, 40, rng=rng, dtype=np.float64, cutoffs=[8, 20, 30], head_bias=head_bias,
                               div_value=2.0)
    for value in head.params.values():
        value += rng.standard_normal(value.shape)
    h = rng.standard_normal((12, 16))
    y = rng.integers(0, 40, 12)
    expected = oracle_log_prob(head, h)
    np.testing.assert_allclose(head.log_prob(h), expected, rtol=1e-12, atol=1e-12)
    loss = head.forward(h, y)
    np.testing.assert_allclose(head.last_output, expected[np.arange(12), y], rtol=1e-12)
    assert loss == pytest.approx(-expected[np.arange(12), y].mean(), rel=1e-12)


def test_predict_is_exact_in_both_branches():
    rng = np.random.default_rng(2)
    head = AdaptiveSoftmaxHead(16, 60, rng=rng, dtype=np.float64, cutoffs=[10, 30], div_value=2.0)
    for value in head.params.values():
        value *= 6
    head.params["head_W"][:, 10:] += 1.5  # make the clusters win the head for some samples
    h = rng.standard_normal((400, 16))
    prediction = head.predict(h)
    np.testing.assert_array_equal(prediction, np.argmax(head.log_prob(h), axis=1))
    # Both the shortlist shortcut and the full evaluation were exercised.
    assert np.any(prediction < 10) and np.any(prediction >= 10)
    best_head = np.argmax(h @ head.params["head_W"], axis=1)
    assert np.any(best_head >= 10) and np.any(best_head < 10)


def test_tails_see_only_their_own_targets(monkeypatch):
    rng = np.random.default_rng(3)
    head = AdaptiveSoftmaxHead(16, 50, rng=rng, dtype=np.float64, cutoffs=[10, 30])
    seen = []
    original = head._tail_scores
    monkeypatch.setattr(head, "_tail_scores", lambda h, i: (seen.append((i, h.shape[0])), original(h, i))[1])
    h = rng.standard_normal((6, 16))
    head.forward(h, np.array([0, 3, 9, 12, 0, 1]))  # one target in cluster 0, none in cluster 1
    assert seen == [(0, 1)]
    head.backward()
    assert not np.any(head.grads["tail1_proj"]) and not np.any(head.grads["tail1_out"])
    assert np.any(head.grads["tail0_proj"]) and np.any(head.grads["tail0_out"])
    # A later step whose targets avoid cluster 0 zeroes its (now stale) gradient.
    head.forward(h, np.array([40, 3, 9, 8, 0, 1]))
    head.backward()
    assert not np.any(head.grads["tail0_proj"]) and np.any(head.grads["tail1_out"])
    seen.clear()
    head.forward(h, np.arange(6))  # shortlist only: no tail is evaluated at all
    assert seen == []


def test_float32_head_matches_float64_closely():
    rng = np.random.default_rng(4)
    head64 = AdaptiveSoftmaxHead(32, 100, rng=np.random.default_rng(0), dtype=np.float64, cutoffs=[20, 60])
    head32 = AdaptiveSoftmaxHead(32, 100, rng=np.random.default_rng(0), dtype=np.float32, cutoffs=[20, 60])
    h = rng.standard_normal((10, 32))
    y = rng.integers(0, 100, 10)
    np.testing.assert_allclose(head32.log_prob(h.astype(np.float32)), head64.log_prob(h), rtol=1e-5)
    assert head32.forward(h.astype(np.float32), y) == pytest.approx(head64.forward(h, y), rel=1e-5)
