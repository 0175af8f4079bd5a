"""Parity with PyTorch on copied weights (skipped when torch is not installed).

* AdaptiveSoftmaxHead vs torch.nn.AdaptiveLogSoftmaxWithLoss: output, loss, log_prob,
  predict and all gradients.
* SoftmaxHead and the Gumbel head's loss vs F.cross_entropy, gumbel_softmax's backward vs
  autograd through softmax.
Weights are (D_in, D_out) here and (D_out, D_in) in torch: copying transposes.
"""

import numpy as np
import pytest

from npsoftmax.heads import (AdaptiveSoftmaxHead, GumbelSoftmaxHead, SoftmaxHead, gumbel_softmax,
                             gumbel_softmax_backward, sample_gumbel)

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def as_numpy(tensor):
    return tensor.detach().cpu().numpy()


def adaptive_pair(in_features, n_classes, cutoffs, div_value, head_bias, seed):
    rng = np.random.default_rng(seed)
    ours = AdaptiveSoftmaxHead(in_features, n_classes, rng=rng, dtype=np.float64, cutoffs=cutoffs,
                               div_value=div_value, head_bias=head_bias)
    for value in ours.params.values():
        value += 0.5 * rng.standard_normal(value.shape)  # generic values, not just the init
    theirs = torch.nn.AdaptiveLogSoftmaxWithLoss(in_features, n_classes, cutoffs, div_value=div_value,
                                                 head_bias=head_bias).double()
    assert [tail[0].out_features for tail in theirs.tail] == ours.hidden_sizes
    with torch.no_grad():
        theirs.head.weight.copy_(torch.from_numpy(ours.params["head_W"].T))
        if head_bias:
            theirs.head.bias.copy_(torch.from_numpy(ours.params["head_b"]))
        for i, tail in enumerate(theirs.tail):
            tail[0].weight.copy_(torch.from_numpy(ours.params[f"tail{i}_proj"].T))
            tail[1].weight.copy_(torch.from_numpy(ours.params[f"tail{i}_out"].T))
    return ours, theirs


@pytest.mark.parametrize("n_samples", [1, 2, 13, 64])
@pytest.mark.parametrize("cutoffs,div_value,head_bias", [
    ([10, 25, 40], 2.0, False),
    ([10, 25, 40], 2.0, True),
    ([5], 4.0, False),
])
def test_adaptive_matches_torch(cutoffs, div_value, head_bias, n_samples):
    ours, theirs = adaptive_pair(32, 50, cutoffs, div_value, head_bias, seed=n_samples)
    rng = np.random.default_rng(100 + n_samples)
    h = rng.standard_normal((n_samples, 32)) * 2
    y = rng.integers(0, 50, n_samples)
    x = torch.from_numpy(h.copy()).requires_grad_(True)
    result = theirs(x, torch.from_numpy(y))
    result.loss.backward()

    loss = ours.forward(h, y)
    dh = ours.backward()
    assert loss == pytest.approx(float(result.loss.detach()), rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(ours.last_output, as_numpy(result.output), **TOLERANCE)
    np.testing.assert_allclose(dh, as_numpy(x.grad), **TOLERANCE)
    np.testing.assert_allclose(ours.grads["head_W"], as_numpy(theirs.head.weight.grad).T, **TOLERANCE)
    if head_bias:
        np.testing.assert_allclose(ours.grads["head_b"], as_numpy(theirs.head.bias.grad), **TOLERANCE)
    for i, tail in enumerate(theirs.tail):
        for name, layer in ((f"tail{i}_proj", tail[0]), (f"tail{i}_out", tail[1])):
            expected = np.zeros_like(ours.grads[name]) if layer.weight.grad is None \
                else as_numpy(layer.weight.grad).T
            np.testing.assert_allclose(ours.grads[name], expected, **TOLERANCE)

    features = torch.from_numpy(h)
    with torch.no_grad():
        np.testing.assert_allclose(ours.log_prob(h), as_numpy(theirs.log_prob(features)), **TOLERANCE)
        np.testing.assert_array_equal(ours.predict(h), as_numpy(theirs.predict(features)))


def test_softmax_head_matches_cross_entropy():
    rng = np.random.default_rng(0)
    head = SoftmaxHead(7, 11, rng=rng, dtype=np.float64)
    head.params["b"][...] = rng.standard_normal(11)
    h, y = rng.standard_normal((9, 7)), rng.integers(0, 11, 9)
    x = torch.from_numpy(h.copy()).requires_grad_(True)
    weight = torch.from_numpy(head.params["W"].T.copy()).requires_grad_(True)
    bias = torch.from_numpy(head.params["b"].copy()).requires_grad_(True)
    logits = F.linear(x, weight, bias)
    reference = F.cross_entropy(logits, torch.from_numpy(y))
    reference.backward()
    assert head.forward(h, y) == pytest.approx(float(reference.detach()), rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(head.backward(), as_numpy(x.grad), **TOLERANCE)
    np.testing.assert_allclose(head.grads["W"], as_numpy(weight.grad).T, **TOLERANCE)
    np.testing.assert_allclose(head.grads["b"], as_numpy(bias.grad), **TOLERANCE)
    np.testing.assert_allclose(head.log_prob(h), as_numpy(F.log_softmax(logits, dim=1)), **TOLERANCE)


def test_gumbel_head_loss_matches_cross_entropy_of_tempered_noisy_logits():
    rng = np.random.default_rng(1)
    head = GumbelSoftmaxHead(5, 8, rng=rng, dtype=np.float64, tau=0.35)
    h, y = rng.standard_normal((6, 5)), rng.integers(0, 8, 6)
    noise = sample_gumbel((6, 8), rng, np.float64)
    x = torch.from_numpy(h.copy()).requires_grad_(True)
    logits = F.linear(x, torch.from_numpy(head.params["W"].T.copy()), torch.from_numpy(head.params["b"]))
    reference = F.cross_entropy((logits + torch.from_numpy(noise)) / 0.35, torch.from_numpy(y))
    reference.backward()
    assert head.forward(h, y, noise=noise) == pytest.approx(float(reference.detach()), rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(head.backward(), as_numpy(x.grad), **TOLERANCE)


def test_gumbel_softmax_backward_matches_autograd():
    rng = np.random.default_rng(2)
    logits, upstream = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    noise = sample_gumbel(logits.shape, rng, np.float64)
    sample, cache = gumbel_softmax(logits, 0.7, noise=noise)
    z = torch.from_numpy(logits.copy()).requires_grad_(True)
    reference = F.softmax((z + torch.from_numpy(noise)) / 0.7, dim=1)
    reference.backward(torch.from_numpy(upstream))
    np.testing.assert_allclose(sample, as_numpy(reference), **TOLERANCE)
    np.testing.assert_allclose(gumbel_softmax_backward(upstream, cache), as_numpy(z.grad), **TOLERANCE)


# -- class weights, label smoothing, the sampled head -------------------------------------------------
@pytest.mark.parametrize("weighted,smoothing", [(True, 0.0), (False, 0.2), (True, 0.3)])
@pytest.mark.parametrize("n_samples", [1, 9])
def test_softmax_options_match_cross_entropy(weighted, smoothing, n_samples):
    from npsoftmax.torch_adapter import grads_from_torch, to_torch
    rng = np.random.default_rng(n_samples)
    weights = rng.uniform(0.0, 3.0, 11) if weighted else None
    head = SoftmaxHead(7, 11, rng=rng, dtype=np.float64, class_weights=weights, label_smoothing=smoothing)
    head.params["b"][...] = rng.standard_normal(11)
    h, y = rng.standard_normal((n_samples, 7)), rng.integers(0, 11, n_samples)
    twin = to_torch(head)
    x = torch.from_numpy(h.copy()).requires_grad_(True)
    reference = twin(x, torch.from_numpy(y))
    reference.backward()
    # the twin is plain F.cross_entropy(weight=, label_smoothing=) on the same logits
    logits = F.linear(torch.from_numpy(h), torch.from_numpy(head.params["W"].T.copy()),
                      torch.from_numpy(head.params["b"]))
    direct = F.cross_entropy(logits, torch.from_numpy(y), label_smoothing=smoothing,
                             weight=None if weights is None else torch.from_numpy(weights))
    assert float(direct) == pytest.approx(float(reference.detach()), rel=1e-14)
    assert head.forward(h, y) == pytest.approx(float(reference.detach()), rel=1e-12)
    np.testing.assert_allclose(head.backward(), as_numpy(x.grad), rtol=1e-10, atol=1e-13)
    for name, expected in grads_from_torch(head, twin).items():
        np.testing.assert_allclose(head.grads[name], expected, rtol=1e-10, atol=1e-13)


def test_gumbel_options_match_cross_entropy_of_the_perturbed_tempered_logits():
    from npsoftmax.torch_adapter import to_torch
    rng = np.random.default_rng(3)
    weights = rng.uniform(0.5, 2.0, 8)
    head = GumbelSoftmaxHead(5, 8, rng=rng, dtype=np.float64, tau=0.4, class_weights=weights,
                             label_smoothing=0.15)
    h, y = rng.standard_normal((6, 5)), rng.integers(0, 8, 6)
    loss = head.forward(h, y)
    dh = head.backward()
    twin = to_torch(head)
    x = torch.from_numpy(h.copy()).requires_grad_(True)
    reference = twin(x, torch.from_numpy(y), noise=torch.from_numpy(head.last_noise))
    reference.backward()
    assert loss == pytest.approx(float(reference.detach()), rel=1e-12)
    np.testing.assert_allclose(dh, as_numpy(x.grad), rtol=1e-10, atol=1e-13)


def test_adaptive_class_weights_are_a_weighted_mean_of_torch_output():
    ours, theirs = adaptive_pair(32, 50, [10, 25], 2.0, False, seed=4)
    rng = np.random.default_rng(4)
    weights = rng.uniform(0.0, 2.0, 50)
    ours.class_weights = AdaptiveSoftmaxHead(32, 50, rng=rng, cutoffs=[10, 25], class_weights=weights).class_weights
    h, y = rng.standard_normal((13, 32)), rng.integers(0, 50, 13)
    x = torch.from_numpy(h.copy()).requires_grad_(True)
    w = torch.from_numpy(weights)[torch.from_numpy(y)]
    output = theirs(x, torch.from_numpy(y)).output
    reference = -(w * output).sum() / w.sum()
    reference.backward()
    assert ours.forward(h, y) == pytest.approx(float(reference.detach()), rel=1e-12)
    np.testing.assert_allclose(ours.backward(), as_numpy(x.grad), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(ours.grads["head_W"], as_numpy(theirs.head.weight.grad).T, rtol=1e-10, atol=1e-13)
    for i, tail in enumerate(theirs.tail):
        np.testing.assert_allclose(ours.grads[f"tail{i}_proj"], as_numpy(tail[0].weight.grad).T,
                                   rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(ours.grads[f"tail{i}_out"], as_numpy(tail[1].weight.grad).T,
                                   rtol=1e-10, atol=1e-13)
    from npsoftmax.torch_adapter import to_torch
    with pytest.raises(ValueError, match="AdaptiveLogSoftmaxWithLoss has no class weights"):
        to_torch(ours)


@pytest.mark.parametrize("sampler,weighted", [("log_uniform", False), ("unigram", True), ("uniform", True)])
def test_sampled_head_matches_its_torch_twin_given_the_same_samples(sampler, weighted):
    from npsoftmax.heads import SampledSoftmaxHead
    from npsoftmax.torch_adapter import from_torch, grads_from_torch, to_torch
    rng = np.random.default_rng(5)
    head = SampledSoftmaxHead(6, 40, rng=rng, dtype=np.float64, n_samples=8, sampler=sampler,
                              class_counts=rng.integers(1, 30, 40) if sampler == "unigram" else None,
                              class_weights=rng.uniform(0.2, 2.0, 40) if weighted else None)
    head.params["class_b"][...] = rng.standard_normal(40)
    h, y = rng.standard_normal((9, 6)), rng.integers(0, 40, 9)
    head.forward(h, y)
    y[2] = head.last_samples.ids[0]  # an accidental hit
    loss = head.forward(h, y, samples=head.last_samples)
    dh = head.backward()
    twin = to_torch(head)
    x = torch.from_numpy(h.copy()).requires_grad_(True)
    reference = twin(x, torch.from_numpy(y), samples=head.last_samples)
    reference.backward()
    assert loss == pytest.approx(float(reference.detach()), rel=1e-12)
    np.testing.assert_allclose(dh, as_numpy(x.grad), rtol=1e-10, atol=1e-13)
    for name, expected in grads_from_torch(head, twin).items():
        np.testing.assert_allclose(head.grads[name], expected, rtol=1e-10, atol=1e-13)
    with torch.no_grad():
        np.testing.assert_allclose(head.log_prob(h), as_numpy(twin.log_prob(torch.from_numpy(h))), rtol=1e-12)
    back = from_torch(twin, rng=np.random.default_rng(0))
    assert isinstance(back, SampledSoftmaxHead) and back.sampler.name == sampler
    np.testing.assert_array_equal(back.params["class_W"], head.params["class_W"])
