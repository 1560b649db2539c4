"""The adaptive suite's sanity checks that flag gradient masking (Carlini et al. 2019, section 5):
pure functions of per-example results, each returning {"name", "status": "pass" or "warn", numbers}.

  - eps_to_half: the worst case of the APGD attacks falls to about 0 (<= 5%) as eps grows to 0.5
    (on the first `check_examples` examples);
  - more_budget: twice APGD-CE's iterations, or twice its restarts, fools no more examples than
    noise allows (on the first `check_examples` examples);
  - gradient_free_vs_gradient: the Square attack does not beat the best gradient attack, compared
    example by example (the examples only Square fools against those only that attack fools, by
    more than `paired_noise_level`), nor keep fooling more examples with doubled queries (if it
    does, the gradients are masked);
  - iterative_vs_single_step: the best iterative attack is at least as strong as FGSM;
  - noise_vs_attacks: random noise is weaker than every white-box attack.
"Noise allows" is two standard errors of the difference of the two accuracies plus one example.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

ZERO_ACCURACY = 0.05  # "about 0" for the eps_to_half check


def worst_case(clean_correct: np.ndarray, correct_under: dict[str, np.ndarray]) -> np.ndarray:
    """Per example: robust only if classified correctly clean and under every attack."""
    robust = np.asarray(clean_correct, bool).copy()
    for correct in correct_under.values():
        robust &= np.asarray(correct, bool)
    return robust


def noise_level(a: float, b: float, n: int) -> float:
    """How far two accuracies on the same n examples may differ by chance: 2 standard errors + 1/n."""
    return 2.0 * math.sqrt((a * (1 - a) + b * (1 - b)) / max(n, 1)) + 1.0 / max(n, 1)


def _check(name: str, ok: bool, **numbers) -> dict[str, Any]:
    return {"name": name, "status": "pass" if ok else "warn", **numbers}


def paired_noise_level(only_a: int, only_b: int) -> float:
    """How far apart the counts of examples that only attack A and only attack B fool (of the same
    examples) may fall by chance: two standard errors of their difference under McNemar's null
    (each such example equally likely either way), plus one example."""
    return 2.0 * math.sqrt(only_a + only_b) + 1.0


def check_eps_to_half(accuracy_by_eps: dict[float, float], n: int) -> dict[str, Any]:
    """Accuracy under the strongest attacks must fall to about 0 as eps grows to 0.5."""
    curve = {float(e): float(a) for e, a in sorted(accuracy_by_eps.items())}
    at_half = curve[max(curve)]
    return _check("eps_to_half", at_half <= ZERO_ACCURACY, accuracy_by_eps=curve, threshold=ZERO_ACCURACY, examples=n)


def check_more_budget(base: float, doubled: dict[str, float], n: int) -> dict[str, Any]:
    """A doubled budget must not lower the accuracy by more than noise."""
    gains = {k: base - v for k, v in doubled.items()}
    ok = all(gains[k] <= noise_level(base, doubled[k], n) for k in doubled)
    return _check("more_budget", ok, base_accuracy=base, doubled_accuracy=dict(doubled), examples=n,
                  noise_level=max(noise_level(base, v, n) for v in doubled.values()))


def check_gradient_free(correct_square: np.ndarray, correct_gradient: dict[str, np.ndarray],
                        escalation: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """The gradient-free attack must not beat the best gradient attack on the same examples, nor
    keep fooling more examples when given more queries (`escalation`, see `adaptive.evaluate_model`)."""
    n = len(correct_square)
    accuracies = {k: float(np.mean(v)) for k, v in correct_gradient.items()}
    best = min(accuracies, key=accuracies.get)
    square_accuracy = float(np.mean(correct_square))
    only_square = int(np.sum(~correct_square & worst_case(np.ones(n, bool), correct_gradient)))
    # Paired on the same examples: those only Square fools against those only the best gradient
    # attack fools (McNemar's test at about two standard errors, plus one example).
    square_not_best = int(np.sum(~correct_square & correct_gradient[best]))
    best_not_square = int(np.sum(correct_square & ~correct_gradient[best]))
    stronger = square_not_best - best_not_square > paired_noise_level(square_not_best, best_not_square)
    gaining = any(r["newly_fooled"] > 0 for r in escalation)
    verdict = None
    if stronger or gaining:
        verdict = "gradients are masked: " + "; ".join(
            ([f"the gradient-free attack is stronger ({only_square} examples fooled only by it)"] if stronger else [])
            + ([f"it kept gaining with more queries ({', '.join(str(r['newly_fooled']) for r in escalation)} "
                f"more examples fooled at {', '.join(str(r['queries']) for r in escalation)} queries)"] if gaining else []))
    return _check("gradient_free_vs_gradient", not (stronger or gaining), square_accuracy=square_accuracy,
                  best_gradient_attack=best, best_gradient_accuracy=accuracies[best], fooled_only_by_square=only_square,
                  fooled_by_square_not_best=square_not_best, fooled_by_best_not_square=best_not_square,
                  more_queries=list(escalation), examples=n, verdict=verdict)


def earlier_rule(check: dict[str, Any]) -> bool:
    """Whether a stored check is the gradient-free one as an earlier version of the suite wrote it,
    before the paired comparison with the best gradient attack: its verdict is that rule's."""
    return check["name"] == "gradient_free_vs_gradient" and "fooled_by_square_not_best" not in check


def check_iterative(single_step: dict[str, float], iterative: dict[str, float], n: int) -> dict[str, Any]:
    """The best iterative attack must be at least as strong as the single-step one."""
    best = min(iterative, key=iterative.get)
    fgsm = min(single_step.values())
    ok = iterative[best] <= fgsm + noise_level(fgsm, iterative[best], n)
    return _check("iterative_vs_single_step", ok, single_step_accuracy=fgsm, best_iterative_attack=best,
                  best_iterative_accuracy=iterative[best], examples=n)


def check_noise(noise: float, attack_accuracies: dict[str, float], n: int) -> dict[str, Any]:
    """Random noise of the same eps must be weaker than every white-box attack."""
    weakest = max(attack_accuracies, key=attack_accuracies.get)
    ok = all(a < noise - noise_level(noise, a, n) for a in attack_accuracies.values())
    return _check("noise_vs_attacks", ok, noise_accuracy=noise, weakest_attack=weakest,
                  weakest_attack_accuracy=attack_accuracies[weakest], examples=n)
