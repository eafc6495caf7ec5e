"""The callback-driven training loop and the schedule callback.

Keras' ``fit`` fixes the batch size for a whole call. This loop re-batches the training set every
epoch instead, and otherwise behaves like ``fit``: every standard callback hook fires in the
same order (``on_train_begin``, ``on_epoch_begin``, ``on_train_batch_begin/end``,
``on_epoch_end``, ``on_train_end``), a progress bar shows each epoch, ``model.stop_training``
ends training, and a ``History`` is returned.

Policy lives in the schedule (a pure function of the epoch); the :class:`ScheduleCallback` only
applies what it prescribes — learning rate and momentum to the optimizer, batch size to the
batches — and records it. The train step is one ``tf.function`` whose batch dimension is
unknown (``None``), so a new batch size never retraces it: :attr:`TrainStep.traces` counts.

The loop knows nothing of MLflow; tracking is a callback (``growing_batch.tracking``).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Iterable, Mapping

import keras
import numpy as np
import tensorflow as tf

from growing_batch import checkpoint, data
from growing_batch.data import EpochBatches
from growing_batch.metrics import epoch_numbers
from growing_batch.schedules import Schedule

SCHEDULE_METRICS = ("learning_rate", "batch_size", "momentum", "noise_scale")


def _optimizer_momentum(optimizer) -> float:
    if hasattr(optimizer, "beta_1"):  # Adam's momentum
        return float(optimizer.beta_1)
    return float(getattr(optimizer, "momentum", 0.0))


class ScheduleCallback(keras.callbacks.Callback):
    """At the start of each epoch, applies the schedule's (ε, B, m) and records them.

    ``applied`` holds the values in force this epoch, with the noise scale εN/(B(1 − m)); the
    loop adds them to the epoch's logs.
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
            "noise_scale": step.noise_scale(self.batches.size),
        }

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        # A schedule that follows a measurement (adaptive) records it, for the next epoch's step.
        if hasattr(self.schedule, "observe"):
            self.schedule.observe(epoch + 1, logs or {})


class EpochProgbarLogger(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, reading the number of steps anew each epoch (it changes with B)."""

    def set_params(self, params):
        super().set_params(params)
        self.params = params  # Keras' ProgbarLogger copies what it needs and keeps no reference

    def on_epoch_begin(self, epoch, logs=None):
        self.target = self.params.get("steps")
        super().on_epoch_begin(epoch, logs)


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
    """One compiled SGD step over a batch of any size; counts how often it is traced.

    A call names its batch by ``indices`` into ``images``/``labels`` — the whole training set, held
    on the device — and the step gathers, scales and (with ``augment``) augments that batch inside
    its graph (:func:`growing_batch.data.gather_batch`); ``seed`` is the batch's augmentation
    seed. Called with a batch alone, it trains on all of it.

    With ``max_device_batch_size`` > 0, a larger batch is split into micro-batches of at most that
    size: each adds its gradient, weighted by its share of the batch, to accumulators, and one
    optimizer update then applies the sum — the gradient of the mean loss over the whole batch, so
    one parameter update still sees the whole batch. (Batch-norm moving statistics, used only at
    inference, are updated once per micro-batch.) Without accumulation one function is traced,
    with it two (accumulate and apply); neither retraces when the batch size changes.

    With ``jit_compile`` (XLA), every new batch shape is a new compilation, so each batch's indices
    are padded up to :func:`bucket_size` with zero-weight examples: the loss is the mean over the
    real examples only, so the gradient is exactly the unpadded one. ``compiled_shapes`` holds the
    padded sizes used (one XLA compilation each). ``pad_to_buckets`` pads without XLA (for tests).
    """

    def __init__(
        self,
        model: keras.Model,
        loss: keras.losses.Loss,
        max_device_batch_size: int = 0,
        jit_compile: bool = False,
        pad_to_buckets: bool | None = None,
        augment: bool = False,
        image_dtype=tf.float32,
        strategy: tf.distribute.Strategy | None = None,
        split_unit: int = 1,
    ):
        self.model = model
        self.loss = loss
        self.max_device_batch_size = max_device_batch_size
        self.jit_compile = jit_compile
        self.pad_to_buckets = jit_compile if pad_to_buckets is None else pad_to_buckets
        self.augment = augment
        self.image_dtype = tf.as_dtype(image_dtype)
        if self.pad_to_buckets and max_device_batch_size > 0:
            raise ValueError("padding to buckets (jit_compile) and max_device_batch_size cannot be combined.")
        # Several replicas: each step's batch is split over them (see growing_batch.distribute).
        self.strategy = strategy if strategy is not None and strategy.num_replicas_in_sync > 1 else None
        self.replicas = self.strategy.num_replicas_in_sync if self.strategy else 1
        self.split_unit = max(1, int(split_unit))
        if self.strategy and self.pad_to_buckets:
            raise ValueError("padding to buckets (jit_compile) needs a single device.")
        self.traces = 0
        self.compiled_shapes: set[int] = set()
        with self.strategy.scope() if self.strategy else contextlib.nullcontext():
            # Per replica, summed when read (the epoch's totals over all replicas).
            local = dict(synchronization=tf.VariableSynchronization.ON_READ, aggregation=tf.VariableAggregation.SUM)
            self.loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False, **local)
            self.correct = tf.Variable(0, dtype=tf.int64, trainable=False, **local)
            self.count = tf.Variable(0, dtype=tf.int64, trainable=False, **local)
            if max_device_batch_size > 0:
                self.accumulators = [
                    tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, **local) for v in model.trainable_variables
                ]
        source_spec = [
            tf.TensorSpec((None, *model.input_shape[1:]), self.image_dtype),  # all images
            tf.TensorSpec((None,), tf.int32),  # all labels
            tf.TensorSpec((None,), tf.int32),  # this batch's indices
            tf.TensorSpec((2,), tf.int64),  # this batch's augmentation seed
        ]
        scalar = tf.TensorSpec((), tf.int32)
        if self.pad_to_buckets:  # + the number of real (unpadded) indices
            self.function = tf.function(self._padded_step, input_signature=[*source_spec, scalar],
                                        jit_compile=jit_compile)
        elif self.strategy:
            self.function = tf.function(self._distributed_step, input_signature=source_spec)
        else:
            self.function = tf.function(self._step, input_signature=source_spec)
        if max_device_batch_size > 0:
            # + the micro-batch's offset in its batch and the batch's size
            accumulate, apply = (self._distributed_accumulate, self._distributed_apply) if self.strategy else (
                self._accumulate, self._apply)
            self.accumulate = tf.function(accumulate, input_signature=[*source_spec, scalar, scalar])
            self.apply = tf.function(apply, input_signature=[])

    def reset(self) -> None:
        self.loss_sum.assign(0.0)
        self.correct.assign(0)
        self.count.assign(0)

    def _batch(self, images, labels, indices, seed, offset=0, total=None):
        return data.gather_batch(images, labels, indices, seed, self.augment, offset=offset, total=total)

    def _loss_and_gradients(self, images, labels, weight=None, mask=None):
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            hit = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
            if mask is None:
                loss = self.loss(labels, logits)
                size = tf.cast(tf.shape(labels)[0], tf.float32)
            else:  # the mean over the real examples; padding weighs nothing
                per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
                size = tf.reduce_sum(mask)
                loss = tf.reduce_sum(tf.cast(per_example, tf.float32) * mask) / size
                hit = hit * mask
            total = loss + tf.add_n(self.model.losses) if self.model.losses else loss
            if weight is not None:
                total = weight * total
        gradients = tape.gradient(total, self.model.trainable_variables)
        self.loss_sum.assign_add(tf.cast(loss, tf.float64) * tf.cast(size, tf.float64))
        self.correct.assign_add(tf.cast(tf.reduce_sum(hit), tf.int64))
        self.count.assign_add(tf.cast(size, tf.int64))
        return gradients

    def _logs(self):
        count = tf.cast(self.count, tf.float64)
        return {"train_loss": self.loss_sum / count, "train_accuracy": tf.cast(self.correct, tf.float64) / count}

    def _step(self, images, labels, indices, seed):
        self.traces += 1  # Python side effect: runs once per trace, not per call
        gradients = self._loss_and_gradients(*self._batch(images, labels, indices, seed))
        self.model.optimizer.apply(gradients, self.model.trainable_variables)
        return self._logs()

    def _padded_step(self, images, labels, indices, seed, size):
        self.traces += 1
        mask = tf.cast(tf.range(tf.shape(indices)[0]) < size, tf.float32)
        gradients = self._loss_and_gradients(*self._batch(images, labels, indices, seed), mask=mask)
        self.model.optimizer.apply(gradients, self.model.trainable_variables)
        return self._logs()

    def _accumulate(self, images, labels, indices, seed, offset, total):
        self.traces += 1
        batch_images, batch_labels = self._batch(images, labels, indices, seed, offset, total)
        weight = tf.cast(tf.shape(indices)[0], tf.float32) / tf.cast(total, tf.float32)
        gradients = self._loss_and_gradients(batch_images, batch_labels, weight)
        for accumulator, gradient in zip(self.accumulators, gradients):
            accumulator.assign_add(gradient)
        return self._logs()

    def _apply(self):
        self.traces += 1
        self.model.optimizer.apply([a.read_value() for a in self.accumulators], self.model.trainable_variables)
        for accumulator in self.accumulators:
            accumulator.assign(tf.zeros_like(accumulator))
        return self._logs()

    # --- several replicas: the batch is gathered once, then split over them -----------------------

    def _replica_slice(self, images, labels):
        """This replica's share of a batch, in replica order: whole ghost batches (``split_unit``
        examples; the last may be short), as evenly as possible over the replicas, so that every
        ghost batch is the one a single device would normalise. A batch of fewer ghost batches than
        replicas is split example by example instead. A replica left without an example (a batch
        smaller than the number of replicas) gets the batch's first example with weight 0, so that
        every replica runs the same step; the returned weights are 1 for real examples."""
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
        weights = tf.fill([stop - start], tf.where(empty, 0.0, 1.0))
        return images[start:stop], labels[start:stop], weights

    def _replica_gradients(self, images, labels, total):
        """Gradients of this replica's summed loss over the global ``total``; summed over replicas by the
        optimizer, they are the gradient of the mean loss over the whole batch."""
        images, labels, weights = self._replica_slice(images, labels)
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            per_example = weights * tf.cast(
                keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True), tf.float32
            )
            objective = tf.reduce_sum(per_example) / tf.cast(total, tf.float32)
            if self.model.losses:  # the penalty once in the sum over replicas
                objective += tf.add_n(self.model.losses) / self.replicas
        gradients = tape.gradient(objective, self.model.trainable_variables)
        hit = weights * tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
        self.loss_sum.assign_add(tf.reduce_sum(tf.cast(per_example, tf.float64)))
        self.correct.assign_add(tf.cast(tf.reduce_sum(hit), tf.int64))
        self.count.assign_add(tf.cast(tf.reduce_sum(weights), tf.int64))
        return gradients

    def _distributed_step(self, images, labels, indices, seed):
        self.traces += 1
        batch_images, batch_labels = self._batch(images, labels, indices, seed)

        def update(batch_images, batch_labels):
            gradients = self._replica_gradients(batch_images, batch_labels, tf.shape(batch_labels)[0])
            self.model.optimizer.apply(gradients, self.model.trainable_variables)

        self.strategy.run(update, args=(batch_images, batch_labels))
        return self._logs()

    def _distributed_accumulate(self, images, labels, indices, seed, offset, total):
        self.traces += 1
        batch_images, batch_labels = self._batch(images, labels, indices, seed, offset, total)

        def accumulate(batch_images, batch_labels):
            gradients = self._replica_gradients(batch_images, batch_labels, total)
            for accumulator, gradient in zip(self.accumulators, gradients):
                accumulator.assign_add(gradient)

        self.strategy.run(accumulate, args=(batch_images, batch_labels))
        return self._logs()

    def _distributed_apply(self):
        self.traces += 1

        def apply():
            self.model.optimizer.apply([a.read_value() for a in self.accumulators], self.model.trainable_variables)
            for accumulator in self.accumulators:
                accumulator.assign(tf.zeros_like(accumulator))

        self.strategy.run(apply)
        return self._logs()

    def __call__(self, images, labels, indices=None, seed=(0, 0)):
        """One update on ``images[indices]`` (default: all of ``images``); returns the epoch's running logs."""
        if indices is None:
            indices = np.arange(int(images.shape[0]), dtype=np.int32)
        indices = np.asarray(indices, np.int32)
        seed = tf.constant(seed, tf.int64)
        size = len(indices)
        if self.pad_to_buckets:
            padded = bucket_size(size)
            self.compiled_shapes.add(padded)
            # Padding repeats example 0; the mask gives it no weight.
            indices = np.concatenate([indices, np.zeros(padded - size, np.int32)])
            return self.function(images, labels, indices, seed, tf.constant(size, tf.int32))
        micro = self.max_device_batch_size * self.replicas  # max_device_batch_size is per device
        if micro <= 0 or size <= micro:
            return self.function(images, labels, indices, seed)
        total = tf.constant(size, tf.int32)
        for start in range(0, size, micro):
            self.accumulate(images, labels, indices[start:start + micro], seed, tf.constant(start, tf.int32), total)
        return self.apply()


class GradientNoiseProbe:
    """Squared gradient norms at two batch sizes, for the gradient noise scale (:mod:`growing_batch.noise`).

    A probe takes a batch of B_big examples, cuts it into micro-batches of ``small_batch_size`` and
    computes each one's gradient of the mean loss (as the train step does, in training mode): the
    mean of their squared norms is |G_small|², the squared norm of their mean |G_big|². It changes no
    weight; batch-norm statistics are put back as they were. ``loss`` maps (labels, outputs) to
    per-example losses; ``inputs`` may be any tensor the model takes (the tests use linear regression).
    """

    def __init__(self, model: keras.Model, loss, small_batch_size: int):
        self.model = model
        self.loss = loss
        self.small_batch_size = int(small_batch_size)
        self.function = tf.function(self._measure, reduce_retracing=True)

    def _measure(self, inputs, targets):
        variables = self.model.trainable_variables
        kept = [tf.identity(variable) for variable in self.model.non_trainable_variables]
        count = tf.shape(targets)[0] // self.small_batch_size
        total = [tf.zeros(variable.shape, tf.float32) for variable in variables]
        squared_norms = tf.constant(0.0, tf.float64)
        for index in tf.range(count):
            start = index * self.small_batch_size
            part = slice(start, start + self.small_batch_size)
            with tf.GradientTape() as tape:
                outputs = self.model(inputs[part], training=True)
                mean_loss = tf.reduce_mean(tf.cast(self.loss(targets[part], outputs), tf.float32))
            gradients = [tf.cast(gradient, tf.float32) for gradient in tape.gradient(mean_loss, variables)]
            squared_norms += tf.cast(tf.add_n([tf.reduce_sum(tf.square(g)) for g in gradients]), tf.float64)
            total = [t + g for t, g in zip(total, gradients)]
        for variable, value in zip(self.model.non_trainable_variables, kept):
            variable.assign(value)
        count_float = tf.cast(count, tf.float64)
        big = tf.add_n([tf.reduce_sum(tf.square(t)) for t in total])
        return squared_norms / count_float, tf.cast(big, tf.float64) / count_float**2

    def __call__(self, inputs, targets) -> tuple[float, float, int, int]:
        """(|G_small|², |G_big|², B_small, B_big) from the whole micro-batches of this batch."""
        count = int(targets.shape[0]) // self.small_batch_size
        if count < 2:
            raise ValueError(
                f"a probe needs at least 2 micro-batches of {self.small_batch_size}; received {int(targets.shape[0])} examples."
            )
        small, big = self.function(inputs, targets)
        return float(small), float(big), self.small_batch_size, count * self.small_batch_size


def _per_example_crossentropy(labels, logits):
    return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


class NoiseScaleMeter:
    """Measures the gradient noise scale once per epoch on random training examples (see
    :mod:`growing_batch.noise` for the sizes and the smoothing) and reports it with its cost."""

    def __init__(self, model: keras.Model, batches: EpochBatches):
        from growing_batch import noise

        self.batches = batches
        examples = min(noise.PROBE_EXAMPLES, batches.size)
        self.small_batch_size = min(noise.PROBE_SMALL_BATCH_SIZE, max(1, examples // 2))
        self.examples = examples // self.small_batch_size * self.small_batch_size
        self.probe = GradientNoiseProbe(model, _per_example_crossentropy, self.small_batch_size)
        self.estimator = noise.NoiseScaleEstimator()

    def measure(self, epoch: int) -> dict[str, float]:
        started = time.perf_counter()
        order = np.random.default_rng([self.batches.seed, epoch, 7]).permutation(self.batches.size)
        indices = order[: self.examples].astype(np.int32)
        # the same augmentation as a training batch would get; seed kept apart from the epoch's batches
        seed = np.array([self.batches.seed, -(epoch + 1)], np.int64)
        images, labels = data.gather_batch(self.batches.images, self.batches.labels, indices, seed, self.batches.augment)
        small, big, small_size, big_size = self.probe(images, labels)
        result = self.estimator.update(small, big, small_size, big_size)
        result["gradient_noise_scale_seconds"] = time.perf_counter() - started
        return result

    def replay(self, rows: list[dict]) -> None:
        """Feed the estimates a resumed run logged before, so the moving averages continue."""
        for row in rows:
            if "gradient_norm_squared" in row and "gradient_variance_trace" in row:
                self.estimator.add(row["gradient_norm_squared"], row["gradient_variance_trace"])


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
        losses = keras.losses.sparse_categorical_crossentropy(batch_labels, logits, from_logits=True)
        hits = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), batch_labels)
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


def fit(
    model: keras.Model,
    batches: EpochBatches,
    schedule_callback: ScheduleCallback,
    *,
    epochs: int,
    evaluation: Mapping[str, object] | None = None,
    callbacks: Iterable[keras.callbacks.Callback] = (),
    verbose: int = 1,
    max_device_batch_size: int = 0,
    jit_compile: bool = False,
    initial_epoch: int = 0,
    initial_updates: int = 0,
    initial_examples_seen: int = 0,
    interruption: Interruption | None = None,
    strategy: tf.distribute.Strategy | None = None,
    measure_noise_scale: bool = False,
    previous_rows: Iterable[dict] = (),
) -> keras.callbacks.History:
    """Train ``model`` (compiled with an optimizer and a loss) up to epoch ``epochs``.

    ``evaluation`` maps a prefix to :class:`~growing_batch.data.EvaluationBatches` (``{"val": ..., "test": ...}``) evaluated after each
    epoch as ``<prefix>_loss`` and ``<prefix>_accuracy``. Each epoch's logs also hold the
    schedule's ``learning_rate``, ``batch_size``, ``momentum``, ``noise_scale``, the cumulative
    ``updates`` and ``examples_seen``, and ``epoch_seconds`` (the training pass) with
    ``examples_per_second``. ``max_device_batch_size`` > 0 accumulates gradients over micro-batches
    of at most that size; ``jit_compile`` compiles the train step with XLA, padding batches to a
    few bucket sizes (see :class:`TrainStep`).

    Resuming: ``initial_epoch`` epochs are done (as in Keras' ``fit``), with ``initial_updates`` and
    ``initial_examples_seen`` so far; training goes on with epoch ``initial_epoch + 1``, whose shuffle
    and augmentation are those an uninterrupted run would draw.

    Divergence: an epoch whose training loss is NaN, infinite or exploded (:func:`loss_diverged`) ends training at once — its
    training metrics and schedule go to ``on_epoch_end`` (no evaluation of the broken weights) and
    the returned history's ``diverged_epoch`` is that epoch (counted from 1), else None.

    Gradient noise scale: with ``measure_noise_scale``, each epoch's logs add ``gradient_noise_scale``
    (B_simple, smoothed), the epoch's raw ``gradient_norm_squared`` and ``gradient_variance_trace``
    estimates and ``gradient_noise_scale_seconds`` (the cost), measured after the training pass
    (:class:`NoiseScaleMeter`). ``previous_rows``: a resumed run's earlier epochs, to continue the
    smoothing and the schedule's measurements.

    Several devices: with a ``strategy`` of several replicas (the model and optimizer built in its
    scope), each batch is split over the replicas (see :mod:`growing_batch.distribute`).

    Interruption: when ``interruption.requested`` turns true (a signal arrived), training stops
    after the current batch, that unfinished epoch is dropped (no ``on_epoch_end``, no
    ``on_train_end``) and :class:`TrainingInterrupted` is raised. A signal during the last epoch's
    evaluation or logging lets training end normally.
    """
    if schedule_callback.batches is not batches:
        raise ValueError("schedule_callback must drive the same EpochBatches that fit trains on.")
    # One compiled train step per model and setting: calling fit again does not retrace.
    train_step = getattr(model, "train_step_function", None)
    if not (
        isinstance(train_step, TrainStep)
        and train_step.max_device_batch_size == max_device_batch_size
        and train_step.jit_compile == jit_compile
        and train_step.augment == batches.augment
        and train_step.image_dtype == batches.images.dtype
        and train_step.strategy is (strategy if strategy is not None and strategy.num_replicas_in_sync > 1 else None)
    ):
        ghost_sizes = [layer.ghost_batch_size for layer in model.layers if hasattr(layer, "ghost_batch_size")]
        train_step = TrainStep(model, model.loss, max_device_batch_size, jit_compile, augment=batches.augment,
                               image_dtype=batches.images.dtype, strategy=strategy,
                               split_unit=max(ghost_sizes, default=1))
    evaluator = getattr(model, "evaluator_function", None)
    if not isinstance(evaluator, Evaluator):
        evaluator = Evaluator(model)
    # The progress bar only when asked for: a callback with a per-batch hook makes Keras convert each
    # batch's logs on the training thread (a device sync per step); without one it does so off-thread.
    progress = [EpochProgbarLogger()] if verbose else []
    callback_list = keras.callbacks.CallbackList(
        [schedule_callback, *callbacks, *progress],
        add_history=True,
        model=model,
        verbose=verbose,
        epochs=epochs,
        steps=None,
    )
    # Per-batch hooks are called when some callback has one; otherwise they would all be no-ops, and
    # calling them would still hand every batch's logs to a thread to convert, costing time per step.
    batch_hooks = any(_has_batch_hooks(callback) for callback in callback_list.callbacks)
    model.train_step_function = train_step  # for inspection (trace count) by tests and benchmarks
    model.evaluator_function = evaluator
    model.stop_training = False
    meter = NoiseScaleMeter(model, batches) if measure_noise_scale else None
    previous_rows = list(previous_rows)
    if meter is not None:
        meter.replay(previous_rows)
    for row in previous_rows:  # a schedule that follows measurements (adaptive) records them again
        schedule_callback.on_epoch_end(int(row["epoch"]) - 1, row)
    updates, examples_seen = initial_updates, initial_examples_seen
    epoch_logs: dict = {}
    diverged_epoch = first_loss = None
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        callback_list.on_epoch_begin(epoch)
        train_step.reset()
        started = time.perf_counter()
        for batch, indices in enumerate(batches.index_batches(epoch)):
            if batch_hooks:
                callback_list.on_train_batch_begin(batch)
            batch_logs = train_step(batches.images, batches.labels, indices, batches.batch_seed(epoch, batch))
            if batch_hooks:
                callback_list.on_train_batch_end(batch, batch_logs)
            if interruption is not None and interruption.requested:
                raise TrainingInterrupted(interruption.requested, epoch + 1)
        epoch_examples = int(train_step.count.numpy())  # waits for the last step to finish
        epoch_seconds = time.perf_counter() - started
        updates += batches.steps()
        examples_seen += epoch_examples
        epoch_logs = {
            "train_loss": float(train_step.loss_sum.numpy()) / epoch_examples,
            "train_accuracy": int(train_step.correct.numpy()) / epoch_examples,
        }
        if loss_diverged(epoch_logs["train_loss"], previous_rows[0]["train_loss"] if previous_rows else first_loss):
            diverged_epoch = epoch + 1
        first_loss = epoch_logs["train_loss"] if first_loss is None else first_loss
        if meter is not None and diverged_epoch is None:
            epoch_logs.update(meter.measure(epoch + 1))
        for prefix, dataset in (evaluation or {}).items() if diverged_epoch is None else ():
            epoch_logs[f"{prefix}_loss"], epoch_logs[f"{prefix}_accuracy"] = evaluator(dataset)
        epoch_logs.update(schedule_callback.applied)
        epoch_logs.update(
            {
                "updates": updates,
                "examples_seen": examples_seen,
                "epoch_seconds": epoch_seconds,
                "examples_per_second": epoch_examples / epoch_seconds,
            }
        )
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


class Interruption:
    """Turns SIGINT and SIGTERM into a request to stop that :func:`fit` honours between batches.

    Use as a context manager around training; ``requested`` is the signal's name once one arrived.
    A second SIGINT while the first is being honoured raises KeyboardInterrupt at once.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, number, frame):
        import signal

        name = signal.Signals(number).name
        if self.requested and name == "SIGINT":
            raise KeyboardInterrupt
        self.requested = name
        print(f"\n{name} received: stopping after this batch (press Ctrl-C again to quit at once)", flush=True)

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info):
        import signal

        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
        return False


class CheckpointCallback(keras.callbacks.Callback):
    """Saves the run's checkpoint (:mod:`growing_batch.checkpoint`) at the end of every epoch.

    ``state`` holds what was done before (empty for a new run); each epoch adds its logged numbers.
    An epoch whose training loss is not finite is not saved: the last good epoch's checkpoint stays.
    """

    def __init__(self, checkpoint_dir: str, run_id: str, state: checkpoint.State):
        super().__init__()
        self.checkpoint_dir = checkpoint_dir
        self.run_id = run_id
        self.state = state

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        numbers = epoch_numbers(logs)
        if not math.isfinite(numbers.get("train_loss", math.nan)):
            return
        self.state.epoch = epoch + 1
        self.state.updates = int(numbers["updates"])
        self.state.examples_seen = int(numbers["examples_seen"])
        self.state.rows = [*self.state.rows, {"epoch": epoch + 1, **numbers}]
        checkpoint.save(self.checkpoint_dir, self.run_id, self.model, self.state)
