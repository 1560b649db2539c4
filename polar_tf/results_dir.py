"""An evaluation's results folder: where it is, what is finished in it, and its files' writing.

A results folder holds results.json and results.md of one evaluation (either suite), and while an
interrupted one is to be resumed, results.partial.json: the models it finished, and the attacks it
finished on the model it was evaluating (the adaptive suite takes those over: `unfinished_model`,
with each attack's per-example outcome, `pack_correct`). Results written in
a checkout at another place, or on another machine (a GPU run, imported), still match: models are
compared as paths relative to the folder.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np
from absl import logging

from polar_tf import report, run_dir

PARTIAL_RESULTS = "results.partial.json"


def default_output_dir(model_path: str) -> str:
    """Where results go by default: beside a model in its training run folder; for any other model
    (a shipped one in pretrained/, a bare file), runs/evaluate/<name>, so that evaluating never
    writes into tracked folders nor over another model's results."""
    path = run_dir.resolve_model_path(model_path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    return os.path.join("runs", "evaluate", os.path.splitext(os.path.basename(path))[0])


def finished_results(output_dir: str, paths: Sequence[str], config, partial: bool = False) -> dict[str, Any] | None:
    """The results.json in `output_dir` if it holds the models `paths` under the settings `config`
    (an EvalConfig or AdaptiveConfig), else None. With `partial`, the results.partial.json of an
    interrupted run with these settings whose finished models are the first of `paths`.

    Models are compared as paths relative to the results folder, so that results written in a
    checkout at another place or on another machine (a GPU run, imported) still match."""
    path = os.path.join(output_dir, PARTIAL_RESULTS if partial else "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    if "output_dir" not in results or "config" not in results:
        return None
    here = os.path.abspath(output_dir)
    recorded, wanted = dict(results["config"]), json.loads(json.dumps(dataclasses.asdict(config)))
    for key, value in LEGACY_CONFIG_VALUES.items():  # settings added since: what earlier runs did
        if key in wanted:
            recorded.setdefault(key, value)
    if recorded.get("transfer_from") and wanted.get("transfer_from") and results.get("transfer_from_path"):
        # The adaptive suite's transfer source is a model too: compared as the models are.
        if (os.path.relpath(results["transfer_from_path"], results["output_dir"])
                != os.path.relpath(os.path.abspath(_model_file(wanted["transfer_from"])), here)):
            return None
        recorded["transfer_from"] = wanted["transfer_from"]
    if recorded != wanted:
        return None
    models = [os.path.relpath(m["path"], results["output_dir"]) for m in results["models"]]
    expected = [os.path.relpath(os.path.abspath(p), here) for p in paths]
    if models != (expected[: len(models)] if partial else expected):
        return None
    # A model replaced at the same path since is another model (records written before
    # fingerprints existed match by path alone).
    for record, path in zip(results["models"], paths):
        model_file = _model_file(path)
        if record.get("sha256") and os.path.isfile(model_file) and report.fingerprint(model_file) != record["sha256"]:
            return None
    return results


# Settings added after results files were written, with the value that reproduces what those runs
# did: EvalConfig's PGD on every image, AdaptiveConfig's suite without certificates.
LEGACY_CONFIG_VALUES = {"pgd_examples": None, "certify": False}


def _model_file(path: str) -> str:
    """A training workdir's final checkpoint, else the path itself (which may not exist here)."""
    return run_dir.resolve_model_path(path) if os.path.isdir(path) else path


def resume_partial(output_dir: str, paths: Sequence[str], config, results: dict[str, Any]) -> float:
    """Takes the finished models (and their figures) of an interrupted run with the same settings
    (its results.partial.json) into `results`; returns the seconds it spent on them (0 if none)."""
    earlier = finished_results(output_dir, paths, config, partial=True)
    if not earlier or not earlier["models"]:
        return 0.0
    results["models"] = earlier["models"]
    if "plots" in results:
        results["plots"] = earlier.get("plots", [])
    merge_environment(earlier, results)
    logging.info("Resuming %s: %d of %d models finished before", output_dir, len(earlier["models"]), len(paths))
    return float(earlier.get("total_seconds", 0.0))


def merge_environment(earlier: dict[str, Any], results: dict[str, Any]) -> None:
    """Where the models an interrupted run finished (`earlier`) ran on another backend or device
    than `results` (a run on the GPU continued on the CPU, say), `results` says both, e.g.
    "NVIDIA H200 (the first 2 models), then CPU: AMD EPYC (2 cores)", and its versions are those of
    both (this run's where they differ)."""
    for key in ("backend", "device"):
        if earlier.get(key) and earlier[key] != results[key]:
            results[key] = f"{earlier[key]} (the first {len(earlier['models'])} models), then {results[key]}"
    if earlier.get("versions") and earlier["versions"] != results["versions"]:
        results["versions"] = {**earlier["versions"], **results["versions"]}


def unfinished_model(output_dir: str, paths: Sequence[str], config) -> dict[str, Any] | None:
    """What an interrupted run with these settings (its results.partial.json) kept of the model it
    was evaluating, {"label", "path", "sha256", "attacks": {key: record}, "correct": {key: packed}},
    if that model is the next of `paths` after the ones it finished and is still the same file;
    else None. Partial results written without per-example outcomes ("correct") give None."""
    earlier = finished_results(output_dir, paths, config, partial=True)
    unfinished = (earlier or {}).get("unfinished_model")
    if not unfinished or "correct" not in unfinished or len(earlier["models"]) >= len(paths):
        return None
    path = paths[len(earlier["models"])]
    here = os.path.relpath(os.path.abspath(path), os.path.abspath(output_dir))
    if (os.path.relpath(unfinished["path"], earlier["output_dir"]) != here
            or unfinished.get("sha256") != report.fingerprint(_model_file(path))):
        return None
    return unfinished


def pack_correct(correct: np.ndarray) -> str:
    """A per-example bool array as text for a JSON file (8 examples per byte, base64)."""
    return base64.b64encode(np.packbits(np.asarray(correct, bool)).tobytes()).decode("ascii")


def unpack_correct(text: str, n: int) -> np.ndarray:
    """The bool array [n] that `pack_correct` wrote."""
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8), count=n).astype(bool)


def write_results(output_dir: str, results: dict[str, Any], markdown: str) -> None:
    """Writes results.json and results.md, and removes the partial results they supersede."""
    run_dir.write_json(os.path.join(output_dir, "results.json"), results)
    run_dir.write_text(os.path.join(output_dir, "results.md"), markdown)
    partial = os.path.join(output_dir, PARTIAL_RESULTS)
    if os.path.isfile(partial):
        os.remove(partial)


@contextlib.contextmanager
def keep_on_interrupt(output_dir: str, results: dict[str, Any], unfinished: dict[str, Any]) -> Iterator[None]:
    """On Ctrl-C in the block, writes what is finished (`results`, and the finished attacks of the
    model in progress, `unfinished`) to results.partial.json in output_dir, leaving a results.json
    of an earlier complete run as it was, and re-raises with a message naming the file."""
    try:
        yield
    except KeyboardInterrupt:
        path = os.path.join(output_dir, PARTIAL_RESULTS)
        run_dir.write_json(path, {**results, "interrupted": True, "unfinished_model": unfinished})
        raise KeyboardInterrupt(f"finished attacks kept in {path}") from None
