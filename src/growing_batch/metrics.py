"""The names of the per-epoch metrics: what the loop produces, tracking logs and analysis reads.

Every one is logged at ``step = epoch`` (epochs counted from 1). No TensorFlow.
"""

import numpy as np

EPOCH_METRICS = (
    "train_loss",
    "train_accuracy",
    "val_loss",  # only with a validation split (validation_size > 0)
    "val_accuracy",
    "test_loss",
    "test_accuracy",
    "learning_rate",
    "batch_size",
    "momentum",
    "noise_scale",  # εN/(B(1 − m)), SGD only (not logged for Adam)
    "updates",  # cumulative parameter updates
    "examples_seen",  # cumulative
    "epoch_seconds",  # the epoch's training pass
    "examples_per_second",
)

# With measure_noise_scale (and the adaptive schedule), also at step = epoch:
NOISE_METRICS = (
    "gradient_noise_scale",  # B_simple = tr(Σ)/|G|², smoothed (growing_batch.noise)
    "gradient_norm_squared",  # this epoch's estimate of |G|²
    "gradient_variance_trace",  # this epoch's estimate of tr(Σ)
    "gradient_noise_scale_seconds",  # what the measurement cost
)


def epoch_numbers(logs) -> dict[str, float]:
    """The numbers of an epoch's logs, as floats: what is logged as metrics and checkpointed."""
    return {
        key: float(value)
        for key, value in (logs or {}).items()
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    }
