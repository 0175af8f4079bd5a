"""The training loop: epochs, evaluation, metrics history, checkpoints, resume.

One :class:`Trainer` step, for a batch of ``B`` images::

    uint8 (B, H, W, C) --normalize--> x (B, C, H, W) float --augment--> x
    predictions = head.predict(body(x))            # train accuracy, noise-free
    loss = model.forward(x, y)                     # mean NLL of the head
    model.backward()                               # fills model.grads
    optimizer.step(model.grads)                    # updates model.params in place

The dataset stays uint8 in memory; every batch is converted on the fly, so a
50,000-image CIFAR-100 training set costs 150 MB, not 600 MB of float32.

After every epoch the trainer evaluates on the validation split (when the dataset
has one, see ``data.split_validation``) and on the test split, appends a record to
``run_dir/history.json`` and atomically rewrites ``run_dir/checkpoint.npz``. The
epoch with the best validation top-1 is kept as ``run_dir/best.npz`` (a weights file,
``npsoftmax.weights``): every choice is made on validation, the test split is only
reported. Everything random (shuffling, augmentation, dropout masks, Gumbel noise)
comes from Generators whose states are saved in the checkpoint, so a resumed run
produces the same history as an uninterrupted one.

A checkpoint also records the run's *identity* (head and its options, architecture,
optimizer, data, seed: whatever the caller passes as ``identity``); resuming with a
different identity raises :class:`RunMismatchError` naming every difference, so two
runs are never silently mixed. Parameters that became NaN/inf are never saved.
"""

import math
import os
import time

import numpy as np

from .backend import NonFiniteFeatures, NumpyBackend
from .checkpoint import (CheckpointError, copy_into, generator_state, load_checkpoint, non_finite_entries,
                         remove_stale_temporaries, restore_generator, save_checkpoint, write_json)
from .data.transforms import augment as augment_batch
from .data.transforms import channel_mean_std, normalize
from .metrics import evaluation_record
from .optim import Scheduler
from .validation import check_dtype, check_int
from .weights import save_weights

CHECKPOINT_NAME = "checkpoint.npz"
BEST_NAME = "best.npz"
HISTORY_NAME = "history.json"
#: What ``Trainer.load`` requires in a checkpoint's meta entry.
REQUIRED_META = ("epoch", "step", "history", "rng_states")


class TrainingDiverged(RuntimeError):
    """The training loss, the features or the parameters became NaN or infinite."""


class RunMismatchError(CheckpointError):
    """A checkpoint belongs to a different run (another head, option, architecture or data)."""

    def __init__(self, path, differences):
        self.differences = differences
        lines = [f"  {name}: checkpoint has {old!r}, this run has {new!r}" for name, old, new in differences]
        super().__init__(f"{path} belongs to a different run; refusing to mix them:\n" + "\n".join(lines))


def best_record(history):
    """The history record with the highest ``val_top1`` (the first of ties), or None if none has one.

    The one rule for "the best epoch": the trainer keeps its weights as ``best.npz``, and
    reports (``compare.py``) show its test figures.
    """
    scored = [record for record in history if "val_top1" in record]
    return max(scored, key=lambda record: record["val_top1"]) if scored else None


def identity_differences(stored, current):
    """[(name, stored value, current value)] for every key where two run identities differ."""
    missing = object()
    return [(name, stored.get(name, "<absent>"), current.get(name, "<absent>"))
            for name in sorted(set(stored) | set(current))
            if stored.get(name, missing) != current.get(name, missing)]


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
    identity : dict, optional
        JSON-able description of the run (head, options, architecture, data ...), stored in
        every checkpoint and compared on resume (:class:`RunMismatchError` on a difference).
    early_stop : int, optional
        Stop when validation top-1 has not improved for this many epochs (needs ``dataset.val``).
    backend : optional, default ``NumpyBackend(model, optimizer)``
        What computes the steps and log-probabilities (``npsoftmax.backend``); the torch
        backend trains the model's torch twin through this same loop.
    """

    def __init__(self, model, optimizer, dataset, *, epochs, batch_size=128, run_dir="runs/default", seed=0,
                 augment=False, crop_pad=4, dtype=np.float32, lr_schedule=None, tau_schedule=None,
                 coarse_of_fine=None, eval_batch_size=500, progress=True, on_epoch_end=None, identity=None,
                 early_stop=None, backend=None):
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
        self.identity = identity
        self.backend = NumpyBackend(model, optimizer) if backend is None else backend
        self.early_stop = None if early_stop is None else check_int(early_stop, "early_stop")
        if self.early_stop is not None and getattr(dataset, "val", None) is None:
            raise ValueError("early_stop needs a validation split (dataset.val); hold one out with split_validation")
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
    def best_path(self):
        return os.path.join(self.run_dir, BEST_NAME)

    @property
    def best_epoch(self):
        """The epoch (1-based) with the highest validation top-1 so far (first of ties), or None."""
        best = best_record(self.history)
        return None if best is None else best["epoch"]

    @property
    def stopped_early(self):
        """True when ``early_stop`` epochs have passed since the best validation epoch."""
        best = self.best_epoch
        return self.early_stop is not None and best is not None and self.epoch - best >= self.early_stop

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
        backend = self.backend.train()
        total_loss, total_correct, seen, head_seconds = 0.0, 0, 0, 0.0
        bar = _progress_bar(self.steps_per_epoch, f"epoch {self.epoch + 1}/{self.epochs}", self.progress)
        start = time.perf_counter()
        for x, y in self.batches():
            values = self.scheduler.apply(self.step)
            backend.apply_schedule(values)
            try:
                result = backend.train_step(x, y)
            except NonFiniteFeatures as error:
                raise TrainingDiverged(self._divergence_message(str(error), values)) from None
            if not np.isfinite(result.loss):
                raise TrainingDiverged(self._divergence_message(f"the training loss became {result.loss}", values))
            self.step += 1
            head_seconds += result.head_seconds
            total_loss += result.loss * len(y)
            total_correct += int(np.sum(result.predictions == y))
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
            "head_seconds": head_seconds,
            "head_ms_per_batch": 1e3 * head_seconds / self.steps_per_epoch,
            "images_per_second": seen / seconds,
        }

    def _divergence_message(self, what, values):
        """Where training diverged, and the last checkpoint that is safe to resume (checked, not assumed)."""
        where = (f"{what} at epoch {self.epoch + 1}, step {self.step} (lr={self.optimizer.lr:g}"
                 f"{', tau=%g' % values['tau'] if 'tau' in values else ''})")
        try:
            load_checkpoint(self.checkpoint_path, required_meta=REQUIRED_META)
        except FileNotFoundError:
            last = "there is no checkpoint yet (it diverged in the first epoch): start afresh with --overwrite"
        except CheckpointError as error:
            last = f"no usable checkpoint: {error}"
        else:
            last = (f"the last finite checkpoint is {self.checkpoint_path} (end of epoch {self.epoch}); "
                    f"resuming needs the same options, so start afresh with a smaller --lr and --overwrite")
        return f"{where}. Try a smaller learning rate; {last}"

    def evaluate(self, split=None):
        """Exact evaluation (eval mode, no noise) on ``split`` (default: the test split).

        Returns (record, confusion): record is :func:`npsoftmax.metrics.evaluation_record`'s
        (``loss`` = mean NLL, ``top1``, ``top5``, macro P/R/F1, ``ece``, and with
        ``coarse_of_fine`` set ``coarse_top1`` and ``in_superclass_error_share``);
        confusion is (K, K).
        """
        split = self.dataset.test if split is None else split
        record, confusion = evaluation_record(self.predict_log_probs(split.images), split.labels,
                                              self.coarse_of_fine)
        self.backend.train()
        return record, confusion

    def predict_log_probs(self, images):
        """uint8 images (N, H, W, C) -> the model's exact log-probabilities (N, K), in eval mode."""
        return predict_log_probs(self.backend, images, self.mean, self.std, dtype=self.dtype,
                                 batch_size=self.eval_batch_size)

    # -- the loop --------------------------------------------------------------------
    def fit(self, resume=False):
        """Train until ``epochs`` epochs are complete (or early stopping); returns the history.

        With ``resume=True`` and a checkpoint in ``run_dir``, continue from it (after checking
        that it belongs to this run).
        """
        os.makedirs(self.run_dir, exist_ok=True)
        remove_stale_temporaries(self.run_dir)
        if resume and os.path.exists(self.checkpoint_path):
            self.load(self.checkpoint_path)
        while self.epoch < self.epochs and not self.stopped_early:
            record = {"epoch": self.epoch + 1, "lr": float(self.optimizer.lr)}
            if hasattr(self.model.head, "tau"):
                record["tau"] = float(self.model.head.tau)
            record.update(self.train_epoch())
            self.backend.sync_to_numpy()
            bad = non_finite_entries({**self.model.params, **self.model.buffers})
            if bad:
                raise TrainingDiverged(self._divergence_message(
                    f"parameters or buffers {bad[:3]} became NaN/inf", {}))
            if getattr(self.dataset, "val", None) is not None:
                val_record, _ = self.evaluate(self.dataset.val)
                record.update({f"val_{key}": value for key, value in val_record.items()})
            test_record, self.last_confusion = self.evaluate()
            record.update({f"test_{key}": value for key, value in test_record.items()})
            self.epoch += 1
            self.history.append(record)
            if "val_top1" in record and self.best_epoch == self.epoch:
                self.save_weights(self.best_path)
            write_json(self.history_path, self.history)
            if self.backend.supports_resume:
                self.save(self.checkpoint_path)
            if self.on_epoch_end is not None:
                self.on_epoch_end(self, record)
        return self.history

    # -- persistence -----------------------------------------------------------------
    def restore_weights(self, path):
        """Put the parameters and buffers of a weights file (or checkpoint) into the model, in place."""
        stored = load_checkpoint(path)
        copy_into(self.model.params, stored["params"], "params")
        copy_into(self.model.buffers, stored["buffers"], "buffers")
        self.backend.sync_from_numpy()

    def save_weights(self, path):
        """The current model as a weights file (``npsoftmax.weights``): rebuilds itself, with this
        run's normalisation statistics, epoch and identity."""
        self.backend.sync_to_numpy()
        record = self.history[-1] if self.history else {}
        save_weights(path, self.model, mean=self.mean, std=self.std,
                     meta={"epoch": self.epoch, "identity": self.identity,
                           "val_top1": record.get("val_top1"), "test_top1": record.get("test_top1")})

    def save(self, path):
        """Checkpoint params, buffers, optimizer state, every RNG state, epoch, step and history."""
        if not self.backend.supports_resume:
            raise RuntimeError(f"the {self.backend.name} backend cannot be checkpointed for an exact resume")
        generators = {"trainer": self.rng, **find_generators(self.model)}
        meta = {
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "rng_states": {name: generator_state(generator) for name, generator in generators.items()},
            "head_tau": float(self.model.head.tau) if hasattr(self.model.head, "tau") else None,
            "identity": self.identity,
        }
        save_checkpoint(path, params=self.model.params, buffers=self.model.buffers,
                        optimizer_state=self.optimizer.state_dict(), meta=meta)

    def load(self, path):
        """Restore a checkpoint written by :meth:`save` into this trainer, in place."""
        if not self.backend.supports_resume:
            raise CheckpointError(f"the {self.backend.name} backend does not resume from checkpoints")
        checkpoint = load_checkpoint(path, required_meta=REQUIRED_META)
        stored_identity = checkpoint["meta"].get("identity")
        if self.identity is not None and stored_identity is not None:
            differences = identity_differences(stored_identity, self.identity)
            if differences:
                raise RunMismatchError(path, differences)
        try:
            copy_into(self.model.params, checkpoint["params"], "params")
            copy_into(self.model.buffers, checkpoint["buffers"], "buffers")
            self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {error}") from None
        meta = checkpoint["meta"]
        generators = {"trainer": self.rng, **find_generators(self.model)}
        if set(generators) != set(meta["rng_states"]):
            raise RunMismatchError(path, [("random generators", sorted(meta["rng_states"]), sorted(generators))])
        for name, generator in generators.items():
            restore_generator(generator, meta["rng_states"][name])
        if meta.get("head_tau") is not None:
            self.model.head.tau = meta["head_tau"]
        self.epoch, self.step, self.history = meta["epoch"], meta["step"], meta["history"]
        self.backend.sync_from_numpy()


def predict_log_probs(model, images, mean, std, *, dtype=np.float32, batch_size=500):
    """Exact log-probabilities (N, K) of uint8 images (N, H, W, C), normalised with ``mean``/``std`` (C,).

    ``model`` is anything with ``eval()`` and ``log_prob(x) -> (N, K)`` (a Classifier or a
    backend). It is put in eval mode (no dropout, batch-norm running statistics, no Gumbel
    noise). The trainer and ``examples/evaluate.py`` both call this with the same batch
    size, so a weights file re-evaluates to exactly the trainer's numbers.
    """
    model.eval()
    log_probs = [model.log_prob(normalize(images[first:first + batch_size], mean, std, dtype=dtype))
                 for first in range(0, len(images), batch_size)]
    return np.concatenate(log_probs)


def _progress_bar(total, description, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="batch", leave=True, dynamic_ncols=True)
