"""The ``main`` entry point: one tracked, schedule-driven training run.

    python -m growing_batch.train --schedule noise-matched --dataset fashion_mnist --epochs 10
    mlflow run . --env-manager local -P schedule=noise-matched -P epochs=10

The order of work: parse and validate the config (no TensorFlow yet) -> load and split the data,
check the config against it -> start (or continue) the MLflow run -> train with the callback-driven
loop, logging every epoch -> log history, figures and the model. Bad input stops it before any
training with one line ``error: <parameter>=<value> is not allowed: expected ...`` and exit
status 2, and the run (if ``mlflow run`` created one) ends FAILED with that line as its ``error``
tag.
"""

from __future__ import annotations

import sys
from typing import Sequence

from growing_batch import config as config_module
from growing_batch.config import Config, ConfigError
from growing_batch.errors import exit_with_error

def main(argv: Sequence[str] | None = None) -> int:
    try:
        given = config_module.command_line_values(argv)
        config = config_module.from_strings(given)
    except ConfigError as error:
        return exit_with_error(str(error))
    from growing_batch.data import DataError

    try:
        return train(config, given=given)
    except (ConfigError, DataError) as error:
        return exit_with_error(str(error))


def train(config: Config, extra_callbacks: Sequence = (), verbose: int = 1, given: dict | None = None) -> int:
    """Run one configuration end to end; returns 0. Raises ConfigError/DataError on bad input.

    ``given``: the command line's text per field, logged as the plain-name params (default: none).
    """
    from growing_batch import data, schedules

    splits = data.load(
        config.dataset, config.data_dir, config.validation_size, config.seed, config.max_examples
    )
    train_size = len(splits.train)
    config_module.validate_against_data(config, train_size)
    max_batch_size = schedules.resolve_max_batch_size(config.max_batch_size, train_size)
    schedule = schedules.build_schedule(config, train_size)

    import keras
    import mlflow

    from growing_batch import loop, models, tracking

    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.precision)
    model = models.build(
        config.model, splits.image_shape, splits.num_classes, config.seed, config.weight_decay, config.ghost_batch_size
    )
    optimizer = models.build_optimizer(
        config.optimizer, config.learning_rate, config.momentum, config.nesterov
    )
    models.compile_for_training(model, optimizer)
    batches = data.EpochBatches(splits.train, config.seed, config.augment)
    evaluation = {}
    if len(splits.validation):
        evaluation["val"] = data.evaluation_batches(splits.validation)
    evaluation["test"] = data.evaluation_batches(splits.test)

    with tracking.start_run(config, given) as active:
        run_id = active.info.run_id
        tracking.log_data(splits, max_batch_size)
        tracking.log_resolved_config(
            config,
            {
                "train_examples": train_size,
                "validation_examples": len(splits.validation),
                "test_examples": len(splits.test),
                "resolved_max_batch_size": max_batch_size,
                "data_source": splits.source,
                "parameters": model.count_params(),
                "epochs_counted_from": 1,
            },
        )
        print(
            f"run {run_id} ({tracking.run_name(config)}): {config.dataset} N={train_size}, "
            f"{model.count_params():,} parameters, data from {splits.source}",
            flush=True,
        )
        history = loop.fit(
            model,
            batches,
            loop.ScheduleCallback(schedule, batches),
            epochs=config.epochs,
            evaluation=evaluation,
            callbacks=[*extra_callbacks, tracking.TrackingCallback(run_id, tracking.run_name(config))],
            verbose=verbose,
            max_device_batch_size=config.max_device_batch_size,
            jit_compile=config.jit_compile,
        )
        step = model.train_step_function
        mlflow.log_metrics({"train_step_traces": step.traces, "xla_compilations": len(step.compiled_shapes)})
        tracking.log_model(model, data.scale(splits.train.images[:8]))
        last = {name: values[-1] for name, values in history.history.items()}
        print(
            f"run {run_id} done: test_accuracy {last['test_accuracy']:.4f} after "
            f"{int(last['updates']):,} updates; tracking store {mlflow.get_tracking_uri()}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
