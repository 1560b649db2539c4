"""Flags made from the config dataclasses, and command lines that parse back to the same config."""

import dataclasses
import shlex

import pytest
from absl import flags

from polar_tf import cli, evaluation_config, report
from polar_tf.config import Config
from polar_tf.evaluation_config import AdaptiveConfig, EvalConfig, parse_eps_sweep
from polar_tf.reproduction_protocol import Protocol

CONFIGS = (Config, EvalConfig, AdaptiveConfig, Protocol)


def _flag_values(*classes, **defaults) -> flags.FlagValues:
    values = flags.FlagValues()
    for cls in classes:
        cli.define_config_flags(cls, defaults, flag_values=values)
    for name in ("suite", "model_path", "output_dir", "data_dir", "workdir"):
        flags.DEFINE_string(name, None, "not a config field", flag_values=values)
    return values


def _parse(command: str, *classes) -> flags.FlagValues:
    values = _flag_values(*classes)
    args = shlex.split(command)
    values(["prog", *args[args.index("python") + 2:]])
    return values


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_is_a_flag_of_the_same_name_default_and_documented_help(cls):
    values = _flag_values(cls)
    for field in dataclasses.fields(cls):
        flag = values[field.name]
        default = list(field.default) if isinstance(field.default, tuple) and field.default else field.default
        assert flag.default == {"eps_sweep": None, "jit_compile": "auto"}.get(field.name, default), field.name
        assert flag.help and "Received" not in flag.help


def test_help_comes_from_the_attributes_section_shared_entries_and_continuation_lines_included():
    helps = cli.field_help(Config)
    assert helps["num_filters"] == helps["kernel_size"] == "the front end's filters (25 of 5x5)."
    assert helps["adv_step_size"].startswith("their size; None keeps the reach of Madry's MNIST recipe")
    assert helps["adv_step_size"].endswith("(eps / 30 at 40 steps, 1/300 at Fashion-MNIST's eps 0.1).")


def test_a_flag_two_configs_define_with_different_defaults_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Other:
        """Attributes:
          dataset: another default.
        """

        dataset: str = "fashion_mnist"

    values = _flag_values(EvalConfig)
    with pytest.raises(ValueError, match="--dataset is defined twice"):
        cli.define_config_flags(Other, flag_values=values)


@pytest.mark.parametrize("config", [
    Config(),
    Config(dataset="fashion_mnist", model="adversarial", eps=0.2, adv_steps=7, jit_compile=False, lr=3e-4,
           classifier_init="glorot", adam_epsilon=1e-7),
    Config(model="baseline", certified_training=True, ibp_eps=0.25, ibp_ramp_epochs=5, steepness=2.5),
])
def test_train_command_parses_back_to_the_config(config):
    command = report.train_command(config, "runs/a b")
    values = _parse(command, Config)
    assert cli.config_from_flags(Config, values) == config
    assert values.workdir == "runs/a b"


@pytest.mark.parametrize("config", [
    EvalConfig(),
    EvalConfig(dataset="fashion_mnist", attacks=("bim", "pgd"), steps=7, restarts=3, num_examples=50, pgd_examples=20,
               eps_sweep=parse_eps_sweep("0:0.4:0.05"), loss="cw", backward="smooth", steepness=4.0, seed=2, certify=True),
    EvalConfig(eps=0.15, step_size=0.01, eps_sweep=(0.05, 0.3), batch_size=64),
    AdaptiveConfig(),
    AdaptiveConfig(dataset="fashion_mnist", eps=0.2, backwards=("smooth",), pgd_steps=5, pgd_restarts=2,
                   apgd_iterations=9, square_queries=40, square_p_init=0.3, transfer_from="runs/x", check_examples=9),
])
def test_evaluate_command_parses_back_to_the_config_of_its_suite(config):
    command = report.evaluate_command(["a.keras", "b.keras"], config, "out dir", "/data")
    values = _parse(command, *evaluation_config.SUITES.values())
    assert (values.suite or "standard") == ("adaptive" if isinstance(config, AdaptiveConfig) else "standard")
    given = {name: values[name].value for name in evaluation_config.FIELDS if values[name].present}
    suite = values.suite or "standard"
    assert evaluation_config.settings_config(suite, given) == config  # the command names the dataset
    assert (values.model_path, values.output_dir, values.data_dir) == ("a.keras,b.keras", "out dir", "/data")


def test_reproduction_protocol_flags_parse_back_and_take_other_defaults():
    protocol = Protocol(epochs_per_stage=3, adam_epsilon=1e-7, classifier_init="glorot", fashion_mnist_jump=0.2)
    values = flags.FlagValues()
    cli.define_config_flags(Protocol, flag_values=values)
    values(["prog", *cli.config_flags(protocol)])
    assert cli.config_from_flags(Protocol, values) == protocol
    gpu = flags.FlagValues()
    cli.define_config_flags(Protocol, {"steps_per_execution": 32}, flag_values=gpu)
    gpu(["prog"])
    assert cli.config_from_flags(Protocol, gpu) == Protocol(steps_per_execution=32)


