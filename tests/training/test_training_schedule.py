"""Learning-rate schedules: Noam, step decay and reduce-on-plateau, against their formulas and torch's scheduler."""
import json
import math

import numpy as np
import pytest
import torch

from satic.training.config import OptimConfig
from satic.training.schedule import ScheduleState, learning_rate, noam_rate, observe_validation


def test_noam_rate_formula_and_peak():
    assert noam_rate(1, 512, 1.0, 20000) == pytest.approx(512**-0.5 * 20000**-1.5)
    assert noam_rate(20000, 512, 1.0, 20000) == pytest.approx(512**-0.5 * 20000**-0.5)
    assert noam_rate(80000, 512, 2.0, 20000) == pytest.approx(2 * 512**-0.5 * 80000**-0.5)
    config = OptimConfig(schedule="noam", noam_warmup=10)
    assert learning_rate(config, ScheduleState(step=4), 64) == pytest.approx(noam_rate(5, 64, 1.0, 10))
    # a new run's first step is the reference's step 1 (NoamOpt counts the step before computing the rate)
    assert learning_rate(config, ScheduleState(), 64) == 64**-0.5 * 10**-1.5


def test_step_decay_and_plateau():
    step = OptimConfig(schedule="step", lr=1.0, decay_start=0, decay_every=3, decay_rate=0.5)
    assert [learning_rate(step, ScheduleState(epoch=e), 8) for e in (0, 1, 3, 4, 7)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    late = OptimConfig(schedule="step", lr=1.0, decay_start=2, decay_every=3, decay_rate=0.5)  # epochs after the 2nd
    assert [learning_rate(late, ScheduleState(epoch=e), 8) for e in (2, 3, 5, 6, 8)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    never = OptimConfig(schedule="step", lr=1.0, decay_every=3, decay_rate=0.5)  # decay_start -1, as the reference's
    assert [learning_rate(never, ScheduleState(epoch=e), 8) for e in (0, 3, 30)] == [1.0, 1.0, 1.0]
    plateau = OptimConfig(schedule="plateau", lr=1.0, plateau_factor=0.5, plateau_patience=1)
    state = ScheduleState()
    for score in (1.0, 2.0, 1.5, 1.9, 1.0, 3.0):
        observe_validation(plateau, state, score)
    assert state.plateau_scale == 0.5 and state.plateau_best == 3.0
    assert learning_rate(plateau, state, 8) == 0.5
    assert math.isclose(learning_rate(OptimConfig(schedule="constant", lr=1e-5), state, 8), 1e-5)


def plateau_rates(scores, lr: float, patience: int, factor: float = 0.5) -> tuple[list[float], list[float]]:
    """satic's rates and torch's ReduceLROnPlateau(mode='min') stepped with -score, after each score."""
    config = OptimConfig(schedule="plateau", lr=lr, plateau_factor=factor, plateau_patience=patience)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience)
    state = ScheduleState()
    ours, theirs = [], []
    for score in scores:
        observe_validation(config, state, score)
        reference.step(-score)
        ours.append(learning_rate(config, state, 8))
        theirs.append(optimizer.param_groups[0]["lr"])
    return ours, theirs


def test_plateau_follows_torch_on_negated_scores():
    """The reference steps torch's ReduceLROnPlateau(mode='min', factor 0.5, patience 3) with -CIDEr: a drop
    of less than 1e-4 relative still counts as an improvement, and further drops then chain."""
    scores = [1.0, 1.2, 1.19995, 1.19990, 1.1998, 1.1997, 1.1996, 1.1995, 1.3, 1.3, 1.3, 1.3, 1.3, 0.5, -0.2, -0.2,
              -0.20001, -0.3, -0.3, -0.3, -0.3]
    ours, theirs = plateau_rates(scores, 1.0, 3)
    assert ours == theirs
    assert len(set(theirs)) >= 3  # the sequence reaches several reductions


def test_plateau_stops_where_torch_stops_cutting():
    """torch's ReduceLROnPlateau skips a cut smaller than its eps of 1e-8: from 5e-4 halved at every stall,
    the rate stays at 1.53e-8 from the 16th cut on."""
    # worse every time: every validation after the first is a stall
    ours, theirs = plateau_rates([10.0 - 0.3 * i for i in range(25)], 5e-4, 0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)
    assert ours[-1] == ours[-9] == pytest.approx(5e-4 / 2**15)


def test_plateau_relative_threshold_is_one_in_ten_thousand_as_torch():
    """A drop of 5e-4 relative to the best is a stall (torch's threshold is 1e-4), a drop of 5e-5 is not; a rise
    of 5e-5 is an improvement, and a drop of exactly 1e-4 is a stall. The same holds below zero."""
    for sign in (1.0, -1.0):
        scores = [sign * s for s in (1.0, 0.9995, 0.99995, 1.00005, 0.9995, 0.9994, 0.99995, 0.9995, 0.9995)]
        ours, theirs = plateau_rates(scores, 1.0, 1)
        assert ours == theirs, sign
        assert len(set(theirs)) >= 2, sign  # the stalls reach a cut
        ours, theirs = plateau_rates([sign * 1.0, sign * 0.9999], 1.0, 0)  # -0.9999 == -1.0 * (1 - 1e-4) exactly
        assert ours == theirs == [1.0, 0.5], sign


def test_plateau_skips_a_cut_smaller_than_torchs_eps_for_any_factor():
    """torch skips a cut when old - new <= 1e-8, not when new <= 1e-8: with factor 0.2 from 1e-6 the rate goes
    2e-7, 4e-8, 8e-9 (a cut of 3.2e-8), then stays (the next cut would be 6.4e-9)."""
    ours, theirs = plateau_rates([10.0 - i for i in range(8)], 1e-6, 0, factor=0.2)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)
    assert ours[-1] == pytest.approx(8e-9, rel=1e-12)


def test_plateau_first_score_nan_is_a_stall_as_torch():
    """torch's ReduceLROnPlateau starts from best = +inf: a first score of NaN (or -inf) is a stall, and the
    next real score is the best, not a score that never beats NaN."""
    for scores in ([float("nan"), 1.0, 0.9, 0.8, 0.7, 0.6, 0.5], [float("-inf"), 0.5, 0.4, 0.3, 0.2, 0.1]):
        ours, theirs = plateau_rates(scores, 1.0, 1)
        assert ours == theirs, scores


def test_epoch_counts_wrapped_steps_when_a_batch_exceeds_the_split(tiny_data, tmp_path):
    """The reference adds one epoch after each iteration whose batch wrapped round the split (train.py:
    `if data['bounds']['wrapped']: epoch += 1`): with a batch of twice the split every iteration is one epoch,
    so max_epochs=3 takes 3 iterations and the step decay halves the rate at each."""
    from satic.data.dataset import CaptionData
    from satic.training.trainer import train
    from training_helpers import make_config

    n = len(CaptionData.from_dir(tiny_data, tiny_data / "feats_att").split_indices("train"))
    config = make_config(tiny_data, tmp_path, max_iters=-1, max_epochs=3, save_at_end=False, **{
        "data.batch_size": 2 * n, "optim.schedule": "step", "optim.lr": 1.0, "optim.decay_start": 0,
        "optim.decay_every": 1, "optim.decay_rate": 0.5, "optim.grad_clip": 0.0})
    result = train(config)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert (result.iterations, result.epochs) == (3, 3)
    assert [r["epoch"] for r in train_records] == [1, 2, 3]
    assert [r["lr"] for r in train_records] == [1.0, 0.5, 0.25]
