"""The head conformance kit: every protocol check a head must pass, in one call.

    import numpy as np
    import npsoftmax
    from npsoftmax.heads import SoftmaxHead

    npsoftmax.check_head(SoftmaxHead)                        # a class (or any factory)
    npsoftmax.check_head(lambda D, K, *, rng, dtype: MyHead(D, K, rng=rng, dtype=dtype, depth=3))
    npsoftmax.check_head(my_float64_head)                    # or an instance

A *factory* is called like a head class, ``factory(in_features, n_classes, rng=rng,
dtype=np.float64)``, once per check that needs a fresh head; an instance must be
float64 (gradient checks need it) and is used as it is (its parameters are perturbed
and restored). Checks, in order (each raises ``HeadCheckError`` naming the check and
the numbers):

* ``protocol``: in_features/n_classes/dtype attributes; ``params``/``grads`` same keys,
  shapes and dtype; ``train()``/``eval()`` return the head.
* ``backward-before-forward``: ``backward()`` on a fresh head raises RuntimeError.
* ``forward-output``: ``forward`` returns a finite python float; ``backward`` returns
  ``dh`` of ``h``'s shape and dtype; batch sizes 1 and 7.
* ``gradients``: ``dh`` and every ``grads[name]`` against float64 central differences on
  random data (``HEAD_TOLERANCE``); stochastic objectives are held fixed through the
  head's declared ``randomness_argument`` (``forward(h, y, noise=head.last_noise)``).
  Arrays with more than ``max_dense_entries`` entries use the sampled-entry and
  directional-derivative checks instead.
* ``inputs-not-mutated``: ``h`` and ``y`` are unchanged by forward/backward/log_prob/predict.
* ``log-prob-normalised``: ``log_prob(h)`` is (N, K) in the head's dtype and every row
  logsumexps to 0.
* ``predict-is-argmax``: ``predict(h)`` is (N,) int64 and equals ``argmax(log_prob(h))``.
* ``loss-is-nll``: in ``eval()`` mode (and in training mode for a deterministic objective,
  ``randomness_argument is None``), ``forward(h, y)`` equals the (weighted, smoothed)
  NLL computed from ``log_prob(h)``: ``-mean(log_prob[y])`` without options.
* ``non-finite-refused``: NaN/inf features raise ``ValueError`` in forward/log_prob/predict.
"""

import numpy as np

from .gradcheck import (HEAD_TOLERANCE, directional_derivative_errors, gradient_errors,
                        sampled_gradient_errors)
from .heads.softmax_functions import logsumexp

__all__ = ["check_head", "HeadCheckError", "reference_loss"]

#: The checks ``check_head`` runs, in order.
CHECKS = ("protocol", "backward-before-forward", "forward-output", "gradients", "inputs-not-mutated",
          "log-prob-normalised", "predict-is-argmax", "loss-is-nll", "non-finite-refused")


class HeadCheckError(AssertionError):
    """A head failed a conformance check; ``check`` names it, the message gives the numbers."""

    def __init__(self, check, message):
        super().__init__(f"check '{check}' failed: {message}")
        self.check = check


def _require(condition, check, message):
    if not condition:
        raise HeadCheckError(check, message)


def reference_loss(log_prob, y, class_weights=None, label_smoothing=0.0):
    """The loss a head with these options must return in eval mode, from its ``log_prob`` (N, K).

    torch's ``cross_entropy`` formula: with ``S = sum_i w[y_i]``,
    ``((1 - eps) sum_i w[y_i] (-l_i[y_i]) + (eps / K) sum_i sum_k w[k] (-l_i[k])) / S``.
    """
    log_prob = np.asarray(log_prob, dtype=np.float64)
    n_samples, n_classes = log_prob.shape
    weights = np.ones(n_classes) if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    label_weight = weights[y]
    nll = -log_prob[np.arange(n_samples), y]
    smooth = -(log_prob * weights).sum(axis=1)
    eps = label_smoothing
    return float(((1 - eps) * np.dot(label_weight, nll) + eps / n_classes * smooth.sum()) / label_weight.sum())


class _Subject:
    """Fresh heads from a factory, or the one instance given."""

    def __init__(self, head_or_factory, in_features, n_classes, seed):
        self.seed = seed
        if isinstance(head_or_factory, type) or (callable(head_or_factory)
                                                 and not hasattr(head_or_factory, "forward")):
            self.factory = head_or_factory
            self.instance = None
            self.in_features, self.n_classes = in_features, n_classes
        else:
            head = head_or_factory
            for name in ("forward", "backward", "log_prob", "predict", "params", "grads"):
                _require(hasattr(head, name), "protocol", f"a head needs .{name}; {type(head).__name__} has none")
            _require(getattr(head, "dtype", None) == np.float64, "protocol",
                     f"the instance must be float64 for gradient checks, got dtype "
                     f"{getattr(head, 'dtype', None)}; pass a factory or build it with dtype=np.float64")
            self.factory, self.instance = None, head
            self.in_features, self.n_classes = head.in_features, head.n_classes

    def fresh(self, index=0):
        if self.instance is not None:
            return self.instance
        return self.factory(self.in_features, self.n_classes, rng=np.random.default_rng(self.seed + index),
                            dtype=np.float64)


def _labels(head, n_samples, rng):
    """Random labels; where class weights exist, only classes with weight > 0 (else 0 / 0)."""
    weights = getattr(head, "class_weights", None)
    allowed = np.arange(head.n_classes) if weights is None else np.flatnonzero(np.asarray(weights) > 0)
    return rng.choice(allowed, size=n_samples)


def _fixed_forward(head, h, y):
    """A loss function of the live arrays with the head's randomness held at its last draw."""
    keyword = getattr(head, "randomness_argument", None)
    if keyword is None or not head.training:
        return lambda: head.forward(h, y)
    fixed = getattr(head, f"last_{keyword}")
    return lambda: head.forward(h, y, **{keyword: fixed})


def _check_protocol(head):
    for name in ("in_features", "n_classes", "dtype", "params", "grads", "train", "eval"):
        _require(hasattr(head, name), "protocol", f"{type(head).__name__} has no attribute {name!r}")
    _require(set(head.params) == set(head.grads), "protocol",
             f"params and grads keys differ: {sorted(head.params)} vs {sorted(head.grads)}")
    _require(len(head.params) > 0, "protocol", "a head owns its output projection: params is empty")
    for name, value in head.params.items():
        grad = head.grads[name]
        _require(isinstance(value, np.ndarray) and isinstance(grad, np.ndarray), "protocol",
                 f"params[{name!r}] and grads[{name!r}] must be ndarrays")
        _require(grad.shape == value.shape, "protocol",
                 f"grads[{name!r}] has shape {grad.shape}, params[{name!r}] {value.shape}")
        _require(value.dtype == head.dtype and grad.dtype == head.dtype, "protocol",
                 f"params/grads[{name!r}] have dtypes {value.dtype}/{grad.dtype}, head dtype {head.dtype}")
    _require(head.eval() is head and head.training is False, "protocol", "eval() must return the head "
             "and set training = False")
    _require(head.train() is head and head.training is True, "protocol", "train() must return the head "
             "and set training = True")


def _check_gradients(head, n_samples, rng, max_dense_entries):
    D = head.in_features
    h = rng.standard_normal((n_samples, D))
    y = _labels(head, n_samples, rng)
    for name, value in head.params.items():  # generic values: zero biases hide bias bugs
        if value.ndim == 1:
            value[...] += 0.5 * rng.standard_normal(value.shape)
    loss = head.forward(h, y)
    _require(isinstance(loss, float) and np.isfinite(loss), "forward-output",
             f"forward must return a finite python float, got {type(loss).__name__} {loss!r} (N={n_samples})")
    dh = head.backward()
    _require(isinstance(dh, np.ndarray) and dh.shape == h.shape and dh.dtype == h.dtype, "forward-output",
             f"backward must return dh of shape {h.shape} and dtype {h.dtype}, got "
             f"{getattr(dh, 'shape', type(dh).__name__)} {getattr(dh, 'dtype', '')} (N={n_samples})")
    analytic = {"h": dh.copy(), **{name: grad.copy() for name, grad in head.grads.items()}}
    arrays = {"h": h, **head.params}
    loss_fn = _fixed_forward(head, h, y)
    repeat = loss_fn()
    _require(repeat == loss, "gradients",
             f"forward with the randomness held fixed must repeat the loss: {loss!r} then {repeat!r} "
             "(a stochastic objective must declare randomness_argument)")
    dense = [name for name, array in arrays.items() if array.size <= max_dense_entries]  # in order: stable messages
    errors = gradient_errors(loss_fn, {n: arrays[n] for n in dense}, {n: analytic[n] for n in dense})
    large = {name: arrays[name] for name in arrays if name not in dense}
    if large:
        errors.update(sampled_gradient_errors(loss_fn, large, {n: analytic[n] for n in large}, rng))
        directional = directional_derivative_errors(loss_fn, large, {n: analytic[n] for n in large}, rng)
        errors = {name: max(errors[name], directional.get(name, 0.0)) for name in errors}
    worst = max(errors, key=errors.get)
    _require(errors[worst] < HEAD_TOLERANCE, "gradients",
             f"relative error of d loss / d {worst} is {errors[worst]:.3g} >= {HEAD_TOLERANCE:g} "
             f"(N={n_samples}); all errors: " + ", ".join(f"{n}={e:.2g}" for n, e in errors.items()))


def check_head(head_or_factory, *, in_features=5, n_classes=11, seed=0, max_dense_entries=20_000):
    """Run every conformance check on a head; raises ``HeadCheckError`` on the first failure.

    Args:
        head_or_factory: a head class / factory ``f(in_features, n_classes, *, rng, dtype)``,
            or a float64 head instance.
        in_features, n_classes: D and K for heads built by a factory (odd by default).
        seed: seeds the factory's generators and the random data.
        max_dense_entries: arrays larger than this are checked by random entries and
            directional derivatives instead of every entry.

    Returns:
        list of the checks passed (``CHECKS``, minus ``backward-before-forward`` when an
        already-used instance was given).
    """
    subject = _Subject(head_or_factory, in_features, n_classes, seed)
    rng = np.random.default_rng(seed)
    passed = []

    head = subject.fresh(0)
    if getattr(head, "_cache", None) is None or subject.instance is None:
        try:
            head.backward()
        except RuntimeError:
            passed.append("backward-before-forward")
        else:
            raise HeadCheckError("backward-before-forward",
                                 "backward() before any forward() must raise RuntimeError, it returned")
    _check_protocol(head)
    passed.insert(0, "protocol")

    for index, n_samples in enumerate((1, 7)):
        _check_gradients(subject.fresh(1 + index).train(), n_samples, rng, max_dense_entries)
    passed += ["forward-output", "gradients"]

    head = subject.fresh(3)
    for value in head.params.values():
        # A peaked distribution (argmax and normalisation non-trivial), and no parameter left
        # at its initial zero: a log_prob that forgets a zero-initialised bias must fail.
        value[...] = 3.0 * value + 0.5 * rng.standard_normal(value.shape)
    h = rng.standard_normal((13, head.in_features)) * 2
    y = _labels(head, 13, rng)
    h_before, y_before = h.copy(), y.copy()
    for method in ("forward", "backward", "log_prob", "predict"):
        {"forward": lambda: head.forward(h, y), "backward": head.backward,
         "log_prob": lambda: head.log_prob(h), "predict": lambda: head.predict(h)}[method]()
        _require(np.array_equal(h, h_before) and np.array_equal(y, y_before), "inputs-not-mutated",
                 f"{method} changed its inputs: max |h - h_before| = {np.max(np.abs(h - h_before)):.3g}, "
                 f"labels changed at {np.flatnonzero(y != y_before)[:5].tolist()}")
    passed.append("inputs-not-mutated")

    log_prob = head.log_prob(h)
    _require(isinstance(log_prob, np.ndarray) and log_prob.shape == (13, head.n_classes)
             and log_prob.dtype == head.dtype, "log-prob-normalised",
             f"log_prob must be ({13}, {head.n_classes}) {head.dtype}, got "
             f"{getattr(log_prob, 'shape', type(log_prob).__name__)} {getattr(log_prob, 'dtype', '')}")
    row_total = logsumexp(log_prob, axis=1)
    worst = int(np.argmax(np.abs(row_total)))
    _require(np.all(np.abs(row_total) < 1e-9), "log-prob-normalised",
             f"logsumexp of log_prob row {worst} is {row_total[worst]:.6g}, expected 0 (|error| < 1e-9)")
    passed.append("log-prob-normalised")

    prediction = head.predict(h)
    _require(isinstance(prediction, np.ndarray) and prediction.shape == (13,) and prediction.dtype == np.int64,
             "predict-is-argmax", f"predict must return (13,) int64, got "
             f"{getattr(prediction, 'shape', type(prediction).__name__)} {getattr(prediction, 'dtype', '')}")
    argmax = np.argmax(log_prob, axis=1)
    wrong = np.flatnonzero(prediction != argmax)
    _require(wrong.size == 0, "predict-is-argmax",
             f"predict differs from argmax(log_prob) on {wrong.size} of 13 rows; row "
             f"{wrong[0] if wrong.size else ''}: predict "
             f"{prediction[wrong[0]] if wrong.size else ''}, argmax {argmax[wrong[0]] if wrong.size else ''}")
    passed.append("predict-is-argmax")

    expected = reference_loss(log_prob, y, getattr(head, "class_weights", None),
                              getattr(head, "label_smoothing", 0.0))
    modes = [("eval", head.eval())]
    if getattr(head, "randomness_argument", None) is None:
        modes.append(("train", head.train()))
    for mode, _ in modes:
        getattr(head, mode)()
        loss = head.forward(h, y)
        _require(abs(loss - expected) <= 1e-10 * max(1.0, abs(expected)), "loss-is-nll",
                 f"forward in {mode} mode returned {loss!r}, but the NLL from log_prob is {expected!r}")
        head.backward()
    head.train()
    passed.append("loss-is-nll")

    for bad in (np.nan, np.inf):
        corrupt = h.copy()
        corrupt[4, 1] = bad
        for call in (lambda: head.forward(corrupt, y), lambda: head.log_prob(corrupt),
                     lambda: head.predict(corrupt)):
            try:
                call()
            except ValueError:
                continue
            raise HeadCheckError("non-finite-refused",
                                 f"features with a {bad} in row 4 must raise ValueError, but a call returned")
    passed.append("non-finite-refused")
    return passed
