"""The losses against direct formulas (the reference's definitions)."""
import pytest
import torch
import torch.nn.functional as F

from satic.training.losses import cross_entropy, reward_mask, self_critical, token_kl


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
