"""The gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018), estimated during training.

G is the full-batch gradient and Σ the per-example gradients' covariance; B_simple predicts the
critical batch size, beyond which a larger batch buys little. The mean gradient over a batch of B
examples has E|G_B|² = |G|² + tr(Σ)/B, so squared gradient norms at two batch sizes, B_small < B_big,
give unbiased estimates of both:

    |G|²  ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Each is noisy (|G|²'s can even be negative), so each is smoothed by an exponential moving average
before the ratio is taken. This module is plain arithmetic (no TensorFlow); the gradients come from
:class:`growing_batch.loop.GradientNoiseProbe`.
"""

from __future__ import annotations

import math

# How the training loop probes (see growing_batch.loop.GradientNoiseProbe): once per epoch, after
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
