"""Decoding on a GPU: CUDA graphs and a fused norm. A batch-1 decoding step there is a few hundred
tiny kernels, so its time goes to launching them from Python (the reference spends ~68 ms per
caption on an H200 this way). Each step, and the encoder for unmasked batches, is recorded once per
shape as a CUDA graph over static buffers; a replay is one launch. The recordings belong to one
Decoder (satic.decoding.engine) and are reused by its later decodes of the same shape. Within a
step the reference norm is the largest group of kernels (7 per norm, 19 norms); `CompiledReferenceNorm` makes it one."""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import Tensor

from satic.model.layers import InferenceNorm, LayerNorm, reference_norm
from satic.model.transformer import LayerKV

WARMUP_RUNS = 2  # eager runs on a side stream before recording, as torch requires (library handles, workspaces)


def record(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """Record fn() as a CUDA graph; returns it with fn's outputs, which every replay overwrites in place.
    Every tensor fn reads must outlive the graph (an attribute of its owner): a replay reads the memory
    the recording saw, whatever holds it by then."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


class GraphedEncoder:
    """The once-per-image work for unmasked (B, N, D) features: encoder, the regions' cross-attention
    keys/values, padded to the step's region bucket. `prefill(att_feats)` -> (memory_kv, bias)."""

    def __init__(self, prefill: Callable[[Tensor], tuple[list[LayerKV], Tensor]], att_feats: Tensor) -> None:
        self.att_feats = att_feats.clone()
        self.graph, self.outputs = record(lambda: prefill(self.att_feats))

    def __call__(self, att_feats: Tensor) -> tuple[list[LayerKV], Tensor]:
        """Valid until the next call: the step graph copies them in at once."""
        self.att_feats.copy_(att_feats)
        self.graph.replay()
        return self.outputs


class GraphedStep:
    """One cached decoding step over static buffers: the images' keys/values and bias (loaded once per
    decode), the self-attention caches (written by the graph at the step's positions; beam search
    reorders them in place) and the step's tokens and first position (copied in per step; the positions
    and the caches' visibility are computed inside the graph). One decode at a time uses it: `owner` is
    the decode state that loaded it."""

    def __init__(self, step: Callable[..., Tensor], tokens: Tensor, memory_kv: list[LayerKV], memory_bias: Tensor,
                 caches: list[Tensor], visible: Tensor) -> None:
        self.tokens = tokens.clone()  # (R, K)
        self.start = torch.zeros((), dtype=torch.long, device=tokens.device)
        self.memory_kv = [(k.clone(), v.clone()) for k, v in memory_kv]
        self.memory_bias = memory_bias.clone()
        self.caches = [c.clone() for c in caches]
        self.visible = visible.clone()  # (T+1, T): row `end` is the bias that shows cache slots < end
        self.offsets = torch.arange(tokens.size(1), device=tokens.device)  # kept: the graph reads its memory
        self.owner: weakref.ref | None = None

        def run() -> Tensor:
            positions = self.start + self.offsets  # (K,)
            self_bias = self.visible.index_select(0, positions[-1:] + 1).view(1, 1, 1, -1)
            return step(self.tokens, positions, self_bias, self.memory_bias, tuple(self.memory_kv), tuple(self.caches))

        self.graph, self.logprobs = record(run)

    def free(self) -> bool:
        return self.owner is None or self.owner() is None

    def load(self, owner: object, memory_kv: list[LayerKV], memory_bias: Tensor) -> None:
        """Take the images of a new decode: their keys/values in, the caches emptied."""
        self.owner = weakref.ref(owner)
        for (k, v), (new_k, new_v) in zip(self.memory_kv, memory_kv):
            k.copy_(new_k)
            v.copy_(new_v)
        self.memory_bias.copy_(memory_bias)
        for cache in self.caches:
            cache.zero_()  # unwritten slots are masked, but a stale NaN would still poison 0 * NaN

    def __call__(self, tokens: Tensor, start: int) -> Tensor:
        """tokens (R, K) at positions start.. -> log-probs (R, K, V+1)."""
        self.tokens.copy_(tokens)
        self.start.fill_(start)
        self.graph.replay()
        return self.logprobs.clone()  # the next replay overwrites the static output


def _norm_rows(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """The inference LayerNorm over rows flattened to 2-D (fewer shape specialisations to compile)."""
    rows = x.reshape(-1, x.size(-1))
    return torch.addcmul(bias, reference_norm(rows, eps)[0], weight).view(x.shape)


def compiler_available() -> bool:
    """torch.compile can build GPU kernels here (it needs Triton)."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


class CompiledReferenceNorm(InferenceNorm):
    """The model's LayerNorm for GPU inference as one kernel made by torch.compile (shapes dynamic: one
    build per dtype, a few seconds, the first time a step is recorded)."""

    def __init__(self, norm: LayerNorm) -> None:
        super().__init__(norm)
        self.fused = torch.compile(_norm_rows, dynamic=True, fullgraph=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fused(x, self.weight, self.bias, self.eps)
