"""Data: loading the image data sets, the validation split and the per-epoch batches.

Where the arrays come from, in order:

1. ``data_dir``, when given: the data set's files in Keras' own formats —
   ``mnist.npz``; Fashion-MNIST's four ``*-idx?-ubyte.gz`` files; ``cifar-10-batches-py/`` or
   ``cifar-100-python/`` (the folder itself or its parent).
2. Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``), for
   Fashion-MNIST, when installed.
3. Keras' loaders (``keras.datasets.*.load_data``), which read Keras' cache or download.

Images are read as ``uint8``; on the device a split is held as float32 scaled to [0, 1] when that
takes at most 2 GiB, else as ``uint8`` scaled batch by batch inside the train step. The validation split is drawn from the training set without replacement (the
reproduction sampled with replacement, so its N was 45,235 instead of 45,000).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct

import numpy as np

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"

FASHION_MNIST_FILES = (
    "train-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
)
NUM_CLASSES = {"fashion_mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100}
# Where Keras' loaders download from: the source recorded for data read through them.
KERAS_ORIGINS = {
    "fashion_mnist": "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    "mnist": "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
IMAGE_SHAPES = {
    "fashion_mnist": (28, 28, 1),
    "mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "cifar100": (32, 32, 3),
}


class DataError(RuntimeError):
    """The data set is missing, unreadable or too small. The message is one line and says why."""


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (n, height, width, channels)
    labels: np.ndarray  # int32, (n,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class DataSplits:
    name: str
    source: str  # where the arrays were read from: a folder, a file or a URL
    train: Split
    validation: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.name]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])


# --- readers of Keras' file formats -------------------------------------------------------------


def read_idx(path: str) -> np.ndarray:
    """Read a (gzipped) IDX file, the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            content = handle.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", content[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"bad magic number (type 0x{dtype_code:02x}, expected unsigned bytes)")
        shape = struct.unpack(f">{ndim}I", content[4 : 4 + 4 * ndim])
        data = np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(shape)):
            raise ValueError(f"holds {data.size} values, its header promises {int(np.prod(shape))}")
        return data.reshape(shape)
    except FileNotFoundError:
        raise DataError(f"missing data file {path}") from None
    except (OSError, EOFError, ValueError, struct.error) as error:
        raise DataError(f"corrupt or truncated IDX file {path}: {error}") from None


# What a CIFAR batch pickle may name: NumPy's array and scalar reconstructors (every NumPy version's
# module name) and bytes as Python 3 writes them in protocol 2. Dicts, lists, bytes, strings and
# numbers need no name. Anything else (os.system, builtins.eval, ...) is refused before it is called.
_CIFAR_PICKLE_NAMES = {
    *((module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


_CIFAR_FOLDERS = ("cifar-10-batches-py", "cifar-100-python")


class UntrustedPickle(pickle.UnpicklingError):
    """A pickle names something a CIFAR batch does not hold."""


class _CifarUnpickler(pickle.Unpickler):
    """Loads only what a CIFAR batch holds: dicts, lists, bytes, strings, numbers and NumPy arrays."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_PICKLE_NAMES:
            raise UntrustedPickle(f"{module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: str) -> dict:
    """A CIFAR batch file, read with a restricted unpickler: a crafted file cannot run code."""
    try:
        with open(path, "rb") as handle:
            return _CifarUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"missing data file {path}") from None
    except UntrustedPickle as error:
        folder = os.path.dirname(path)  # data_dir, or its cifar-10-batches-py/ or cifar-100-python/
        data_dir = os.path.dirname(folder) if os.path.basename(folder) in _CIFAR_FOLDERS else folder
        raise DataError(
            f"data_dir={data_dir!r} is not allowed: expected CIFAR batches that hold "
            f"only dicts, lists, bytes, strings, numbers and NumPy arrays, but {path} names {error} (refused, not run)"
        ) from None
    except Exception as error:  # a truncated pickle raises EOFError, UnpicklingError, ...
        raise DataError(
            f"corrupt or truncated CIFAR batch file {path}: {type(error).__name__}: {error}"
        ) from None


def _cifar_batch(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_pickle(path)
    try:
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int32)
    except (KeyError, ValueError, TypeError, IndexError) as error:
        raise DataError(f"corrupt CIFAR batch file {path}: {type(error).__name__}: {error}") from None
    if len(images) != len(labels):
        raise DataError(f"corrupt CIFAR batch file {path}: {len(images)} images, {len(labels)} labels")
    return images.transpose(0, 2, 3, 1), labels


def _find_folder(data_dir: str, folder: str) -> str:
    nested = os.path.join(data_dir, folder)
    return nested if os.path.isdir(nested) else data_dir


def read_local(name: str, data_dir: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Read ``(x_train, y_train), (x_test, y_test)`` from files in Keras' formats."""
    if name == "mnist":
        path = os.path.join(data_dir, "mnist.npz")
        try:
            with np.load(path) as archive:
                return (archive["x_train"], archive["y_train"]), (archive["x_test"], archive["y_test"])
        except FileNotFoundError:
            raise DataError(f"missing data file {path} (mnist expects Keras' mnist.npz)") from None
        except Exception as error:
            raise DataError(f"corrupt or truncated {path}: {type(error).__name__}: {error}") from None
    if name == "fashion_mnist":
        missing = [f for f in FASHION_MNIST_FILES if not os.path.exists(os.path.join(data_dir, f))]
        if missing:
            raise DataError(
                f"missing data files in {data_dir}: {', '.join(missing)} "
                f"(fashion_mnist expects the four IDX files {', '.join(FASHION_MNIST_FILES)})"
            )
        y_train, x_train, y_test, x_test = (
            read_idx(os.path.join(data_dir, f)) for f in FASHION_MNIST_FILES
        )
        return (x_train, y_train), (x_test, y_test)
    if name == "cifar10":
        folder = _find_folder(data_dir, "cifar-10-batches-py")
        parts = [_cifar_batch(os.path.join(folder, f"data_batch_{i}"), b"labels") for i in range(1, 6)]
        x_test, y_test = _cifar_batch(os.path.join(folder, "test_batch"), b"labels")
        x_train = np.concatenate([images for images, _ in parts])
        y_train = np.concatenate([labels for _, labels in parts])
        return (x_train, y_train), (x_test, y_test)
    if name == "cifar100":
        folder = _find_folder(data_dir, "cifar-100-python")
        missing = [name for name in ("train", "test") if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise DataError(
                f"missing data file(s) {', '.join(missing)} in {folder} (cifar100 expects the folder "
                "cifar-100-python/ with train and test, as in cifar-100-python.tar.gz, in data_dir or as data_dir)"
            )
        train = _cifar_batch(os.path.join(folder, "train"), b"fine_labels")
        test = _cifar_batch(os.path.join(folder, "test"), b"fine_labels")
        return train, test
    raise DataError(f"dataset={name!r} is not allowed: expected one of {', '.join(NUM_CLASSES)}")


def read_with_keras(name: str):
    """Keras' own loader: reads Keras' cache (~/.keras/datasets) or downloads."""
    import keras

    loader = getattr(keras.datasets, name)
    try:
        if name == "cifar100":
            return loader.load_data(label_mode="fine")
        return loader.load_data()
    except Exception as error:
        hint = (
            f"; or install Debian's package: apt-get install {DEBIAN_FASHION_MNIST_PACKAGE}"
            if name == "fashion_mnist"
            else ""
        )
        raise DataError(
            f"could not load {name} with Keras ({type(error).__name__}: {str(error)[:200]}); "
            f"download it where there is internet, or pass data_dir=<folder with its files>{hint}"
        ) from None


def read_arrays(name: str, data_dir: str = ""):
    """The raw arrays and a description of where they came from (see the module docstring)."""
    if data_dir:
        return read_local(name, data_dir), os.path.abspath(data_dir)
    if name == "fashion_mnist" and os.path.isdir(DEBIAN_FASHION_MNIST_DIR):
        return read_local(name, DEBIAN_FASHION_MNIST_DIR), DEBIAN_FASHION_MNIST_DIR
    return read_with_keras(name), KERAS_ORIGINS[name]


# --- the splits ---------------------------------------------------------------------------------


def _as_split(name: str, images: np.ndarray, labels: np.ndarray, what: str) -> Split:
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1).astype(np.int32)
    expected = IMAGE_SHAPES[name]
    if images.ndim == 3 and expected[2] == 1:
        images = images[..., np.newaxis]
    if images.shape[1:] != expected or images.dtype != np.uint8 or len(images) != len(labels):
        raise DataError(
            f"{name} {what} data has images {images.shape} {images.dtype} and {len(labels)} labels; "
            f"expected uint8 images of shape (n, {', '.join(map(str, expected))}) and n labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES[name]):
        raise DataError(
            f"{name} {what} labels range over {labels.min()}..{labels.max()}; "
            f"expected 0..{NUM_CLASSES[name] - 1}"
        )
    return Split(images, labels)


def split(name: str, source: str, train, test, validation_size: int, seed: int, max_examples: int = 0) -> DataSplits:
    """Hold out ``validation_size`` training examples, drawn without replacement with ``seed``.

    ``max_examples`` > 0 then keeps at most that many examples of each split (the first of the
    shuffled training and validation indices, the first of the test set).
    """
    full = _as_split(name, *train, "training")
    test_split = _as_split(name, *test, "test")
    if validation_size >= len(full):
        raise DataError(
            f"validation_size={validation_size} is not allowed: expected fewer than the "
            f"{len(full)} training examples of {name}"
        )
    order = np.random.default_rng(seed).permutation(len(full))
    limit = max_examples if max_examples > 0 else None
    validation_indices = order[:validation_size][:limit]
    train_indices = np.sort(order[validation_size:][:limit])
    return DataSplits(
        name=name,
        source=source,
        train=Split(full.images[train_indices], full.labels[train_indices]),
        validation=Split(full.images[validation_indices], full.labels[validation_indices]),
        test=Split(test_split.images[:limit], test_split.labels[:limit]),
    )


def load(name: str, data_dir: str = "", validation_size: int = 5000, seed: int = 0, max_examples: int = 0) -> DataSplits:
    """Read a data set and split it. Raises DataError with a one-line message on any fault."""
    if name not in NUM_CLASSES:
        raise DataError(f"dataset={name!r} is not allowed: expected one of {', '.join(NUM_CLASSES)}")
    (train, test), source = read_arrays(name, data_dir)
    return split(name, source, train, test, validation_size, seed, max_examples)


# --- the per-epoch batches ----------------------------------------------------------------------


# Splits up to this size as float32 are held scaled to [0, 1], so no batch needs converting; larger
# ones stay uint8 (a quarter of the memory) and are scaled batch by batch.
MAX_FLOAT_IMAGE_BYTES = 2 * 1024**3


def on_jax() -> bool:
    """Whether Keras runs on JAX (then splits are held as JAX arrays, and TensorFlow is not used)."""
    import keras

    return keras.backend.backend() == "jax"


def device_images(images: np.ndarray):
    """The images as one tensor: float32 in [0, 1] when that fits MAX_FLOAT_IMAGE_BYTES, else uint8."""
    values = scale(images) if images.size * 4 <= MAX_FLOAT_IMAGE_BYTES else images
    if on_jax():
        from growing_batch import jax_engine

        return jax_engine.device_array(values)
    import tensorflow as tf

    return tf.constant(values)


def to_unit_range(images):
    """A batch gathered from :func:`device_images` as float32 in [0, 1]."""
    import tensorflow as tf

    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / 255.0
    return images


# Standard CIFAR augmentation (Zagoruyko & Komodakis' wide-ResNet recipe): reflect-pad 4 pixels on
# each side, crop back at a random offset, flip left-right with probability 1/2.
AUGMENT_PADDING = 4


class EpochBatches:
    """The training set, re-batched every epoch at whatever batch size the schedule sets.

    Images live on the device as one tensor, ``images`` (see :func:`device_images`), with
    ``labels``. Each epoch draws a seeded permutation (seed, epoch) and cuts it into batches of
    indices (:meth:`index_batches`); the train step gathers, scales and augments a batch inside its
    own compiled graph (:func:`gather_batch`), so no per-epoch input pipeline is built and no
    batch crosses into Python.

    **Every batch holds exactly ``batch_size`` examples**, as in the reproduction's ``next_batch``:
    the leftover of an epoch's permutation is topped up with the first examples of the next epoch's
    permutation, that straddling batch belongs to the epoch it started in, and the next epoch starts
    after the examples it took (``carried``). So an update never sees a short batch with its larger
    noise, and ``examples_seen`` = epochs · N + ``carried`` (see
    :func:`growing_batch.schedules.epoch_updates`, which counts the updates).

    With ``augment``, each image is reflect-padded by 4 pixels, cropped back to its size at a random
    offset and flipped left-right with probability 1/2, on the fly; the random draws are stateless
    functions of (seed, epoch, batch index) — :meth:`batch_seed` — so a run is reproducible.
    """

    def __init__(self, split: Split, seed: int, augment: bool = False):
        self.size = len(split)
        self.seed = seed
        self.augment = augment
        self.batch_size = 1
        self.carried = 0  # examples of the coming epoch's permutation the previous epoch's last batch took
        self.images = device_images(split.images)
        self.labels = device_labels(split.labels)

    def start_after(self, epochs_done: int, examples_seen: int) -> None:
        """Position the batches after ``epochs_done`` epochs that used ``examples_seen`` examples in all."""
        carried = examples_seen - epochs_done * self.size
        if not 0 <= carried < self.size:
            raise ValueError(
                f"examples_seen={examples_seen} after {epochs_done} epochs of {self.size} examples is not "
                f"possible: expected {epochs_done} × {self.size} plus fewer than {self.size} carried examples."
            )
        self.carried = carried

    def steps(self) -> int:
        """The updates of the coming epoch at the current batch size."""
        from growing_batch.schedules import epoch_updates

        return epoch_updates(self.size, self.batch_size, self.carried)[0]

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size).astype(np.int32)

    def index_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches of exactly ``batch_size`` indices: its permutation after the ``carried``
        examples, the last batch topped up from the next epoch's permutation."""
        from growing_batch.schedules import epoch_updates

        updates, taken = epoch_updates(self.size, self.batch_size, self.carried)
        order = self.epoch_order(epoch)[self.carried:]
        if taken:
            order = np.concatenate([order, self.epoch_order(epoch + 1)[:taken]])
        return [order[start:start + self.batch_size] for start in range(0, updates * self.batch_size, self.batch_size)]

    def advance(self) -> None:
        """After an epoch at the current batch size: the next epoch starts after the examples its last batch took."""
        from growing_batch.schedules import epoch_updates

        self.carried = epoch_updates(self.size, self.batch_size, self.carried)[1]

    def batch_seed(self, epoch: int, batch: int) -> np.ndarray:
        """The augmentation seed of one batch: (seed, epoch · 2³² + batch)."""
        return np.array([self.seed, epoch * 2**32 + batch], np.int64)

    def dataset(self, epoch: int):
        """The epoch's batches as (images, labels) tensors, exactly as the train step sees them."""
        for batch, indices in enumerate(self.index_batches(epoch)):
            yield gather_batch(self.images, self.labels, indices, self.batch_seed(epoch, batch), self.augment)


def device_labels(labels: np.ndarray):
    if on_jax():
        from growing_batch import jax_engine

        return jax_engine.device_array(labels.astype(np.int32))
    import tensorflow as tf

    return tf.constant(labels.astype(np.int32))


def gather_batch(images, labels, indices, seed, augmented: bool, offset=0, total=None):
    """One batch as float32 in [0, 1] with its labels: ``images[indices]``, augmented if asked.

    Traceable (the train step calls it inside its graph). ``offset`` and ``total`` serve a
    micro-batch: these indices are examples ``offset``… of a batch of ``total``, and its random
    crops and flips are that slice of the whole batch's, so accumulation sees the same images.
    """
    import tensorflow as tf

    batch_images = to_unit_range(tf.gather(images, indices))
    if augmented:
        batch_images = augment(batch_images, seed, offset=offset, total=total)
    return batch_images, tf.gather(labels, indices)


def augment(images, seed, padding: int = AUGMENT_PADDING, offset=0, total=None):
    """Random crops of the ``padding``-pixel reflect-padded images and horizontal flips (stateless, seeded).

    The draws are made for ``total`` examples (default: this batch) and examples ``offset``… of
    them are used, so a batch augmented in slices equals the batch augmented whole.
    """
    import tensorflow as tf

    count = tf.shape(images)[0]
    draws = count if total is None else total
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]], mode="REFLECT")
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)

    def draw(seed, *args, **kwargs):
        return tf.random.stateless_uniform([draws], seed, *args, **kwargs)[offset:offset + count]

    top = draw(seeds[0], 0, 2 * padding + 1, dtype=tf.int32)
    left = draw(seeds[1], 0, 2 * padding + 1, dtype=tf.int32)
    return crop_and_flip(images, top, left, draw(seeds[2]) < 0.5, padding)


def crop_and_flip(images, top, left, flip, padding: int = AUGMENT_PADDING):
    """Each image's crop at (``top``, ``left``) of it reflect-padded by ``padding`` pixels, mirrored
    where ``flip``: the augmentation's transform in ``keras.ops``, shared by both engines (each draws
    ``top``, ``left`` and ``flip`` with its own stateless random numbers)."""
    import keras

    ops = keras.ops
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    padded = ops.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]], mode="reflect")
    padded_height, padded_width = height + 2 * padding, width + 2 * padding
    count = ops.shape(images)[0]
    rows = ops.cast(top, "int32")[:, None] + ops.arange(height, dtype="int32")[None, :]  # (count, height)
    columns = ops.cast(left, "int32")[:, None] + ops.arange(width, dtype="int32")[None, :]  # (count, width)
    image = ops.arange(count, dtype="int32")[:, None, None] * (padded_height * padded_width)
    flat = image + rows[:, :, None] * padded_width + columns[:, None, :]  # (count, height, width)
    pixels = ops.take(ops.reshape(padded, (-1, channels)), ops.reshape(flat, (-1,)), axis=0)
    cropped = ops.reshape(pixels, (-1, height, width, channels))
    return ops.where(ops.reshape(flip, (-1, 1, 1, 1)), ops.flip(cropped, axis=2), cropped)


# Evaluation batch size: large for speed (the evaluated loss and accuracy do not depend on it).
EVALUATION_BATCH_SIZE = 4096


class EvaluationBatches:
    """A split held on the device, evaluated in fixed, unshuffled batches of ``batch_size``.

    The loop's evaluator slices each batch out inside its compiled step.
    """

    def __init__(self, split: Split, batch_size: int = EVALUATION_BATCH_SIZE):
        self.images = device_images(split.images)
        self.labels = device_labels(split.labels)
        self.size = len(split)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return self.size

    def bounds(self) -> list[tuple[int, int]]:
        return [(start, min(start + self.batch_size, self.size)) for start in range(0, self.size, self.batch_size)]


def evaluation_batches(split: Split, batch_size: int = EVALUATION_BATCH_SIZE) -> EvaluationBatches:
    """A split for evaluation after each epoch (see :class:`EvaluationBatches`)."""
    return EvaluationBatches(split, batch_size)


def scale(images: np.ndarray) -> np.ndarray:
    """uint8 pixels to float32 in [0, 1], as the train step does."""
    return images.astype(np.float32) / 255.0


# --- making sure a data set is there (the main job's data step) --------------------------------


def ensure_available(name: str, data_dir: str = "", install: bool = True) -> str:
    """Make sure ``name`` can be read; return its source. For the main job's data step.

    Tries the same sources as :func:`read_arrays`. Where Keras cannot download Fashion-MNIST
    (no internet), installs Debian's package when running as root with apt-get, and otherwise
    says exactly what to run.
    """
    try:
        _, source = read_arrays(name, data_dir)
        return source
    except DataError as error:
        if name != "fashion_mnist" or data_dir:
            raise
        first_error = error
    if install and hasattr(os, "geteuid") and os.geteuid() == 0 and _which("apt-get"):
        import subprocess

        print(f"Keras could not download {name}; installing Debian's {DEBIAN_FASHION_MNIST_PACKAGE}")
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        result = subprocess.run(
            ["apt-get", "install", "-y", "-qq", DEBIAN_FASHION_MNIST_PACKAGE], check=False
        )
        if result.returncode == 0 and os.path.isdir(DEBIAN_FASHION_MNIST_DIR):
            _, source = read_arrays(name, data_dir)
            return source
    raise DataError(
        f"{first_error}. To install it: sudo apt-get install {DEBIAN_FASHION_MNIST_PACKAGE}"
    )


def _which(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m growing_batch.data",
        description="Make sure a data set can be read (download, or Debian's local copy).",
    )
    parser.add_argument("--dataset", default="fashion_mnist", choices=sorted(NUM_CLASSES))
    parser.add_argument("--data_dir", default="")
    arguments = parser.parse_args(argv)
    try:
        source = ensure_available(arguments.dataset, arguments.data_dir)
    except DataError as error:
        print(f"error: {error}")
        return 1
    print(f"{arguments.dataset}: reading from {source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
