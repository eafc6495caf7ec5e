"""The TensorFlow engine behind :class:`growing_batch.loop.Trainer` (``backend=tensorflow``, the default).

Its :class:`TrainStep` is one ``tf.function`` whose batch dimension is unknown (``None``), so a new
batch size never retraces it; it runs through ``strategy.run`` on one device or several
(``tf.distribute``: see :mod:`growing_batch.distribute`). :class:`Evaluator` evaluates a split held on
the device. The JAX engine (:mod:`growing_batch.jax_engine`) has the same interface.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

from growing_batch import data, models
from growing_batch.loop import bucket_size, loss_and_hits


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
