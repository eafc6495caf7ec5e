"""The ``bench`` entry point: the schedule-driven loop against plain Keras ``fit``, side by side.

    mlflow run . --env-manager local -e bench -P output=bench.json -P quick=true [-P backend=jax]
    python -m growing_batch.bench --output bench.json [--quick true] [--backend jax]

``backend`` is the Keras backend both trainers run on, as the ``main`` entry point's ``backend``:
``tensorflow`` (the loop's TensorFlow step against ``fit`` on TensorFlow) or ``jax`` (the JAX engine,
``growing_batch.jax_engine``, against ``fit`` on JAX); not given: ``KERAS_BACKEND`` if set, else
tensorflow. On JAX every part runs on JAX (no TensorFlow op is timed); every train step is an XLA
program, one per padded batch size, counted as ``xla_compilations``.

In one process, on the same data (random CIFAR-shaped images, the reproduction's CNN), it measures
and prints:

1. ``fit_ratio``: examples/second of the loop (``growing_batch.loop.Trainer``) over plain ``model.fit`` at a fixed
   batch size, for B = 128, 1,024, 4,096 and the largest that fits (here: the whole training set),
   the median of several epochs, alternating between the two. One epoch is the same work for both: a
   training pass over the training set and an evaluation of the test set (``validation_data`` for
   ``fit``; ``fit`` evaluates at its training batch size, the loop at 4,096). The first epoch (tracing)
   is not timed.
2. ``train_step_traces``: how often the train step is traced during a ``batch-growth`` run with at
   least 30 distinct batch sizes (target: 1 on TensorFlow; on JAX one per compiled shape), and
   ``xla_compilations``, the padded batch sizes compiled (on JAX: at most four per doubling of B,
   ``xla_compilation_bound``; 0 on TensorFlow, which runs the loop without XLA). The fit_ratio part's
   loops report theirs too (``loop_xla_compilations``, per batch size: one each).
3. ``logging_fraction``: the training thread's seconds in MLflow logging per epoch over the epoch's
   seconds, during a tracked run against a temporary sqlite store (target: under 1 %).
4. ``epoch_seconds`` and ``achieved_flops`` per batch size, against ``peak_flops``: the machine's
   matrix-multiply peak, measured here for float32 and bfloat16; and ``loop_variants``: the loop's
   speed-up at B = 1,024 with XLA (``jit_compile``) and with ``mixed_bfloat16``. On JAX the loop is
   always XLA-compiled, so the XLA variant is the loop itself: its ``seconds`` are the loop's epoch at
   that batch size and there is no speed-up to report (``None``, with a ``note``).
5. ``noise_scale_cost``: the seconds of one gradient-noise-scale measurement (``measure_noise_scale``)
   against an epoch at B = 128 (target: under 5 %).
6. ``quick_comparison``: the main job's comparison (lr-decay against noise-matched on Fashion-MNIST,
   or synthetic images of its shape where it cannot be read) — wall-clock seconds per schedule and the seconds each took to reach
   the LR-decay run's final test accuracy.

``quick`` shrinks every part: a few minutes on a 2-core CPU (3-5 on TensorFlow, about 4-6 on JAX,
whose XLA compilations take seconds each). For tests, the environment variable
``GROWING_BATCH_BENCH_SETTINGS`` (a JSON object) overrides fields of the chosen settings (``QUICK`` or
``FULL``), e.g. ``{"train": 256, "batch_sizes": [32, 64]}``.
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
from growing_batch.data import on_jax
from growing_batch.errors import exit_with_error

FULL = dict(train=45_000, test=10_000, repetitions=5, batch_sizes=(128, 1024, 4096, 45_000), growth_epochs=32,
            logging_epochs=5, comparison_epochs=10, comparison_train=55_000, matmul=4096, variant_batch_size=1024,
            growth_train=4096, comparison_data="fashion_mnist")
QUICK = dict(train=8_192, test=2_048, repetitions=7, batch_sizes=(128, 1024, 4096, 8_192), growth_epochs=30,
             logging_epochs=3, comparison_epochs=4, comparison_train=8_192, matmul=2048, variant_batch_size=1024,
             growth_train=4096, comparison_data="fashion_mnist")
# Overrides of the settings' fields, as a JSON object (for tests: a bench of tiny sizes).
SETTINGS_VARIABLE = "GROWING_BATCH_BENCH_SETTINGS"


def settings_for(quick: bool) -> dict:
    """QUICK or FULL, with the fields of ``GROWING_BATCH_BENCH_SETTINGS`` (a JSON object) replaced;
    raises ConfigError (one line) on a value that is not a JSON object of known fields of the same type."""
    from growing_batch.config import ConfigError

    settings = dict(QUICK if quick else FULL)
    text = os.environ.get(SETTINGS_VARIABLE, "").strip()
    if not text:
        return settings
    expected = (f"a JSON object with some of the fields {', '.join(settings)}, each of its default's type "
                f"(batch_sizes: a list of whole numbers >= 1)")
    try:
        overrides = json.loads(text)
    except ValueError:
        overrides = None
    if not isinstance(overrides, dict):
        raise ConfigError(f"{SETTINGS_VARIABLE}={text[:200]!r} is not allowed: expected {expected}.")
    for name, value in overrides.items():
        default = settings.get(name)
        if name == "batch_sizes":
            good = (isinstance(value, list) and value
                    and all(isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in value))
            value = tuple(value) if good else value
        elif isinstance(default, str):
            good = name == "comparison_data" and value in ("fashion_mnist", "synthetic")
        else:
            good = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        if name not in settings or not good:
            raise ConfigError(f"{SETTINGS_VARIABLE}={text[:200]!r} is not allowed: expected {expected} "
                              f"(comparison_data: fashion_mnist or synthetic); {name}={value!r} is not.")
        settings[name] = value
    return settings


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
    """FLOP/s of a size × size matrix product, the best of ``repetitions``, on the backend Keras runs
    on: TensorFlow's eager kernel, or on JAX one jitted ``jnp.matmul`` (no TensorFlow op)."""
    if on_jax():
        return _matmul_peak_jax(size, dtype, repetitions)
    import tensorflow as tf

    a = tf.random.normal((size, size), dtype=tf.float32)
    b = tf.random.normal((size, size), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(b, dtype)
    def product(x, y):  # eager: one kernel call, whose dispatch is negligible next to size³ multiply-adds
        return tf.cast(tf.linalg.matmul(x, y)[0, 0], tf.float32)

    product(a, b)  # warm up
    return 2 * size**3 / _shortest_seconds(lambda: product(a, b).numpy(), repetitions)


def _shortest_seconds(run, repetitions: int) -> float:
    """The shortest of ``repetitions`` timed calls of ``run`` (which waits for its result)."""
    best = float("inf")
    for _ in range(repetitions):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def _matmul_peak_jax(size: int, dtype: str, repetitions: int) -> float:
    import jax
    import jax.numpy as jnp

    first, second = jax.random.split(jax.random.key(0))
    a = jax.random.normal(first, (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(second, (size, size), jnp.float32).astype(dtype)
    # The whole product is returned (a slice of it could let XLA compute only that slice).
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()  # compile and warm up
    return 2 * size**3 / _shortest_seconds(lambda: product(a, b).block_until_ready(), repetitions)


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
        self.epoch()  # trace (on JAX: compile) and warm up

    @property
    def compilations(self) -> int:
        """The loop's compiled train-step shapes (padded batch sizes; 0 on TensorFlow without XLA)."""
        return len(self.loop_trainer.step.compiled_shapes)

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


def time_side_by_side(splits, batch_size: int, repetitions: int) -> tuple[list[float], list[float], int]:
    """Epoch seconds of the loop (growing_batch.loop.Trainer) and of plain model.fit, alternating epoch by
    epoch, and the loop's XLA compilations (one on JAX: the padded batch size; 0 on TensorFlow).

    An epoch is the same work for both: a training pass and an evaluation of the test set
    (``validation_data`` for ``fit``, at its batch size; the loop evaluates at 4,096).
    """
    loop_timer = _EpochTimer(splits, batch_size, "loop")
    loop_times, fit_times = alternate(loop_timer, _EpochTimer(splits, batch_size, "fit"), repetitions)
    return loop_times, fit_times, loop_timer.compilations


def loop_variants(splits, batch_size: int, repetitions: int, loop_seconds: float | None = None) -> dict:
    """The loop's epoch seconds with XLA and with mixed_bfloat16, each alternating with plain float32.

    On JAX every train step is XLA-compiled: there is no loop without XLA to compare with, so the
    ``xla`` entry gives ``loop_seconds`` (the loop's epoch at ``batch_size``, measured against ``fit``)
    as its ``seconds`` and None for the rest; ``mixed_bfloat16`` is measured as on TensorFlow.
    """
    jax = on_jax()
    results = {}
    if jax:
        results["xla"] = {"batch_size": batch_size, "float32_seconds": None, "seconds": loop_seconds,
                          "speedup": None,
                          "note": "on jax every train step is XLA-compiled (jit_compile is implied): the loop itself "
                                  "is the XLA variant, with no loop without XLA to compare it with; seconds: the "
                                  "loop's epoch at this batch size in the fit_ratio part"}
    variants = [("mixed_bfloat16", {"precision": "mixed_bfloat16"})]
    if not jax:
        variants.insert(0, ("xla", {"jit_compile": True}))
    notes = {"xla": "XLA (jit_compile=true) against the loop without it, both float32",
             "mixed_bfloat16": f"mixed_bfloat16 against float32, both {'XLA (always on jax)' if jax else 'without XLA'}"}
    for name, options in variants:
        plain, variant = alternate(_EpochTimer(splits, batch_size, "loop"),
                                   _EpochTimer(splits, batch_size, "loop", **options), repetitions)
        results[name] = {"batch_size": batch_size, "float32_seconds": statistics.median(plain),
                         "seconds": statistics.median(variant),
                         "speedup": statistics.median(plain) / statistics.median(variant), "note": notes[name]}
    return {name: results[name] for name in ("xla", "mixed_bfloat16")}


def compilation_bound(smallest: int, largest: int) -> int:
    """The most padded batch sizes a run from B = ``smallest`` to ``largest`` can compile: the sizes of
    the bucket grid (``loop.bucket_size``: four per doubling of B) from ``smallest``'s to ``largest``'s."""
    from growing_batch import loop

    size, last, count = loop.bucket_size(smallest), loop.bucket_size(largest), 1
    while size < last:
        size, count = loop.bucket_size(size + 1), count + 1
    return count


def count_traces(epochs: int, train: int = 4096) -> dict:
    """Train-step traces during a batch-growth run whose batch size differs (nearly) every epoch, and
    the XLA compilations (padded batch sizes) it needed: on JAX one per bucket met, at most
    :func:`compilation_bound`; on TensorFlow 0 (no XLA) and one trace."""
    import functools

    from growing_batch import data, loop, schedules

    splits = synthetic_splits(train, 256, shape=(28, 28, 1))
    model = _model(splits)
    batches = data.EpochBatches(splits.train, seed=0)
    schedule = functools.partial(schedules.batch_growth, learning_rate=0.01, batch_size=16, batch_growth=1.15,
                                 max_batch_size=train)
    trainer = loop.Trainer(model, batches, schedule)
    sizes = trainer.fit(epochs=epochs, verbose=0).history["batch_size"]
    return {"train_step_traces": trainer.step.traces, "distinct_batch_sizes": len(set(sizes)),
            "xla_compilations": len(trainer.step.compiled_shapes), "batch_size_range": [min(sizes), max(sizes)],
            "xla_compilation_bound": compilation_bound(min(sizes), max(sizes))}


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
    if on_jax():  # the meter a JAX run uses: a jitted probe on the batches held by JAX
        from growing_batch import jax_engine

        meter = jax_engine.noise_scale_meter(timer.model, timer.batches)
    else:
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

    splits = None
    if settings.get("comparison_data", "fashion_mnist") == "fashion_mnist":
        try:  # the main job's data where it can be read, else synthetic images of its shape
            splits = data.load("fashion_mnist", validation_size=5000, max_examples=settings["comparison_train"])
        except data.DataError:
            pass
    if splits is None:
        splits = synthetic_splits(settings["comparison_train"], min(2048, settings["test"]), shape=(28, 28, 1), seed=1)
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


def run(quick: bool, settings: dict | None = None) -> dict:
    """Every part, on the backend Keras runs on (``KERAS_BACKEND``, set by :func:`main` before Keras
    is imported), with ``settings`` (default: QUICK or FULL)."""
    import importlib.metadata

    from growing_batch import distribute

    import keras

    backend = keras.backend.backend()
    if backend == "jax":  # no TensorFlow: a JAX process needs none (GPU images may not have it)
        import jax

        distribute.make_strategy("auto", "jax")  # as a JAX run: an installed TensorFlow keeps off the GPUs
        devices = [device.platform.upper() for device in jax.devices()]
    else:
        tf = distribute.import_tensorflow()  # with its start-up logging muted
        devices = [d.device_type for d in tf.config.list_physical_devices()]

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None
    settings = dict(settings or (QUICK if quick else FULL))
    results: dict = {"quick": quick, "backend": backend, "settings": settings, "keras": keras.__version__,
                     "tensorflow": version("tensorflow"), "jax": version("jax"), "devices": devices}
    results["peak_flops"] = {dtype: matmul_peak(settings["matmul"], dtype) for dtype in ("float32", "bfloat16")}
    splits = synthetic_splits(settings["train"], settings["test"])
    flops_per_example = 3 * forward_flops(_model(splits))  # forward + backward ≈ 3 × forward
    results["training_flops_per_example"] = flops_per_example
    fit_ratio, epoch_seconds, loop_rate, fit_rate, achieved, compilations = {}, {}, {}, {}, {}, {}
    for batch_size in settings["batch_sizes"]:
        loop_times, fit_times, compilations[batch_size] = time_side_by_side(splits, batch_size,
                                                                            settings["repetitions"])
        examples = settings["train"] + settings["test"]
        loop_rate[batch_size] = examples / statistics.median(loop_times)
        fit_rate[batch_size] = examples / statistics.median(fit_times)
        fit_ratio[batch_size] = loop_rate[batch_size] / fit_rate[batch_size]
        epoch_seconds[batch_size] = statistics.median(loop_times)
        achieved[batch_size] = flops_per_example * settings["train"] / epoch_seconds[batch_size]
        print(f"B={batch_size:>6}: loop {loop_rate[batch_size]:>9,.0f} ex/s, fit {fit_rate[batch_size]:>9,.0f} ex/s, "
              f"ratio {fit_ratio[batch_size]:.2f}", flush=True)
    results.update(fit_ratio=fit_ratio, loop_examples_per_second=loop_rate, fit_examples_per_second=fit_rate,
                   epoch_seconds=epoch_seconds, achieved_flops=achieved, loop_xla_compilations=compilations)
    variant_batch_size = settings["variant_batch_size"]
    results["loop_variants"] = loop_variants(splits, variant_batch_size, settings["repetitions"],
                                             loop_seconds=epoch_seconds.get(variant_batch_size))
    results.update(count_traces(settings["growth_epochs"], settings["growth_train"]))
    results.update(logging_fraction(splits, settings["logging_epochs"]))
    results["noise_scale_cost"] = noise_scale_cost(splits, settings["repetitions"],
                                                   batch_size=min(128, settings["train"]))
    results["quick_comparison"] = quick_comparison(settings)
    results["targets"] = targets(results)
    return results


def targets(results: dict) -> dict:
    """The bench's own targets, each with its measured value, whether it is ``met`` and a ``note``.

    The noise-scale measurement's cost is judged only in the full version: its probe is a fixed
    1,024 examples, so against the quick version's 8,192-example epoch it is a larger share than
    against a real epoch (45,000 examples), and ``met`` is None there.

    The train step: on TensorFlow one trace for every batch size (no XLA, so no compilation is
    judged); on JAX one trace per compiled shape, and the compilations bounded by the bucket grid
    (about four per doubling of B) and fewer than the distinct batch sizes (never one per epoch).
    """
    noise = results["noise_scale_cost"]["fraction"]
    traces, compilations = results["train_step_traces"], results["xla_compilations"]
    bound, distinct = results["xla_compilation_bound"], results["distinct_batch_sizes"]
    jax = results["backend"] == "jax"
    return {
        "train_step_traces": {"value": traces, "target": "== xla_compilations" if jax else "== 1",
                              "met": traces == compilations if jax else traces == 1,
                              "note": "one trace per compiled batch shape" if jax
                              else "one trace for every batch size (the batch dimension is unknown)"},
        "xla_compilations": {"value": compilations, "target": f"<= {bound} and < {distinct}",
                             "met": compilations <= bound and compilations < distinct if jax else None,
                             "note": f"at most the bucket sizes from B={results['batch_size_range'][0]} to "
                                     f"{results['batch_size_range'][1]} (four per doubling), fewer than the "
                                     "distinct batch sizes" if jax
                                     else "not judged: the TensorFlow loop runs without XLA here"},
        "logging_fraction": {"value": results["logging_fraction"], "target": "< 0.01",
                             "met": results["logging_fraction"] < 0.01, "note": "MLflow logging's share of an epoch"},
        "noise_scale_cost": {"value": noise, "target": "< 0.05",
                             "met": None if results["quick"] else noise < 0.05,
                             "note": "not judged in the quick version (its 1,024-example probe against a short "
                                     "epoch)" if results["quick"] else "against a 45,000-example epoch"},
    }


def _seconds(value) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def format_results(results: dict) -> str:
    peak = results["peak_flops"]
    backend = results.get("backend", "tensorflow")
    versions = f"Keras {results.get('keras', '?')}, " + (f"jax {results.get('jax')}" if backend == "jax"
                                                          else f"TensorFlow {results.get('tensorflow')}")
    engine = "the JAX engine against Keras' fit on JAX" if backend == "jax" else "the loop against Keras' fit"
    lines = [
        f"backend {backend} ({versions}; {', '.join(results.get('devices', []))}): {engine}",
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
    if backend == "jax":
        compiled = ", ".join(f"B={size}: {count}" for size, count in results["loop_xla_compilations"].items())
        lines.append(f"the loop's XLA compilations at each batch size: {compiled}")
    for name, variant in results["loop_variants"].items():
        if variant["speedup"] is None:
            lines.append(f"loop at B={variant['batch_size']} with {name}: {_seconds(variant['seconds'])} per epoch; "
                         f"no speed-up: {variant['note']}")
        else:
            lines.append(f"loop at B={variant['batch_size']} with {name}: {variant['seconds']:.2f} s per epoch against "
                         f"{variant['float32_seconds']:.2f} s ({variant['note']}): speed-up {variant['speedup']:.2f}")
    lines.append(f"train-step traces over {results['distinct_batch_sizes']} distinct batch sizes "
                 f"(B={results['batch_size_range'][0]}..{results['batch_size_range'][1]}): {results['train_step_traces']}, "
                 f"XLA compilations: {results['xla_compilations']} (bound {results['xla_compilation_bound']})")
    lines.append(f"MLflow logging: {results['logging_seconds_per_epoch'] * 1000:.1f} ms per epoch, "
                 f"{100 * results['logging_fraction']:.2f} % of the epoch")
    cost = results["noise_scale_cost"]
    lines.append(f"gradient noise scale measurement ({cost['probe_examples']:,} examples): {cost['probe_seconds']:.3f} s "
                 f"per epoch, {100 * cost['fraction']:.1f} % of an epoch at B={cost['batch_size']}")
    for name, target in results.get("targets", {}).items():
        verdict = {True: "met", False: "NOT met", None: target.get("note", "not judged")}[target["met"]]
        lines.append(f"target {name} {target['target']}: {target['value']:.4g}, {verdict}")
    comparison = results["quick_comparison"]
    for name in ("lr-decay", "noise-matched"):
        result = comparison[name]
        reached = result["seconds_to_lr_decay_final_accuracy"]
        lines.append(f"quick comparison ({comparison['data']}), {name}: {result['wall_seconds']:.1f} s, final test accuracy "
                     f"{result['final_test_accuracy']:.4f}, lr-decay's final accuracy after "
                     f"{'%.1f s' % reached if reached is not None else 'never'}")
    return "\n".join(lines)


def make_parser() -> OneLineParser:
    """The command line: one flag per parameter of MLproject's ``bench`` entry point."""
    parser = OneLineParser(prog="python -m growing_batch.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="bench.json", help="where to write the JSON results")
    parser.add_argument("--quick", default="false", help="true: smaller sizes (minutes on a 2-core CPU)")
    parser.add_argument("--backend", default="",
                        help="the Keras backend of both trainers: tensorflow or jax; empty: KERAS_BACKEND if set, "
                             "else tensorflow")
    return parser


def main(argv=None) -> int:
    parser = make_parser()
    try:
        arguments = parser.parse_args(argv)
        quick = config_module.parse_bool("quick", arguments.quick)
        settings = settings_for(quick)
        activate_backend(arguments.backend)
        _check_writable(arguments.output)
    except ValueError as error:
        return exit_with_error(str(error), run_id=os.environ.get("MLFLOW_RUN_ID"))
    started = time.perf_counter()
    results = run(quick, settings)
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


def activate_backend(text: str) -> str:
    """Resolve ``backend`` as the ``main`` entry point does (empty: ``KERAS_BACKEND`` if set, else
    tensorflow) and set ``KERAS_BACKEND`` before anything imports Keras; returns the backend.

    Raises ConfigError (one line): a backend not allowed, JAX asked for and not installed (with the
    command that installs it), or Keras already imported in this process with the other backend.
    """
    config = config_module.from_strings({"backend": text})
    config_module.activate_backend(config)
    return config.backend


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
