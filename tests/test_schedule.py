import pytest

from polar_tf import schedule
from polar_tf.config import Config


@pytest.mark.parametrize(
    "epoch, stage, regularizer, reg_weight, saturate, trainable, lr",
    [
        (0, 1, "b1", 0.0, False, True, 1e-3),
        (10, 1, "b1", 0.5, False, True, 1e-3),
        (19, 1, "b1", 0.95, False, True, 1e-3),
        (20, 2, "b2", 0.0, False, True, 1e-3),
        (35, 2, "b2", 0.75, False, True, 1e-3),
        (39, 2, "b2", 0.95, False, True, 1e-3),
        (40, 3, "none", 0.0, True, False, 1e-3),
        (49, 3, "none", 0.0, True, False, 1e-3),
        (50, 3, "none", 0.0, True, False, 1e-3),  # The original lowered lr at the end of epoch 50.
        (51, 3, "none", 0.0, True, False, 1e-4),
        (59, 3, "none", 0.0, True, False, 1e-4),
    ],
)
def test_paper_schedule(epoch, stage, regularizer, reg_weight, saturate, trainable, lr):
    phase = schedule.phase(Config(), epoch)
    assert (phase.stage, phase.regularizer, phase.saturate, phase.frontend_trainable) == (
        stage, regularizer, saturate, trainable,
    )
    assert phase.reg_weight == pytest.approx(reg_weight)
    assert phase.lr == pytest.approx(lr)


def test_stage_epochs_cover_the_schedule():
    config = Config()
    assert [list(schedule.stage_epochs(config, s)) for s in (1, 2, 3)] == [
        list(range(0, 20)), list(range(20, 40)), list(range(40, 60)),
    ]
    short = Config(epochs_per_stage=2)
    assert list(schedule.stage_epochs(short, 3)) == [4, 5]
    assert schedule.phase(short, 1).reg_weight == 0.5
    assert [schedule.phase(short, e).lr for e in range(6)] == [1e-3] * 6  # Epochs after round(5/6 * 6) = 5: none.
    reduced = Config(epochs_per_stage=10)
    assert [schedule.phase(reduced, e).lr for e in range(24, 30)] == [1e-3] * 2 + [pytest.approx(1e-4)] * 4


def test_one_stage_models_train_all_epochs_without_regularizer():
    config = Config(model="baseline")
    assert list(schedule.stage_epochs(config, 1)) == list(range(60))
    phases = [schedule.phase(config, e) for e in range(60)]
    assert {(p.stage, p.regularizer, p.reg_weight, p.saturate) for p in phases} == {(1, "none", 0.0, False)}
    assert [p.lr for p in phases].count(1e-3) == 51
    with pytest.raises(ValueError, match="Received: stage=2"):
        schedule.stage_epochs(config, 2)


def test_epoch_out_of_range():
    with pytest.raises(ValueError, match="Received: epoch=60"):
        schedule.phase(Config(), 60)


def test_certified_training_replaces_stage_3_or_every_epoch_of_a_one_stage_model():
    polarized = Config(epochs_per_stage=2, certified_training=True)
    assert [schedule.phase(polarized, e).certified for e in range(6)] == [False] * 4 + [True] * 2
    assert [schedule.phase(polarized, e).frontend_trainable for e in range(4, 6)] == [False, False]
    assert schedule.certified_start(polarized) == 4
    baseline = Config(model="baseline", epochs_per_stage=2, certified_training=True)
    assert [schedule.phase(baseline, e).certified for e in range(6)] == [True] * 6
    assert schedule.certified_start(baseline) == 0
    assert not any(schedule.phase(Config(epochs_per_stage=2), e).certified for e in range(6))


@pytest.mark.parametrize(
    "epochs_done, eps, kappa",
    [(0.0, 0.0, 1.0), (1.0, 0.0, 1.0), (1.5, 0.1, 0.875), (2.0, 0.2, 0.75), (3.0, 0.4, 0.5), (3.5, 0.4, 0.5)],
)
def test_certified_ramp_is_gowal_et_als(epochs_done, eps, kappa):
    # 1 warm-up epoch at eps 0 and kappa 1, then 2 epochs of linear ramps to eps 0.4 and kappa 0.5.
    config = Config(epochs_per_stage=4, certified_training=True, ibp_eps=0.4, ibp_warmup_epochs=1, ibp_ramp_epochs=2)
    got_eps, got_kappa = schedule.certified_ramp(config, epochs_done)
    # float32 arithmetic on values of order 1: within a few ulps.
    assert float(got_eps) == pytest.approx(eps, abs=1e-6)
    assert float(got_kappa) == pytest.approx(kappa, abs=1e-6)
