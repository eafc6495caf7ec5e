"""The callback-driven training loop: the :class:`Trainer`, its one train step and the schedule callback.

Keras' ``fit`` fixes the batch size for a whole call. This loop re-batches the training set every
epoch instead, and otherwise behaves like ``fit``: every standard callback hook fires in the
same order (``on_train_begin``, ``on_epoch_begin``, ``on_train_batch_begin/end``,
``on_epoch_end``, ``on_train_end``), a progress bar shows each epoch, ``model.stop_training``
ends training, and a ``History`` is returned.

Policy lives in the schedule (a pure function of the epoch); the :class:`ScheduleCallback` only
applies what it prescribes — the learning rate to the optimizer, the batch size to the batches; the
momentum, fixed when the step is compiled, it checks — and writes it into the epoch's logs. The loop drives an engine's train step:
:class:`growing_batch.tf_engine.TrainStep` (one ``tf.function`` whose batch dimension is unknown, so a
new batch size never retraces it) or, when Keras runs on JAX, :class:`growing_batch.jax_engine.TrainStep`.
This module imports neither TensorFlow nor JAX itself: a JAX process needs no TensorFlow installed.

The loop knows nothing of MLflow; tracking is a callback (``growing_batch.tracking``).
"""

from __future__ import annotations

import math
import time
from typing import Iterable, Mapping

import keras
import numpy as np

from growing_batch import checkpoint
from growing_batch.data import EpochBatches
from growing_batch.schedules import Schedule


def _optimizer_momentum(optimizer) -> float:
    if hasattr(optimizer, "beta_1"):  # Adam's momentum
        return float(optimizer.beta_1)
    return float(getattr(optimizer, "momentum", 0.0))


class ScheduleCallback(keras.callbacks.Callback):
    """At the start of each epoch, applies the schedule's ε and B (and checks its m); at its end writes
    them into the logs.

    ``applied`` holds the values in force this epoch, with SGD's noise scale εN/(B(1 − m)) (Smith et
    al.'s formula is SGD's: for Adam, whose ``momentum`` is β1 and whose step is normalised, it has
    no meaning and ``noise_scale`` is left out), and writes them into the epoch's logs at its end, as
    Keras' ``LearningRateScheduler`` does.
    """

    def __init__(self, schedule: Schedule, batches: EpochBatches):
        super().__init__()
        self.schedule = schedule
        self.batches = batches
        self.applied: dict[str, float] = {}

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        step = self.schedule(epoch + 1)  # Keras counts epochs from 0, schedules from 1
        optimizer = self.model.optimizer
        optimizer.learning_rate = step.learning_rate
        current_momentum = _optimizer_momentum(optimizer)
        if not np.isclose(step.momentum, current_momentum, rtol=0, atol=1e-12):
            raise ValueError(
                f"The schedule sets momentum {step.momentum} at epoch {epoch + 1}, but the "
                f"optimizer's momentum is fixed at {current_momentum} when its train step is "
                "compiled; build the optimizer with the schedule's momentum."
            )
        self.batches.batch_size = step.batch_size
        if isinstance(self.params, dict):
            self.params["steps"] = self.batches.steps()  # read by the progress bar
        self.applied = {
            "learning_rate": float(step.learning_rate),
            "batch_size": int(step.batch_size),
            "momentum": float(step.momentum),
        }
        if not hasattr(optimizer, "beta_1"):  # SGD (plain, momentum, Nesterov)
            self.applied["noise_scale"] = step.noise_scale(self.batches.size)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if logs is not None:
            logs.update(self.applied)
        # A schedule that follows a measurement (adaptive) records it, for the next epoch's step.
        if hasattr(self.schedule, "observe"):
            self.schedule.observe(epoch + 1, logs or {})

    def replay(self, rows: Iterable[dict]) -> None:
        """Feed a resumed run's earlier epochs to a schedule that follows measurements (adaptive)."""
        if hasattr(self.schedule, "observe"):
            for row in rows:
                self.schedule.observe(int(row["epoch"]), row)


class EpochProgbarLogger(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, reading the number of steps anew each epoch (it changes with B)."""

    def set_params(self, params):
        super().set_params(params)
        self.params = params  # Keras' ProgbarLogger copies what it needs and keeps no reference

    def on_epoch_begin(self, epoch, logs=None):
        self.target = self.params.get("steps")
        super().on_epoch_begin(epoch, logs)


class EpochLineLogger(keras.callbacks.Callback):
    """One line per epoch (``verbose=2``), no per-batch hook: for logs, pipes and sweep children."""

    SHOWN = ("batch_size", "learning_rate", "train_loss", "train_accuracy", "val_accuracy", "test_accuracy", "updates")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = [f"{name} {logs[name]:.4g}" if isinstance(logs[name], float) else f"{name} {logs[name]}"
                 for name in self.SHOWN if name in logs]
        seconds = logs.get("epoch_seconds")
        timing = f" ({seconds:.1f} s)" if isinstance(seconds, (int, float)) else ""
        print(f"epoch {epoch + 1}/{self.params.get('epochs', '?')}{timing}: " + ", ".join(parts), flush=True)


# With XLA, each batch shape is compiled anew; batches are padded up to the next of these sizes:
# 8 · 2^(k/4) rounded up to a multiple of 8 — four sizes per doubling, powers of two among them, at
# most 19 % padding plus the rounding.
BUCKETS_PER_DOUBLING = 4


def bucket_size(batch_size: int) -> int:
    """The smallest size ≥ batch_size on the grid ceil8(8 · 2^(k/4)): 8, 16, 16, 16, 16, 24, ..., 128, 160."""
    k = 0
    while True:
        rounded = 8 * math.ceil(2 ** (k / BUCKETS_PER_DOUBLING) - 1e-9)
        if rounded >= batch_size:
            return rounded
        k += 1


def loss_and_hits(loss: keras.losses.Loss, labels, logits):
    """Per-example losses (float32) by the model's own compiled loss, and per-example hits (1.0 where
    the arg-max logit is the label): what training, evaluation and the noise probe all use, on either
    engine (``keras.ops``)."""
    ops = keras.ops
    losses = ops.cast(loss.call(labels, logits), "float32")
    hits = ops.cast(ops.equal(ops.cast(ops.argmax(logits, -1), "int32"), ops.cast(labels, "int32")), "float32")
    return losses, hits


def _has_batch_hooks(callback) -> bool:
    base = keras.callbacks.Callback
    return any(
        getattr(type(callback), name) is not getattr(base, name)
        for name in ("on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end")
    )


class Trainer:
    """One run's training: the train step, the evaluator and the noise meter, built once.

    ``model`` is compiled with an optimizer and a loss (in the ``strategy``'s scope when there are
    several devices); ``batches`` are the training set's :class:`~growing_batch.data.EpochBatches`;
    ``schedule`` maps an epoch (from 1) to its (ε, B, m). ``evaluation`` maps a prefix to
    :class:`~growing_batch.data.EvaluationBatches` (``{"val": ..., "test": ...}``), evaluated after
    each epoch as ``<prefix>_loss`` and ``<prefix>_accuracy``. ``max_device_batch_size``,
    ``jit_compile`` and ``strategy``: see :class:`TrainStep` (on JAX, ``strategy`` is Keras'
    ``DataParallel`` distribution or None: see :mod:`growing_batch.jax_engine`). With ``measure_noise_scale``, each
    epoch also measures the gradient noise scale (:class:`growing_batch.noise.NoiseScaleMeter`).
    """

    def __init__(self, model: keras.Model, batches: EpochBatches, schedule: Schedule, *,
                 evaluation: Mapping[str, object] | None = None, max_device_batch_size: int = 0,
                 jit_compile: bool = False, strategy=None,
                 measure_noise_scale: bool = False):
        from growing_batch import noise

        self.model = model
        self.batches = batches
        self.evaluation = dict(evaluation or {})
        self.schedule_callback = ScheduleCallback(schedule, batches)
        if keras.backend.backend() == "jax":  # the JAX engine (growing_batch.jax_engine); jit_compile implied
            from growing_batch import jax_engine

            if max_device_batch_size:
                raise ValueError("On JAX the trainer takes no micro-batches (growing_batch.config refuses them).")
            # Several devices: Keras' distribution (``strategy``, set for the process) shards each batch.
            self.step = jax_engine.TrainStep(model, augment=batches.augment)
            self.evaluator = jax_engine.Evaluator(model)
            self.noise_meter = jax_engine.noise_scale_meter(model, batches) if measure_noise_scale else None
            return
        from growing_batch import tf_engine

        ghost_sizes = [layer.ghost_batch_size for layer in model.layers if hasattr(layer, "ghost_batch_size")]
        self.step = tf_engine.TrainStep(model, augment=batches.augment, image_dtype=batches.images.dtype,
                              max_device_batch_size=max_device_batch_size, jit_compile=jit_compile,
                              strategy=strategy, split_unit=max(ghost_sizes, default=1))
        self.evaluator = tf_engine.Evaluator(model)
        self.noise_meter = noise.NoiseScaleMeter(model, batches) if measure_noise_scale else None

    def fit(self, state: checkpoint.State | None = None, epochs: int = 1,
            callbacks: Iterable[keras.callbacks.Callback] = (), verbose: int = 1,
            interruption=None) -> keras.callbacks.History:
        """Train up to epoch ``epochs`` (counted from 1), continuing after ``state`` (a checkpoint's
        epochs done, updates, examples seen and logged rows; None: from the start).

        Every standard callback hook fires in Keras' order; each epoch's logs hold ``train_loss``,
        ``train_accuracy``, the evaluations, the schedule's ``learning_rate``, ``batch_size``,
        ``momentum`` and (SGD) ``noise_scale`` (written by the :class:`ScheduleCallback`), the
        cumulative ``updates`` and ``examples_seen``, ``epoch_seconds`` (the training pass) and
        ``examples_per_second``; with the noise meter also ``gradient_noise_scale``,
        ``gradient_norm_squared``, ``gradient_variance_trace`` and ``gradient_noise_scale_seconds``.

        Resuming: epoch ``state.epoch + 1`` draws the shuffle and augmentation an uninterrupted run
        would, starting after the examples the previous epoch's last batch carried over
        (``examples_seen`` − epochs · N); ``state.rows`` continue the noise scale's smoothing and
        the measurements an adaptive schedule follows.

        Divergence: an epoch whose training loss is NaN, infinite or exploded (:func:`loss_diverged`)
        ends training at once — its
        training metrics and schedule go to ``on_epoch_end`` (no evaluation of the broken weights)
        and the returned history's ``diverged_epoch`` is that epoch, else None.

        Interruption: when ``interruption.requested`` turns true (a signal arrived: the entry point's
        ``growing_batch.train.Interruption`` sets it), training stops
        after the current batch, that unfinished epoch is dropped (no ``on_epoch_end``, no
        ``on_train_end``) and :class:`TrainingInterrupted` is raised. A signal during the last
        epoch's evaluation or logging lets training end normally.
        """
        state = state if state is not None else checkpoint.State(config={})
        model, batches, step = self.model, self.batches, self.step
        # The progress bar only when asked for: a callback with a per-batch hook makes Keras convert each
        # batch's logs on the training thread (a device sync per step); one line per epoch needs none.
        progress = {0: [], 1: [EpochProgbarLogger()], 2: [EpochLineLogger()]}[int(verbose)]
        callback_list = keras.callbacks.CallbackList(
            [self.schedule_callback, *callbacks, *progress], add_history=True, model=model, verbose=verbose,
            epochs=epochs, steps=None,
        )
        # Per-batch hooks are called when some callback has one; otherwise they would all be no-ops, and
        # calling them would still hand every batch's logs to a thread to convert, costing time per step.
        batch_hooks = any(_has_batch_hooks(callback) for callback in callback_list.callbacks)
        model.stop_training = False
        if self.noise_meter is not None:
            self.noise_meter.replay(state.rows)
        self.schedule_callback.replay(state.rows)  # a schedule that follows measurements (adaptive)
        batches.start_after(state.epoch, state.examples_seen)  # where the next epoch's permutation starts
        updates, examples_seen = state.updates, state.examples_seen
        epoch_logs: dict = {}
        diverged_epoch = None
        first_loss = state.rows[0]["train_loss"] if state.rows else None
        callback_list.on_train_begin()
        for epoch in range(state.epoch, epochs):
            callback_list.on_epoch_begin(epoch)
            step.reset()
            started = time.perf_counter()
            epoch_batches = batches.index_batches(epoch)
            for batch, indices in enumerate(epoch_batches):
                if batch_hooks:
                    callback_list.on_train_batch_begin(batch)
                batch_logs = step(batches.images, batches.labels, indices, batches.batch_seed(epoch, batch))
                if batch_hooks:
                    callback_list.on_train_batch_end(batch, batch_logs)
                if interruption is not None and interruption.requested:
                    raise TrainingInterrupted(interruption.requested, epoch + 1)
            loss_sum, correct, epoch_examples = step.totals_read()  # waits for the last step to finish
            epoch_seconds = time.perf_counter() - started
            step.write_back()  # the JAX step's state into the Keras variables, before evaluation and checkpoints
            updates += len(epoch_batches)
            examples_seen += epoch_examples  # = len(epoch_batches) × batch_size: every batch is full
            batches.advance()
            epoch_logs = {
                "train_loss": loss_sum / epoch_examples,
                "train_accuracy": correct / epoch_examples,
            }
            if loss_diverged(epoch_logs["train_loss"], first_loss):
                diverged_epoch = epoch + 1
            first_loss = epoch_logs["train_loss"] if first_loss is None else first_loss
            if self.noise_meter is not None and diverged_epoch is None:
                epoch_logs.update(self.noise_meter.measure(epoch + 1))
            for prefix, dataset in self.evaluation.items() if diverged_epoch is None else ():
                epoch_logs[f"{prefix}_loss"], epoch_logs[f"{prefix}_accuracy"] = self.evaluator(dataset)
            epoch_logs.update({"updates": updates, "examples_seen": examples_seen, "epoch_seconds": epoch_seconds,
                               "examples_per_second": epoch_examples / epoch_seconds})
            callback_list.on_epoch_end(epoch, epoch_logs)
            if diverged_epoch is not None or model.stop_training:
                break
            if interruption is not None and interruption.requested and epoch + 1 < epochs:
                raise TrainingInterrupted(interruption.requested, epoch + 2)  # after the last epoch: finish
        callback_list.on_train_end(epoch_logs)
        model.history.diverged_epoch = diverged_epoch
        return model.history


# A finite training loss over this many times the first epoch's has exploded: the run counts as diverged.
EXPLODED_LOSS_FACTOR = 100


def loss_diverged(loss: float, first_loss: float | None) -> bool:
    """NaN or infinite, or exploded: over EXPLODED_LOSS_FACTOR x the first epoch's loss, or x ln 100
    (the cross-entropy at chance of up to 100 classes) where that is larger or there is no first epoch yet."""
    return not math.isfinite(loss) or loss > EXPLODED_LOSS_FACTOR * max(first_loss or 0.0, math.log(100))


class TrainingInterrupted(Exception):
    """Training stopped on a signal; ``epoch`` (from 1) is the epoch that was not finished."""

    def __init__(self, signal_name: str, epoch: int):
        super().__init__(f"{signal_name} during epoch {epoch}")
        self.signal_name = signal_name
        self.epoch = epoch
