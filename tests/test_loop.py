"""The callback-driven loop: schedules applied per epoch, Keras hooks in order, one trace."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from growing_batch import checkpoint, data, loop, models, schedules, tf_engine


@pytest.fixture(scope="module")
def splits(fashion_dir):
    return data.load("fashion_mnist", fashion_dir, validation_size=40, seed=0)


def make_model(splits, learning_rate=0.1, momentum=0.0, seed=0):
    keras.utils.set_random_seed(seed)
    model = models.build("small-cnn", splits.image_shape, splits.num_classes, seed)
    return models.compile_for_training(model, models.build_optimizer("sgd", learning_rate, momentum))


class Recorder(keras.callbacks.Callback):
    """Records every hook, and the learning rate and batch size each batch actually saw."""

    def __init__(self):
        super().__init__()
        self.calls, self.batch_sizes, self.rates = [], {}, {}
        self.epoch = None

    def on_train_begin(self, logs=None):
        self.calls.append("train_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.calls.append(f"epoch_begin {epoch}")

    def on_train_batch_begin(self, batch, logs=None):
        self.calls.append(f"batch_begin {batch}")

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(f"batch_end {batch}")
        self.rates.setdefault(self.epoch, set()).add(float(self.model.optimizer.learning_rate.numpy()))
        assert set(logs) == {"train_loss", "train_accuracy"}

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(f"epoch_end {epoch}")
        self.batch_sizes[epoch] = logs["batch_size"]

    def on_train_end(self, logs=None):
        self.calls.append("train_end")


def train(splits, schedule, epochs, callbacks=(), model=None, return_trainer=False):
    model = model or make_model(splits)
    batches = data.EpochBatches(splits.train, seed=0)
    evaluation = {"val": data.evaluation_batches(splits.validation, 64), "test": data.evaluation_batches(splits.test, 64)}
    trainer = loop.Trainer(model, batches, schedule, evaluation=evaluation)
    history = trainer.fit(epochs=epochs, callbacks=callbacks, verbose=0)
    return (model, history, trainer) if return_trainer else (model, history)


def test_growing_batch_is_applied_every_epoch_without_retracing(splits):
    n = len(splits.train)  # 200
    schedule = functools.partial(schedules.batch_growth, learning_rate=0.05, batch_size=8, batch_growth=2.0, max_batch_size=n)
    recorder = Recorder()
    model, history, trainer = train(splits, schedule, epochs=5, callbacks=[recorder], return_trainer=True)
    expected_sizes = [8, 16, 32, 64, 128]
    assert history.history["batch_size"] == expected_sizes
    assert recorder.batch_sizes == dict(enumerate(expected_sizes))
    # every batch full, the leftover topped up from the next epoch: 200/8 = 25, then 13 batches of 16
    # (8 examples carried), 192/32 = 6, 4 of 64 (56 carried), 2 of 128
    steps = [25, 13, 6, 4, 2]
    assert history.history["updates"] == list(np.cumsum(steps))
    assert history.history["updates"] == [row["updates"] for row in schedules.table(schedule, 5, n)]
    assert history.history["examples_seen"] == [200, 408, 600, 856, 1112]  # epochs · N + carried
    increments = np.diff([0, *history.history["examples_seen"]])
    assert list(increments) == [size * count for size, count in zip(expected_sizes, steps)]  # each update: B
    assert trainer.step.traces == 1  # five batch sizes, one trace
    assert int(model.optimizer.iterations.numpy()) == sum(steps)


def test_learning_rate_follows_the_schedule_in_the_optimizer(splits):
    schedule = functools.partial(schedules.lr_decay, learning_rate=0.1, batch_size=50, lr_decay=0.5)
    recorder = Recorder()
    _, history = train(splits, schedule, epochs=3, callbacks=[recorder])
    assert history.history["learning_rate"] == [0.1, 0.05, 0.025]
    assert {epoch: len(rates) for epoch, rates in recorder.rates.items()} == {0: 1, 1: 1, 2: 1}
    assert [rates.pop() for _, rates in sorted(recorder.rates.items())] == pytest.approx([0.1, 0.05, 0.025])
    assert history.history["noise_scale"] == pytest.approx([0.1 * 200 / 50, 0.05 * 200 / 50, 0.025 * 200 / 50])


def test_callback_hooks_fire_in_keras_order(splits):
    schedule = functools.partial(schedules.batch_growth, learning_rate=0.05, batch_size=100, batch_growth=2.0, max_batch_size=200)
    recorder = Recorder()
    train(splits, schedule, epochs=2, callbacks=[recorder])
    assert recorder.calls == [
        "train_begin",
        "epoch_begin 0", "batch_begin 0", "batch_end 0", "batch_begin 1", "batch_end 1", "epoch_end 0",
        "epoch_begin 1", "batch_begin 0", "batch_end 0", "epoch_end 1",
        "train_end",
    ]


def test_epoch_logs_hold_every_metric(splits):
    schedule = functools.partial(schedules.constant, learning_rate=0.05, batch_size=32)
    _, history = train(splits, schedule, epochs=2)
    assert set(history.history) == {
        "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
        "learning_rate", "batch_size", "momentum", "noise_scale", "updates", "examples_seen",
        "epoch_seconds", "examples_per_second",
    }
    assert all(len(values) == 2 for values in history.history.values())


def test_it_learns_the_toy_problem(splits):
    schedule = functools.partial(schedules.constant, learning_rate=0.1, batch_size=16)
    _, history = train(splits, schedule, epochs=4)
    assert history.history["train_loss"][-1] < 0.5 * history.history["train_loss"][0]
    assert history.history["test_accuracy"][-1] > 0.5  # chance is 0.1


def test_stop_training_ends_the_loop(splits):
    class StopAfterFirst(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    schedule = functools.partial(schedules.constant, learning_rate=0.1, batch_size=100)
    _, history = train(splits, schedule, epochs=5, callbacks=[StopAfterFirst()])
    assert len(history.history["updates"]) == 1


def test_one_full_batch_epoch_is_one_plain_sgd_step(splits):
    """The train step applies w <- w - ε · mean gradient over the batch, nothing else."""
    n = len(splits.train)
    model = make_model(splits, learning_rate=0.3)
    before = [w.numpy().copy() for w in model.trainable_variables]
    images, labels = data.scale(splits.train.images), splits.train.labels
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(labels, model(images, training=True), from_logits=True)
        loss = tf.reduce_mean(loss)
    gradients = tape.gradient(loss, model.trainable_variables)
    train(splits, functools.partial(schedules.constant, learning_rate=0.3, batch_size=n), epochs=1, model=model)
    for start, gradient, after in zip(before, gradients, model.trainable_variables):
        np.testing.assert_allclose(after.numpy(), start - 0.3 * gradient.numpy(), rtol=1e-4, atol=1e-6)


def test_a_momentum_change_the_optimizer_cannot_apply_is_an_error(splits):
    schedule = functools.partial(schedules.constant, learning_rate=0.1, batch_size=100, momentum=0.9)
    with pytest.raises(ValueError, match="sets momentum 0.9 at epoch 1, but the optimizer's momentum is fixed at 0.0"):
        train(splits, schedule, epochs=1)


def test_one_accumulated_update_equals_one_full_batch_update():
    """Micro-batches of 32 with gradient accumulation give the update of the whole batch of 96."""
    rng = np.random.default_rng(0)
    images = rng.random((96, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 96).astype(np.int32)

    def one_update(max_device_batch_size):
        keras.utils.set_random_seed(0)
        model = models.wide_resnet((8, 8, 3), 4, depth=10, width=1, ghost_batch_size=16, weight_decay=5e-4, seed=0)
        models.compile_for_training(model, models.build_optimizer("sgd", 0.5, momentum=0.9))
        step = tf_engine.TrainStep(model, max_device_batch_size=max_device_batch_size)
        logs = step(tf.constant(images), tf.constant(labels))
        return [w.numpy() for w in model.trainable_variables], {k: float(v) for k, v in logs.items()}, step

    full, full_logs, full_step = one_update(0)
    accumulated, accumulated_logs, accumulated_step = one_update(32)
    assert full_step.traces == 1 and accumulated_step.traces == 2
    assert int(accumulated_step.model.optimizer.iterations.numpy()) == 1
    for a, b in zip(full, accumulated):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert accumulated_logs == pytest.approx(full_logs, rel=1e-5)


def test_augmentation_crops_and_flips_reproducibly():
    images = tf.reshape(tf.range(2 * 6 * 6 * 1, dtype=tf.float32) + 1, (2, 6, 6, 1))
    seed = tf.constant([3, 7], tf.int64)
    first = data.augment(images, seed, padding=2).numpy()
    np.testing.assert_array_equal(first, data.augment(images, seed, padding=2).numpy())
    assert first.shape == (2, 6, 6, 1)
    # every output is a shifted (and maybe mirrored) window of the reflect-padded image (the WRN recipe)
    for index in range(2):
        padded = np.pad(images[index].numpy(), [(2, 2), (2, 2), (0, 0)], mode="reflect")
        windows = [padded[top:top + 6, left:left + 6] for top in range(5) for left in range(5)]
        windows += [window[:, ::-1] for window in windows]
        assert any(np.array_equal(first[index], window) for window in windows)
    draws = {data.augment(images, tf.constant([3, s], tf.int64), padding=2).numpy().tobytes() for s in range(20)}
    assert len(draws) > 10  # different seeds, different crops


def test_augmented_epochs_differ_but_repeat_with_the_seed(splits):
    batches = data.EpochBatches(splits.train, seed=0, augment=True)
    batches.batch_size = 50
    first = [images.numpy() for images, _ in batches.dataset(epoch=0)]
    again = [images.numpy() for images, _ in batches.dataset(epoch=0)]
    plain = data.EpochBatches(splits.train, seed=0)
    plain.batch_size = 50
    unaugmented = [images.numpy() for images, _ in plain.dataset(epoch=0)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, unaugmented))


def test_fitting_again_continues_with_the_same_compiled_step(splits):
    schedule = functools.partial(schedules.batch_growth, learning_rate=0.05, batch_size=50, batch_growth=1.4,
                                 max_batch_size=200)
    model, first, trainer = train(splits, schedule, epochs=1, return_trainer=True)
    state = checkpoint.State(config={}, epoch=1, updates=int(first.history["updates"][-1]),
                             examples_seen=int(first.history["examples_seen"][-1]))
    second = trainer.fit(state, 2, verbose=0)
    assert second.history["batch_size"] == [70] and second.history["updates"] == [4 + 3]  # 200/50, then 200/70
    assert trainer.step.traces == 1


def test_batch_hooks_are_detected():
    class PerBatch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            pass

    assert loop._has_batch_hooks(PerBatch())
    assert loop._has_batch_hooks(loop.EpochProgbarLogger())
    assert not loop._has_batch_hooks(keras.callbacks.Callback())


def test_accumulated_update_sees_the_same_augmented_images_as_the_whole_batch():
    """With augmentation, micro-batches draw their crops and flips as slices of the whole batch's."""
    rng = np.random.default_rng(1)
    split = data.Split(rng.integers(0, 256, (60, 16, 16, 3)).astype(np.uint8), rng.integers(0, 4, 60).astype(np.int32))
    batches = data.EpochBatches(split, seed=5, augment=True)
    batches.batch_size = 48
    indices = batches.index_batches(epoch=2)[0]

    def one_update(max_device_batch_size):
        keras.utils.set_random_seed(0)
        model = models.build("small-cnn", (16, 16, 3), 4, seed=0)
        models.compile_for_training(model, models.build_optimizer("sgd", 0.5))
        step = tf_engine.TrainStep(model, max_device_batch_size=max_device_batch_size, augment=True,
                              image_dtype=batches.images.dtype)
        step(batches.images, batches.labels, indices, batches.batch_seed(2, 0))
        return [w.numpy() for w in model.trainable_variables]

    whole, split_in_three = one_update(0), one_update(16)
    for a, b in zip(whole, split_in_three):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    seed = tf.constant(batches.batch_seed(2, 0))
    images = data.to_unit_range(tf.gather(batches.images, indices))
    np.testing.assert_array_equal(
        data.augment(images, seed).numpy()[16:32], data.augment(images[16:32], seed, offset=16, total=48).numpy()
    )


def test_evaluation_slices_the_split_held_on_the_device(splits):
    model = make_model(splits)
    evaluation = data.evaluation_batches(splits.test, 30)
    assert [stop - start for start, stop in evaluation.bounds()] == [30, 30, 20]
    loss, accuracy = tf_engine.Evaluator(model)(evaluation)
    logits = model.predict(data.scale(splits.test.images), verbose=0)
    expected_loss = keras.losses.sparse_categorical_crossentropy(splits.test.labels, logits, from_logits=True)
    assert loss == pytest.approx(float(np.mean(expected_loss)), rel=1e-5)
    assert accuracy == pytest.approx(float(np.mean(logits.argmax(-1) == splits.test.labels)))
