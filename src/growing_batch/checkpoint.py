"""Checkpoints: what a run needs to continue where it stopped, saved at the end of every epoch.

A run's checkpoint is one file, ``<checkpoint_dir>/<run id>/checkpoint.npz``, replaced atomically
(written beside it, then renamed) after every finished epoch, so a process killed at any moment —
SIGKILL included — leaves the last complete epoch's checkpoint. It holds:

* every model variable (weights and batch-norm statistics) and every optimizer variable (the
  iteration count, momentum buffers), in the model's order, each checked for its shape;
* ``state``: the resolved config, the epochs done (counted from 1), the cumulative ``updates`` and
  ``examples_seen``, and every finished epoch's logged numbers (``rows``), from which a resume fills
  in any metric point the tracking store lost (asynchronous logging, a server that went away).

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
import json
import os
import zipfile

import numpy as np

FILE_NAME = "checkpoint.npz"
FORMAT_VERSION = 1


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


def _variables(model) -> list[tuple[str, object]]:
    """The variables in a fixed order, named by position (Keras' own names depend on how many
    models the process built before, so a resumed process may name them otherwise)."""
    named = [(f"model.{index:04d}", variable) for index, variable in enumerate(model.variables)]
    named += [(f"optimizer.{index:04d}", variable) for index, variable in enumerate(model.optimizer.variables)]
    return named


def save(checkpoint_dir: str, run_id: str, model, state: State) -> str:
    """Write the checkpoint atomically; returns its path.

    If writing fails (a full disk, say), the half-written file is removed, the previous checkpoint is
    kept and CheckpointSaveError says so in one line.
    """
    target = path(checkpoint_dir, run_id)
    arrays = {name: np.asarray(variable.numpy()) for name, variable in _variables(model)}
    text = json.dumps({"version": FORMAT_VERSION, **dataclasses.asdict(state)})
    partial = target + ".partial"
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(partial, "wb") as handle:
            np.savez(handle, __state__=np.array(text), **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, target)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(partial)
        kept = f"the checkpoint of epoch {_saved_epoch(target)} is kept" if os.path.isfile(target) else "no earlier checkpoint exists"
        raise CheckpointSaveError(
            f"checkpoint {target} could not be saved after epoch {state.epoch} ({error.strerror or error}); the "
            f"partial file was removed and {kept}: free the space (or move the folder and pass its new "
            f"checkpoint_dir), then resume the run"
        ) from None
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


def _read(file: str) -> tuple[State, dict]:
    try:
        with np.load(file, allow_pickle=False) as contents:
            arrays = {name: contents[name] for name in contents.files}
        stored = json.loads(str(arrays.pop("__state__")))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"checkpoint {file} cannot be read ({error}); delete it to start the run afresh") from None
    if stored.pop("version", None) != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {file} has another format version; delete it to start the run afresh")
    return State(**stored), arrays


def restore(checkpoint_dir: str, run_id: str, model) -> State:
    """Load the model's and optimizer's variables from the checkpoint; return its state."""
    file = path(checkpoint_dir, run_id)
    state, arrays = _read(file)
    named = _variables(model)
    if sorted(arrays) != sorted(name for name, _ in named):
        raise CheckpointError(f"checkpoint {file} holds the variables of another model; resume with the run's own parameters")
    for name, variable in named:
        if tuple(arrays[name].shape) != tuple(variable.shape):
            raise CheckpointError(f"checkpoint {file}: {name} has shape {arrays[name].shape}, the model {variable.shape}")
        variable.assign(arrays[name])
    return state


def remove(checkpoint_dir: str, run_id: str) -> None:
    """Delete a finished run's checkpoint (its model is in the tracking store); the run's lock, on
    release, then removes the folder."""
    folder = run_directory(checkpoint_dir, run_id)
    for name in (FILE_NAME, FILE_NAME + ".partial"):
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:
            pass


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
