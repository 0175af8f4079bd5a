"""Numerical gradients: the independent oracle every backward pass is checked against.

Central differences approximate a derivative with error O(h^2)::

    df/dx_i ~= (f(x + h e_i) - f(x - h e_i)) / (2 h)

In float64 with ``h = 1e-6`` the truncation error (~h^2) and the rounding error
(~eps / h ~ 1e-10) are both tiny, so a correct backward agrees to ~1e-9 relative.
In float32 the rounding error alone is ~1e-7 / 1e-6 = 10%: a float32 gradient
check cannot tell a right gradient from a wrong one. That is why every function
here refuses float32 arrays.

To check a function ``y = g(x)`` with a non-scalar output, contract it with a
*random* upstream gradient ``dout`` and check the scalar ``L = sum(g(x) * dout)``:
its gradient is exactly what ``backward(dout)`` returns. An all-ones ``dout``
would hide transposition bugs, and ``sum(softmax(x))`` is constant (its gradient
is zero), which is why tests never use either.

Huge arrays (a (1M, D) class table) make the full check cost 2 forward passes per
entry. Two cheaper oracles, both still float64 central differences:

* ``sampled_gradient_errors``: a random subset of entries (half from where the
  analytic gradient is non-zero, half uniform over the array, which checks that the
  "untouched" entries really have zero gradient) against their analytic values.
* ``directional_derivative_errors``: for a random direction ``v`` (Gaussian, the
  array's shape) the derivative of ``t -> f(x + t v)`` at 0, ``(f(x + h v) - f(x - h v)) / 2h``,
  must equal ``<grad, v>``. One pair of evaluations checks every entry at once
  (a wrong entry with a non-zero ``v_i`` changes the inner product), though a
  single direction cannot say *which* entry is wrong.
"""

import numpy as np

#: Relative-error threshold for layer gradient checks in float64.
LAYER_TOLERANCE = 1e-7
#: Relative-error threshold for head gradient checks in float64.
HEAD_TOLERANCE = 1e-6


def _require_float64(name, array):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(array).__name__}")
    if array.dtype != np.float64:
        raise TypeError(
            f"gradient checks need float64: {name} has dtype {array.dtype}. Central "
            "differences in float32 have ~10% rounding error and cannot verify a gradient; "
            "build the layer/head with dtype=np.float64 for the check."
        )


def numerical_gradient(f, x, h=1e-6):
    """Central-difference gradient of a scalar function.

    Parameters
    ----------
    f : callable
        ``f()`` returns a float and reads ``x`` (which is perturbed *in place*,
        one entry at a time, and restored afterwards), so ``x`` may be a live
        parameter array of a layer.
    x : ndarray (any shape), float64
    h : float
        Step size.

    Returns
    -------
    grad : ndarray, same shape as ``x``
    """
    flat_x = _flat_view("x", x)  # a view: writing it perturbs x
    grad = np.zeros_like(x)
    flat_grad = grad.reshape(-1)
    for i in range(flat_x.size):
        flat_grad[i] = _central_difference(f, flat_x, i, h)
    return grad


def _central_difference(f, flat_x, i, h):
    """``(f(x + h e_i) - f(x - h e_i)) / 2h``, perturbing ``flat_x[i]`` in place and restoring it."""
    original = flat_x[i]
    flat_x[i] = original + h
    f_plus = float(f())
    flat_x[i] = original - h
    f_minus = float(f())
    flat_x[i] = original
    return (f_plus - f_minus) / (2.0 * h)


def _flat_view(name, x):
    _require_float64(name, x)
    flat_x = x.reshape(-1)
    if not np.shares_memory(flat_x, x):
        raise ValueError(f"{name} must be contiguous so that it can be perturbed in place")
    return flat_x


def _check_gradient_pairs(arrays, analytic):
    if set(arrays) != set(analytic):
        raise ValueError(
            f"arrays and analytic must have the same keys, got {sorted(arrays)} vs {sorted(analytic)}"
        )
    for name, array in arrays.items():
        if analytic[name].shape != array.shape:
            raise ValueError(
                f"gradient {name!r} has shape {analytic[name].shape}, expected {array.shape}"
            )


def sampled_gradient_errors(loss_fn, arrays, analytic, rng, n_entries=24, h=1e-6):
    """Relative error of a random subset of gradient entries, per named array.

    For each array, ``n_entries // 2`` entries are drawn among those where the analytic
    gradient is non-zero (with probability proportional to its magnitude) and the rest
    uniformly over the whole array (so a gradient that wrongly vanishes, or wrongly does
    not, shows); each is compared with its
    central difference. Cost: ``2 n_entries`` loss evaluations per array, whatever its size.

    Parameters
    ----------
    loss_fn : callable, ``loss_fn()`` -> scalar, reading the arrays live.
    arrays : dict name -> float64 ndarray (perturbed in place, restored).
    analytic : dict name -> ndarray of the same shapes.
    rng : numpy.random.Generator choosing the entries.
    n_entries : entries per array (all of them if the array is smaller).

    Returns
    -------
    dict name -> float relative error over the chosen entries (``relative_error``).
    """
    _check_gradient_pairs(arrays, analytic)
    errors = {}
    for name, array in arrays.items():
        flat_x = _flat_view(name, array)
        flat_analytic = np.asarray(analytic[name], dtype=np.float64).reshape(-1)
        if flat_x.size <= n_entries:
            chosen = np.arange(flat_x.size)
        else:
            support = np.flatnonzero(flat_analytic)
            # Drawn with probability proportional to |gradient|, so that (as in the norm of
            # the full check) the entries that carry the gradient dominate the error, not
            # entries so small that the central difference's rounding (~1e-10) swamps them.
            magnitude = np.abs(flat_analytic[support])
            from_support = rng.choice(support, size=min(n_entries // 2, support.size), replace=False,
                                      p=magnitude / magnitude.sum())
            uniform = rng.choice(flat_x.size, size=n_entries - from_support.size, replace=False)
            chosen = np.unique(np.concatenate([from_support, uniform]))
        numeric = np.array([_central_difference(loss_fn, flat_x, i, h) for i in chosen])
        errors[name] = relative_error(flat_analytic[chosen], numeric)
    return errors


def directional_derivative_errors(loss_fn, arrays, analytic, rng, n_directions=2, h=1e-6):
    """Worst relative error of directional derivatives against ``<grad, v>``, per named array.

    For each array and each of ``n_directions`` Gaussian directions ``v`` (the array's
    shape), compares ``(f(x + h v) - f(x - h v)) / 2h`` with ``sum(grad * v)``; the error
    of one direction is ``|a - n| / (|a| + |n|)`` (0 if both are 0). The array is
    restored bit for bit from a copy afterwards. Cost: ``2 n_directions`` loss
    evaluations and a few passes over the array.

    Returns
    -------
    dict name -> float, the largest error over the directions.
    """
    _check_gradient_pairs(arrays, analytic)
    errors = {}
    for name, array in arrays.items():
        _flat_view(name, array)
        saved = array.copy()
        worst = 0.0
        for _ in range(n_directions):
            direction = rng.standard_normal(array.shape)
            expected = float(np.sum(np.asarray(analytic[name], dtype=np.float64) * direction))
            try:
                np.add(saved, h * direction, out=array)
                f_plus = float(loss_fn())
                np.subtract(saved, h * direction, out=array)
                f_minus = float(loss_fn())
            finally:
                np.copyto(array, saved)
            numeric = (f_plus - f_minus) / (2.0 * h)
            worst = max(worst, relative_error(np.array([expected]), np.array([numeric])))
        errors[name] = worst
    return errors


def relative_error(analytic, numeric):
    """Norm-wise relative error ``||a - n|| / max(||a|| + ||n||, 1e-300)``.

    Measured over the whole array (not elementwise), so entries whose true
    gradient is ~0 do not blow up the ratio; a single wrong entry still shows.
    Two all-zero arrays have error 0.
    """
    analytic = np.asarray(analytic, dtype=np.float64)
    numeric = np.asarray(numeric, dtype=np.float64)
    if analytic.shape != numeric.shape:
        raise ValueError(f"shape mismatch: analytic {analytic.shape} vs numeric {numeric.shape}")
    denominator = np.linalg.norm(analytic) + np.linalg.norm(numeric)
    if denominator == 0.0:
        return 0.0
    return float(np.linalg.norm(analytic - numeric) / denominator)


def gradient_errors(loss_fn, arrays, analytic, h=1e-6):
    """Relative error between analytic and numerical gradients, per named array.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn()`` returns the scalar loss, reading the arrays in ``arrays`` live.
    arrays : dict name -> ndarray (float64)
        The inputs/parameters to differentiate with respect to (perturbed in place).
    analytic : dict name -> ndarray
        The gradients produced by the backward pass, same keys and shapes.

    Returns
    -------
    dict name -> float relative error
    """
    _check_gradient_pairs(arrays, analytic)
    errors = {}
    for name, array in arrays.items():
        errors[name] = relative_error(analytic[name], numerical_gradient(loss_fn, array, h))
    return errors


def check_module_gradients(module, x, rng, h=1e-6):
    """Gradient-check a module (``forward``/``backward``/``params``/``grads``).

    A random upstream gradient ``dout ~ N(0, 1)`` of the output's shape is drawn
    from ``rng``; the scalar checked is ``sum(module.forward(x) * dout)``. The
    module's forward must be deterministic between calls (e.g. dropout with its
    mask frozen, or eval mode).

    Parameters
    ----------
    module : object with forward(x) -> out, backward(dout) -> dx, params, grads
    x : ndarray, float64 input
    rng : numpy.random.Generator

    Returns
    -------
    dict name -> relative error, with key ``"x"`` for the input and one key per
    parameter name.
    """
    _require_float64("x", x)
    for name, value in module.params.items():
        _require_float64(f"params[{name!r}]", value)
    x = x.copy()  # perturbing it in place must not touch the caller's array
    out = module.forward(x)
    dout = rng.standard_normal(out.shape)
    dx = module.backward(dout)
    analytic = {"x": dx.copy()}
    analytic.update({name: grad.copy() for name, grad in module.grads.items()})
    arrays = {"x": x, **module.params}
    return gradient_errors(lambda: np.sum(module.forward(x) * dout), arrays, analytic, h)
