"""What evaluate.py runs: one of two suites, its config from the flags given, the dataset from the models.

  "standard": the paper's attacks (`polar_tf.evaluation`, config `EvalConfig`);
  "adaptive": every attack, the worst case and the masking checks (`polar_tf.adaptive`, `AdaptiveConfig`).
evaluate.py's flags are both configs' fields (`evaluation_config.FIELDS`); a flag that only the other
suite has is refused, so that no setting given is silently left unused.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from polar_tf import adaptive, evaluation, parallel, results_md
from polar_tf.evaluation_config import AdaptiveConfig, EvalConfig, settings_config


def suite_config(suite: str, model_paths: Sequence[str], given: Mapping[str, Any], quick: bool = False,
                 allow_dataset_mismatch: bool = False) -> EvalConfig | AdaptiveConfig:
    """The config of `suite` from the flags given on the command line (`evaluation_config.settings_config`),
    on the dataset the models `model_paths` were trained on unless `given` names one
    (`evaluation.resolve_dataset`; `allow_dataset_mismatch`: evaluate on the dataset given even
    where a model was trained on another).

    Raises:
      ValueError: a flag of the other suite is given, a value is out of range, or the datasets disagree.
    """
    dataset = evaluation.resolve_dataset(model_paths, given.get("dataset"), allow_dataset_mismatch)
    return settings_config(suite, given, quick, dataset)


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
