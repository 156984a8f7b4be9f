import dataclasses
import math

import jax
import numpy as np
import pytest

from dsv3_jax.train import schedule
from dsv3_jax.train.config import TrainConfig

C = TrainConfig(peak_lr=2.2e-4)


@pytest.mark.parametrize("frac, expected", [
    (0.0, 0.0),
    (C.warmup_fraction / 2, 1.1e-4),  # halfway up the warmup
    (C.warmup_fraction, 2.2e-4),
    (0.5, 2.2e-4),  # constant phase, until 10T/14.8T
    (10 / 14.8 - 1e-6, 2.2e-4),
    ((10 + 4.3 / 4) / 14.8, 2.2e-5 + (2.2e-4 - 2.2e-5) * (1 + math.cos(math.pi / 4)) / 2),  # a quarter in
    ((10 + 4.3 / 2) / 14.8, 2.2e-5 + (2.2e-4 - 2.2e-5) / 2),  # cosine midpoint
    ((10 + 4.3 * 3 / 4) / 14.8, 2.2e-5 + (2.2e-4 - 2.2e-5) * (1 - math.cos(math.pi / 4)) / 2),  # three quarters
    (14.3 / 14.8 - 1e-9, 2.2e-5),  # end of the cosine
    (14.4 / 14.8, 2.2e-5),  # first tail, 333B tokens
    (14.7 / 14.8, 7.3e-6),  # last tail, 167B tokens
])
def test_learning_rate_follows_the_paper(frac, expected):
    assert float(schedule.learning_rate(C, np.float32(frac))) == pytest.approx(expected, rel=1e-3, abs=1e-9)


def test_tail_boundaries_are_at_the_paper_token_counts():
    assert C.constant_until * 14.8 == pytest.approx(10)
    assert (C.decay_until - C.constant_until) * 14.8 == pytest.approx(4.3)
    assert (C.tail_until - C.decay_until) * 14.8e12 == pytest.approx(333e9, rel=1e-3)
    assert (1 - C.tail_until) * 14.8e12 == pytest.approx(167e9, rel=1e-3)
    assert math.isclose(C.final_lr_ratio * 2.2e-4, 7.3e-6)


def test_mtp_lambda_and_bias_gamma_switch_at_their_token_budgets():
    assert float(schedule.mtp_lambda(C, np.float32(9.9 / 14.8))) == pytest.approx(0.3)
    assert float(schedule.mtp_lambda(C, np.float32(10.1 / 14.8))) == pytest.approx(0.1)
    assert float(schedule.bias_gamma(C, np.float32(14.2 / 14.8))) == pytest.approx(0.001)
    assert float(schedule.bias_gamma(C, np.float32(14.4 / 14.8))) == 0.0


def test_batch_ramp_grows_micro_batches_to_the_target():
    c = TrainConfig(steps=100, grad_accum=4, ramp_start_accum=1, ramp_fraction=0.5)
    accum = [schedule.accum_at(c, s) for s in range(100)]
    # linear from 1 to 4 over the first half (50 steps), rounded down: 1 + 3 s / 50
    assert accum[:50] == [1] * 17 + [2] * 17 + [3] * 16 and accum[50:] == [4] * 50
    assert schedule.planned_micro_batches(c) == sum(accum)
    assert schedule.accum_at(TrainConfig(grad_accum=3), 0) == 3


def test_an_int_for_a_float_setting_compiles_the_same_program():
    as_int, as_float = TrainConfig(peak_lr=0, bias_gamma=0), TrainConfig(peak_lr=0.0, bias_gamma=0.0)
    floats = [f.name for f in dataclasses.fields(TrainConfig) if f.type == "float"]
    assert floats and all(type(getattr(as_int, f)) is float for f in floats)
    lower = lambda fn, c: jax.jit(lambda frac: fn(c, frac)).lower(np.float32(0.5)).as_text()
    for fn in (schedule.learning_rate, schedule.bias_gamma):
        assert lower(fn, as_int) == lower(fn, as_float)


@pytest.mark.parametrize("value", [True, "1e-3", None])
def test_a_float_setting_must_be_a_number(value):
    with pytest.raises(ValueError, match="TrainConfig.peak_lr=.*must be a number"):
        TrainConfig(peak_lr=value)
