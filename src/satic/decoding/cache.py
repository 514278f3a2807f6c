"""Steppers: one decoding step = feed the K newest words of every row, get the next K distributions.

`CachedStepper` runs the encoder once, projects the regions' cross-attention keys/values once, and
keeps each layer's self-attention keys/values in preallocated buffers, so a step computes only the
K new positions. `RecomputeStepper` re-runs the decoder over the whole prefix each step, as the
reference does; it exists to check the cache and to measure what the cache saves.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from satic.errors import SaticError
from satic.model.transformer import LayerKV, SATModel, block_mask, mask_bias


class Stepper(Protocol):
    group_size: int

    def step(self, tokens: Tensor) -> Tensor:
        """tokens (R, K) -> float32 log-probs (R, K, V+1) of the next K positions."""

    def reorder(self, index: Tensor) -> None:
        """Make row r continue the prefix of row index[r]; index maps rows within one image."""


def _expand(kv: list[LayerKV], bias: Tensor | None, rows_per_image: int) -> tuple[list[LayerKV], Tensor | None]:
    """Per-image memory keys/values -> per-row (B*n rows, image-major)."""
    if rows_per_image > 1:
        kv = [(k.repeat_interleave(rows_per_image, 0), v.repeat_interleave(rows_per_image, 0)) for k, v in kv]
        bias = None if bias is None else bias.repeat_interleave(rows_per_image, 0)
    return kv, bias


def decode_capacity(max_length: int, group_size: int) -> int:
    """Decoder positions that decoding up to max_length words can feed: K zeros + words, in whole groups."""
    return math.ceil(max_length / group_size) * group_size


class CachedStepper:
    def __init__(self, model: SATModel, att_feats: Tensor, att_masks: Tensor | None, rows_per_image: int,
                 max_length: int) -> None:
        c = model.config
        self.model = model
        self.group_size = c.group_size
        memory, bias = model.encode(att_feats, att_masks)  # (B, N, d)
        self.memory_kv, self.memory_bias = _expand(model.memory_kv(memory), bias, rows_per_image)
        rows = att_feats.size(0) * rows_per_image
        capacity = decode_capacity(max_length, c.group_size)
        if capacity > c.max_positions:
            raise SaticError(f"max_length {max_length} needs {capacity} positions but the model has "
                             f"max_positions={c.max_positions}")
        shape = (2, rows, c.num_heads, capacity, c.d_model // c.num_heads)  # keys and values
        self.caches = [memory.new_zeros(shape) for _ in range(c.num_layers)]
        self.length = 0

    def step(self, tokens: Tensor) -> Tensor:
        hidden = self.model.decode(tokens, self.memory_kv, self.memory_bias, None, self.caches, self.length)
        self.length += tokens.size(1)
        return self.model.logprobs(hidden)  # (R, K, V+1)

    def reorder(self, index: Tensor) -> None:
        n = self.length
        for kv in self.caches:
            kv[:, :, :, :n] = kv[:, index, :, :n]


class RecomputeStepper:
    """The reference's way: keep the whole input prefix and re-run the decoder over it every step,
    projecting the regions' keys/values again each time."""

    def __init__(self, model: SATModel, att_feats: Tensor, att_masks: Tensor | None, rows_per_image: int,
                 max_length: int) -> None:
        self.model = model
        self.group_size = model.config.group_size
        memory, bias = model.encode(att_feats, att_masks)
        self.memory = memory.repeat_interleave(rows_per_image, 0)  # (R, N, d)
        self.memory_bias = None if bias is None else bias.repeat_interleave(rows_per_image, 0)
        self.prefix = memory.new_zeros((self.memory.size(0), 0), dtype=torch.long)

    def step(self, tokens: Tensor) -> Tensor:
        self.prefix = torch.cat([self.prefix, tokens], 1)  # (R, t+K)
        length = self.prefix.size(1)
        self_bias = mask_bias(block_mask(length, self.group_size, tokens.device), self.memory.dtype)
        hidden = self.model.decode(self.prefix, self.model.memory_kv(self.memory), self.memory_bias, self_bias)
        return self.model.logprobs(hidden[:, -tokens.size(1):])

    def reorder(self, index: Tensor) -> None:
        self.prefix = self.prefix[index]


def make_stepper(model: SATModel, att_feats: Tensor, att_masks: Tensor | None, rows_per_image: int,
                 max_length: int, use_cache: bool = True) -> Stepper:
    cls = CachedStepper if use_cache else RecomputeStepper
    return cls(model, att_feats, att_masks, rows_per_image, max_length)
