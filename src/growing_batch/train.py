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
* 3 — diverged: the training loss became NaN or infinite; training stopped at that epoch, every
  metric logged until then is kept, and the run is FAILED with tags ``diverged=true`` and
  ``diverged_epoch``.
* 128 + signal (130 for SIGINT, 143 for SIGTERM) — interrupted: the unfinished epoch is dropped,
  the run is KILLED, and the checkpoint of the last finished epoch lets it be resumed.
* 1 — anything else (the run is FAILED, with the error as its ``error`` tag). A process killed
  outright (SIGKILL) leaves its run RUNNING; resuming it continues from its checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import urllib.error
import urllib.request
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
    argv = list(sys.argv[1:] if argv is None else argv)
    resuming = False
    try:
        argv, run_id = _pop_run_id(argv)
        given = config_module.command_line_values(argv)
        if run_id:
            os.environ["MLFLOW_RUN_ID"] = run_id  # what `mlflow run --run-id` sets
        run_id = os.environ.get("MLFLOW_RUN_ID") or None
        chief = distribute.is_chief()  # of a multi-worker cluster: only the chief talks to MLflow
        if chief:
            check_tracking_store()
        values = given
        if run_id and chief:  # continuing a run: its own parameters, unless given (then they must agree)
            resolved = _resolved_params(run_id, required=not given)
            resuming = bool(resolved)
            values = {**resolved, **config_module.given_texts(given)}
        config = config_module.from_strings(values)
        if chief:
            check_checkpoint_dir(config.checkpoint_dir)
            for warning in config_module.warnings_for(config):
                print(f"warning: {warning}", file=sys.stderr, flush=True)
    except StoreUnreachable as error:
        return exit_with_error(str(error), mark_run=False)
    except Refused as error:
        return _refuse(error)
    except ConfigError as error:
        return _refuse(error) if resuming else exit_with_error(str(error))
    from growing_batch.data import DataError

    try:
        return train(config, given=given)
    except StoreLost as error:
        return exit_with_error(str(error), exit_code=1, mark_run=False)
    except Refused as error:
        return _refuse(error)
    except checkpoint.CheckpointSaveError as error:
        return exit_with_error(str(error), exit_code=1)
    except (ConfigError, DataError, CheckpointError) as error:
        return exit_with_error(str(error))


def _refuse(error: Exception) -> int:
    """A refused resume: one line, exit 2, and the run left as it was — also once `mlflow run` has
    exited, which would otherwise mark it FAILED (growing_batch.tracking.keep_status_after_mlflow_run)."""
    status = exit_with_error(str(error), mark_run=False)
    run_id = os.environ.get("MLFLOW_RUN_ID")
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


def _pop_run_id(argv: list[str]) -> tuple[list[str], str]:
    rest, run_id, index = [], "", 0
    while index < len(argv):
        if argv[index] == "--run_id" and index + 1 < len(argv):
            run_id, index = argv[index + 1].strip(), index + 2
        elif argv[index].startswith("--run_id="):
            run_id, index = argv[index].split("=", 1)[1].strip(), index + 1
        else:
            rest.append(argv[index])
            index += 1
    return rest, run_id


def _server_problem() -> str | None:
    """Why the HTTP tracking server does not answer its health check, or None (it does, or the store is local)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVER_CHECK_TIMEOUT_SECONDS) as answer:
            answer.read()
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", error))
    return None


def _store_answers() -> bool:
    return _server_problem() is None


def check_tracking_store() -> None:
    """Fail fast, before any data is loaded, when the tracking store does not answer (an HTTP server)
    or cannot be opened (a sqlite file that cannot be created, an unknown scheme, a missing driver)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    reason = _server_problem()
    if reason is not None:
        raise StoreUnreachable(
            f"MLFLOW_TRACKING_URI={uri!r} is not allowed: expected a tracking server that answers, but it "
            f"does not ({reason}); start it (mlflow server ...) or set MLFLOW_TRACKING_URI to another store."
        ) from None
    if uri.startswith(("http://", "https://")):
        return
    try:
        if uri.startswith("sqlite:"):  # opened later, under a lock (growing_batch.tracking.prepare_store)
            from sqlalchemy.engine.url import make_url

            database = make_url(uri).database
            if database and database != ":memory:":
                folder = os.path.dirname(os.path.abspath(database))
                os.makedirs(folder, exist_ok=True)  # as MLflow would
                if not os.access(folder, os.W_OK):
                    raise PermissionError(f"the folder {folder} cannot be written")
        else:
            from mlflow.tracking import MlflowClient

            MlflowClient().search_experiments(max_results=1)
    except Exception as error:  # MlflowException, an OSError, a missing database driver, ...
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise StoreUnreachable(
            f"MLFLOW_TRACKING_URI={uri!r} is not allowed: expected a tracking store MLflow can open, but it "
            f"cannot ({type(error).__name__}: {first_line}); e.g. sqlite:///mlflow.db or http://host:5000."
        ) from None


def _get_run(run_id: str):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_run(run_id)
    except MlflowException:
        import mlflow

        raise Refused(
            f"run_id={run_id!r} is not allowed: expected a run in the tracking store {mlflow.get_tracking_uri()}, "
            "and there is none with that id."
        ) from None


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
MOVABLE = ("checkpoint_dir",)


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
        if _without_movable(state.config) != _without_movable(config.to_dict()):
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


def train(config: Config, extra_callbacks: Sequence = (), verbose: int = 1, given: dict | None = None) -> int:
    """Run one configuration end to end, or resume it; returns the exit status (see the module).

    Raises ConfigError/DataError/CheckpointError on bad input, before any training.
    ``given``: the command line's text per field, logged as the plain-name params (default: none).
    """
    from growing_batch import data, schedules

    run_id = os.environ.get("MLFLOW_RUN_ID") or None
    chief = distribute.is_chief()
    with contextlib.ExitStack() as stack:
        resume_state = None
        if run_id and chief:  # an existing run: no other process may train it meanwhile; refused before any work
            stack.enter_context(_lock(config, run_id))
            resume_state = plan_resume(config, run_id)
        strategy = distribute.make_strategy(config.devices)  # before TensorFlow's runtime starts
        replicas = distribute.replica_count(strategy)
        if config.jit_compile and replicas > 1:
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

        import mlflow

        from growing_batch import tracking

        model, batches, evaluation = _build(config, strategy, splits)

        active = tracking.start_run(config, given)
        try:
            if not run_id:
                run_id = active.info.run_id
                stack.enter_context(_lock(config, run_id))
            return _train_in_run(config, run_id, resume_state, model, batches, schedule, evaluation, splits,
                                 max_batch_size, extra_callbacks, verbose, strategy)
        except StoreLost:
            _leave_run_to_resume()
            raise
        except KeyboardInterrupt:  # a second Ctrl-C: quit at once, the last checkpoint stays
            if mlflow.active_run():
                mlflow.set_tag(tracking.INTERRUPTED_TAG, "SIGINT twice")
                mlflow.end_run("KILLED")
                tracking.keep_status_after_mlflow_run(run_id)
            raise
        except BaseException as error:
            if mlflow.active_run():
                if isinstance(error, (ConfigError, CheckpointError, data.DataError)):
                    mlflow.set_tag("error", " ".join(str(error).split())[:5000])
                mlflow.end_run("FAILED")
            raise


class StoreLost(RuntimeError):
    """The tracking store stopped answering during training; the checkpoint holds every finished epoch."""

    def __init__(self, run_id: str, checkpoint_file: str, error: BaseException):
        import mlflow

        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        super().__init__(
            f"the tracking store {mlflow.get_tracking_uri()} stopped answering during run {run_id} ({first_line}); "
            f"every finished epoch is in the checkpoint {checkpoint_file}. When the store answers again, resume "
            f"with: python -m growing_batch.train --run_id {run_id} (it logs what the store lacks and finishes the run)"
        )


def _store_errors() -> tuple[type[BaseException], ...]:
    import requests
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.RequestException, ConnectionError


def _leave_run_to_resume() -> None:
    """Let go of the active run without waiting on a store that does not answer (it stays RUNNING there)."""
    import mlflow
    from mlflow.tracking import fluent

    run = mlflow.active_run()
    try:
        mlflow.end_run("FAILED")  # pops the run, then tries the store: a store back by now records FAILED
    except _store_errors():
        monitor = getattr(fluent, "run_id_to_system_metrics_monitor", {}).pop(run.info.run_id, None)
        if monitor is not None:
            monitor.finish()


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
    with strategy.scope():
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
    with loop.Interruption() as interruption:
        try:
            trainer = loop.Trainer(model, batches, schedule, max_device_batch_size=config.max_device_batch_size,
                                   strategy=strategy, measure_noise_scale=config.measure_noise_scale)
            trainer.fit(state, config.epochs, verbose=0, interruption=interruption)
        except loop.TrainingInterrupted as stop:
            return 128 + getattr(signal, stop.signal_name).value
    return 0


def _train_in_run(config, run_id, resume_state, model, batches, schedule, evaluation, splits, max_batch_size,
                  extra_callbacks, verbose, strategy) -> int:
    import mlflow

    from growing_batch import loop, models, tracking

    title = tracking.run_name(config)
    if resume_state is None:
        state = checkpoint.State(config=config.to_dict())
        tracking.log_data(splits, max_batch_size)
        tracking.log_resolved_config(
            config,
            {
                "train_examples": len(splits.train),
                "validation_examples": len(splits.validation),
                "test_examples": len(splits.test),
                "resolved_max_batch_size": max_batch_size,
                "data_source": splits.source,
                "parameters": model.count_params(),
                "input_standardization": models.input_standardization(model),
                "epochs_counted_from": 1,
                "replicas": int(strategy.num_replicas_in_sync),
                "distribution": distribute.describe(strategy),
            },
        )
        mlflow.log_param("replicas", int(strategy.num_replicas_in_sync))
        mlflow.set_tag("distribution", distribute.describe(strategy))
        logged = {}
        print(
            f"run {run_id} ({title}): {config.dataset} N={len(splits.train)}, "
            f"{model.count_params():,} parameters, data from {splits.source}",
            flush=True,
        )
    else:
        state = checkpoint.restore(config.checkpoint_dir, run_id, model)
        logged = tracking.logged_steps(run_id)
        filled = tracking.backfill(run_id, state.rows, logged)
        mlflow.set_tag("resumed_from_epoch", str(state.epoch))
        if tracking.INTERRUPTED_TAG in mlflow.get_run(run_id).data.tags:  # it is running again
            mlflow.delete_tag(tracking.INTERRUPTED_TAG)
        if mlflow.get_run(run_id).data.params.get("resolved.checkpoint_dir") != config.checkpoint_dir:
            mlflow.set_tag("checkpoint_dir", config.checkpoint_dir)  # moved there by the user
        print(
            f"run {run_id} ({title}): resuming after epoch {state.epoch} of {config.epochs} from "
            f"{checkpoint.path(config.checkpoint_dir, run_id)}"
            + (f"; logged {filled} metric points the store had lost" if filled else ""),
            flush=True,
        )
    tracker = tracking.TrackingCallback(run_id, title, rows=state.rows, logged=logged)
    saver = loop.CheckpointCallback(config.checkpoint_dir, run_id, state)
    try:
        return _fit_and_finish(config, run_id, model, batches, schedule, evaluation, splits, extra_callbacks,
                               verbose, state, tracker, saver, title, strategy)
    except _store_errors() as error:
        if _store_answers():
            raise
        raise StoreLost(run_id, checkpoint.path(config.checkpoint_dir, run_id), error) from error


def _fit_and_finish(config, run_id, model, batches, schedule, evaluation, splits, extra_callbacks, verbose, state,
                    tracker, saver, title, strategy) -> int:
    import math

    import mlflow

    from growing_batch import data, loop, tracking

    try:
        trainer = loop.Trainer(model, batches, schedule, evaluation=evaluation,
                               max_device_batch_size=config.max_device_batch_size, jit_compile=config.jit_compile,
                               strategy=strategy, measure_noise_scale=config.measure_noise_scale)
        with loop.Interruption() as interruption:
            history = trainer.fit(state, config.epochs, callbacks=[*extra_callbacks, tracker, saver], verbose=verbose,
                                  interruption=interruption)
    except loop.TrainingInterrupted as stop:
        tracker.wait()
        tracking.log_history(run_id, tracker.rows, title)
        mlflow.set_tag(tracking.INTERRUPTED_TAG, f"{stop.signal_name} during epoch {stop.epoch}")
        mlflow.end_run("KILLED")
        tracking.keep_status_after_mlflow_run(run_id)
        done = f"epochs 1-{stop.epoch - 1} are logged and checkpointed" if stop.epoch > 1 else "no epoch was finished"
        print(
            f"run {run_id} interrupted by {stop.signal_name} during epoch {stop.epoch}: {done}; the run is KILLED. "
            f"Resume it with: python -m growing_batch.train --run_id {run_id}",
            file=sys.stderr,
            flush=True,
        )
        return 128 + getattr(signal, stop.signal_name).value
    step = trainer.step
    mlflow.log_metrics({"train_step_traces": step.traces, "xla_compilations": len(step.compiled_shapes)})
    if history.diverged_epoch is not None:
        epoch = history.diverged_epoch
        row = tracker.rows[-1]
        mlflow.set_tags({"diverged": "true", "diverged_epoch": str(epoch)})
        message = (
            f"run {run_id} diverged: train_loss is {row['train_loss']} at epoch {epoch} (learning_rate "
            f"{row['learning_rate']:g}, batch_size {int(row['batch_size'])}); training stopped there, every metric "
            f"logged up to epoch {epoch} is kept and the run is FAILED"
        )
        mlflow.set_tag("error", message)
        mlflow.end_run("FAILED")
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    tracking.log_model(model, data.scale(splits.train.images[:8]))
    last = tracker.rows[-1]
    assert math.isfinite(last["train_loss"])
    print(
        f"run {run_id} done: test_accuracy {last['test_accuracy']:.4f} after "
        f"{int(last['updates']):,} updates; tracking store {mlflow.get_tracking_uri()}",
        flush=True,
    )
    mlflow.end_run("FINISHED")
    checkpoint.remove(config.checkpoint_dir, run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
