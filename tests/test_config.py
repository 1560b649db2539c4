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
