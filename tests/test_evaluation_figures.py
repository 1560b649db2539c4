"""Tests of polar_tf.evaluation_figures: the files each model's figures go to, the images and
captions they show, and the accuracy-against-eps curves drawn from the results' numbers (read
back from matplotlib's artists, not pixels)."""

import os

import numpy as np
import pytest

from polar_tf import evaluation_config, evaluation_figures, models, plots, run_dir

EPS = 0.3


def _capture(monkeypatch, name: str) -> list:
    """The figures that plots.<name> returns from now on (the module's drawing, kept to be read)."""
    figures, draw = [], getattr(plots, name)

    def kept(*args, **kwargs):
        figures.append(draw(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(plots, name, kept)
    return figures


def _images(model, count: int, attacked: int):
    """`count` random images labelled with the model's own predictions (all classified correctly),
    and the first `attacked` of them moved by +-EPS (as an attack on the first images leaves them)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (count, 28, 28, 1)).astype(np.float32)
    y = models.predict_labels(model, x, 1000)
    x_adv = np.clip(x[:attacked] + EPS * rng.choice([-1.0, 1.0], x[:attacked].shape), 0.0, 1.0).astype(np.float32)
    return x, y, x_adv


def test_an_undefended_models_figure_shows_the_flipped_images_first_with_their_predictions(
        tiny_model_path, tmp_path, monkeypatch):
    model = run_dir.load_model(tiny_model_path)
    x, y, x_adv = _images(model, 6, 5)
    figures = _capture(monkeypatch, "plot_adversarial_examples")
    config = evaluation_config.EvalConfig(eps=EPS)
    written = evaluation_figures.model_figures(model, "tiny", x, y, ("fgsm", x_adv), config, str(tmp_path), "tiny_")
    assert written == ["tiny_adversarial_examples.png"] and os.listdir(tmp_path) == written
    adv_pred = models.predict_labels(model, x_adv, 1000)
    flipped = [i for i in range(5) if adv_pred[i] != y[i]]
    assert 0 < len(flipped) < 5  # the images put first are a choice
    shown = flipped + [i for i in range(5) if i not in flipped]  # the 6th image has no attacked copy
    (fig,) = figures
    assert fig.get_suptitle() == "tiny: FGSM, eps = 0.3"
    assert sum(1 for ax in fig.axes if ax.get_images()) == 3 * len(shown)
    grid = np.reshape(fig.axes[: 3 * len(shown)], (len(shown), 3))
    for row, i in zip(grid, shown):
        assert row[0].get_ylabel() == f"label {y[i]}: {y[i]} -> {adv_pred[i]}"
        np.testing.assert_array_equal(row[0].get_images()[0].get_array(), x[i, ..., 0])
        np.testing.assert_array_equal(row[1].get_images()[0].get_array(), x_adv[i, ..., 0])


def test_a_front_end_models_figures_add_its_maps_clean_and_attacked(polarized_workdir, tmp_path):
    model = run_dir.load_model(os.path.join(polarized_workdir, "stage3.keras"))
    x, y, x_adv = _images(model, 3, 3)
    config = evaluation_config.EvalConfig(eps=EPS)
    written = evaluation_figures.model_figures(model, "p", x, y, ("pgd", x_adv), config, str(tmp_path), "")
    assert written == ["adversarial_examples.png", "frontend_maps.png", "frontend_maps_attacked.png"]
    assert sorted(os.listdir(tmp_path)) == written
    assert evaluation_figures.model_figures(model, "p", x, y, None, config, str(tmp_path / "none"), "") == []
    assert not (tmp_path / "none").exists()  # no attack ran at eps: no figure


def test_accuracy_against_eps_starts_at_the_clean_accuracy_and_plots_the_results_numbers(tmp_path):
    results = {"config": {"attacks": ["fgsm", "pgd"]}, "models": [{
        "label": "m", "clean_accuracy": 0.9,
        "runs": [{"attack": "fgsm", "eps": 0.3, "accuracy": 0.4}, {"attack": "pgd", "eps": 0.1, "accuracy": 0.5},
                 {"attack": "fgsm", "eps": 0.1, "accuracy": 0.7}, {"attack": "pgd", "eps": 0.3, "accuracy": 0.125}],
        "certified": [{"eps": 0.1, "certified_accuracy": {"interval_from_frontend": 0.25}},
                      {"eps": 0.3, "certified_accuracy": {"frontend": 0.5, "interval_from_frontend": 0.0}}],
    }]}
    curves = evaluation_figures.accuracy_curves(results)
    assert curves == {"m": {"FGSM": ([0.0, 0.1, 0.3], [0.9, 0.7, 0.4]), "PGD": ([0.0, 0.1, 0.3], [0.9, 0.5, 0.125]),
                            "certified (lower bound)": ([0.1, 0.3], [0.25, 0.0])}}
    fig = plots.plot_accuracy_vs_eps(curves, str(tmp_path / "accuracy_vs_eps.png"), EPS)
    (ax,) = fig.axes
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert drawn["FGSM"] == ([0.0, 0.1, 0.3], pytest.approx([90.0, 70.0, 40.0]))
    assert drawn["PGD"] == ([0.0, 0.1, 0.3], pytest.approx([90.0, 50.0, 12.5]))
    assert drawn["certified (lower bound)"] == ([0.1, 0.3], pytest.approx([25.0, 0.0]))


def test_a_label_becomes_a_file_name_part():
    assert evaluation_figures.slug("runs/a b/stage3") == "runs-a-b-stage3"
    assert evaluation_figures.slug("/abs/m.keras ") == "abs-m.keras"
