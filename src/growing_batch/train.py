"""The ``main`` entry point: one tracked, schedule-driven training run, resumable.

    python -m growing_batch.train --schedule noise-matched --dataset fashion_mnist --epochs 10
    mlflow run . --env-manager local -P schedule=noise-matched -P epochs=10
    python -m growing_batch.train --run_id <id>                  # resume a stopped run
    mlflow run . --env-manager local --run-id <id> -P ...         # the same, with the run's parameters

The order of work: parse and validate the config (no TensorFlow yet) -> check that the tracking
store answers -> load and split the data, check the config against it -> start (or continue) the
MLflow run -> train with the callback-driven loop, logging and checkpointing every epoch -> log
history, figures and the model.

How a run ends, and the exit status:

* 0 — FINISHED; the checkpoint is deleted (the model is in the store).
* 2 — bad input, before any training: one line ``error: <parameter>='<value>' is not allowed:
  expected ...``; a run that ``mlflow run`` created ends FAILED with that line as its ``error`` tag.
  A refused resume (no such run, other parameters, already finished, no checkpoint) leaves the run
  as it was.
* 3 — diverged: the training loss became NaN, infinite or exploded (over 100 × the first epoch's, see
  ``loop.loss_diverged``); training stopped at that epoch, every
  metric logged until then is kept, and the run is FAILED with tags ``diverged=true`` and
  ``diverged_epoch``.
* 128 + signal (130 for SIGINT, 143 for SIGTERM) — interrupted: the unfinished epoch is dropped,
  the run is KILLED, and the checkpoint of the last finished epoch lets it be resumed.
* 1 — anything else (the run is FAILED, with the error as its ``error`` tag). A process killed
  outright (SIGKILL) leaves its run RUNNING; resuming it continues from its checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
from typing import Sequence

from growing_batch import checkpoint, distribute
from growing_batch import config as config_module
from growing_batch.checkpoint import CheckpointError
from growing_batch.config import Config, ConfigError
from growing_batch.errors import exit_with_error

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
# Seconds to wait for an HTTP tracking server to answer before training starts.
SERVER_CHECK_TIMEOUT_SECONDS = 10


class Refused(ConfigError):
    """Bad input that leaves the run as it was: a refused resume, a tracking store that does not answer."""


class StoreUnreachable(Refused):
    """The tracking store does not answer or cannot be opened: nothing can be recorded in it."""


def main(argv: Sequence[str] | None = None) -> int:
    resuming = False
    run_id = os.environ.get("MLFLOW_RUN_ID") or None  # the run `mlflow run` created (or resumes: --run-id)
    try:
        given, given_run_id = config_module.parse_command_line(argv)
        run_id = given_run_id or run_id  # --run_id: the run to continue
        chief = distribute.is_chief()  # of a multi-worker cluster: only the chief talks to MLflow
        if chief:
            check_tracking_store()
        values = given
        if run_id and chief:  # continuing a run: its own parameters, unless given (then they must agree)
            resolved = _resolved_params(run_id, required=not given)
            resuming = bool(resolved)
            values = {**resolved, **config_module.given_texts(given)}
        config = config_module.from_strings(values)
        config_module.activate_backend(config)  # KERAS_BACKEND, before anything imports Keras
        if chief:
            check_checkpoint_dir(config.checkpoint_dir)
            for warning in config_module.warnings_for(config):
                print(f"warning: {warning}", file=sys.stderr, flush=True)
    except StoreUnreachable as error:
        return exit_with_error(str(error))
    except Refused as error:
        return _refuse(error, run_id)
    except ConfigError as error:
        return _refuse(error, run_id) if resuming else exit_with_error(str(error), run_id=run_id)
    from growing_batch.data import DataError
    from growing_batch.tracking import StoreLost

    try:
        return train(config, run_id=run_id, given=given)
    except StoreLost as error:
        return exit_with_error(str(error), exit_code=1)
    except Refused as error:
        return _refuse(error, run_id)
    except checkpoint.CheckpointSaveError as error:  # the run is FAILED with this line as its error
        return exit_with_error(str(error), exit_code=1)
    except (ConfigError, DataError, CheckpointError) as error:  # a started run is FAILED already
        return exit_with_error(str(error), run_id=run_id)


def _refuse(error: Exception, run_id: str | None) -> int:
    """A refused resume: one line, exit 2, and the run left as it was — also once `mlflow run` has
    exited, which would otherwise mark it FAILED (growing_batch.tracking.keep_status_after_mlflow_run)."""
    status = exit_with_error(str(error))
    if run_id:
        from growing_batch import tracking

        tracking.keep_status_after_mlflow_run(run_id)
    return status


def check_checkpoint_dir(folder: str) -> None:
    """Refuse a ``checkpoint_dir`` that cannot be created or written, before any data is loaded."""
    problem = checkpoint.writable_problem(folder)
    if problem:
        raise ConfigError(
            f"checkpoint_dir={folder!r} is not allowed: expected a folder that can be created and written, "
            f"but {problem}."
        )


def check_tracking_store() -> None:
    """Fail fast, before any data is loaded, when the tracking store does not answer (an HTTP server)
    or cannot be opened (a sqlite file that cannot be created, an unknown scheme, a missing driver)."""
    from growing_batch import tracking

    problem = tracking.store_problem(SERVER_CHECK_TIMEOUT_SECONDS)
    if problem is not None:
        raise StoreUnreachable(f"MLFLOW_TRACKING_URI={tracking.store_uri()!r} is not allowed: {problem}") from None


def _get_run(run_id: str):
    from growing_batch import tracking

    run = tracking.find_run(run_id)
    if run is None:
        raise Refused(
            f"run_id={run_id!r} is not allowed: expected a run in the tracking store {tracking.store_uri()}, "
            "and there is none with that id."
        )
    return run


def _resolved_params(run_id: str, required: bool) -> dict[str, str]:
    """The config a run was trained with (its ``resolved.*`` params); empty for a run not yet started."""
    params = _get_run(run_id).data.params
    resolved = {name[len("resolved."):]: text for name, text in params.items() if name.startswith("resolved.")}
    if required and not resolved:
        raise Refused(
            f"run_id={run_id!r} is not allowed: that run has not started training (no resolved.* params); "
            "give its parameters on the command line."
        )
    return resolved


# Fields a resume may change: the user may move a run's checkpoint folder (its params keep the first).
MOVABLE = ("checkpoint_dir", "verbose", "register_model")


# Fields added after checkpoints were first written, with the value an older checkpoint's run used.
FIELDS_ADDED_SINCE = {"backend": "tensorflow"}


def _without_movable(values: dict) -> dict:
    return {name: value for name, value in values.items() if name not in MOVABLE}


def plan_resume(config: Config, run_id: str | None) -> checkpoint.State | None:
    """What the run ``run_id`` (if any) allows: None to start it afresh, else its checkpoint's state.

    Raises Refused when it cannot be continued with this config.
    """
    if not run_id:
        return None
    run = _get_run(run_id)
    tags, params = run.data.tags, run.data.params
    resume_hint = "resume with the run's own parameters (or `python -m growing_batch.train --run_id ID` alone)"
    for name, text in config.to_params().items():
        previous = params.get(f"resolved.{name}")
        if previous is not None and previous != text and name not in MOVABLE:
            raise Refused(
                f"{name}={text!r} is not allowed: run {run_id} was trained with {name}={previous!r}; {resume_hint}."
            )
    if run.info.status == "FINISHED":
        raise Refused(f"run_id={run_id!r} is not allowed: that run is FINISHED; there is nothing to resume.")
    if tags.get("diverged") == "true":
        raise Refused(
            f"run_id={run_id!r} is not allowed: that run diverged at epoch {tags.get('diverged_epoch')}, and "
            "resuming would repeat it; start a new run with other parameters."
        )
    if checkpoint.exists(config.checkpoint_dir, run_id):
        state = checkpoint.load_state(config.checkpoint_dir, run_id)
        saved = {**FIELDS_ADDED_SINCE, **state.config}  # a checkpoint written before a field existed had its default
        if _without_movable(saved) != _without_movable(config.to_dict()):
            raise Refused(
                f"run_id={run_id!r} is not allowed: its checkpoint "
                f"{checkpoint.path(config.checkpoint_dir, run_id)} is of another configuration; {resume_hint}."
            )
        return state
    trained_metrics = [key for key in run.data.metrics if not key.startswith("system/")]
    if trained_metrics:
        raise Refused(
            f"run_id={run_id!r} is not allowed: that run has logged epochs but has no checkpoint at "
            f"{checkpoint.path(config.checkpoint_dir, run_id)} (another checkpoint_dir?); start a new run."
        )
    return None  # a run that never finished an epoch (e.g. one `mlflow run` just created): start it


def train(config: Config, run_id: str | None = None, given: dict | None = None, extra_callbacks: Sequence = (),
          verbose: int | None = None) -> int:
    """Run one configuration end to end, or continue the run ``run_id``; returns the exit status (see
    the module): 0 finished, 3 diverged, 128 + signal interrupted.

    Raises ConfigError/DataError/CheckpointError on bad input (Refused when ``run_id`` cannot be
    continued), before any training; StoreLost when the tracking store stops answering.
    ``given``: the command line's text per field, logged as the plain-name params (default: none).
    ``verbose``: Keras' 0, 1 or 2 (default: the config's, where ``auto`` is a progress bar on a terminal
    and one line per epoch otherwise).
    """
    config_module.activate_backend(config)  # before Keras is imported; or Keras' backend must be this one
    from growing_batch import data, schedules

    if verbose is None:
        verbose = int(config.verbose) if config.verbose != "auto" else (1 if sys.stdout.isatty() else 2)
    chief = distribute.is_chief()
    with contextlib.ExitStack() as stack:
        resume_state = None
        if run_id and chief:  # an existing run: no other process may train it meanwhile; refused before any work
            stack.enter_context(_lock(config, run_id))
            resume_state = plan_resume(config, run_id)
        strategy = distribute.make_strategy(config.devices, config.backend)  # before TensorFlow's runtime starts
        replicas = distribute.replica_count(strategy)
        if config.jit_compile and replicas > 1 and config.backend != "jax":
            raise ConfigError(f"jit_compile='true' is not allowed: expected false with {replicas} replicas (devices).")
        splits = data.load(
            config.dataset, config.data_dir, config.validation_size, config.seed, config.max_examples
        )
        train_size = len(splits.train)
        config_module.validate_against_data(config, train_size)
        max_batch_size = schedules.resolve_max_batch_size(config.max_batch_size, train_size)
        schedule = schedules.build_schedule(config, train_size)
        if not chief:
            return _train_as_worker(config, strategy, splits, schedule, run_id)

        from growing_batch import loop, tracking

        setup = Setup(config, splits, schedule, strategy, max_batch_size)
        setup.model, setup.batches, setup.evaluation = _build(config, strategy, splits)
        try:
            with tracking.run_lifecycle(config, given, run_id) as active:
                if not run_id:
                    run_id = active.info.run_id
                    stack.enter_context(_lock(config, run_id))
                _train_in_run(setup, run_id, resume_state, extra_callbacks, verbose)
        except tracking.Diverged as outcome:
            print(f"error: {outcome.message}", file=sys.stderr, flush=True)
            checkpoint.remove(config.checkpoint_dir, run_id)  # a diverged run is never resumed
            return EXIT_DIVERGED
        except loop.TrainingInterrupted as stop:
            done = f"epochs 1-{stop.epoch - 1} are logged and checkpointed" if stop.epoch > 1 else "no epoch was finished"
            print(
                f"run {run_id} interrupted by {stop.signal_name} during epoch {stop.epoch}: {done}; the run is "
                f"KILLED. Resume it with: python -m growing_batch.train --run_id {run_id}",
                file=sys.stderr, flush=True,
            )
            return 128 + getattr(signal, stop.signal_name).value
        checkpoint.remove(config.checkpoint_dir, run_id)
        return 0


class Interruption:
    """Turns SIGINT and SIGTERM into a request to stop that ``loop.Trainer.fit`` honours between batches.

    Use as a context manager around training; ``requested`` is the signal's name once one arrived.
    A second SIGINT while the first is being honoured raises KeyboardInterrupt at once.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, number, frame):
        import signal

        name = signal.Signals(number).name
        if self.requested and name == "SIGINT":
            raise KeyboardInterrupt
        self.requested = name
        print(f"\n{name} received: stopping after this batch (press Ctrl-C again to quit at once)", flush=True)

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info):
        import signal

        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
        return False


@dataclasses.dataclass
class Setup:
    """What a run trains with: the config, its data, schedule and devices, and the model, training
    batches and evaluation splits built from them (before the MLflow run starts)."""

    config: Config
    splits: object
    schedule: object
    strategy: object
    max_batch_size: int
    model: object = None
    batches: object = None
    evaluation: dict | None = None


@contextlib.contextmanager
def _lock(config: Config, run_id: str):
    """Hold the run's lock (a conflict is a refusal that leaves the run as it is)."""
    lock = checkpoint.RunLock(config.checkpoint_dir, run_id)
    try:
        lock.__enter__()
    except CheckpointError as error:
        raise Refused(f"run_id={run_id!r} is not allowed: {error}.") from None
    try:
        yield lock
    finally:
        lock.__exit__(None, None, None)


def _build(config: Config, strategy, splits):
    """The compiled model (in the strategy's scope), the training batches and the evaluation splits."""
    import keras

    from growing_batch import data, models

    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.precision)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = models.build(
            config.model, splits.image_shape, splits.num_classes, config.seed, config.weight_decay,
            config.ghost_batch_size, standardization=models.standardization_for(config.model, splits.train.images),
        )
        optimizer = models.build_optimizer(config.optimizer, config.learning_rate, config.momentum, config.nesterov)
        models.compile_for_training(model, optimizer)
    batches = data.EpochBatches(splits.train, config.seed, config.augment)
    evaluation = {}
    if len(splits.validation):
        evaluation["val"] = data.evaluation_batches(splits.validation)
    evaluation["test"] = data.evaluation_batches(splits.test)
    return model, batches, evaluation


def _train_as_worker(config: Config, strategy, splits, schedule, run_id: str | None) -> int:
    """A multi-worker cluster's non-chief task: the same steps as the chief, nothing logged or saved.

    It continues from the run's checkpoint when ``MLFLOW_RUN_ID`` names one it can read (a folder
    shared with the chief), so that every worker resumes at the same epoch.
    """
    from growing_batch import loop

    model, batches, _ = _build(config, strategy, splits)
    state = checkpoint.State(config=config.to_dict())
    if run_id and checkpoint.exists(config.checkpoint_dir, run_id):
        state = checkpoint.restore(config.checkpoint_dir, run_id, model)
    with Interruption() as interruption:
        try:
            # no jit_compile: XLA is refused with several replicas (train), and a worker means several
            trainer = loop.Trainer(model, batches, schedule, max_device_batch_size=config.max_device_batch_size,
                                   strategy=strategy, measure_noise_scale=config.measure_noise_scale)
            trainer.fit(state, config.epochs, verbose=0, interruption=interruption)
        except loop.TrainingInterrupted as stop:
            return 128 + getattr(signal, stop.signal_name).value
    return 0


def _train_in_run(setup: Setup, run_id: str, resume_state: checkpoint.State | None, extra_callbacks: Sequence,
                  verbose: int) -> None:
    """Train in the active run ``run_id`` (new, or resumed from ``resume_state``) and log its results.

    Returns when it finished; raises tracking.Diverged or loop.TrainingInterrupted (after logging what
    was trained), and tracking.StoreLost when the store stopped answering.
    """
    from growing_batch import data, loop, models, tracking

    config, model, splits, strategy = setup.config, setup.model, setup.splits, setup.strategy
    title = tracking.run_name(config)
    try:
        if resume_state is None:
            state = checkpoint.State(config=config.to_dict())
            tracking.log_new_run(config, splits, setup.max_batch_size, {
                "parameters": model.count_params(),
                "input_standardization": models.input_standardization(model),
                "epochs_counted_from": 1,
                "replicas": distribute.replica_count(strategy),
                "distribution": distribute.describe(strategy),
            })
            logged = {}
            print(f"run {run_id} ({title}): {config.dataset} N={len(splits.train)}, {model.count_params():,} "
                  f"parameters, data from {splits.source}", flush=True)
        else:
            state = checkpoint.restore(config.checkpoint_dir, run_id, model)
            logged, filled = tracking.mark_resumed(run_id, state, config.checkpoint_dir)
            print(f"run {run_id} ({title}): resuming after epoch {state.epoch} of {config.epochs} from "
                  f"{checkpoint.path(config.checkpoint_dir, run_id)}"
                  + (f"; logged {filled} metric points the store had lost" if filled else ""), flush=True)
        tracker = tracking.TrackingCallback(run_id, title, rows=state.rows, logged=logged)
        saver = checkpoint.CheckpointCallback(config.checkpoint_dir, run_id, state)
        trainer = loop.Trainer(model, setup.batches, setup.schedule, evaluation=setup.evaluation,
                               max_device_batch_size=config.max_device_batch_size, jit_compile=config.jit_compile,
                               strategy=strategy, measure_noise_scale=config.measure_noise_scale)
        try:
            with Interruption() as interruption:
                history = trainer.fit(state, config.epochs, callbacks=[*extra_callbacks, tracker, saver],
                                      verbose=verbose, interruption=interruption)
        except loop.TrainingInterrupted:
            tracker.wait()
            tracking.log_history(run_id, tracker.rows, title)
            raise
        tracking.log_step_counts(trainer.step.traces, len(trainer.step.compiled_shapes))
        if history.diverged_epoch is not None:
            epoch, row = history.diverged_epoch, tracker.rows[-1]
            raise tracking.Diverged(epoch, (
                f"run {run_id} diverged: train_loss is {row['train_loss']} at epoch {epoch} (learning_rate "
                f"{row['learning_rate']:g}, batch_size {int(row['batch_size'])}); training stopped there, every "
                f"metric logged up to epoch {epoch} is kept and the run is FAILED"))
        tracking.log_model(model, data.scale(splits.train.images[:2]), int(tracker.rows[-1]["epoch"]),
                           config.register_model)
    except tracking.store_errors() as error:
        if tracking.store_problem(SERVER_CHECK_TIMEOUT_SECONDS) is None:
            raise
        raise tracking.StoreLost(run_id, checkpoint.path(config.checkpoint_dir, run_id), error) from error
    last = tracker.rows[-1]
    print(f"run {run_id} done: test_accuracy {last['test_accuracy']:.4f} after {int(last['updates']):,} updates; "
          f"tracking store {tracking.store_uri()}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
