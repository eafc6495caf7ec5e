"""Tracking: everything that talks to MLflow during a run.

The tracking store is MLflow's default (``sqlite:///mlflow.db`` in the working directory) unless
``MLFLOW_TRACKING_URI`` is set. A run started by ``mlflow run`` already exists when the training
script starts (``MLFLOW_RUN_ID``); :func:`start_run` continues it, and otherwise creates one.

What a run holds:

* params — every config field twice: ``<field>`` as given on the command line (empty where not
  given; ``mlflow run`` logs these itself) and ``resolved.<field>`` as used, after the preset and the
  defaults; and what the data fixed: ``train_examples`` (N), ``validation_examples``,
  ``test_examples``, ``replicas`` (the resolved batch cap is in ``config.json`` and the description);
* description (``mlflow.note.content``) — the schedule in words and the values it trained with;
* tags — ``preset``, ``schedule``, ``dataset``, ``model``, ``backend``, ``distribution``, ``git_commit`` and a
  readable run name;
* metrics at ``step = epoch`` (counted from 1) — see :data:`growing_batch.metrics.EPOCH_METRICS`; at the end
  ``train_step_traces`` and ``xla_compilations``; plus MLflow's system
  metrics (CPU, memory; GPU where one is present and ``nvidia-ml-py`` is installed);
* inputs — the train, validation and test splits as MLflow datasets;
* artifacts — ``config.json``, ``history.csv``, ``schedule.png``, ``training_curves.png`` and the
  trained model (``model``, MLflow's Keras flavour, with a signature, an input example and the last
  epoch's metrics linked to it).

Run statuses under ``mlflow run`` (:func:`keep_status_after_mlflow_run`): MLflow 3.17.2's ``mlflow
run`` marks its run FAILED after any non-zero exit (FINISHED after exit 0) even when the script has
ended the run itself — ``_maybe_set_run_terminated`` passes the status string to
``RunStatus.is_terminated``, which expects an int. Where that would change what the script left (an
interrupted run ended KILLED; a refused resume, which must leave the run as it was), the script starts
a small detached process that waits for ``mlflow run`` to exit and then writes back the status (and
end time) the script left. An interrupted run also has the tag ``interrupted`` (the signal and the
epoch), which stays even if that write-back cannot happen; a resume removes it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import subprocess
import sys
import time
import warnings

import mlflow
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from growing_batch import plots
from growing_batch.config import Config, format_value
from growing_batch.metrics import EPOCH_METRICS, NOISE_METRICS, epoch_numbers

# Seconds between system-metric samples, unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise.
SYSTEM_METRICS_INTERVAL_SECONDS = 5
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Seconds the detached process waits for `mlflow run` to exit before it writes the status back anyway.
MLFLOW_RUN_WAIT_SECONDS = 300
INTERRUPTED_TAG = "interrupted"
# MLflow 3's experiment kind: "custom_model_development" opens the experiment on its training runs in the
# UI instead of the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def _is_mlflow_run(command_line: list[str]) -> bool:
    """``mlflow run ...`` or ``python -m mlflow run ...`` (or ``python .../bin/mlflow run ...``)."""
    return any(os.path.basename(part) == "mlflow" and following == "run"
               for part, following in zip(command_line, command_line[1:]))


def mlflow_run_process(run_id: str):
    """The ``mlflow run`` process that will mark ``run_id`` terminated once this process exits, else None.

    That is the nearest ``mlflow run`` ancestor whose command (its child on the way to this process)
    got ``MLFLOW_RUN_ID`` = ``run_id``: a sweep's children, whose runs are not that of the ``mlflow run``
    above the sweep, are not under its control.
    """
    import psutil

    try:
        chain = [psutil.Process(), *psutil.Process().parents()]
        for child, parent in zip(chain, chain[1:]):
            if _is_mlflow_run(parent.cmdline()):
                return parent if child.environ().get("MLFLOW_RUN_ID") == run_id else None
    except psutil.Error:
        return None
    return None


# The detached process: wait for `mlflow run` (pid, start time) to exit, then act on the run. Only MLflow
# and psutil: it starts in a second or so.
_WAIT_FOR_MLFLOW_RUN = """
import sys, psutil
from mlflow.tracking import MlflowClient
pid, started, wait, run_id = sys.argv[1:5]
try:
    process = psutil.Process(int(pid))
    if abs(process.create_time() - float(started)) < 1e-3:
        process.wait(timeout=float(wait))
except (psutil.Error, psutil.TimeoutExpired):
    pass
client = MlflowClient()
"""
# ... write the status back if `mlflow run` replaced it by FAILED (what it writes after a non-zero exit),
_WRITE_BACK = _WAIT_FOR_MLFLOW_RUN + """
status, end_time = sys.argv[5:7]
info = client.get_run(run_id).info
if info.status == "FAILED" and (info.status, str(info.end_time)) != (status, end_time):
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")  # MLflow cannot clear an end time
    else:
        client.set_terminated(run_id, status, end_time=int(end_time))
"""
# ... or delete the run (the report entry point's own run, once its report is logged).
_DELETE = _WAIT_FOR_MLFLOW_RUN + """
client.delete_run(run_id)
"""


def _after_mlflow_run(process, script: str, run_id: str, *arguments: str) -> None:
    """Run ``script`` in a detached process that outlives this one, once ``mlflow run`` (``process``) exited."""
    subprocess.Popen(
        [sys.executable, "-c", script, str(process.pid), repr(process.create_time()), str(MLFLOW_RUN_WAIT_SECONDS),
         run_id, *arguments],
        env=dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri()), start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
    )


def keep_status_after_mlflow_run(run_id: str | None) -> None:
    """Under ``mlflow run`` for ``run_id``: have the run keep the status and end time it has now once
    ``mlflow run`` has exited (see the module); elsewhere nothing. Never raises."""
    process = mlflow_run_process(run_id) if run_id else None
    if process is None:
        return
    try:
        info = MlflowClient().get_run(run_id).info
        _after_mlflow_run(process, _WRITE_BACK, run_id, info.status, str(info.end_time))
    except Exception as error:  # the store may be what failed; the tag `interrupted` still tells
        print(f"warning: run {run_id} may show the status `mlflow run` sets, FAILED ({error})", file=sys.stderr)


def delete_after_mlflow_run(run_id: str) -> bool:
    """Under ``mlflow run`` for ``run_id``: delete that run once ``mlflow run`` has exited (it fails if
    its run is deleted before it marks it). Returns whether it will; elsewhere does nothing."""
    process = mlflow_run_process(run_id)
    if process is None:
        return False
    _after_mlflow_run(process, _DELETE, run_id)
    return True


# --- the run's status: every change of it in the package is made here ---------------------------


class Diverged(Exception):
    """Training stopped at ``epoch`` (from 1) because the loss diverged; ``message`` says how (one line)."""

    def __init__(self, epoch: int, message: str):
        super().__init__(message)
        self.epoch = epoch
        self.message = message


class StoreLost(RuntimeError):
    """The tracking store stopped answering during training; the checkpoint holds every finished epoch."""

    def __init__(self, run_id: str, checkpoint_file: str, error: BaseException):
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        super().__init__(
            f"the tracking store {mlflow.get_tracking_uri()} stopped answering during run {run_id} ({first_line}); "
            f"every finished epoch is in the checkpoint {checkpoint_file}. When the store answers again, resume "
            f"with: python -m growing_batch.train --run_id {run_id} (it logs what the store lacks and finishes the run)"
        )


def store_errors() -> tuple[type[BaseException], ...]:
    """What MLflow's client raises when the store does not answer."""
    import requests
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.RequestException, ConnectionError


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if text else type(error).__name__


@contextlib.contextmanager
def run_lifecycle(config: Config, given: dict[str, str] | None = None, run_id: str | None = None):
    """Start the run (or continue ``run_id``), yield it, and end it by how the block ends — the one
    place a training run's status is set:

    * normally: FINISHED;
    * :class:`Diverged`: FAILED, tags ``diverged=true``, ``diverged_epoch`` and ``error``;
    * interrupted (``growing_batch.loop.TrainingInterrupted``: a signal, the unfinished epoch dropped;
      or ``KeyboardInterrupt``: a second Ctrl-C): KILLED, tag ``interrupted`` (the signal and the
      epoch), and that status kept once ``mlflow run`` has exited (:func:`keep_status_after_mlflow_run`);
    * :class:`StoreLost`: the run is ended FAILED if the store answers again within MLflow's retries,
      else left RUNNING there; either way it can be resumed from its checkpoint;
    * bad input or any other exception: FAILED, with the error's one line as tag ``error``.

    The exception goes on to the caller, which turns it into the exit status.
    """
    from growing_batch.loop import TrainingInterrupted

    try:
        active = start_run(config, given, run_id)  # inside: a failure while tagging it ends it too
        run_id = active.info.run_id
        yield active
    except Diverged as outcome:
        _end_active_run("FAILED", {"diverged": "true", "diverged_epoch": str(outcome.epoch),
                                   "error": outcome.message[:5000]})
        raise
    except (TrainingInterrupted, KeyboardInterrupt) as stop:
        how = f"{stop.signal_name} during epoch {stop.epoch}" if isinstance(stop, TrainingInterrupted) else "SIGINT twice"
        _end_active_run("KILLED", {INTERRUPTED_TAG: how})
        keep_status_after_mlflow_run(run_id)
        raise
    except StoreLost:
        _end_active_run("FAILED", {})  # the store answers again (after MLflow's retries): FAILED; else RUNNING
        raise
    except BaseException as error:
        _end_active_run("FAILED", {"error": _one_line(error)[:5000]})
        raise
    _end_active_run("FINISHED", {})


def _end_active_run(status: str, tags: dict[str, str]) -> None:
    """Tag and end this process's active run (if any) with ``status``; a store that does not answer
    leaves it as it is there (the exception on its way out says why), but never active here."""
    if mlflow.active_run() is None:
        return
    try:
        if tags:
            mlflow.set_tags(tags)
    except store_errors():
        pass
    finally:
        try:
            mlflow.end_run(status)
        except store_errors() as error:  # popped here; the store keeps what it had (RUNNING)
            print(f"warning: could not mark the run {status}: {_one_line(error)[:300]}", file=sys.stderr)


def store_uri() -> str:
    return mlflow.get_tracking_uri()


def _server_problem(timeout_seconds: float) -> str | None:
    """Why the HTTP tracking server does not answer its health check, or None (it does, or the store is local)."""
    import urllib.error
    import urllib.request

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_seconds) as answer:
            answer.read()
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", error))
    return None


def store_problem(timeout_seconds: float) -> str | None:
    """Why the tracking store cannot be used — an HTTP server that does not answer, a sqlite file that
    cannot be created, an unknown scheme, a missing driver — as the rest of a one-line error
    ("expected ..."), or None."""
    uri = mlflow.get_tracking_uri()
    reason = _server_problem(timeout_seconds)
    if reason is not None:
        return (f"expected a tracking server that answers, but it does not ({reason}); start it (mlflow server "
                "...) or set MLFLOW_TRACKING_URI to another store.")
    if uri.startswith(("http://", "https://")):
        return None
    try:
        if uri.startswith("sqlite:"):  # opened later, under a lock (prepare_store)
            from sqlalchemy.engine.url import make_url

            database = make_url(uri).database
            if database and database != ":memory:":
                folder = os.path.dirname(os.path.abspath(database))
                os.makedirs(folder, exist_ok=True)  # as MLflow would
                if not os.access(folder, os.W_OK):
                    raise PermissionError(f"the folder {folder} cannot be written")
        else:
            MlflowClient().search_experiments(max_results=1)
    except Exception as error:  # MlflowException, an OSError, a missing database driver, ...
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        return (f"expected a tracking store MLflow can open, but it cannot ({type(error).__name__}: {first_line}); "
                "e.g. sqlite:///mlflow.db or http://host:5000.")
    return None


def find_run(run_id: str):
    """The run ``run_id`` of the tracking store, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_run(run_id)
    except MlflowException:
        return None


def log_new_run(config: Config, splits, resolved_max_batch_size: int, details: dict) -> None:
    """What a new run records before its first epoch: the split sizes and data inputs, ``config.json``
    (the resolved config with ``details``), and the param ``replicas`` and tag ``distribution``."""
    log_data(splits)
    log_resolved_config(config, {
        "train_examples": len(splits.train),
        "validation_examples": len(splits.validation),
        "test_examples": len(splits.test),
        "resolved_max_batch_size": resolved_max_batch_size,
        "data_source": splits.source,
        **details,
    })
    mlflow.log_param("replicas", details["replicas"])
    mlflow.set_tags({"distribution": details["distribution"],
                     "mlflow.note.content": description(config, len(splits.train), resolved_max_batch_size)})


# The resolved fields the description's table shows first (then the schedule's own).
DESCRIBED_FIELDS = ("preset", "schedule", "dataset", "model", "learning_rate", "batch_size", "optimizer", "momentum",
                    "weight_decay", "epochs", "seed")


def description(config: Config, train_size: int, resolved_max_batch_size: int) -> str:
    """The run's description in the MLflow UI (``mlflow.note.content``, Markdown): the schedule in words
    and a short table of the values it trained with."""
    from growing_batch import schedules

    names = [name for name in DESCRIBED_FIELDS if name != "preset" or config.preset]
    names += [name for name in schedules.SCHEDULE_FIELDS[config.schedule] if name not in names]
    params = config.to_params()
    rows = [f"| `{name}` | {resolved_max_batch_size if name == 'max_batch_size' else params[name]} |" for name in names]
    title = f"{config.preset}: " if config.preset else ""
    return "\n".join([
        f"**{title}{config.schedule}** — {schedules.describe(config, train_size)} "
        f"({config.model} on {config.dataset}, N = {train_size:,}, {config.epochs} epochs counted from 1).",
        "",
        "| parameter | value |",
        "|---|---|",
        *rows,
        "",
        "Every parameter as given and as used: the params `<name>` and `resolved.<name>`; `config.json`.",
    ])


def mark_resumed(run_id: str, state, checkpoint_dir: str) -> tuple[dict[str, set[int]], int]:
    """A resumed run: log the points of ``state.rows`` the store lacks, tag ``resumed_from_epoch``, drop
    the ``interrupted`` tag (it is running again) and note a moved ``checkpoint_dir``. Returns the
    steps the store holds per metric and how many points were filled in."""
    logged = logged_steps(run_id)
    filled = backfill(run_id, state.rows, logged)
    mlflow.set_tag("resumed_from_epoch", str(state.epoch))
    run = mlflow.get_run(run_id)
    if INTERRUPTED_TAG in run.data.tags:
        mlflow.delete_tag(INTERRUPTED_TAG)
    if run.data.params.get("resolved.checkpoint_dir") != checkpoint_dir:
        mlflow.set_tag("checkpoint_dir", checkpoint_dir)  # moved there by the user
    return logged, filled


def log_step_counts(traces: int, compilations: int) -> None:
    mlflow.log_metrics({"train_step_traces": traces, "xla_compilations": compilations})


def fail_run(run_id: str, message: str) -> None:
    """Mark a run FAILED with an ``error`` tag — one this process never started (bad input found before
    training, in a run ``mlflow run`` created); a run already ended keeps its status."""
    from mlflow.entities import RunStatus

    try:
        client = MlflowClient()
        client.set_tag(run_id, "error", message[:5000])
        if not RunStatus.is_terminated(RunStatus.from_string(client.get_run(run_id).info.status)):
            client.set_terminated(run_id, "FAILED")
    except Exception as error:  # the store itself may be the problem: say so, and go on failing
        print(f"warning: could not mark run {run_id} FAILED: {error}", file=sys.stderr)


def end_run_of_process(client: MlflowClient, run_id: str, succeeded: bool) -> str:
    """A run another process trained (a sweep's child): FINISHED or FAILED if that process left it
    RUNNING (it died); returns the run's status."""
    from mlflow.entities import RunStatus

    status = client.get_run(run_id).info.status
    if not RunStatus.is_terminated(RunStatus.from_string(status)):
        client.set_terminated(run_id, "FINISHED" if succeeded else "FAILED")
        status = client.get_run(run_id).info.status
    return status


def set_status(client: MlflowClient, run_id: str, status: str) -> None:
    """Set a run's status outright: a sweep's parent (RUNNING again when continued; its outcome at the
    end) and a superseded child left RUNNING by a process that died (FAILED)."""
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status)


def _number(value: float) -> str:
    return format(value, "g")


def run_name(config: Config) -> str:
    """A readable name, e.g. ``batch-growth b128x1.037 lr0.1 s0`` (``repro-ibs: batch-growth ...``)."""
    batch = f"b{config.batch_size}"
    rate = f"lr{_number(config.learning_rate)}"
    if config.schedule == "lr-decay":
        rate += f"x{_number(config.lr_decay)}"
    elif config.schedule == "batch-growth":
        batch += f"x{_number(config.batch_growth)}"
    elif config.schedule == "noise-matched":
        batch += f"x{_number(round(1 / config.lr_decay, 4))}"
    elif config.schedule in ("step-lr", "step-batch", "step-hybrid"):
        rate += f" /{_number(config.step_factor)}@{format_value(config.milestones)}"
    if config.optimizer != "sgd" or config.momentum:
        rate += f" {config.optimizer}{'-nesterov' if config.nesterov else ''} m{_number(config.momentum)}"
    name = f"{config.schedule} {batch} {rate} s{config.seed}"
    return f"{config.preset}: {name}" if config.preset else name


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive advisory lock on ``path`` (created if missing) while the context is open."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def prepare_store() -> None:
    """Create or migrate a sqlite tracking store once, before this process logs to it.

    MLflow builds and migrates a new sqlite store's tables in whichever process opens it first,
    with no lock between processes: runs started at once against a store that does not exist yet
    all build it together and fail ("table _alembic_tmp_experiments already exists", "duplicate
    column name: step"), leaving it half-built. Opening it under an exclusive lock on
    ``<database>.lock`` lets one process build it while the others wait and then find it complete.
    Other stores are left alone. (``mlflow run`` opens the store itself before this script starts:
    create the store once before starting several of those at once.)
    """
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:"):
        return
    from sqlalchemy.engine.url import make_url

    path = make_url(uri).database
    if not path or path == ":memory:":
        return
    with _file_lock(path + ".lock"):
        MlflowClient().search_experiments(max_results=1)


def artifact_location(experiment_name: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: beside the database, in
    ``mlartifacts/<database name>/<experiment name>`` (MLflow's default, ``./mlruns`` of the working
    directory, would mix the artifacts of every store used from there); None for other stores."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine.url import make_url

    database = make_url(uri).database
    if not database or database == ":memory:":
        return None
    folder = os.path.dirname(os.path.abspath(database))
    stem = os.path.splitext(os.path.basename(database))[0]
    safe = "".join(character if character.isalnum() or character in "-_." else "_" for character in experiment_name)
    return os.path.join(folder, "mlartifacts", stem, safe)


def experiment_id_for(name: str) -> str:
    """The id of the experiment ``name``, created (artifacts beside a sqlite store) if new."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(name))


def start_run(config: Config, given: dict[str, str] | None = None, run_id: str | None = None) -> mlflow.ActiveRun:
    """Continue the run ``run_id`` (the one ``mlflow run`` created, or one to resume), or start a new
    one; name, tag and log params.

    ``given`` is the command line's text per field (what the user passed; see log_config_params).
    """
    prepare_store()
    if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_SECONDS)
    experiment_id = None
    if not run_id and not os.environ.get("MLFLOW_EXPERIMENT_ID") and os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        experiment_id = experiment_id_for(os.environ["MLFLOW_EXPERIMENT_NAME"])  # its artifacts beside the store
    active = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=run_name(config),
                              log_system_metrics=True)
    experiment = MlflowClient().get_experiment(active.info.experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # the UI then opens the experiment on its training runs
        MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    tags = {"schedule": config.schedule, "dataset": config.dataset, "model": config.model,
            "preset": config.preset or "none", "backend": config.backend}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    mlflow.set_tags(tags)
    log_config_params(active.info.run_id, config, given or {})
    return active


def log_config_params(run_id: str, config: Config, given: dict[str, str]) -> None:
    """Two params per config field: ``<field>`` as given, ``resolved.<field>`` as used.

    ``<field>`` records the command line: under ``mlflow run`` MLflow itself logs every MLproject
    parameter before the script starts (empty, shown as '', where not given); otherwise this logs
    the given text, or empty. Params are write-once, so what a preset or a default resolved to goes
    to ``resolved.<field>``: compare runs on those.
    """
    existing = MlflowClient().get_run(run_id).data.params
    # a resumed run has them already (equal, but for a checkpoint_dir the user moved: the first stays)
    params = {f"resolved.{name}": text for name, text in config.to_params().items()
              if f"resolved.{name}" not in existing}
    for name in config.to_params():
        if name not in existing:
            params[name] = str(given.get(name, ""))
    mlflow.log_params(params)


def log_data(splits) -> None:
    """Record N and the other split sizes as params, and each split as an MLflow dataset input."""
    mlflow.log_params(
        {
            "train_examples": len(splits.train),
            "validation_examples": len(splits.validation),
            "test_examples": len(splits.test),
        }
    )
    for context, part in (("train", splits.train), ("validation", splits.validation), ("test", splits.test)):
        if len(part) == 0:
            continue
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
            dataset = mlflow.data.from_numpy(
                part.images, targets=part.labels, source=splits.source, name=f"{splits.name}-{context}"
            )
        mlflow.log_input(dataset, context=context)


def history_csv(rows: list[dict]) -> str:
    """The per-epoch history as CSV, one row per epoch, columns in a stable order."""
    columns = ["epoch"] + [name for name in (*EPOCH_METRICS, *NOISE_METRICS) if any(name in row for row in rows)]
    columns += sorted({key for row in rows for key in row} - set(columns))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def logged_steps(run_id: str) -> dict[str, set[int]]:
    """The steps each per-epoch metric of the run already has in the store."""
    client = MlflowClient()
    keys = [key for key in client.get_run(run_id).data.metrics if not key.startswith("system/")]
    return {key: {metric.step for metric in client.get_metric_history(run_id, key)} for key in keys}


def backfill(run_id: str, rows: list[dict], logged: dict[str, set[int]]) -> int:
    """Log every point of ``rows`` (``{"epoch": step, name: value}``) the store lacks; return how many."""
    timestamp = int(time.time() * 1000)
    missing = [
        Metric(key, value, timestamp, int(row["epoch"]))
        for row in rows
        for key, value in row.items()
        if key != "epoch" and int(row["epoch"]) not in logged.get(key, set())
    ]
    client = MlflowClient()
    for start in range(0, len(missing), 1000):  # MLflow takes at most 1,000 metrics per batch
        client.log_batch(run_id, metrics=missing[start:start + 1000])
    for metric in missing:
        logged.setdefault(metric.key, set()).add(metric.step)
    return len(missing)


def _tracking_callback_class():
    """The Keras callback class, defined on first use: Keras (and TensorFlow) load only when a run
    trains, so the checks before it — bad input, the store, a refused resume — answer in seconds."""
    import keras

    class TrackingCallback(keras.callbacks.Callback):
        """Logs each epoch's metrics at ``step = epoch`` (from 1) and, at the end, the history files.

        All numbers in the epoch's logs are logged in one batched call per epoch, asynchronously
        (MLflow's logging queue), so training does not wait for the store; ``on_train_end`` waits until
        every point is stored. ``logging_seconds`` is the time the training thread spent in logging.

        Resuming a run: ``rows`` are the epochs done before (they go into ``history.csv``), and
        ``logged`` the steps the store already holds per metric; a point already there is not logged
        again, so a retrained epoch leaves no duplicate step.
        """

        def __init__(self, run_id: str, title: str = "", rows: list[dict] | None = None,
                     logged: dict[str, set[int]] | None = None):
            super().__init__()
            self.run_id = run_id
            self.title = title
            self.client = MlflowClient()
            self.rows: list[dict] = list(rows or [])
            self.logged = logged if logged is not None else {}
            self.logging_seconds = 0.0
            self._pending = []

        def on_epoch_end(self, epoch: int, logs=None) -> None:
            started = time.perf_counter()
            step = epoch + 1
            timestamp = int(time.time() * 1000)
            numbers = epoch_numbers(logs)
            self.rows.append({"epoch": step, **numbers})
            metrics = [Metric(key, value, timestamp, step) for key, value in numbers.items()
                       if step not in self.logged.get(key, ())]
            if metrics:
                self._pending.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))
            self.logging_seconds += time.perf_counter() - started

        def wait(self) -> None:
            """Block until every metric point logged so far is in the store."""
            for operation in self._pending:
                operation.wait()
            self._pending = []

        def on_train_end(self, logs=None) -> None:
            self.wait()
            log_history(self.run_id, self.rows, self.title)

    return TrackingCallback


def __getattr__(name: str):
    if name == "TrackingCallback":  # see _tracking_callback_class
        globals()[name] = _tracking_callback_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def log_history(run_id: str, rows: list[dict], title: str = "") -> None:
    """``history.csv``, ``schedule.png`` and ``training_curves.png`` of the run."""
    if not rows:
        return
    client = MlflowClient()
    client.log_text(run_id, history_csv(rows), "history.csv")
    figures = {
        "schedule.png": plots.schedule_figure(rows, f"schedule: {title}" if title else ""),
        "training_curves.png": plots.training_curves_figure(rows, title),
    }
    for name, figure in figures.items():
        client.log_figure(run_id, figure, name)


# What the logged model takes and gives, in its metadata (shown on its page in the MLflow UI).
MODEL_INPUT = "float32 images in [0, 1], shape (n, height, width, channels): uint8 pixels / 255"
MODEL_OUTPUT = ("logits, shape (n, classes): one unnormalised score per class (argmax = the predicted class; "
                "softmax = the probabilities); the pyfunc flavour returns these logits too")


def log_model(model, sample_images: np.ndarray, epoch: int, registered_model_name: str = "") -> str:
    """The trained model in MLflow's Keras flavour, with a signature and an input example (two images
    of the training set), its input and output described in its metadata, the run's metrics of its
    last ``epoch`` linked to it (so the Models view can rank models by test accuracy), and registered
    under ``registered_model_name`` when given. Returns the logged model's id."""
    import keras
    from mlflow.models import infer_signature

    from mlflow.models import Model

    sample = np.asarray(sample_images[:2], dtype=np.float32)
    signature = infer_signature(sample, np.asarray(model(sample, training=False)))
    info = Model.log(  # what mlflow.keras.log_model does, with the flavour below
        artifact_path=None,
        name="model",
        flavor=_keras_flavour(),
        model=model,
        step=int(epoch),  # links the run's metrics at that step (epoch) to the model
        signature=signature,
        input_example=sample,
        metadata={"input": MODEL_INPUT, "output": MODEL_OUTPUT},
        registered_model_name=registered_model_name or None,
        pip_requirements=[f"keras=={keras.__version__}", *_backend_requirements(), f"mlflow=={mlflow.__version__}"],
    )
    return info.model_id


def _backend_requirements() -> list[str]:
    """The logged model's backend pins: the TensorFlow or the JAX release this process trained with."""
    import importlib.metadata

    import keras

    names = ("jax", "jaxlib") if keras.backend.backend() == "jax" else ("tensorflow",)
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def _keras_flavour():
    """MLflow's Keras flavour, whose ``save_model`` first creates the model's folder: MLflow 3.17.2's
    writes the input example before it creates the folder, so ``mlflow.keras.log_model(...,
    input_example=...)`` fails with FileNotFoundError (README, Known issues)."""
    import types

    import mlflow.keras

    def save_model(path, **options):
        os.makedirs(path, exist_ok=True)
        return mlflow.keras.save_model(path=path, **options)

    flavour = types.ModuleType("mlflow.keras")
    flavour.save_model = save_model
    return flavour


def log_resolved_config(config: Config, extra: dict) -> None:
    mlflow.log_dict({**config.to_dict(), **extra}, "config.json")
