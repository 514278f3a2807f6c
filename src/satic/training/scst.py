"""Self-critical sequence training: rewards of sampled captions and their baselines."""
from __future__ import annotations

from typing import Callable, Literal, Sequence

import numpy as np
import torch

from satic.errors import SaticError
from satic.training.losses import SCST_SEMANTICS, self_critical

# (candidates (R, T) grouped image-major, R // B rows per image; references: B arrays (M_i, L)) -> (R,)
Scorer = Callable[[np.ndarray, Sequence[np.ndarray]], np.ndarray]


def caption_rewards(
    candidates: np.ndarray,
    references: Sequence[np.ndarray],
    cider: Scorer,
    cider_weight: float,
    bleu: Scorer | None = None,
    bleu_weight: float = 0.0,
) -> np.ndarray:
    """Weighted CIDEr-D (+ BLEU-4) of each candidate row against its image's references -> (R,).

    candidates (R, T): R // B consecutive rows per image; references: B arrays (M_i, L).
    """
    reward = np.zeros(len(candidates), dtype=np.float64)
    if cider_weight > 0:
        reward += cider_weight * np.asarray(cider(candidates, references), dtype=np.float64)
    if bleu_weight > 0:
        if bleu is None:
            raise ValueError("a BLEU-4 reward weight needs a BLEU scorer")
        reward += bleu_weight * np.asarray(bleu(candidates, references), dtype=np.float64)
    return reward


def advantages(
    rewards: np.ndarray,
    sample_n: int,
    baseline: Literal["new", "greedy"],
    greedy_rewards: np.ndarray | None = None,
) -> np.ndarray:
    """reward - baseline per sample; rewards (B*n,) grouped by image, greedy_rewards (B,).

    'new': the mean reward of the image's other samples; 'greedy': the image's greedy caption reward.
    """
    per_image = rewards.reshape(-1, sample_n)  # (B, n)
    if baseline == "new":
        if sample_n < 2:
            raise ValueError("the 'new' baseline needs at least 2 samples per image")
        base = (per_image.sum(1, keepdims=True) - per_image) / (sample_n - 1)  # (B, n)
    else:
        if greedy_rewards is None:
            raise ValueError("the 'greedy' baseline needs the greedy captions' rewards")
        base = np.asarray(greedy_rewards, dtype=np.float64).reshape(-1, 1)  # (B, 1)
    return (per_image - base).reshape(-1)


def policy_loss(model: torch.nn.Module, att_feats: torch.Tensor, att_masks: torch.Tensor | None,
                draws: torch.Tensor, advantages: torch.Tensor, semantics: str = "reference") -> torch.Tensor:
    """The self-critical loss of sampled words: the mean over counted words of -advantage * log p(word).

    att_feats (B, N, D) per image, att_masks (B, N) bool or None; draws (B*S, T) long, image-major: the
    words the sampler drew at every position before finished rows were zeroed (DecodeResult.draws); the
    output rows follow from them by the reference's finishing rule. advantages (B*S,) reward - baseline.
    The log-probs come from one parallel pass (`draw_logprobs`), so this equals the loss of the sampling
    pass itself when dropout is off; the trainer backpropagates through its sampling pass instead, which
    keeps the dropout masks that drew the words. semantics: 'reference' counts what the reference's
    RewardCriterion counts, 'output' only each caption's words and its end (see losses.self_critical)."""
    from satic.decoding import draw_logprobs, output_rows

    if draws.dim() != 2:
        raise SaticError(f"draws must be (rows, length) word ids, got shape {tuple(draws.shape)}")
    if tuple(advantages.shape) != (draws.size(0),):
        raise SaticError(f"advantages have shape {tuple(advantages.shape)} but there are {draws.size(0)} rows of "
                         f"draws; give one advantage per row, shape ({draws.size(0)},)")
    if semantics not in SCST_SEMANTICS:
        raise SaticError(f"semantics={semantics!r}: use one of {', '.join(SCST_SEMANTICS)}")
    logprobs = draw_logprobs(model, att_feats, att_masks, draws)  # (R, T)
    seq = output_rows(draws, model.config.group_size)
    total, count = self_critical(logprobs, seq, advantages.to(logprobs.dtype), semantics)
    return total / count.clamp_min(1.0)
