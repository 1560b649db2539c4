"""What evaluate.py runs: one of two suites, its config from the flags given, the dataset from the models.

  "standard": the paper's attacks (`polar_tf.evaluation`, config `EvalConfig`);
  "adaptive": every attack, the worst case and the masking checks (`polar_tf.adaptive`, `AdaptiveConfig`).
evaluate.py's flags are both configs' fields (`evaluation_config.FIELDS`); a flag that only the other
suite has is refused, so that no setting given is silently left unused.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from polar_tf import adaptive, cli, evaluation, parallel, results_md
from polar_tf.evaluation_config import QUICK, SUITES, AdaptiveConfig, EvalConfig

WHY_NOT = {"adaptive": "it runs every attack; its PGD takes --pgd_steps and --pgd_restarts",
           "standard": "they are the adaptive suite's settings"}


def suite_config(suite: str, model_paths: Sequence[str], given: Mapping[str, Any], quick: bool = False,
                 allow_dataset_mismatch: bool = False) -> EvalConfig | AdaptiveConfig:
    """The config of `suite` from the flags given on the command line.

    Args:
      suite: "standard" or "adaptive".
      model_paths: the models to evaluate; the dataset is the one they were trained on unless
        `given` names one (`evaluation.resolve_dataset`).
      given: {flag: value} of the setting flags on the command line (raw flag values: lists, text).
      quick: fill the settings not given from QUICK[suite] (a one-minute try, not the protocol).
      allow_dataset_mismatch: evaluate on the dataset given even where a model was trained on another.

    Raises:
      ValueError: a flag of the other suite is given, or a value is out of range.
    """
    cls = SUITES[suite]
    own = {field.name for field in dataclasses.fields(cls)}
    foreign = [f"--{name}" for name in given if name not in own]
    if foreign:
        raise ValueError(f"{', '.join(foreign)} do not apply to --suite={suite} ({WHY_NOT[suite]})")
    dataset = evaluation.resolve_dataset(model_paths, given.get("dataset"), allow_dataset_mismatch)
    return cli.config_from_flags(cls, {**(QUICK[suite] if quick else {}), **given, "dataset": dataset})


def run(suite: str, model_paths: Sequence[str], given: Mapping[str, Any], output_dir: str | None = None,
        data_dir: str | None = None, command: str | None = None, quick: bool = False,
        allow_dataset_mismatch: bool = False, distribute: str = "none") -> dict[str, Any]:
    """evaluate.py: runs `suite` (see `suite_config`) on the models, writes its results into
    output_dir (see `evaluation.evaluate`, `adaptive.evaluate_adaptive`), prints its results.md.

    `distribute` ("data_parallel": the JAX backend's every device) is in force from before the
    models load, so that their weights go to every device. Returns the content of results.json."""
    with parallel.scope(distribute):
        config = suite_config(suite, model_paths, given, quick, allow_dataset_mismatch)
        if suite == "adaptive":
            results = adaptive.evaluate_adaptive(model_paths, config, output_dir, data_dir, command=command)
        else:
            results = evaluation.evaluate(model_paths, config, output_dir, data_dir, command=command)
    markdown = results_md.adaptive_markdown if suite == "adaptive" else results_md.standard_markdown
    print(markdown(results), end="")
    print(f"\nResults {'in' if suite == 'adaptive' else 'and plots in'} {results['output_dir']}")
    return results
