"""evaluate --certify: certified accuracy beside the attacks, checked per example.

How the suites wire certificates in does not depend on the backend: these run in the TensorFlow
pass only. Under each backend, tests/test_certify.py checks that certified images survive attacks.
"""

import os

import keras
import numpy as np
import pytest

from polar_tf import adaptive, certify, data, evaluation, models, run_dir, training
from polar_tf.config import Config

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="backend-independent wiring: the TensorFlow pass's")


@pytest.fixture(scope="module")
def polarized_checkpoint(tmp_path_factory, mnist):
    """A polarized model whose front end picks single pixels (as trained front ends converge to),
    with the classifier trained for a few seconds on the saturated outputs."""
    (x_train, y_train), _ = mnist
    config = Config(epochs_per_stage=1)
    keras.utils.set_random_seed(0)
    model = models.build_model(config)
    frontend = models.get_frontend(model)
    kernel = np.zeros((5, 5, 1, 25), np.float32)
    for k in range(25):
        kernel[k // 5, k % 5, 0, k] = 1.0 if k % 2 == 0 else -1.0
    frontend.kernel.assign(kernel)
    training.compile_for_stage(model, config, 3)
    frontend.set_saturation(True)
    model.fit(x_train[:3000], y_train[:3000], batch_size=64, epochs=2, verbose=0)
    path = str(tmp_path_factory.mktemp("model") / "model.keras")
    run_dir.save_model(model, path)
    return path


def _evaluate(path, tmp_path, **overrides):
    config = evaluation.EvalConfig(
        dataset="mnist", attacks=("fgsm", "pgd"), steps=5, restarts=2, num_examples=100,
        eps=0.05, eps_sweep=(0.0, 0.01), certify=True, **overrides,
    )
    return evaluation.evaluate([path], config, output_dir=str(tmp_path))


def test_certified_accuracy_is_reported_and_below_every_attack(polarized_checkpoint, tmp_path):
    results = _evaluate(polarized_checkpoint, tmp_path)
    (model,) = results["models"]
    certified = {e["eps"]: e["certified_accuracy"]["interval_from_frontend"] for e in model["certified"]}
    assert sorted(certified) == [0.0, 0.01, 0.05]
    assert all(e["checked_against_attacks"] for e in model["certified"])
    values = [certified[e] for e in sorted(certified)]
    # Monotone: the boxes are nested, and so are the sets of front-end outputs that can change;
    # one more moves the bounds by a saturation level, far beyond float rounding. Not vacuous.
    assert values == sorted(values, reverse=True) and values[1] > 0.2
    # Exact, not a near-tie comparison: evaluate checks per example that every certified image
    # survived every attack (CertificateViolation otherwise); certify withholds float tolerances.
    for run in model["runs"]:
        assert certified[run["eps"]] <= run["accuracy"]
    with open(os.path.join(tmp_path, "results.md")) as f:
        text = f.read()
    assert "| certified |" in text and "(interval from frontend)" in text


def test_a_certificate_broken_by_an_attack_fails_loudly(polarized_checkpoint, tmp_path, monkeypatch):
    real = certify.certify

    def overclaiming(model, x, y, eps, **kwargs):
        result = real(model, x, y, eps, **kwargs)
        everything = np.ones_like(result.certified_ibp)
        return type(result)(**{**result.__dict__, "certified_ibp": everything})

    monkeypatch.setattr(certify, "certify", overclaiming)
    with pytest.raises(certify.CertificateViolation, match="were broken by an attack"):
        _evaluate(polarized_checkpoint, tmp_path)


def _adaptive(path, tmp_path):
    config = adaptive.AdaptiveConfig(
        dataset="mnist", eps=0.01, num_examples=50, backwards=("identity",), pgd_steps=5, pgd_restarts=1,
        apgd_iterations=5, apgd_target_classes=2, square_queries=20, check_examples=50, certify=True,
    )
    return adaptive.evaluate_adaptive([path], config, output_dir=str(tmp_path))


def test_the_adaptive_suite_checks_certificates_against_its_worst_case(polarized_checkpoint, tmp_path, monkeypatch):
    checked = []
    real = certify.checked_against_attacks
    monkeypatch.setattr(certify, "checked_against_attacks", lambda *args, **kwargs: checked.append(args[-1]) or real(*args, **kwargs))
    (model,) = _adaptive(polarized_checkpoint, tmp_path)["models"]
    # Checked against the per-example worst case over every attack of the suite.
    (survives,) = checked
    assert survives.dtype == bool and survives.mean() == model["worst_case_accuracy"]
    (entry,) = model["certified"]
    assert entry["eps"] == 0.01 and entry["checked_against_attacks"]
    certified = entry["certified_accuracy"]["interval_from_frontend"]
    # Exact: every certified example survived every attack of the suite, so it is robust in the worst case.
    assert 0.2 < certified <= model["worst_case_accuracy"]
    with open(os.path.join(tmp_path, "results.md")) as f:
        assert "| worst case | certified |" in f.read()

    # The check itself (shared with the standard suite, whose end-to-end violation test is above):
    # here the suite's images, with no example surviving the attacks, so every certificate breaks.
    x, y = data.first_test_images("mnist", 50)
    with pytest.raises(certify.CertificateViolation, match="were broken by an attack"):
        certify.checked_against_attacks(run_dir.load_model(polarized_checkpoint), "m", x, y, 0.01, np.zeros(50, bool))
