"""Progress of long computations (attacks, certificates): a Keras progress bar per attack.

Silent by default, so that library calls and tests print nothing; the entry points call
`enable()`. A bar shows the work done of its worst-case total, elapsed time and ETA, and the
numbers the attack reports: "accuracy" is the fraction of all examples not fooled so far (those
not attacked yet count as not fooled, so it only falls).

    bar = progress.bar("pgd eps=0.3: 1000 examples x 20 restarts", target=20000, unit="run")
    bar.update(done, [("accuracy", 0.71)])
"""

from __future__ import annotations

import keras

_enabled = False
# Seconds between redraws: enough to follow a run, few enough lines in a log file.
INTERVAL = 0.5


def enable(on: bool = True) -> None:
    """Shows progress bars from now on (entry points), or not."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


def bar(title: str, target: int, unit: str, metrics: tuple[str, ...] = ("accuracy",)) -> keras.utils.Progbar:
    """A `keras.utils.Progbar` of `target` units, titled on the line above; silent unless enabled.

    Args:
      title: what runs, printed once above the bar.
      target: the worst-case total of work units (the bar may finish early).
      unit: the name of one unit, e.g. "example" or "run".
      metrics: names of the values passed to `update`, shown as given (not averaged).
    """
    if _enabled:
        print(title, flush=True)
    return keras.utils.Progbar(
        max(int(target), 1), verbose=1 if _enabled else 0, interval=INTERVAL, stateful_metrics=list(metrics),
        unit_name=unit,
    )
