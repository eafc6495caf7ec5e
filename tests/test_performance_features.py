"""XLA bucketing, mixed precision, asynchronous logging and the benchmark's pieces (not timings)."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from growing_batch import bench, data, loop, models, schedules, tf_engine
from growing_batch.config import ConfigError, from_args


def test_bucket_sizes_pad_at_most_a_quarter_plus_rounding():
    assert [loop.bucket_size(b) for b in (1, 8, 9, 16, 17, 128, 129, 4096, 4526)] == [8, 8, 16, 16, 24, 128, 160, 4096, 4872]
    for batch in range(1, 20_000, 7):
        padded = loop.bucket_size(batch)
        assert batch <= padded <= 1.19 * batch + 8 and padded % 8 == 0
    # 40 epochs growing ×1.111 from 128 to 7,700 (six doublings): 40 batch sizes, 4 shapes per doubling
    sizes = {int(128 * 1.111**e) for e in range(40)}
    assert len(sizes) == 40 and len({loop.bucket_size(size) for size in sizes}) <= 4 * 6 + 1


def one_step(images, labels, model_name="small-cnn", **options):
    keras.utils.set_random_seed(0)
    model = (models.build("small-cnn", (28, 28, 1), 10, seed=0) if model_name == "small-cnn" else
             models.wide_resnet((28, 28, 1), 10, depth=10, width=1, ghost_batch_size=8, weight_decay=5e-4, seed=0))
    models.compile_for_training(model, models.build_optimizer("sgd", 0.1))
    step = tf_engine.TrainStep(model, **options)
    logs = step(tf.constant(images), tf.constant(labels))
    return [w.numpy() for w in model.trainable_variables], {k: float(v) for k, v in logs.items()}, step


def test_xla_pads_augmented_batches_of_any_size():
    """The padded rows get augmentation draws too (a batch of 37 runs as 40), and training goes on."""
    rng = np.random.default_rng(0)
    split = data.Split(rng.integers(0, 256, (74, 28, 28, 1)).astype(np.uint8), rng.integers(0, 10, 74).astype(np.int32))
    keras.utils.set_random_seed(0)
    model = models.compile_for_training(models.build("small-cnn", (28, 28, 1), 10), models.build_optimizer("sgd", 0.05))
    batches = data.EpochBatches(split, seed=0, augment=True)
    schedule = functools.partial(schedules.constant, learning_rate=0.05, batch_size=37)
    trainer = loop.Trainer(model, batches, schedule, jit_compile=True)
    history = trainer.fit(epochs=2, verbose=0)
    assert trainer.step.compiled_shapes == {40} and history.history["updates"] == [2, 4]
    assert np.isfinite(history.history["train_loss"]).all()


@pytest.mark.parametrize("model_name", ["small-cnn", "wrn-ghost-8"])
def test_padding_with_zero_weight_examples_leaves_the_update_exact(model_name):
    """37 examples padded to 40 (with a WRN: ghost batches of 8, the last holding 5 real examples and 3
    of padding, which its statistics leave out): the same weights, batch-norm statistics and logs."""
    rng = np.random.default_rng(0)
    images = rng.random((37, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 37).astype(np.int32)
    plain, plain_logs, plain_step = one_step(images, labels, model_name)
    padded, padded_logs, step = one_step(images, labels, model_name, jit_compile=True)
    assert step.compiled_shapes == {40}
    for a, b in zip(plain, padded):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(plain_step.model.non_trainable_variables, step.model.non_trainable_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6)
    assert padded_logs == pytest.approx(plain_logs, rel=1e-5)


def test_xla_run_compiles_once_per_bucket(fashion_dir):
    splits = data.load("fashion_mnist", fashion_dir, validation_size=40)
    model = models.compile_for_training(models.build("small-cnn", (28, 28, 1), 10), models.build_optimizer("sgd", 0.05))
    batches = data.EpochBatches(splits.train, seed=0)
    schedule = functools.partial(schedules.batch_growth, learning_rate=0.05, batch_size=10, batch_growth=1.3,
                                 max_batch_size=200)
    trainer = loop.Trainer(model, batches, schedule, jit_compile=True)
    history = trainer.fit(epochs=6, verbose=0)
    sizes = history.history["batch_size"]
    shapes = {loop.bucket_size(s) for s in sizes}  # every batch is full: one shape per batch size
    assert trainer.step.compiled_shapes == shapes
    assert trainer.step.traces == 1
    assert np.isfinite(history.history["train_loss"]).all()


def test_mixed_bfloat16_trains_with_float32_logits_and_weights(fashion_dir):
    splits = data.load("fashion_mnist", fashion_dir, validation_size=40)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = models.build("small-cnn", (28, 28, 1), 10)
        models.compile_for_training(model, models.build_optimizer("sgd", 0.1))
        batches = data.EpochBatches(splits.train, seed=0)
        schedule = functools.partial(schedules.constant, learning_rate=0.1, batch_size=20)
        history = loop.Trainer(model, batches, schedule, evaluation={"test": data.evaluation_batches(splits.test, 64)}).fit(
            epochs=3, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.layers[1].compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert model.output.dtype == "float32"
    assert history.history["train_loss"][-1] < history.history["train_loss"][0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--precision", "float16"], "precision='float16' is not allowed: expected one of float32, mixed_bfloat16"),
        (["--jit_compile", "true", "--model", "wrn-16-4"],  # plain batch norm would see the padding
         "ghost_batch_size='0' is not allowed: expected > 0 for model wrn-16-4 with jit_compile or backend jax"),
        (["--jit_compile", "true", "--model", "wrn-16-4", "--ghost_batch_size", "16", "--max_device_batch_size", "32"],
         "jit_compile='true' is not allowed: expected false with max_device_batch_size"),
    ],
)
def test_performance_options_are_validated(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_args(argv)


def test_forward_flops_of_the_small_cnn():
    model = models.build("small-cnn", (32, 32, 3), 10)
    expected = 2 * (15 * 15 * 32 * 27 + 7 * 7 * 32 * 288 + 6 * 6 * 16 * 32 + 576 * 512 + 512 * 10)
    assert bench.forward_flops(model) == expected == 1_928_896


def test_a_growing_run_with_30_batch_sizes_traces_the_train_step_once():
    result = bench.count_traces(30)
    assert result["distinct_batch_sizes"] >= 30
    assert result["train_step_traces"] == 1


def test_matmul_peak_is_a_positive_rate():
    assert bench.matmul_peak(64, "float32", repetitions=2) > 0


def test_the_noise_scale_cost_is_measured_against_an_epoch():
    cost = bench.noise_scale_cost(bench.synthetic_splits(512, 128), repetitions=2, batch_size=64)
    assert cost["probe_examples"] == 512 and cost["batch_size"] == 64
    assert cost["probe_seconds"] > 0 and cost["fraction"] == pytest.approx(cost["probe_seconds"] / cost["epoch_seconds"])
