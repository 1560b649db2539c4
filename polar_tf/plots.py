"""Figures of the paper, written as PNG files with matplotlib (Agg, no display needed)."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DIVERGING = "RdBu_r"


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


def plot_filters(kernel: np.ndarray, path: str, title: str = "") -> None:
    """The K filters as a grid of small images with a diverging colour map."""
    k, _, _, count = kernel.shape
    side = int(np.ceil(np.sqrt(count)))
    scale = float(np.max(np.abs(kernel))) or 1.0
    fig, axes = plt.subplots(side, side, figsize=(1.2 * side, 1.2 * side + 0.4))
    for i, ax in enumerate(np.ravel(axes)):
        ax.set_axis_off()
        if i < count:
            image = ax.imshow(kernel[:, :, 0, i], cmap=DIVERGING, vmin=-scale, vmax=scale)
    fig.colorbar(image, ax=axes, shrink=0.6)
    fig.suptitle(title)
    _save(fig, path)


def plot_histogram(counts: np.ndarray, edges: np.ndarray, jump: float, path: str, title: str = "") -> None:
    """Histogram of the normalized front-end outputs z, with the jumps +-c marked."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.stairs(counts / max(counts.sum(), 1), edges, fill=True, color="tab:blue")
    for c in (-jump, jump):
        ax.axvline(c, color="tab:red", linestyle="--", linewidth=1)
    ax.set_xlabel("normalized front-end output z")
    ax.set_ylabel("fraction of outputs")
    ax.set_yscale("log")
    ax.set_title(title)
    _save(fig, path)


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_accuracy_vs_eps(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str, eps: float | None = None, title: str = ""
) -> None:
    """Accuracy (%) against the attack size eps, one line per curve label; eps marked if given."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (eps_values, accuracy) in curves.items():
        ax.plot(eps_values, 100 * np.asarray(accuracy), marker="o", markersize=3, label=label)
    if eps is not None:
        ax.axvline(eps, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("eps (L-inf)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, path)


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
) -> None:
    """One row per image: original, attacked, their difference and, if given, one front-end
    filter's output maps [n, rows, cols] for the original and the attacked image."""
    count = len(x)
    headers = ["original", "attacked", "attacked - original"]
    if maps is not None:
        headers += [f"filter {channel}: original", f"filter {channel}: attacked"]
    fig, axes = plt.subplots(count, len(headers), figsize=(1.9 * len(headers), 1.9 * count + 0.6), squeeze=False)
    limit = eps if eps > 0 else 1.0
    for i, row in enumerate(axes):
        row[0].imshow(x[i, ..., 0], cmap="gray", vmin=0, vmax=1)
        row[1].imshow(x_adv[i, ..., 0], cmap="gray", vmin=0, vmax=1)
        row[2].imshow(x_adv[i, ..., 0] - x[i, ..., 0], cmap=DIVERGING, vmin=-limit, vmax=limit)
        if maps is not None:
            row[3].imshow(maps[i], cmap=DIVERGING, vmin=-1, vmax=1)
            row[4].imshow(maps_adv[i], cmap=DIVERGING, vmin=-1, vmax=1)
        if captions is not None:
            row[0].set_ylabel(captions[i], fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, header in zip(axes[0], headers):
        ax.set_title(header, fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def plot_frontend_maps(image: np.ndarray, maps: np.ndarray, path: str, title: str = "") -> None:
    """An image [rows, cols, 1] and its K front-end output maps [rows, cols, K] on a grid."""
    count = maps.shape[-1]
    side = int(np.ceil(np.sqrt(count)))
    fig, axes = plt.subplots(side, side + 1, figsize=(1.3 * (side + 1), 1.3 * side + 0.5), squeeze=False)
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
    _save(fig, path)
