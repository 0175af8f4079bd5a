"""Sparse gradient checks (random entries, directional derivatives) and heads at K = 1,000,000.

The full central-difference check costs two forward passes per parameter entry, which is
out of reach for a (1M, D) table; the two cheap oracles in ``gradcheck`` still use float64
central differences, and are first shown to catch planted mistakes.
"""

import numpy as np
import pytest

from npsoftmax.gradcheck import (HEAD_TOLERANCE, directional_derivative_errors,
                                 sampled_gradient_errors)
from npsoftmax.heads import (AdaptiveSoftmaxHead, HierarchicalSoftmaxHead, SampledSoftmaxHead,
                             SoftmaxHead)

MILLION = 1_000_000


def analytic_gradients(head, h, y):
    """Run forward/backward once; return (loss_fn with randomness held fixed, arrays, analytic)."""
    head.forward(h, y)
    analytic = {"h": head.backward().copy(), **{name: g.copy() for name, g in head.grads.items()}}
    keyword = head.randomness_argument
    fixed = {keyword: getattr(head, f"last_{keyword}")} if keyword else {}
    return (lambda: head.forward(h, y, **fixed)), {"h": h, **head.params}, analytic


def small_softmax_case(seed=0):
    rng = np.random.default_rng(seed)
    head = SoftmaxHead(6, 9, rng=rng, dtype=np.float64)
    head.params["b"][...] = rng.standard_normal(9)
    return head, rng.standard_normal((5, 6)), rng.integers(0, 9, 5)


def test_both_checks_pass_a_correct_gradient():
    head, h, y = small_softmax_case()
    loss_fn, arrays, analytic = analytic_gradients(head, h, y)
    rng = np.random.default_rng(1)
    for check in (sampled_gradient_errors, directional_derivative_errors):
        errors = check(loss_fn, arrays, analytic, rng)
        assert set(errors) == {"h", "W", "b"}
        assert max(errors.values()) < HEAD_TOLERANCE, (check.__name__, errors)


@pytest.mark.parametrize("mistake", ["scaled", "one entry", "transposed", "zeroed row"])
def test_both_checks_catch_planted_mistakes(mistake):
    head, h, y = small_softmax_case(2)
    head.params["W"] = head.params["W"][:, :6].copy()  # square W (D = K = 6) so a transpose fits
    head.params["b"] = head.params["b"][:6].copy()
    head.grads = {name: np.zeros_like(value) for name, value in head.params.items()}
    head.n_classes = 6
    y = y % 6
    loss_fn, arrays, analytic = analytic_gradients(head, h, y)
    wrong = analytic["W"]
    if mistake == "scaled":
        wrong *= 1.05
    elif mistake == "one entry":
        wrong[2, 3] += 0.05
    elif mistake == "transposed":
        analytic["W"] = wrong.T.copy()
    else:
        wrong[np.argmax(np.abs(wrong).sum(axis=1))] = 0
    rng = np.random.default_rng(3)
    # the sampled check over every entry of this small array, the directional one in 2 directions
    assert sampled_gradient_errors(loss_fn, arrays, analytic, rng, n_entries=36)["W"] > 1e-3
    assert directional_derivative_errors(loss_fn, arrays, analytic, rng)["W"] > 1e-3


def test_arrays_are_restored_exactly():
    head, h, y = small_softmax_case(4)
    loss_fn, arrays, analytic = analytic_gradients(head, h, y)
    before = {name: value.copy() for name, value in arrays.items()}
    sampled_gradient_errors(loss_fn, arrays, analytic, np.random.default_rng(0), n_entries=4)
    directional_derivative_errors(loss_fn, arrays, analytic, np.random.default_rng(0))
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, before[name])


def test_float32_is_refused():
    rng = np.random.default_rng(0)
    head = SoftmaxHead(3, 4, rng=rng)
    h = rng.standard_normal((2, 3)).astype(np.float32)
    loss_fn, arrays, analytic = analytic_gradients(head, h, np.array([0, 1]))
    for check in (sampled_gradient_errors, directional_derivative_errors):
        with pytest.raises(TypeError, match="gradient checks need float64"):
            check(loss_fn, arrays, analytic, rng)


def million_class_heads():
    """name -> factory of a K = 1,000,000 float64 head with small D (built inside the test)."""
    return {
        "hierarchical": lambda rng: HierarchicalSoftmaxHead(4, MILLION, rng=rng, dtype=np.float64),
        "adaptive": lambda rng: AdaptiveSoftmaxHead(8, MILLION, rng=rng, dtype=np.float64,
                                                    cutoffs=[50, 5_000], div_value=2.0),
        "sampled": lambda rng: SampledSoftmaxHead(4, MILLION, rng=rng, dtype=np.float64, n_samples=31),
    }


@pytest.mark.parametrize("name", list(million_class_heads()))
def test_million_class_heads_pass_the_sparse_checks(name):
    rng = np.random.default_rng(5)
    head = million_class_heads()[name](rng)
    for value in head.params.values():  # generic values (biases start at zero)
        value += 0.3 * rng.standard_normal(value.shape) if value.ndim == 1 else 0
    # Odd batch; labels across the whole range (adaptive: shortlist and both clusters).
    y = np.array([3, 777, 123_456, 999_999, 42_000])
    h = rng.standard_normal((y.size, head.in_features))
    loss_fn, arrays, analytic = analytic_gradients(head, h, y)
    n_entries = 10 if name == "adaptive" else 16  # an adaptive forward scores a 995k-class cluster
    errors = sampled_gradient_errors(loss_fn, arrays, analytic, rng, n_entries=n_entries)
    assert max(errors.values()) < HEAD_TOLERANCE, errors
    errors = directional_derivative_errors(loss_fn, arrays, analytic, rng, n_directions=1)
    assert max(errors.values()) < HEAD_TOLERANCE, errors
