"""The reproduction's CNN, layer by layer."""

import numpy as np
import pytest

from growing_batch import models


def test_small_cnn_on_cifar_has_the_reproductions_311k_parameters():
    model = models.build("small-cnn", (32, 32, 3), 10)
    assert model.count_params() == 311_162
    shapes = [tuple(layer.output.shape[1:]) for layer in model.layers[1:]]
    assert shapes == [(15, 15, 32), (7, 7, 32), (6, 6, 32), (6, 6, 16), (576,), (512,), (10,)]


def test_small_cnn_layers_follow_the_reproduction():
    model = models.build("small-cnn", (28, 28, 1), 10)
    assert model.count_params() == 220_474
    conv1, conv2, pool, conv3, _, dense, logits = model.layers[1:]
    assert (conv1.strides, conv1.padding, conv1.use_bias, conv1.activation.__name__) == ((2, 2), "valid", False, "relu")
    assert (conv2.strides, conv2.padding, conv2.use_bias) == ((2, 2), "valid", False)
    assert (pool.pool_size, pool.strides, pool.padding) == ((2, 2), (1, 1), "valid")
    assert (conv3.kernel_size, conv3.padding, conv3.use_bias, conv3.activation.__name__) == ((1, 1), "same", True, "linear")
    assert dense.activation.__name__ == "relu" and logits.activation.__name__ == "linear"
    assert all(type(layer.kernel_initializer).__name__ == "GlorotNormal" for layer in (conv1, conv2, conv3, dense, logits))


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
