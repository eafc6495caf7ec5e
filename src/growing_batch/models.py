"""Models: the small-CNN reproduction's network, and the paper's 16-4 wide ResNet.

``small-cnn`` (311,146 parameters on 32×32×3 CIFAR images, 220,458 on 28×28×1), exactly the
reproduction's network:

    conv 3×3×32, stride 2, VALID, ReLU, no bias       32×32×3 -> 15×15×32   (28×28×1 -> 13×13×32)
    conv 3×3×32, stride 2, VALID, ReLU, no bias       -> 7×7×32             (-> 6×6×32)
    max-pool 2×2, stride 1, VALID                     -> 6×6×32             (-> 5×5×32)
    conv 1×1×16, SAME, no bias, no activation         -> 6×6×16             (-> 5×5×16)
    flatten                                           -> 576                (-> 400)
    dense 512, ReLU (bias, zero-initialised)
    dense to one logit per class (bias, zero-initialised)

Inputs are pixels / 255. Kernels start as TF 1.3's ``glorot_normal_initializer`` did: a truncated
normal whose *parameter* is √(2/(fan_in + fan_out)), without Keras' correction for the truncation
(so the sample standard deviation is 0.88 of that; Keras' ``GlorotNormal`` starts 14 % larger):
``VarianceScaling(scale=0.87962566², mode="fan_avg", distribution="truncated_normal")``.
The 1×1 convolution has no activation, as in the reproduction's code (its README says ReLU).
No batch norm or dropout; no weight decay unless ``weight_decay`` is set. Trained with softmax
cross-entropy on the logits.

``wrn-16-4`` (2,748,890 trainable parameters on CIFAR-10, plus 3,616 batch-norm statistics), Zagoruyko & Komodakis' wide ResNet for CIFAR,
depth 16 and width 4, pre-activation blocks, as the paper trains it:

    standardise per channel: (x − mean) / std, the training split's statistics (a fixed layer)
    conv 3×3×16
    3 groups × 2 blocks of [BN-ReLU-conv 3×3, BN-ReLU-conv 3×3] + shortcut, widths 64, 128, 256,
    the first block of groups 2 and 3 with stride 2 (a 1×1 conv shortcut where the shape changes)
    BN-ReLU, global average pool, dense to logits

He-normal initialisation, convolutions without bias. With ``ghost_batch_size`` > 0 every batch norm
is a :class:`GhostBatchNormalization`: its statistics come from fixed virtual batches of that size
(the paper's 128), so the mean gradient does not depend on the batch size. The standardisation is
part of the model, so the logged model takes images in [0, 1] like the small CNN.

Weight decay λ is SGD's (PyTorch's ``weight_decay``: w ← w − ε(∇ + λw), the original WRN recipe's
λ = 5e-4), added to the loss as the L2 penalty (λ/2)·||w||² on **every trainable parameter**:
kernels, biases, and batch-norm scales and offsets, as Zagoruyko & Komodakis' SGD applies it.
"""

from __future__ import annotations

import contextlib
import threading

import keras
import numpy as np

from growing_batch.config import MODELS


def _regularizer(weight_decay: float):
    return keras.regularizers.L2(weight_decay / 2) if weight_decay > 0 else None


class _ExampleWeights(threading.local):
    values = None  # this thread's batch's per-example weights while a train step traces its model call


_EXAMPLE_WEIGHTS = _ExampleWeights()


@contextlib.contextmanager
def example_weights(weights):
    """Within this block, :class:`GhostBatchNormalization` computes its training statistics with these
    per-example weights (shape (batch,); 0 for the padding that fills a batch up to a compiled size),
    so that padding never enters the batch statistics. The train steps of both engines call the model
    inside it; outside, every example weighs 1. Per thread (TensorFlow's replicas trace in threads of their own)."""
    previous, _EXAMPLE_WEIGHTS.values = _EXAMPLE_WEIGHTS.values, weights
    try:
        yield
    finally:
        _EXAMPLE_WEIGHTS.values = previous


@keras.saving.register_keras_serializable(package="growing_batch")
class GhostBatchNormalization(keras.layers.Layer):
    """Batch norm whose training statistics come from virtual batches of ``ghost_batch_size``.

    Examples 0..g−1 of a batch form the first ghost batch, g..2g−1 the second, and so on; a last,
    smaller ghost batch takes the remainder. Each is normalised by its own mean and variance
    (over examples and spatial positions, per channel). The moving statistics used at inference
    follow the mean of the ghost batches' statistics with ``momentum``, like BatchNormalization.
    Works for any batch size without retracing (the number of ghost batches is computed in-graph).

    Written in ``keras.ops``: the same layer on TensorFlow and JAX. Inside :func:`example_weights`
    the statistics are weighted by the examples' weights: zero-weight padding takes no part in them
    (a ghost batch of padding alone is normalised by mean 0, variance 0 and left out of the moving
    statistics), so a padded batch trains exactly like the unpadded one.
    """

    def __init__(self, ghost_batch_size: int = 128, momentum: float = 0.9, epsilon: float = 1e-5,
                 regularizer=None, **kwargs):
        super().__init__(**kwargs)
        self.ghost_batch_size = int(ghost_batch_size)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.regularizer = keras.regularizers.get(regularizer)  # on gamma and beta (weight decay)

    def build(self, input_shape):
        channels = (input_shape[-1],)
        # autocast=False: under mixed precision these stay float32 inside call, where the statistics are
        self.gamma = self.add_weight(shape=channels, initializer="ones", name="gamma", autocast=False,
                                     regularizer=self.regularizer)
        self.beta = self.add_weight(shape=channels, initializer="zeros", name="beta", autocast=False,
                                    regularizer=self.regularizer)
        self.moving_mean = self.add_weight(
            shape=channels, initializer="zeros", name="moving_mean", trainable=False, autocast=False,
            aggregation="mean",  # on several replicas: the mean of their updates
        )
        self.moving_variance = self.add_weight(
            shape=channels, initializer="ones", name="moving_variance", trainable=False, autocast=False,
            aggregation="mean",
        )

    def call(self, inputs, training=False):
        ops = keras.ops
        compute_dtype = inputs.dtype
        inputs = ops.cast(inputs, "float32")  # statistics in float32, also under mixed precision
        if not training:
            scale = ops.rsqrt(self.moving_variance + self.epsilon) * self.gamma
            return ops.cast((inputs - self.moving_mean) * scale + self.beta, compute_dtype)
        batch = ops.shape(inputs)[0]  # a Python int on JAX; a tensor on TensorFlow when the batch is unknown
        groups = ops.floor_divide(ops.arange(batch, dtype="int32"), self.ghost_batch_size)
        count = (batch + self.ghost_batch_size - 1) // self.ghost_batch_size
        weights = _EXAMPLE_WEIGHTS.values
        weights = ops.ones((batch,), "float32") if weights is None else ops.cast(weights, "float32")
        axes = list(range(1, len(inputs.shape) - 1))
        spatial = float(np.prod(inputs.shape[1:-1]))
        sizes = ops.segment_sum(weights, groups, num_segments=count) * spatial  # weighted values per ghost batch
        present = ops.cast(sizes > 0, "float32")  # ghost batches with a real example
        column = (-1,) + (1,) * len(axes)

        def per_ghost_batch_mean(values):  # (batch, ..., channels) -> (count, channels), weighted
            sums = ops.segment_sum(ops.sum(values, axes) * weights[:, None], groups, num_segments=count)
            return sums / ops.maximum(sizes, 1.0)[:, None]

        def per_example(statistic):  # (count, channels) -> (batch, 1, ..., 1, channels)
            return ops.reshape(ops.take(statistic, groups, axis=0), column + (inputs.shape[-1],))

        mean = per_ghost_batch_mean(inputs)
        centred = inputs - per_example(mean)
        variance = per_ghost_batch_mean(ops.square(centred))
        outputs = centred * per_example(ops.rsqrt(variance + self.epsilon)) * self.gamma + self.beta

        def over_ghost_batches(statistic):  # the mean over the ghost batches that hold a real example
            return ops.sum(statistic * present[:, None], 0) / ops.maximum(ops.sum(present), 1.0)

        self.moving_mean.assign(self.momentum * self.moving_mean + (1 - self.momentum) * over_ghost_batches(mean))
        self.moving_variance.assign(
            self.momentum * self.moving_variance + (1 - self.momentum) * over_ghost_batches(variance)
        )
        return ops.cast(outputs, compute_dtype)

    def get_config(self):
        return {**super().get_config(), "ghost_batch_size": self.ghost_batch_size,
                "momentum": self.momentum, "epsilon": self.epsilon,
                "regularizer": keras.regularizers.serialize(self.regularizer)}


def _batch_norm(ghost_batch_size: int, name: str, regularizer=None):
    if ghost_batch_size > 0:
        return GhostBatchNormalization(ghost_batch_size, momentum=0.9, epsilon=1e-5, regularizer=regularizer, name=name)
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, gamma_regularizer=regularizer,
                                           beta_regularizer=regularizer, name=name)


def wide_resnet(
    image_shape: tuple[int, int, int],
    num_classes: int,
    depth: int = 16,
    width: int = 4,
    ghost_batch_size: int = 0,
    weight_decay: float = 0.0,
    seed: int = 0,
    standardization: tuple | None = None,
) -> keras.Model:
    """Zagoruyko & Komodakis' pre-activation wide ResNet for CIFAR (WRN-depth-width).

    ``standardization``: the per-channel (mean, std) of the training images on the [0, 1] scale
    (:func:`channel_statistics`); None: no standardisation layer.
    """
    if (depth - 4) % 6:
        raise ValueError(f"depth must be 6n + 4 for a wide ResNet, received {depth}.")
    blocks_per_group = (depth - 4) // 6
    regularizer = _regularizer(weight_decay)
    counter = iter(range(1, 10_000))

    def conv(filters, size, strides, name):
        return keras.layers.Conv2D(
            filters, size, strides=strides, padding="same", use_bias=False,
            kernel_initializer=keras.initializers.HeNormal(seed=seed * 1000 + next(counter)),
            kernel_regularizer=regularizer, name=name,
        )

    def norm_relu(x, name):
        return keras.layers.ReLU(name=f"{name}_relu")(_batch_norm(ghost_batch_size, f"{name}_bn", regularizer)(x))

    inputs = keras.Input(shape=image_shape, name="images")
    x = inputs
    if standardization is not None:
        mean, std = standardization
        x = keras.layers.Normalization(mean=list(mean), variance=[value**2 for value in std], dtype="float32",
                                       name="standardize")(x)
    x = conv(16, 3, 1, "stem")(x)
    for group, filters in enumerate((16 * width, 32 * width, 64 * width), start=1):
        for block in range(blocks_per_group):
            name = f"group{group}_block{block + 1}"
            strides = 2 if group > 1 and block == 0 else 1
            activated = norm_relu(x, f"{name}_pre")
            y = conv(filters, 3, strides, f"{name}_conv1")(activated)
            y = conv(filters, 3, 1, f"{name}_conv2")(norm_relu(y, f"{name}_mid"))
            shortcut = x
            if strides != 1 or x.shape[-1] != filters:
                shortcut = conv(filters, 1, strides, f"{name}_shortcut")(activated)
            x = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    x = norm_relu(x, "final")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    logits = keras.layers.Dense(
        num_classes, kernel_initializer=keras.initializers.HeNormal(seed=seed * 1000 + next(counter)),
        kernel_regularizer=regularizer, bias_regularizer=regularizer, dtype="float32", name="logits",
    )(x)
    return keras.Model(inputs, logits, name=f"wrn_{depth}_{width}")


# Models whose inputs are standardised per channel by the training split's statistics (the WRN recipe).
STANDARDIZED_MODELS = ("wrn-16-4",)


def channel_statistics(images) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images, on the [0, 1] scale the model sees."""
    import numpy as np

    pixels = np.asarray(images).reshape(-1, np.asarray(images).shape[-1])
    total, squares = np.zeros(pixels.shape[1]), np.zeros(pixels.shape[1])
    for start in range(0, len(pixels), 1 << 22):  # float64 slices: no full-size float copy
        part = pixels[start:start + (1 << 22)].astype(np.float64) / 255.0
        total += part.sum(0)
        squares += np.square(part).sum(0)
    mean = total / len(pixels)
    std = np.sqrt(np.maximum(squares / len(pixels) - np.square(mean), 0.0))
    return [float(value) for value in mean], [float(value) if value > 0 else 1.0 for value in std]


def standardization_for(name: str, train_images) -> tuple[list[float], list[float]] | None:
    """The (mean, std) model ``name`` standardises its inputs with, from the training images; None for
    models that take pixels / 255 as they are (the small CNN, as in the reproduction)."""
    return channel_statistics(train_images) if name in STANDARDIZED_MODELS else None


def input_standardization(model: keras.Model) -> dict | None:
    """``{"mean": [...], "std": [...]}`` of the model's standardisation layer (for config.json), or None."""
    for layer in model.layers:
        if layer.name == "standardize":
            config = layer.get_config()
            return {"mean": [float(value) for value in config["mean"]],
                    "std": [float(value) ** 0.5 for value in config["variance"]]}
    return None


# TF 1.3's glorot_normal_initializer: a truncated normal with parameter √(2/(fan_in + fan_out)) and no
# truncation correction. Keras' VarianceScaling divides its parameter by 0.87962566 (the standard
# deviation of a unit normal truncated at ±2) to correct for it; this scale undoes that.
REPRODUCTION_INITIALIZER_SCALE = 0.87962566**2


def reproduction_initializer(seed: int) -> keras.initializers.Initializer:
    return keras.initializers.VarianceScaling(
        scale=REPRODUCTION_INITIALIZER_SCALE, mode="fan_avg", distribution="truncated_normal", seed=seed
    )


def small_cnn(
    image_shape: tuple[int, int, int], num_classes: int, seed: int = 0, weight_decay: float = 0.0
) -> keras.Model:
    regularizer = _regularizer(weight_decay)

    def init(offset: int):
        return reproduction_initializer(seed * 1000 + offset)

    inputs = keras.Input(shape=image_shape, name="images")
    x = keras.layers.Conv2D(32, 3, strides=2, padding="valid", activation="relu", use_bias=False,
                            kernel_initializer=init(1), kernel_regularizer=regularizer, name="conv1")(inputs)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="valid", activation="relu", use_bias=False,
                            kernel_initializer=init(2), kernel_regularizer=regularizer, name="conv2")(x)
    x = keras.layers.MaxPooling2D(pool_size=2, strides=1, padding="valid", name="pool")(x)
    x = keras.layers.Conv2D(16, 1, padding="same", use_bias=False, kernel_initializer=init(3),
                            kernel_regularizer=regularizer, name="conv3")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(512, activation="relu", kernel_initializer=init(4), kernel_regularizer=regularizer,
                           bias_regularizer=regularizer, name="dense")(x)
    logits = keras.layers.Dense(num_classes, kernel_initializer=init(5), kernel_regularizer=regularizer,
                                bias_regularizer=regularizer, dtype="float32",
                                name="logits")(x)  # float32 logits under mixed precision
    return keras.Model(inputs, logits, name="small_cnn")


def build(
    name: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    seed: int = 0,
    weight_decay: float = 0.0,
    ghost_batch_size: int = 0,
    standardization: tuple | None = None,
) -> keras.Model:
    """The model ``name``; ``standardization`` (per-channel mean and std) is the wide ResNet's input layer."""
    if name == "small-cnn":  # no batch norm: ghost_batch_size is for the wide ResNet (the config checks it)
        return small_cnn(image_shape, num_classes, seed, weight_decay)
    if name == "wrn-16-4":
        return wide_resnet(image_shape, num_classes, 16, 4, ghost_batch_size, weight_decay, seed, standardization)
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


def compile_for_training(model: keras.Model, optimizer, metrics=()) -> keras.Model:
    """Attach the optimizer and the softmax cross-entropy loss on logits; build the optimizer.

    The loop computes the loss per example with this loss, and the accuracy itself; ``metrics`` are
    for Keras' own ``fit`` (the benchmark's comparison).
    """
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=list(metrics),
    )
    optimizer.build(model.trainable_variables)
    return model
