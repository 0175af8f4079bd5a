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
