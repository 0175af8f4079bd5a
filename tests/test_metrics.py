"""Tests for npsoftmax.metrics: hand-computed cases, tie rules, validation, sklearn parity."""

import numpy as np
import pytest

from npsoftmax.data.cifar100_classes import COARSE_OF_FINE
from npsoftmax.metrics import (
    classification_report,
    coarse_confusion,
    confusion_matrix,
    macro_scores,
    precision_recall_f1,
    top_k_accuracy,
)


# ----------------------------------------------------------------------------------
# A small hand-worked example shared by several tests.
#
#   labels      = [0, 0, 1, 2, 2, 2]
#   predictions = [0, 1, 1, 2, 0, 2]
#
# pairs (t, p): (0,0) (0,1) (1,1) (2,2) (2,0) (2,2), so
#
#   C = [[1, 1, 0],      row 0: one 0->0, one 0->1
#        [0, 1, 0],      row 1: one 1->1
#        [1, 0, 2]]      row 2: one 2->0, two 2->2
#
# tp = diag = [1, 1, 2]; predicted (column sums) = [2, 2, 2]; support (row sums) = [2, 1, 3]
# precision = tp / predicted = [1/2, 1/2, 1]
# recall    = tp / support   = [1/2, 1, 2/3]
# f1        = 2 tp / (predicted + support) = [2/4, 2/3, 4/5]
#   (check class 2: 2 * 1 * (2/3) / (1 + 2/3) = (4/3) / (5/3) = 4/5)
# macro precision = (1/2 + 1/2 + 1) / 3 = 2/3
# macro recall    = (1/2 + 1 + 2/3) / 3 = (13/6) / 3 = 13/18
# macro f1        = (1/2 + 2/3 + 4/5) / 3 = (59/30) / 3 = 59/90
# ----------------------------------------------------------------------------------
HAND_LABELS = np.array([0, 0, 1, 2, 2, 2])
HAND_PREDICTIONS = np.array([0, 1, 1, 2, 0, 2])
HAND_CONFUSION = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def test_confusion_matrix_hand_case():
    confusion = confusion_matrix(HAND_LABELS, HAND_PREDICTIONS, 3)
    assert confusion.dtype == np.int64
    np.testing.assert_array_equal(confusion, HAND_CONFUSION)


def test_confusion_matrix_rows_are_truth_and_unused_classes_are_zero():
    # Every sample has true class 1 and is predicted as 3, in a K = 5 problem:
    # only cell [1, 3] is non-zero, which pins down the row/column orientation.
    confusion = confusion_matrix([1, 1, 1], [3, 3, 3], 5)
    expected = np.zeros((5, 5), dtype=np.int64)
    expected[1, 3] = 3
    np.testing.assert_array_equal(confusion, expected)


def test_confusion_matrix_empty_input_gives_zeros():
    confusion = confusion_matrix(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 4)
    np.testing.assert_array_equal(confusion, np.zeros((4, 4), dtype=np.int64))


def test_confusion_matrix_matches_loop_on_random_data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, size=501)
    predictions = rng.integers(0, 7, size=501)
    expected = np.zeros((7, 7), dtype=np.int64)
    for true_class, predicted_class in zip(labels, predictions):
        expected[true_class, predicted_class] += 1
    np.testing.assert_array_equal(confusion_matrix(labels, predictions, 7), expected)


def test_precision_recall_f1_hand_case():
    precision, recall, f1 = precision_recall_f1(HAND_CONFUSION)
    np.testing.assert_allclose(precision, [1 / 2, 1 / 2, 1.0], rtol=1e-15)
    np.testing.assert_allclose(recall, [1 / 2, 1.0, 2 / 3], rtol=1e-15)
    np.testing.assert_allclose(f1, [1 / 2, 2 / 3, 4 / 5], rtol=1e-15)
    assert precision.dtype == recall.dtype == f1.dtype == np.float64


def test_precision_recall_f1_zero_division_is_zero():
    # labels [0, 0], predictions [0, 1], K = 3:
    #   C = [[1, 1, 0], [0, 0, 0], [0, 0, 0]]
    # class 0: tp 1, predicted 1, support 2 -> P 1, R 1/2, F1 2/3
    # class 1: tp 0, predicted 1, support 0 -> P 0/1 = 0, R 0/0 -> 0, F1 0
    # class 2: never present nor predicted -> everything 0/0 -> 0
    confusion = confusion_matrix([0, 0], [0, 1], 3)
    with np.errstate(all="raise"):                 # no 0/0 warnings may leak either
        precision, recall, f1 = precision_recall_f1(confusion)
    np.testing.assert_array_equal(precision, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(recall, [0.5, 0.0, 0.0])
    np.testing.assert_allclose(f1, [2 / 3, 0.0, 0.0], rtol=1e-15)


def test_macro_scores_hand_case():
    scores = macro_scores(HAND_CONFUSION)
    assert set(scores) == {"precision", "recall", "f1"}
    assert scores["precision"] == pytest.approx(2 / 3, rel=1e-15)
    assert scores["recall"] == pytest.approx(13 / 18, rel=1e-15)
    assert scores["f1"] == pytest.approx(59 / 90, rel=1e-15)


def test_coarse_confusion_hand_case():
    # Classes {0, 1} form group 0, classes {2, 3} group 1; each coarse cell sums a 2x2 block.
    confusion = np.array([[5, 1, 2, 0],
                          [0, 3, 0, 1],
                          [1, 0, 4, 2],
                          [0, 2, 0, 6]])
    # [0,0] = 5+1+0+3 = 9   [0,1] = 2+0+0+1 = 3
    # [1,0] = 1+0+0+2 = 3   [1,1] = 4+2+0+6 = 12
    coarse = coarse_confusion(confusion, np.array([0, 0, 1, 1]))
    np.testing.assert_array_equal(coarse, [[9, 3], [3, 12]])
    assert coarse.dtype == confusion.dtype
    # Interleaved membership: group 0 = classes {1, 3}, group 1 = classes {0, 2}.
    # [0,0] = C[1,1]+C[1,3]+C[3,1]+C[3,3] = 3+1+2+6 = 12   [0,1] = C[1,0]+C[1,2]+C[3,0]+C[3,2] = 0
    # [1,0] = C[0,1]+C[0,3]+C[2,1]+C[2,3] = 1+0+0+2 = 3    [1,1] = C[0,0]+C[0,2]+C[2,0]+C[2,2] = 5+2+1+4 = 12
    coarse = coarse_confusion(confusion, np.array([1, 0, 1, 0]))
    np.testing.assert_array_equal(coarse, [[12, 0], [3, 12]])


def test_coarse_confusion_cifar100_equals_confusion_of_coarse_labels():
    # Independent route: map the labels to superclasses first, then count.
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 100, size=2000)
    predictions = np.where(rng.random(2000) < 0.3, labels, rng.integers(0, 100, size=2000))
    fine = confusion_matrix(labels, predictions, 100)
    coarse = coarse_confusion(fine, COARSE_OF_FINE)
    assert coarse.shape == (20, 20)
    np.testing.assert_array_equal(
        coarse, confusion_matrix(COARSE_OF_FINE[labels], COARSE_OF_FINE[predictions], 20))
    assert np.trace(coarse) >= np.trace(fine)


def test_coarse_confusion_explicit_n_groups_adds_empty_groups():
    coarse = coarse_confusion(HAND_CONFUSION, np.array([0, 1, 1]), n_groups=4)
    # group 0 = {0}, group 1 = {1, 2}; groups 2 and 3 have no classes.
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[:2, :2] = [[1, 1], [1, 3]]
    np.testing.assert_array_equal(coarse, expected)


# ----------------------------------------------------------------------------------
# top-k accuracy
# ----------------------------------------------------------------------------------

def test_top_k_accuracy_hand_case():
    scores = np.array([[0.1, 0.5, 0.3, 0.1],    # label 2: only class 1 scores higher -> rank 1
                       [2.0, 1.0, 0.0, -1.0],   # label 0: best                      -> rank 0
                       [0.0, 0.2, 0.4, 0.6]])   # label 0: three classes higher       -> rank 3
    labels = np.array([2, 0, 0])
    # hit iff rank < k: k=1 -> {1}; k=2 -> {0, 1}; k=3 -> {0, 1}; k=4 -> all
    assert top_k_accuracy(scores, labels, k=1) == pytest.approx(1 / 3)
    assert top_k_accuracy(scores, labels, k=2) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, labels, k=3) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, labels, k=4) == 1.0


def test_top_k_accuracy_ties_go_to_the_lower_class_index():
    # Documented rule: equal scores are ranked by class index, lowest first (np.argmax's rule).
    scores = np.array([[1.0, 1.0, 0.0]])
    assert top_k_accuracy(scores, [0], k=1) == 1.0     # class 0 wins the tie
    assert top_k_accuracy(scores, [1], k=1) == 0.0     # class 1 is ranked second ...
    assert top_k_accuracy(scores, [1], k=2) == 1.0     # ... so it is a top-2 hit
    scores = np.array([[0.0, 1.0, 1.0]])
    assert top_k_accuracy(scores, [2], k=1) == 0.0
    assert top_k_accuracy(scores, [2], k=2) == 1.0
    # -inf ties with -inf: label 2 is behind class 1 (higher) and class 0 (tie, lower index).
    scores = np.array([[-np.inf, 0.0, -np.inf]])
    assert top_k_accuracy(scores, [2], k=2) == 0.0
    assert top_k_accuracy(scores, [2], k=3) == 1.0
    assert top_k_accuracy(scores, [0], k=2) == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_k_accuracy_matches_stable_sort_oracle_with_many_ties(dtype):
    # Integer-valued scores in a small range produce many ties. Oracle: a stable sort
    # of -scores orders by score descending, then by class index ascending.
    rng = np.random.default_rng(2)
    scores = rng.integers(-2, 3, size=(300, 9)).astype(dtype)
    labels = rng.integers(0, 9, size=300)
    order = np.argsort(-scores, axis=1, kind="stable")
    rank = np.argmax(order == labels[:, None], axis=1)
    for k in range(1, 10):
        assert top_k_accuracy(scores, labels, k) == pytest.approx(np.mean(rank < k), abs=1e-15)
    assert top_k_accuracy(scores, labels, 1) == pytest.approx(
        np.mean(np.argmax(scores, axis=1) == labels), abs=1e-15)


def test_top_k_accuracy_batch_of_one_and_k_equals_K():
    scores = np.array([[0.3, -1.0, 7.0, 0.0, 2.0]])
    assert top_k_accuracy(scores, [1], k=5) == 1.0
    assert top_k_accuracy(scores, [1], k=4) == 0.0
    assert top_k_accuracy(scores, [4], k=2) == 1.0


# ----------------------------------------------------------------------------------
# classification_report
# ----------------------------------------------------------------------------------

def test_classification_report_hand_case():
    # top1 = trace(C) / N = (1 + 1 + 2) / 6 = 2/3; macro values from the comment at the top.
    report = classification_report(HAND_LABELS, HAND_PREDICTIONS, 3)
    assert report["n_samples"] == 6
    assert report["top1"] == pytest.approx(2 / 3)
    assert report["macro_precision"] == pytest.approx(2 / 3)
    assert report["macro_recall"] == pytest.approx(13 / 18)
    assert report["macro_f1"] == pytest.approx(59 / 90)
    assert not any(key.startswith("top") and key != "top1" for key in report)


def test_classification_report_with_scores_adds_top_k():
    # Scores whose argmax is HAND_PREDICTIONS; the true label is second-best in the two
    # misclassified rows (1 and 4), so top-2 accuracy is 1.
    scores = np.array([[3.0, 2.0, 1.0],
                       [2.0, 3.0, 1.0],     # label 0 ranked 2nd
                       [1.0, 3.0, 2.0],
                       [1.0, 2.0, 3.0],
                       [3.0, 1.0, 2.0],     # label 2 ranked 2nd
                       [1.0, 2.0, 3.0]])
    report = classification_report(HAND_LABELS, HAND_PREDICTIONS, 3, scores=scores, top_k=2)
    assert report["top2"] == 1.0
    assert report["top1"] == pytest.approx(top_k_accuracy(scores, HAND_LABELS, 1))


# ----------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------

def test_top_k_accuracy_validation():
    scores = np.zeros((4, 3))
    labels = np.array([0, 1, 2, 0])
    with pytest.raises(ValueError, match="k must be"):
        top_k_accuracy(scores, labels, k=0)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, K=3\], got 4"):
        top_k_accuracy(scores, labels, k=4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*\[0, 3\]"):
        top_k_accuracy(scores, np.array([0, 1, 3, 0]), k=1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*\[-1, 2\]"):
        top_k_accuracy(scores, np.array([0, -1, 2, 0]), k=1)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        top_k_accuracy(scores, labels[:3], k=1)
    with pytest.raises(ValueError, match=r"scores must have shape \(N, K\)"):
        top_k_accuracy(scores[0], labels, k=1)
    with pytest.raises(TypeError, match="labels must hold integer"):
        top_k_accuracy(scores, labels.astype(np.float64), k=1)
    with pytest.raises(ValueError, match="NaN"):
        top_k_accuracy(np.where(np.eye(4, 3) > 0, np.nan, 0.0), labels, k=1)
    with pytest.raises(ValueError, match="at least one sample"):
        top_k_accuracy(np.zeros((0, 3)), np.zeros(0, dtype=np.int64), k=1)


def test_confusion_matrix_validation():
    with pytest.raises(ValueError, match="predictions must lie in"):
        confusion_matrix([0, 1], [0, 5], 3)
    with pytest.raises(ValueError, match=r"same shape.*\(2,\).*\(3,\)"):
        confusion_matrix([0, 1], [0, 1, 2], 3)
    with pytest.raises(ValueError, match="1-D"):
        confusion_matrix(np.zeros((2, 2), dtype=int), np.zeros((2, 2), dtype=int), 3)
    with pytest.raises(ValueError, match="n_classes must be a positive int"):
        confusion_matrix([0], [0], 0)
    with pytest.raises(TypeError, match="predictions must hold integer"):
        confusion_matrix([0, 1], [True, False], 3)


def test_confusion_based_validation():
    with pytest.raises(ValueError, match="square"):
        precision_recall_f1(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        macro_scores(np.array([[1, -1], [0, 2]]))
    with pytest.raises(ValueError, match=r"groups must have shape \(3,\)"):
        coarse_confusion(HAND_CONFUSION, np.array([0, 1]))
    with pytest.raises(ValueError, match="groups must lie in"):
        coarse_confusion(HAND_CONFUSION, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="groups must lie in"):
        coarse_confusion(HAND_CONFUSION, np.array([0, 1, 2]), n_groups=2)
    with pytest.raises(ValueError, match=r"scores must have shape \(6, 3\)"):
        classification_report(HAND_LABELS, HAND_PREDICTIONS, 3, scores=np.zeros((6, 4)))
    with pytest.raises(ValueError, match="at least one sample"):
        classification_report([], [], 3)


# ----------------------------------------------------------------------------------
# Agreement with scikit-learn (an independent implementation)
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agreement_with_sklearn(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n_samples, n_classes = 257, 11
    labels = rng.integers(0, n_classes - 1, size=n_samples)      # class 10 never present
    scores = rng.standard_normal((n_samples, n_classes))         # continuous: no ties
    scores[np.arange(n_samples), labels] += rng.random(n_samples) * 2.0
    predictions = np.argmax(scores, axis=1)
    classes = np.arange(n_classes)

    np.testing.assert_array_equal(
        confusion_matrix(labels, predictions, n_classes),
        sklearn_metrics.confusion_matrix(labels, predictions, labels=classes))

    confusion = confusion_matrix(labels, predictions, n_classes)
    precision, recall, f1 = precision_recall_f1(confusion)
    expected_p, expected_r, expected_f1, _ = sklearn_metrics.precision_recall_fscore_support(
        labels, predictions, labels=classes, average=None, zero_division=0)
    np.testing.assert_allclose(precision, expected_p, rtol=1e-12, atol=0)
    np.testing.assert_allclose(recall, expected_r, rtol=1e-12, atol=0)
    np.testing.assert_allclose(f1, expected_f1, rtol=1e-12, atol=0)

    macro = macro_scores(confusion)
    expected_macro = sklearn_metrics.precision_recall_fscore_support(
        labels, predictions, labels=classes, average="macro", zero_division=0)
    assert macro["precision"] == pytest.approx(expected_macro[0], rel=1e-12)
    assert macro["recall"] == pytest.approx(expected_macro[1], rel=1e-12)
    assert macro["f1"] == pytest.approx(expected_macro[2], rel=1e-12)

    for k in (1, 2, 5, n_classes - 1):   # sklearn warns that k = K is trivially 1
        assert top_k_accuracy(scores, labels, k) == pytest.approx(
            sklearn_metrics.top_k_accuracy_score(labels, scores, k=k, labels=classes), rel=1e-12)
