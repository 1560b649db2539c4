"""Tests of polar_tf.evaluation_config: the settings of both suites, their defaults and their checks."""

import pytest

from polar_tf.evaluation_config import AdaptiveConfig, EvalConfig, format_eps_sweep, parse_eps_sweep


def test_parse_eps_sweep():
    sweep = parse_eps_sweep("0:0.4:0.02")
    assert len(sweep) == 21 and sweep[0] == 0.0 and sweep[-1] == 0.4 and sweep[15] == 0.3
    assert parse_eps_sweep("0.1:0.1:0.05") == (0.1,)
    assert parse_eps_sweep("0:0.25:0.1") == (0.0, 0.1, 0.2)
    for bad in ("0:0.4", "a:b:c", "0.3:0.1:0.1", "0:0.4:0", "0:1.5:0.5", "0:0.4:0.1:1"):
        with pytest.raises(ValueError, match="eps_sweep"):
            parse_eps_sweep(bad)


def test_eval_config_defaults_and_validation():
    config = EvalConfig(dataset="fashion_mnist", eps_sweep=(0.2, 0.0))
    assert config.eps == 0.1 and config.steps == 100 and config.restarts == 20
    assert config.eps_values == [0.0, 0.1, 0.2]
    assert config.step_size_at(0.2) == 0.02
    assert EvalConfig(step_size=0.05).step_size_at(0.3) == 0.05
    for kwargs, message in (
        (dict(attacks=("fgsm", "cw")), "attacks"),
        (dict(attacks=()), "attacks"),
        (dict(eps=1.5), "eps"),
        (dict(steps=0), "steps"),
        (dict(loss="mse"), "loss"),
        (dict(backward="tanh"), "backward"),
        (dict(dataset="cifar10"), "dataset"),
    ):
        with pytest.raises(ValueError, match=message):
            EvalConfig(**kwargs)


def test_eps_sweep_text_round_trips_as_a_grid_or_a_list():
    sweep = parse_eps_sweep("0:0.4:0.02")
    assert len(sweep) == 21 and sweep[-1] == 0.4
    assert format_eps_sweep(sweep) == "0.0:0.4:0.02"
    assert parse_eps_sweep(format_eps_sweep((0.05, 0.3))) == (0.05, 0.3)
    assert parse_eps_sweep("0.1") == (0.1,)
    with pytest.raises(ValueError, match="start:stop:step or values separated by commas"):
        parse_eps_sweep("a,b")


def test_adaptive_config_defaults_and_validation():
    assert (AdaptiveConfig().eps, AdaptiveConfig(dataset="fashion_mnist").eps) == (0.3, 0.1)
    assert AdaptiveConfig(backwards=["smooth"]).backwards == ("smooth",)
    for kwargs, message in (
        (dict(dataset="cifar10"), "dataset"),
        (dict(eps=0.0), r"eps must be in \(0, 0.5\)"),
        (dict(eps=0.5), r"eps must be in \(0, 0.5\)"),  # the eps_to_half check attacks up to 0.5
        (dict(backwards=()), "backwards must name"),
        (dict(backwards=("identity", "identity")), "backwards must name"),
        (dict(backwards=("tanh",)), "backwards must be among"),
        (dict(apgd_target_classes=0), "apgd_target_classes"),
        (dict(square_queries=1), "square_queries"),
        (dict(square_p_init=1.5), "square_p_init"),
        (dict(batch_size=0), "batch_size"),
        (dict(seed=-1), "seed"),
    ):
        with pytest.raises(ValueError, match=message):
            AdaptiveConfig(**kwargs)
