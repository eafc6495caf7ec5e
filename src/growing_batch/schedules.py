"""Schedules: pure functions of the epoch that give the learning rate, batch size and momentum.

Epochs are counted from 1 everywhere in this project: epoch 1 is the first pass over the
training data, and the MLflow step of a per-epoch metric is that epoch number. (Keras'
callback hooks still receive their own 0-based index; the schedule callback adds 1.)

A milestone ``m`` takes effect after ``m`` completed epochs, i.e. from epoch ``m + 1``: with
milestones 60, 120, 160 over 200 epochs the four phases last 60, 60, 40 and 40 epochs, which
gives the paper's update counts (≈78,000 for a constant batch of 128 on 50,000 images).

Every schedule returns a :class:`Step`. The SGD noise scale of a step is

    g = ε N / (B (1 − m))

(ε learning rate, N training-set size, B batch size, m momentum; Smith et al. 2018, eq. 6 with
N ≫ B). Schedules that grow the batch up to a cap follow the paper's rule: once the batch would
exceed the cap, the batch stays at the cap and the learning rate takes over the remaining factor,
so that the noise scale still follows the schedule.

This module imports no TensorFlow: its tests run in milliseconds.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

# A batch size computed in floating point, such as 128 * 5.0, must round down to 640 and not to
# 639 when the product comes out as 639.9999999; this tolerance absorbs that rounding error.
_FLOOR_TOLERANCE = 1e-9


class Step(NamedTuple):
    """What a schedule prescribes for one epoch."""

    learning_rate: float
    batch_size: int
    momentum: float

    def noise_scale(self, train_size: int) -> float:
        """This step's εN/(B(1 − m)) for a training set of ``train_size`` examples."""
        return noise_scale(self.learning_rate, self.batch_size, train_size, self.momentum)


Schedule = Callable[[int], Step]


def noise_scale(learning_rate: float, batch_size: int, train_size: int, momentum: float = 0.0) -> float:
    """The SGD noise scale g = εN / (B(1 − m)) of Smith et al. (2018)."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), received {momentum!r}.")
    return learning_rate * train_size / (batch_size * (1.0 - momentum))


def default_max_batch_size(train_size: int) -> int:
    """The paper's batch-size cap, N/10 rounded down (4,526 for the reproduction's N = 45,235)."""
    return max(1, train_size // 10)


def _check_epoch(epoch: int) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(
            f"epoch must be an integer >= 1 (epochs are counted from 1), received {epoch!r}."
        )


def _floor(value: float) -> int:
    return int(math.floor(value + _FLOOR_TOLERANCE))


def _milestones_passed(epoch: int, milestones: Sequence[int]) -> int:
    """How many milestones lie before ``epoch`` (milestone m takes effect from epoch m + 1)."""
    return sum(1 for milestone in milestones if epoch > milestone)


def _capped(learning_rate: float, ideal_batch_size: float, max_batch_size: int) -> tuple[float, int]:
    """Round the ideal batch down; past the cap, move the remaining factor into the learning rate.

    Returns the learning rate and batch size whose ratio ε/B equals learning_rate/ideal_batch_size
    whenever the cap is hit, so the noise scale is the one the ideal batch would have given.
    """
    if ideal_batch_size <= max_batch_size:
        return learning_rate, _floor(ideal_batch_size)
    return learning_rate * max_batch_size / ideal_batch_size, max_batch_size


def constant(epoch: int, *, learning_rate: float, batch_size: int, momentum: float = 0.0) -> Step:
    """The same learning rate and batch size every epoch."""
    _check_epoch(epoch)
    return Step(learning_rate, batch_size, momentum)


def lr_decay(
    epoch: int, *, learning_rate: float, batch_size: int, lr_decay: float, momentum: float = 0.0
) -> Step:
    """ε = ε0 · decay^(epoch − 1) at a fixed batch size (the reproduction's ``lrd``).

    With ε0 = 0.1 and decay 0.9: 0.1, 0.09, 0.081, ... (0.0656 at epoch 5).
    """
    _check_epoch(epoch)
    return Step(learning_rate * lr_decay ** (epoch - 1), batch_size, momentum)


def batch_growth(
    epoch: int,
    *,
    learning_rate: float,
    batch_size: int,
    batch_growth: float,
    max_batch_size: int,
    momentum: float = 0.0,
) -> Step:
    """B = floor(B0 · growth^(epoch − 1)), capped at ``max_batch_size``, at a fixed ε.

    This is the reproduction's ``ibs`` exactly: with B0 = 128 and growth 1.037 it gives
    128, 132, 137, 142, 148, ... and the learning rate never changes, not even at the cap.
    """
    _check_epoch(epoch)
    ideal = batch_size * batch_growth ** (epoch - 1)
    return Step(learning_rate, min(_floor(ideal), max_batch_size), momentum)


def step_lr(
    epoch: int,
    *,
    learning_rate: float,
    batch_size: int,
    milestones: Sequence[int],
    step_factor: float,
    momentum: float = 0.0,
) -> Step:
    """The paper's decaying learning rate: ε ÷ factor at each milestone, B fixed."""
    _check_epoch(epoch)
    passed = _milestones_passed(epoch, milestones)
    return Step(learning_rate / step_factor**passed, batch_size, momentum)


def step_batch(
    epoch: int,
    *,
    learning_rate: float,
    batch_size: int,
    milestones: Sequence[int],
    step_factor: float,
    max_batch_size: int,
    momentum: float = 0.0,
) -> Step:
    """The paper's increasing batch size: B × factor at each milestone, ε fixed.

    Past ``max_batch_size`` the batch stays at the cap and ε takes the rest of the factor, so the
    noise scale equals that of :func:`step_lr` at every epoch.
    """
    _check_epoch(epoch)
    passed = _milestones_passed(epoch, milestones)
    rate, size = _capped(learning_rate, batch_size * step_factor**passed, max_batch_size)
    return Step(rate, size, momentum)


def step_hybrid(
    epoch: int,
    *,
    learning_rate: float,
    batch_size: int,
    milestones: Sequence[int],
    step_factor: float,
    max_batch_size: int,
    momentum: float = 0.0,
) -> Step:
    """The paper's hybrid: B × factor at the first milestone, then ε ÷ factor at each later one."""
    _check_epoch(epoch)
    passed = _milestones_passed(epoch, milestones)
    batch_steps = min(passed, 1)
    rate, size = _capped(
        learning_rate / step_factor ** (passed - batch_steps),
        batch_size * step_factor**batch_steps,
        max_batch_size,
    )
    return Step(rate, size, momentum)


def noise_matched(
    epoch: int,
    *,
    learning_rate: float,
    batch_size: int,
    lr_decay: float,
    max_batch_size: int,
    momentum: float = 0.0,
) -> Step:
    """The batch-growing twin of :func:`lr_decay`: the same noise scale at every epoch.

    Where ``lr_decay`` divides ε by 1/decay each epoch, this multiplies B by 1/decay instead
    (ε fixed), and once B reaches ``max_batch_size`` it decays ε (the paper's rule). The batch
    size must be an integer, so ε also absorbs the rounding of B (at most a factor 1 − 1/B):
    ε/B — and with it εN/(B(1 − m)) — equals the LR-decay schedule's exactly, by construction.
    """
    _check_epoch(epoch)
    target = learning_rate * lr_decay ** (epoch - 1) / batch_size  # ε/B of the LR-decay schedule
    ideal = batch_size / lr_decay ** (epoch - 1)
    size = min(_floor(ideal), max_batch_size)
    return Step(target * size, size, momentum)


def adaptive(
    epoch: int,
    *,
    learning_rate: float,
    batch_size: int,
    min_batch_size: int,
    max_batch_size: int,
    max_batch_growth: float,
    measured: Sequence[float] = (),
    momentum: float = 0.0,
) -> Step:
    """The batch size follows the measured gradient noise scale B_simple; the paper's rule at the cap.

    A heuristic of this project, not McCandlish et al.'s rule: it sets B to the measured B_simple
    at a fixed ε0 (their ε_opt(B) = ε_max/(1 + B_noise/B) would change the learning rate with B);
    it is not in the paper either, and no source reports a result for it.

    ``measured[e − 1]`` is the noise scale measured at the end of epoch e (NaN: none). An *effective*
    batch size V starts at ``batch_size`` and, after each epoch with a measurement, moves towards it,
    by at most a factor ``max_batch_growth`` up or down, never below ``min_batch_size``. The batch is
    B = floor(V) up to ``max_batch_size``; beyond it B stays at the cap and ε = ε0 · B / V, so ε/B —
    the noise scale εN/(B(1 − m)) — is that of the batch V (the paper's rule, driven by a measurement
    instead of a table). Epoch 1 uses ``batch_size`` and ε0.
    """
    _check_epoch(epoch)
    if len(measured) < epoch - 1:
        raise ValueError(f"epoch {epoch} needs the measurements of epochs 1..{epoch - 1}; received {len(measured)}.")
    effective = float(batch_size)
    for value in measured[: epoch - 1]:
        if math.isfinite(value) and value > 0:
            effective = min(max(value, effective / max_batch_growth), effective * max_batch_growth)
            effective = max(effective, float(min_batch_size))
    size = min(_floor(effective), max_batch_size)
    return Step(learning_rate * size / effective, size, momentum)


class AdaptiveSchedule:
    """:func:`adaptive` over the measurements seen so far: ``observe`` records each epoch's
    ``gradient_noise_scale`` (the schedule callback calls it at the end of every epoch)."""

    def __init__(self, **arguments):
        self.arguments = arguments
        self.measured: list[float] = []

    def observe(self, epoch: int, logs: dict) -> None:
        del self.measured[epoch - 1:]  # a retrained epoch replaces its measurement
        self.measured += [math.nan] * (epoch - 1 - len(self.measured))
        self.measured.append(float(logs.get("gradient_noise_scale", math.nan)))

    def __call__(self, epoch: int) -> Step:
        measured = self.measured[: epoch - 1]
        measured += [math.nan] * (epoch - 1 - len(measured))
        return adaptive(epoch, measured=measured, **self.arguments)


SCHEDULES: dict[str, Callable[..., Step]] = {
    "constant": constant,
    "lr-decay": lr_decay,
    "batch-growth": batch_growth,
    "step-lr": step_lr,
    "step-batch": step_batch,
    "step-hybrid": step_hybrid,
    "noise-matched": noise_matched,
    "adaptive": adaptive,
}

# The config fields each schedule reads, besides learning_rate, batch_size and momentum.
SCHEDULE_FIELDS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "lr-decay": ("lr_decay",),
    "batch-growth": ("batch_growth", "max_batch_size"),
    "step-lr": ("milestones", "step_factor"),
    "step-batch": ("milestones", "step_factor", "max_batch_size"),
    "step-hybrid": ("milestones", "step_factor", "max_batch_size"),
    "noise-matched": ("lr_decay", "max_batch_size"),
    "adaptive": ("min_batch_size", "max_batch_size", "max_batch_growth"),
}


def build_schedule(config, train_size: int) -> Schedule:
    """The schedule a config names, as a function ``epoch -> Step``.

    ``config`` is anything with the config's field names as attributes (a
    :class:`growing_batch.config.Config`). ``max_batch_size`` 0 means N/10.
    """
    if config.schedule not in SCHEDULES:
        raise ValueError(
            f"schedule must be one of {', '.join(SCHEDULES)}; received {config.schedule!r}."
        )
    arguments = {
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "momentum": config.momentum,
    }
    for name in SCHEDULE_FIELDS[config.schedule]:
        if name == "max_batch_size":
            arguments[name] = resolve_max_batch_size(config.max_batch_size, train_size)
        elif name == "min_batch_size":
            arguments[name] = config.min_batch_size or config.batch_size
        else:
            arguments[name] = getattr(config, name)
    if config.schedule == "adaptive":
        return AdaptiveSchedule(**arguments)
    return functools.partial(SCHEDULES[config.schedule], **arguments)


def resolve_max_batch_size(max_batch_size: int, train_size: int) -> int:
    """``max_batch_size`` as configured, or N/10 when it is 0."""
    return max_batch_size if max_batch_size > 0 else default_max_batch_size(train_size)


def epoch_updates(train_size: int, batch_size: int, carried: int = 0) -> tuple[int, int]:
    """The updates of one epoch, and the examples its last batch takes from the next epoch.

    Every batch holds exactly ``batch_size`` examples, as in the reproduction's ``next_batch``: an
    epoch whose first ``carried`` examples (of its shuffle) were already used by the previous epoch's
    last batch has ``train_size − carried`` left; they make ``ceil((N − carried)/B)`` batches, and the
    last one is topped up from the next epoch's shuffle. That straddling batch counts in the epoch it
    started in. Returns ``(updates, carried into the next epoch)``, the latter in ``[0, B)``.
    """
    if not 0 <= carried < train_size:
        raise ValueError(f"carried must be in [0, train_size={train_size}); received {carried}.")
    remaining = train_size - carried
    updates = -(-remaining // batch_size)
    return updates, updates * batch_size - remaining


def table(schedule: Schedule, epochs: int, train_size: int) -> list[dict]:
    """The schedule over ``epochs`` epochs, with noise scale, cumulative updates and examples per epoch.

    ``examples_seen`` is ``updates`` weighted by each epoch's batch size; it equals
    ``epoch · N + carried`` (see :func:`epoch_updates`).
    """
    rows, updates, examples_seen, carried = [], 0, 0, 0
    for epoch in range(1, epochs + 1):
        step = schedule(epoch)
        epoch_count, carried = epoch_updates(train_size, step.batch_size, carried)
        updates += epoch_count
        examples_seen += epoch_count * step.batch_size
        rows.append(
            {
                "epoch": epoch,
                "learning_rate": step.learning_rate,
                "batch_size": step.batch_size,
                "momentum": step.momentum,
                "noise_scale": step.noise_scale(train_size),
                "updates": updates,
                "examples_seen": examples_seen,
            }
        )
    return rows


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def describe(config, train_size: int) -> str:
    """The schedule a config names, in words: e.g. "ε = 0.1 constant; B × 1/0.9 per epoch from 128 to
    5,500, then ε × 0.9 per epoch" (for the run's description in the MLflow UI)."""
    rate, batch = _number(config.learning_rate), _number(config.batch_size)
    cap = _number(resolve_max_batch_size(config.max_batch_size, train_size))
    milestones = ", ".join(str(milestone) for milestone in config.milestones)
    factor = _number(config.step_factor)
    words = {
        "constant": f"ε = {rate} and B = {batch}, constant",
        "lr-decay": f"B = {batch} constant; ε = {rate} × {_number(config.lr_decay)} per epoch",
        "batch-growth": f"ε = {rate} constant; B = {batch} × {_number(config.batch_growth)} per epoch, capped at {cap}",
        "noise-matched": (f"ε = {rate} constant; B × 1/{_number(config.lr_decay)} per epoch from {batch} to {cap}, "
                          f"then ε × {_number(config.lr_decay)} per epoch"),
        "step-lr": f"B = {batch} constant; ε = {rate} ÷ {factor} after epochs {milestones}",
        "step-batch": (f"ε = {rate} constant; B = {batch} × {factor} after epochs {milestones}, up to {cap} "
                       f"(past it ε takes the rest of the factor)"),
        "step-hybrid": (f"B = {batch} × {factor} after epoch {config.milestones[0] if config.milestones else '-'}, "
                        f"then ε = {rate} ÷ {factor} after each later milestone ({milestones}); B at most {cap}"),
        "adaptive": (f"B follows the measured gradient noise scale from {batch} (× or ÷ at most "
                     f"{_number(config.max_batch_growth)} per epoch, at least {_number(config.min_batch_size or config.batch_size)}), "
                     f"up to {cap}; past it ε = {rate} × cap / B_wanted"),
    }
    return words[config.schedule]
