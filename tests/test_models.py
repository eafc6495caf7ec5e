"""The reproduction's CNN, layer by layer."""

import numpy as np
import pytest

from growing_batch import models


def test_small_cnn_on_cifar_has_the_reproductions_311k_parameters():
    model = models.build("small-cnn", (32, 32, 3), 10)
    assert model.count_params() == 311_146  # no bias on conv1-conv3
    shapes = [tuple(layer.output.shape[1:]) for layer in model.layers[1:]]
    assert shapes == [(15, 15, 32), (7, 7, 32), (6, 6, 32), (6, 6, 16), (576,), (512,), (10,)]


def test_small_cnn_layers_follow_the_reproduction():
    model = models.build("small-cnn", (28, 28, 1), 10)
    assert model.count_params() == 220_458
    conv1, conv2, pool, conv3, _, dense, logits = model.layers[1:]
    assert (conv1.strides, conv1.padding, conv1.use_bias, conv1.activation.__name__) == ((2, 2), "valid", False, "relu")
    assert (conv2.strides, conv2.padding, conv2.use_bias) == ((2, 2), "valid", False)
    assert (pool.pool_size, pool.strides, pool.padding) == ((2, 2), (1, 1), "valid")
    assert (conv3.kernel_size, conv3.padding, conv3.use_bias, conv3.activation.__name__) == ((1, 1), "same", False, "linear")
    assert dense.activation.__name__ == "relu" and logits.activation.__name__ == "linear"
    for layer in (conv1, conv2, conv3, dense, logits):
        initializer = layer.kernel_initializer.get_config()
        assert (initializer["mode"], initializer["distribution"]) == ("fan_avg", "truncated_normal")
        assert initializer["scale"] == pytest.approx(0.87962566**2)
    assert not dense.bias.numpy().any() and not logits.bias.numpy().any()  # biases start at zero


def test_small_cnn_kernels_start_as_tf13_glorot_normal():
    """TF 1.3's truncated normal without the truncation correction: sample std 0.88 × √(2/(fan_in + fan_out))."""
    model = models.build("small-cnn", (32, 32, 3), 10, seed=3)
    kernel = model.get_layer("dense").kernel.numpy()
    fan_in, fan_out = kernel.shape
    assert kernel.std() / np.sqrt(2 / (fan_in + fan_out)) == pytest.approx(0.88, rel=0.03)
    assert np.abs(kernel).max() <= 2 * np.sqrt(2 / (fan_in + fan_out)) + 1e-6  # truncated at 2 parameters


def test_initialisation_is_seeded():
    first = models.build("small-cnn", (28, 28, 1), 10, seed=1).get_weights()
    again = models.build("small-cnn", (28, 28, 1), 10, seed=1).get_weights()
    other = models.build("small-cnn", (28, 28, 1), 10, seed=2).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def test_optimizers():
    sgd = models.build_optimizer("sgd", 0.1, momentum=0.9, nesterov=True)
    assert (sgd.momentum, sgd.nesterov) == (0.9, True)
    adam = models.build_optimizer("adam", 1e-3, momentum=0.9)
    assert (adam.beta_1, adam.beta_2) == (0.9, 0.999)
    with pytest.raises(ValueError, match="optimizer='lamb' is not allowed"):
        models.build_optimizer("lamb", 0.1)


def test_wrn_16_4_has_the_parameter_count_of_a_16_4_wide_resnet():
    model = models.build("wrn-16-4", (32, 32, 3), 10, ghost_batch_size=128)
    trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
    assert trainable == 2_748_890  # "≈2.7 M" (Zagoruyko & Komodakis: 2.7 M)
    assert sum(isinstance(layer, models.GhostBatchNormalization) for layer in model.layers) == 13
    assert model.output.shape[1:] == (10,)


def test_ghost_batch_norm_normalises_each_virtual_batch_on_its_own():
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    inputs = (rng.normal(size=(300, 4, 4, 3)) * [1, 2, 3] + [0, 5, -5]).astype(np.float32)
    ghost = models.GhostBatchNormalization(128, epsilon=1e-5)
    outputs = ghost(inputs, training=True).numpy()
    reference = keras.layers.BatchNormalization(epsilon=1e-5)
    for part in (slice(0, 128), slice(128, 256), slice(256, 300)):  # the last ghost batch holds 44
        expected = reference(inputs[part], training=True).numpy()
        np.testing.assert_allclose(outputs[part], expected, rtol=1e-4, atol=1e-4)
    # the moving statistics follow the mean of the ghost batches' statistics
    means = np.stack([inputs[p].mean(axis=(0, 1, 2)) for p in (slice(0, 128), slice(128, 256), slice(256, 300))])
    np.testing.assert_allclose(ghost.moving_mean.numpy(), 0.1 * means.mean(0), rtol=1e-4, atol=1e-5)
    # at inference it uses the moving statistics
    np.testing.assert_allclose(
        ghost(inputs[:5], training=False).numpy(),
        (inputs[:5] - ghost.moving_mean.numpy()) / np.sqrt(ghost.moving_variance.numpy() + 1e-5),
        rtol=1e-4, atol=1e-4,
    )
    # the mean gradient does not depend on the batch size: a batch of 256 = two ghost batches of 128
    function = tf.function(lambda x: ghost(x, training=True),
                           input_signature=[tf.TensorSpec((None, 4, 4, 3), tf.float32)])
    for size in (100, 256, 300):
        assert function(inputs[:size]).shape[0] == size
    assert len(function._list_all_concrete_functions()) == 1  # no retracing per batch size


@pytest.mark.parametrize("ghost_batch_size", [0, 8])
def test_weight_decay_is_the_sgd_style_l2_penalty_on_every_parameter(ghost_batch_size):
    """(λ/2)·Σ||w||² over every trainable variable: kernels, biases, batch-norm scales and offsets."""
    for model in (models.build("small-cnn", (28, 28, 1), 10, weight_decay=5e-4),
                  models.wide_resnet((8, 8, 3), 4, depth=10, width=1, ghost_batch_size=ghost_batch_size,
                                     weight_decay=5e-4)):
        for variable in model.trainable_variables:  # non-zero biases and offsets, so that each one counts
            variable.assign(np.full(variable.shape, 0.01, np.float32) + variable.numpy())
        expected = 5e-4 / 2 * sum(float(np.sum(variable.numpy() ** 2)) for variable in model.trainable_variables)
        assert len(model.losses) == len(model.trainable_variables)
        assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-5)
    assert models.build("small-cnn", (28, 28, 1), 10).losses == []


def test_the_wide_resnet_standardises_its_inputs_by_the_training_statistics():
    rng = np.random.default_rng(0)
    images = (rng.normal([120, 60, 200], [30, 10, 20], size=(64, 8, 8, 3))).clip(0, 255).astype(np.uint8)
    mean, std = models.standardization_for("wrn-16-4", images)
    np.testing.assert_allclose(mean, images.reshape(-1, 3).mean(0) / 255, rtol=1e-9)
    np.testing.assert_allclose(std, images.reshape(-1, 3).std(0) / 255, rtol=1e-9)
    assert models.standardization_for("small-cnn", images) is None  # the reproduction's plain /255
    model = models.wide_resnet((8, 8, 3), 4, depth=10, width=1, standardization=(mean, std))
    assert models.input_standardization(model) == {"mean": pytest.approx(mean), "std": pytest.approx(std)}
    standardized = model.get_layer("standardize")(images.astype(np.float32) / 255).numpy()
    np.testing.assert_allclose(standardized.reshape(-1, 3).mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(standardized.reshape(-1, 3).std(0), 1, atol=1e-3)
    assert models.input_standardization(models.build("small-cnn", (28, 28, 1), 4)) is None


def test_ghost_batch_norm_survives_saving(tmp_path):
    import keras

    model = models.wide_resnet((8, 8, 3), 4, depth=10, width=1, ghost_batch_size=8)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    sample = np.random.default_rng(0).random((3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(sample).numpy(), model(sample).numpy(), rtol=1e-5, atol=1e-6)
