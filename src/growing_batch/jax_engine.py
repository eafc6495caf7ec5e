"""The JAX engine behind :class:`growing_batch.loop.Trainer` (``backend=jax``; see docs/jax.md).

The same objective as the TensorFlow :class:`growing_batch.tf_engine.TrainStep`: Σᵢ wᵢ·ℓ(xᵢ, yᵢ) / B plus
the weight penalty (``model.losses``) weighted by the call's share of the batch, with ℓ the loss the
model was compiled with, per example. The step is one jitted, stateless function, as Keras' own JAX
trainer builds it: ``model.stateless_call`` for the forward pass, ``jax.value_and_grad`` for the
gradient, ``optimizer.stateless_apply`` for the update. Every batch is padded with zero-weight
examples to :func:`growing_batch.loop.bucket_size`, so a run compiles one shape per bucket it meets
(:attr:`TrainStep.compiled_shapes`).

The trainable, non-trainable and optimizer variables' values are the step's state: read from the
Keras variables when an epoch begins (:meth:`TrainStep.reset`: the schedule has just set the
learning rate; a checkpoint may have been restored) and written back when it ends
(:meth:`TrainStep.write_back`), before evaluation, checkpoints (``save_weights``) and the logged model.

Several devices (``devices=N``): under Keras' ``keras.distribution.DataParallel`` (set by
:func:`growing_batch.distribute.jax_distribution`) the variables and the splits are replicated; the
step's indices and weights are sharded over the devices along the batch (the padded size is also a
multiple of N), and XLA partitions the same jitted function, summing the gradients across devices.

The batch is gathered from the training split held on the device, scaled to [0, 1] and (with
``augment``) augmented inside the jitted function; the augmentation's draws are stateless
functions of (seed, epoch, batch) through ``jax.random`` (not TensorFlow's draws, the same recipe).

Imported only when Keras runs on JAX; the TensorFlow path never imports this module.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import keras
import numpy as np

from growing_batch import models
from growing_batch.data import AUGMENT_PADDING, crop_and_flip
from growing_batch.loop import bucket_size, loss_and_hits  # loop imports this module only on JAX


# On a CPU, XLA's convolutions cost more per example as the batch grows (the activations leave the
# caches): the small CNN's train step took 110-125 µs per example at B = 32-128 but 300 µs at 1,024 on a
# 2-core AMD EPYC, and its evaluation 0.10 s for 2,048 images in calls of 128-512 against 0.20 s in one
# call (docs/performance.md, "The bench on JAX"). So on a CPU a batch of CPU_MICRO_BATCH_SIZE or more
# examples runs as micro-batches of that size, one jitted call each, adding its gradient to the sum;
# the last one applies the update: the same update, since the objective is a sum over the examples
# divided by B. Python calls, not a lax.scan: on the CPU, XLA ran the convolutions inside a loop 3-7
# times slower. Not with batch norm (micro-batches would change its statistics), augmentation (its
# draws are made per batch) or several devices; never on a GPU.
CPU_MICRO_BATCH_SIZE = 64
CPU_EVALUATION_CHUNK = 256


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def has_batch_norm(model) -> bool:
    return any(isinstance(layer, (models.GhostBatchNormalization, keras.layers.BatchNormalization))
               for layer in model.layers)


def to_unit_range(images):
    """A batch of the device split as float32 in [0, 1] (uint8 splits are scaled here)."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images


def augment(images, key, padding: int = AUGMENT_PADDING):
    """Random crops of the ``padding``-pixel reflect-padded images and horizontal flips, drawn from
    ``key`` (the transform is :func:`growing_batch.data.crop_and_flip`, the TensorFlow engine's too)."""
    count = images.shape[0]
    top_key, left_key, flip_key = jax.random.split(key, 3)
    top = jax.random.randint(top_key, (count,), 0, 2 * padding + 1)
    left = jax.random.randint(left_key, (count,), 0, 2 * padding + 1)
    return crop_and_flip(images, top, left, jax.random.uniform(flip_key, (count,)) < 0.5, padding)


def batch_key(seed):
    """The augmentation key of a batch from its seed pair (seed, epoch · 2³² + batch)."""
    seed = np.asarray(seed, np.int64)
    words = np.array([seed[0] & 0xFFFFFFFF, seed[1] >> 32, seed[1] & 0xFFFFFFFF], np.uint32)
    return words


class Totals:
    """An epoch's per-call sums (loss, hits, examples), summed in float64 on the host when read."""

    def __init__(self):
        self.parts: list = []
        self.running = None

    def add(self, sums) -> None:
        self.parts.append(sums)
        self.running = sums if self.running is None else self.running + sums

    def read(self) -> tuple[float, int, int]:
        if not self.parts:
            return 0.0, 0, 0
        values = np.asarray(jax.device_get(jnp.stack(self.parts)), np.float64).sum(0)
        return float(values[0]), int(round(values[1])), int(round(values[2]))


def replicas() -> int:
    """The devices a batch is sharded over: those of Keras' distribution, else 1."""
    distribution = keras.distribution.distribution()
    return 1 if distribution is None else int(distribution.device_mesh.devices.size)


def padded_size(batch_size: int) -> int:
    """The compiled size of a batch: :func:`growing_batch.loop.bucket_size`, rounded up to a multiple of the devices."""
    count = replicas()
    return -(-bucket_size(batch_size) // count) * count


def shard_batch(values: np.ndarray):
    """A per-example array sharded over the devices along its first axis (as is, on one device)."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return values
    return keras.distribution.distribute_tensor(values, distribution.get_data_layout(values.shape))


class TrainStep:
    """The jitted train step on JAX, with the interface the loop uses of the TensorFlow one.

    :attr:`traces` counts the traces of the jitted function (one per compiled shape),
    :attr:`compiled_shapes` the padded batch sizes. On a CPU, batches of :data:`CPU_MICRO_BATCH_SIZE`
    or more may run as micro-batches of that size (see there): then that one shape serves every such B.
    """

    def __init__(self, model: keras.Model, *, augment: bool = False):
        self.model = model
        self.augment = augment
        self.replicas = replicas()
        self.traces = 0
        self.compiled_shapes: set[int] = set()
        self.totals = Totals()
        self.state = None
        optimizer = model.optimizer
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        self.function = jax.jit(self._step)
        self.gradients = None  # the micro-batches' gradient sum of the update under way
        micro = on_cpu() and not augment and not has_batch_norm(model) and self.replicas == 1
        self.micro_batch_size = CPU_MICRO_BATCH_SIZE if micro else 0
        self.micro_function = jax.jit(self._micro_step, donate_argnums=(1,))

    # --- the state --------------------------------------------------------------------------------

    def _read_variables(self):
        model = self.model
        return ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                [v.value for v in model.optimizer.variables])

    def reset(self) -> None:
        """A new epoch: zero the sums, take the variables' values (the schedule has just set the learning rate)."""
        self.totals = Totals()
        self.state = self._read_variables()
        self.gradients = None

    def write_back(self) -> None:
        """Write the state into the Keras variables (before evaluation, checkpoints and the logged model)."""
        if self.state is None:
            return
        model = self.model
        trainable, non_trainable, optimizer_values = self.state
        for variable, value in zip(model.trainable_variables, trainable):
            variable.assign(value)
        for variable, value in zip(model.non_trainable_variables, non_trainable):
            variable.assign(value)
        for variable, value in zip(model.optimizer.variables, optimizer_values):
            variable.assign(value)

    def totals_read(self) -> tuple[float, int, int]:
        return self.totals.read()

    # --- the step ---------------------------------------------------------------------------------

    def _objective(self, trainable, non_trainable, images, labels, weights, total):
        model = self.model
        with models.example_weights(weights):  # padding takes no part in batch statistics
            logits, non_trainable, _ = model.stateless_call(trainable, non_trainable, images, training=True,
                                                            return_losses=True)
        losses, hits = loss_and_hits(model.loss, labels, logits)
        objective = jnp.sum(weights * losses) / total
        mapping = list(zip(model.trainable_variables, trainable)) + list(zip(model.non_trainable_variables,
                                                                             non_trainable))
        with keras.StatelessScope(state_mapping=mapping):
            penalties = model.losses  # the weight penalty, from this step's values
        if penalties:
            share = jnp.sum(weights) / total  # this call's part of the batch (the whole: 1)
            objective = objective + jnp.asarray(sum(penalties), jnp.float32) * share
        sums = jnp.stack([jnp.sum(weights * losses), jnp.sum(weights * hits), jnp.sum(weights)])
        return objective, (non_trainable, sums)

    def _step(self, state, images, labels, indices, weights, key_words, total):
        self.traces += 1  # Python side effect: once per trace (per compiled shape)
        trainable, non_trainable, optimizer_values = state
        batch_images = to_unit_range(jnp.take(images, indices, axis=0))
        if self.augment:
            key = jax.random.key(0)
            for word in (key_words[0], key_words[1], key_words[2]):
                key = jax.random.fold_in(key, word)
            batch_images = augment(batch_images, key)
        batch_labels = jnp.take(labels, indices, axis=0)
        gradient_function = jax.value_and_grad(self._objective, has_aux=True)
        (_, (non_trainable, sums)), gradients = gradient_function(trainable, non_trainable, batch_images,
                                                                   batch_labels, weights, total)
        trainable, optimizer_values = self.model.optimizer.stateless_apply(optimizer_values, gradients, trainable)
        return (trainable, non_trainable, optimizer_values), sums

    def _micro_step(self, state, gradients, images, labels, indices, weights, total, apply_update):
        """One micro-batch: its gradient added to ``gradients``; with ``apply_update`` (the batch's last)
        the update applied with their sum, and the sum set back to zero."""
        self.traces += 1
        trainable, non_trainable, optimizer_values = state
        batch_images = to_unit_range(jnp.take(images, indices, axis=0))
        batch_labels = jnp.take(labels, indices, axis=0)
        gradient_function = jax.value_and_grad(self._objective, has_aux=True)
        (_, (non_trainable, sums)), part = gradient_function(trainable, non_trainable, batch_images, batch_labels,
                                                             weights, total)
        gradients = jax.tree.map(jnp.add, gradients, part)

        def apply(operands):
            trainable, optimizer_values, gradients = operands
            trainable, optimizer_values = self.model.optimizer.stateless_apply(optimizer_values, gradients, trainable)
            return trainable, optimizer_values, jax.tree.map(jnp.zeros_like, gradients)

        trainable, optimizer_values, gradients = jax.lax.cond(apply_update, apply, lambda operands: operands,
                                                              (trainable, optimizer_values, gradients))
        return (trainable, non_trainable, optimizer_values), gradients, sums

    def _micro_batches(self, images, labels, indices, size: int) -> None:
        micro = self.micro_batch_size
        padded = -(-size // micro) * micro
        self.compiled_shapes.add(micro)
        indices = np.concatenate([indices, np.zeros(padded - size, np.int32)])
        weights = np.concatenate([np.ones(size, np.float32), np.zeros(padded - size, np.float32)])
        if self.gradients is None:
            self.gradients = jax.tree.map(jnp.zeros_like, self.state[0])
        for start in range(0, padded, micro):
            stop = start + micro
            self.state, self.gradients, sums = self.micro_function(
                self.state, self.gradients, images, labels, indices[start:stop], weights[start:stop],
                np.float32(size), np.bool_(stop >= padded))
            self.totals.add(sums)

    def __call__(self, images, labels, indices=None, seed=(0, 0)):
        """One update on ``images[indices]`` (default: all of ``images``); returns the epoch's running logs."""
        if self.state is None:
            self.reset()
        if indices is None:
            indices = np.arange(int(images.shape[0]), dtype=np.int32)
        indices = np.asarray(indices, np.int32)
        size = len(indices)
        if self.micro_batch_size and size >= self.micro_batch_size:
            self._micro_batches(images, labels, indices, size)
            running = self.totals.running
            return {"train_loss": running[0] / running[2], "train_accuracy": running[1] / running[2]}
        padded = padded_size(size)
        self.compiled_shapes.add(padded)
        # Padding repeats example 0 with weight 0.
        indices = shard_batch(np.concatenate([indices, np.zeros(padded - size, np.int32)]))
        weights = shard_batch(np.concatenate([np.ones(size, np.float32), np.zeros(padded - size, np.float32)]))
        self.state, sums = self.function(self.state, images, labels, indices, weights, batch_key(seed),
                                         np.float32(size))
        self.totals.add(sums)
        running = self.totals.running
        return {"train_loss": running[0] / running[2], "train_accuracy": running[1] / running[2]}


class Evaluator:
    """Mean loss and accuracy over :class:`~growing_batch.data.EvaluationBatches`, jitted on JAX.

    Each batch is ``batch_size`` examples (or the whole split, if smaller; rounded up to a multiple of
    the devices, over which it is sharded) gathered from the split held on the device; the last one's
    missing examples repeat the split's last with weight 0, so one shape per split is compiled.
    """

    def __init__(self, model: keras.Model):
        self.model = model
        self.function = jax.jit(self._step)

    def _step(self, trainable, non_trainable, images, labels, positions):
        weights = (positions < labels.shape[0]).astype(jnp.float32)
        positions = jnp.minimum(positions, labels.shape[0] - 1)
        logits, _ = self.model.stateless_call(trainable, non_trainable,
                                              to_unit_range(jnp.take(images, positions, axis=0)), training=False)
        losses, hits = loss_and_hits(self.model.loss, jnp.take(labels, positions, axis=0), logits)
        return jnp.stack([jnp.sum(weights * losses), jnp.sum(weights * hits)])

    def __call__(self, batches) -> tuple[float, float]:
        trainable = [v.value for v in self.model.trainable_variables]
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        count = replicas()
        chunk = CPU_EVALUATION_CHUNK if on_cpu() else len(batches)  # see CPU_MICRO_BATCH_SIZE
        size = -(-min(batches.batch_size, len(batches), chunk) // count) * count
        parts = [self.function(trainable, non_trainable, batches.images, batches.labels,
                               shard_batch(np.arange(start, start + size, dtype=np.int32)))
                 for start in range(0, len(batches), size)]
        loss_sum, correct = np.asarray(jax.device_get(jnp.stack(parts)), np.float64).sum(0)
        return float(loss_sum) / len(batches), float(correct) / len(batches)


def device_array(values: np.ndarray):
    """A NumPy array placed on JAX's default device, or on every device of Keras' distribution (replicated)."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return jax.device_put(values)
    replicated = keras.distribution.TensorLayout([None] * np.ndim(values), distribution.device_mesh)
    return keras.distribution.distribute_tensor(values, replicated)


class GradientNoiseProbe:
    """Squared gradient norms at two batch sizes on JAX (see :class:`growing_batch.noise.GradientNoiseProbe`).

    The batch is cut into micro-batches of ``small_batch_size``; each one's gradient of the mean loss
    plus the weight penalty (training mode) is computed by one jitted call, which adds it and its
    squared norm to running sums on the device: the mean of the squared norms is |G_small|², the
    squared norm of the mean gradient |G_big|². (Python calls, not a ``jax.lax.map``: on a CPU, XLA
    ran the loop's convolutions 6-7 times slower.) Stateless: no weight, and no non-trainable
    variable, changes.
    """

    def __init__(self, model, loss, small_batch_size: int):
        self.model = model
        self.loss = loss
        self.small_batch_size = int(small_batch_size)
        self.function = jax.jit(self._add_part, donate_argnums=(4, 5))

    def _add_part(self, trainable, non_trainable, inputs, targets, gradient_sum, squared_norm_sum, start):
        model, small = self.model, self.small_batch_size
        part_inputs = jax.lax.dynamic_slice_in_dim(inputs, start, small)
        part_targets = jax.lax.dynamic_slice_in_dim(targets, start, small)

        def objective(values):
            outputs, _ = model.stateless_call(values, non_trainable, part_inputs, training=True)
            mean_loss = jnp.mean(jnp.asarray(self.loss(part_targets, outputs), jnp.float32))
            with keras.StatelessScope(state_mapping=list(zip(model.trainable_variables, values))):
                penalties = model.losses
            return mean_loss + (jnp.asarray(sum(penalties), jnp.float32) if penalties else 0.0)

        gradients = [jnp.asarray(g, jnp.float32) for g in jax.grad(objective)(trainable)]
        squared_norm = sum(jnp.sum(jnp.square(g)) for g in gradients)
        return [a + g for a, g in zip(gradient_sum, gradients)], squared_norm_sum + squared_norm

    def __call__(self, inputs, targets) -> tuple[float, float, int, int]:
        """(|G_small|², |G_big|², B_small, B_big) from the whole micro-batches of this batch."""
        count = int(targets.shape[0]) // self.small_batch_size
        if count < 2:
            raise ValueError(f"a probe needs at least 2 micro-batches of {self.small_batch_size}; received "
                             f"{int(targets.shape[0])} examples.")
        trainable = [v.value for v in self.model.trainable_variables]
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        gradient_sum = [jnp.zeros(v.shape, jnp.float32) for v in self.model.trainable_variables]
        squared_norm_sum = jnp.zeros((), jnp.float32)
        for part in range(count):
            gradient_sum, squared_norm_sum = self.function(trainable, non_trainable, inputs, targets, gradient_sum,
                                                           squared_norm_sum, np.int32(part * self.small_batch_size))
        big = sum(jnp.sum(jnp.square(g)) for g in gradient_sum) / count**2
        small, big = (float(value) for value in np.asarray(jnp.stack([squared_norm_sum / count, big]), np.float64))
        return small, big, self.small_batch_size, count * self.small_batch_size


def noise_scale_meter(model, batches):
    """:class:`growing_batch.noise.NoiseScaleMeter` measuring with the JAX probe on the batches held on
    the device (the same sizes, examples and estimator; the augmentation's draws are JAX's)."""
    from growing_batch import noise

    class NoiseScaleMeter(noise.NoiseScaleMeter):
        def __init__(self):
            super().__init__(model, batches, probe_type=GradientNoiseProbe)
            self.gather = jax.jit(self._gather)

        def _gather(self, images, labels, indices, key_words):
            batch_images = to_unit_range(jnp.take(images, indices, axis=0))
            if batches.augment:
                key = jax.random.key(1)  # kept apart from the training batches' keys (root key 0)
                for word in (key_words[0], key_words[1]):
                    key = jax.random.fold_in(key, word)
                batch_images = augment(batch_images, key)
            return batch_images, jnp.take(labels, indices, axis=0)

        def measure(self, epoch: int) -> dict[str, float]:
            import time

            started = time.perf_counter()
            order = np.random.default_rng([batches.seed, epoch, 7]).permutation(batches.size)
            indices = order[: self.examples].astype(np.int32)
            words = np.array([batches.seed & 0xFFFFFFFF, epoch], np.uint32)
            images, labels = self.gather(batches.images, batches.labels, indices, words)
            result = self.estimator.update(*self.probe(images, labels))
            result["gradient_noise_scale_seconds"] = time.perf_counter() - started
            return result

    return NoiseScaleMeter()
