"""Tests of polar_tf.plots: what each figure shows, read from matplotlib's artists, not pixels."""

import numpy as np
import pytest

from polar_tf import plots


def _legend(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def _png(path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def test_accuracy_vs_eps_marks_every_curve_and_names_coinciding_ones(tmp_path):
    two_points = [0.0, 0.3]  # What a first run with eps_sweep unset draws.
    curves = {"m": {"FGSM": (two_points, [0.99, 0.4]), "BIM": (two_points, [0.99, 0.1]), "PGD": (two_points, [0.99, 0.1])}}
    fig = plots.plot_accuracy_vs_eps(curves, str(tmp_path / "a.png"), eps=0.3)
    (ax,) = fig.axes
    assert _legend(ax) == ["FGSM", "BIM", "PGD (= BIM)", "eps = 0.3"]
    fgsm, bim, pgd = ax.get_lines()[:3]
    assert [line.get_marker() for line in (fgsm, bim, pgd)] == list(plots.MARKERS[:3])
    assert (bim.get_linestyle(), pgd.get_linestyle()) == ("-", "--")  # The one on top lets BIM show through.
    np.testing.assert_allclose(pgd.get_ydata(), [99.0, 10.0])
    assert _png(tmp_path / "a.png") == b"\x89PNG\r\n\x1a\n"


def test_accuracy_vs_eps_with_several_models_a_colour_per_model_a_marker_per_attack(tmp_path):
    eps = [0.0, 0.1]
    curves = {
        "a": {"FGSM": (eps, [0.9, 0.5]), "PGD": (eps, [0.9, 0.2])},
        "b": {"FGSM": (eps, [0.8, 0.6]), "PGD": (eps, [0.9, 0.2])},
    }
    fig = plots.plot_accuracy_vs_eps(curves, str(tmp_path / "a.png"))
    (ax,) = fig.axes
    assert _legend(ax) == ["a: FGSM", "a: PGD", "b: FGSM", "b: PGD (= a)"]
    a_fgsm, a_pgd, b_fgsm, b_pgd = ax.get_lines()
    assert a_fgsm.get_marker() == b_fgsm.get_marker() != a_pgd.get_marker() == b_pgd.get_marker()
    assert a_fgsm.get_color() == a_pgd.get_color() != b_fgsm.get_color() == b_pgd.get_color()


def test_histogram_has_a_legend_entry_for_the_jumps(tmp_path):
    edges = np.linspace(-1.0, 1.0, 11)
    fig = plots.plot_histogram(np.arange(10), edges, 0.4, str(tmp_path / "h.png"))
    (ax,) = fig.axes
    assert _legend(ax) == ["jumps ±c (c = 0.4)"]
    jumps = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert sorted(line.get_xdata()[0] for line in jumps) == [-0.4, 0.4]


@pytest.mark.parametrize("with_maps", [False, True])
def test_adversarial_examples_difference_has_a_symmetric_labelled_colour_scale(tmp_path, with_maps):
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (3, 28, 28, 1))
    x_adv = np.clip(x + rng.choice([-0.1, 0.1], x.shape), 0.0, 1.0)
    maps = np.sign(rng.normal(size=(3, 28, 28))) if with_maps else None
    fig = plots.plot_adversarial_examples(
        x, x_adv, 0.1, str(tmp_path / "e.png"), maps=maps, maps_adv=maps, channel=7 if with_maps else None
    )
    barred = [image for ax in fig.axes for image in ax.get_images() if image.colorbar is not None]
    assert [image.colorbar.ax.get_ylabel() for image in barred] == ["x_adv - x"] + ["saturated output"] * with_maps
    difference = barred[0]
    assert difference.axes.get_subplotspec().colspan.start == 2  # The "attacked - original" column.
    assert (difference.norm.vmin, difference.norm.vmax) == (-0.1, 0.1)
    np.testing.assert_allclose(difference.colorbar.get_ticks(), [-0.1, 0.0, 0.1])
    assert _png(tmp_path / "e.png") == b"\x89PNG\r\n\x1a\n"
