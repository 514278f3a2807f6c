"""Losses, schedules and SCST advantages against direct formulas (the reference's definitions)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from satic.training.config import OptimConfig
from satic.training.losses import cross_entropy, reward_mask, self_critical, token_kl
from satic.training.schedule import ScheduleState, learning_rate, noam_rate, observe_validation
from satic.training.scst import advantages, caption_rewards


def _logprobs(rows=3, steps=4, vocab=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, steps, vocab, generator=g).log_softmax(-1)


def test_cross_entropy_is_masked_nll():
    lp = _logprobs()
    targets = torch.tensor([[1, 2, 0, 0, 0], [3, 4, 5, 0, 0], [2, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float)
    total, count = cross_entropy(lp, targets, mask)
    expected = sum(-lp[r, t, targets[r, t]] for r in range(3) for t in range(4) if mask[r, t] > 0)
    assert count.item() == 9
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_label_smoothing_equals_kl_to_smoothed_target():
    lp = _logprobs()
    targets = torch.tensor([[1, 2, 0, 0], [3, 4, 5, 0], [2, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float)
    s = 0.2
    true = torch.full_like(lp, s / (lp.size(2) - 1)).scatter(2, targets.unsqueeze(2), 1 - s)
    per_word = F.kl_div(lp, true, reduction="none").sum(2)
    total, count = cross_entropy(lp, targets, mask, smoothing=s)
    assert total.item() == pytest.approx((per_word * mask).sum().item(), rel=1e-5)
    assert count.item() == mask.sum().item()


@pytest.mark.parametrize("s", [1e-3, 0.01, 0.05])
def test_small_label_smoothing_is_applied(s):
    """Any smoothing > 0 gives KL(smoothed target || model): a small one is not plain cross-entropy."""
    lp = _logprobs(seed=3).double()
    targets = torch.tensor([[1, 2, 0, 0], [3, 4, 5, 0], [2, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
    true = torch.full_like(lp, s / (lp.size(2) - 1)).scatter(2, targets.unsqueeze(2), 1 - s)
    expected = (F.kl_div(lp, true, reduction="none").sum(2) * mask).sum()
    total, _ = cross_entropy(lp, targets, mask, smoothing=s)
    assert total.item() == pytest.approx(expected.item(), rel=1e-9)
    assert total.item() != pytest.approx(cross_entropy(lp, targets, mask)[0].item(), rel=1e-4)


def test_token_kl_matches_kldiv_on_masked_rows():
    student, teacher = _logprobs(seed=1), _logprobs(seed=2)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.float)
    total, count = token_kl(student, teacher, mask)
    keep = mask[:, :4].bool()
    expected = F.kl_div(student[keep], teacher[keep], log_target=True, reduction="sum")
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert count.item() == 7
    assert token_kl(student, student, mask)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_reward_mask_counts_up_to_first_zero_as_the_reference():
    seq = torch.tensor([[3, 0, 5, 6], [2, 4, 0, 0], [1, 2, 3, 4]])
    assert reward_mask(seq).tolist() == [[1, 1, 0, 1], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_self_critical_loss_value_and_gradient_sign():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]], requires_grad=True)
    seq = torch.tensor([[4, 0, 0], [5, 6, 7]])
    adv = torch.tensor([2.0, -1.0])
    total, count = self_critical(logp, seq, adv)
    assert count.item() == 5
    assert total.item() == pytest.approx(-(2.0 * (-3.0)) - (-1.0 * (-0.6)))
    total.backward()
    assert logp.grad.tolist() == [[-2.0, -2.0, 0.0], [1.0, 1.0, 1.0]]


def test_new_and_greedy_baselines():
    rewards = np.array([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    assert advantages(rewards, 3, "new").tolist() == [-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]
    assert advantages(rewards, 3, "greedy", np.array([1.0, 2.0])).tolist() == [0.0, 1.0, 2.0, -2.0, -2.0, 4.0]
    with pytest.raises(ValueError):
        advantages(rewards, 1, "new")


def test_caption_rewards_weights_and_image_grouping():
    gts = [np.array([[1, 2, 0]]), np.array([[3, 0, 0], [4, 0, 0]])]
    cands = np.array([[1, 2, 0], [1, 0, 0], [3, 0, 0], [5, 0, 0]])

    def exact(c, refs):
        per = len(c) // len(refs)
        return np.array([float(any(np.array_equal(x, y) for y in refs[i // per])) for i, x in enumerate(c)])

    length = lambda c, r: np.array([float((x > 0).sum()) for x in c])
    got = caption_rewards(cands, gts, exact, 1.0, length, 0.5)
    assert got.tolist() == [2.0, 0.5, 1.5, 0.5]


def test_noam_rate_formula_and_peak():
    assert noam_rate(1, 512, 1.0, 20000) == pytest.approx(512**-0.5 * 20000**-1.5)
    assert noam_rate(20000, 512, 1.0, 20000) == pytest.approx(512**-0.5 * 20000**-0.5)
    assert noam_rate(80000, 512, 2.0, 20000) == pytest.approx(2 * 512**-0.5 * 80000**-0.5)
    config = OptimConfig(schedule="noam", noam_warmup=10)
    assert learning_rate(config, ScheduleState(step=4), 64) == pytest.approx(noam_rate(5, 64, 1.0, 10))


def test_step_decay_and_plateau():
    step = OptimConfig(schedule="step", lr=1.0, decay_start=0, decay_every=3, decay_rate=0.5)
    assert [learning_rate(step, ScheduleState(epoch=e), 8) for e in (0, 1, 3, 4, 7)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    plateau = OptimConfig(schedule="plateau", lr=1.0, plateau_factor=0.5, plateau_patience=1)
    state = ScheduleState()
    for score in (1.0, 2.0, 1.5, 1.9, 1.0, 3.0):
        observe_validation(plateau, state, score)
    assert state.plateau_scale == 0.5 and state.plateau_best == 3.0
    assert learning_rate(plateau, state, 8) == 0.5
    assert math.isclose(learning_rate(OptimConfig(schedule="constant", lr=1e-5), state, 8), 1e-5)


def test_plateau_follows_torch_on_negated_scores():
    """The reference steps torch's ReduceLROnPlateau(mode='min', factor 0.5, patience 3) with -CIDEr: a drop
    of less than 1e-4 relative still counts as an improvement, and further drops then chain."""
    scores = [1.0, 1.2, 1.19995, 1.19990, 1.1998, 1.1997, 1.1996, 1.1995, 1.3, 1.3, 1.3, 1.3, 1.3, 0.5, -0.2, -0.2,
              -0.20001, -0.3, -0.3, -0.3, -0.3]
    config = OptimConfig(schedule="plateau", lr=1.0, plateau_factor=0.5, plateau_patience=3)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=3)
    state = ScheduleState()
    ours, theirs = [], []
    for score in scores:
        observe_validation(config, state, score)
        reference.step(-score)
        ours.append(learning_rate(config, state, 8))
        theirs.append(optimizer.param_groups[0]["lr"])
    assert ours == theirs
    assert len(set(theirs)) >= 3  # the sequence reaches several reductions


def test_plateau_stops_where_torch_stops_cutting():
    """torch's ReduceLROnPlateau skips a cut smaller than its eps of 1e-8: from 5e-4 halved at every stall,
    the rate stays at 1.53e-8 from the 16th cut on."""
    config = OptimConfig(schedule="plateau", lr=5e-4, plateau_factor=0.5, plateau_patience=0)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-4)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=0)
    state = ScheduleState()
    ours, theirs = [], []
    for i in range(25):
        score = 10.0 - 0.3 * i  # worse every time: every validation after the first is a stall
        observe_validation(config, state, score)
        reference.step(-score)
        ours.append(learning_rate(config, state, 8))
        theirs.append(optimizer.param_groups[0]["lr"])
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)
    assert ours[-1] == ours[-9] == pytest.approx(5e-4 / 2**15)
