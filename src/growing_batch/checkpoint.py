"""Checkpoints: what a run needs to continue where it stopped, saved at the end of every epoch.

A run's checkpoint lives in ``<checkpoint_dir>/<run id>/`` and is saved after every finished epoch:

* ``epoch-NNNN.weights.h5``: every model variable (weights and batch-norm statistics) and every
  optimizer variable (the iteration count, momentum buffers), written with Keras' own saving API
  (``model.save_weights``), which matches variables by their layer's path and checks their shapes —
  the same file for either Keras backend;
* ``state.json``: the resolved config, the epochs done (counted from 1), the cumulative ``updates``
  and ``examples_seen``, every finished epoch's logged numbers (``rows``, from which a resume fills in
  any metric point the tracking store lost) and the name of its weights file.

Each file is written beside its place and renamed into it, the weights first, then ``state.json``,
which names them; only then are older weights files removed. So a process killed at any moment —
SIGKILL included — leaves a ``state.json`` and the complete weights of its epoch.

Shuffling and augmentation are stateless functions of (seed, epoch, batch) and the models have no
dropout, so the config's ``seed`` and the epoch are the whole random state.

While a process trains a run it holds an exclusive lock on ``<checkpoint_dir>/<run id>/lock``, so a
second process resuming the same run at the same time is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import json
import os

FILE_NAME = "state.json"
WEIGHTS_SUFFIX = ".weights.h5"  # Keras' own weights format (HDF5), which model.save_weights requires
FORMAT_VERSION = 2


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing, unreadable, or of another configuration). One line."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (a full disk, say); the previous one is kept. One line."""


def writable_problem(checkpoint_dir: str) -> str | None:
    """Why ``checkpoint_dir`` cannot be created or written (one phrase), or None. Folders it had to
    create for the test are removed again; nothing is left behind."""
    folder = os.path.abspath(checkpoint_dir)
    missing = []
    parent = folder
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        missing.append(parent)
        parent = os.path.dirname(parent)
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"0")
        os.remove(probe)
    except OSError as error:
        return f"{error.strerror or error} ({error.filename or folder})"
    finally:
        for created in missing:  # deepest first
            try:
                os.rmdir(created)
            except OSError:
                break
    return None


@dataclasses.dataclass
class State:
    config: dict
    epoch: int = 0  # epochs done, counted from 1
    updates: int = 0
    examples_seen: int = 0
    rows: list = dataclasses.field(default_factory=list)  # one dict of logged numbers per finished epoch


def run_directory(checkpoint_dir: str, run_id: str) -> str:
    return os.path.join(checkpoint_dir, run_id)


def path(checkpoint_dir: str, run_id: str) -> str:
    return os.path.join(run_directory(checkpoint_dir, run_id), FILE_NAME)


def exists(checkpoint_dir: str, run_id: str) -> bool:
    return os.path.isfile(path(checkpoint_dir, run_id))


def _weights_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}{WEIGHTS_SUFFIX}"


def _write_json_atomically(file: str, content: dict) -> None:
    partial = file + ".partial"
    with open(partial, "w") as handle:
        json.dump(content, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, file)


def save(checkpoint_dir: str, run_id: str, model, state: State) -> str:
    """Write the checkpoint (weights, then ``state.json``) so that it is replaced atomically; returns
    the path of ``state.json``.

    If writing fails (a full disk, say), the half-written files are removed, the previous checkpoint
    is kept and CheckpointSaveError says so in one line.
    """
    target = path(checkpoint_dir, run_id)
    folder = os.path.dirname(target)
    weights = _weights_name(state.epoch)
    partial_weights = os.path.join(folder, f"partial-{weights}")
    try:
        os.makedirs(folder, exist_ok=True)
        model.save_weights(partial_weights)
        with open(partial_weights, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial_weights, os.path.join(folder, weights))
        _write_json_atomically(target, {"version": FORMAT_VERSION, "weights": weights, **dataclasses.asdict(state)})
    except OSError as error:
        for leftover in (partial_weights, target + ".partial"):
            with contextlib.suppress(OSError):
                os.remove(leftover)
        kept = f"the checkpoint of epoch {_saved_epoch(target)} is kept" if os.path.isfile(target) else "no earlier checkpoint exists"
        raise CheckpointSaveError(
            f"checkpoint {target} could not be saved after epoch {state.epoch} ({error.strerror or error}); the "
            f"partial files were removed and {kept}: free the space (or move the folder and pass its new "
            f"checkpoint_dir), then resume the run"
        ) from None
    for old in glob.glob(os.path.join(folder, f"epoch-*{WEIGHTS_SUFFIX}")):
        if os.path.basename(old) != weights:
            with contextlib.suppress(OSError):
                os.remove(old)
    return target


def _saved_epoch(file: str) -> str:
    try:
        return str(_read(file)[0].epoch)
    except CheckpointError:
        return "?"


def load_state(checkpoint_dir: str, run_id: str) -> State:
    """The checkpoint's state (no TensorFlow needed)."""
    state, _ = _read(path(checkpoint_dir, run_id))
    return state


def _read(file: str) -> tuple[State, str]:
    """The state and the path of its weights file."""
    try:
        with open(file) as handle:
            stored = json.load(handle)
        version, weights = stored.pop("version", None), stored.pop("weights", None)
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(f"checkpoint {file} cannot be read ({error}); delete it to start the run afresh") from None
    if version != FORMAT_VERSION or not isinstance(weights, str):
        raise CheckpointError(f"checkpoint {file} has another format version; delete it to start the run afresh")
    try:
        state = State(**stored)
    except TypeError as error:
        raise CheckpointError(f"checkpoint {file} cannot be read ({error}); delete it to start the run afresh") from None
    return state, os.path.join(os.path.dirname(file), os.path.basename(weights))


def restore(checkpoint_dir: str, run_id: str, model) -> State:
    """Load the model's and optimizer's variables from the checkpoint (Keras' ``load_weights``, matched
    by layer path, shapes checked); return its state."""
    import warnings

    file = path(checkpoint_dir, run_id)
    state, weights = _read(file)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.load_weights(weights)
        skipped = [str(warning.message) for warning in caught if "Skipping variable loading" in str(warning.message)]
        if skipped:  # Keras only warns when a layer's or the optimizer's variables do not match
            raise ValueError(skipped[0])
    except (OSError, ValueError, KeyError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise CheckpointError(
            f"checkpoint {file}: its weights {weights} do not fit this model ({first_line}); resume with the "
            "run's own parameters"
        ) from None
    return state


def remove(checkpoint_dir: str, run_id: str) -> None:
    """Delete a finished run's checkpoint (its model is in the tracking store); the run's lock, on
    release, then removes the folder."""
    folder = run_directory(checkpoint_dir, run_id)
    names = [FILE_NAME, FILE_NAME + ".partial"]
    names += [os.path.basename(file) for file in glob.glob(os.path.join(folder, f"*{WEIGHTS_SUFFIX}"))]
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))


class RunLock:
    """An exclusive lock on ``<checkpoint_dir>/<run id>/lock`` for as long as a process trains the run."""

    def __init__(self, checkpoint_dir: str, run_id: str):
        self.file = os.path.join(run_directory(checkpoint_dir, run_id), "lock")
        self.run_id = run_id
        self._handle = None

    def __enter__(self):
        os.makedirs(os.path.dirname(self.file), exist_ok=True)
        handle = open(self.file, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.close()
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise CheckpointError(
                    f"run {self.run_id} is being trained by another process right now (lock {self.file}); "
                    "wait for it to end, or stop it first"
                ) from None
            raise
        self._handle = handle
        return self

    def __exit__(self, *exc_info):
        if self._handle is not None:
            folder = os.path.dirname(self.file)
            if not os.path.exists(os.path.join(folder, FILE_NAME)):  # nothing to resume: leave no litter
                try:
                    os.remove(self.file)
                    os.rmdir(folder)
                except OSError:
                    pass  # already gone, or the folder holds other files
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
        return False


def _checkpoint_callback_class():
    """The Keras callback class, defined on first use: Keras (and TensorFlow) load only when a run
    trains, so the checks before it answer in seconds."""
    import math

    import keras

    from growing_batch.loop import loss_diverged
    from growing_batch.metrics import epoch_numbers

    class CheckpointCallback(keras.callbacks.Callback):
        """Saves the run's checkpoint (:mod:`growing_batch.checkpoint`) at the end of every epoch.

        ``state`` holds what was done before (empty for a new run); each epoch adds its logged numbers.
        A diverged epoch (:func:`loss_diverged`) is not saved: the last good epoch's checkpoint stays.
        """

        def __init__(self, checkpoint_dir: str, run_id: str, state: State):
            super().__init__()
            self.checkpoint_dir = checkpoint_dir
            self.run_id = run_id
            self.state = state

        def on_epoch_end(self, epoch: int, logs=None) -> None:
            numbers = epoch_numbers(logs)
            first_loss = self.state.rows[0]["train_loss"] if self.state.rows else None
            if loss_diverged(numbers.get("train_loss", math.nan), first_loss):
                return
            self.state.epoch = epoch + 1
            self.state.updates = int(numbers["updates"])
            self.state.examples_seen = int(numbers["examples_seen"])
            self.state.rows = [*self.state.rows, {"epoch": epoch + 1, **numbers}]
            save(self.checkpoint_dir, self.run_id, self.model, self.state)

    return CheckpointCallback


def __getattr__(name: str):
    if name == "CheckpointCallback":  # see _checkpoint_callback_class
        globals()[name] = _checkpoint_callback_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
