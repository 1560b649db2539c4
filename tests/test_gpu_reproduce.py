"""polar_tf.gpu_reproduce in a tiny mode on the CPU: two calls, the first stopped in the middle; the
second, in a fresh checkout holding only what the first one's archive carried (as the next device
call would), continues without redoing finished epochs or evaluations.

On this shared 2-core CPU the first epoch of a tiny run ends anywhere between 10 and 30 s after the
start, and the whole run between 30 and 80 s, so no fixed budget stops it in the middle every time.
The first call gets SIGTERM, which stops it exactly as its budget's end does, as soon as its first
epoch is saved; the budget's own trigger is checked by a call whose budget ends before any unit can.
"""

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time

import keras
import pytest

from polar_tf import gpu_reproduce, reproduce, reproduction_protocol, reproduction_results, run_dir, state_archive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = [sys.executable, "-m", "polar_tf.gpu_reproduce"]
# A tiny protocol: 3 epochs of 64 images, 20 test images, 2 PGD steps; the paper's table only.
TINY = ["--dataset=mnist", "--epochs_per_stage=1", "--train_examples=64", "--adv_epochs_per_stage=1", "--adv_steps=1",
        "--num_examples=20", "--steps=2", "--restarts=1", "--sweep_examples=20", "--adaptive_examples=20",
        "--apgd_iterations=2", "--square_queries=4", "--steps_per_execution=1", "--evaluations=table", "--workers=2",
        "--stop_grace_s=10", "--min_start_s=0"]
TINY_PROTOCOL = reproduction_protocol.Protocol(epochs_per_stage=1, train_examples=64, adv_epochs_per_stage=1, adv_steps=1,
                                   num_examples=20, steps=2, restarts=1, sweep_examples=20, adaptive_examples=20,
                                   apgd_iterations=2, square_queries=4, steps_per_execution=1)
MODELS = [model for model, _ in reproduction_protocol.ROWS]


def _env(data_dir, **more):
    return {**os.environ, "PYTHONPATH": ROOT, "POLAR_TF_DATA_DIR": data_dir, **more}


def _call(checkout, data_dir, *args):
    return subprocess.run([*PROGRAM, *args], cwd=checkout, env=_env(data_dir), capture_output=True, text=True, timeout=600)


def _stopped_after_first_epoch(checkout, data_dir, *args):
    """A call that gets SIGTERM once the first epoch checkpoint of any training is saved."""
    process = subprocess.Popen([*PROGRAM, *args], cwd=checkout, env=_env(data_dir), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    until = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < until:
        if glob.glob(os.path.join(checkout, "runs", "full_protocol", "*", "checkpoints", "epoch_*.keras")):
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _epochs(checkout, model) -> list[dict]:
    path = os.path.join(checkout, "runs", "full_protocol", f"mnist_{model}", "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.isfile(path) else []


def _manifest(out) -> dict:
    with open(os.path.join(out, state_archive.MANIFEST)) as f:
        return json.load(f)


def _files(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="runs its own processes: once, in the TensorFlow pass")
def test_a_call_stopped_by_its_budget_is_continued_by_the_next_without_redoing_work(tmp_path, mnist_subset_dir):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    done = _stopped_after_first_epoch(first, mnist_subset_dir, *TINY, "--device_budget=600", f"--out={tmp_path / 'out1'}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the budget's stop (SIGTERM): interrupting the workers" in done.stdout
    manifest = _manifest(tmp_path / "out1")
    status = {row["unit"]: row for row in manifest["units"]}
    assert status["evaluate mnist table"]["status"] != "done"
    assert "remaining: " in done.stdout.splitlines()[-2] and done.stdout.splitlines()[-1].startswith("import with")
    assert manifest["device"].startswith("CPU") and manifest["backend"] == "tensorflow"
    assert set(manifest["stage_seconds"]) >= {"start-up", "training", "packing"}

    # The next call's checkout has the code and, from call 1, only what the archive holds (as imported).
    state_archive.import_archive(str(tmp_path / "out1"), str(second))
    after_first = {model: _epochs(second, model) for model in MODELS}
    shipped = _files(second / "pretrained")
    finished = [m for m in MODELS if status[f"train mnist {m}"]["status"] == "done"]
    for model in finished:  # its run folder stays behind; its model came back in pretrained/
        assert not (second / "runs" / "full_protocol" / f"mnist_{model}").exists()
        assert f"full_protocol/mnist_{model}.keras" in shipped
    kept = {}  # epochs whose checkpoint came back (a stop between an epoch's metrics and its checkpoint loses it)
    for model in set(MODELS) - set(finished):  # stopped anywhere, after its last epoch too (saving, plotting, shipping)
        assert len(after_first[model]) == status[f"train mnist {model}"]["epochs_done"] <= status[f"train mnist {model}"]["epochs"]
        latest = run_dir.latest_epoch_checkpoint(str(second / "runs" / "full_protocol" / f"mnist_{model}"))
        kept[model] = 0 if latest is None else latest[0] + 1
    assert sum(kept.values()) + len(finished) > 0
    partial = second / "results" / "full_protocol" / "mnist_table" / "results.partial.json"
    table_before = json.loads(partial.read_text())["models"] if partial.exists() else []

    done = _call(second, mnist_subset_dir, *TINY, "--device_budget=400", f"--out={tmp_path / 'out2'}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["unit"]: row for row in _manifest(tmp_path / "out2")["units"]}
    assert all(row["status"] == "done" for row in rows.values()), rows
    for model in MODELS:
        row = rows[f"train mnist {model}"]
        if model in finished:
            assert row["done_before"] and row["epochs_this_call"] == 0
        else:  # resumed after the epochs call 1 completed: those are kept as they were, not trained again
            assert row["epochs_this_call"] == row["epochs"] - kept[model]
            assert _epochs(second, model)[: kept[model]] == after_first[model][: kept[model]]
    for name, content in shipped.items():  # models finished in call 1 are not copied again
        assert _files(second / "pretrained")[name] == content
    table = rows["evaluate mnist table"]  # the models call 1 finished are kept, not evaluated again
    assert table["models_this_call"] == 3 - len(table_before) and table["pgd_image_steps_per_second"] > 0
    final = json.loads((second / "results" / "full_protocol" / "mnist_table" / "results.json").read_text())
    assert final["models"][: len(table_before)] == table_before and not partial.exists()
    assert "PGD " in done.stdout and "all 4 units done" in done.stdout
    trained = any(rows[f"train mnist {model}"]["epochs_this_call"] for model in MODELS)
    assert ("training images/s" in done.stdout) == trained  # none when call 1 was stopped after every last epoch

    # What call 2 gives back unpacks into what reproduce reads: the models and an up-to-date table.
    third = tmp_path / "third"
    third.mkdir()
    imported = subprocess.run([sys.executable, "-m", "polar_tf.reproduce", f"--import_archive={tmp_path / 'out2'}"],
                              cwd=third, env=_env(mnist_subset_dir), capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.startswith("Imported runs/full_protocol, pretrained/full_protocol, results/full_protocol from")
    assert imported.stdout.splitlines()[-2] == "all 4 units done"
    assert not os.listdir(third / "runs" / "full_protocol")  # nothing left to carry
    os.chdir(third)
    try:
        paths = [reproduce.trained_model("mnist", m, TINY_PROTOCOL, "runs/full_protocol", "pretrained/full_protocol")
                 for m in MODELS]
        assert paths == [f"pretrained/full_protocol/mnist_{m}.keras" for m in MODELS]
        config = reproduction_protocol.evaluation_configs("mnist", TINY_PROTOCOL, paths)["table"]
        results = reproduction_results.finished_evaluation("results/full_protocol/mnist_table", paths, config)
        assert results is not None and len(results["models"]) == 3
        assert reproduction_protocol.read_protocol_record("results/full_protocol")[0] == TINY_PROTOCOL
        settings = gpu_reproduce.Settings(("mnist",), TINY_PROTOCOL, "runs/full_protocol", "results/full_protocol",
                                          "pretrained/full_protocol", mnist_subset_dir, ("table",))
        assert [u.status for u in gpu_reproduce.plan(settings)] == ["done"] * 4  # a third call would find nothing to do
    finally:
        os.chdir(ROOT)


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="sets its own backend: run once, in the JAX pass")
def test_on_jax_without_tensorflow_a_budget_too_short_for_any_unit_still_packs_and_exits_0(tmp_path, mnist_subset_dir):
    # The device has JAX but no TensorFlow: the program must not need it.
    code = ("import runpy, sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None; "
            "runpy.run_module('polar_tf.gpu_reproduce', run_name='__main__')")
    checkout, out = tmp_path / "checkout", tmp_path / "out"
    checkout.mkdir()

    def call(*args):
        return subprocess.run([sys.executable, "-c", code, *args], cwd=checkout, env=_env(mnist_subset_dir, KERAS_BACKEND="jax"),
                              capture_output=True, text=True, timeout=300)

    # The workers would stop 1 s after the start: before the first unit is handed out. With a seed
    # spread of one run, whose units come after the protocol's.
    spread = ["--spread_jumps=0.3", "--spread_seeds=1", "--spread_dataset=mnist",
              f"--spread_transfer_from={ROOT}/pretrained/mnist_baseline.keras"]
    done = call(*TINY, *spread, "--device_budget=11", "--stop_grace_s=0", f"--out={out}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the budget's stop: interrupting the workers" in done.stdout
    assert done.stdout.splitlines()[-2] == ("done 0 of 6 units; remaining: train mnist adversarial (0 of 3 epochs), "
                                            "train mnist polarized (0 of 3 epochs), train mnist baseline (0 of 3 epochs), "
                                            "train mnist spread_c0.3_seed1 (0 of 3 epochs), "
                                            "evaluate mnist table (0 of 3 models), "
                                            "evaluate mnist spread_c0.3_seed1 (0 of 3 evaluations)")
    manifest = state_archive.import_archive(str(out), str(tmp_path))
    assert manifest["backend"] == "jax" and manifest["protocol"] == dataclasses.asdict(TINY_PROTOCOL)
    assert reproduction_protocol.read_protocol_record(str(tmp_path / "results" / "full_protocol"))[0] == TINY_PROTOCOL
    # Only folders an archive may unpack into (tests/test_state_archive.py has the other cases).
    bad = call("--device_budget=10", "--workdir=/tmp/x")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert bad.stderr.splitlines()[-1].startswith(
        "polar_tf.gpu_reproduce: error: --workdir must be a relative folder below runs/, results/, pretrained/")
    bad = call("--plan_only", "--spread_jumps=0.3", "--spread_seeds=1", "--spread_transfer_from=pretrained/none.keras")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert bad.stderr.splitlines()[-1] == ("polar_tf.gpu_reproduce: error: the spread's adaptive suite transfers from "
                                           "pretrained/none.keras, which does not exist: pass --spread_transfer_from")


def test_a_state_of_another_protocol_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = gpu_reproduce.Settings(("mnist",), TINY_PROTOCOL, "runs/full_protocol", "results/full_protocol",
                                      "pretrained/full_protocol", None, ("table",))
    gpu_reproduce._record_protocol(settings)  # a first call records its protocol; the same one again is fine
    gpu_reproduce._record_protocol(settings)
    other = dataclasses.replace(settings, protocol=dataclasses.replace(TINY_PROTOCOL, restarts=2, steps=3))
    with pytest.raises(ValueError, match=r"results/full_protocol holds a reproduction with another protocol \(differs in "
                                         r"steps, restarts\); pass the same flags or another --results_dir"):
        gpu_reproduce._record_protocol(other)
    # The units start trainings first, the longest first, and an evaluation once its three trainings are done.
    units = gpu_reproduce.plan(dataclasses.replace(settings, evaluations=("sweep", "table", "adaptive")))
    assert [u.id for u in units] == ["train mnist adversarial", "train mnist polarized", "train mnist baseline",
                                     "evaluate mnist adaptive", "evaluate mnist table", "evaluate mnist sweep"]
    assert [u.id for u in gpu_reproduce.ready(units)] == [u.id for u in units[:3]]
    for unit in units[:2]:
        unit.status = "done"
    assert [u.id for u in gpu_reproduce.ready(units)] == ["train mnist baseline"]
    units[2].status = "done"
    assert [u.id for u in gpu_reproduce.ready(units)] == [u.id for u in units[3:]]


def test_the_plan_says_what_an_unfinished_evaluation_kept(tmp_path):
    settings = gpu_reproduce.Settings(("mnist",), TINY_PROTOCOL, str(tmp_path / "runs"), str(tmp_path / "results"),
                                      str(tmp_path / "pretrained"), None, ("adaptive",))
    unit = gpu_reproduce.Unit("evaluate", "mnist", "adaptive")
    assert gpu_reproduce._kept(settings, unit) == ""
    folder = reproduction_protocol.evaluation_dir(settings.results_dir, "mnist", "adaptive")
    partial = {"eps": 0.3, "models": [{"label": "baseline"}], "interrupted": True,
               "unfinished_model": {"label": "adversarial", "attacks": {}, "correct": {"fgsm": "", "pgd": ""}}}
    run_dir.write_json(os.path.join(folder, "results.partial.json"), partial)
    assert gpu_reproduce._kept(settings, unit) == " (1 of 3 models done; 2 attacks of the next)"
    run_dir.write_json(os.path.join(folder, "results.partial.json"), {**partial, "unfinished_model": None})
    assert gpu_reproduce._kept(settings, unit) == " (1 of 3 models done)"
