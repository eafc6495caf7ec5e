"""Small data sets written in the real file formats that Keras' loaders and data_dir read."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np


def images_and_labels(count: int, shape: tuple[int, ...], classes: int, seed: int):
    """Learnable toy images: each class brightens its own band of rows, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=count).astype(np.uint8)
    images = rng.integers(0, 60, size=(count, *shape)).astype(np.int32)
    rows = shape[0]
    for index, label in enumerate(labels):
        start = (int(label) * rows) // classes
        images[index, start : start + max(1, rows // classes)] += 180
    return np.clip(images, 0, 255).astype(np.uint8), labels


def write_idx(path: str, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder: str, train: int = 240, test: int = 80, seed: int = 0) -> str:
    os.makedirs(folder, exist_ok=True)
    x_train, y_train = images_and_labels(train, (28, 28), 10, seed)
    x_test, y_test = images_and_labels(test, (28, 28), 10, seed + 1)
    write_idx(os.path.join(folder, "train-labels-idx1-ubyte.gz"), y_train)
    write_idx(os.path.join(folder, "train-images-idx3-ubyte.gz"), x_train)
    write_idx(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"), y_test)
    write_idx(os.path.join(folder, "t10k-images-idx3-ubyte.gz"), x_test)
    return folder


def write_mnist(folder: str, train: int = 120, test: int = 40, seed: int = 0) -> str:
    os.makedirs(folder, exist_ok=True)
    x_train, y_train = images_and_labels(train, (28, 28), 10, seed)
    x_test, y_test = images_and_labels(test, (28, 28), 10, seed + 1)
    np.savez(os.path.join(folder, "mnist.npz"), x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return folder


def _cifar_record(images: np.ndarray, labels: np.ndarray, label_key: bytes) -> dict:
    # CIFAR's python pickles store rows of 3072 bytes: 1024 red, 1024 green, 1024 blue.
    return {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), label_key: list(map(int, labels))}


def write_cifar10(folder: str, per_batch: int = 30, test: int = 40, seed: int = 0) -> str:
    batches = os.path.join(folder, "cifar-10-batches-py")
    os.makedirs(batches, exist_ok=True)
    for index in range(1, 6):
        images, labels = images_and_labels(per_batch, (32, 32, 3), 10, seed + index)
        with open(os.path.join(batches, f"data_batch_{index}"), "wb") as handle:
            pickle.dump(_cifar_record(images, labels, b"labels"), handle)
    images, labels = images_and_labels(test, (32, 32, 3), 10, seed + 99)
    with open(os.path.join(batches, "test_batch"), "wb") as handle:
        pickle.dump(_cifar_record(images, labels, b"labels"), handle)
    return folder


def write_cifar100(folder: str, train: int = 150, test: int = 50, seed: int = 0) -> str:
    base = os.path.join(folder, "cifar-100-python")
    os.makedirs(base, exist_ok=True)
    for name, count, offset in (("train", train, 0), ("test", test, 1)):
        images, labels = images_and_labels(count, (32, 32, 3), 100, seed + offset)
        with open(os.path.join(base, name), "wb") as handle:
            pickle.dump(_cifar_record(images, labels, b"fine_labels"), handle)
    return folder
