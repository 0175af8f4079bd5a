"""The torch backend of the one training loop: train an npsoftmax model's torch twin.

    from npsoftmax.torch_backend import TorchBackend
    trainer.backend = TorchBackend(trainer.model, trainer.optimizer, device="cuda")
    trainer.fit()          # same batches, schedules, evaluation and history as the NumPy run

Needs PyTorch (``pip install torch==2.13.0`` for the CPU build); imported only by code
that asks for it, so the package works without torch. The twin is built with
``torch_adapter.to_torch`` (same layers, same initial weights) and trained with the
``torch.optim`` twin of the npsoftmax optimizer; the :class:`~npsoftmax.train.Trainer`
keeps the data order, the learning-rate and temperature schedules and the evaluation,
so a torch run and a NumPy run differ only in who does the arithmetic.
"""

import os
import time

import torch

from .backend import Backend, NonFiniteFeatures, StepResult
from .torch_adapter import copy_from_torch, copy_to_torch, head_loss, to_torch, to_torch_optimizer


class TorchBackend(Backend):
    """Backend protocol (see ``npsoftmax.backend``) over ``to_torch(model)`` on ``device``.

    One step mirrors the NumPy backend's: body forward, noise-free predictions, the head's
    forward + backward timed on detached features (so ``head_seconds`` is the head's share,
    predictions excluded), then the body's backward from the features' gradient and the
    optimizer step. Checkpoints for an exact resume are not supported (the torch optimizer
    state is not saved); the trainer still writes history and best weights, copied back
    into the npsoftmax model.
    """

    name = "torch"
    supports_resume = False

    def __init__(self, model, optimizer, device="cpu"):
        self.numpy_model = model
        self.device = torch.device(device)
        self.model = to_torch(model, device=self.device)
        self.optimizer = to_torch_optimizer(optimizer, self.model, model)

    def _synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self, x, y, noise=None):
        """x (B, C, H, W), y (B,) numpy -> StepResult; ``noise`` fixes the Gumbel head's draw (parity)."""
        x = torch.from_numpy(x).to(self.device)
        y = torch.from_numpy(y).to(self.device)
        if noise is not None:
            noise = torch.from_numpy(noise).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        features = self.model.body(x)
        head_input = features.detach().requires_grad_(True)
        if not bool(torch.isfinite(head_input).all()):
            raise NonFiniteFeatures("the features reaching the head hold NaN or inf")
        with torch.no_grad():
            predictions = self.model.head.predict(head_input)
        self._synchronize()
        start = time.perf_counter()
        loss = head_loss(self.model.head, head_input, y, noise)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
        self._synchronize()
        head_seconds = time.perf_counter() - start
        if finite:
            features.backward(head_input.grad)
            self.optimizer.step()
        return StepResult(loss.item(), predictions.cpu().numpy(), head_seconds)

    def log_prob(self, x):
        """x (N, C, H, W) numpy -> (N, K) numpy log-probabilities (no autograd)."""
        with torch.no_grad():
            return self.model.log_prob(torch.from_numpy(x).to(self.device)).cpu().numpy()

    def apply_schedule(self, values):
        """Set this step's scheduled ``lr`` (and Gumbel ``tau``) on the torch side."""
        if "lr" in values:
            for group in self.optimizer.param_groups:
                group["lr"] = group.get("lr_scale", 1.0) * values["lr"]
        if "tau" in values:
            self.model.head.tau = values["tau"]

    def sync_to_numpy(self):
        """Copy the twin's parameters and buffers into the npsoftmax model (npsoftmax names, layouts)."""
        copy_from_torch(self.model, self.numpy_model)

    def sync_from_numpy(self):
        """Copy the npsoftmax model's parameters and buffers into the twin."""
        copy_to_torch(self.numpy_model, self.model)

    def save_native(self, run_dir):
        """The twin's ``state_dict`` as ``run_dir/model.pt``; returns the path."""
        path = os.path.join(run_dir, "model.pt")
        torch.save(self.model.state_dict(), path)
        return path

