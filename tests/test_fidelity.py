"""What makes two runs differ only by their schedule: model selection on validation, the noise scale
only where it means something, and the noise probe measuring what training computes."""

import functools
import math

import numpy as np
import pandas as pd
import pytest

from growing_batch import analysis, data, loop, models, noise, schedules
from growing_batch.config import from_args


def test_test_accuracy_is_read_at_the_best_validation_epoch_not_the_best_test_epoch():
    history = pd.DataFrame({"epoch": [1, 2, 3, 4], "val_accuracy": [0.5, 0.8, 0.8, 0.7],
                            "test_accuracy": [0.4, 0.75, 0.9, 0.95]})
    assert analysis.test_accuracy_at_best_val(history) == 0.75  # the first epoch of the best validation
    assert analysis.test_accuracy_at_best_val(history.drop(columns="val_accuracy")) != analysis.test_accuracy_at_best_val(history)
    assert math.isnan(analysis.test_accuracy_at_best_val(history.drop(columns="val_accuracy")))
    runs = pd.DataFrame({"run_id": ["a", "b"], "run_name": ["a", "b"], "status": ["FINISHED", "FAILED"],
                         "member": ["m", "m"], "schedule": ["lr-decay", "lr-decay"], "seed": [0, 1],
                         "diverged_epoch": [None, 3.0]})
    both = pd.concat([history.assign(run_id="a", wall_seconds=1.0, updates=10, epoch_seconds=0.5),
                      history.assign(run_id="b", wall_seconds=1.0, updates=10, epoch_seconds=0.5)])
    summary = analysis.schedule_summary(runs, both).set_index("member")
    assert summary.loc["m", "seeds"] == 1 and summary.loc["m", "diverged"] == 1
    assert summary.loc["m", "test_accuracy_at_best_val_mean"] == 0.75
    assert summary.loc["m", "best_test_accuracy_mean"] == 0.95
    table = analysis.format_schedule_table(summary.reset_index())
    assert "test acc @best val" in table and "optimistic" in table


@pytest.mark.parametrize("optimizer, logged", [("sgd", True), ("adam", False)])
def test_the_noise_scale_is_logged_for_sgd_only(fashion_dir, optimizer, logged):
    splits = data.load("fashion_mnist", fashion_dir, validation_size=40)
    model = models.compile_for_training(models.build("small-cnn", (28, 28, 1), 10),
                                        models.build_optimizer(optimizer, 0.01, momentum=0.9))
    batches = data.EpochBatches(splits.train, seed=0)
    schedule = functools.partial(schedules.constant, learning_rate=0.01, batch_size=50, momentum=0.9)
    history = loop.Trainer(model, batches, schedule).fit(epochs=1, verbose=0)
    assert ("noise_scale" in history.history) is logged
    if logged:
        assert history.history["noise_scale"] == [pytest.approx(0.01 * 200 / (50 * 0.1))]


def test_the_sgd_presets_start_at_a_tenth_of_the_papers_noise_scale():
    for name, expected in (("paper-decay-sgd", 39.0625), ("paper-decay", 390.625), ("paper-increase-5120", 390.625)):
        step = schedules.build_schedule(from_args(["--preset", name]), 50_000)(1)
        assert step.noise_scale(50_000) == pytest.approx(expected)


def test_the_noise_probe_uses_ghost_batches_and_includes_the_weight_penalty(fashion_dir):
    splits = data.load("fashion_mnist", fashion_dir, validation_size=40)
    batches = data.EpochBatches(splits.train, seed=0)
    ghost = models.compile_for_training(
        models.wide_resnet((28, 28, 1), 10, depth=10, width=1, ghost_batch_size=16),
        models.build_optimizer("sgd", 0.1))
    assert noise.NoiseScaleMeter(ghost, batches).small_batch_size == 16
    plain = models.compile_for_training(models.build("small-cnn", (28, 28, 1), 10, seed=0),
                                        models.build_optimizer("sgd", 0.1))
    decayed = models.compile_for_training(models.build("small-cnn", (28, 28, 1), 10, seed=0, weight_decay=0.5),
                                          models.build_optimizer("sgd", 0.1))
    assert noise.NoiseScaleMeter(plain, batches).small_batch_size == 64
    images, labels = data.scale(splits.train.images[:128]), splits.train.labels[:128]
    without = noise.NoiseScaleMeter(plain, batches).probe(images, labels)
    with_penalty = noise.NoiseScaleMeter(decayed, batches).probe(images, labels)
    # the same weights: the penalty's gradient λw adds to every micro-batch's gradient
    assert with_penalty[0] > without[0] and with_penalty[1] > without[1]
    # ... and leaves the spread between micro-batches (tr Σ) as it was, up to float32 cancellation
    np.testing.assert_allclose(with_penalty[0] - with_penalty[1], without[0] - without[1], rtol=1e-2)
