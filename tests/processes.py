"""Helpers of the end-to-end tests that start training processes: commands, environments, waiting, killing."""

import os
import signal
import sys
import time

import psutil
from mlflow.tracking import MlflowClient

from growing_batch import checkpoint
from growing_batch.metrics import EPOCH_METRICS

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def environment(uri, **extra):
    """The environment of a training process against the store ``uri``: the project's sources on the
    path, no run or experiment of the test process inherited, ``extra`` added."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.path.join(PROJECT_DIR, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    return {**env, **extra}


def train_command(parameters):
    command = [sys.executable, "-m", "growing_batch.train"]
    for name, value in parameters.items():
        command += [f"--{name}", str(value)]
    return command


def mlflow_run_command(parameters, run_id=None, experiment=None):
    command = [sys.executable, "-m", "mlflow", "run", PROJECT_DIR, "--env-manager", "local"]
    if run_id:
        command += ["--run-id", run_id]
    if experiment:
        command += ["--experiment-name", experiment]
    for name, value in parameters.items():
        command += ["-P", f"{name}={value}"]
    return command


def checkpointed_epoch(folder):
    """The highest epoch of any checkpoint under ``folder`` (0 if none yet), and its run id."""
    best = (0, None)
    if os.path.isdir(folder):
        for run_id in os.listdir(folder):
            if checkpoint.exists(folder, run_id):
                try:
                    best = max(best, (checkpoint.load_state(folder, run_id).epoch, run_id))
                except checkpoint.CheckpointError:
                    pass  # being replaced right now
    return best


def wait_for_checkpoint(process, folder, epoch, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, run_id = checkpointed_epoch(folder)
        if done >= epoch:
            return done, run_id
        if process.poll() is not None:
            raise AssertionError(f"the process ended (status {process.returncode}) before epoch {epoch}: "
                                 f"{process.stdout.read() if process.stdout else ''}")
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of epoch {epoch} within {timeout} s")


def kill_tree(process, signal_number=signal.SIGKILL):
    """Kill a process and all its descendants at once, as a machine going away would."""
    parent = psutil.Process(process.pid)
    family = [parent, *parent.children(recursive=True)]
    for member in family:
        try:
            member.send_signal(signal_number)
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=60)


def histories(uri, run_id):
    client = MlflowClient(uri)
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
            for key in EPOCH_METRICS}
