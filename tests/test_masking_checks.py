"""Tests of polar_tf.masking_checks: the worst case and the verdicts of the checks, on hand-built numbers."""

import numpy as np
import pytest

from polar_tf import masking_checks


def test_worst_case_is_exact():
    clean = np.array([1, 1, 1, 1, 0], bool)
    under = {"a": np.array([1, 0, 1, 1, 1], bool), "b": np.array([1, 1, 0, 1, 1], bool),
             "c": np.array([1, 1, 1, 1, 1], bool)}
    np.testing.assert_array_equal(masking_checks.worst_case(clean, under), [1, 0, 0, 1, 0])
    np.testing.assert_array_equal(masking_checks.worst_case(clean, {}), clean)


def test_check_verdicts_on_hand_built_numbers():
    assert masking_checks.check_eps_to_half({0.3: 0.7, 0.5: 0.0}, 1000)["status"] == "pass"
    assert masking_checks.check_eps_to_half({0.3: 0.7, 0.5: 0.4}, 1000)["status"] == "warn"
    assert masking_checks.check_more_budget(0.5, {"x2": 0.49}, 1000)["status"] == "pass"
    assert masking_checks.check_more_budget(0.5, {"x2": 0.3}, 1000)["status"] == "warn"
    square_correct = np.array([0] * 50 + [1] * 50, bool)
    gradient = {"pgd": np.array([1] * 100, bool)}
    check = masking_checks.check_gradient_free(square_correct, gradient)
    assert check["status"] == "warn" and check["fooled_only_by_square"] == 50 and "masked" in check["verdict"]
    assert masking_checks.check_gradient_free(gradient["pgd"], {"pgd": square_correct})["status"] == "pass"
    # Compared example by example: Square fools 13 examples the best gradient attack leaves and
    # misses 1 it fools (accuracies 0.33 and 0.39 of 200). Two standard errors of two unpaired
    # accuracies at 200 examples (10.1 points) would hide this; the paired margin is
    # 2 * sqrt(13 + 1) + 1 = 8.48 examples, and 13 - 1 = 12 exceeds it.
    best = np.array([1] * 78 + [0] * 122, bool)
    square = best.copy()
    square[:13] = False  # fooled by Square only
    square[78] = True  # fooled by the gradient attack only
    assert (square.mean(), best.mean()) == (0.33, 0.39)
    check = masking_checks.check_gradient_free(square, {"apgd-t": best, "pgd": np.ones(200, bool)})
    assert check["status"] == "warn" and (check["fooled_by_square_not_best"], check["fooled_by_best_not_square"]) == (13, 1)
    assert masking_checks.paired_noise_level(13, 1) == pytest.approx(2 * np.sqrt(14) + 1)
    # The boundary: 5 examples against none stay within 2 * sqrt(5) + 1 = 5.47; 6 exceed 2 * sqrt(6) + 1 = 5.90.
    for fooled_only_by_square, status in ((5, "pass"), (6, "warn")):
        square = best.copy()
        square[:fooled_only_by_square] = False
        assert masking_checks.check_gradient_free(square, {"apgd-t": best})["status"] == status
    # Square no stronger overall, but more queries kept fooling more examples: masked all the same.
    rounds = [{"queries": 600, "attacked": 50, "newly_fooled": 3}, {"queries": 1200, "attacked": 47, "newly_fooled": 0}]
    check = masking_checks.check_gradient_free(gradient["pgd"], {"pgd": square_correct}, rounds)
    assert check["status"] == "warn" and "3, 0 more examples fooled at 600, 1200 queries" in check["verdict"]
    assert masking_checks.check_gradient_free(gradient["pgd"], {"pgd": square_correct}, rounds[1:])["status"] == "pass"
    assert masking_checks.check_iterative({"fgsm": 0.2}, {"pgd": 0.6}, 1000)["status"] == "warn"
    assert masking_checks.check_noise(0.9, {"pgd": 0.1, "fgsm": 0.5}, 1000)["status"] == "pass"
    assert masking_checks.check_noise(0.9, {"pgd": 0.1, "fgsm": 0.9}, 1000)["status"] == "warn"


def test_a_gradient_free_check_written_before_the_paired_rule_is_told_apart():
    current = masking_checks.check_gradient_free(np.ones(10, bool), {"pgd": np.ones(10, bool)})
    assert not masking_checks.earlier_rule(current)
    # As an earlier suite stored it: the unpaired counts only (results/reproduction/*_adaptive).
    stored = {"name": "gradient_free_vs_gradient", "status": "pass", "square_accuracy": 0.33,
              "best_gradient_accuracy": 0.39, "fooled_only_by_square": 13, "examples": 200}
    assert masking_checks.earlier_rule(stored)
    assert not masking_checks.earlier_rule(masking_checks.check_noise(0.9, {"pgd": 0.1}, 1000))
