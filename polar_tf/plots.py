"""Figures of the paper, written as PNG files with matplotlib (Agg, no display needed)."""

from __future__ import annotations

import os

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
