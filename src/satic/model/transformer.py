"""The SAT encoder-decoder Transformer: one class for every group size K (K=1 is the teacher).

Numerically the reference's "Annotated Transformer" (its LayerNorm, pre-norm blocks, final norms,
sqrt(d_model) word scale, sinusoidal positions, -1e9 masking), with fused projections so that a
decoding step runs few, large matrix products. Decoding loops live in `satic.decoding`; this file
only gives them `encode`, `memory_kv`, `decode` (with an optional key/value cache) and `logprobs`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from satic.errors import SaticError, library_reason
from satic.model.config import ModelConfig
from satic.model.layers import Dropout, LayerNorm, RegionPacking

NEG_INF = -1e9  # the reference's mask value; exp() of it underflows to exactly 0 in float32

LayerKV = tuple[Tensor, Tensor]  # keys and values, each (R, H, T, dk)
# A layer's self-attention cache: keys and values in one buffer (2, R, H, T, dk), written with one copy.


def sinusoid_table(length: int, d_model: int) -> Tensor:
    """(length, d_model) sinusoidal positions, computed exactly as the reference does."""
    position = torch.arange(0, length).unsqueeze(1).float()
    div_term = torch.exp(torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table


def block_mask(length: int, group_size: int, device: torch.device | None = None) -> Tensor:
    """(L, L) bool: position i may attend to j iff j's group is not after i's (K=1: causal)."""
    group = torch.arange(length, device=device) // group_size  # (L,)
    return group[None, :] <= group[:, None]


def training_mask(tokens: Tensor, group_size: int) -> Tensor:
    """(R, L, L) bool: the block mask, and zero tokens hidden as keys except position 0 (training rule)."""
    keys = tokens > 0  # (R, L)
    keys[:, 0] = True
    return keys[:, None, :] & block_mask(tokens.size(1), group_size, tokens.device)[None]


def mask_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask (True = visible) -> additive bias (0 or -1e9), the reference's masked_fill in effect."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, NEG_INF)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(R, L, d) -> (R, H, L, dk)."""
    r, length, d = x.shape
    return x.view(r, length, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(R, H, L, dk) -> (R, L, d)."""
    r, h, length, dk = x.shape
    return x.transpose(1, 2).reshape(r, length, h * dk)


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout: Dropout) -> Tensor:
    """Scaled dot-product attention in the reference's order of operations. q (R,H,Lq,dk) -> (R,H,Lq,dk).
    On a GPU without dropout, torch's fused kernel computes the same function: one launch instead of five,
    which is most of a small batch's cost there."""
    if q.device.type == "cuda" and not (dropout.training and dropout.p > 0):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (R, H, Lq, Lk)
    if bias is not None:
        scores = scores + bias
    return torch.matmul(dropout(F.softmax(scores, dim=-1)), v)


class GrowingKV:
    """A self-attention cache that grows by concatenation instead of being written in place: autograd then
    keeps every step's keys/values, so a loss can backpropagate through a whole cached decode (SCST)."""

    def __init__(self) -> None:
        self.kv: Tensor | None = None  # (2, R, H, T, dk)

    def extend(self, kv: Tensor) -> Tensor:
        """Append the newest positions' keys and values (2, R, H, L, dk); return all of them."""
        self.kv = kv if self.kv is None else torch.cat([self.kv, kv], 3)
        return self.kv


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and an optional key/value cache."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = Dropout(dropout)
        self.attend = attend  # inference on the CPU swaps in one fused call (satic.decoding.small_gemm)

    def forward(self, x: Tensor, bias: Tensor | None, cache: Tensor | GrowingKV | None = None,
                positions: Tensor | None = None, packing: RegionPacking | None = None,
                queries: int | None = None) -> Tensor:
        """x (R, L, d), or packed (T, d) regions with their `packing`. With a cache (2, R, H, T, dk), the new
        keys/values are written at `positions` (L,) and the queries attend over the whole buffer: `bias`
        hides the slots not written yet. Shapes stay static from step to step, so a step can be traced or
        compiled once. A GrowingKV instead appends them (every key is then visible: bias None).
        queries=n: only the last n positions ask (R, n, d out); every position is still a key and a value."""
        qkv = self.qkv(x)  # (R, L, 3d) or (T, 3d)
        if packing is not None:
            qkv = packing.pad(qkv)  # (B, N, 3d)
        r, length, d3 = qkv.shape
        dk = d3 // (3 * self.num_heads)
        qkv = qkv.view(r, length, 3, self.num_heads, dk).permute(2, 0, 3, 1, 4)  # (3, R, H, L, dk)
        q, k, v = qkv
        if queries is not None:
            q = q[:, :, -queries:]
        if isinstance(cache, GrowingKV):
            k, v = cache.extend(qkv[1:])  # (R, H, t + L, dk) each
        elif cache is not None:
            cache.index_copy_(3, positions, qkv[1:])
            k, v = cache  # (R, H, T, dk) each
        out = merge_heads(self.attend(q, k, v, bias, self.dropout))  # (R, L, d)
        return self.out(out if packing is None else packing.pack(out))


class CrossAttention(nn.Module):
    """Attention from words to regions; the regions' keys/values are projected once per image."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = Dropout(dropout)
        self.attend = attend

    def project_memory(self, memory: Tensor, packing: RegionPacking | None = None) -> LayerKV:
        """memory (B, N, d), or its valid regions (T, d) with their `packing` -> keys and values, each
        (B, H, N, dk); packed, the padded regions' keys/values are 0 (the bias hides them anyway)."""
        kv = self.kv(memory)  # (B, N, 2d) or (T, 2d)
        k, v = (kv if packing is None else packing.pad(kv)).chunk(2, dim=-1)
        # contiguous once per image, not a strided copy inside every decoding step's matmul
        return split_heads(k, self.num_heads).contiguous(), split_heads(v, self.num_heads).contiguous()

    def forward(self, x: Tensor, memory_kv: LayerKV, bias: Tensor | None) -> Tensor:
        """x (R, L, d); memory_kv per image (B, H, N, dk) with R = B * S rows, image-major (or per row).
        The S rows of an image are one query block of S * L positions: no per-row copies of the regions."""
        rows, length, d = x.shape
        batch = memory_kv[0].size(0)
        q = split_heads(self.q(x).view(batch, -1, d), self.num_heads)  # (B, H, S*L, dk)
        out = merge_heads(self.attend(q, *memory_kv, bias, self.dropout))  # (B, S*L, d)
        return self.out(out.reshape(rows, length, d))  # not view: with one number per head (d = H) it is strided


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.dropout(F.relu(self.w1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.norm1 = LayerNorm(c.d_model)
        self.attn = SelfAttention(c.d_model, c.num_heads, c.dropout)
        self.norm2 = LayerNorm(c.d_model)
        self.ffn = FeedForward(c.d_model, c.d_ff, c.dropout)
        self.dropout = Dropout(c.dropout)

    def forward(self, x: Tensor, bias: Tensor | None, packing: RegionPacking | None = None) -> Tensor:
        """x (B, N, d), or the valid regions (T, d) of `packing`."""
        x = x + self.dropout(self.attn(self.norm1(x), bias, packing=packing))
        return x + self.dropout(self.ffn(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.norm1 = LayerNorm(c.d_model)
        self.self_attn = SelfAttention(c.d_model, c.num_heads, c.dropout)
        self.norm2 = LayerNorm(c.d_model)
        self.cross_attn = CrossAttention(c.d_model, c.num_heads, c.dropout)
        self.norm3 = LayerNorm(c.d_model)
        self.ffn = FeedForward(c.d_model, c.d_ff, c.dropout)
        self.dropout = Dropout(c.dropout)

    def forward(self, x: Tensor, memory_kv: LayerKV, memory_bias: Tensor | None, self_bias: Tensor | None,
                cache: Tensor | None = None, positions: Tensor | None = None, queries: int | None = None) -> Tensor:
        """x (R, L, d) -> (R, L, d); queries=n: the last n positions' outputs only (R, n, d), attending over all L."""
        normed = self.norm1(x)
        if queries is not None:
            x = x[:, -queries:]
            self_bias = None if self_bias is None else self_bias[..., -queries:, :]
        x = x + self.dropout(self.self_attn(normed, self_bias, cache, positions, queries=queries))
        x = x + self.dropout(self.cross_attn(self.norm2(x), memory_kv, memory_bias))
        return x + self.dropout(self.ffn(self.norm3(x)))


def all_finite(tensor: Tensor) -> bool:
    """No NaN or infinity in `tensor`. One pass over it: its least and greatest values carry any NaN or infinity
    (about 10x faster than torch.isfinite(tensor).all() on the CPU, which makes tensors of its steps)."""
    if not tensor.numel():
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


FUSED_PROJECTIONS = ("qkv.weight", "kv.weight")  # query/key/value blocks stacked along the output rows


class SATModel(nn.Module):
    """Semi-autoregressive captioning Transformer; `config.group_size` words per decoding step."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.region_embed = nn.Linear(c.att_feat_size, c.d_model)
        # On the meta device (a model without storage, to count its bytes or check a layout) nothing is computed:
        # torch runs some ops there (normal_, arange) through torch._dynamo, whose import takes over a second.
        meta = self.region_embed.weight.is_meta
        self.region_dropout = Dropout(c.att_dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.num_layers))
        self.encoder_norm = LayerNorm(c.d_model)
        self.word_embed = nn.Embedding(c.num_outputs, c.d_model,  # N(0, 1), then Xavier below
                                       _weight=torch.empty(c.num_outputs, c.d_model) if meta else None)
        self.embed_dropout = Dropout(c.dropout)
        self.decoder_layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.decoder_norm = LayerNorm(c.d_model)
        self.generator = nn.Linear(c.d_model, c.num_outputs)
        # Not saved: a pure function of the config (the reference saves it; import checks it).
        positions = torch.empty(c.max_positions, c.d_model) if meta else sinusoid_table(c.max_positions, c.d_model)
        self.register_buffer("positions", positions, persistent=False)
        for name, p in self.named_parameters():
            # The reference Xavier-initialises every matrix of the encoder-decoder, not the region embedding.
            # Its projections are separate d x d matrices: a fused one is initialised a block at a time, so
            # each block gets the d x d bound, sqrt(6 / 2d), not the narrower one of the fused shape.
            if p.dim() > 1 and not name.startswith("region_embed"):
                for block in p.data.split(p.size(1)) if name.endswith(FUSED_PROJECTIONS) else (p.data,):
                    nn.init.xavier_uniform_(block)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of activations (float32, or bfloat16 after prepare_for_inference)."""
        return self.positions.dtype

    def check_features(self, att_feats: Tensor, att_masks: Tensor | None) -> None:
        """Raise a SaticError naming the mismatch, instead of a shape error deep in a matmul."""
        size = self.config.att_feat_size
        if att_feats.dim() != 3 or att_feats.size(-1) != size:
            raise SaticError(f"region features have shape {tuple(att_feats.shape)} but this model expects "
                             f"(batch, regions, {size}); use features of size {size} or a model trained on yours")
        if att_feats.size(1) == 0:
            raise SaticError("region features have no regions; every image needs at least one region")
        if att_masks is not None:
            if att_masks.shape != att_feats.shape[:2]:
                raise SaticError(f"region mask has shape {tuple(att_masks.shape)} but the features have "
                                 f"{tuple(att_feats.shape[:2])} (batch, regions)")
            if not bool(att_masks.any(1).all()):
                raise SaticError("an image has no valid region in att_masks; every image needs at least one")
        if not all_finite(att_feats):
            raise SaticError("region features contain NaN or infinite values; check the feature files")

    def encode(self, att_feats: Tensor, att_masks: Tensor | None = None, check: bool = True
               ) -> tuple[Tensor, Tensor | None]:
        """att_feats (B, N, D), att_masks (B, N) bool or None -> memory (B, N', d), bias (B, 1, 1, N') or None.

        Trailing all-padding regions are cropped (the reference's clip_att). With a mask, every row-wise
        layer runs on the valid regions only (packed); the padding is hidden from attention as keys, so
        what it would hold never matters, and its memory rows are zero. check=False skips the input
        checks, which wait for the device (a CUDA graph records only after they ran on the real input)."""
        if check:
            self.check_features(att_feats, att_masks)
        att_feats = att_feats.to(self.dtype)
        if att_masks is not None and bool(att_masks.all()):
            att_masks = None  # nothing padded: no packing, no bias
        if att_masks is None:
            x = self.region_dropout(F.relu(self.region_embed(att_feats)))  # (B, N, d)
            for layer in self.encoder_layers:
                x = layer(x, None)
            return self.encoder_norm(x), None
        att_masks = att_masks.bool()
        valid = int(att_masks.any(0).nonzero().max()) + 1
        att_masks = att_masks[:, :valid]
        packing = RegionPacking(att_masks)
        x = self.region_dropout(F.relu(self.region_embed(packing.pack(att_feats[:, :valid]))))  # (T, d)
        bias = mask_bias(att_masks, x.dtype)[:, None, None, :]  # (B, 1, 1, N)
        for layer in self.encoder_layers:
            x = layer(x, bias, packing)
        return packing.pad(self.encoder_norm(x)), bias

    def memory_kv(self, memory: Tensor, memory_bias: Tensor | None = None) -> list[LayerKV]:
        """Cross-attention keys/values of every decoder layer, computed once per image. Given encode's
        bias (B, 1, 1, N), only the valid regions are projected (the same numbers, less work)."""
        if memory_bias is None:
            return [layer.cross_attn.project_memory(memory) for layer in self.decoder_layers]
        packing = RegionPacking(memory_bias.view(memory_bias.size(0), -1) == 0)  # bias 0 = a real region
        rows = packing.pack(memory)  # (T, d)
        return [layer.cross_attn.project_memory(rows, packing) for layer in self.decoder_layers]

    def embed_words(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """tokens (R, L) at `positions` (L,) (default 0..L-1) -> (R, L, d)."""
        if positions is None:
            if tokens.size(1) > self.config.max_positions:
                raise SaticError(f"a sequence of {tokens.size(1)} positions exceeds max_positions="
                                 f"{self.config.max_positions}; use shorter captions or a larger max_positions")
            table = self.positions[: tokens.size(1)]
        else:
            table = self.positions[positions]
        x = self.word_embed(tokens) * math.sqrt(self.config.d_model)
        return self.embed_dropout(x + table)

    def decode(self, tokens: Tensor, memory_kv: list[LayerKV], memory_bias: Tensor | None,
               self_bias: Tensor | None, caches: list[Tensor] | list[GrowingKV] | None = None,
               positions: Tensor | None = None, last: int | None = None) -> Tensor:
        """tokens (R, L) -> final decoder states (R, L, d). memory_kv and memory_bias hold either one entry
        per row or one per image (R = B * S rows, image-major; the cheaper form). Without caches, the tokens are
        positions 0..L-1 and `self_bias` masks them; with caches they are the newest group, at `positions` (L,), and
        `self_bias` (.., T) hides the cache slots not written yet.
        last=n: the states of the last n positions only (R, n, d). The layers below the top compute every
        position (the top layer's keys and values); the top layer computes the n queries alone."""
        x = self.embed_words(tokens, positions)
        top = len(self.decoder_layers) - 1
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, memory_kv[i], memory_bias, self_bias, None if caches is None else caches[i], positions,
                      last if i == top else None)
        return self.decoder_norm(x)

    def logprobs(self, hidden: Tensor) -> Tensor:
        """(..., d) -> float32 log-probabilities (..., V+1)."""
        return F.log_softmax(self.generator(hidden).float(), dim=-1)

    def forward(self, att_feats: Tensor, att_masks: Tensor | None, seq: Tensor) -> Tensor:
        """Training pass. seq = labels[:, :-1] (B*S, L+1) -> log-probs (B*S, L+1, V+1); output p predicts
        labels[:, p+1].

        The reference's layout: K-1 zeros are prepended, the row is cut to a multiple of K minus
        one, and each group of K positions predicts the next K words from the words before it."""
        batch, (rows, length) = att_feats.size(0), seq.shape
        if rows % batch:
            raise SaticError(f"{rows} caption rows do not divide evenly among {batch} images")
        k = self.config.group_size
        memory, memory_bias = self.encode(att_feats, att_masks)
        memory_kv = self.memory_kv(memory, memory_bias)  # per image; an image's rows share them
        decoder_len = (length + k) // k * k - 1
        tokens = torch.cat([seq.new_zeros(rows, k - 1), seq], 1)[:, :decoder_len]  # (B*S, decoder_len)
        self_bias = mask_bias(training_mask(tokens, k), memory.dtype)[:, None]  # (B*S, 1, L, L)
        hidden = self.decode(tokens, memory_kv, memory_bias, self_bias)
        return self.logprobs(hidden[:, :length])


BUILD_ERRORS = (TypeError, ValueError, OverflowError, RuntimeError, SystemError, MemoryError)  # sizes torch refuses


def _bytes(model: SATModel) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def model_bytes(config: ModelConfig) -> int:
    """Bytes of the model's weights and buffers, counted on models without storage of one and two layers (one of
    num_layers layers is not built to count it)."""
    with torch.device("meta"):
        one, two = (SATModel(dataclasses.replace(config, num_layers=n)) for n in (1, 2))
    return _bytes(one) + (config.num_layers - 1) * (_bytes(two) - _bytes(one))


def build_model(config: ModelConfig, source: str, fix: str, weights: Mapping[str, Tensor] | None = None,
                shell: SATModel | None = None) -> SATModel:
    """SATModel(config); where torch cannot make it, or it would not fit the machine's memory, one message that
    names `source` (what gave the sizes) and `fix`, before anything of that size is allocated.

    weights: a whole state dict, whose tensors become the model's own as they are (the caller owns them): nothing
    is initialised only to be overwritten (over a second for a COCO-size model on a CPU), and nothing is copied
    here. The position table, which is not saved, is computed as in __init__. shell: SATModel(config) made on the
    meta device, if the caller has one (it is counted, and takes the weights, in place of one made here)."""
    from satic.device import beyond_memory

    sizes = (f"num_layers {config.num_layers}, d_model {config.d_model}, d_ff {config.d_ff}, max_positions "
             f"{config.max_positions}")
    try:
        over = beyond_memory(model_bytes(config) if shell is None else _bytes(shell), torch.device("cpu"))
        if over is not None:
            raise SaticError(f"{source} describes a model ({sizes}) of {over}; {fix}")
        if weights is None:
            return SATModel(config)
        if shell is None:
            with torch.device("meta"):
                shell = SATModel(config)
        shell.load_state_dict(weights, strict=True, assign=True)
        shell.positions = sinusoid_table(config.max_positions, config.d_model)
        return shell
    except BUILD_ERRORS as err:
        raise SaticError(f"{source}: cannot build the model it describes ({sizes}: {library_reason(err)}); "
                         f"{fix}") from None
