"""The run configuration: one frozen dataclass, its validation and its command line.

One name per concept: each field of :class:`Config` is, under the same name, an MLproject
parameter of the ``main`` entry point, a command-line flag (``--learning_rate 0.1``) and an MLflow
param. Everything here is checked before any data is loaded or any training starts; checks that
need the data (a batch larger than the training set, say) live in :func:`validate_against_data`.

This module imports no TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Any, Callable, Sequence

from growing_batch.presets import PRESETS
from growing_batch.presets import overrides as preset_overrides
from growing_batch.schedules import SCHEDULES, resolve_max_batch_size

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100")
MODELS = ("small-cnn", "wrn-16-4")
BATCH_NORM_MODELS = ("wrn-16-4",)
OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("float32", "mixed_bfloat16")
BACKENDS = ("tensorflow", "jax")
# The JAX release the project pins (pyproject.toml, conda.yaml, constraints.txt), for the install hint.
JAX_INSTALL = "pip install jax==0.10.2 jaxlib==0.10.2"
BATCH_GROWING_SCHEDULES = ("batch-growth", "step-batch", "step-hybrid", "noise-matched", "adaptive")
MILESTONE_SCHEDULES = ("step-lr", "step-batch", "step-hybrid")


class ConfigError(ValueError):
    """A parameter has a value that is not allowed. The message is one line."""


def machine_cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Rule:
    """A field's own check: ``test(value)`` must hold; ``allowed`` says what is (after "expected")."""

    test: Callable[[Any], bool]
    allowed: str


def one_of(options: Sequence[str], empty: bool = False) -> Rule:
    return Rule(lambda value: value in options or (empty and value == ""),
                f"{'empty or ' if empty else ''}one of {', '.join(options)}")


def at_least(bound: float, what: str = "a number") -> Rule:
    return Rule(lambda value: value >= bound, f"{what} >= {bound:g}")


def whole_at_least(bound: int, zero_means: str = "") -> Rule:
    allowed = f"a whole number >= {bound}" if not zero_means else f"0 ({zero_means}) or a whole number >= {bound}"
    return Rule(lambda value: value >= bound or (bool(zero_means) and value == 0), allowed)


def _field(default: Any, help: str, rule: Rule | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "rule": rule})


def _devices_rule() -> Rule:
    def test(text: str) -> bool:
        return text == "auto" or (text.isdigit() and 1 <= int(text) <= machine_cores())

    return Rule(test, f"auto or a whole number from 1 to this machine's {machine_cores()} CPU cores (logical CPU "
                      "devices beyond them only slow training; GPUs: at most those visible)")


def _milestones_rule() -> Rule:
    return Rule(lambda milestones: all(milestone >= 1 for milestone in milestones)
                and all(a < b for a, b in zip(milestones, milestones[1:])),
                "comma-separated whole numbers >= 1 in strictly increasing order, e.g. 60,120,160")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run. Epochs are counted from 1.

    Each field declares its own check (:class:`Rule`), applied by :func:`validate`, which then checks
    the rules that join fields, each once.
    """

    preset: str = _field("", "named experiment whose fields apply first (see growing_batch.presets); empty: none",
                         one_of(tuple(PRESETS), empty=True))
    dataset: str = _field("fashion_mnist", f"data set: {', '.join(DATASETS)}", one_of(DATASETS))
    model: str = _field("small-cnn", f"model: {', '.join(MODELS)}", one_of(MODELS))
    schedule: str = _field("lr-decay", f"schedule: {', '.join(SCHEDULES)}", one_of(tuple(SCHEDULES)))
    learning_rate: float = _field(0.1, "initial learning rate ε0 (> 0)", Rule(lambda value: value > 0, "a number > 0"))
    batch_size: int = _field(128, "initial batch size B0 (>= 1)", whole_at_least(1))
    lr_decay: float = _field(0.9, "per-epoch learning-rate factor of lr-decay and noise-matched, in (0, 1]",
                             Rule(lambda value: 0 < value <= 1, "a number in (0, 1]"))
    batch_growth: float = _field(1.037, "per-epoch batch-size factor of batch-growth (>= 1)",
                                 Rule(lambda value: value >= 1, "a number >= 1 (the batch never shrinks)"))
    max_batch_size: int = _field(0, "batch-size cap of the growing schedules; 0 means N/10 (N: training examples)",
                                 whole_at_least(1, zero_means="N/10"))
    min_batch_size: int = _field(0, "adaptive: the smallest batch size; 0 means batch_size",
                                 whole_at_least(1, zero_means="batch_size"))
    max_batch_growth: float = _field(2.0, "adaptive: the most the batch size may grow (or shrink) in one epoch (>= 1)",
                                     at_least(1))
    milestones: tuple[int, ...] = _field((60, 120, 160),
                                         "epochs after which the step schedules change, comma-separated and increasing",
                                         _milestones_rule())
    step_factor: float = _field(5.0, "factor of the step schedules at each milestone (>= 1)", at_least(1))
    measure_noise_scale: bool = _field(
        False, "estimate the gradient noise scale B_simple every epoch (on for the adaptive schedule)"
    )
    optimizer: str = _field("sgd", f"optimizer: {', '.join(OPTIMIZERS)}", one_of(OPTIMIZERS))
    weight_decay: float = _field(
        0.0, "SGD-style weight decay λ on every trainable parameter, as the L2 penalty (λ/2)·||w||² (>= 0)",
        at_least(0)
    )
    momentum: float = _field(0.0, "SGD momentum, or Adam's beta_1 (the paper's Adam: 0.9), in [0, 1)",
                             Rule(lambda value: 0 <= value < 1, "a number in [0, 1)"))
    nesterov: bool = _field(False, "Nesterov momentum (sgd with momentum > 0 only)")
    epochs: int = _field(10, "number of epochs (>= 1)", whole_at_least(1))
    augment: bool = _field(False, "random crops of 4-pixel reflect-padded images and horizontal flips, seeded")
    ghost_batch_size: int = _field(
        0, "batch-norm statistics over virtual batches of this size (wrn-16-4); 0: the whole batch",
        whole_at_least(1, zero_means="off")
    )
    max_device_batch_size: int = _field(
        0, "split larger batches into micro-batches of this size and accumulate; 0: no limit",
        whole_at_least(1, zero_means="no limit")
    )
    precision: str = _field(
        "float32", f"{', '.join(PRECISIONS)} (Keras mixed precision: bfloat16 compute, float32 weights)",
        one_of(PRECISIONS)
    )
    jit_compile: bool = _field(
        False, "compile the train step with XLA, padding batches to a few bucket sizes (zero-weight examples); "
                 "implied with backend jax"
    )
    backend: str = _field(
        "tensorflow", "Keras backend: tensorflow or jax (jit_compile is implied on JAX: every batch is padded to a "
        "bucket size and XLA-compiled); not given: KERAS_BACKEND if set, else tensorflow",
        one_of(BACKENDS)
    )
    seed: int = _field(0, "seed of the validation split, initialisation and shuffling (>= 0)",
                       Rule(lambda value: 0 <= value < 2**32, f"a whole number from 0 to {2**32 - 1} (NumPy's seeds)"))
    validation_size: int = _field(
        5000, "training examples held out for validation, drawn without replacement (>= 0)", whole_at_least(0)
    )
    data_dir: str = _field(
        "", "folder with the data set's files in Keras' formats; empty: local copies or download",
        Rule(lambda value: value == "" or os.path.isdir(value),
             "an existing folder, or empty to use local copies or download")
    )
    max_examples: int = _field(
        0, "use at most this many examples of each split (train, validation, test); 0: all",
        Rule(lambda value: value >= 0, "a whole number >= 0 (0: all)")
    )
    devices: str = _field(
        "auto", "data-parallel replicas: auto (every GPU, else the CPU) or a number; on a CPU, N > 1 logical devices",
        _devices_rule()
    )
    checkpoint_dir: str = _field(
        "checkpoints", "folder of the per-run checkpoints (<checkpoint_dir>/<run id>/), saved every epoch for resuming",
        Rule(lambda value: value != "" and not os.path.isfile(value), "a folder path (created if missing), not a file")
    )
    verbose: str = _field(
        "auto", "progress output, as in Keras: auto (a progress bar on a terminal, else one line per epoch), "
        "0 (none), 1 (progress bar), 2 (one line per epoch)", one_of(("auto", "0", "1", "2"))
    )
    register_model: str = _field(
        "", "register the trained model in MLflow's model registry under this name; empty: do not register"
    )

    def to_params(self) -> dict[str, str]:
        """The config as MLflow params: the same text a user would pass on the command line."""
        return {field.name: format_value(getattr(self, field.name)) for field in fields()}

    def to_dict(self) -> dict[str, Any]:
        return {field.name: _jsonable(getattr(self, field.name)) for field in fields()}


def fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(Config)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def format_value(value: Any) -> str:
    """The command-line text of a field value (``(60, 120)`` -> ``"60,120"``, True -> ``"true"``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    return str(value)


# --- parsing text into typed values -------------------------------------------------------------


def parse_whole_number(name: str, text: str) -> int:
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        raise ConfigError(f"{name}={text!r} is not allowed: expected a whole number.")
    return int(number)


def _parse_float(name: str, text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not allowed: expected a number.") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name}={text!r} is not allowed: expected a finite number.")
    return number


def parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ConfigError(f"{name}={text!r} is not allowed: expected true or false.")


def _parse_milestones(name: str, text: str) -> tuple[int, ...]:
    if not text.strip():
        return ()
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):  # "60,,120" or "60,": a milestone left out, not to be guessed
        raise ConfigError(f"{name}={text!r} is not allowed: expected comma-separated whole numbers with none empty, "
                          "e.g. 60,120,160.")
    return tuple(parse_whole_number(name, part) for part in parts)


def parse_value(name: str, text: str) -> Any:
    """Turn the text of one field (as given to the CLI or MLproject) into its typed value."""
    types = {field.name: field.type for field in fields()}
    if name not in types:
        raise ConfigError(f"unknown parameter {name!r}: expected one of {', '.join(types)}.")
    kind = types[name]
    if kind == "int":
        return parse_whole_number(name, text)
    if kind == "float":
        return _parse_float(name, text)
    if kind == "bool":
        return parse_bool(name, text)
    if kind == "tuple[int, ...]":
        return _parse_milestones(name, text)
    return text.strip()


# --- validation ---------------------------------------------------------------------------------


def _require(condition: bool, name: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{name}={format_value(value)!r} is not allowed: expected {allowed}.")


def validate(config: Config) -> Config:
    """Check every field by its own rule, then the rules that join fields; raise ConfigError on the
    first fault."""
    for field in fields():
        rule = field.metadata["rule"]
        if rule is not None:
            _require(rule.test(getattr(config, field.name)), field.name, getattr(config, field.name), rule.allowed)
    # The rules that join fields, each stated once.
    _require(
        config.max_batch_size == 0 or config.max_batch_size >= config.batch_size,
        "max_batch_size", config.max_batch_size, f"0 (N/10) or a whole number >= batch_size ({config.batch_size})",
    )
    _require(
        config.schedule not in MILESTONE_SCHEDULES or len(config.milestones) > 0,
        "milestones", config.milestones, f"at least one milestone for schedule {config.schedule}",
    )
    _require(
        config.min_batch_size <= config.batch_size,
        "min_batch_size", config.min_batch_size,
        f"0 (batch_size) or a whole number from 1 to batch_size ({config.batch_size})",
    )
    _require(
        config.schedule != "adaptive" or config.measure_noise_scale,
        "measure_noise_scale", config.measure_noise_scale, "true for schedule adaptive, which follows the measurement",
    )
    _require(
        not config.nesterov or (config.optimizer == "sgd" and config.momentum > 0),
        "nesterov", config.nesterov, "false unless optimizer is sgd with momentum > 0",
    )
    _require(
        config.ghost_batch_size == 0 or config.model in BATCH_NORM_MODELS,
        "ghost_batch_size", config.ghost_batch_size,
        f"0 for model {config.model}, which has no batch norm (models with it: {', '.join(BATCH_NORM_MODELS)})",
    )
    _require(
        config.max_device_batch_size == 0 or config.ghost_batch_size == 0
        or config.max_device_batch_size % config.ghost_batch_size == 0,
        "max_device_batch_size", config.max_device_batch_size,
        f"a multiple of ghost_batch_size ({config.ghost_batch_size}), so that no ghost batch straddles two micro-batches",
    )
    _require(
        not config.jit_compile or config.max_device_batch_size == 0, "jit_compile", config.jit_compile,
        "false with max_device_batch_size (micro-batches are not padded to the compiled sizes)",
    )
    _require(
        not (config.jit_compile or config.backend == "jax") or config.model not in BATCH_NORM_MODELS
        or config.ghost_batch_size > 0,
        "ghost_batch_size", config.ghost_batch_size,
        f"> 0 for model {config.model} with jit_compile or backend jax (their batches are padded to a compiled "
        "size: ghost batch norm leaves the zero-weight padding out of its statistics, Keras' BatchNormalization "
        "would not)",
    )
    if config.backend == "jax":
        _check_jax(config)
    return config


def _check_jax(config: Config) -> None:
    """What the JAX engine does not do yet (docs/jax.md), each refused with one line."""
    _require(config.max_device_batch_size == 0, "max_device_batch_size", config.max_device_batch_size,
             "0 with backend jax (micro-batch accumulation runs on tensorflow)")


def jax_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("jax") is not None and importlib.util.find_spec("jaxlib") is not None


def activate_backend(config: Config) -> None:
    """Make Keras run on ``config.backend``: set ``KERAS_BACKEND`` before Keras is imported.

    Raises ConfigError (one line) when JAX is asked for and not installed, or when Keras was already
    imported with another backend in this process.
    """
    if config.backend == "jax" and not jax_installed():
        raise ConfigError(f"backend='jax' is not allowed: expected JAX installed; install it with: {JAX_INSTALL}")
    keras_module = sys.modules.get("keras")
    if keras_module is not None:
        running = keras_module.backend.backend()
        if running != config.backend:
            raise ConfigError(
                f"backend={config.backend!r} is not allowed in this process: expected {running}, the backend "
                "Keras was imported with (start a new process, e.g. python -m growing_batch.train --backend "
                f"{config.backend})"
            )
        return
    os.environ["KERAS_BACKEND"] = config.backend


def warnings_for(config: Config) -> list[str]:
    """Allowed but probably unintended settings, one line each (printed as ``warning: ...``)."""
    warnings = []
    late = [milestone for milestone in config.milestones if milestone >= config.epochs]
    if config.schedule in MILESTONE_SCHEDULES and late:
        warnings.append(
            f"milestones={format_value(config.milestones)!r}: {format_value(tuple(late))} at or after the last epoch "
            f"(epochs={config.epochs}) never take effect"
        )
    return warnings


def validate_against_data(config: Config, train_size: int) -> None:
    """The checks that need N, the number of training examples after the split."""
    _require(
        config.batch_size <= train_size,
        "batch_size",
        config.batch_size,
        f"at most the {train_size} training examples",
    )
    _require(
        config.max_batch_size <= train_size,
        "max_batch_size",
        config.max_batch_size,
        f"0 (N/10) or at most the {train_size} training examples",
    )
    cap = resolve_max_batch_size(config.max_batch_size, train_size)
    if config.schedule in BATCH_GROWING_SCHEDULES and cap < config.batch_size:
        raise ConfigError(
            f"max_batch_size='0' is not allowed: it resolves to N/10 = {cap}, below batch_size "
            f"({config.batch_size}); set max_batch_size between {config.batch_size} and {train_size}."
        )


# --- the command line ---------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit 2
        raise ConfigError(f"{message} (see --help)")


def make_parser(prog: str = "python -m growing_batch.train") -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=prog,
        description="Train with a learning-rate / batch-size schedule and log the run to MLflow.",
    )
    for field in fields():
        parser.add_argument(
            f"--{field.name}",
            default=None,
            metavar=field.type.replace("tuple[int, ...]", "int,int,...").upper(),
            help=f"{field.metadata['help']} (default: {format_value(field.default)!r})",
        )
    parser.add_argument(
        "--run_id",
        default=None,
        help="continue this MLflow run from its checkpoint, with its own parameters (those given must agree)",
    )
    return parser


def parse_command_line(argv: Sequence[str] | None = None) -> tuple[dict[str, str], str]:
    """The text of every field given on a command line, and ``--run_id`` ("" if not given), parsed
    once by argparse (its errors as ConfigError).

    ``--name value`` pairs are read as ``--name=value``, so that a value such as ``-1e-4`` reaches
    validation (and its clear message) instead of being taken for a flag.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {f"--{field.name}" for field in fields()} | {"--run_id"}
    joined: list[str] = []
    index = 0
    while index < len(argv):
        if argv[index] in flags and index + 1 < len(argv):
            joined.append(f"{argv[index]}={argv[index + 1]}")
            index += 2
        else:
            joined.append(argv[index])
            index += 1
    namespace = vars(make_parser().parse_args(joined))
    run_id = (namespace.pop("run_id") or "").strip()
    return {name: text for name, text in namespace.items() if text is not None}, run_id


def command_line_values(argv: Sequence[str] | None = None) -> dict[str, str]:
    """The text of every field given on a command line (see :func:`parse_command_line`)."""
    return parse_command_line(argv)[0]


def from_args(argv: Sequence[str] | None = None) -> Config:
    """Parse, resolve and validate a command line. Raises ConfigError with a one-line message."""
    return from_strings(command_line_values(argv))


def given_texts(values: dict[str, str]) -> dict[str, str]:
    """The fields given explicitly, as text: empty text means "not given"."""
    return {name: str(text) for name, text in values.items() if str(text).strip() != ""}


def given_values(values: dict[str, str]) -> dict[str, Any]:
    """The typed values of the fields given explicitly: empty text means "not given".

    (``mlflow run`` passes every MLproject parameter; their defaults are empty for that reason.)
    """
    return {name: parse_value(name, str(text)) for name, text in values.items() if str(text).strip() != ""}


def from_strings(values: dict[str, str]) -> Config:
    """A validated config: the preset's fields first, then the fields given, then the defaults."""
    given = given_values(values)
    preset = given.get("preset", "")
    resolved: dict[str, Any] = {}
    if preset in PRESETS:  # an unknown name is rejected by validate below
        resolved.update(preset_overrides(preset))
    environment_backend = os.environ.get("KERAS_BACKEND", "").strip()
    if "backend" not in given and environment_backend:  # honoured when the parameter is not given
        _require(environment_backend in BACKENDS, "KERAS_BACKEND", environment_backend,
                 f"one of {', '.join(BACKENDS)}, or the parameter backend given")
        resolved["backend"] = environment_backend
    resolved.update(given)
    if resolved.get("schedule") == "adaptive":
        resolved.setdefault("measure_noise_scale", True)  # what the adaptive schedule follows
    return validate(Config(**resolved))
