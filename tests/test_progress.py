"""Tests of polar_tf.progress: a bar counts its units, shows its metrics as given, and is silent
unless enabled."""

import re

import pytest

from polar_tf import progress


@pytest.fixture
def enabled():
    """Progress bars on for one test (entry points turn them on), then as they were."""
    before = progress.enabled()
    progress.enable(True)
    yield
    progress.enable(before)


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)  # without the terminal's colours


def test_a_bar_prints_its_title_then_its_count_of_the_target_and_the_last_metric_given(enabled, capsys):
    bar = progress.bar("pgd eps=0.3: 4 examples x 2 restarts", target=8, unit="run")
    assert bar.target == 8
    bar.update(4, [("accuracy", 0.5)])
    bar.update(8, [("accuracy", 0.25)])
    lines = _plain(capsys.readouterr().out).splitlines()
    assert lines[0] == "pgd eps=0.3: 4 examples x 2 restarts"
    final = lines[-1]
    assert final.startswith("8/8 ") and "/run" in final
    assert final.endswith("accuracy: 0.2500")  # the value given last, not the mean 0.3750 of the updates


def test_bars_are_silent_unless_enabled_and_count_at_least_one_unit(capsys):
    before = progress.enabled()
    progress.enable(False)
    try:
        bar = progress.bar("fgsm eps=0.3: 0 examples", target=0, unit="example")
        assert bar.target == 1  # an empty task still finishes its bar
        bar.update(1, [("accuracy", 1.0)])
    finally:
        progress.enable(before)
    assert capsys.readouterr().out == ""
