import pytest

from polar_tf.config import Config


def test_dataset_defaults():
    assert (Config().jump, Config().eps) == (0.5, 0.3)
    fashion = Config(dataset="fashion_mnist")
    assert (fashion.jump, fashion.eps) == (0.3, 0.1)
    assert Config(model="direct_quant").jump == 0.2
    assert Config(jump=0.3).jump == 0.3


def test_json_round_trip():
    config = Config(dataset="fashion_mnist", model="baseline", seed=3, epochs_per_stage=2)
    assert Config.from_dict(config.to_dict()) == config
    assert config.num_stages == 1 and Config().num_stages == 3 and config.total_epochs == 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dataset": "cifar10"}, "Received: dataset='cifar10'"),
        ({"model": "resnet"}, "Received: model='resnet'"),
        ({"jump": 1.0}, "Received: jump=1.0"),
        ({"jump": -0.1}, "Received: jump=-0.1"),
        ({"eps": 1.5}, "Received: eps=1.5"),
        ({"epochs_per_stage": 0}, "Received: epochs_per_stage=0"),
        ({"batch_size": -4}, "Received: batch_size=-4"),
        ({"lr": 0.0}, "Received: lr=0.0"),
        ({"train_examples": -1}, "Received: train_examples=-1"),
        ({"backward": "relu"}, "Received: backward='relu'"),
        ({"classifier_init": "he"}, "Received: classifier_init='he'"),
        ({"adam_epsilon": 0.0}, "Received: adam_epsilon=0.0"),
        ({"model": "adversarial", "certified_training": True}, "Received: model='adversarial'"),
        ({"certified_training": True, "ibp_eps": 1.2}, "Received: ibp_eps=1.2"),
        ({"certified_training": True, "ibp_kappa_final": -0.5}, "Received: ibp_kappa_final=-0.5"),
        ({"certified_training": True, "ibp_ramp_epochs": 0}, "Received: ibp_ramp_epochs=0"),
        ({"certified_training": True, "ibp_warmup_epochs": 15, "ibp_ramp_epochs": 10},
         "Received: ibp_warmup_epochs=15, ibp_ramp_epochs=10"),
    ],
)
def test_bad_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Config(**kwargs)


def test_unknown_keys_rejected():
    with pytest.raises(ValueError, match="Unknown config keys"):
        Config.from_dict({"dataset": "mnist", "learning_rate": 1.0})


def test_defaults_follow_the_original_and_older_records_keep_what_they_trained_with():
    assert (Config().classifier_init, Config().adam_epsilon) == ("uniform_fan_in", 1e-8)
    recorded = Config(dataset="fashion_mnist").to_dict()
    del recorded["classifier_init"], recorded["adam_epsilon"]  # A config.json written before they existed.
    older = Config.from_dict(recorded)
    assert (older.classifier_init, older.adam_epsilon) == ("glorot", 1e-7)


def test_certified_training_defaults():
    polarized = Config(certified_training=True)
    assert (polarized.ibp_eps, polarized.ibp_warmup_epochs, polarized.ibp_ramp_epochs, polarized.ibp_kappa_final) == (
        0.3, 0, 10, 0.5)  # half of stage 3's 20 epochs; Gowal et al.'s final kappa
    assert polarized.certified_epochs == 20
    baseline = Config(dataset="fashion_mnist", model="baseline", certified_training=True, epochs_per_stage=1)
    assert (baseline.ibp_eps, baseline.ibp_ramp_epochs, baseline.certified_epochs) == (0.1, 1, 3)
    assert Config(certified_training=True, ibp_eps=0.4).ibp_eps == 0.4
    assert (Config().ibp_eps, Config().ibp_ramp_epochs) == (None, None)  # unused without certified training
    assert Config.from_dict(polarized.to_dict()) == polarized
