"""Self-critical sequence training: rewards of sampled captions and their baselines."""
from __future__ import annotations

from typing import Callable, Literal, Sequence

import numpy as np
import torch

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


def scored_length(seq: torch.Tensor, group_size: int) -> int:
    """Positions up to the end of the longest row's finishing group (the first group holding a 0), in
    whole groups. Log-probs after a row's finishing group are 0 and a position never depends on later
    ones (block-causal mask), so scoring seq[:, :n] and padding with zeros gives the same numbers with
    less work. seq (R, T) -> n <= T // K * K."""
    rows, groups = seq.size(0), seq.size(1) // group_size
    if groups == 0:
        return 0
    has_zero = (seq[:, : groups * group_size].view(rows, groups, group_size) == 0).any(2)  # (R, G)
    last = torch.where(has_zero.any(1), has_zero.int().argmax(1), groups - 1)  # (R,) finishing group
    return (int(last.max()) + 1) * group_size
