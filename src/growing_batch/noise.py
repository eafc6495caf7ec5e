"""The gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018), estimated during training.

G is the full-batch gradient and Σ the per-example gradients' covariance; B_simple predicts the
critical batch size, beyond which a larger batch buys little. The mean gradient over a batch of B
examples has E|G_B|² = |G|² + tr(Σ)/B, so squared gradient norms at two batch sizes, B_small < B_big,
give unbiased estimates of both:

    |G|²  ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Each is noisy (|G|²'s can even be negative), so each is smoothed by an exponential moving average
before the ratio is taken. The estimator is plain arithmetic (no TensorFlow, tested in milliseconds);
the gradients come from :class:`GradientNoiseProbe`, which :class:`NoiseScaleMeter` runs once per
epoch during training (both import TensorFlow only when built).
"""

from __future__ import annotations

import math

# How the training loop probes (see GradientNoiseProbe below): once per epoch, after
# the training pass, on PROBE_EXAMPLES random training examples (or all, if fewer) cut into
# micro-batches of PROBE_SMALL_BATCH_SIZE (of the ghost batch size with ghost batch norm, so the batch
# statistics are those of training), with the weight penalty in each gradient: their mean squared gradient norm is |G_small|², the
# squared norm of their mean gradient |G_big|². One forward and backward pass over 1,024 examples:
# about 2 % of a 50,000-example epoch.
PROBE_EXAMPLES = 1024
PROBE_SMALL_BATCH_SIZE = 64
# Weight of the past in the moving averages, per epoch: the estimate follows about the last 2-3 epochs.
EMA_DECAY = 0.5


def two_batch_estimates(small_norm_squared: float, big_norm_squared: float, small_batch_size: float,
                        big_batch_size: float) -> tuple[float, float]:
    """Unbiased (|G|², tr Σ) from |G_small|² at B_small and |G_big|² at B_big (B_small < B_big)."""
    if not 0 < small_batch_size < big_batch_size:
        raise ValueError(
            f"the two batch sizes must satisfy 0 < small < big; received small={small_batch_size}, big={big_batch_size}."
        )
    gradient_squared = (big_batch_size * big_norm_squared - small_batch_size * small_norm_squared) / (
        big_batch_size - small_batch_size
    )
    trace = (small_norm_squared - big_norm_squared) / (1 / small_batch_size - 1 / big_batch_size)
    return gradient_squared, trace


class MovingAverage:
    """An exponential moving average, bias-corrected (Adam's way) so the first values are not pulled to 0."""

    def __init__(self, decay: float = EMA_DECAY):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1); received {decay}.")
        self.decay = decay
        self.total = 0.0
        self.weight = 0.0

    def update(self, value: float) -> float:
        self.total = self.decay * self.total + (1 - self.decay) * value
        self.weight = self.decay * self.weight + (1 - self.decay)
        return self.value

    @property
    def value(self) -> float:
        return self.total / self.weight if self.weight else math.nan


class NoiseScaleEstimator:
    """B_simple from a stream of two-batch measurements: the ratio of the smoothed tr Σ and |G|².

    ``value`` is NaN until the smoothed |G|² is positive (the gradient is lost in the noise).
    """

    def __init__(self, decay: float = EMA_DECAY):
        self.gradient_squared = MovingAverage(decay)
        self.trace = MovingAverage(decay)

    def update(self, small_norm_squared: float, big_norm_squared: float, small_batch_size: float,
               big_batch_size: float) -> dict[str, float]:
        """Add one measurement; returns it (``gradient_norm_squared``, ``gradient_variance_trace``) and
        the smoothed ``gradient_noise_scale``."""
        gradient_squared, trace = two_batch_estimates(small_norm_squared, big_norm_squared, small_batch_size,
                                                      big_batch_size)
        return self.add(gradient_squared, trace)

    def add(self, gradient_squared: float, trace: float) -> dict[str, float]:
        """Add one (|G|², tr Σ) estimate (also how a resumed run replays its logged ones)."""
        self.gradient_squared.update(gradient_squared)
        self.trace.update(trace)
        return {"gradient_norm_squared": gradient_squared, "gradient_variance_trace": trace,
                "gradient_noise_scale": self.value}

    @property
    def value(self) -> float:
        gradient_squared = self.gradient_squared.value
        if not gradient_squared > 0:
            return math.nan
        return self.trace.value / gradient_squared


# --- the probe: squared gradient norms during training (TensorFlow, imported when used) ----------


class GradientNoiseProbe:
    """Squared gradient norms at two batch sizes, for :class:`NoiseScaleEstimator`.

    A probe takes a batch of B_big examples, cuts it into micro-batches of ``small_batch_size`` and
    computes each one's gradient of the mean loss plus the weight penalty (as the train step does, in
    training mode; with ghost batch norm the micro-batches are ghost batches): the mean of their
    squared norms is |G_small|², the squared norm of their mean |G_big|². It changes no weight;
    batch-norm statistics are put back as they were. ``loss`` maps (labels, outputs) to per-example
    losses; ``inputs`` may be any tensor the model takes (the tests use linear regression).
    """

    def __init__(self, model, loss, small_batch_size: int):
        import tensorflow as tf

        self.model = model
        self.loss = loss
        self.small_batch_size = int(small_batch_size)
        self.function = tf.function(self._measure, reduce_retracing=True)

    def _measure(self, inputs, targets):
        import tensorflow as tf

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
                if self.model.losses:  # the weight penalty: part of the gradient training follows
                    mean_loss += tf.cast(tf.add_n(self.model.losses), tf.float32)
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


class NoiseScaleMeter:
    """Measures the gradient noise scale once per epoch on random training examples (the sizes above,
    with the model's own compiled loss) and reports it with its cost. ``probe_type``: the engine's
    probe (this module's TensorFlow one by default; the JAX engine passes its own)."""

    def __init__(self, model, batches, probe_type=None):
        self.batches = batches
        examples = min(PROBE_EXAMPLES, batches.size)
        # With ghost batch norm, micro-batches of the ghost size: the batch statistics of training.
        ghost_sizes = [layer.ghost_batch_size for layer in model.layers if hasattr(layer, "ghost_batch_size")]
        small = max(ghost_sizes) if ghost_sizes else PROBE_SMALL_BATCH_SIZE
        self.small_batch_size = min(small, max(1, examples // 2))
        self.examples = examples // self.small_batch_size * self.small_batch_size
        self.probe = (probe_type or GradientNoiseProbe)(model, model.loss.call, self.small_batch_size)
        self.estimator = NoiseScaleEstimator()

    def measure(self, epoch: int) -> dict[str, float]:
        import time

        import numpy as np

        from growing_batch import data

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
