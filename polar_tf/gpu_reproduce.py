r"""The paper's whole table on a lent GPU within a device budget, resumable across calls.

    <prefix of ../shared/tools/gpu-prepare.sh> python3 -m polar_tf.gpu_reproduce --device_budget=450

runs `polar_tf.reproduce` at the paper's schedule and protocol (other Protocol flags make a tiny run
for tests) as units of work: the trainings (one per model of each dataset) and the evaluations of
each dataset (its adaptive suite, table, BIM-margin control and sweep). `--workers` processes share
the device, each taking the next unit whose trainings are done (trainings first, the longest first),
so several trainings, then evaluations, run at once. Each unit resumes what an earlier call left:
a training from its last completed epoch, an evaluation with the models it finished (the adaptive
suite also with the attacks finished on the model in progress: on the 10,000 test images one
model's suite can take longer than a call).

`--spread_jumps=0.2,0.3 --spread_seeds=1,2,3` (`seed_spread.Spread`'s fields; none by default) adds a
seed spread of the polarized model of `--spread_dataset`: for each jump and seed a training (the
protocol's polarized config with that jump and seed), started after the protocol's trainings, and
an evaluation unit (the standard suite, BIM with the margin loss, the adaptive suite:
`seed_spread.evaluation_configs`) that waits for that training only. Their units are named
spread_c<jump>_seed<seed>; `python -m polar_tf.seed_spread --from_reproduction=results/full_protocol`
reports them.

`--device_budget` seconds after it started, less `--stop_grace_s` and PACK_SECONDS (or at SIGTERM),
it interrupts the workers (Ctrl-C: an interrupted training keeps its completed epochs, an evaluation
its finished models and the adaptive suite its finished attacks), packs the state into `--out`
(default $OUT), prints what is done, what remains, the speed figures (training images/s, PGD
image-steps/s, wall time per stage) and the device, and exits 0 (1 if a unit failed; 130 after
Ctrl-C, having packed too). No unit starts in the last `--min_start_s` seconds before that stop.

The state, relative to the checkout, in the folders `polar_tf.reproduce` reads:
  runs/full_protocol/        trainings in progress, with their checkpoints (a finished training's
                             folder is left out of the archive: its model is in pretrained/)
  pretrained/full_protocol/  the trained models, each with its config and per-epoch metrics
  results/full_protocol/     the evaluations, the training figures and protocol.json
and for each run of a seed spread, in folders <run> = <dataset>_spread_c<jump>_seed<seed>:
  runs/full_protocol/<run>/          its training (left out of the archive once finished)
  pretrained/full_protocol/<run>/    its model <dataset>_polarized.keras, with .config.json,
                                     .metrics.jsonl and .filters.npz beside it
  results/full_protocol/<run>/       its evaluations standard/, bim_margin/, adaptive/; its figures
What it writes into --out (the device gives back 8 files of at most 16 MiB):
  reproduce_state.json               the units, speed figures, device, and the archive's parts
  reproduce_state.tar.gz.000, ...    the three folders, in parts of at most 15 MiB
  reproduce.log                      the workers' logs
Then, on the local machine, `python -m polar_tf.reproduce --import_archive=<that folder>` puts the
folders in place (`state_archive.import_archive`); the next device call carries runs/full_protocol
and continues; `python -m polar_tf.reproduce` (with --report_only: from the files alone) reports
each dataset completed at the full protocol beside the reduced run (BUILD.md).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

_STARTED = time.monotonic()  # the budget counts from here
# JAX takes 75% of the GPU's memory per process by default; the workers share one GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from polar_tf import cli, state_archive  # noqa: E402

if __name__ == "__main__":
    cli.quiet_startup()

from absl import app, flags, logging  # noqa: E402

from polar_tf import seed_spread  # noqa: E402

PROGRAM = "polar_tf.gpu_reproduce"
LOG = "reproduce.log"
MAX_PARTS = 6  # of the 8 files the device gives back: the parts, the manifest and the log
PACK_SECONDS = 10  # kept at the end of the budget for packing
LOG_TAIL_BYTES = 2**20  # of each worker's log
DEFAULT_FOLDERS = {"workdir": "runs/full_protocol", "results_dir": "results/full_protocol",
                   "pretrained_dir": "pretrained/full_protocol"}
# The order in which units start: trainings before the evaluations they gate, the longest first.
TRAIN_ORDER = ("adversarial", "polarized", "baseline")
EVALUATION_ORDER = ("adaptive", "table", "bim_margin", "sweep")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the supervisor and its workers run: `polar_tf.reproduce`'s datasets, protocol and folders."""

    datasets: tuple[str, ...]
    protocol: Any  # reproduction_protocol.Protocol
    root: str
    results_dir: str
    pretrained_dir: str
    data_dir: str | None
    evaluations: tuple[str, ...]
    spread: Any = None  # seed_spread.Spread: the seed spread trained and evaluated beside them; None: none


@dataclasses.dataclass
class Unit:
    """One unit of work: a training ("train", dataset, model) or an evaluation ("evaluate", dataset, kind);
    of a run of the seed spread, its training or its evaluations ("train"/"evaluate", dataset, run name)."""

    kind: str
    dataset: str
    name: str
    needs: tuple[str, ...] = ()
    status: str = "todo"  # todo, running, done, stopped, failed
    done_before: bool = False
    started: float | None = None
    seconds: float | None = None
    error: str | None = None

    @property
    def id(self) -> str:
        return f"{self.kind} {self.dataset} {self.name}"


# Planning: which units remain (files only).


def plan(settings: Settings) -> list[Unit]:
    """Every unit of the reproduction in the order they start, each marked done where its files are."""
    from polar_tf import reproduce, reproduction_protocol, reproduction_results

    trains, evaluations = [], []
    for dataset in settings.datasets:
        paths = {model: reproduce.trained_model(dataset, model, settings.protocol, settings.root, settings.pretrained_dir)
                 for model, _ in reproduction_protocol.ROWS}
        needs = tuple(Unit("train", dataset, model).id for model, _ in reproduction_protocol.ROWS)
        for model in TRAIN_ORDER:
            trains.append(Unit("train", dataset, model, done_before=paths[model] is not None))
        ordered = [paths[model] for model, _ in reproduction_protocol.ROWS]
        configs = reproduction_protocol.evaluation_configs(dataset, settings.protocol, ordered) if None not in ordered else {}
        for kind in EVALUATION_ORDER:
            if kind in settings.evaluations:
                done = bool(configs) and reproduction_results.finished_evaluation(
                    reproduction_protocol.evaluation_dir(settings.results_dir, dataset, kind), ordered, configs[kind]) is not None
                evaluations.append(Unit("evaluate", dataset, kind, needs, done_before=done))
    trains.sort(key=lambda u: TRAIN_ORDER.index(u.name))
    evaluations.sort(key=lambda u: EVALUATION_ORDER.index(u.name))
    spread_trains, spread_evaluations = [], []
    for run in _spread_runs(settings).values():
        path = seed_spread.trained_model(run, settings.protocol, _run_folders(settings, run))
        spread_trains.append(Unit("train", run.dataset, run.name, done_before=path is not None))
        done = seed_spread.evaluated(settings.spread, settings.protocol, path, _run_folders(settings, run))
        spread_evaluations.append(Unit("evaluate", run.dataset, run.name, (spread_trains[-1].id,), done_before=done))
    units = trains + spread_trains + evaluations + spread_evaluations
    for unit in units:
        unit.status = "done" if unit.done_before else "todo"
    return units


def _spread_runs(settings: Settings) -> dict[str, Any]:
    """{unit name: seed_spread.SpreadRun} of the seed spread's runs."""
    return {run.name: run for run in (settings.spread.runs() if settings.spread else [])}


def _run_folders(settings: Settings, run) -> Any:
    """seed_spread.RunFolders of a spread run in this reproduction's folders."""
    return seed_spread.run_folders(run, settings.root, settings.pretrained_dir, settings.results_dir)


def ready(units: list[Unit]) -> list[Unit]:
    """The units that may start now: to do, and every unit they need done."""
    done = {u.id for u in units if u.status == "done"}
    return [u for u in units if u.status == "todo" and all(n in done for n in u.needs)]


# The worker: runs the units it is sent, one line each, and answers one JSON line each.


def run_unit(unit: Unit, settings: Settings) -> None:
    from polar_tf import reproduce, reproduction_protocol

    s = settings
    if run := _spread_runs(s).get(unit.name):
        folders = _run_folders(s, run)
        if unit.kind == "train":
            seed_spread.train(run, s.protocol, folders, s.data_dir)
            return
        path = seed_spread.trained_model(run, s.protocol, folders)
        if path is None:
            raise ValueError(f"{unit.id} needs its trained model")
        seed_spread.evaluate(s.spread, s.protocol, path, folders, s.data_dir)
        return
    if unit.kind == "train":
        reproduce.train_model(unit.dataset, unit.name, s.protocol, s.root, s.data_dir, s.pretrained_dir, s.results_dir)
        return
    paths = [reproduce.trained_model(unit.dataset, model, s.protocol, s.root, s.pretrained_dir) for model, _ in reproduction_protocol.ROWS]
    if None in paths:
        raise ValueError(f"{unit.id} needs the trained models of {unit.dataset}")
    reproduce.run_evaluation(unit.name, unit.dataset, s.protocol, paths, s.results_dir, s.data_dir)


def work(settings: Settings) -> int:
    """The worker's loop: a unit id per line on stdin; a JSON line per unit on the original stdout
    (whatever else is printed goes to stderr, the log). Ctrl-C ends it, answering "stopped"."""
    interrupts = cli.Interrupts().install()  # SIGTERM saves what it finished, as Ctrl-C does
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    logging.set_verbosity(logging.INFO)
    try:
        while line := sys.stdin.readline():
            unit = Unit(*line.split())
            started = time.perf_counter()
            reply = {"unit": unit.id, "status": "done"}
            try:
                run_unit(unit, settings)
            except Exception as e:  # noqa: BLE001  (one unit's failure is reported; the others go on)
                if interrupts.was_interrupted(e):  # the interrupt, come out of a C extension as its error
                    raise KeyboardInterrupt from e
                traceback.print_exc()
                reply = {"unit": unit.id, "status": "failed", "error": cli.one_line(e)}
            channel.write(json.dumps({**reply, "seconds": time.perf_counter() - started}) + "\n")
    except KeyboardInterrupt:
        logging.info("interrupted")
        channel.write(json.dumps({"status": "stopped"}) + "\n")
        return 130
    return 0


class _Worker:
    """A worker process, and the unit it runs."""

    def __init__(self, index: int, argv: list[str], log_path: str):
        self.index, self.log_path, self.unit, self.buffer = index, log_path, None, b""
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "polar_tf.gpu_reproduce", "--worker", *argv],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)

    def send(self, unit: Unit) -> None:
        self.unit = unit
        unit.status, unit.started = "running", time.monotonic()
        try:
            self.process.stdin.write((unit.id + "\n").encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # it has exited: its output ends, and `_handle` says so

    def finish(self, status: str, error: str | None = None) -> None:
        unit, self.unit = self.unit, None
        unit.status, unit.error, unit.seconds = status, error, time.monotonic() - unit.started
        _say(f"{status} {unit.id} after {unit.seconds:.0f} s" + (f": {error}" if error else ""))

    def read(self) -> list[dict] | None:
        """The replies that arrived; None at the end of its output (it exited)."""
        chunk = os.read(self.process.stdout.fileno(), 65536)
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def close_input(self) -> None:
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass


# The supervisor.


def supervise(settings: Settings, argv: list[str], budget: float, out: str, workers: int, grace: float,
              min_start: float) -> int:
    """Runs the units that remain on `workers` worker processes (given `argv`) until all are done or
    the budget's stop comes, then packs the state into `out`, writes the manifest and log there and
    prints the summary. Returns the exit status: 0, 1 if a unit failed, 130 if interrupted."""
    from polar_tf import backend

    stop_at = _STARTED + budget - grace - PACK_SECONDS
    _record_protocol(settings)
    units = plan(settings)
    before = {u.id: _records(settings, u) for u in units}
    device, backend_name = backend.device_description(), backend.name()
    _say(f"{sum(u.done_before for u in units)} of {len(units)} units done before; device {device}, backend "
         f"{backend_name}; the workers stop at {stop_at - _STARTED:.0f} s")
    logs = tempfile.mkdtemp(prefix="gpu_reproduce_logs.")
    pool = [_Worker(i, argv, os.path.join(logs, f"worker{i}.log"))
            for i in range(min(workers, sum(u.status == "todo" for u in units)))]
    selector = selectors.DefaultSelector()
    for worker in pool:
        selector.register(worker.process.stdout, selectors.EVENT_READ, worker)
    interrupted = False
    try:
        _run(units, pool, selector, stop_at, min_start)
    except KeyboardInterrupt:
        interrupted = True
        _say("interrupted")
    _stop(pool, selector, grace)
    packing = time.monotonic()
    skip = {_workdir(settings, u) for u in units if u.kind == "train" and u.status == "done"}
    parts = state_archive.pack(_folders(settings), skip, out)
    summary = _summary(settings, units, before, device, backend_name, budget, time.monotonic() - packing, skip)
    if len(parts) > MAX_PARTS:
        _say(f"WARNING: the archive takes {len(parts)} parts; the device gives back {MAX_PARTS + 2} files")
    state_archive.write_manifest(out, _folders(settings), parts, **summary)
    _collect_logs(pool, os.path.join(out, LOG))
    shutil.rmtree(logs, ignore_errors=True)
    print(summary_text(summary), flush=True)
    if interrupted:
        return 130
    return 1 if any(u.status == "failed" for u in units) else 0


def _folders(settings: Settings) -> list[str]:
    return [settings.root, settings.pretrained_dir, settings.results_dir]


_terminated = []  # the signals (SIGTERM) that asked for the budget's stop before its time


def _terminate(signum, frame) -> None:
    del frame
    _terminated.append(signum)


def _run(units: list[Unit], pool: list[_Worker], selector, stop_at: float, min_start: float) -> None:
    """Hands out the ready units to idle workers and collects their replies, until nothing runs
    and nothing more may start, or the stop comes (at `stop_at`, or at SIGTERM)."""
    alive = set(pool)
    while True:
        now = time.monotonic()
        if now >= stop_at or _terminated:
            _say("the budget's stop" + (" (SIGTERM)" if _terminated else "") + ": interrupting the workers")
            return
        if stop_at - now >= min_start:
            for worker in sorted((w for w in alive if w.unit is None), key=lambda w: w.index):
                candidates = ready(units)
                if not candidates:
                    break
                worker.send(candidates[0])
                _say(f"start {candidates[0].id} (worker {worker.index})")
        if not any(w.unit for w in alive):
            remaining = sum(u.status == "todo" for u in units)
            _say("all units done" if not remaining else f"nothing more can start in this call ({remaining} units remain)")
            return
        for key, _ in selector.select(timeout=min(1.0, max(stop_at - time.monotonic(), 0.0))):
            if not _handle(key.data, key.data.read(), selector):
                alive.discard(key.data)


def _handle(worker: _Worker, replies: list[dict] | None, selector) -> bool:
    """Applies a worker's replies (None: its output ended) to its unit; False once it has exited."""
    for reply in replies or []:
        if worker.unit is not None:
            worker.finish(reply["status"], reply.get("error"))
    if replies is not None:
        return True
    selector.unregister(worker.process.stdout)
    code = worker.process.wait()
    if worker.unit is not None:  # it died without answering
        stopped = code in (130, -signal.SIGINT, -signal.SIGKILL)
        worker.finish("stopped" if stopped else "failed", None if stopped else f"worker {worker.index} exited with "
                      f"status {code}; see {LOG}")
    return False


def _stop(pool: list[_Worker], selector, grace: float) -> None:
    """Interrupts the busy workers (Ctrl-C: they save what they finished, then answer) and waits up
    to `grace` seconds for their answers; then ends every worker (an idle one has nothing unsaved)."""
    for worker in pool:
        if worker.unit is not None and worker.process.poll() is None:
            worker.process.send_signal(signal.SIGINT)
        worker.close_input()
    until = time.monotonic() + grace
    while any(w.unit is not None for w in pool) and selector.get_map() and time.monotonic() < until:
        for key, _ in selector.select(timeout=max(until - time.monotonic(), 0.0)):
            _handle(key.data, key.data.read(), selector)
    for worker in pool:
        if worker.unit is not None:
            _say(f"worker {worker.index} did not stop within {grace:.0f} s: killing it")
            worker.finish("stopped")
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait()
    selector.close()


def _record_protocol(settings: Settings) -> None:
    """Writes results_dir/protocol.json; refuses a state of another protocol (its runs would refuse
    the trainings anyway, after the workers had started)."""
    from polar_tf import reproduction_protocol

    record = reproduction_protocol.read_protocol_record(settings.results_dir)
    if record is not None and record[0] != settings.protocol:
        old, new = dataclasses.asdict(record[0]), dataclasses.asdict(settings.protocol)
        raise ValueError(f"{settings.results_dir} holds a reproduction with another protocol (differs in "
                         f"{', '.join(k for k in new if old[k] != new[k])}); pass the same flags or another --results_dir")
    reproduction_protocol.write_protocol_record(settings.results_dir, settings.protocol, settings.root, settings.pretrained_dir)


def _say(message: str) -> None:
    print(f"[{time.monotonic() - _STARTED:6.1f} s] {message}", flush=True)


def _collect_logs(pool: list[_Worker], path: str) -> None:
    """The workers' logs, one after the other (the last LOG_TAIL_BYTES of each), into one file."""
    with open(path, "wb") as out:
        for worker in pool:
            size = os.path.getsize(worker.log_path)
            out.write(f"==== worker {worker.index} (exit status {worker.process.returncode}) ====\n".encode())
            with open(worker.log_path, "rb") as f:
                if size > LOG_TAIL_BYTES:
                    f.seek(size - LOG_TAIL_BYTES)
                    out.write(b"[... earlier lines left out]\n")
                shutil.copyfileobj(f, out)


# Speed figures and the summary (files only).


def _workdir(settings: Settings, unit: Unit) -> str:
    """A training unit's run folder: <workdir>/<dataset>_<model>, or its spread run's."""
    from polar_tf import reproduction_protocol

    if run := _spread_runs(settings).get(unit.name):
        return _run_folders(settings, run).workdir
    return reproduction_protocol.run_folder(settings.root, unit.dataset, unit.name)


def _evaluation_dirs(settings: Settings, unit: Unit) -> list[str]:
    """An evaluation unit's results folders: one, or each of its spread run's evaluations."""
    from polar_tf import reproduction_protocol

    if run := _spread_runs(settings).get(unit.name):
        return [os.path.join(_run_folders(settings, run).results_dir, kind) for kind in seed_spread.EVALUATIONS]
    return [reproduction_protocol.evaluation_dir(settings.results_dir, unit.dataset, unit.name)]


def _models(settings: Settings, unit: Unit) -> int:
    """The models an evaluation unit evaluates, over its results folders."""
    from polar_tf import reproduction_protocol

    return len(seed_spread.EVALUATIONS) if unit.name in _spread_runs(settings) else len(reproduction_protocol.ROWS)


def _kept(settings: Settings, unit: Unit) -> str:
    """What an unfinished evaluation unit kept from earlier calls, e.g. " (1 of 3 models done; 7
    attacks of the next)", or "" when nothing."""
    if unit.kind != "evaluate":
        return ""
    done, attacks = len(_records(settings, unit)), 0
    for folder in _evaluation_dirs(settings, unit):
        path = os.path.join(folder, "results.partial.json")
        if os.path.isfile(path):
            with open(path) as f:
                attacks += len((json.load(f).get("unfinished_model") or {}).get("correct", {}))
    if not done and not attacks:
        return ""
    counted = "evaluations" if unit.name in _spread_runs(settings) else "models"
    return f" ({done} of {_models(settings, unit)} {counted} done" + (f"; {attacks} attacks of the next)" if attacks else ")")


def _train_config(settings: Settings, unit: Unit):
    from polar_tf import reproduction_protocol

    if run := _spread_runs(settings).get(unit.name):
        return seed_spread.training_config(run, settings.protocol)
    return reproduction_protocol.training_config(unit.dataset, unit.name, settings.protocol)


def _records(settings: Settings, unit: Unit) -> list[dict]:
    """What a unit's figures come from: a training's per-epoch metrics, an evaluation's finished
    models (each with its evaluation's eps), as the files hold them now."""
    if unit.kind == "train":
        path = os.path.join(_workdir(settings, unit), "metrics.jsonl")
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    records = []
    for folder in _evaluation_dirs(settings, unit):
        for name in ("results.json", "results.partial.json"):
            if os.path.isfile(os.path.join(folder, name)):
                with open(os.path.join(folder, name)) as f:
                    results = json.load(f)
                records += [{**model, "evaluated_at_eps": results["eps"]} for model in results["models"]]
                break
    return records


def _summary(settings: Settings, units: list[Unit], before: dict[str, list], device: str, backend_name: str,
             budget: float, pack_seconds: float, skip: set[str]) -> dict[str, Any]:
    """What the manifest records and the summary shows: per unit its status, wall time and speed
    figures from the records it added in this call; wall time per stage; what to carry."""
    rows = []
    for unit in units:
        records = _records(settings, unit)
        new = [r for r in records if r not in before[unit.id]]
        row = {"unit": unit.id, "status": unit.status, "done_before": unit.done_before, "seconds": unit.seconds,
               "error": unit.error}
        if unit.kind == "train":
            epochs = _train_config(settings, unit).total_epochs
            row.update(epochs_this_call=len(new), epochs_done=epochs if unit.done_before else len(records),
                       epochs=epochs,
                       images_per_second=statistics.median(r["images_per_second"] for r in new) if new else None)
        else:
            models = _models(settings, unit)
            row.update(models_this_call=len(new), models_done=models if unit.done_before else len(records), models=models,
                       counted="evaluations" if unit.name in _spread_runs(settings) else "models")
            pgd = [run for m in new for run in m.get("runs", [])
                   if run["attack"] == "pgd" and run["eps"] == m["evaluated_at_eps"] and run.get("image_steps")]
            if unit.name != "sweep" and pgd:  # the sweep's PGD runs at other eps too, with one restart
                steps, seconds = sum(r["image_steps"] for r in pgd), sum(r["seconds"] for r in pgd)
                row.update(pgd_image_steps=steps, pgd_seconds=seconds, pgd_image_steps_per_second=steps / seconds)
        rows.append(row)
    stages = {}
    started = [u.started for u in units if u.started is not None]
    if started:
        stages["start-up"] = min(started) - _STARTED
    for kind, label in (("train", "training"), ("evaluate", "evaluation")):
        ran = [u for u in units if u.kind == kind and u.started is not None]
        if ran:
            stages[label] = max(u.started + (u.seconds or 0.0) for u in ran) - min(u.started for u in ran)
    stages["packing"] = pack_seconds
    carried = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(settings.root)
                  if not any(d == s or d.startswith(s + os.sep) for s in skip) for f in files)
    return {"program": PROGRAM, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device, "backend": backend_name, "budget_seconds": budget,
            "wall_seconds": time.monotonic() - _STARTED, "units": rows, "stage_seconds": stages,
            "protocol": dataclasses.asdict(settings.protocol), "datasets": list(settings.datasets),
            "carry": {settings.root: carried}}


def summary_text(summary: dict) -> str:
    """The table the supervisor prints last (also from a manifest: `import_archive`)."""
    lines = [f"{PROGRAM}: {summary['wall_seconds']:.0f} s of a {summary['budget_seconds']:.0f} s budget on "
             f"{summary['device']}, backend {summary['backend']}",
             "| unit | status | wall s | this call |", "|---|---|---|---|"]
    for row in summary["units"]:
        wall = "-" if row["seconds"] is None else f"{row['seconds']:.0f}"
        status = "done before" if row["done_before"] else row["status"]
        lines.append(f"| {row['unit']} | {status} | {wall} | {_figures(row)} |")
    stages = summary["stage_seconds"]
    lines.append("wall time per stage: " + "; ".join(f"{k} {v:.0f} s" for k, v in stages.items()))
    remaining = [r for r in summary["units"] if r["status"] != "done"]
    done = len(summary["units"]) - len(remaining)
    if remaining:
        lines.append(f"done {done} of {len(summary['units'])} units; remaining: " + ", ".join(map(_progress, remaining)))
    else:
        lines.append(f"all {done} units done")
    (folder, size), = summary["carry"].items()
    lines.append(f"import with `python -m polar_tf.reproduce --import_archive=<the folder of {state_archive.MANIFEST}>`; "
                 f"the next call carries {folder} ({size / 2**20:.1f} MiB)")
    return "\n".join(lines)


def _progress(row: dict) -> str:
    if "epochs" in row:
        return f"{row['unit']} ({row['epochs_done']} of {row['epochs']} epochs)"
    return f"{row['unit']} ({row['models_done']} of {row['models']} {row.get('counted', 'models')})"


def _figures(row: dict) -> str:
    if row.get("error"):
        return row["error"]
    if "epochs" in row:
        text = f"{row['epochs_this_call']} epochs ({row['epochs_done']} of {row['epochs']} done)"
        if row["images_per_second"]:
            text += f", {row['images_per_second']:,.0f} training images/s (median epoch)"
        return text
    counted = row.get("counted", "models")
    text = f"{row['models_this_call']} {counted} {'evaluated' if counted == 'models' else 'done'}"
    if row.get("pgd_image_steps_per_second"):
        text += f", PGD {row['pgd_image_steps_per_second']:,.0f} image-steps/s ({row['pgd_image_steps']:,} in {row['pgd_seconds']:.0f} s)"
    return text


# The entry point.


def settings_from_flags() -> Settings:
    from polar_tf import reproduce, reproduction_protocol

    f = flags.FLAGS
    datasets, protocol = reproduce.reproduction_from_flags()
    for name in ("workdir", "results_dir", "pretrained_dir"):
        state_archive.check_folder(getattr(f, name), f"--{name}")
    unknown = sorted(set(f.evaluations) - set(reproduction_protocol.EVALUATIONS))
    if unknown or not f.evaluations:
        raise ValueError(f"--evaluations must name some of {', '.join(reproduction_protocol.EVALUATIONS)}. Received: {','.join(f.evaluations)}")
    spread = cli.config_from_flags(seed_spread.Spread)
    if spread.runs() and not os.path.isfile(spread.transfer_from):
        raise ValueError(f"the spread's adaptive suite transfers from {spread.transfer_from}, which does not exist: "
                         "pass --spread_transfer_from")
    return Settings(tuple(datasets), protocol, f.workdir, f.results_dir, f.pretrained_dir, f.data_dir, tuple(f.evaluations),
                    spread)


def main(argv):
    del argv
    f = flags.FLAGS
    if f.worker:
        sys.exit(work(settings_from_flags()))
    status = 0

    def body():
        nonlocal status
        settings = settings_from_flags()
        if f.plan_only:
            units = plan(settings)
            print("\n".join(f"{u.id}: {'done' if u.done_before else 'to do' + _kept(settings, u)}" for u in units))
            return
        if f.device_budget is None or f.device_budget <= 0:
            raise ValueError(f"--device_budget must be a number of seconds > 0. Received: {f.device_budget}")
        if not f.out:
            raise ValueError("--out is required (or $OUT): the folder the device gives back")
        if f.workers < 1:
            raise ValueError(f"--workers must be >= 1. Received: {f.workers}")
        signal.signal(signal.SIGTERM, _terminate)  # a time limit's kill: stop as at the budget's end
        # A command started in the background ignores SIGINT, and children inherit an ignored signal
        # (a handled one is reset): the workers must see it to stop with their work saved.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        status = supervise(settings, _worker_argv(), f.device_budget, f.out, f.workers, f.stop_grace_s, f.min_start_s)

    cli.run_main(PROGRAM, body)
    sys.exit(status)


def _worker_argv() -> list[str]:
    """The flags the workers get: the settings, as this process was given them."""
    return [arg for arg in sys.argv[1:] if arg.split("=")[0] not in ("--worker", "--noworker")]


def define_flags() -> None:
    from polar_tf import reproduce

    reproduce.define_reproduction_flags(**DEFAULT_FOLDERS, steps_per_execution=32)
    flags.DEFINE_float("device_budget", None, "Seconds this command may run (less than the device call's timeout_s).")
    flags.DEFINE_string("out", os.environ.get("OUT"), "Where the archive, manifest and log go (default: $OUT).")
    flags.DEFINE_integer("workers", 6, "Worker processes sharing the device.")
    flags.DEFINE_list("evaluations", list(EVALUATION_ORDER), "Which evaluations of each dataset to run.")
    cli.define_config_flags(seed_spread.Spread)
    flags.DEFINE_float("stop_grace_s", 20.0, "Seconds the interrupted workers get to save their work.")
    flags.DEFINE_float("min_start_s", 30.0, "No unit starts this close to the stop.")
    flags.DEFINE_bool("plan_only", False, "Only print which units are done and which remain.")
    flags.DEFINE_bool("worker", False, "Internal: run as one of the supervisor's workers.")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.flags_parser(PROGRAM))
