"""The key/value cache of cached decoding, and the reference's uncached way.

`KVCache` holds each decoder layer's self-attention keys/values in one preallocated buffer, written at
the step's positions (gpt-fast's static cache), so a step computes only the K new positions and its
shapes stay the same from step to step (a step can be recorded once and replayed); `satic.decoding.
engine.Decoder` fills and reads it. `RecomputeStepper` re-runs the decoder over the whole prefix each
step, as the reference does; it exists to check the cache and to measure what the cache saves.
`RerunPrefix` is the reference's way in training: SCST's sampling pass with dropout on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from satic.model.transformer import SATModel, block_mask, mask_bias


class Stepper(Protocol):
    group_size: int

    def step(self, tokens: Tensor) -> Tensor:
        """tokens (R, K) -> float32 log-probs (R, K, V+1) of the next K positions."""

    def reorder(self, index: Tensor) -> None:
        """Make row r continue the prefix of row index[r]; index maps rows within one image."""


def decode_capacity(max_length: int, group_size: int) -> int:
    """Decoder positions that decoding up to max_length words can feed: K zeros + words, in whole groups."""
    return math.ceil(max_length / group_size) * group_size


def longest_max_length(max_positions: int, group_size: int) -> int:
    """The longest max_length a position table of max_positions can decode: whole groups of K within it."""
    return max_positions // group_size * group_size


def visibility(capacity: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(T+1, T) additive bias: row `end` shows the cache slots < end."""
    slots = torch.arange(capacity, device=device)
    ends = torch.arange(capacity + 1, device=device)
    return mask_bias(slots[None, :] < ends[:, None], dtype)


@dataclass
class KVCache:
    """Per decoder layer one (2, R, H, T, dk) buffer of keys and values; slots < length are written."""
    kv: list[Tensor]
    length: int = 0

    def reorder(self, index: Tensor) -> None:
        """Row r continues row index[r]'s prefix (in place: recorded steps keep reading these buffers)."""
        n = self.length
        for kv in self.kv:
            kv[:, :, :, :n] = kv[:, index, :, :n]


class RecomputeStepper:
    """The reference's way: keep the whole input prefix and re-run the decoder over it every step,
    projecting the regions' keys/values again each time."""

    def __init__(self, model: SATModel, att_feats: Tensor, att_masks: Tensor | None, decoder_rows: int) -> None:
        self.model = model
        self.group_size = model.config.group_size
        memory, bias = model.encode(att_feats, att_masks)
        self.memory = memory.repeat_interleave(decoder_rows, 0)  # (R, N, d)
        self.memory_bias = None if bias is None else bias.repeat_interleave(decoder_rows, 0)
        self.prefix = memory.new_zeros((self.memory.size(0), 0), dtype=torch.long)

    def step(self, tokens: Tensor) -> Tensor:
        self.prefix = torch.cat([self.prefix, tokens], 1)  # (R, t+K)
        length = self.prefix.size(1)
        self_bias = mask_bias(block_mask(length, self.group_size, tokens.device), self.memory.dtype)
        hidden = self.model.decode(self.prefix, self.model.memory_kv(self.memory), self.memory_bias, self_bias)
        return self.model.logprobs(hidden[:, -tokens.size(1):])

    def reorder(self, index: Tensor) -> None:
        self.prefix = self.prefix[index]


@dataclass
class RerunPrefix:
    """The state of a differentiable decode that keeps no self-attention keys/values: each step runs the decoder
    over the whole prefix again, as the reference's sampling does, so in train mode every step draws fresh
    dropout masks for every position. (The regions' keys/values, which no dropout touches, are kept.)"""
    tokens: Tensor | None = None  # (R, t): the zeros of the first group and every group fed since

    def extend(self, tokens: Tensor) -> Tensor:
        """Append the newest group (R, K); return the whole prefix (R, t + K)."""
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens], 1)
        return self.tokens
