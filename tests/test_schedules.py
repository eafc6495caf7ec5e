"""Schedules: hand-computed values at the boundaries, and the reproduction's exact sequences."""

import functools
import math
import subprocess
import sys

import pytest

from growing_batch import schedules
from growing_batch.config import Config

REPRODUCTION_N = 45_235  # its validation draw with replacement left this many training images
REPRODUCTION_CAP = 4_526  # the cap it used, N/10 of about 45,260


def test_schedules_import_no_tensorflow():
    code = "import sys, growing_batch.schedules, growing_batch.config; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    "epoch, expected",
    [(1, 0.1), (2, 0.09), (3, 0.081), (5, 0.06561), (20, 0.1 * 0.9**19)],
)
def test_lr_decay_is_the_reproductions_lrd(epoch, expected):
    step = schedules.lr_decay(epoch, learning_rate=0.1, batch_size=128, lr_decay=0.9)
    assert step.learning_rate == pytest.approx(expected, rel=1e-12)
    assert step.batch_size == 128
    assert step.momentum == 0.0


def test_lr_decay_values_quoted_in_the_reference():
    rates = [schedules.lr_decay(e, learning_rate=0.1, batch_size=128, lr_decay=0.9).learning_rate for e in (5, 20)]
    assert [round(rate, 4) for rate in rates] == [0.0656, 0.0135]


IBS = functools.partial(
    schedules.batch_growth, learning_rate=0.1, batch_size=128, batch_growth=1.037, max_batch_size=REPRODUCTION_CAP
)


@pytest.mark.parametrize(
    "epoch, batch_size",
    [(1, 128), (2, 132), (3, 137), (4, 142), (5, 148), (10, 177), (20, 255), (40, 527), (60, 1091),
     (80, 2258), (99, 4503), (100, 4526), (150, 4526)],
)
def test_batch_growth_is_the_reproductions_ibs(epoch, batch_size):
    step = IBS(epoch)
    assert step.batch_size == batch_size
    assert step.learning_rate == 0.1  # ibs never decays ε, not even at the cap


def test_update_counts_of_the_reproduction():
    lrd = functools.partial(schedules.lr_decay, learning_rate=0.1, batch_size=128, lr_decay=0.9)
    lrd_updates = schedules.table(lrd, 150, REPRODUCTION_N)[-1]["updates"]
    ibs_updates = schedules.table(IBS, 150, REPRODUCTION_N)[-1]["updates"]
    # every batch full: ceil(150 · 45,235 / 128) — "≈53,000"; ibs "≈10,200"
    assert lrd_updates == -(-150 * REPRODUCTION_N // 128) == 53_010
    assert ibs_updates == 10_162


def test_every_batch_is_full_and_the_leftover_carries_into_the_next_epoch():
    assert schedules.epoch_updates(1000, 300) == (4, 200)  # 3 full batches + 100 topped up with 200
    assert schedules.epoch_updates(1000, 300, carried=200) == (3, 100)  # 800 left: the next carries 100
    assert schedules.epoch_updates(1000, 250) == (4, 0)
    assert schedules.epoch_updates(1000, 1000, carried=999) == (1, 999)
    for bad in (-1, 1000):
        with pytest.raises(ValueError, match="carried must be in"):
            schedules.epoch_updates(1000, 10, carried=bad)
    # examples_seen = epochs · N + carried, and each update adds exactly B
    rows = schedules.table(IBS, 150, REPRODUCTION_N)
    carried, previous = 0, {"updates": 0, "examples_seen": 0}
    for row in rows:
        updates, carried = schedules.epoch_updates(REPRODUCTION_N, row["batch_size"], carried)
        assert row["updates"] - previous["updates"] == updates
        assert row["examples_seen"] - previous["examples_seen"] == updates * row["batch_size"]
        assert row["examples_seen"] == row["epoch"] * REPRODUCTION_N + carried
        previous = row


def test_batch_growth_rounds_exact_products_down_correctly():
    step = schedules.batch_growth(3, learning_rate=0.1, batch_size=128, batch_growth=5.0, max_batch_size=10**6)
    assert step.batch_size == 3200
    # 0.1 * 3 = 0.30000000000000004 style errors must not cost a whole example
    step = schedules.batch_growth(2, learning_rate=0.1, batch_size=10, batch_growth=1.1, max_batch_size=10**6)
    assert step.batch_size == 11


def test_constant():
    assert schedules.constant(7, learning_rate=0.05, batch_size=64, momentum=0.9) == (0.05, 64, 0.9)


PAPER = dict(learning_rate=0.1, batch_size=128, milestones=(60, 120, 160), step_factor=5.0, momentum=0.9)


@pytest.mark.parametrize(
    "epoch, rate",
    [(1, 0.1), (60, 0.1), (61, 0.02), (120, 0.02), (121, 0.004), (160, 0.004), (161, 0.0008), (200, 0.0008)],
)
def test_step_lr_milestones_take_effect_the_epoch_after(epoch, rate):
    step = schedules.step_lr(epoch, **PAPER)
    assert step.learning_rate == pytest.approx(rate, rel=1e-12)
    assert step.batch_size == 128
    assert step.momentum == 0.9


@pytest.mark.parametrize(
    "epoch, batch_size",
    [(1, 128), (60, 128), (61, 640), (121, 3200), (161, 16000), (200, 16000)],
)
def test_step_batch_is_the_papers_increasing_batch(epoch, batch_size):
    step = schedules.step_batch(epoch, max_batch_size=50_000, **PAPER)
    assert step.batch_size == batch_size
    assert step.learning_rate == pytest.approx(0.1)


def test_step_batch_past_the_cap_decays_the_learning_rate():
    # B_max = 5,120: 128 -> 640 -> 3,200 -> (16,000 capped to 5,120 and ε x 5,120/16,000)
    step = schedules.step_batch(161, max_batch_size=5120, **PAPER)
    assert step.batch_size == 5120
    assert step.learning_rate == pytest.approx(0.1 * 5120 / 16000)


@pytest.mark.parametrize(
    "epoch, rate, batch_size",
    [(60, 0.1, 128), (61, 0.1, 640), (120, 0.1, 640), (121, 0.02, 640), (161, 0.004, 640)],
)
def test_step_hybrid_grows_the_batch_once_then_decays(epoch, rate, batch_size):
    step = schedules.step_hybrid(epoch, max_batch_size=50_000, **PAPER)
    assert step.learning_rate == pytest.approx(rate, rel=1e-12)
    assert step.batch_size == batch_size


def test_paper_update_counts_for_50000_images():
    def updates(function, **kwargs):
        schedule = functools.partial(function, **PAPER, **kwargs)
        return schedules.table(schedule, 200, 50_000)[-1]["updates"]

    assert updates(schedules.step_lr) == 78_125  # 200 · 50,000 / 128: "≈80,000"
    assert updates(schedules.step_batch, max_batch_size=50_000) == 28_876  # ≈29,000
    assert updates(schedules.step_batch, max_batch_size=5_120) == 29_142  # the table's B_max = N/10: ≈29,000


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("step_function", [schedules.step_batch, schedules.step_hybrid])
def test_step_schedules_have_the_noise_scale_of_step_lr(step_function, momentum):
    arguments = dict(PAPER, momentum=momentum)
    for epoch in range(1, 201):
        reference = schedules.step_lr(epoch, **arguments)
        step = step_function(epoch, max_batch_size=5000, **arguments)
        assert schedules.noise_scale(step.learning_rate, step.batch_size, 50_000, momentum) == pytest.approx(
            schedules.noise_scale(reference.learning_rate, reference.batch_size, 50_000, momentum), rel=1e-12
        )


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("decay", [0.9, 0.5, 0.97])
def test_noise_matched_follows_lr_decay_noise_scale_exactly(decay, momentum):
    """The proof that noise-matched is noise-equivalent to lr-decay, epoch by epoch, past the cap."""
    n = 45_000
    common = dict(learning_rate=0.1, batch_size=128, lr_decay=decay, momentum=momentum)
    for epoch in range(1, 151):
        reference = schedules.lr_decay(epoch, **common)
        matched = schedules.noise_matched(epoch, max_batch_size=4500, **common)
        assert matched.noise_scale(n) == pytest.approx(reference.noise_scale(n), rel=1e-12)
        assert matched.momentum == momentum


def test_noise_matched_grows_the_batch_then_decays_the_rate():
    schedule = functools.partial(
        schedules.noise_matched, learning_rate=0.1, batch_size=128, lr_decay=0.9, max_batch_size=4500
    )
    # B = floor(128 / 0.9^(e-1)): 128, 142, 158, 175, 195, ...; ε stays within 1/B of 0.1
    assert [schedule(e).batch_size for e in range(1, 6)] == [128, 142, 158, 175, 195]
    for epoch in range(1, 35):
        assert 0.1 * (1 - 1 / schedule(epoch).batch_size) < schedule(epoch).learning_rate <= 0.1
    # 128 / 0.9^33 = 4,141.6 < 4,500 < 128 / 0.9^34 = 4,601.8: the cap is reached at epoch 35
    assert schedule(34).batch_size == 4141
    assert schedule(35).batch_size == 4500
    assert schedule(35).learning_rate == pytest.approx(0.1 * 0.9**34 * 4500 / 128)
    assert schedule(36).learning_rate == pytest.approx(schedule(35).learning_rate * 0.9)


def test_the_reproductions_two_setups_were_not_noise_equivalent():
    lrd = functools.partial(schedules.lr_decay, learning_rate=0.1, batch_size=128, lr_decay=0.9)
    def ratio(epoch):
        return IBS(epoch).noise_scale(REPRODUCTION_N) / lrd(epoch).noise_scale(REPRODUCTION_N)

    # (0.9 * 1.037)^-(e-1) before the cap: 3.7x lrd's noise at epoch 20, 59x at epoch 60
    assert ratio(20) == pytest.approx((0.9 * 1.037) ** -19, rel=0.01)
    assert ratio(60) > 50


def test_noise_scale_formula():
    assert schedules.noise_scale(0.1, 128, 50_000, 0.9) == pytest.approx(0.1 * 50_000 / (128 * 0.1))
    # the paper's table: all four setups start at εN/(B(1 − m)) ≈ 390.6
    for rate, momentum, batch in ((0.1, 0.9, 128), (0.5, 0.9, 640), (0.5, 0.98, 3200)):
        assert schedules.noise_scale(rate, batch, 50_000, momentum) == pytest.approx(390.625)
    with pytest.raises(ValueError, match="momentum"):
        schedules.noise_scale(0.1, 128, 50_000, 1.0)


@pytest.mark.parametrize("epoch", [0, -1, 1.5, True])
def test_epochs_count_from_one(epoch):
    with pytest.raises(ValueError, match="counted from 1"):
        schedules.constant(epoch, learning_rate=0.1, batch_size=1)


def test_default_max_batch_size_is_a_tenth_of_n():
    assert schedules.default_max_batch_size(45_235) == 4523
    assert schedules.resolve_max_batch_size(0, 50_000) == 5000
    assert schedules.resolve_max_batch_size(4526, 50_000) == 4526


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
def test_build_schedule_reads_the_config(name):
    config = Config(schedule=name, learning_rate=0.2, batch_size=10, milestones=(1,), step_factor=2.0,
                    lr_decay=0.5, batch_growth=2.0, momentum=0.5)
    schedule = schedules.build_schedule(config, train_size=1000)
    first, second = schedule(1), schedule(2)
    assert first == (0.2, 10, 0.5)
    expected_second = {
        "constant": (0.2, 10),
        "lr-decay": (0.1, 10),
        "batch-growth": (0.2, 20),
        "step-lr": (0.1, 10),
        "step-batch": (0.2, 20),
        "step-hybrid": (0.2, 20),
        "noise-matched": (0.2, 20),
        "adaptive": (0.2, 10),  # nothing measured yet: the batch holds
    }[name]
    assert (second.learning_rate, second.batch_size) == pytest.approx(expected_second)
    assert not math.isnan(second.noise_scale(1000))
