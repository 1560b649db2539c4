"""Figures of the paper, written as PNG files with matplotlib.

Figures are built as `matplotlib.figure.Figure` objects, not through pyplot: they need no display
and no backend choice, and none is kept open in a global registry."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

DIVERGING = "RdBu_r"
# Hollow markers of different shapes stay visible where curves overlap or a curve has two points.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def filters_grid(kernel: np.ndarray) -> np.ndarray:
    """The filters [k, k, 1, K] tiled into a square grid, RGB in [0, 1], zero drawn white.

    Each filter is shown on the common scale max |w|, with a one-pixel white border.
    """
    k, _, _, count = kernel.shape
    side = int(np.ceil(np.sqrt(count)))
    scale = float(np.max(np.abs(kernel))) or 1.0
    grid = np.zeros((side * (k + 1) + 1, side * (k + 1) + 1))
    for i in range(count):
        row, col = divmod(i, side)
        grid[1 + row * (k + 1) : (row + 1) * (k + 1), 1 + col * (k + 1) : (col + 1) * (k + 1)] = (
            kernel[:, :, 0, i] / scale
        )
    return matplotlib.colormaps[DIVERGING]((grid + 1.0) / 2.0)[..., :3]


def plot_filters(kernel: np.ndarray, path: str, title: str = "") -> Figure:
    """The K filters as a grid of small images with a diverging colour map."""
    k, _, _, count = kernel.shape
    side = int(np.ceil(np.sqrt(count)))
    scale = float(np.max(np.abs(kernel))) or 1.0
    fig, axes = subplots(side, side, figsize=(1.2 * side, 1.2 * side + 0.4))
    for i, ax in enumerate(np.ravel(axes)):
        ax.set_axis_off()
        if i < count:
            image = ax.imshow(kernel[:, :, 0, i], cmap=DIVERGING, vmin=-scale, vmax=scale)
    fig.colorbar(image, ax=axes, shrink=0.6)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_histogram(counts: np.ndarray, edges: np.ndarray, jump: float, path: str, title: str = "") -> Figure:
    """Histogram of the normalized front-end outputs z, with the jumps +-c marked."""
    fig, ax = subplots(figsize=(6, 3.5))
    ax.stairs(counts / max(counts.sum(), 1), edges, fill=True, color="tab:blue")
    for c in (-jump, jump):
        # One legend entry for the pair.
        ax.axvline(c, color="tab:red", linestyle="--", linewidth=1, label=f"jumps ±c (c = {jump:g})" if c > 0 else None)
    ax.set_xlabel("normalized front-end output z")
    ax.set_ylabel("fraction of outputs")
    ax.set_yscale("log")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # Outside: peaks can be anywhere.
    ax.set_title(title)
    return save_figure(fig, path)


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], squeeze: bool = True,
             layout: str | None = None):
    """A new figure and its grid of axes, as `pyplot.subplots` gives them."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save_figure(fig: Figure, path: str) -> Figure:
    """Writes the PNG; returns the figure so that tests can inspect its artists."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_accuracy_vs_eps(
    curves: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]],
    path: str,
    eps: float | None = None,
    title: str = "",
) -> Figure:
    """Accuracy (%) against the attack size eps: a marker per curve name (attack), a colour per
    model (per curve name when there is one model), eps marked if given.

    A curve equal at every eps to one drawn before it would hide beneath it: it is drawn dashed
    and its legend label names the curve it equals, e.g. "PGD (= BIM)".

    Args:
      curves: {model label: {curve name, e.g. "PGD": (eps values, accuracies in [0, 1])}}; with
        one model the legend shows the curve names alone.
      path: the PNG file to write.
      eps: the eps of the table, drawn as a vertical line.
      title: the figure's title.

    Returns:
      The figure.
    """
    names = list(dict.fromkeys(name for by_name in curves.values() for name in by_name))
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    one_model = len(curves) == 1
    fig, ax = subplots(figsize=(6, 4))
    drawn = []  # (model, name, eps values, accuracies) of the curves already on the axes
    for m, (model, by_name) in enumerate(curves.items()):
        for name, (eps_values, accuracy) in by_name.items():
            label = name if one_model else f"{model}: {name}"
            twin = next((d for d in drawn if np.array_equal(d[2], eps_values) and np.array_equal(d[3], accuracy)), None)
            if twin is not None:
                label += f" (= {_twin_label(twin[0], twin[1], model, name)})"
            ax.plot(
                eps_values, 100 * np.asarray(accuracy), label=label, linestyle="-" if twin is None else "--",
                color=colours[(names.index(name) if one_model else m) % len(colours)],
                marker=MARKERS[names.index(name) % len(MARKERS)], markersize=7, markerfacecolor="none",
                clip_on=False,  # Whole markers at 0% and 100%.
            )
            drawn.append((model, name, eps_values, accuracy))
    if eps is not None:
        ax.axvline(eps, color="gray", linestyle=":", linewidth=1, label=f"eps = {eps:g}")
    ax.set_xlabel("eps (L-inf)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))  # Outside: it hides no curve.
    ax.set_title(title)
    return save_figure(fig, path)


def _twin_label(model: str, name: str, of_model: str, of_name: str) -> str:
    """How the legend names the curve (model, name) that the curve (of_model, of_name) equals."""
    if model == of_model:
        return name
    return model if name == of_name else f"{model}: {name}"


def plot_adversarial_examples(
    x: np.ndarray,
    x_adv: np.ndarray,
    eps: float,
    path: str,
    captions: Sequence[str] | None = None,
    maps: np.ndarray | None = None,
    maps_adv: np.ndarray | None = None,
    channel: int | None = None,
    title: str = "",
) -> Figure:
    """One row per image: original, attacked, their difference (with a colour scale from -eps
    to eps) and, if given, one filter's saturated front-end output maps [n, rows, cols] for the
    original and the attacked image (with a scale from -1 to 1)."""
    count = len(x)
    headers = ["original", "attacked", "attacked - original"]
    if maps is not None:
        headers += [f"filter {channel}: original", f"filter {channel}: attacked"]
    fig, axes = subplots(
        count, len(headers), figsize=(2.1 * len(headers) + 1.0, 1.9 * count + 0.6), squeeze=False,
        layout="constrained",  # Makes room for the colour bars beside their columns.
    )
    limit = eps if eps > 0 else 1.0
    for i, row in enumerate(axes):
        row[0].imshow(x[i, ..., 0], cmap="gray", vmin=0, vmax=1)
        row[1].imshow(x_adv[i, ..., 0], cmap="gray", vmin=0, vmax=1)
        difference = row[2].imshow(x_adv[i, ..., 0] - x[i, ..., 0], cmap=DIVERGING, vmin=-limit, vmax=limit)
        if maps is not None:
            row[3].imshow(maps[i], cmap=DIVERGING, vmin=-1, vmax=1)
            outputs = row[4].imshow(maps_adv[i], cmap=DIVERGING, vmin=-1, vmax=1)
        if captions is not None:
            row[0].set_ylabel(captions[i], fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    # Symmetric around 0, so that white is an unchanged pixel and the colours' ends are +-eps.
    fig.colorbar(difference, ax=axes[:, 2], shrink=0.5, ticks=[-limit, 0, limit], label="x_adv - x")
    if maps is not None:
        fig.colorbar(outputs, ax=axes[:, 3:], shrink=0.5, ticks=[-1, 0, 1], label="saturated output")
    for ax, header in zip(axes[0], headers):
        ax.set_title(header, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_frontend_maps(image: np.ndarray, maps: np.ndarray, path: str, title: str = "") -> Figure:
    """An image [rows, cols, 1] and its K front-end output maps [rows, cols, K] on a grid."""
    count = maps.shape[-1]
    side = int(np.ceil(np.sqrt(count)))
    fig, axes = subplots(side, side + 1, figsize=(1.3 * (side + 1), 1.3 * side + 0.5), squeeze=False)
    for ax in np.ravel(axes):
        ax.set_axis_off()
    axes[0, 0].imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title("image", fontsize=7)
    scale = float(np.max(np.abs(maps))) or 1.0
    for k in range(count):
        row, col = divmod(k, side)
        shown = axes[row, col + 1].imshow(maps[..., k], cmap=DIVERGING, vmin=-scale, vmax=scale)
        axes[row, col + 1].set_title(str(k), fontsize=7)
    fig.colorbar(shown, ax=axes[:, 1:], shrink=0.6)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
