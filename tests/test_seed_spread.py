"""The seed spread: its settings, its units in polar_tf.gpu_reproduce (order, what counts as done),
and its report's numbers, from small hand-made files."""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import pytest
from absl import flags

from polar_tf import cli, gpu_reproduce, run_dir, seed_spread
from polar_tf.config import Config
from polar_tf.reproduction_protocol import Protocol
from polar_tf.results_dir import LEGACY_CONFIG_VALUES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PROTOCOL = Protocol(epochs_per_stage=1, train_examples=128, adv_epochs_per_stage=1, adv_steps=1, num_examples=20,
                         steps=2, restarts=1, sweep_examples=20, adaptive_examples=20, apgd_iterations=2,
                         square_queries=4, steps_per_execution=1)
TINY_SPREAD = seed_spread.Spread(spread_jumps=(0.2, 0.3), spread_seeds=(1, 2), spread_dataset="mnist",
                                 spread_examples=10, spread_margin_examples=8, spread_adaptive_examples=6,
                                 spread_transfer_from="pretrained/mnist_baseline.keras")


def test_at_the_paper_protocol_a_run_is_evaluated_as_the_seed_0_runs_were():
    configs = seed_spread.evaluation_configs(seed_spread.Spread(), Protocol())
    for kind, folder in zip(seed_spread.EVALUATIONS, ("c03_faithful", "c03_faithful_bim_margin", "c03_faithful_adaptive")):
        with open(os.path.join(ROOT, "results", "fashion_mnist_front_end", folder, "results.json")) as f:
            recorded = json.load(f)["config"]
        wanted = json.loads(json.dumps(dataclasses.asdict(configs[kind])))
        legacy = {k: v for k, v in LEGACY_CONFIG_VALUES.items() if k in wanted}  # settings added since
        assert {**legacy, **recorded} == wanted, kind
    run = seed_spread.SpreadRun("fashion_mnist", 0.2, 3)
    assert seed_spread.training_config(run, Protocol()) == Config(dataset="fashion_mnist", jump=0.2, seed=3)


def test_the_flags_are_the_fields_and_bad_values_are_refused():
    values = flags.FlagValues()
    cli.define_config_flags(seed_spread.Spread, flag_values=values)
    assert {f.name for f in dataclasses.fields(seed_spread.Spread)} <= set(values)
    values(["prog", "--spread_jumps=0.2,0.3", "--spread_seeds=1,2,3"])
    spread = cli.config_from_flags(seed_spread.Spread, values)
    assert spread.spread_jumps == (0.2, 0.3) and spread.spread_seeds == (1, 2, 3)
    assert [r.name for r in spread.runs()] == [f"spread_c{c}_seed{s}" for c in ("0.2", "0.3") for s in (1, 2, 3)]
    assert spread.transfer_from == "pretrained/reduced/fashion_mnist_baseline.keras"
    assert seed_spread.Spread().runs() == []  # none by default
    with pytest.raises(ValueError, match="spread_jumps and spread_seeds go together"):
        seed_spread.Spread(spread_jumps=(0.3,))
    with pytest.raises(ValueError, match=r"spread_jumps must be different numbers in \(0, 1\). Received: 0.3,1.5"):
        seed_spread.Spread(spread_jumps=(0.3, 1.5), spread_seeds=(1,))
    with pytest.raises(ValueError, match="spread_seeds must be integers separated by commas. Received: '1,x'"):
        cli.config_from_flags(seed_spread.Spread, {"spread_jumps": "0.3", "spread_seeds": "1,x"})


def _settings(evaluations=("table",)):
    return gpu_reproduce.Settings(("mnist",), TINY_PROTOCOL, "runs/full_protocol", "results/full_protocol",
                                  "pretrained/full_protocol", None, evaluations, TINY_SPREAD)


def test_spread_units_start_after_the_protocols_trainings_and_each_evaluation_waits_for_its_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    units = gpu_reproduce.plan(_settings())
    spread = ["spread_c0.2_seed1", "spread_c0.2_seed2", "spread_c0.3_seed1", "spread_c0.3_seed2"]
    assert [u.id for u in units] == ["train mnist adversarial", "train mnist polarized", "train mnist baseline",
                                     *(f"train mnist {name}" for name in spread), "evaluate mnist table",
                                     *(f"evaluate mnist {name}" for name in spread)]
    assert [u.id for u in gpu_reproduce.ready(units)] == [u.id for u in units[:7]]
    by_id = {u.id: u for u in units}
    by_id["train mnist spread_c0.3_seed1"].status = "done"
    assert [u.id for u in gpu_reproduce.ready(units)][-1] == "evaluate mnist spread_c0.3_seed1"
    assert "evaluate mnist table" not in [u.id for u in gpu_reproduce.ready(units)]
    assert not any(u.done_before for u in units)


def _ship(folders: seed_spread.RunFolders, config: Config, metrics: list[dict]) -> str:
    """A shipped model as ship_pretrained leaves it (the .keras is not read by what is tested here)."""
    stem = run_dir.shipped_stem(folders.pretrained_dir, config)
    run_dir.write_json(stem + ".config.json", config.to_dict())
    run_dir.write_text(stem + ".metrics.jsonl", "".join(json.dumps(r) + "\n" for r in metrics))
    run_dir.write_text(stem + ".keras", "a model")
    return stem + ".keras"


def _evaluated(folder: str, config, model: str, **record) -> None:
    """A results.json of `config` on the one model `model`, as evaluate.py writes it (the fields read)."""
    run_dir.write_json(os.path.join(folder, "results.json"), {
        "config": json.loads(json.dumps(dataclasses.asdict(config))), "output_dir": os.path.abspath(folder),
        "num_examples": config.num_examples, "eps": 0.3, "models": [{"path": os.path.abspath(model), **record}]})


def test_a_spread_run_trained_or_evaluated_before_is_done_and_its_run_folder_is_left_out_of_the_archive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = _settings(evaluations=())
    run = seed_spread.SpreadRun("mnist", 0.3, 2)
    folders = seed_spread.run_folders(run, settings.root, settings.pretrained_dir, settings.results_dir)
    assert folders == seed_spread.RunFolders("runs/full_protocol/mnist_spread_c0.3_seed2",
                                             "pretrained/full_protocol/mnist_spread_c0.3_seed2",
                                             "results/full_protocol/mnist_spread_c0.3_seed2")
    config = seed_spread.training_config(run, TINY_PROTOCOL)
    assert (config.jump, config.seed, config.epochs_per_stage, config.train_examples) == (0.3, 2, 1, 128)
    model = _ship(folders, config.replace(seed=3), [{"epoch": 0}])  # another seed's model: not this run's
    assert not any(u.done_before for u in gpu_reproduce.plan(settings))
    _ship(folders, config, [{"epoch": e} for e in range(3)])
    assert model == "pretrained/full_protocol/mnist_spread_c0.3_seed2/mnist_polarized.keras"
    done = {u.id for u in gpu_reproduce.plan(settings) if u.done_before}
    assert done == {"train mnist spread_c0.3_seed2"}
    train = next(u for u in gpu_reproduce.plan(settings) if u.id == "train mnist spread_c0.3_seed2")
    assert gpu_reproduce._workdir(settings, train) == folders.workdir  # what packing leaves out once finished

    configs = seed_spread.evaluation_configs(TINY_SPREAD, TINY_PROTOCOL)
    assert (configs["standard"].num_examples, configs["standard"].restarts, configs["bim_margin"].loss,
            configs["adaptive"].num_examples, configs["adaptive"].pgd_restarts, configs["adaptive"].apgd_iterations,
            configs["adaptive"].transfer_from) == (10, 2, "cw", 6, 2, 2, "pretrained/mnist_baseline.keras")
    for kind in ("standard", "bim_margin"):
        _evaluated(os.path.join(folders.results_dir, kind), configs[kind], model)
    _evaluated(os.path.join(folders.results_dir, "adaptive"), dataclasses.replace(configs["adaptive"], pgd_steps=3), model)
    units = gpu_reproduce.plan(settings)
    assert {u.id for u in units if u.done_before} == {"train mnist spread_c0.3_seed2"}  # the adaptive one differs
    evaluation = next(u for u in units if u.id == "evaluate mnist spread_c0.3_seed2")
    assert len(gpu_reproduce._records(settings, evaluation)) == 3 and gpu_reproduce._models(settings, evaluation) == 3
    _evaluated(os.path.join(folders.results_dir, "adaptive"), configs["adaptive"], model)
    assert {u.id for u in gpu_reproduce.plan(settings) if u.done_before} == {"train mnist spread_c0.3_seed2",
                                                                              "evaluate mnist spread_c0.3_seed2"}


def _fake_run(root, name: str, jump: float, seed: int, concentration: list[float], near: float, accuracies: dict,
              shipped: bool = True, device: str | None = None):
    """A run with 4 epochs recorded, whose concentration after 20, 30, 40 epochs and at the end
    (epochs 19, 29, 39 and 44) is `concentration`, and its three evaluations."""
    config = Config(dataset="fashion_mnist", jump=jump, seed=seed, epochs_per_stage=15)
    # train.py records the three front-end statistics together.
    metrics = [{"epoch": e, "filter_concentration": c, "filter_l1_mean": 4.0, "frac_within_eps_of_jump": near / 2}
               for e, c in zip((19, 29, 39), concentration)]
    metrics.append({"epoch": 44, "filter_concentration": concentration[-1], "filter_l1_mean": 4.0,
                    "frac_within_eps_of_jump": near})
    if device:
        for record in metrics:
            record.update(backend="jax", device=device)
    if shipped:
        model = _ship(seed_spread.RunFolders("", str(root / name), ""), config, metrics)
    else:
        model = str(root / name)
        run_dir.write_config(model, config)
        run_dir.write_text(os.path.join(model, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in metrics))
        run_dir.write_text(os.path.join(model, "stage3.keras"), "a model")
    folders = {kind: str(root / f"{name}_{kind}") for kind in seed_spread.EVALUATIONS}
    a = accuracies
    for kind, examples, record in (
            ("standard", 100, {"clean_accuracy": a["clean"], "accuracy": {"fgsm": a["fgsm"], "bim": a["bim"], "pgd": a["pgd"]}}),
            ("bim_margin", 50, {"clean_accuracy": 0.0, "accuracy": {"bim": a["bim_margin"]}}),
            ("adaptive", 20, {"worst_case_accuracy": a["adaptive"],
                              "attacks": {"square": {"attack": "square", "accuracy": a["square"] + 0.1},
                                          "square-x4": {"attack": "square", "accuracy": a["square"]},
                                          "square-x2": {"attack": "square", "accuracy": a["square"] + 0.05},
                                          "apgd-ce": {"attack": "apgd-ce", "accuracy": 0.0}}})):
        run_dir.write_json(os.path.join(folders[kind], "results.json"),
                           {"num_examples": examples, "eps": 0.1, "models": [{"path": model, **record}]})
    return model, folders


def test_the_report_reads_each_run_and_gives_the_mean_and_range_per_jump(tmp_path):
    runs = [
        _fake_run(tmp_path, "a", 0.2, 1, [0.2, 0.4, 0.5], 0.3,
                  dict(clean=0.9, fgsm=0.5, bim=0.3, pgd=0.25, bim_margin=0.2, adaptive=0.1, square=0.15),
                  device="NVIDIA H200 (gpu)"),
        _fake_run(tmp_path, "b", 0.2, 2, [0.1, 0.1, 0.1], 0.1,
                  dict(clean=0.8, fgsm=0.6, bim=0.5, pgd=0.45, bim_margin=0.4, adaptive=0.3, square=0.35), shipped=False),
        _fake_run(tmp_path, "c", 0.3, 0, [0.3, 0.3, 0.3], 0.0,
                  dict(clean=0.7, fgsm=0.6, bim=0.5, pgd=0.4, bim_margin=0.3, adaptive=0.2, square=0.25)),
    ]
    result = seed_spread.spread_report(runs, str(tmp_path / "report"), command="the command")
    first, second, _ = result["runs"]
    assert (first["jump"], first["seed"], first["trained_on"], second["trained_on"]) == (0.2, 1, "jax on NVIDIA H200 (gpu)", None)
    assert [first[k] for k in seed_spread.FRONT_END] == [0.2, 0.4, 0.5, 0.5, 0.3]
    assert (first["clean"], first["pgd"], first["bim_margin"], first["adaptive"], first["square"]) == (0.9, 0.25, 0.2, 0.1, 0.15)
    c02, c03 = result["jumps"]
    assert (c02["jump"], c02["seeds"], c03["seeds"]) == (0.2, [1, 2], [0])
    assert c02["mean"]["concentration_after_30"] == pytest.approx(0.25) and c02["range"]["concentration_after_30"] == [0.1, 0.4]
    assert c02["mean"]["pgd"] == pytest.approx(0.35) and c02["range"]["pgd"] == [0.25, 0.45]
    assert c02["mean"]["square"] == pytest.approx(0.25) and c02["range"]["square"] == [0.15, 0.35]
    assert c03["mean"]["clean"] == 0.7 and c03["range"]["clean"] == [0.7, 0.7]
    with open(tmp_path / "report" / "spread.json") as f:
        assert json.load(f) == json.loads(json.dumps(result))
    markdown = (tmp_path / "report" / "spread.md").read_text()
    assert "on the first 100 test images, BIM with the margin loss on the first 50" in markdown
    assert ("| fashion_mnist | 0.2 | 1 | jax on NVIDIA H200 (gpu) | 0.20 | 0.40 | 0.50 | 0.50 | 0.30 | 90.0 | 50.0 | 30.0 "
            "| 25.0 | 20.0 | 10.0 | 15.0 |") in markdown
    assert "| fashion_mnist | 0.2 | 2 | not recorded | 0.10 |" in markdown
    assert ("| fashion_mnist | 0.2 | 1, 2 | 0.15 [0.10, 0.20] | 0.25 [0.10, 0.40] | 0.30 [0.10, 0.50] | 0.30 [0.10, 0.50] "
            "| 0.20 [0.10, 0.30] | 85.0 [80.0, 90.0] |") in markdown


def test_an_evaluation_of_another_model_or_a_missing_folder_is_refused(tmp_path):
    model, folders = _fake_run(tmp_path, "a", 0.2, 1, [0.2, 0.4, 0.5], 0.3,
                               dict(clean=0.9, fgsm=0.5, bim=0.3, pgd=0.25, bim_margin=0.2, adaptive=0.1, square=0.15))
    path = os.path.join(folders["standard"], "results.json")
    with open(path) as f:
        results = json.load(f)
    results["models"][0]["sha256"] = "0" * 64
    run_dir.write_json(path, results)
    with pytest.raises(ValueError, match="is the evaluation of another model than"):
        seed_spread.run_row(model, folders)
    with pytest.raises(ValueError, match=r"--run takes a model and its 3 evaluation folders"):
        seed_spread.parse_run(f"{model},{folders['standard']}")
    with pytest.raises(ValueError, match="does not exist: --from_reproduction takes the results folder"):
        seed_spread.reproduction_runs(str(tmp_path / "nothing"))


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="runs its own process: once, in the JAX pass (quicker start)")
def test_a_missing_evaluation_folder_is_one_line_and_nothing_is_written(tmp_path):
    model, folders = _fake_run(tmp_path, "a", 0.2, 1, [0.2, 0.4, 0.5], 0.3,
                               dict(clean=0.9, fgsm=0.5, bim=0.3, pgd=0.25, bim_margin=0.2, adaptive=0.1, square=0.15))
    missing = str(tmp_path / "missing")
    done = subprocess.run([sys.executable, "-m", "polar_tf.seed_spread", f"--output_dir={tmp_path / 'out'}",
                           f"--run={model},{folders['standard']},{missing},{folders['adaptive']}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    assert "Traceback" not in done.stderr  # (above it, what TensorFlow logs as it loads, e.g. on a machine without a GPU)
    assert done.stderr.splitlines()[-1] == (f"polar_tf.seed_spread: error: {missing}/results.json does not exist: "
                                            "each run needs its evaluation folders (standard, bim_margin, adaptive)")
    assert not (tmp_path / "out").exists()


def test_a_reproductions_spread_is_found_from_its_results_folder(tmp_path, monkeypatch):
    from polar_tf import reproduction_protocol

    monkeypatch.chdir(tmp_path)
    reproduction_protocol.write_protocol_record("results/full_protocol", TINY_PROTOCOL, "runs/full_protocol",
                                                "pretrained/full_protocol")
    finished, half = (seed_spread.run_folders(seed_spread.SpreadRun("fashion_mnist", 0.3, s), "runs/full_protocol",
                                              "pretrained/full_protocol", "results/full_protocol") for s in (1, 2))
    for folders, kinds in ((finished, seed_spread.EVALUATIONS), (half, ("standard",))):
        _ship(folders, Config(dataset="fashion_mnist", jump=0.3), [{"epoch": 0}])
        for kind in kinds:
            run_dir.write_json(os.path.join(folders.results_dir, kind, "results.json"), {"models": []})
    found, unfinished = seed_spread.reproduction_runs("results/full_protocol")
    assert found == [("pretrained/full_protocol/fashion_mnist_spread_c0.3_seed1/fashion_mnist_polarized.keras",
                      {kind: f"results/full_protocol/fashion_mnist_spread_c0.3_seed1/{kind}" for kind in seed_spread.EVALUATIONS})]
    assert unfinished == ["results/full_protocol/fashion_mnist_spread_c0.3_seed2"]
    # The summary counts a spread run's evaluations, not models.
    row = {"unit": "evaluate fashion_mnist spread_c0.3_seed2", "models_done": 1, "models": 3, "counted": "evaluations"}
    assert gpu_reproduce._progress(row) == "evaluate fashion_mnist spread_c0.3_seed2 (1 of 3 evaluations)"
    row.update(models_this_call=2, error=None)
    assert gpu_reproduce._figures(row) == "2 evaluations done"
    assert gpu_reproduce._figures({**row, "counted": "models"}) == "2 models evaluated"
