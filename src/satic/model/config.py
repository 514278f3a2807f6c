"""The SAT model's hyper-parameters: one typed config for every group size K."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # number of words; the model has vocab_size + 1 outputs (index 0 is BOS/EOS/pad)
    group_size: int = 1  # K, words emitted per decoding step; K=1 is the autoregressive teacher
    num_layers: int = 6  # encoder and decoder layers each (reference: num_layers)
    d_model: int = 512  # width of the residual stream (reference: input_encoding_size)
    d_ff: int = 2048  # hidden width of the feed-forward blocks (reference: rnn_size)
    num_heads: int = 8  # attention heads (fixed at 8 in the reference)
    dropout: float = 0.1  # residual, attention, feed-forward and positional dropout
    att_feat_size: int = 2048  # size of one region feature vector
    att_dropout: float = 0.5  # dropout after the region embedding (reference: drop_prob_lm)
    max_positions: int = 5000  # length of the sinusoidal position table (longest decodable caption)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "group_size", "num_layers", "d_model", "d_ff", "num_heads",
                    "att_feat_size", "max_positions")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.d_model % 2:
            raise ValueError(f"d_model ({self.d_model}) must be even for sinusoidal positions")
        for name in ("dropout", "att_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.max_positions < self.group_size:
            raise ValueError(f"max_positions ({self.max_positions}) must be at least group_size ({self.group_size})")

    @property
    def num_outputs(self) -> int:
        return self.vocab_size + 1
