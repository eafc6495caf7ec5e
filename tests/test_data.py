"""Data: Keras' file formats, clear errors, the validation split and the per-epoch pipeline."""

import gzip
import os

import numpy as np
import pytest

import fake_data
from growing_batch import data
from growing_batch.data import DataError


@pytest.mark.parametrize(
    "name, writer, train, test, shape",
    [
        ("fashion_mnist", fake_data.write_fashion_mnist, 240, 80, (28, 28, 1)),
        ("mnist", fake_data.write_mnist, 120, 40, (28, 28, 1)),
        ("cifar10", fake_data.write_cifar10, 150, 40, (32, 32, 3)),
        ("cifar100", fake_data.write_cifar100, 150, 50, (32, 32, 3)),
    ],
)
def test_reads_each_data_set_from_data_dir(tmp_path, name, writer, train, test, shape):
    folder = writer(str(tmp_path))
    splits = data.load(name, folder, validation_size=20, seed=0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (train - 20, 20, test)
    assert splits.image_shape == shape
    assert splits.train.images.dtype == np.uint8
    assert splits.train.labels.dtype == np.int32
    assert splits.source == os.path.abspath(folder)
    assert splits.num_classes == (100 if name == "cifar100" else 10)


def test_cifar_pixels_are_in_channels_last_order(tmp_path):
    folder = fake_data.write_cifar10(str(tmp_path))
    (x_train, _), _ = data.read_local("cifar10", folder)
    expected, _ = fake_data.images_and_labels(30, (32, 32, 3), 10, 1)  # data_batch_1
    np.testing.assert_array_equal(x_train[:30], expected)
    # the folder itself works too
    (again, _), _ = data.read_local("cifar10", os.path.join(folder, "cifar-10-batches-py"))
    np.testing.assert_array_equal(again, x_train)


def test_validation_split_is_seeded_and_without_replacement(fashion_dir):
    first = data.load("fashion_mnist", fashion_dir, validation_size=40, seed=3)
    again = data.load("fashion_mnist", fashion_dir, validation_size=40, seed=3)
    other = data.load("fashion_mnist", fashion_dir, validation_size=40, seed=4)
    np.testing.assert_array_equal(first.validation.images, again.validation.images)
    assert not np.array_equal(first.validation.images, other.validation.images)
    # no image is in both splits and none is lost: N = 240 - 40 exactly
    (x_all, _), _ = data.read_local("fashion_mnist", fashion_dir)
    keys = lambda images: {image.tobytes() for image in images}  # noqa: E731
    assert len(first.train) == 200
    assert keys(first.train.images).isdisjoint(keys(first.validation.images))
    assert keys(first.train.images) | keys(first.validation.images) == keys(x_all[..., None])


def test_max_examples_caps_every_split(fashion_dir):
    splits = data.load("fashion_mnist", fashion_dir, validation_size=40, seed=0, max_examples=30)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (30, 30, 30)


def test_validation_size_must_leave_training_examples(fashion_dir):
    with pytest.raises(DataError, match="validation_size=240 is not allowed: expected fewer than the 240"):
        data.load("fashion_mnist", fashion_dir, validation_size=240)


def test_missing_files_name_what_is_expected(tmp_path):
    with pytest.raises(DataError, match="missing data files in .*train-labels-idx1-ubyte.gz"):
        data.load("fashion_mnist", str(tmp_path))
    with pytest.raises(DataError, match="missing data file .*mnist.npz"):
        data.load("mnist", str(tmp_path))
    with pytest.raises(DataError, match="missing data file .*data_batch_1"):
        data.load("cifar10", str(tmp_path))


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    folder = fake_data.write_fashion_mnist(str(tmp_path))
    path = os.path.join(folder, "train-images-idx3-ubyte.gz")
    with gzip.open(path, "rb") as handle:
        content = handle.read()
    with gzip.open(path, "wb") as handle:
        handle.write(content[: len(content) // 2])
    with pytest.raises(DataError, match="corrupt or truncated IDX file .*train-images-idx3-ubyte.gz"):
        data.load("fashion_mnist", folder)


def test_a_file_that_is_not_gzip_is_a_clear_error(tmp_path):
    folder = fake_data.write_fashion_mnist(str(tmp_path))
    with open(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"), "wb") as handle:
        handle.write(b"<html>not found</html>")
    with pytest.raises(DataError, match="corrupt or truncated IDX file .*t10k-labels"):
        data.load("fashion_mnist", folder)


def test_truncated_cifar_pickle_and_npz_are_clear_errors(tmp_path):
    folder = fake_data.write_cifar10(str(tmp_path / "c"))
    path = os.path.join(folder, "cifar-10-batches-py", "data_batch_3")
    with open(path, "rb") as handle:
        content = handle.read()
    with open(path, "wb") as handle:
        handle.write(content[:1000])
    with pytest.raises(DataError, match="corrupt or truncated CIFAR batch file .*data_batch_3"):
        data.load("cifar10", folder)
    folder = fake_data.write_mnist(str(tmp_path / "m"))
    with open(os.path.join(folder, "mnist.npz"), "r+b") as handle:
        handle.truncate(500)
    with pytest.raises(DataError, match="corrupt or truncated .*mnist.npz"):
        data.load("mnist", folder)


def test_labels_out_of_range_are_rejected(tmp_path):
    folder = fake_data.write_fashion_mnist(str(tmp_path))
    fake_data.write_idx(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"), np.full(80, 12, dtype=np.uint8))
    with pytest.raises(DataError, match="test labels range over 12..12; expected 0..9"):
        data.load("fashion_mnist", folder)


def test_keras_loader_failure_says_what_to_do(monkeypatch):
    import keras

    def offline(**kwargs):
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(DataError, match="could not load cifar10 with Keras .*pass data_dir="):
        data.load("cifar10")


def test_keras_loader_is_used_without_data_dir(monkeypatch):
    import keras

    x_train, y_train = fake_data.images_and_labels(50, (28, 28), 10, 0)
    x_test, y_test = fake_data.images_and_labels(10, (28, 28), 10, 1)
    monkeypatch.setattr(keras.datasets.mnist, "load_data", lambda: ((x_train, y_train), (x_test, y_test)))
    splits = data.load("mnist", validation_size=10)
    assert len(splits.train) == 40
    assert splits.source == data.KERAS_ORIGINS["mnist"]


def test_debian_fashion_mnist_copy_is_used_when_present(monkeypatch, fashion_dir):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", fashion_dir)
    splits = data.load("fashion_mnist", validation_size=10)
    assert splits.source == fashion_dir
    assert data.ensure_available("fashion_mnist") == fashion_dir


def test_ensure_available_says_how_to_install_when_it_may_not(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "absent"))

    def offline(name):
        raise DataError("could not load fashion_mnist with Keras (offline)")

    monkeypatch.setattr(data, "read_with_keras", offline)
    with pytest.raises(DataError, match="To install it: sudo apt-get install dataset-fashion-mnist"):
        data.ensure_available("fashion_mnist", install=False)


def test_epoch_batches_are_full_and_the_leftover_carries_into_the_next_epoch(fashion_dir):
    """The reproduction's next_batch: the last batch of an epoch is its leftover topped up from the next
    epoch's shuffle; the next epoch starts after the examples it took."""
    splits = data.load("fashion_mnist", fashion_dir, validation_size=40, seed=0)
    batches = data.EpochBatches(splits.train, seed=1)
    n = batches.size
    assert n == 200
    for batch_size, carried, expected_steps, carried_next in ((64, 0, 4, 56), (64, 56, 3, 48), (200, 0, 1, 0),
                                                               (7, 0, 29, 3), (150, 120, 1, 70)):
        batches.batch_size, batches.carried = batch_size, carried
        assert batches.steps() == expected_steps
        epoch_batches = batches.index_batches(epoch=2)
        assert [len(indices) for indices in epoch_batches] == [batch_size] * expected_steps
        taken = np.concatenate(epoch_batches)
        this_epoch, next_epoch = batches.epoch_order(2), batches.epoch_order(3)
        assert taken.tolist() == [*this_epoch[carried:], *next_epoch[:carried_next]]  # each example once
        batches.advance()
        assert batches.carried == carried_next
    batches.batch_size = 64
    sizes, pixels = [], []
    for images, _ in batches.dataset(epoch=2):
        sizes.append(int(images.shape[0]))
        pixels.append(float(images.numpy().max()))
    assert set(sizes) == {64} and max(pixels) <= 1.0
    batches.start_after(3, 3 * n + 17)  # a resume: examples_seen = epochs · N + carried
    assert batches.carried == 17
    with pytest.raises(ValueError, match="examples_seen=599 after 3 epochs of 200 examples is not possible"):
        batches.start_after(3, 599)
    first = [b.numpy().tolist() for _, b in batches.dataset(epoch=0)]
    assert first == [b.numpy().tolist() for _, b in batches.dataset(epoch=0)]  # seeded
    assert first != [b.numpy().tolist() for _, b in batches.dataset(epoch=1)]  # reshuffled per epoch
