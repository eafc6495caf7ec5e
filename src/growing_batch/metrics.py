"""The names of the per-epoch metrics: what the loop produces, tracking logs and analysis reads.

Every one is logged at ``step = epoch`` (epochs counted from 1). No TensorFlow.
"""

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
    "noise_scale",  # εN/(B(1 − m))
    "updates",  # cumulative parameter updates
    "examples_seen",  # cumulative
    "epoch_seconds",  # the epoch's training pass
    "examples_per_second",
)
