"""What the :class:`~npsoftmax.train.Trainer` needs from the thing that computes: the backend protocol.

The trainer owns the loop (epochs, batches, schedules, evaluation, history, checkpoints);
a backend owns one training step and the model's log-probabilities. The NumPy backend
(here) runs the npsoftmax model; the torch backend (``npsoftmax.torch_backend``, only
when torch is installed) runs its torch twin on the same batches. Both provide::

    backend.train_step(x, y) -> StepResult       # forward, backward, optimizer step
    backend.log_prob(x) -> (N, K) numpy array     # exact, in eval mode
    backend.train() / backend.eval()
    backend.apply_schedule(values)                # {"lr": ..., "tau": ...} for this step
    backend.sync_to_numpy()                       # make model.params/buffers current (checkpoints)
    backend.sync_from_numpy()                     # after the trainer wrote into model.params
    backend.supports_resume                       # can a checkpoint of model + optimizer resume it?

``x`` is a float batch (B, C, H, W) and ``y`` (B,) int labels, both numpy.
"""

import time
from typing import NamedTuple

import numpy as np


class StepResult(NamedTuple):
    """One training step: the batch's mean loss, the (B,) noise-free predictions made before the
    update, and the seconds spent in the head's forward + backward (the predictions excluded)."""
    loss: float
    predictions: np.ndarray
    head_seconds: float


class NonFiniteFeatures(FloatingPointError):
    """The body produced NaN/inf features (the trainer reports it as divergence)."""


class Backend:
    """What both backends share: ``self.model`` (whatever computes) switched between modes."""

    name = "base"
    supports_resume = False

    def train(self):
        self.model.train()
        return self

    def eval(self):
        self.model.eval()
        return self


class NumpyBackend(Backend):
    """Train and evaluate an npsoftmax ``Classifier`` with its npsoftmax optimizer.

    One step, for a batch ``x (B, C, H, W)``, ``y (B,)``::

        h = body(x)                         # (B, D) features
        predictions = head.predict(h)       # before the update: the batch's train accuracy
        loss = head.forward(h, y); dh = head.backward()     # timed: the head's share
        body.backward(dh); optimizer.step(model.grads)       # updates model.params in place
    """

    name = "numpy"
    supports_resume = True

    def __init__(self, model, optimizer):
        self.model = model
        self.optimizer = optimizer

    def train_step(self, x, y):
        model = self.model
        features = model.body.forward(x)
        if not np.all(np.isfinite(features)):
            raise NonFiniteFeatures("the features reaching the head hold NaN or inf")
        # predict() first: it must not disturb the cache forward() leaves for backward().
        predictions = model.head.predict(features)
        start = time.perf_counter()
        loss = model.head.forward(features, y)
        dh = model.head.backward() if np.isfinite(loss) else None
        head_seconds = time.perf_counter() - start
        if dh is not None:
            model.body.backward(dh)
            self.optimizer.step(model.grads)
        return StepResult(float(loss), predictions, head_seconds)

    def log_prob(self, x):
        return self.model.log_prob(x)

    def apply_schedule(self, values):
        """The trainer's Scheduler already wrote ``values`` into the optimizer and head."""

    def sync_to_numpy(self):
        """The npsoftmax model is the state: nothing to copy."""

    def sync_from_numpy(self):
        """The npsoftmax model is the state: nothing to copy."""
