"""Optimizers (SGD, Adam) over the ``params``/``grads`` protocol, and step-indexed schedules.

The parameter protocol (see npsoftmax.layers.Module): a module exposes ``params``, a dict name -> live
ndarray, and ``grads``, a dict with the same keys filled by ``backward``. Optimizers
keep references to the ``params`` arrays and update them IN PLACE, so the layer
sees every step; ``grads`` may be fresh arrays after each backward, so they are
passed to ``step(grads)`` each time and are never modified.

The update rules are those of ``torch.optim.SGD`` and ``torch.optim.Adam``
(defaults: no dampening, no AMSGrad, L2 weight decay added to the gradient). A
float32 parameter stays float32: hyperparameters are python floats, which NumPy
casts to the array's dtype, and every update is written with in-place operators.

Schedules are pure functions of the step index, ``schedule(step) -> float``, so a
resumed run only needs the step counter. ``Scheduler``
writes the learning rate into ``optimizer.lr`` and the Gumbel temperature into
``head.tau`` at a given step: one hook for both annealings.

``lr_scales={name: factor}`` gives some parameters a learning rate ``factor`` times the
scheduled ``lr`` (torch: a param group whose lr is ``factor * lr``); the CLI's
``--head-lr-scale`` uses it for the head's parameters. It is a construction setting,
not part of ``state_dict`` (the CLI records it in the run's identity).

    >>> import numpy as np
    >>> w = np.ones(3, dtype=np.float32)
    >>> opt = SGD({"w": w}, lr=0.5, momentum=0.9)
    >>> opt.step({"w": np.full(3, 2.0, dtype=np.float32)})
    >>> w                                         # 1 - 0.5 * 2, updated in place
    array([0., 0., 0.], dtype=float32)
"""

import math
from collections.abc import Mapping

import numpy as np

from .validation import check_int, check_real


def _scalar_from_state(state, key):
    """Fetch ``state[key]`` as a python scalar (np.load returns 0-d arrays)."""
    if key not in state:
        raise ValueError(f"state dict is missing the entry {key!r}")
    value = np.asarray(state[key])
    if value.shape != ():
        raise ValueError(f"state dict entry {key!r} must be a scalar, got shape {value.shape}")
    return value.item()


# ----------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------

class Optimizer:
    """Shared machinery: parameter bookkeeping, gradient validation, the step counter, lr.

    Subclasses implement ``_update(name, param, grad)`` (in place), ``_hyperparameters()``,
    ``_configure(**hyperparameters)`` and name their per-parameter state buffers in
    ``_buffer_kinds``; the buffers live in ``self.state[kind][name]``.
    """

    _buffer_kinds = ()

    def __init__(self, params, lr_scales=None):
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict name -> ndarray, got {type(params).__name__}")
        if len(params) == 0:
            raise ValueError("params is empty: the optimizer has nothing to update")
        for name, param in params.items():
            if not isinstance(name, str):
                raise TypeError(f"params keys must be str, got {type(name).__name__} {name!r}")
            if not isinstance(param, np.ndarray):
                raise TypeError(f"params[{name!r}] must be an ndarray, got {type(param).__name__}")
            if not np.issubdtype(param.dtype, np.floating):
                raise TypeError(f"params[{name!r}] must be a floating array, got dtype {param.dtype}")
            if not param.flags.writeable:
                raise ValueError(f"params[{name!r}] is read-only; the optimizer updates it in place")
        # A new dict, the same arrays: the key set is fixed, the arrays are the layer's own.
        self.params = dict(params)
        self.lr_scales = self._check_lr_scales(lr_scales)
        self.step_count = 0
        self.state = {kind: {} for kind in self._buffer_kinds}

    def _check_lr_scales(self, lr_scales):
        """``lr_scales``: None or dict param name -> finite factor > 0 (a torch param group's lr ratio)."""
        if lr_scales is None:
            return {}
        if not isinstance(lr_scales, Mapping):
            raise TypeError(f"lr_scales must be a dict param name -> float, got {type(lr_scales).__name__}")
        unknown = sorted(set(lr_scales) - set(self.params), key=str)
        if unknown:
            raise ValueError(f"lr_scales names {unknown}, which are not params (params: {sorted(self.params)})")
        scales = {}
        for name, scale in lr_scales.items():
            scale = check_real(scale, f"lr_scales[{name!r}]", minimum=0.0)
            if scale == 0.0:
                raise ValueError(f"lr_scales[{name!r}] must be > 0, got 0.0 (leave a param out of params to freeze it)")
            scales[name] = scale
        return scales

    def _step_lr(self, name):
        """The learning rate of param ``name`` this step: ``lr * lr_scales.get(name, 1)``."""
        scale = self.lr_scales.get(name)
        return self.lr if scale is None else self.lr * scale

    @property
    def lr(self):
        """Learning rate (python float >= 0); settable, e.g. by a schedule."""
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = check_real(value, "lr", minimum=0.0)

    def _check_grads(self, grads):
        """Check ``grads`` has exactly the params' keys, shapes and dtypes."""
        if not isinstance(grads, Mapping):
            raise TypeError(f"grads must be a dict name -> ndarray, got {type(grads).__name__}")
        missing = sorted(set(self.params) - set(grads))
        extra = sorted(set(grads) - set(self.params), key=str)
        if missing or extra:
            raise ValueError(
                f"grads keys must equal params keys; missing from grads: {missing}, "
                f"not in params: {extra}")
        for name, param in self.params.items():
            grad = grads[name]
            if not isinstance(grad, np.ndarray):
                raise TypeError(f"grads[{name!r}] must be an ndarray, got {type(grad).__name__}")
            if grad.shape != param.shape:
                raise ValueError(
                    f"grads[{name!r}] has shape {grad.shape}, expected the param's shape {param.shape}")
            if grad.dtype != param.dtype:
                raise TypeError(
                    f"grads[{name!r}] has dtype {grad.dtype}, expected the param's dtype {param.dtype}")

    def step(self, grads):
        """Apply one update to every parameter, in place.

        Args:
            grads: dict with exactly the keys of ``params``; ``grads[name]`` has the
                shape and dtype of ``params[name]``. Not modified.
        """
        self._check_grads(grads)
        self.step_count += 1
        for name, param in self.params.items():
            self._update(name, param, grads[name])

    def _update(self, name, param, grad):
        raise NotImplementedError

    def _hyperparameters(self):
        raise NotImplementedError

    def _configure(self, **hyperparameters):
        raise NotImplementedError

    def state_dict(self):
        """Everything needed to resume, as a flat dict savable with ``np.savez(path, **d)``.

        Keys: ``optimizer`` (class name), ``step``, the hyperparameters (``lr``, ...),
        and one ``"<buffer kind>/<param name>"`` array per state buffer (copies).
        """
        state = {"optimizer": type(self).__name__, "step": self.step_count}
        state.update(self._hyperparameters())
        for kind, buffers in self.state.items():
            for name, buffer in buffers.items():
                state[f"{kind}/{name}"] = buffer.copy()
        return state

    def load_state_dict(self, state):
        """Restore the step counter, the hyperparameters and the buffers from ``state_dict()``.

        Accepts the dict itself or ``np.load`` of a saved ``.npz``. Like torch, the saved
        hyperparameters (lr included) replace the current ones. Buffers are copied and cast
        to each parameter's dtype; shapes must match.
        """
        kind_name = str(np.asarray(state.get("optimizer", "")))
        if kind_name != type(self).__name__:
            raise ValueError(
                f"state dict was saved by optimizer {kind_name!r}, cannot load it into "
                f"{type(self).__name__}")
        scalar_keys = {"optimizer", "step", *self._hyperparameters()}
        hyperparameters = {key: _scalar_from_state(state, key) for key in self._hyperparameters()}
        step_count = check_int(_scalar_from_state(state, "step"), "state['step']", minimum=0)

        buffers = {kind: {} for kind in self._buffer_kinds}
        for key in state:
            if key in scalar_keys:
                continue
            kind, _, name = key.partition("/")
            if kind not in buffers or name not in self.params:
                raise ValueError(
                    f"state dict entry {key!r} is not a buffer of this optimizer "
                    f"(expected '<kind>/<param name>' with kind in {list(self._buffer_kinds)} "
                    f"and a param name in {sorted(self.params)})")
            param = self.params[name]
            value = np.asarray(state[key])
            if value.shape != param.shape:
                raise ValueError(
                    f"state dict entry {key!r} has shape {value.shape}, expected {param.shape}")
            buffers[kind][name] = np.array(value, dtype=param.dtype, copy=True)
        for kind, by_name in buffers.items():
            if by_name and set(by_name) != set(self.params):
                missing = sorted(set(self.params) - set(by_name))
                raise ValueError(f"state dict lacks {kind!r} buffers for params {missing}")

        # A dict that fails validation leaves the optimizer as it was.
        previous = self._hyperparameters()
        try:
            self._configure(**hyperparameters)
            self._check_loaded_buffers(buffers, step_count)
        except (TypeError, ValueError):
            self._configure(**previous)
            raise
        self.step_count = step_count
        self.state = buffers

    def _check_loaded_buffers(self, buffers, step_count):
        """Hook for a subclass to reject buffers inconsistent with the step count."""

    def __repr__(self):
        settings = ", ".join(f"{key}={value!r}" for key, value in self._hyperparameters().items())
        if self.lr_scales:
            settings += f", lr_scales={self.lr_scales!r}"
        return f"{type(self).__name__}({len(self.params)} params, {settings}, step={self.step_count})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    The update of ``torch.optim.SGD`` (dampening 0), for each parameter p with gradient g:

        d = g + weight_decay * p
        if momentum > 0:
            buf = d                      at the first step (not 0: no warm-up bias)
            buf = momentum * buf + d     afterwards
            d   = d + momentum * buf     if nesterov  (look ahead along the new velocity)
            d   = buf                    otherwise
        p -= lr * d

    Args:
        params: dict name -> float ndarray, updated in place.
        lr: learning rate >= 0.
        momentum: >= 0; 0 disables the velocity buffers.
        nesterov: Nesterov momentum; requires momentum > 0.
        weight_decay: L2 coefficient >= 0 (added to the gradient, i.e. not decoupled).
    """

    _buffer_kinds = ("momentum_buffer",)

    def __init__(self, params, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0, lr_scales=None):
        super().__init__(params, lr_scales)
        self._configure(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)

    def _configure(self, lr, momentum, nesterov, weight_decay):
        momentum = check_real(momentum, "momentum", minimum=0.0)
        weight_decay = check_real(weight_decay, "weight_decay", minimum=0.0)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__} {nesterov!r}")
        if nesterov and momentum == 0.0:
            raise ValueError(f"nesterov=True requires momentum > 0, got momentum={momentum!r}")
        self.lr = lr
        self.momentum = momentum
        self.nesterov = bool(nesterov)
        self.weight_decay = weight_decay

    def _hyperparameters(self):
        return dict(lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                    weight_decay=self.weight_decay)

    def _check_loaded_buffers(self, buffers, step_count):
        has_buffers = bool(buffers["momentum_buffer"])
        if self.momentum > 0 and step_count > 0 and not has_buffers:
            raise ValueError(
                f"state dict has step={step_count} and momentum={self.momentum} but no "
                "momentum_buffer entries")

    def _update(self, name, param, grad):
        direction = grad
        if self.weight_decay != 0.0:
            direction = grad + self.weight_decay * param          # new array: grad is not ours
        if self.momentum != 0.0:
            buffers = self.state["momentum_buffer"]
            if name not in buffers:
                buffers[name] = np.array(direction, copy=True)
            else:
                buffer = buffers[name]
                buffer *= self.momentum
                buffer += direction
            buffer = buffers[name]
            direction = direction + self.momentum * buffer if self.nesterov else buffer
        param -= self._step_lr(name) * direction


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction, as ``torch.optim.Adam`` (no AMSGrad).

    For each parameter p with gradient g, at step t = 1, 2, ...:

        g  = g + weight_decay * p                      (L2, added to the gradient)
        m  = beta1 * m + (1 - beta1) * g               (first moment,  m_0 = 0)
        v  = beta2 * v + (1 - beta2) * g * g           (second moment, v_0 = 0)
        p -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    Dividing by (1 - beta**t) undoes the pull of the zero initial moments towards 0;
    eps is added after the bias correction of sqrt(v), as torch does.

    Args:
        params: dict name -> float ndarray, updated in place.
        lr: learning rate >= 0.
        betas: (beta1, beta2), each in [0, 1).
        eps: >= 0, guards the division.
        weight_decay: L2 coefficient >= 0 (for decoupled decay, AdamW, this is not it).
    """

    _buffer_kinds = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, lr_scales=None):
        super().__init__(params, lr_scales)
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        self._configure(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        # Zero moments from the start: identical to torch's lazily created zeros.
        for name, param in self.params.items():
            self.state["exp_avg"][name] = np.zeros_like(param)
            self.state["exp_avg_sq"][name] = np.zeros_like(param)

    def _configure(self, lr, beta1, beta2, eps, weight_decay):
        beta1 = check_real(beta1, "betas[0]", minimum=0.0, maximum=1.0, maximum_inclusive=False)
        beta2 = check_real(beta2, "betas[1]", minimum=0.0, maximum=1.0, maximum_inclusive=False)
        eps = check_real(eps, "eps", minimum=0.0)
        weight_decay = check_real(weight_decay, "weight_decay", minimum=0.0)
        self.lr = lr
        self.beta1, self.beta2 = beta1, beta2
        self.eps = eps
        self.weight_decay = weight_decay

    @property
    def betas(self):
        """(beta1, beta2)."""
        return (self.beta1, self.beta2)

    def _hyperparameters(self):
        return dict(lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                    weight_decay=self.weight_decay)

    def _check_loaded_buffers(self, buffers, step_count):
        for kind in self._buffer_kinds:
            if not buffers[kind]:
                raise ValueError(f"state dict has no {kind!r} buffers")

    def _update(self, name, param, grad):
        if self.weight_decay != 0.0:
            grad = grad + self.weight_decay * param              # new array: grad is not ours
        exp_avg = self.state["exp_avg"][name]
        exp_avg_sq = self.state["exp_avg_sq"][name]
        exp_avg *= self.beta1
        exp_avg += (1.0 - self.beta1) * grad
        exp_avg_sq *= self.beta2
        exp_avg_sq += (1.0 - self.beta2) * (grad * grad)

        t = self.step_count
        # Python floats: the bias corrections are computed once in float64 and applied in
        # the parameter's dtype.
        step_size = self._step_lr(name) / (1.0 - self.beta1 ** t)
        bias_correction2_sqrt = math.sqrt(1.0 - self.beta2 ** t)
        denominator = np.sqrt(exp_avg_sq) / bias_correction2_sqrt + self.eps
        param -= step_size * (exp_avg / denominator)


# ----------------------------------------------------------------------------------
# Schedules: step index -> value
# ----------------------------------------------------------------------------------

def _linear_warmup(base, step, warmup_steps):
    """Warm-up value at ``step < warmup_steps``: base * (step + 1) / warmup_steps.

    Counting from step + 1 makes the first step use base / warmup_steps (never a wasted
    zero-lr step) and step warmup_steps - 1 the full base value.
    """
    return base * (step + 1) / warmup_steps


class Schedule:
    """A value as a pure function of the 0-based step index: ``schedule(step) -> float``.

    ``step`` is the number of optimizer steps already taken, i.e. call ``schedule(t)``
    right before step t = 0, 1, 2, ...; no internal state, so resuming needs only t.
    """

    def __call__(self, step):
        return float(self.value(check_int(step, "step", minimum=0)))

    def value(self, step):
        raise NotImplementedError

    def __repr__(self):
        settings = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({settings})"


class ConstantSchedule(Schedule):
    """``value`` at every step."""

    def __init__(self, value):
        self.constant = check_real(value, "value")

    def value(self, step):
        return self.constant


class CosineSchedule(Schedule):
    """Linear warm-up, then half a cosine from ``base`` down to ``final``.

        t < W:        base * (t + 1) / W
        W <= t:       final + (base - final) * (1 + cos(pi * min(1, (t - W) / (T - W)))) / 2

    with W = warmup_steps and T = total_steps. The cosine starts at ``base`` at t = W
    and reaches ``final`` at t = T (as torch's CosineAnnealingLR with T_max = T - W);
    it stays at ``final`` after T.

    Args:
        base: peak value (finite, >= 0).
        total_steps: T >= 1, the length of warm-up plus decay.
        warmup_steps: 0 <= W < T.
        final: value reached at step T (finite, >= 0).
    """

    def __init__(self, base, total_steps, warmup_steps=0, final=0.0):
        self.base = check_real(base, "base", minimum=0.0)
        self.total_steps = check_int(total_steps, "total_steps", minimum=1)
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", minimum=0)
        if self.warmup_steps >= self.total_steps:
            raise ValueError(
                f"warmup_steps must be < total_steps={self.total_steps}, got {self.warmup_steps}")
        self.final = check_real(final, "final", minimum=0.0)

    def value(self, step):
        if step < self.warmup_steps:
            return _linear_warmup(self.base, step, self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final + (self.base - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


class StepSchedule(Schedule):
    """Linear warm-up, then ``base`` multiplied by ``gamma`` every ``step_size`` steps.

        t < W:        base * (t + 1) / W
        W <= t:       base * gamma ** ((t - W) // step_size)

    (torch's StepLR, counted from the end of the warm-up.)

    Args:
        base: initial value (finite, >= 0).
        step_size: decay period in steps, >= 1.
        gamma: multiplicative factor, finite and > 0.
        warmup_steps: W >= 0.
    """

    def __init__(self, base, step_size, gamma=0.1, warmup_steps=0):
        self.base = check_real(base, "base", minimum=0.0)
        self.step_size = check_int(step_size, "step_size", minimum=1)
        self.gamma = check_real(gamma, "gamma", minimum=0.0, minimum_inclusive=False)
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", minimum=0)

    def value(self, step):
        if step < self.warmup_steps:
            return _linear_warmup(self.base, step, self.warmup_steps)
        return self.base * self.gamma ** ((step - self.warmup_steps) // self.step_size)


class ExponentialTemperatureSchedule(Schedule):
    """Gumbel-softmax temperature annealing: ``tau_t = max(tau_min, tau0 * exp(-rate * t))``.

    (Jang et al. 2017.) Starts at tau0, decays exponentially, and is clamped at tau_min so
    the temperature never reaches 0 (where the relaxed sample's gradient 1/tau blows up).

    Args:
        tau0: initial temperature, finite and > 0.
        tau_min: floor, finite, 0 < tau_min <= tau0.
        rate: decay rate per step, finite and >= 0 (0 keeps tau0).
    """

    def __init__(self, tau0, tau_min, rate):
        self.tau0 = check_real(tau0, "tau0", minimum=0.0, minimum_inclusive=False)
        self.tau_min = check_real(tau_min, "tau_min", minimum=0.0, minimum_inclusive=False)
        if self.tau_min > self.tau0:
            raise ValueError(f"tau_min must be <= tau0={self.tau0!r}, got {self.tau_min!r}")
        self.rate = check_real(rate, "rate", minimum=0.0)

    def value(self, step):
        return max(self.tau_min, self.tau0 * math.exp(-self.rate * step))


# ----------------------------------------------------------------------------------
# One hook that applies the schedules
# ----------------------------------------------------------------------------------

class Scheduler:
    """Sets ``optimizer.lr`` and ``head.tau`` from their schedules at a given step.

    Args:
        optimizer: anything with a settable ``lr`` (an ``Optimizer``); needed iff lr_schedule.
        lr_schedule: callable ``step -> lr``.
        head: anything with a settable ``tau`` (the Gumbel head); needed iff tau_schedule.
        tau_schedule: callable ``step -> tau``, e.g. ``ExponentialTemperatureSchedule``.

    Call ``apply(t)`` before optimizer step t; it returns the values it set.
    """

    def __init__(self, optimizer=None, lr_schedule=None, head=None, tau_schedule=None):
        if lr_schedule is not None:
            if not callable(lr_schedule):
                raise TypeError(f"lr_schedule must be callable step -> float, got {lr_schedule!r}")
            if optimizer is None or not hasattr(optimizer, "lr"):
                raise ValueError(
                    f"lr_schedule needs an optimizer with an 'lr' attribute, got {optimizer!r}")
        if tau_schedule is not None:
            if not callable(tau_schedule):
                raise TypeError(f"tau_schedule must be callable step -> float, got {tau_schedule!r}")
            if head is None or not hasattr(head, "tau"):
                raise ValueError(
                    f"tau_schedule needs a head with a 'tau' attribute (the Gumbel head), "
                    f"got {type(head).__name__}")
        self.optimizer, self.lr_schedule = optimizer, lr_schedule
        self.head, self.tau_schedule = head, tau_schedule

    def apply(self, step):
        """Set lr and/or tau for step ``step``; returns ``{'lr': ..., 'tau': ...}`` (those set)."""
        step = check_int(step, "step", minimum=0)
        values = {}
        if self.lr_schedule is not None:
            values["lr"] = float(self.lr_schedule(step))
            self.optimizer.lr = values["lr"]
        if self.tau_schedule is not None:
            values["tau"] = float(self.tau_schedule(step))
            self.head.tau = values["tau"]
        return values

