"""The training loop: epochs, evaluation, metrics history, checkpoints, resume.

One :class:`Trainer` step, for a batch of ``B`` images::

    uint8 (B, H, W, C) --normalize--> x (B, C, H, W) float --augment--> x
    predictions = head.predict(body(x))            # train accuracy, noise-free
    loss = model.forward(x, y)                     # mean NLL of the head
    model.backward()                               # fills model.grads
    optimizer.step(model.grads)                    # updates model.params in place

The dataset stays uint8 in memory; every batch is converted on the fly, so a
50,000-image CIFAR-100 training set costs 150 MB, not 600 MB of float32.

After every epoch the trainer evaluates on the test split, appends a record to
``run_dir/history.json`` and atomically rewrites ``run_dir/checkpoint.npz``.
Everything random (shuffling, augmentation, dropout masks, Gumbel noise) comes
from Generators whose states are saved in the checkpoint, so a resumed run
produces the same history as an uninterrupted one.
"""

import json
import math
import os
import time

import numpy as np

from .checkpoint import copy_into, generator_state, load_checkpoint, restore_generator, save_checkpoint
from .data.transforms import augment as augment_batch
from .data.transforms import channel_mean_std, normalize
from .metrics import classification_report, confusion_matrix
from .optim import Scheduler
from .validation import check_dtype, check_int

CHECKPOINT_NAME = "checkpoint.npz"
HISTORY_NAME = "history.json"


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


def find_generators(model):
    """All ``numpy.random.Generator`` attributes of the model's head and body modules.

    Returns dict name -> Generator (e.g. ``"head.rng"``, ``"body.7.rng"``): the
    sources of randomness inside the model (Gumbel noise, dropout masks) whose
    states a checkpoint must carry for an exact resume.
    """
    found = {}

    def collect(prefix, obj):
        for attribute, value in vars(obj).items():
            if isinstance(value, np.random.Generator):
                found[f"{prefix}.{attribute}"] = value

    collect("head", model.head)
    for index, module in enumerate(model.body):
        collect(f"body.{index}", module)
    return found


class Trainer:
    """Train a :class:`~npsoftmax.models.Classifier` on an image dataset.

    Parameters
    ----------
    model : Classifier
    optimizer : npsoftmax.optim.Optimizer built on ``model.params``
    dataset : npsoftmax.data ImageDataset (``train``/``test`` splits of uint8 NHWC images)
    epochs : int
    batch_size : int
    run_dir : str or Path
        Where ``history.json`` and ``checkpoint.npz`` go.
    seed : int
        Seeds shuffling and augmentation.
    augment : bool
        Random crop (``crop_pad`` zero padding) + horizontal flip on training batches.
    dtype : float32 (training) or float64
    lr_schedule, tau_schedule : callables step -> value, optional
        Applied before every optimizer step (tau only for heads that have ``tau``).
    coarse_of_fine : (K,) int array, optional
        If given, history also records superclass (coarse) top-1 accuracy.
    progress : bool
        Show a tqdm progress bar with loss, accuracy and images/s.
    on_epoch_end : callable(trainer, record), optional
        Called after each epoch's checkpoint is written.
    """

    def __init__(self, model, optimizer, dataset, *, epochs, batch_size=128, run_dir="runs/default", seed=0,
                 augment=False, crop_pad=4, dtype=np.float32, lr_schedule=None, tau_schedule=None,
                 coarse_of_fine=None, eval_batch_size=500, progress=True, on_epoch_end=None):
        self.model = model
        self.optimizer = optimizer
        self.dataset = dataset
        self.epochs = check_int(epochs, "epochs")
        self.batch_size = check_int(batch_size, "batch_size")
        self.eval_batch_size = check_int(eval_batch_size, "eval_batch_size")
        self.run_dir = os.fspath(run_dir)
        self.augment = augment
        self.crop_pad = crop_pad
        self.dtype = check_dtype(dtype)
        self.coarse_of_fine = coarse_of_fine
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.scheduler = Scheduler(
            optimizer if lr_schedule is not None else None, lr_schedule,
            model.head if tau_schedule is not None else None, tau_schedule,
        )
        # Normalisation statistics come from the training split only.
        self.mean, self.std = channel_mean_std(dataset.train.images)
        self.rng = np.random.default_rng(seed)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.history = []

    # -- paths -------------------------------------------------------------------
    @property
    def checkpoint_path(self):
        return os.path.join(self.run_dir, CHECKPOINT_NAME)

    @property
    def history_path(self):
        return os.path.join(self.run_dir, HISTORY_NAME)

    @property
    def steps_per_epoch(self):
        return math.ceil(len(self.dataset.train) / self.batch_size)

    # -- data --------------------------------------------------------------------
    def _to_input(self, images, training):
        x = normalize(images, self.mean, self.std, dtype=self.dtype)
        if training and self.augment:
            x = augment_batch(x, rng=self.rng, pad=self.crop_pad)
        return x

    def batches(self):
        """One epoch of training batches ``(x (B, C, H, W), y (B,))``, shuffled and augmented.

        Draws from ``self.rng`` (shuffle, then each batch's augmentation), so the
        sequence is fixed by the seed and by how many epochs came before; the torch
        trainer consumes this same stream to see exactly the same batches.
        """
        split = self.dataset.train
        order = self.rng.permutation(len(split))
        for first in range(0, len(split), self.batch_size):
            index = order[first:first + self.batch_size]
            yield self._to_input(split.images[index], training=True), split.labels[index]

    # -- one epoch -----------------------------------------------------------------
    def train_epoch(self):
        """Run one pass over the shuffled training split; returns the epoch's training figures."""
        model = self.model.train()
        model.head_seconds = 0.0
        total_loss, total_correct, seen = 0.0, 0, 0
        bar = _progress_bar(self.steps_per_epoch, f"epoch {self.epoch + 1}/{self.epochs}", self.progress)
        start = time.perf_counter()
        for x, y in self.batches():
            values = self.scheduler.apply(self.step)
            # predict() first: it must not disturb the cache forward() leaves for backward().
            features = model.body.forward(x)
            predictions = model.head.predict(features)
            loss = model.head_forward(features, y)
            if not np.isfinite(loss):
                raise TrainingDiverged(
                    f"the training loss became {loss} at epoch {self.epoch + 1}, step {self.step} "
                    f"(lr={self.optimizer.lr:g}{', tau=%g' % values['tau'] if 'tau' in values else ''}). "
                    f"Try a smaller learning rate; the last good checkpoint is {self.checkpoint_path}"
                )
            model.backward()
            self.optimizer.step(model.grads)
            self.step += 1
            total_loss += loss * len(y)
            total_correct += int(np.sum(predictions == y))
            seen += len(y)
            if bar is not None:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{total_correct / seen:.3f}",
                                img_s=f"{seen / elapsed:.0f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        return {
            "train_loss": total_loss / seen,
            "train_top1": total_correct / seen,
            "epoch_seconds": seconds,
            "head_seconds": model.head_seconds,
            "head_ms_per_batch": 1e3 * model.head_seconds / self.steps_per_epoch,
            "images_per_second": seen / seconds,
        }

    def evaluate(self, split=None):
        """Exact evaluation (eval mode, no noise) on ``split`` (default: the test split).

        Returns (record, confusion) where record has ``loss`` (mean NLL), ``top1``,
        ``top5``, ``macro_precision``, ``macro_recall``, ``macro_f1`` (and
        ``coarse_top1`` when ``coarse_of_fine`` is set) and confusion is (K, K).
        """
        split = self.dataset.test if split is None else split
        model = self.model.eval()
        log_probs = []
        for first in range(0, len(split), self.eval_batch_size):
            x = self._to_input(split.images[first:first + self.eval_batch_size], training=False)
            log_probs.append(model.log_prob(x))
        log_probs = np.concatenate(log_probs)
        labels = split.labels
        # predict() is defined as the exact argmax of log_prob (tested for every head).
        predictions = np.argmax(log_probs, axis=1)
        n_classes = log_probs.shape[1]
        report = classification_report(labels, predictions, n_classes, scores=log_probs,
                                       top_k=min(5, n_classes))
        report.pop("n_samples")
        top_k_key = f"top{min(5, n_classes)}"
        record = {"loss": float(-np.mean(log_probs[np.arange(len(labels)), labels])), **report}
        record["top5"] = record.pop(top_k_key)
        if self.coarse_of_fine is not None:
            record["coarse_top1"] = float(np.mean(self.coarse_of_fine[predictions] == self.coarse_of_fine[labels]))
        model.train()
        return record, confusion_matrix(labels, predictions, n_classes)

    # -- the loop --------------------------------------------------------------------
    def fit(self, resume=False):
        """Train until ``epochs`` epochs are complete; returns the history (list of dicts).

        With ``resume=True`` and a checkpoint in ``run_dir``, continue from it.
        """
        os.makedirs(self.run_dir, exist_ok=True)
        if resume and os.path.exists(self.checkpoint_path):
            self.load(self.checkpoint_path)
        while self.epoch < self.epochs:
            record = {"epoch": self.epoch + 1, "lr": float(self.optimizer.lr)}
            if hasattr(self.model.head, "tau"):
                record["tau"] = float(self.model.head.tau)
            record.update(self.train_epoch())
            test_record, self.last_confusion = self.evaluate()
            record.update({f"test_{key}": value for key, value in test_record.items()})
            self.epoch += 1
            self.history.append(record)
            self._write_history()
            self.save(self.checkpoint_path)
            if self.on_epoch_end is not None:
                self.on_epoch_end(self, record)
        return self.history

    # -- persistence -----------------------------------------------------------------
    def _write_history(self):
        temporary = self.history_path + ".tmp"
        with open(temporary, "w") as stream:
            json.dump(self.history, stream, indent=1)
        os.replace(temporary, self.history_path)

    def save(self, path):
        """Checkpoint params, buffers, optimizer state, every RNG state, epoch, step and history."""
        generators = {"trainer": self.rng, **find_generators(self.model)}
        meta = {
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "rng_states": {name: generator_state(generator) for name, generator in generators.items()},
            "head_tau": float(self.model.head.tau) if hasattr(self.model.head, "tau") else None,
        }
        save_checkpoint(path, params=self.model.params, buffers=self.model.buffers,
                        optimizer_state=self.optimizer.state_dict(), meta=meta)

    def load(self, path):
        """Restore a checkpoint written by :meth:`save` into this trainer, in place."""
        checkpoint = load_checkpoint(path)
        copy_into(self.model.params, checkpoint["params"], "params")
        copy_into(self.model.buffers, checkpoint["buffers"], "buffers")
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        meta = checkpoint["meta"]
        generators = {"trainer": self.rng, **find_generators(self.model)}
        if set(generators) != set(meta["rng_states"]):
            raise ValueError(f"checkpoint {path} RNGs {sorted(meta['rng_states'])} do not match the model's "
                             f"{sorted(generators)}")
        for name, generator in generators.items():
            restore_generator(generator, meta["rng_states"][name])
        if meta.get("head_tau") is not None:
            self.model.head.tau = meta["head_tau"]
        self.epoch, self.step, self.history = meta["epoch"], meta["step"], meta["history"]


def _progress_bar(total, description, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="batch", leave=True, dynamic_ncols=True)
