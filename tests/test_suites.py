"""Tests of polar_tf.suites: the config of each suite from the flags given, and the dataset from the models."""

import os

import pytest

from polar_tf import evaluation_config, suites

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flags_of_the_other_suite_are_refused_and_quick_fills_only_what_is_not_given():
    with pytest.raises(ValueError, match="--pgd_steps do not apply to --suite=standard"):
        suites.suite_config("standard", [], {"dataset": "mnist", "pgd_steps": 3})
    config = suites.suite_config("adaptive", [], {"dataset": "mnist", "pgd_restarts": 5}, quick=True)
    assert (config.pgd_restarts, config.pgd_steps, config.num_examples) == (5, 20, 100)


def test_the_dataset_is_the_models_unless_given():
    shipped = os.path.join(ROOT, "pretrained", "fashion_mnist_polarized.keras")
    for suite in evaluation_config.SUITES:
        config = suites.suite_config(suite, [shipped], {})
        assert (type(config), config.dataset, config.eps) == (evaluation_config.SUITES[suite], "fashion_mnist", 0.1)
    with pytest.raises(ValueError, match="trained on fashion_mnist, not mnist"):
        suites.suite_config("standard", [shipped], {"dataset": "mnist"})
    assert suites.suite_config("standard", [shipped], {"dataset": "mnist"}, allow_dataset_mismatch=True).dataset == "mnist"
