"""Steppers: one decoding step = feed the K newest words of every row, get the next K distributions.

`CachedStepper` runs the encoder once, projects the regions' cross-attention keys/values once, and
keeps each layer's self-attention keys/values in preallocated buffers, so a step computes only the
K new positions; shapes stay the same from step to step, so a step can be traced once and reused.
`RecomputeStepper` re-runs the decoder over the whole prefix each step, as the reference does; it
exists to check the cache and to measure what the cache saves.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from satic.decoding.cuda_graphs import GraphedEncoder, GraphedStep
from satic.errors import SaticError
from satic.model.transformer import NEG_INF, GrowingKV, LayerKV, SATModel, block_mask, mask_bias


class Stepper(Protocol):
    group_size: int

    def step(self, tokens: Tensor) -> Tensor:
        """tokens (R, K) -> float32 log-probs (R, K, V+1) of the next K positions."""

    def reorder(self, index: Tensor) -> None:
        """Make row r continue the prefix of row index[r]; index maps rows within one image."""


def decode_capacity(max_length: int, group_size: int) -> int:
    """Decoder positions that decoding up to max_length words can feed: K zeros + words, in whole groups."""
    return math.ceil(max_length / group_size) * group_size


REGION_BUCKET = 16  # traced steps: regions padded to a multiple of this, so few shapes are traced

# Models whose decoding is recorded once per shape: model -> {shape key: TorchScript step on the CPU;
# GraphedEncoder, or a list of GraphedStep, on CUDA}.
_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def enable_tracing(model: SATModel) -> None:
    """Record `model`'s decoding once per shape and reuse it: far less per-step overhead (which dominates
    at batch 1), at the cost of a fraction of a second per new shape. On the CPU the cached step is
    traced with TorchScript; on CUDA the step and the unmasked encoder are CUDA graphs. Inference only."""
    _TRACED.setdefault(model, {})


class _Step(nn.Module):
    """One cached decoding step with every input a tensor, so that torch.jit.trace can record it."""

    def __init__(self, model: SATModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, positions: Tensor, self_bias: Tensor, memory_bias: Tensor,
                memory_kv: tuple[LayerKV, ...], caches: tuple[Tensor, ...]) -> Tensor:
        hidden = self.model.decode(tokens, list(memory_kv), memory_bias, self_bias, list(caches), positions)
        return self.model.logprobs(hidden)


def _pad_regions(kv: list[LayerKV], bias: Tensor | None) -> tuple[list[LayerKV], Tensor]:
    """Regions' keys/values (B, H, N, dk) -> N' a multiple of REGION_BUCKET, the padding hidden by the bias.
    Padded after projection, so that int8 activation scales see only the real regions."""
    batch, _, regions, _ = kv[0][0].shape
    extra = -(-regions // REGION_BUCKET) * REGION_BUCKET - regions
    if bias is None:
        bias = kv[0][0].new_zeros(batch, 1, 1, regions)
    kv = [(F.pad(k, (0, 0, 0, extra)), F.pad(v, (0, 0, 0, extra))) for k, v in kv]
    return kv, F.pad(bias, (0, extra), value=NEG_INF)


def visibility(capacity: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(T+1, T) additive bias: row `end` shows the cache slots < end."""
    slots = torch.arange(capacity, device=device)
    ends = torch.arange(capacity + 1, device=device)
    return mask_bias(slots[None, :] < ends[:, None], dtype)


class CachedStepper:
    def __init__(self, model: SATModel, att_feats: Tensor, att_masks: Tensor | None, decoder_rows: int,
                 max_length: int) -> None:
        c = model.config
        self.model = model
        self.group_size = c.group_size
        self.traces = _TRACED.get(model)
        self.decoder_rows = decoder_rows
        rows = att_feats.size(0) * decoder_rows
        capacity = decode_capacity(max_length, c.group_size)
        if capacity > c.max_positions:
            raise SaticError(f"max_length {max_length} needs {capacity} positions but the model has "
                             f"max_positions={c.max_positions}")
        graphed = self.traces is not None and att_feats.device.type == "cuda"
        if graphed:
            memory_kv, bias = self._graphed_prefill(att_feats, att_masks)
        else:
            memory_kv, bias = self._prefill(att_feats, att_masks)
        self.memory_kv, self.memory_bias = memory_kv, bias  # per image: its rows share them in cross-attention
        shape = (2, rows, c.num_heads, capacity, c.d_model // c.num_heads)  # keys and values
        dtype, device = memory_kv[0][0].dtype, memory_kv[0][0].device
        self.length = 0
        self.graph: GraphedStep | None = None
        if graphed:
            self.graph = self._graphed_step(rows, shape)
            self.memory_kv, self.memory_bias, self.caches = self.graph.memory_kv, self.graph.memory_bias, self.graph.caches
        else:
            self.visible = visibility(capacity, dtype, device)
            self.caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.num_layers)]

    def _prefill(self, att_feats: Tensor, att_masks: Tensor | None, check: bool = True
                 ) -> tuple[list[LayerKV], Tensor | None]:
        """Encoder and the regions' keys/values, padded to the region bucket when steps are recorded."""
        memory, bias = self.model.encode(att_feats, att_masks, check)  # (B, N, d)
        memory_kv = self.model.memory_kv(memory, bias)
        return (memory_kv, bias) if self.traces is None else _pad_regions(memory_kv, bias)

    def _graphed_prefill(self, att_feats: Tensor, att_masks: Tensor | None) -> tuple[list[LayerKV], Tensor]:
        """`_prefill`, recorded per shape when unmasked (a mask needs the data-dependent packing, which
        runs eagerly); the input checks run first, on the real input."""
        self.model.check_features(att_feats, att_masks)
        if att_masks is not None and not bool(att_masks.all()):
            return self._prefill(att_feats, att_masks, check=False)
        key = ("encoder", tuple(att_feats.shape), att_feats.dtype, att_feats.device)
        if key not in self.traces:
            self.traces[key] = GraphedEncoder(lambda feats: self._prefill(feats, None, check=False), att_feats)
        return self.traces[key](att_feats)

    def _graphed_step(self, rows: int, cache_shape: tuple[int, ...]) -> GraphedStep:
        """A free recorded step for this decode's shapes (recorded now if there is none), loaded with its images."""
        k = self.group_size
        key = ("step", rows, k, tuple(self.memory_bias.shape), cache_shape, self.memory_bias.dtype,
               self.memory_bias.device)
        graphs = self.traces.setdefault(key, [])
        graph = next((g for g in graphs if g.free()), None)
        if graph is None:
            tokens = torch.zeros(rows, k, dtype=torch.long, device=self.memory_bias.device)
            caches = [self.memory_bias.new_zeros(cache_shape) for _ in range(self.model.config.num_layers)]
            visible = visibility(cache_shape[3], self.memory_bias.dtype, self.memory_bias.device)
            graph = GraphedStep(_Step(self.model).eval(), tokens, self.memory_kv, self.memory_bias, caches, visible)
            graphs.append(graph)
        graph.load(self, self.memory_kv, self.memory_bias)
        return graph

    def step(self, tokens: Tensor) -> Tensor:
        start, end = self.length, self.length + tokens.size(1)
        self.length = end
        if self.graph is not None:
            return self.graph(tokens, start)
        if start == 0 and self.decoder_rows > 1 and not self.model.training:  # dropout: each row its own
            return self._first_step_per_image(tokens)
        return self._run(tokens, start, self.caches)

    def _first_step_per_image(self, tokens: Tensor) -> Tensor:
        """The first step feeds the same K zeros to every row of an image, so compute it once per image (on
        the caches' first B rows) and copy it to the image's rows: at K=4 with beam 3 on the CPU, a step
        of 4 rows instead of 12. (GPU graphs keep one shape: there a row costs next to nothing.)"""
        rows = self.decoder_rows
        images = tokens.size(0) // rows
        logprobs = self._run(tokens[::rows], 0, [c[:, :images] for c in self.caches])  # (B, K, V+1)
        self.reorder(torch.arange(images, device=tokens.device).repeat_interleave(rows))
        return logprobs.repeat_interleave(rows, 0)

    def _run(self, tokens: Tensor, start: int, caches: list[Tensor]) -> Tensor:
        end = start + tokens.size(1)
        positions = torch.arange(start, end, device=tokens.device)
        self_bias = self.visible[end].view(1, 1, 1, -1)
        if self.traces is None:
            return self.model.logprobs(self.model.decode(tokens, self.memory_kv, self.memory_bias, self_bias,
                                                         caches, positions))
        inputs = (tokens, positions, self_bias, self.memory_bias, tuple(self.memory_kv), tuple(caches))
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs[:4]) + (len(caches),)
        if key not in self.traces:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript is deprecated; tracing still works
                self.traces[key] = torch.jit.freeze(torch.jit.trace(_Step(self.model).eval(), inputs, check_trace=False))
        return self.traces[key](*inputs)  # (R, K, V+1)

    def reorder(self, index: Tensor) -> None:
        n = self.length
        for kv in self.caches:
            kv[:, :, :, :n] = kv[:, index, :, :n]


class AutogradStepper:
    """Cached decoding that autograd can differentiate, for self-critical training: the reference
    backpropagates through the pass that sampled the words, so the log-probs in the loss come from the
    dropout masks that drew them. The encoder runs once per image (not once per row); keys/values grow by
    concatenation (GrowingKV), and every row runs every step, step 0 included (each row draws its own
    dropout masks there, as in the reference). Sampling only: no reorder."""

    def __init__(self, model: SATModel, att_feats: Tensor, att_masks: Tensor | None, max_length: int) -> None:
        c = model.config
        if decode_capacity(max_length, c.group_size) > c.max_positions:
            raise SaticError(f"max_length {max_length} needs more than the model's max_positions={c.max_positions}")
        self.model = model
        self.group_size = c.group_size
        memory, self.memory_bias = model.encode(att_feats, att_masks)  # (B, N, d)
        self.memory_kv = model.memory_kv(memory, self.memory_bias)  # per image: its rows share them
        self.caches = [GrowingKV() for _ in range(c.num_layers)]
        self.length = 0

    def step(self, tokens: Tensor) -> Tensor:
        start, end = self.length, self.length + tokens.size(1)
        self.length = end
        positions = torch.arange(start, end, device=tokens.device)
        hidden = self.model.decode(tokens, self.memory_kv, self.memory_bias, None, self.caches, positions)
        return self.model.logprobs(hidden)  # (R, K, V+1)

    def reorder(self, index: Tensor) -> None:
        raise NotImplementedError("AutogradStepper samples; beam search reorders rows and runs without grad")


class RecomputeStepper:
    """The reference's way: keep the whole input prefix and re-run the decoder over it every step,
    projecting the regions' keys/values again each time."""

    def __init__(self, model: SATModel, att_feats: Tensor, att_masks: Tensor | None, decoder_rows: int,
                 max_length: int) -> None:
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


def make_stepper(model: SATModel, att_feats: Tensor, att_masks: Tensor | None, decoder_rows: int,
                 max_length: int, use_cache: bool = True) -> Stepper:
    cls = CachedStepper if use_cache else RecomputeStepper
    return cls(model, att_feats, att_masks, decoder_rows, max_length)
