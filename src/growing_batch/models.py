"""Models: the small-CNN reproduction's network, exactly.

``small-cnn`` (311,162 parameters on 32×32×3 CIFAR images, 220,474 on 28×28×1):

    conv 3×3×32, stride 2, VALID, ReLU, no bias       32×32×3 -> 15×15×32   (28×28×1 -> 13×13×32)
    conv 3×3×32, stride 2, VALID, ReLU, no bias       -> 7×7×32             (-> 6×6×32)
    max-pool 2×2, stride 1, VALID                     -> 6×6×32             (-> 5×5×32)
    conv 1×1×16, SAME, with bias, no activation       -> 6×6×16             (-> 5×5×16)
    flatten                                           -> 576                (-> 400)
    dense 512, ReLU
    dense to one logit per class

Glorot-normal initialisation throughout; trained with softmax cross-entropy on the logits.
The 1×1 convolution has no activation, as in the reproduction's code (its README says ReLU).
No batch norm, dropout or weight decay.
"""

from __future__ import annotations

import keras

from growing_batch.config import MODELS


def small_cnn(image_shape: tuple[int, int, int], num_classes: int, seed: int = 0) -> keras.Model:
    def init(offset: int):
        return keras.initializers.GlorotNormal(seed=seed * 1000 + offset)

    inputs = keras.Input(shape=image_shape, name="images")
    x = keras.layers.Conv2D(32, 3, strides=2, padding="valid", activation="relu", use_bias=False,
                            kernel_initializer=init(1), name="conv1")(inputs)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="valid", activation="relu", use_bias=False,
                            kernel_initializer=init(2), name="conv2")(x)
    x = keras.layers.MaxPooling2D(pool_size=2, strides=1, padding="valid", name="pool")(x)
    x = keras.layers.Conv2D(16, 1, padding="same", kernel_initializer=init(3), name="conv3")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(512, activation="relu", kernel_initializer=init(4), name="dense")(x)
    logits = keras.layers.Dense(num_classes, kernel_initializer=init(5), name="logits")(x)
    return keras.Model(inputs, logits, name="small_cnn")


def build(name: str, image_shape: tuple[int, int, int], num_classes: int, seed: int = 0) -> keras.Model:
    if name == "small-cnn":
        return small_cnn(image_shape, num_classes, seed)
    raise ValueError(f"model={name!r} is not allowed: expected one of {', '.join(MODELS)}.")


def build_optimizer(name: str, learning_rate: float, momentum: float = 0.0, nesterov: bool = False):
    """``sgd`` (plain, momentum or Nesterov) or ``adam`` (``momentum`` is its beta_1; beta_2 0.999).

    The learning rate is a variable that the schedule callback assigns every epoch.
    """
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate, beta_1=momentum, beta_2=0.999)
    raise ValueError(f"optimizer={name!r} is not allowed: expected one of sgd, adam.")


def compile_for_training(model: keras.Model, optimizer) -> keras.Model:
    """Attach the optimizer and the softmax cross-entropy loss on logits; build the optimizer."""
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    optimizer.build(model.trainable_variables)
    return model
