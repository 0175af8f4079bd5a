"""SampledSoftmaxHead and its candidate samplers: TF semantics, sparse rows, convergence to the full gradient."""

import numpy as np
import pytest
from scipy import special

from npsoftmax.gradcheck import HEAD_TOLERANCE, gradient_errors
from npsoftmax.heads import CandidateSample, CandidateSampler, SampledSoftmaxHead, SoftmaxHead


def loop_oracle(head, h, y, samples):
    """TF's sampled_softmax_loss, one sample and one candidate at a time."""
    W, b = head.params["class_W"], head.params["class_b"]
    total = 0.0
    for i in range(h.shape[0]):
        candidates = [y[i]] + list(samples.ids)
        logits = []
        for position, c in enumerate(candidates):
            expected = 1 - (1 - head.sampler.probabilities[c]) ** samples.num_tries
            logit = W[c] @ h[i] + b[c] - (np.log(expected) if head.subtract_log_q else 0.0)
            if position > 0 and c == y[i] and head.remove_accidental_hits:
                logit = -np.inf
            logits.append(logit)
        total += -special.log_softmax(logits)[0]
    return total / h.shape[0]


@pytest.mark.parametrize("sampler", ["log_uniform", "uniform", "unigram"])
@pytest.mark.parametrize("remove_hits,subtract_log_q", [(True, True), (False, True), (True, False)])
def test_loss_matches_the_loop_oracle_and_gradients_check(sampler, remove_hits, subtract_log_q):
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 50, 23) if sampler == "unigram" else None
    head = SampledSoftmaxHead(5, 23, rng=rng, dtype=np.float64, n_samples=6, sampler=sampler,
                              class_counts=counts, remove_accidental_hits=remove_hits,
                              subtract_log_q=subtract_log_q)
    head.params["class_b"][...] = rng.standard_normal(23)
    h = rng.standard_normal((7, 5))
    y = rng.integers(0, 23, 7)
    loss = head.forward(h, y)
    samples = head.last_samples
    y[0] = samples.ids[2]  # force an accidental hit
    loss = head.forward(h, y, samples=samples)
    assert loss == pytest.approx(loop_oracle(head, h, y, samples), rel=1e-12)
    analytic = {"h": head.backward().copy(), **{n: g.copy() for n, g in head.grads.items()}}
    errors = gradient_errors(lambda: head.forward(h, y, samples=samples), {"h": h, **head.params}, analytic)
    assert max(errors.values()) < HEAD_TOLERANCE, errors


def test_batch_of_one_gradient():
    rng = np.random.default_rng(1)
    head = SampledSoftmaxHead(3, 40, rng=rng, dtype=np.float64, n_samples=9)
    h, y = rng.standard_normal((1, 3)), np.array([17])
    head.forward(h, y)
    samples = head.last_samples
    analytic = {"h": head.backward().copy(), **{n: g.copy() for n, g in head.grads.items()}}
    errors = gradient_errors(lambda: head.forward(h, y, samples=samples), {"h": h, **head.params}, analytic)
    assert max(errors.values()) < HEAD_TOLERANCE, errors


def test_backward_touches_only_target_and_sampled_rows_and_sparse_sgd_matches_dense():
    rng = np.random.default_rng(2)
    sparse = SampledSoftmaxHead(4, 5000, rng=np.random.default_rng(0), dtype=np.float64, n_samples=20)
    dense = SampledSoftmaxHead(4, 5000, rng=np.random.default_rng(0), dtype=np.float64, n_samples=20)
    for _ in range(3):
        h, y = rng.standard_normal((6, 4)), rng.integers(0, 5000, 6)
        sparse.forward(h, y)
        dense.forward(h, y, samples=sparse.last_samples)
        for head in (sparse, dense):
            head.backward()
        touched = set(np.flatnonzero(np.any(sparse.grads["class_W"] != 0, axis=1)))
        assert touched <= set(y) | set(sparse.last_samples.ids)
        rows, values = sparse.row_grads["class_W"]
        np.testing.assert_array_equal(rows, np.union1d(y, sparse.last_samples.ids))
        np.testing.assert_array_equal(values, sparse.grads["class_W"][rows])
        sparse.sparse_sgd_step(0.5)
        for name, value in dense.params.items():
            value -= 0.5 * dense.grads[name]
    for name in dense.params:
        np.testing.assert_allclose(sparse.params[name], dense.params[name], rtol=1e-13)


def test_samplers_follow_tensorflow():
    rng = np.random.default_rng(3)
    sampler = CandidateSampler(1000, "log_uniform")
    k = np.arange(1000)
    np.testing.assert_allclose(sampler.probabilities, (np.log(k + 2) - np.log(k + 1)) / np.log(1001), rtol=1e-12)
    assert sampler.probabilities.sum() == pytest.approx(1.0, rel=1e-12)
    draws = sampler.draw(200_000, rng)
    np.testing.assert_allclose(np.bincount(draws, minlength=1000)[:5] / draws.size, sampler.probabilities[:5],
                               rtol=0.03)
    sample = sampler.sample(50, rng)
    assert sample.ids.size == 50 and np.unique(sample.ids).size == 50 and sample.num_tries >= 50
    # unique=True: expected count 1 - (1 - Q)^num_tries, not n * Q
    np.testing.assert_allclose(sampler.expected_count(sample.ids, sample.num_tries),
                               1 - (1 - sampler.probabilities[sample.ids]) ** sample.num_tries, rtol=1e-12)
    # the same generator state gives the same sample (deterministic via seeds)
    again = CandidateSampler(1000, "log_uniform").sample(50, np.random.default_rng(7))
    np.testing.assert_array_equal(again.ids, sampler.sample(50, np.random.default_rng(7)).ids)
    with pytest.raises(ValueError, match="class_counts must be finite and > 0"):
        CandidateSampler(3, "unigram", [1, 0, 2])
    with pytest.raises(ValueError, match="class_counts=\\(K,\\) is required by sampler='unigram'"):
        CandidateSampler(3, "unigram")
    with pytest.raises(ValueError, match="sampler must be one of"):
        CandidateSampler(3, "zipf")
    with pytest.raises(ValueError, match="n_samples must be <= n_classes = 5, got 6"):
        SampledSoftmaxHead(3, 5, rng=rng, n_samples=6)


def test_log_prob_predict_and_eval_loss_are_the_full_softmax():
    rng = np.random.default_rng(4)
    head = SampledSoftmaxHead(6, 30, rng=np.random.default_rng(0), dtype=np.float64, n_samples=5)
    full = SoftmaxHead(6, 30, rng=rng, dtype=np.float64)
    full.params["W"][...] = head.params["class_W"].T
    h, y = rng.standard_normal((8, 6)), rng.integers(0, 30, 8)
    np.testing.assert_allclose(head.log_prob(h), full.log_prob(h), rtol=1e-13)
    np.testing.assert_array_equal(head.predict(h), full.predict(h))
    head.eval()
    assert head.forward(h, y) == pytest.approx(full.forward(h, y), rel=1e-13)
    np.testing.assert_allclose(head.backward(), full.backward(), rtol=1e-12)
    np.testing.assert_allclose(head.grads["class_W"], full.grads["W"].T, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="samples are only used in training mode"):
        head.forward(h, y, samples=CandidateSample(np.arange(5), 5))


def test_sampled_gradient_approaches_the_full_gradient_as_n_samples_grows():
    """Cosine similarity of d loss / d class_W with the full-softmax gradient rises with n_samples."""
    n_classes, in_features = 2000, 16
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((n_classes, in_features))
    y = rng.integers(0, n_classes, 64)
    h = centres[y] + 0.5 * rng.standard_normal((64, in_features))
    head = SampledSoftmaxHead(in_features, n_classes, rng=np.random.default_rng(6), dtype=np.float64,
                              n_samples=1, sampler="uniform")
    head.params["class_W"][...] = 0.3 * centres
    head.eval().forward(h, y)
    head.backward()
    full = head.grads["class_W"].copy()
    head.train()
    similarity = {}
    for n_samples in (20, 200, 1000, 1900):
        head.n_samples = n_samples
        cosines = []
        for seed in range(3):
            head.rng = np.random.default_rng(seed)
            head.forward(h, y)
            head.backward()
            grad = head.grads["class_W"]
            cosines.append(np.sum(grad * full) / np.linalg.norm(grad) / np.linalg.norm(full))
        similarity[n_samples] = float(np.mean(cosines))
    values = list(similarity.values())
    assert all(later > earlier for earlier, later in zip(values, values[1:])), similarity
    assert values[0] < 0.9 and values[-1] > 0.99, similarity


def test_fixed_samples_are_validated():
    head = SampledSoftmaxHead(3, 10, rng=np.random.default_rng(0), dtype=np.float64, n_samples=3)
    h, y = np.ones((2, 3)), np.array([1, 2])
    with pytest.raises(TypeError, match="samples must be a CandidateSample"):
        head.forward(h, y, samples=np.arange(3))
    with pytest.raises(ValueError, match="must be distinct classes"):
        head.forward(h, y, samples=CandidateSample(np.array([1, 1, 2]), 5))
    with pytest.raises(ValueError, match="samples.num_tries must be >= 3"):
        head.forward(h, y, samples=CandidateSample(np.array([1, 4, 2]), 2))
