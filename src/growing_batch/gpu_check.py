"""The GPU check: the paper's wide ResNet on the JAX engine, timed against Keras' own ``fit`` (``make gpu-check``).

    python -m growing_batch.gpu_check --output gpu-check.jsonl          # on the GPU machine: about 5-10 min
    python -m growing_batch.gpu_check --quick true                      # fewer examples per epoch, same shapes

No network and no data set needed: CIFAR-shaped synthetic images (random pixels, 10 classes). For
each preset (default ``paper-decay`` and ``paper-increase``: WRN-16-4, ghost batch norm of 128,
weight decay, crops and flips, momentum 0.9) and precision (default ``mixed_bfloat16`` and
``float32``), and for each batch size the preset's 200 epochs use, it trains
``epochs_per_batch_size`` epochs with the project's loop (:class:`growing_batch.loop.Trainer`, the
JAX engine) and as many with plain ``model.fit`` on the same device, and prints one JSON line per
measurement:

* ``"check": "train"``: ``device`` (JAX's device kind, e.g. ``NVIDIA H200``), ``batch_size``, the
  loop's and ``fit``'s examples/second (training passes of the last, steady epoch) and their ratio
  ``fit_ratio``, the XLA ``compilations`` JAX made during the loop's epochs at this batch size and
  their ``compile_seconds`` (JAX's own compile-time events: the train step's new padded shapes,
  ``new_padded_shapes``, the evaluator and small helpers; one trainer serves every batch size, as in
  a run), ``epoch_seconds`` (the steady epoch: training pass and test evaluation),
  ``peak_memory_bytes`` (the device's peak so far; null on a CPU, which does not report it);
* ``"check": "projection"``: the projected seconds of the preset's full 200 epochs on CIFAR-10
  (50,000 training and 10,000 test images): each epoch at its batch size takes the measured training
  seconds per example and evaluation seconds per test image, plus the compile seconds;
* ``"check": "bench"`` (with ``bench``): the JAX bench's ``fit_ratio`` per batch size and its
  compilation counts (``python -m growing_batch.bench --backend jax --quick true``).

``fit`` trains on the same images without the augmentation (Keras' ``fit`` has none on the device);
the loop augments, as the presets do. Batch sizes above the synthetic training set are measured at
its size (``measured_batch_size``). The lines go to the standard output and, with ``output``, to a
file, each as soon as it is measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

from growing_batch import config as config_module
from growing_batch.config import ConfigError, OneLineParser
from growing_batch.errors import exit_with_error

PAPER_TRAIN_SIZE = 50_000  # CIFAR-10's training set, all of it in the paper's presets (validation_size 0)
PAPER_TEST_SIZE = 10_000
FULL = dict(train_size=PAPER_TRAIN_SIZE, test_size=PAPER_TEST_SIZE)
QUICK = dict(train_size=10_000, test_size=2_000)


def batch_sizes_of(schedule, epochs: int) -> list[tuple[int, int, object]]:
    """(batch size, epochs at it, the first epoch's step) for each batch size the schedule uses, in order."""
    seen: dict[int, list] = {}
    for epoch in range(1, epochs + 1):
        step = schedule(epoch)
        entry = seen.setdefault(int(step.batch_size), [0, step])
        entry[0] += 1
    return [(size, count, step) for size, (count, step) in seen.items()]


class CompileTimer:
    """Counts and sums JAX's backend compile events (``/jax/core/compile/backend_compile_duration``)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count, self.seconds = 0, 0.0

    def __call__(self, event: str, duration: float, **_) -> None:
        if event == self.EVENT:
            self.count += 1
            self.seconds += duration

    def __enter__(self):
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self)


def peak_memory_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def epoch_clock():
    """A Keras callback recording each epoch's wall seconds (on_epoch_begin to on_epoch_end: training and
    evaluation) in ``seconds`` and its logs in ``logs`` (defined here: Keras is imported after the backend is set)."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds, self.logs = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)
            self.logs.append(dict(logs or {}))

    return EpochClock()


def build_model(config, splits, metrics=()):
    import keras

    from growing_batch import models

    keras.utils.set_random_seed(config.seed)
    model = models.build(config.model, splits.image_shape, 10, config.seed, config.weight_decay,
                         config.ghost_batch_size, standardization=models.standardization_for(config.model,
                                                                                             splits.train.images))
    optimizer = models.build_optimizer(config.optimizer, config.learning_rate, config.momentum, config.nesterov)
    return models.compile_for_training(model, optimizer, metrics)


def measure_preset(preset: str, precision: str, splits, epochs_per_batch_size: int, device: str, emit) -> None:
    """The train lines of one preset and precision, and its projection line."""
    import keras

    from growing_batch import data, distribute, loop, schedules

    config = config_module.from_args(["--preset", preset, "--precision", precision, "--backend", "jax"])
    schedule = schedules.build_schedule(config, PAPER_TRAIN_SIZE)
    keras.mixed_precision.set_global_policy(precision)
    try:
        loop_model = build_model(config, splits)
        fit_model = build_model(config, splits, metrics=["accuracy"])  # fit computes the accuracy the loop does
    finally:
        keras.mixed_precision.set_global_policy("float32")
    batches = data.EpochBatches(splits.train, config.seed, config.augment)
    evaluation = {"test": data.evaluation_batches(splits.test)}
    x, y = data.scale(splits.train.images), splits.train.labels
    validation = (data.scale(splits.test.images), splits.test.labels)
    train_size, test_size = len(splits.train), len(splits.test)
    projected, compile_seconds = 0.0, 0.0
    common = {"preset": preset, "precision": precision, "device": device,
              "device_count": distribute.replica_count(keras.distribution.distribution()), "model": config.model,
              "ghost_batch_size": config.ghost_batch_size, "train_size": train_size, "test_size": test_size}
    current = {}  # the step in force: one trainer (one train step) for every batch size, as in a real run
    trainer = loop.Trainer(loop_model, batches, lambda epoch: current["step"], evaluation=evaluation)
    for batch_size, epochs_at_size, step in batch_sizes_of(schedule, config.epochs):
        measured = min(batch_size, train_size)
        current["step"] = schedules.constant(1, learning_rate=step.learning_rate, batch_size=measured,
                                             momentum=step.momentum)
        shapes_before = set(trainer.step.compiled_shapes)
        loop_clock = epoch_clock()
        with CompileTimer() as compiles:
            history = trainer.fit(epochs=epochs_per_batch_size, callbacks=[loop_clock], verbose=0)
        fit_clock = epoch_clock()
        fit_model.optimizer.learning_rate = step.learning_rate
        fit_started = time.perf_counter()
        fit_model.fit(x, y, batch_size=measured, epochs=epochs_per_batch_size, validation_data=validation,
                      callbacks=[fit_clock], verbose=0, shuffle=True)
        fit_seconds = time.perf_counter() - fit_started
        last = loop_clock.logs[-1]
        train_seconds = last["epoch_seconds"]  # the training pass of the steady (last) epoch
        evaluation_seconds = max(loop_clock.seconds[-1] - train_seconds, 0.0)
        loop_rate = train_size / train_seconds
        # fit's last epoch: the clock includes its evaluation; its training pass alone is not exposed, so
        # the evaluation is taken to cost what the loop's did (the same model and test images).
        fit_train_seconds = max(fit_clock.seconds[-1] - evaluation_seconds, 1e-9)
        fit_rate = train_size / fit_train_seconds
        compile_seconds += compiles.seconds
        projected += epochs_at_size * (train_seconds * PAPER_TRAIN_SIZE / train_size
                                       + evaluation_seconds * PAPER_TEST_SIZE / test_size)
        emit({"check": "train", **common, "batch_size": batch_size, "measured_batch_size": measured,
              "epochs_at_batch_size": epochs_at_size, "loop_examples_per_second": round(loop_rate, 1),
              "fit_examples_per_second": round(fit_rate, 1), "fit_ratio": round(loop_rate / fit_rate, 3),
              "compilations": compiles.count, "compile_seconds": round(compiles.seconds, 2),
              "new_padded_shapes": sorted(trainer.step.compiled_shapes - shapes_before),
              "epoch_seconds": round(loop_clock.seconds[-1], 3), "first_epoch_seconds": round(loop_clock.seconds[0], 3),
              "fit_seconds_all_epochs": round(fit_seconds, 2), "train_loss": last.get("train_loss"),
              "diverged": history.diverged_epoch is not None, "peak_memory_bytes": peak_memory_bytes()})
    emit({"check": "projection", **common, "epochs": config.epochs, "projected_seconds": round(projected + compile_seconds, 1),
          "projected_minutes": round((projected + compile_seconds) / 60, 2), "compile_seconds": round(compile_seconds, 2),
          "basis": f"measured seconds per example at each batch size, scaled to {PAPER_TRAIN_SIZE:,} training and "
                   f"{PAPER_TEST_SIZE:,} test images per epoch, plus the compile seconds"})


def bench_lines(quick: bool, emit) -> None:
    """Run the JAX bench in a process of its own and emit its fit ratios and compilation counts."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "bench.json")
        environment = {**os.environ, "KERAS_BACKEND": "jax", "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"}
        result = subprocess.run([sys.executable, "-m", "growing_batch.bench", "--backend", "jax", "--quick",
                                 "true" if quick else "false", "--output", output], env=environment,
                                capture_output=True, text=True)
        if result.returncode != 0:
            emit({"check": "bench", "error": (result.stderr or result.stdout).strip().splitlines()[-1:]})
            return
        with open(output) as handle:
            results = json.load(handle)
    kept = ("backend", "devices", "fit_ratio", "loop_examples_per_second", "fit_examples_per_second",
            "loop_xla_compilations", "xla_compilations", "xla_compilation_bound", "train_step_traces", "targets",
            "bench_seconds")
    emit({"check": "bench", **{key: results[key] for key in kept if key in results}})


def parse(argv=None) -> dict:
    parser = OneLineParser(prog="python -m growing_batch.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="paper-decay,paper-increase",
                        help="comma-separated presets to time (default: paper-decay,paper-increase)")
    parser.add_argument("--precisions", default="mixed_bfloat16,float32",
                        help="comma-separated precisions (default: mixed_bfloat16,float32)")
    parser.add_argument("--quick", default="false", help="true: 10,000 training and 2,000 test images (the same shapes)")
    parser.add_argument("--train_size", type=int, default=0, help="synthetic training images (0: 50,000; quick: 10,000)")
    parser.add_argument("--test_size", type=int, default=0, help="synthetic test images (0: 10,000; quick: 2,000)")
    parser.add_argument("--image_size", type=int, default=32, help="image height and width (CIFAR: 32)")
    parser.add_argument("--epochs_per_batch_size", type=int, default=2,
                        help="epochs per batch size and trainer (the first compiles; the last is timed; >= 2)")
    parser.add_argument("--devices", default="auto", help="JAX devices: auto (every GPU, else one CPU device) or N")
    parser.add_argument("--bench", default="true", help="also run the JAX bench (quick) and print its ratios")
    parser.add_argument("--output", default="", help="also write the JSON lines to this file")
    arguments = vars(parser.parse_args(argv))
    for name in ("quick", "bench"):
        arguments[name] = config_module.parse_bool(name, arguments[name])
    from growing_batch.presets import PRESETS

    presets = [name.strip() for name in arguments["presets"].split(",") if name.strip()]
    for name in presets:
        if name not in PRESETS or not name.startswith("paper"):
            raise ConfigError(f"presets={name!r} is not allowed: expected paper presets, e.g. paper-decay,paper-increase.")
    arguments["presets"] = presets
    precisions = [name.strip() for name in arguments["precisions"].split(",") if name.strip()]
    for name in precisions:
        if name not in config_module.PRECISIONS:
            raise ConfigError(f"precisions={name!r} is not allowed: expected {', '.join(config_module.PRECISIONS)}.")
    arguments["precisions"] = precisions
    if arguments["epochs_per_batch_size"] < 2:
        raise ConfigError(f"epochs_per_batch_size={arguments['epochs_per_batch_size']!r} is not allowed: expected "
                          "2 or more (the first epoch compiles; the last is timed).")
    for name, value in (("train_size", arguments["train_size"]), ("test_size", arguments["test_size"])):
        if value < 0:
            raise ConfigError(f"{name}={value!r} is not allowed: expected 0 (the default) or a positive number.")
    sizes = QUICK if arguments["quick"] else FULL
    arguments["train_size"] = arguments["train_size"] or sizes["train_size"]
    arguments["test_size"] = arguments["test_size"] or sizes["test_size"]
    return arguments


def run(arguments: dict) -> list[dict]:
    """Every measurement line, printed (and written to ``output``) as it comes."""
    lines: list[dict] = []
    sink = open(arguments["output"], "w") if arguments["output"] else contextlib.nullcontext()
    with sink as handle:
        def emit(line: dict) -> None:
            lines.append(line)
            text = json.dumps(line)
            print(text, flush=True)
            if handle is not None:
                handle.write(text + "\n")
                handle.flush()

        if arguments["bench"]:
            bench_lines(arguments["quick"], emit)
        import jax

        from growing_batch import bench, distribute

        distribute.jax_distribution(arguments["devices"])  # before the data and the models are made
        device = jax.local_devices()[0].device_kind
        size = arguments["image_size"]
        splits = bench.synthetic_splits(arguments["train_size"], arguments["test_size"], (size, size, 3))
        for preset in arguments["presets"]:
            for precision in arguments["precisions"]:
                measure_preset(preset, precision, splits, arguments["epochs_per_batch_size"], device, emit)
    return lines


def main(argv=None) -> int:
    try:
        arguments = parse(argv)
        config_module.activate_backend(config_module.from_args(["--backend", "jax"]))  # KERAS_BACKEND, before Keras
    except ConfigError as error:
        return exit_with_error(str(error))
    run(arguments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
