"""The ``sweep`` entry point: a named experiment × seeds, as child runs of one parent run.

    mlflow run . --env-manager local -e sweep -P experiment=quick -P seeds=2 -P workers=2
    python -m growing_batch.sweep --experiment repro --seeds 3 --dataset fashion_mnist

Each child is one training run (``python -m growing_batch.train``) of one member of the experiment
with one seed, in its own process, ``workers`` at a time; it is an MLflow run tagged
``mlflow.parentRunId`` = the parent, ``sweep_member``, ``sweep_seed`` and ``sweep_child``. The
overrides (``epochs``, ``dataset``, ``max_examples``, ``validation_size``, ``data_dir``, ``precision``, ``checkpoint_dir``, ``backend``;
empty: not given) go to every child. At the end the parent logs ``summary.csv`` (one row per member, mean ± std
over seeds, ratios to the LR-decay baseline), ``runs.csv`` and the comparison figures.

A sweep is resumable. The same sweep (same experiment, seeds and overrides: tag ``sweep_key``) run
again continues the parent it made the first time: children that FINISHED are skipped, and so are
children that diverged (they would diverge again; the summary lists them); a child that was
interrupted or killed and has a checkpoint is resumed in its own run from its last finished epoch;
other failed or missing ones run again (a failed child is kept, tagged ``sweep_superseded``, and a
new child runs in its place). Under ``mlflow run``, which makes a new run per call, the new run records
``sweep_resumed`` = the continued parent and holds nothing else.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from growing_batch import checkpoint, tracking, train
from growing_batch import config as config_module
from growing_batch.config import ConfigError
from growing_batch.errors import exit_with_error
from growing_batch.presets import PRESETS

OVERRIDES = ("epochs", "dataset", "max_examples", "validation_size", "data_dir", "precision", "checkpoint_dir", "backend")


@dataclasses.dataclass(frozen=True)
class Member:
    """One arm of an experiment: a name and the command-line values of its training runs."""

    name: str
    values: dict


def _presets(names):
    return [Member(name, {"preset": name}) for name in names]


# The named experiments. `quick` is the main job's comparison (README: "The main job").
EXPERIMENTS: dict[str, list[Member]] = {
    "quick": [
        Member("lr-decay", {"schedule": "lr-decay", "dataset": "fashion_mnist", "epochs": "10"}),
        Member("noise-matched", {"schedule": "noise-matched", "dataset": "fashion_mnist", "epochs": "10"}),
    ],
    "repro": _presets(["repro-lrd", "repro-ibs", "repro-matched", "repro-hybrid"]),
    "paper": _presets(["paper-decay", "paper-hybrid", "paper-increase"]),
    "paper-nesterov": _presets(["paper-decay-nesterov", "paper-hybrid-nesterov", "paper-increase-nesterov"]),
    "paper-sgd": _presets(["paper-decay-sgd", "paper-hybrid-sgd", "paper-increase-sgd"]),
    "paper-adam": _presets(["paper-decay-adam", "paper-hybrid-adam", "paper-increase-adam"]),
    # The paper's table (B_max = 5,120 ≈ N/10, then ε decays), as the paper states it.
    "paper-table": _presets(["paper-decay", "paper-increase-5120", "paper-lr0.5", "paper-momentum0.98"]),
}
assert all(m.values.get("preset", "") in ("", *PRESETS) for members in EXPERIMENTS.values() for m in members)


@dataclasses.dataclass(frozen=True)
class Child:
    member: str
    seed: int
    values: dict  # command-line values of the training run

    @property
    def key(self) -> str:
        return f"{self.member}/seed={self.seed}"

    @property
    def checkpoint_dir(self) -> str:
        return config_module.from_strings(self.values).checkpoint_dir

    def argv(self) -> list[str]:
        arguments = []
        for name, value in self.values.items():
            arguments += [f"--{name}", str(value)]
        return arguments


def plan(experiment: str, seeds: int, overrides: dict[str, str]) -> list[Child]:
    """The children of a sweep, seed-major, each validated (a bad value fails here, before anything runs)."""
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"experiment={experiment!r} is not allowed: expected one of {', '.join(EXPERIMENTS)}.")
    if seeds < 1:
        raise ConfigError(f"seeds='{seeds}' is not allowed: expected a whole number >= 1.")
    given = {name: value for name, value in overrides.items() if str(value).strip() != ""}
    children = []
    for seed in range(seeds):  # seed by seed: a sweep stopped early has every member at its first seeds
        for member in EXPERIMENTS[experiment]:
            values = {**member.values, **given, "seed": str(seed), "verbose": "2"}  # one line per epoch in its log
            config_module.from_strings(values)  # validates, raising ConfigError
            children.append(Child(member.name, seed, values))
    return children


def sweep_key(experiment: str, seeds: int, overrides: dict[str, str]) -> str:
    given = {name: str(value) for name, value in sorted(overrides.items()) if str(value).strip() != ""}
    text = json.dumps({"experiment": experiment, "seeds": seeds, "overrides": given}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def find_parent(client: MlflowClient, experiment_id: str, key: str, exclude: str | None) -> str | None:
    """The earliest parent run of the same sweep in this experiment, if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.sweep_key = '{key}' and tags.sweep_role = 'parent'",
        order_by=["attributes.start_time ASC"],
    )
    for run in runs:
        if run.info.run_id != exclude:
            return run.info.run_id
    return None


def existing_children(client: MlflowClient, experiment_id: str, parent_id: str) -> dict[str, list]:
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    by_key: dict[str, list] = {}
    for run in runs:
        by_key.setdefault(run.data.tags.get("sweep_child", ""), []).append(run)
    return by_key


_print_lock = threading.Lock()


def _say(text: str) -> None:
    with _print_lock:
        print(text, flush=True)


def run_child(client: MlflowClient, experiment_id: str, parent_id: str, key: str, child: Child, log_dir: str,
              resume_run_id: str | None = None) -> str:
    """Create the child run (or take ``resume_run_id``, a stopped child with a checkpoint), train in a
    subprocess that continues it, and return its status."""
    if resume_run_id:
        run_id = resume_run_id
        _say(f"resume {child.key:<32} run {run_id}")
    else:
        run_id = client.create_run(
            experiment_id,
            tags={
                "mlflow.parentRunId": parent_id,
                "mlflow.runName": f"{child.member} s{child.seed}",
                "sweep_key": key,
                "sweep_child": child.key,
                "sweep_member": child.member,
                "sweep_seed": str(child.seed),
                "sweep_role": "child",
            },
        ).info.run_id
        _say(f"start  {child.key:<32} run {run_id}")
    environment = dict(os.environ, MLFLOW_RUN_ID=run_id, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(),
                       MLFLOW_EXPERIMENT_ID=experiment_id)
    log_path = os.path.join(log_dir, f"{run_id}.log")
    with open(log_path, "w") as log:
        process = subprocess.run([sys.executable, "-m", "growing_batch.train", *child.argv()],
                                 env=environment, stdout=log, stderr=subprocess.STDOUT, check=False)
    status = tracking.end_run_of_process(client, run_id, succeeded=process.returncode == 0)
    try:
        client.log_artifact(run_id, log_path, "logs/resumed" if resume_run_id else "logs")
    except Exception as error:  # the log is a convenience; the run's own records are complete
        _say(f"warning: could not attach the log of {run_id}: {error}")
    if status == "FAILED" and client.get_run(run_id).data.tags.get("diverged") == "true":
        status = "DIVERGED"  # an outcome of the experiment, not a failure of the sweep
    _say(f"{'done' if status == 'FINISHED' else status.lower():<6} {child.key:<32} run {run_id}")
    return status


def log_summary(client: MlflowClient, parent_id: str) -> str:
    """Log summary.csv, runs.csv and the comparison figures to the parent; return the printed table."""
    from growing_batch import analysis, plots

    runs, history = analysis.load_runs(parent_run_id=parent_id)
    summary = analysis.schedule_summary(runs, history)
    per_run = analysis.run_summary(runs, history)
    client.log_text(parent_id, summary.to_csv(index=False), "summary.csv")
    client.log_text(parent_id, per_run.to_csv(index=False), "runs.csv")
    if len(history):
        for name, figure in plots.comparison_figures(history).items():
            client.log_figure(parent_id, figure, f"figures/{name}")
    failed = per_run[per_run["status"] != "FINISHED"] if len(per_run) else per_run
    text = analysis.format_schedule_table(summary)
    if len(failed):
        text += "\nnot finished: " + ", ".join(f"{r.member}/seed={r.seed} ({_why(r)})" for r in failed.itertuples())
    return text


def _why(run) -> str:
    epoch = getattr(run, "diverged_epoch", None)
    return f"diverged at epoch {int(epoch)}" if epoch is not None and epoch == epoch else run.status


def _experiment_id(client: MlflowClient) -> str:
    """MLFLOW_EXPERIMENT_ID, else MLFLOW_EXPERIMENT_NAME (created if new), else the Default experiment."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        return tracking.experiment_id_for(name)
    return "0"


def parse_shard(text: str) -> tuple[int, int]:
    """``i/n`` -> (i, n): this machine trains children i, i + n, i + 2n, … of the plan; empty -> (0, 1)."""
    if not text.strip():
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise ConfigError(f"shard={text!r} is not allowed: expected i/n with 0 <= i < n, e.g. 0/2 and 1/2 on two machines.")
    return index, count


def sweep(experiment: str, seeds: int, workers: int, overrides: dict[str, str], shard: str = "") -> int:
    """Run (or continue) a sweep, or its ``shard`` (``i/n``); returns 0 when every child it ran FINISHED
    or diverged, else 1."""
    children = plan(experiment, seeds, overrides)
    if workers < 1:
        raise ConfigError(f"workers='{workers}' is not allowed: expected a whole number >= 1.")
    index, count = parse_shard(shard)
    planned, children = children, children[index::count]
    train.check_tracking_store()  # a server that does not answer, a store that cannot be opened: before any work
    for folder in sorted({child.checkpoint_dir for child in children}):
        train.check_checkpoint_dir(folder)
    client = MlflowClient()
    client.search_experiments(max_results=1)  # create or migrate the store once, before any fan-out
    key = sweep_key(experiment, seeds, overrides)
    current = os.environ.get("MLFLOW_RUN_ID")
    experiment_id = client.get_run(current).info.experiment_id if current else _experiment_id(client)
    parent_id = find_parent(client, experiment_id, key, exclude=current)
    if parent_id and current:
        client.set_tag(current, "sweep_resumed", parent_id)
        client.set_tag(current, "mlflow.runName", f"resume {experiment} sweep")
    if parent_id:
        tracking.set_status(client, parent_id, "RUNNING")
        _say(f"continuing sweep {experiment} (parent run {parent_id})")
    else:
        parent_id = current or client.create_run(experiment_id).info.run_id
        client.set_tag(parent_id, "mlflow.runName", f"sweep {experiment} x{seeds}")
        for name, value in {"sweep_role": "parent", "sweep_key": key, "sweep_experiment": experiment}.items():
            client.set_tag(parent_id, name, value)
        client.log_batch(parent_id, params=[mlflow.entities.Param(n, str(v)) for n, v in
                                            {"seeds": seeds, "members": ",".join(m.name for m in EXPERIMENTS[experiment]),
                                             **{f"override.{k}": v for k, v in overrides.items()}}.items()])
        _say(f"sweep {experiment}: {len(planned)} children, parent run {parent_id}")
    if count > 1:
        _say(f"shard {index}/{count}: {len(children)} of the {len(planned)} children on this machine")

    previous = existing_children(client, experiment_id, parent_id)
    to_run: list[tuple[Child, str | None]] = []
    statuses = []
    for child in children:
        runs = _current(previous.get(child.key, []))
        if any(run.info.status == "FINISHED" for run in runs):
            _say(f"skip   {child.key:<32} (FINISHED)")
            continue
        diverged = [run for run in runs if run.data.tags.get("diverged") == "true"]
        if diverged:  # it would diverge again: keep it as the result
            _say(f"skip   {child.key:<32} (diverged at epoch {diverged[0].data.tags.get('diverged_epoch')})")
            statuses.append("DIVERGED")
            continue
        resumable = [run for run in runs if checkpoint.exists(child.checkpoint_dir, run.info.run_id)]
        resume = resumable[-1] if resumable else None
        for run in runs:
            if run is resume:
                continue
            client.set_tag(run.info.run_id, "sweep_superseded", "true")
            if not RunStatus.is_terminated(RunStatus.from_string(run.info.status)):
                tracking.set_status(client, run.info.run_id, "FAILED")  # left RUNNING by a process that died
        to_run.append((child, resume.info.run_id if resume else None))

    with tempfile.TemporaryDirectory() as log_dir:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            statuses += list(pool.map(lambda item: run_child(client, experiment_id, parent_id, key, item[0], log_dir,
                                                             resume_run_id=item[1]), to_run))
    table = log_summary(client, parent_id)
    _say(table)
    all_finished = all(status in ("FINISHED", "DIVERGED") for status in statuses)
    if parent_id != current:
        outcome = _parent_outcome(client, experiment_id, parent_id, planned) if count > 1 else (
            "FINISHED" if all_finished else "FAILED")
        if outcome == "RUNNING":
            _say("other shards are still training children of this sweep: the parent stays RUNNING")
        else:
            tracking.set_status(client, parent_id, outcome)
    _say(f"\nparent run {parent_id}; open it with: mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}")
    return 0 if all_finished else 1


def _current(runs: list) -> list:
    """A child's runs that no rerun superseded."""
    return [run for run in runs if run.data.tags.get("sweep_superseded") != "true"]


def _parent_outcome(client: MlflowClient, experiment_id: str, parent_id: str, planned: list[Child]) -> str:
    """FINISHED when every planned child has a FINISHED or diverged run, RUNNING while another shard
    still trains one (or has not started it), else FAILED."""
    runs = existing_children(client, experiment_id, parent_id)
    outcome = "FINISHED"
    for child in planned:
        current = _current(runs.get(child.key, []))
        if any(run.info.status == "FINISHED" or run.data.tags.get("diverged") == "true" for run in current):
            continue
        if not current or any(run.info.status == "RUNNING" for run in current):
            return "RUNNING"
        outcome = "FAILED"
    return outcome


def make_parser() -> config_module.OneLineParser:
    parser = config_module.OneLineParser(prog="python -m growing_batch.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help=f"one of {', '.join(EXPERIMENTS)}")
    parser.add_argument("--seeds", default="1", help="seeds 0..seeds-1 per member (default 1)")
    parser.add_argument("--workers", default="1", help="children trained at once, each a process (default 1)")
    parser.add_argument("--shard", default="", help="i/n: train only children i, i+n, ... (one machine of n); "
                                                    "empty: all")
    for name in OVERRIDES:
        parser.add_argument(f"--{name}", default="", help="passed to every child (empty: the member's own)")
    return parser


def main(argv=None) -> int:
    try:
        arguments = make_parser().parse_args(argv)
        seeds = config_module.parse_whole_number("seeds", arguments.seeds)
        workers = config_module.parse_whole_number("workers", arguments.workers)
        overrides = {name: getattr(arguments, name) for name in OVERRIDES}
        return sweep(arguments.experiment, seeds, workers, overrides, arguments.shard)
    except train.StoreUnreachable as error:  # nothing can be recorded there
        return exit_with_error(str(error))
    except ConfigError as error:  # the run `mlflow run` created for the sweep, if any, ends FAILED
        return exit_with_error(str(error), run_id=os.environ.get("MLFLOW_RUN_ID"))


if __name__ == "__main__":
    sys.exit(main())
