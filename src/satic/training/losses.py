"""Training losses as pure functions; each returns (sum over counted positions, number counted).

Returning the sum and the count (not the mean) lets the trainer divide by the count of the
whole global batch, so gradient accumulation and multi-process training give the same
gradient as one big batch.
"""
from __future__ import annotations

import math

import torch


def cross_entropy(
    logprobs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked word cross-entropy, with the reference's label smoothing when smoothing > 0.

    logprobs (R, T, V+1), targets (R, >=T) long, mask (R, >=T) float; targets/mask are cut to T.
    Label smoothing follows the reference: the target gets 1 - s, every other word s / V, and
    the loss is KL(smoothed || model) summed over words.
    """
    per_row, counted = row_cross_entropy(logprobs, targets, mask, smoothing)
    return per_row.sum(), counted.sum()


def row_cross_entropy(
    logprobs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cross_entropy` of each row: (R,) sums over its counted positions, and (R,) their numbers."""
    steps = logprobs.size(1)
    targets, mask = targets[:, :steps], mask[:, :steps].to(logprobs.dtype)  # (R, T)
    target_lp = logprobs.gather(2, targets.unsqueeze(2)).squeeze(2)  # (R, T)
    if smoothing <= 0:
        per_word = -target_lp
    else:
        others = smoothing / (logprobs.size(2) - 1)
        confident = 1.0 - smoothing
        # KL(q || p) = sum_v q_v (log q_v - log p_v) with q = others everywhere except the target
        entropy_term = confident * math.log(confident) + smoothing * math.log(others)
        cross = -(others * (logprobs.sum(2) - target_lp) + confident * target_lp)  # (R, T)
        per_word = cross + entropy_term
    return (per_word * mask).sum(1), mask.sum(1)


def token_kl(
    student_lp: torch.Tensor, teacher_lp: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) summed over the masked positions (the reference's KLDivLoss, log targets).

    student_lp, teacher_lp (R, T, V+1) log-probs over the same positions; mask (R, >=T).
    The reference divides by the number of counted positions ('batchmean' on the selected rows).
    """
    steps = min(student_lp.size(1), teacher_lp.size(1))
    mask = mask[:, :steps].to(student_lp.dtype)  # (R, T)
    teacher_lp = teacher_lp[:, :steps]
    kl = (teacher_lp.exp() * (teacher_lp - student_lp[:, :steps])).sum(2)  # (R, T)
    return (kl * mask).sum(), mask.sum()


def reward_mask(seq: torch.Tensor) -> torch.Tensor:
    """The reference's SCST word mask: position j counts when j == 0 or seq[:, j-1] > 0.

    This counts every word up to and including the first 0. With K > 1 the finishing group
    keeps the words after its 0 in the raw output; as in the reference, the position after
    such a word counts again, with the log-prob of the word drawn there (the output holds 0).
    """
    seq_positive = (seq[:, :-1] > 0).float()  # (R, T-1)
    return torch.cat([seq_positive.new_ones(seq.size(0), 1), seq_positive], dim=1)  # (R, T)


def caption_mask(seq: torch.Tensor) -> torch.Tensor:
    """The words of each output row's caption and its end: every position up to and including the
    first 0 (R, T). Equal to reward_mask for K = 1."""
    zero = (seq == 0).long()
    return ((zero.cumsum(1) - zero) == 0).float()


SCST_SEMANTICS = ("reference", "output")


def self_critical(
    logprobs: torch.Tensor, seq: torch.Tensor, advantage: torch.Tensor, semantics: str = "reference"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy-gradient loss: -(reward - baseline) * log p(word), summed over the counted words.

    logprobs (R, T) log-probs (with grad) of the words drawn at every position (`draw_logprobs`), seq
    (R, T) the output rows, advantage (R,). semantics 'reference' counts the positions of the reference's
    RewardCriterion (reward_mask); 'output' only the caption's words and its end (caption_mask)."""
    if semantics not in SCST_SEMANTICS:
        raise ValueError(f"semantics must be one of {SCST_SEMANTICS}, got {semantics!r}")
    mask = (reward_mask(seq) if semantics == "reference" else caption_mask(seq)).to(logprobs.dtype)  # (R, T)
    return (-logprobs * advantage.unsqueeze(1) * mask).sum(), mask.sum()
