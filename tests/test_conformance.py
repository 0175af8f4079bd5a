"""npsoftmax.check_head: passes on all five heads (with their options) and catches planted mistakes."""

import functools

import numpy as np
import pytest

import npsoftmax
from npsoftmax import HeadCheckError, check_head
from npsoftmax.conformance import CHECKS
from npsoftmax.heads import (AdaptiveSoftmaxHead, GumbelSoftmaxHead, HierarchicalSoftmaxHead,
                             SampledSoftmaxHead, SoftmaxHead, log_softmax)

WEIGHTS = np.linspace(0.0, 2.0, 11)  # one class of weight 0

FACTORIES = {
    "softmax": SoftmaxHead,
    "softmax-weights-smoothing": functools.partial(SoftmaxHead, class_weights=WEIGHTS, label_smoothing=0.15),
    "gumbel": functools.partial(GumbelSoftmaxHead, tau=0.7),
    "gumbel-weights-smoothing": functools.partial(GumbelSoftmaxHead, tau=0.7, class_weights=WEIGHTS,
                                                  label_smoothing=0.1),
    "hierarchical": functools.partial(HierarchicalSoftmaxHead, branching=3),
    "hierarchical-weights": functools.partial(HierarchicalSoftmaxHead, class_weights=WEIGHTS),
    "adaptive": functools.partial(AdaptiveSoftmaxHead, cutoffs=[3, 7], div_value=2.0, head_bias=True),
    "adaptive-weights": functools.partial(AdaptiveSoftmaxHead, cutoffs=[4], class_weights=WEIGHTS),
    "sampled": functools.partial(SampledSoftmaxHead, n_samples=4),
    "sampled-unigram-weights": functools.partial(SampledSoftmaxHead, n_samples=5, sampler="unigram",
                                                 class_counts=np.arange(1, 12), class_weights=WEIGHTS),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_head_passes_every_check(name):
    assert check_head(FACTORIES[name]) == list(CHECKS)


def test_an_instance_is_checked_too_and_is_exported():
    assert npsoftmax.check_head is check_head
    head = SoftmaxHead(4, 6, rng=np.random.default_rng(0), dtype=np.float64)
    assert check_head(head) == list(CHECKS)
    assert "backward-before-forward" not in check_head(head)  # a used instance cannot show it
    with pytest.raises(HeadCheckError, match=r"check 'protocol' failed: .*must be float64"):
        check_head(SoftmaxHead(4, 6, rng=np.random.default_rng(0)))


# -- planted mistakes: each one must be caught by the right check -----------------------------------
class ScaledGradient(SoftmaxHead):
    def backward(self):
        dh = super().backward()
        self.grads["W"] *= 1.01
        return dh


class TransposedGradient(SoftmaxHead):
    """dh computed with W instead of W^T (only fits when D == K): a classic transposition bug."""

    def backward(self):
        super().backward()
        return self._cache[1] @ self.params["W"]


class WrongInputGradient(SoftmaxHead):
    def backward(self):
        return 2 * super().backward()


class UnnormalisedLogProb(SoftmaxHead):
    def log_prob(self, h):
        return self.logits(h)


class LazyPredict(SoftmaxHead):
    def predict(self, h):
        return np.zeros(h.shape[0], dtype=np.int64)


class ArgminPredict(SoftmaxHead):
    def predict(self, h):
        return np.argmin(self.log_prob(h), axis=1)


class SoftmaxTwice(SoftmaxHead):
    """log_prob of a doubly-applied softmax: normalised, but not the distribution trained."""

    def log_prob(self, h):
        return log_softmax(np.exp(log_softmax(self.logits(h))))


class MutatesInput(SoftmaxHead):
    def log_prob(self, h):
        out = super().log_prob(h)
        h *= 1.0 + 1e-3
        return out


class NoBackwardGuard(SoftmaxHead):
    def backward(self):
        if self._cache is None:
            return np.zeros((1, self.in_features))
        return super().backward()


class UndeclaredNoise(SoftmaxHead):
    """A stochastic objective that does not declare randomness_argument."""

    def forward(self, h, y):
        return super().forward(h + 1e-3 * self.rng.standard_normal(h.shape), y)


class AcceptsNaN(SoftmaxHead):
    def _check_features(self, h, name="h"):
        return h


class MismatchedGradShape(SoftmaxHead):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grads["b"] = np.zeros(self.n_classes + 1)


@pytest.mark.parametrize("head_class,check,detail", [
    (ScaledGradient, "gradients", r"d loss / d W is"),
    (TransposedGradient, "gradients", r"d loss / d h is"),
    (WrongInputGradient, "gradients", r"d loss / d h is 0\.33"),
    (UnnormalisedLogProb, "log-prob-normalised", r"logsumexp of log_prob row \d+ is"),
    (LazyPredict, "predict-is-argmax", r"predict differs from argmax\(log_prob\) on \d+ of 13 rows"),
    (ArgminPredict, "predict-is-argmax", r"on 13 of 13 rows"),
    (SoftmaxTwice, "loss-is-nll", r"forward in eval mode returned"),
    (MutatesInput, "inputs-not-mutated", r"log_prob changed its inputs"),
    (NoBackwardGuard, "backward-before-forward", r"must raise RuntimeError"),
    (UndeclaredNoise, "gradients", r"must repeat the loss"),
    (AcceptsNaN, "non-finite-refused", r"nan in row 4 must raise ValueError"),
    (MismatchedGradShape, "protocol", r"grads\['b'\] has shape \(12,\)"),
])
def test_planted_mistakes_are_caught_by_name(head_class, check, detail):
    size = {"in_features": 6, "n_classes": 6} if head_class is TransposedGradient else {}
    with pytest.raises(HeadCheckError, match=rf"check '{check}' failed: .*{detail}") as caught:
        check_head(head_class, **size)
    assert caught.value.check == check
    assert isinstance(caught.value, AssertionError)


def test_a_log_prob_that_forgets_a_zero_initialised_bias_is_caught():
    from npsoftmax.heads import SoftmaxHead, log_softmax

    class ForgetsBias(SoftmaxHead):
        def log_prob(self, h):
            return log_softmax(self._check_features(h) @ self.params["W"])

    with pytest.raises(HeadCheckError) as caught:
        check_head(ForgetsBias)
    assert caught.value.check in ("loss-is-nll", "predict-is-argmax")


def test_the_failure_message_is_the_same_whatever_the_hash_seed():
    """String hashing is randomised per process: a message built from a set would differ."""
    import os
    import subprocess
    import sys

    script = (
        "import npsoftmax\n"
        "from npsoftmax.heads import SoftmaxHead\n"
        "class DoubledGradient(SoftmaxHead):\n"
        "    def backward(self):\n"
        "        return 2 * super().backward()\n"
        "try:\n"
        "    npsoftmax.check_head(DoubledGradient)\n"
        "except npsoftmax.HeadCheckError as error:\n"
        "    print(error)\n"
    )
    messages = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(messages) == 1 and "all errors: h=" in messages.pop()
