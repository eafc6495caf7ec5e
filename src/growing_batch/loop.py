"""The callback-driven training loop: the :class:`Trainer`, its one train step and the schedule callback.

Keras' ``fit`` fixes the batch size for a whole call. This loop re-batches the training set every
epoch instead, and otherwise behaves like ``fit``: every standard callback hook fires in the
same order (``on_train_begin``, ``on_epoch_begin``, ``on_train_batch_begin/end``,
``on_epoch_end``, ``on_train_end``), a progress bar shows each epoch, ``model.stop_training``
ends training, and a ``History`` is returned.

Policy lives in the schedule (a pure function of the epoch); the :class:`ScheduleCallback` only
applies what it prescribes — the learning rate to the optimizer, the batch size to the batches; the
momentum, fixed when the step is compiled, it checks — and writes it into the epoch's logs. The :class:`TrainStep` is one ``tf.function`` whose
batch dimension is unknown (``None``), so a new batch size never retraces it.

The loop knows nothing of MLflow; tracking is a callback (``growing_batch.tracking``).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Iterable, Mapping

import keras
import numpy as np
import tensorflow as tf

from growing_batch import checkpoint, data, models
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


class TrainStep:
    """The one compiled train step: the weighted per-example loss over the global batch size.

    The objective of every update is Σᵢ wᵢ·ℓ(xᵢ, yᵢ) / B + penalty, with ℓ the loss the model was
    compiled with (per example) and B the batch size. Everything that splits or pads a batch is just
    weights: zero-weight padding (``jit_compile``: indices padded up to :func:`bucket_size`, one XLA
    compilation per bucket), micro-batches for accumulation (``max_device_batch_size``: each adds
    its gradient to accumulators, the last one applies their sum) and replica shares (several
    devices: each replica takes whole ghost batches of the batch). Summed, their gradients are
    exactly the full batch's mean gradient, and the weight penalty enters once per update (each
    part adds it weighted by its share of the batch and of the replicas).

    A call names its batch by ``indices`` into ``images``/``labels`` — the whole training set, held
    on the device — and the step gathers, scales and (with ``augment``) augments that batch inside
    its graph (:func:`growing_batch.data.gather_batch`); ``seed`` is the batch's augmentation seed.
    Called with a batch alone, it trains on all of it. It always runs through ``strategy.run``: on
    one device that is TensorFlow's default strategy, at no cost.

    One ``tf.function`` with an unknown batch dimension, so a new batch size never retraces it:
    :attr:`traces` counts the traces (1 per run; 2 with accumulation: the accumulating and the
    applying call), :attr:`compiled_shapes` the padded sizes XLA compiled.
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        augment: bool = False,
        image_dtype=tf.float32,
        max_device_batch_size: int = 0,
        jit_compile: bool = False,
        strategy: tf.distribute.Strategy | None = None,
        split_unit: int = 1,
    ):
        self.model = model
        self.augment = augment
        self.image_dtype = tf.as_dtype(image_dtype)
        self.max_device_batch_size = max_device_batch_size
        self.pad_to_buckets = jit_compile
        self.strategy = strategy if strategy is not None else tf.distribute.get_strategy()
        self.replicas = self.strategy.num_replicas_in_sync
        self.split_unit = max(1, int(split_unit))
        self.traces = 0
        self.compiled_shapes: set[int] = set()
        with self.strategy.scope():
            # Per replica, summed when read (the epoch's totals over all replicas).
            local = dict(synchronization=tf.VariableSynchronization.ON_READ, aggregation=tf.VariableAggregation.SUM)
            self.loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False, **local)
            self.correct = tf.Variable(0, dtype=tf.int64, trainable=False, **local)
            self.count = tf.Variable(0, dtype=tf.int64, trainable=False, **local)
            self.accumulators = [
                tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, **local) for v in model.trainable_variables
            ] if max_device_batch_size > 0 else []
        signature = [
            tf.TensorSpec((None, *model.input_shape[1:]), self.image_dtype),  # all images
            tf.TensorSpec((None,), tf.int32),  # all labels
            tf.TensorSpec((None,), tf.int32),  # this call's indices
            tf.TensorSpec((None,), tf.float32),  # their weights: 1, or 0 for padding
            tf.TensorSpec((2,), tf.int64),  # the batch's augmentation seed
            tf.TensorSpec((), tf.int32),  # this call's offset in its batch
            tf.TensorSpec((), tf.int32),  # the batch size B (the real examples of the whole batch)
        ]
        # apply_update: the update's last (or only) call applies it; earlier micro-batches accumulate.
        self.functions = {
            apply_update: tf.function(functools.partial(self._step, apply_update=apply_update),
                                      input_signature=signature, jit_compile=jit_compile)
            for apply_update in (True, False)
        }

    def reset(self) -> None:
        self.loss_sum.assign(0.0)
        self.correct.assign(0)
        self.count.assign(0)

    def totals_read(self) -> tuple[float, int, int]:
        """The epoch's summed loss, hits and examples (waits for the last step to finish)."""
        count = int(self.count.numpy())
        return float(self.loss_sum.numpy()), int(self.correct.numpy()), count

    def write_back(self) -> None:
        """Nothing to do: the step updates the Keras variables themselves (the JAX step keeps its own state)."""

    def _step(self, images, labels, indices, weights, seed, offset, total, apply_update: bool):
        self.traces += 1  # Python side effect: runs once per trace, not per call
        # The augmentation draws for this call's examples: a micro-batch's slice of its whole batch's
        # draws (offset, total); a padded batch draws for all its rows (padding included).
        batch_images, batch_labels = data.gather_batch(images, labels, indices, seed, self.augment, offset=offset,
                                                       total=None if self.pad_to_buckets else total)
        share = tf.reduce_sum(weights) / tf.cast(total, tf.float32)  # this call's part of the batch

        def replica_step(batch_images, batch_labels, weights):
            images, labels, weights = self._replica_share(batch_images, batch_labels, weights)
            with tf.GradientTape() as tape:
                with models.example_weights(weights):  # padding takes no part in batch statistics
                    logits = self.model(images, training=True)
                losses, hits = loss_and_hits(self.model.loss, labels, logits)
                objective = tf.reduce_sum(weights * losses) / tf.cast(total, tf.float32)
                if self.model.losses:  # the weight penalty, once per update
                    objective += tf.cast(tf.add_n(self.model.losses), tf.float32) * share / self.replicas
            gradients = tape.gradient(objective, self.model.trainable_variables)
            self.loss_sum.assign_add(tf.reduce_sum(tf.cast(weights * losses, tf.float64)))
            self.correct.assign_add(tf.cast(tf.reduce_sum(weights * hits), tf.int64))
            self.count.assign_add(tf.cast(tf.reduce_sum(weights), tf.int64))
            if not apply_update:
                for accumulator, gradient in zip(self.accumulators, gradients):
                    accumulator.assign_add(gradient)
                return
            if self.accumulators:
                gradients = [accumulator.read_value() + gradient
                             for accumulator, gradient in zip(self.accumulators, gradients)]
            self.model.optimizer.apply(gradients, self.model.trainable_variables)
            for accumulator in self.accumulators:
                accumulator.assign(tf.zeros_like(accumulator))

        self.strategy.run(replica_step, args=(batch_images, batch_labels, weights))
        count = tf.cast(self.count, tf.float64)
        return {"train_loss": self.loss_sum / count, "train_accuracy": tf.cast(self.correct, tf.float64) / count}

    def _replica_share(self, images, labels, weights):
        """This replica's share of a batch, in replica order: whole ghost batches (``split_unit``
        examples; the last may be short), as evenly as possible over the replicas, so that every
        ghost batch is the one a single device would normalise. A batch of fewer ghost batches than
        replicas is split example by example instead. A replica left without an example (a batch
        smaller than the number of replicas) gets the batch's first example with weight 0, so that
        every replica runs the same step. On one device: the whole batch."""
        if self.replicas == 1:
            return images, labels, weights
        replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int32)
        size = tf.shape(labels)[0]
        unit = tf.where((size + self.split_unit - 1) // self.split_unit >= self.replicas, self.split_unit, 1)
        units = (size + unit - 1) // unit
        base, extra = units // self.replicas, units % self.replicas
        first = replica * base + tf.minimum(replica, extra)
        last = first + base + tf.cast(replica < extra, tf.int32)
        start, stop = tf.minimum(first * unit, size), tf.minimum(last * unit, size)
        empty = stop == start
        start, stop = tf.where(empty, 0, start), tf.where(empty, 1, stop)
        share = weights[start:stop] * tf.where(empty, 0.0, 1.0)
        return images[start:stop], labels[start:stop], share

    def __call__(self, images, labels, indices=None, seed=(0, 0)):
        """One update on ``images[indices]`` (default: all of ``images``); returns the epoch's running logs."""
        if indices is None:
            indices = np.arange(int(images.shape[0]), dtype=np.int32)
        indices = np.asarray(indices, np.int32)
        seed = tf.constant(seed, tf.int64)
        size = len(indices)
        total = tf.constant(size, tf.int32)
        start = tf.constant(0, tf.int32)
        if self.pad_to_buckets:
            padded = bucket_size(size)
            self.compiled_shapes.add(padded)
            # Padding repeats example 0 with weight 0.
            indices = np.concatenate([indices, np.zeros(padded - size, np.int32)])
            weights = np.concatenate([np.ones(size, np.float32), np.zeros(padded - size, np.float32)])
            return self.functions[True](images, labels, indices, weights, seed, start, total)
        micro = self.max_device_batch_size * self.replicas  # max_device_batch_size is per device
        if micro <= 0 or size <= micro:
            return self.functions[True](images, labels, indices, np.ones(size, np.float32), seed, start, total)
        for offset in range(0, size, micro):
            part = indices[offset:offset + micro]
            logs = self.functions[offset + micro >= size](images, labels, part, np.ones(len(part), np.float32), seed,
                                                          tf.constant(offset, tf.int32), total)
        return logs


def loss_and_hits(loss: keras.losses.Loss, labels, logits):
    """Per-example losses (float32) by the model's own compiled loss, and per-example hits (1.0 where
    the arg-max logit is the label): what training, evaluation and the noise probe all use."""
    losses = tf.cast(loss.call(labels, logits), tf.float32)
    hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
    return losses, hits


class Evaluator:
    """Mean loss and accuracy of the model over :class:`~growing_batch.data.EvaluationBatches`.

    One compiled step slices each batch out of the split held on the device.
    """

    def __init__(self, model: keras.Model):
        self.model = model
        self.functions: dict = {}  # image dtype -> compiled step (one trace for any split and batch)

    def _function(self, image_dtype):
        if image_dtype not in self.functions:
            image_spec = tf.TensorSpec((None, *self.model.input_shape[1:]), image_dtype)
            label_spec = tf.TensorSpec((None,), tf.int32)
            scalar = tf.TensorSpec((), tf.int32)
            self.functions[image_dtype] = tf.function(self._step, input_signature=[image_spec, label_spec, scalar, scalar])
        return self.functions[image_dtype]

    def _step(self, images, labels, start, stop):
        batch_labels = labels[start:stop]
        logits = self.model(data.to_unit_range(images[start:stop]), training=False)
        losses, hits = loss_and_hits(self.model.loss, batch_labels, logits)
        return tf.reduce_sum(tf.cast(losses, tf.float64)), tf.reduce_sum(tf.cast(hits, tf.int64))

    def __call__(self, batches: data.EvaluationBatches) -> tuple[float, float]:
        function = self._function(batches.images.dtype)
        sums = [function(batches.images, batches.labels, tf.constant(start, tf.int32), tf.constant(stop, tf.int32))
                for start, stop in batches.bounds()]
        loss_sum = sum(float(loss) for loss, _ in sums)  # one wait, after every batch is queued
        correct = sum(int(hits) for _, hits in sums)
        return loss_sum / len(batches), correct / len(batches)


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
                 jit_compile: bool = False, strategy: tf.distribute.Strategy | None = None,
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
        ghost_sizes = [layer.ghost_batch_size for layer in model.layers if hasattr(layer, "ghost_batch_size")]
        self.step = TrainStep(model, augment=batches.augment, image_dtype=batches.images.dtype,
                              max_device_batch_size=max_device_batch_size, jit_compile=jit_compile,
                              strategy=strategy, split_unit=max(ghost_sizes, default=1))
        self.evaluator = Evaluator(model)
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
