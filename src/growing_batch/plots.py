"""Figures, from per-epoch history rows (dicts with ``epoch`` and metric names). No TensorFlow."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402


def _column(rows: list[dict], name: str) -> list[float]:
    return [row.get(name, float("nan")) for row in rows]


def close(figure) -> None:
    plt.close(figure)


def schedule_figure(rows: list[dict], title: str = ""):
    """Learning rate, batch size and noise scale εN/(B(1 − m)) per epoch (the paper's Fig. 1)."""
    epochs = _column(rows, "epoch")
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    for axis, (name, label) in zip(
        axes,
        (
            ("learning_rate", "learning rate ε"),
            ("batch_size", "batch size B"),
            ("noise_scale", "noise scale εN/(B(1−m))"),
        ),
    ):
        axis.plot(epochs, _column(rows, name), marker=".", drawstyle="steps-post")
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)  # from zero, so ε's rounding wiggles in noise-matched look as small as they are
    axes[1].set_ylim(bottom=0)
    axes[2].set_yscale("log")
    figure.suptitle(title or "schedule")
    return figure


def training_curves_figure(rows: list[dict], title: str = ""):
    """Loss and accuracy against epochs and against parameter updates (the paper's Figs. 2–3)."""
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for column, x_name in enumerate(("epoch", "updates")):
        x = _column(rows, x_name)
        for row, kind in enumerate(("loss", "accuracy")):
            axis = axes[row][column]
            for split in ("train", "val", "test"):
                name = f"{split}_{kind}"
                if any(name in entry for entry in rows):
                    axis.plot(x, _column(rows, name), marker=".", label=split)
            axis.set_xlabel("parameter updates" if x_name == "updates" else "epoch")
            axis.set_ylabel(kind)
            axis.grid(alpha=0.3)
            axis.legend()
    figure.suptitle(title or "training curves")
    return figure
