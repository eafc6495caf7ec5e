"""Figures: of one run from its history rows, of many from analysis' tidy table. No TensorFlow.

Figures are plain ``matplotlib.figure.Figure`` objects, made without pyplot: no GUI backend, no
global figure registry to close, safe in threads; MLflow logs them and notebooks display them.
"""

from __future__ import annotations

from matplotlib.figure import Figure


def _subplots(rows: int, columns: int, figsize, **kwargs):
    figure = Figure(figsize=figsize, layout="constrained")
    return figure, figure.subplots(rows, columns, **kwargs)


def _column(rows: list[dict], name: str) -> list[float]:
    return [row.get(name, float("nan")) for row in rows]


def schedule_figure(rows: list[dict], title: str = ""):
    """Learning rate, batch size and noise scale εN/(B(1 − m)) per epoch (the paper's Fig. 1)."""
    epochs = _column(rows, "epoch")
    figure, axes = _subplots(1, 3, (13, 3.6))
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
    figure, axes = _subplots(2, 2, (11, 7))
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
            if axis.get_legend_handles_labels()[0]:
                axis.legend()
    figure.suptitle(title or "training curves")
    return figure


# --- comparisons of many runs, from analysis' tidy ``history`` table -----------------------------


def _member_curves(history, x: str, y: str):
    """Per member: x (mean over seeds), mean y and its standard deviation over seeds (sample; 0 for
    one seed), per epoch, and the member's run ids. Members without a value of ``y`` are left out."""
    if y not in history.columns:  # e.g. noise_scale of Adam runs, which is not logged
        return
    for member, group in history.groupby("member", sort=False):
        per_epoch = group.dropna(subset=[y]).groupby("epoch")
        if not len(per_epoch):
            continue
        yield member, per_epoch[x].mean(), per_epoch[y].mean(), per_epoch[y].std(ddof=1).fillna(0.0), group["run_id"].unique()


def _mean_and_band(axis, x, mean, std, **line):
    """The mean over seeds as a line and ±1 standard deviation as a band of the same colour."""
    drawn = axis.plot(x, mean, **line)[0]
    step = {"step": "post"} if line.get("drawstyle") == "steps-post" else {}
    axis.fill_between(x, mean - std, mean + std, color=drawn.get_color(), alpha=0.2, linewidth=0, **step)
    return drawn


def _seeds(runs) -> str:
    return f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"


def _annotate(figure, history) -> None:
    figure.run_ids = set(history["run_id"])  # which runs the figure drew, for tests and reports


def schedules_comparison_figure(history, title: str = "schedules"):
    """ε, B and noise scale per epoch, one line per schedule: the mean over seeds with a ±1 std band
    (the paper's Fig. 1; seeds differ only where the schedule follows a measurement, as ``adaptive``)."""
    figure, axes = _subplots(1, 3, (14, 3.8))
    for axis, (name, label) in zip(axes, (("learning_rate", "learning rate ε"), ("batch_size", "batch size B"),
                                          ("noise_scale", "noise scale εN/(B(1−m))"))):
        for member, x, mean, std, runs in _member_curves(history, "epoch", name):
            _mean_and_band(axis, x, mean, std, drawstyle="steps-post", label=f"{member} ({_seeds(runs)})")
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.suptitle(title)
    _annotate(figure, history)
    return figure


def curves_figure(history, y: str, xs=("epoch", "updates"), title: str = ""):
    """``y`` against each of ``xs``: the mean over seeds per schedule, with a ±1 std band."""
    labels = {"epoch": "epoch", "updates": "parameter updates", "wall_seconds": "wall-clock seconds"}
    figure, axes = _subplots(1, len(xs), (6.5 * len(xs), 4.2), squeeze=False)
    for axis, x_name in zip(axes[0], xs):
        for member, x, mean, std, runs in _member_curves(history, x_name, y):
            _mean_and_band(axis, x, mean, std, label=f"{member} ({_seeds(runs)})")
        axis.set_xlabel(labels.get(x_name, x_name))
        axis.set_ylabel(y.replace("_", " "))
        axis.grid(alpha=0.3)
        if y.endswith("loss"):
            axis.set_yscale("log")
    axes[0][0].legend(fontsize="small")
    figure.suptitle(title or y.replace("_", " "))
    _annotate(figure, history)
    return figure


def measured_runs(history):
    """The rows of the runs that measured the gradient noise scale (measure_noise_scale)."""
    if "gradient_noise_scale" not in history:
        return history.iloc[0:0]
    measured = set(history.dropna(subset=["gradient_noise_scale"])["run_id"])
    return history[history["run_id"].isin(measured)]


def noise_scale_figure(history, title: str = "measured gradient noise scale and the batch size used"):
    """Per schedule: the measured gradient noise scale B_simple and the batch size B against epochs,
    and B_simple against B (on the diagonal, the batch equals the noise scale). Draws the runs that
    measured it; says so when none did."""
    measured = measured_runs(history)
    figure, axes = _subplots(1, 2, (13, 4.2))
    if measured.empty:
        for axis in axes:
            axis.text(0.5, 0.5, "no run measured the gradient noise scale\n(measure_noise_scale=true)",
                      ha="center", va="center", transform=axis.transAxes)
    for member, x, mean, std, runs in _member_curves(measured, "epoch", "gradient_noise_scale"):
        line = _mean_and_band(axes[0], x, mean, std, linestyle="--", label=f"{member}: measured B_simple ({_seeds(runs)})")
        _, _, batch, _, _ = next(_member_curves(measured[measured["member"] == member], "epoch", "batch_size"))
        axes[0].plot(batch.index, batch, drawstyle="steps-post", color=line.get_color(), label=f"{member}: batch size")
        axes[1].scatter(batch.reindex(mean.index), mean, color=line.get_color(), label=member, s=14)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("examples")
    axes[1].set_xlabel("batch size B used that epoch")
    axes[1].set_ylabel("measured B_simple at its end")
    if not measured.empty:
        low, high = axes[1].get_xlim()
        axes[1].plot([low, high], [low, high], color="grey", linewidth=0.8, label="B = B_simple")
        for axis in axes:
            axis.set_yscale("log")
            axis.legend(fontsize="small")
        axes[1].set_xscale("log")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    _annotate(figure, measured)
    return figure


NO_NOISE_SCALE = ("No run measured the gradient noise scale (measure_noise_scale=true, or schedule=adaptive), "
                  "so its figure is left out.")


def figure_or_reason(history, name: str):
    """The notebook's figure ``name`` (a key of ``comparison_figures`` without ``.png``) for these runs,
    or, where it would have no data, the sentence saying why it is left out."""
    makers = {
        "schedules": ("learning_rate", lambda: schedules_comparison_figure(history)),
        "train_loss": ("train_loss", lambda: curves_figure(history, "train_loss", title="training loss (paper Fig. 2)")),
        "test_accuracy": ("test_accuracy", lambda: curves_figure(history, "test_accuracy",
                                                                 title="test accuracy (paper Figs. 3–5)")),
        "test_accuracy_wall_clock": ("test_accuracy", lambda: curves_figure(
            history, "test_accuracy", xs=("wall_seconds",), title="test accuracy against wall-clock time")),
        "gradient_noise_scale": ("gradient_noise_scale", lambda: noise_scale_figure(history)),
    }
    if name not in makers:
        raise ValueError(f"name={name!r}: expected one of {', '.join(makers)}")
    metric, make = makers[name]
    if len(history) == 0:
        return "No run here logged an epoch, so this figure is left out."
    if name == "gradient_noise_scale" and measured_runs(history).empty:
        return NO_NOISE_SCALE
    if metric not in history or history[metric].isna().all():
        return f"No run here logged {metric}, so this figure is left out."
    return make()


def comparison_figures(history) -> dict:
    """The paper's figures for a set of runs, by file name (and the noise-scale figure when every run
    measured it)."""
    figures = {
        "schedules.png": schedules_comparison_figure(history),
        "train_loss.png": curves_figure(history, "train_loss", title="training loss (paper Fig. 2)"),
        "test_accuracy.png": curves_figure(history, "test_accuracy", title="test accuracy (paper Figs. 3–5)"),
        "test_accuracy_wall_clock.png": curves_figure(
            history, "test_accuracy", xs=("wall_seconds",), title="test accuracy against wall-clock time"
        ),
    }
    if len(history) and set(measured_runs(history)["run_id"]) == set(history["run_id"]):
        figures["gradient_noise_scale.png"] = noise_scale_figure(history)
    return figures
