"""The ``bench`` entry point: the schedule-driven loop against plain Keras ``fit``, side by side.

    mlflow run . --env-manager local -e bench -P output=bench.json -P quick=true
    python -m growing_batch.bench --output bench.json [--quick true]

In one process, on the same data (random CIFAR-shaped images, the reproduction's CNN), it measures
and prints:

1. ``fit_ratio``: examples/second of the loop (``growing_batch.loop.Trainer``) over plain ``model.fit`` at a fixed
   batch size, for B = 128, 1,024, 4,096 and the largest that fits (here: the whole training set),
   the median of several epochs, alternating between the two. One epoch is the same work for both: a
   training pass over the training set and an evaluation of the test set (``validation_data`` for
   ``fit``; ``fit`` evaluates at its training batch size, the loop at 4,096). The first epoch (tracing)
   is not timed.
2. ``train_step_traces``: how often the train step is traced during a ``batch-growth`` run with at
   least 30 distinct batch sizes (target: 1).
3. ``logging_fraction``: the training thread's seconds in MLflow logging per epoch over the epoch's
   seconds, during a tracked run against a temporary sqlite store (target: under 1 %).
4. ``epoch_seconds`` and ``achieved_flops`` per batch size, against ``peak_flops``: the machine's
   matrix-multiply peak, measured here for float32 and bfloat16; and ``loop_variants``: the loop's
   speed-up at B = 1,024 with XLA (``jit_compile``) and with ``mixed_bfloat16``.
5. ``noise_scale_cost``: the seconds of one gradient-noise-scale measurement (``measure_noise_scale``)
   against an epoch at B = 128 (target: under 5 %).
6. ``quick_comparison``: the main job's comparison (lr-decay against noise-matched on Fashion-MNIST,
   or synthetic images of its shape where it cannot be read) — wall-clock seconds per schedule and the seconds each took to reach
   the LR-decay run's final test accuracy.

``quick`` shrinks every part to finish in under two minutes on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from growing_batch import config as config_module
from growing_batch.config import OneLineParser
from growing_batch.errors import exit_with_error

FULL = dict(train=45_000, test=10_000, repetitions=5, batch_sizes=(128, 1024, 4096, 45_000), growth_epochs=32,
            logging_epochs=5, comparison_epochs=10, comparison_train=55_000, matmul=4096)
QUICK = dict(train=8_192, test=2_048, repetitions=7, batch_sizes=(128, 1024, 4096, 8_192), growth_epochs=30,
             logging_epochs=3, comparison_epochs=4, comparison_train=8_192, matmul=2048)


def forward_flops(model) -> int:
    """Multiply-adds × 2 of one example's forward pass through the convolutions and dense layers."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            height, width, channels = layer.output.shape[1:]
            kernel = layer.kernel.shape
            total += 2 * height * width * channels * kernel[0] * kernel[1] * kernel[2]
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return int(total)


def matmul_peak(size: int, dtype: str, repetitions: int = 5) -> float:
    """FLOP/s of a size × size matrix product, the best of ``repetitions``."""
    import tensorflow as tf

    a = tf.random.normal((size, size), dtype=tf.float32)
    b = tf.random.normal((size, size), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(b, dtype)
    def product(x, y):  # eager: one kernel call, whose dispatch is negligible next to size³ multiply-adds
        return tf.cast(tf.linalg.matmul(x, y)[0, 0], tf.float32)

    product(a, b)  # warm up
    best = float("inf")
    for _ in range(repetitions):
        started = time.perf_counter()
        product(a, b).numpy()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def synthetic_splits(train: int, test: int, shape=(32, 32, 3), seed: int = 0):
    from growing_batch.data import DataSplits, Split

    rng = np.random.default_rng(seed)

    def split(count):
        labels = rng.integers(0, 10, count).astype(np.int32)
        images = rng.integers(0, 256, (count, *shape)).astype(np.uint8)
        images[np.arange(count), labels % shape[0]] //= 4  # a little signal: a darker row per class
        return Split(images, labels)

    return DataSplits("synthetic", "numpy", split(train), Split(np.zeros((0, *shape), np.uint8), np.zeros(0, np.int32)),
                      split(test))


def _model(splits, seed=0, learning_rate=0.01, metrics=()):
    import keras

    from growing_batch import models

    keras.utils.set_random_seed(seed)
    model = models.build("small-cnn", splits.image_shape, 10, seed)
    return models.compile_for_training(model, models.build_optimizer("sgd", learning_rate), metrics)


class _EpochTimer:
    """Seconds of one epoch of either trainer, on its own model, the first call not timed."""

    def __init__(self, splits, batch_size: int, trainer: str, jit_compile: bool = False, precision: str = "float32"):
        import functools

        import keras

        from growing_batch import data, loop, schedules

        self.trainer = trainer
        self.jit_compile = jit_compile
        keras.mixed_precision.set_global_policy(precision)
        try:
            # Keras' fit computes the accuracy the loop computes (as a compiled metric): the same work
            self.model = _model(splits, metrics=["accuracy"] if trainer == "fit" else ())
        finally:
            keras.mixed_precision.set_global_policy("float32")
        if trainer == "loop":
            self.batches = data.EpochBatches(splits.train, seed=0)
            schedule = functools.partial(schedules.constant, learning_rate=0.01, batch_size=batch_size)
            self.loop_trainer = loop.Trainer(self.model, self.batches, schedule, jit_compile=jit_compile,
                                             evaluation={"test": data.evaluation_batches(splits.test)})
        else:
            self.x, self.y = data.scale(splits.train.images), splits.train.labels
            self.validation = (data.scale(splits.test.images), splits.test.labels)
        self.batch_size = batch_size
        self.epoch()  # trace and warm up

    def epoch(self) -> float:
        """One epoch, timed from on_epoch_begin to on_epoch_end (each call's set-up is not counted)."""
        import keras

        seconds = []

        class Timer(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                seconds.append(time.perf_counter() - self.started)

        if self.trainer == "loop":
            self.loop_trainer.fit(epochs=1, callbacks=[Timer()], verbose=0)
        else:
            self.model.fit(self.x, self.y, batch_size=self.batch_size, epochs=1, validation_data=self.validation,
                           callbacks=[Timer()], verbose=0, shuffle=True)
        return seconds[0]


def alternate(first: _EpochTimer, second: _EpochTimer, repetitions: int) -> tuple[list[float], list[float]]:
    """Epoch seconds of two trainers, alternating epoch by epoch, so that both meet the same
    background load of a shared machine."""
    first_times, second_times = [], []
    for _ in range(repetitions):
        first_times.append(first.epoch())
        second_times.append(second.epoch())
    return first_times, second_times


def time_side_by_side(splits, batch_size: int, repetitions: int) -> tuple[list[float], list[float]]:
    """Epoch seconds of the loop (growing_batch.loop.Trainer) and of plain model.fit, alternating epoch by epoch.

    An epoch is the same work for both: a training pass and an evaluation of the test set
    (``validation_data`` for ``fit``, at its batch size; the loop evaluates at 4,096).
    """
    return alternate(_EpochTimer(splits, batch_size, "loop"), _EpochTimer(splits, batch_size, "fit"), repetitions)


def loop_variants(splits, batch_size: int, repetitions: int) -> dict:
    """The loop's epoch seconds with XLA and with mixed_bfloat16, each alternating with plain float32."""
    results = {}
    for name, options in (("xla", {"jit_compile": True}), ("mixed_bfloat16", {"precision": "mixed_bfloat16"})):
        plain, variant = alternate(_EpochTimer(splits, batch_size, "loop"),
                                   _EpochTimer(splits, batch_size, "loop", **options), repetitions)
        results[name] = {"batch_size": batch_size, "float32_seconds": statistics.median(plain),
                         "seconds": statistics.median(variant),
                         "speedup": statistics.median(plain) / statistics.median(variant)}
    return results


def count_traces(epochs: int) -> dict:
    """Train-step traces during a batch-growth run whose batch size differs every epoch."""
    import functools

    from growing_batch import data, loop, schedules

    splits = synthetic_splits(4096, 256, shape=(28, 28, 1))
    model = _model(splits)
    batches = data.EpochBatches(splits.train, seed=0)
    schedule = functools.partial(schedules.batch_growth, learning_rate=0.01, batch_size=16, batch_growth=1.15,
                                 max_batch_size=4096)
    trainer = loop.Trainer(model, batches, schedule)
    sizes = trainer.fit(epochs=epochs, verbose=0).history["batch_size"]
    return {"train_step_traces": trainer.step.traces, "distinct_batch_sizes": len(set(sizes))}


@contextlib.contextmanager
def _outside_the_run():
    """Hide the run of ``mlflow run`` (``MLFLOW_RUN_ID``, ``MLFLOW_EXPERIMENT_ID``) while a block starts
    its own run in another store (``mlflow.start_run`` would otherwise look for that run there), and
    give the tracking URI back afterwards (``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI``)."""
    import mlflow

    names = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_TRACKING_URI")
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    uri = saved.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    try:
        yield
    finally:
        mlflow.set_tracking_uri(uri)
        for name in names:
            os.environ.pop(name, None)
        os.environ.update(saved)


def logging_fraction(splits, epochs: int) -> dict:
    """The tracking callback's share of the epoch time, against a temporary sqlite store."""
    import functools

    import mlflow

    from growing_batch import data, loop, schedules, tracking

    with tempfile.TemporaryDirectory() as folder, _outside_the_run():
        mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
        experiment = mlflow.create_experiment("bench", artifact_location=os.path.join(folder, "artifacts"))
        with mlflow.start_run(experiment_id=experiment) as run:
            model = _model(splits)
            batches = data.EpochBatches(splits.train, seed=0)
            schedule = functools.partial(schedules.lr_decay, learning_rate=0.01, batch_size=128, lr_decay=0.9)
            callback = tracking.TrackingCallback(run.info.run_id)
            trainer = loop.Trainer(model, batches, schedule, evaluation={"test": data.evaluation_batches(splits.test)})
            history = trainer.fit(epochs=epochs, callbacks=[callback], verbose=0)
            callback.wait()
    epoch_seconds = sum(history.history["epoch_seconds"])
    return {"logging_seconds_per_epoch": callback.logging_seconds / epochs,
            "logging_fraction": callback.logging_seconds / epoch_seconds}


def noise_scale_cost(splits, repetitions: int, batch_size: int = 128) -> dict:
    """Seconds of one gradient-noise-scale measurement against an epoch (training pass and test
    evaluation) of the loop at ``batch_size``: the cost of ``measure_noise_scale``, medians."""
    from growing_batch import noise

    timer = _EpochTimer(splits, batch_size, "loop")
    meter = noise.NoiseScaleMeter(timer.model, timer.batches)
    meter.measure(0)  # trace
    epochs, probes = [], []
    for repetition in range(repetitions):
        epochs.append(timer.epoch())
        started = time.perf_counter()
        meter.measure(repetition + 1)
        probes.append(time.perf_counter() - started)
    epoch, probe = statistics.median(epochs), statistics.median(probes)
    return {"batch_size": batch_size, "probe_examples": meter.examples, "probe_seconds": probe,
            "epoch_seconds": epoch, "fraction": probe / epoch}


def quick_comparison(settings: dict) -> dict:
    """lr-decay against noise-matched (the main job), wall-clock and time to lr-decay's final accuracy."""
    import functools

    import keras

    from growing_batch import data, loop, schedules

    try:  # the main job's data where it can be read, else synthetic images of its shape
        splits = data.load("fashion_mnist", validation_size=5000, max_examples=settings["comparison_train"])
    except data.DataError:
        splits = synthetic_splits(settings["comparison_train"], 2048, shape=(28, 28, 1), seed=1)
    results: dict = {"data": splits.name}
    n = len(splits.train)
    for name, function in (("lr-decay", schedules.lr_decay), ("noise-matched", schedules.noise_matched)):
        arguments = dict(learning_rate=0.1, batch_size=128, lr_decay=0.9)
        if name == "noise-matched":
            arguments["max_batch_size"] = schedules.default_max_batch_size(n)
        schedule = functools.partial(function, **arguments)
        model = _model(splits, learning_rate=0.1)
        batches = data.EpochBatches(splits.train, seed=0)
        started = time.perf_counter()
        stamps = []

        class Stamp(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                stamps.append((time.perf_counter() - started, logs["test_accuracy"]))

        trainer = loop.Trainer(model, batches, schedule, evaluation={"test": data.evaluation_batches(splits.test)})
        trainer.fit(epochs=settings["comparison_epochs"], callbacks=[Stamp()], verbose=0)
        results[name] = {"wall_seconds": stamps[-1][0], "final_test_accuracy": stamps[-1][1], "stamps": stamps}
    target = results["lr-decay"]["final_test_accuracy"]
    for result in (results["lr-decay"], results["noise-matched"]):
        reached = [seconds for seconds, accuracy in result["stamps"] if accuracy >= target]
        result["seconds_to_lr_decay_final_accuracy"] = reached[0] if reached else None
        del result["stamps"]
    return results


def run(quick: bool) -> dict:
    from growing_batch import distribute

    tf = distribute.import_tensorflow()

    settings = QUICK if quick else FULL
    results: dict = {"quick": quick, "settings": settings, "tensorflow": tf.__version__,
                     "devices": [d.device_type for d in tf.config.list_physical_devices()]}
    results["peak_flops"] = {dtype: matmul_peak(settings["matmul"], dtype) for dtype in ("float32", "bfloat16")}
    splits = synthetic_splits(settings["train"], settings["test"])
    flops_per_example = 3 * forward_flops(_model(splits))  # forward + backward ≈ 3 × forward
    results["training_flops_per_example"] = flops_per_example
    fit_ratio, epoch_seconds, loop_rate, fit_rate, achieved = {}, {}, {}, {}, {}
    for batch_size in settings["batch_sizes"]:
        loop_times, fit_times = time_side_by_side(splits, batch_size, settings["repetitions"])
        examples = settings["train"] + settings["test"]
        loop_rate[batch_size] = examples / statistics.median(loop_times)
        fit_rate[batch_size] = examples / statistics.median(fit_times)
        fit_ratio[batch_size] = loop_rate[batch_size] / fit_rate[batch_size]
        epoch_seconds[batch_size] = statistics.median(loop_times)
        achieved[batch_size] = flops_per_example * settings["train"] / epoch_seconds[batch_size]
        print(f"B={batch_size:>6}: loop {loop_rate[batch_size]:>9,.0f} ex/s, fit {fit_rate[batch_size]:>9,.0f} ex/s, "
              f"ratio {fit_ratio[batch_size]:.2f}", flush=True)
    results.update(fit_ratio=fit_ratio, loop_examples_per_second=loop_rate, fit_examples_per_second=fit_rate,
                   epoch_seconds=epoch_seconds, achieved_flops=achieved)
    results["loop_variants"] = loop_variants(splits, 1024, settings["repetitions"])
    results.update(count_traces(settings["growth_epochs"]))
    results.update(logging_fraction(splits, settings["logging_epochs"]))
    results["noise_scale_cost"] = noise_scale_cost(splits, settings["repetitions"])
    results["quick_comparison"] = quick_comparison(settings)
    results["targets"] = targets(results)
    return results


def targets(results: dict) -> dict:
    """The bench's own targets, each with its measured value and whether it is ``met``.

    The noise-scale measurement's cost is judged only in the full version: its probe is a fixed
    1,024 examples, so against the quick version's 8,192-example epoch it is a larger share than
    against a real epoch (45,000 examples), and ``met`` is None there.
    """
    noise = results["noise_scale_cost"]["fraction"]
    return {
        "train_step_traces": {"value": results["train_step_traces"], "target": "== 1",
                              "met": results["train_step_traces"] == 1},
        "logging_fraction": {"value": results["logging_fraction"], "target": "< 0.01",
                             "met": results["logging_fraction"] < 0.01},
        "noise_scale_cost": {"value": noise, "target": "< 0.05",
                             "met": None if results["quick"] else noise < 0.05},
    }


def format_results(results: dict) -> str:
    peak = results["peak_flops"]
    lines = [
        f"matrix-multiply peak: float32 {peak['float32'] / 1e9:,.1f} GFLOP/s, bfloat16 {peak['bfloat16'] / 1e9:,.1f} GFLOP/s",
        f"{'batch':>7} {'loop ex/s':>10} {'fit ex/s':>10} {'ratio':>6} {'epoch s':>8} {'GFLOP/s':>8} {'% of fp32 peak':>14}",
    ]
    for batch_size, ratio in results["fit_ratio"].items():
        achieved = results["achieved_flops"][batch_size]
        lines.append(
            f"{batch_size:>7} {results['loop_examples_per_second'][batch_size]:>10,.0f} "
            f"{results['fit_examples_per_second'][batch_size]:>10,.0f} {ratio:>6.2f} "
            f"{results['epoch_seconds'][batch_size]:>8.2f} {achieved / 1e9:>8.1f} {100 * achieved / peak['float32']:>13.1f}%"
        )
    for name, variant in results["loop_variants"].items():
        lines.append(f"loop at B={variant['batch_size']} with {name}: {variant['seconds']:.2f} s per epoch against "
                     f"{variant['float32_seconds']:.2f} s in float32 without XLA: speed-up {variant['speedup']:.2f}")
    lines.append(f"train-step traces over {results['distinct_batch_sizes']} distinct batch sizes: {results['train_step_traces']}")
    lines.append(f"MLflow logging: {results['logging_seconds_per_epoch'] * 1000:.1f} ms per epoch, "
                 f"{100 * results['logging_fraction']:.2f} % of the epoch")
    cost = results["noise_scale_cost"]
    lines.append(f"gradient noise scale measurement ({cost['probe_examples']:,} examples): {cost['probe_seconds']:.3f} s "
                 f"per epoch, {100 * cost['fraction']:.1f} % of an epoch at B={cost['batch_size']}")
    for name, target in results.get("targets", {}).items():
        verdict = {True: "met", False: "NOT met", None: "not judged in the quick version"}[target["met"]]
        lines.append(f"target {name} {target['target']}: {target['value']:.4g}, {verdict}")
    comparison = results["quick_comparison"]
    for name in ("lr-decay", "noise-matched"):
        result = comparison[name]
        reached = result["seconds_to_lr_decay_final_accuracy"]
        lines.append(f"quick comparison ({comparison['data']}), {name}: {result['wall_seconds']:.1f} s, final test accuracy "
                     f"{result['final_test_accuracy']:.4f}, lr-decay's final accuracy after "
                     f"{'%.1f s' % reached if reached is not None else 'never'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m growing_batch.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="bench.json", help="where to write the JSON results")
    parser.add_argument("--quick", default="false", help="true: under two minutes on a 2-core CPU")
    try:
        arguments = parser.parse_args(argv)
        quick = config_module.parse_bool("quick", arguments.quick)
        _check_writable(arguments.output)
    except ValueError as error:
        return exit_with_error(str(error), run_id=os.environ.get("MLFLOW_RUN_ID"))
    started = time.perf_counter()
    results = run(quick)
    results["bench_seconds"] = time.perf_counter() - started
    print(format_results(results))
    with open(arguments.output, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"wrote {arguments.output} ({results['bench_seconds']:.0f} s)")
    try:
        import mlflow

        if os.environ.get("MLFLOW_RUN_ID"):
            mlflow.log_artifact(arguments.output)
    except Exception as error:  # the file is written; the artifact is a convenience
        print(f"warning: could not log {arguments.output} to MLflow: {error}", file=sys.stderr)
    return 0


def _check_writable(output: str) -> None:
    """Refuse an ``output`` that cannot be written, before minutes of benchmarking (nothing is left behind)."""
    from growing_batch.config import ConfigError

    existed = os.path.exists(output)
    try:
        if os.path.isdir(output):
            raise IsADirectoryError("it is a folder")
        with open(output, "a"):
            pass
        if not existed:
            os.remove(output)
    except OSError as error:
        raise ConfigError(f"output={output!r} is not allowed: expected a file path that can be written "
                          f"({getattr(error, 'strerror', None) or error}).") from None


if __name__ == "__main__":
    sys.exit(main())
