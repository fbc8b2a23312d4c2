"""Pieces with one owner: the training-mode parser (pipeline.config) and the learning-rate schedule
(pipeline.training.finetune), used by the model loader and by pretraining."""

import pytest

from pipeline.config import parse_mode
from pipeline.errors import InputError
from pipeline.models import load
from pipeline.models.pretrain import LrSchedule
from pipeline.training.finetune import linear_warmup_decay, warmup_decay_factor


def test_the_loader_checks_modes_with_the_configurations_parser():
    assert load.parse_mode is parse_mode
    assert parse_mode("last-2", 6) == ("last", 2)
    with pytest.raises(InputError, match="names 7 layers but the model has 6 encoder layers"):
        parse_mode("freeze-7", 6)
    with pytest.raises(InputError, match=r"training mode 3; use frozen, unfrozen"):
        parse_mode(3)


def test_pretraining_follows_the_fine_tuning_schedule():
    schedule = LrSchedule(planned=40, warmup=6)
    fixed = linear_warmup_decay(6, 40)
    assert [schedule.factor(s) for s in range(45)] == [fixed(s) for s in range(45)]
    # a time budget re-aims the decay: the same formula with the shortened horizon and warm-up
    schedule.horizon = 20
    assert [schedule.factor(s) for s in range(25)] == [warmup_decay_factor(s, 2, 20) for s in range(25)]
    assert schedule.factor(0) == pytest.approx(1 / 3) and schedule.factor(20) == 0.0
