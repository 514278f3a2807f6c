"""The decoding engine: `Decoder` runs a model's `prefill` (encoder, the regions' keys/values, an empty
key/value cache) and its `step` (K new words in, the next K distributions out) over a static cache.

    decoder = Decoder.prepare(model, "fp32", "cpu", compile=True)
    state = decoder.prefill(att_feats, att_masks, decoder_rows=1, max_length=20)
    logprobs = decoder.step(state, tokens)             # (R, K) -> (R, K, V+1)

The search loops in `satic.decoding.search` drive a `DecodeState` (it has `step` and `reorder`). With
compile=True, on the CPU with the small-row kernel, every step is one native call (`csrc/decoder.cpp`;
fp32 or int8 weights) for any shape, nothing recorded, and greedy decoding, sampling and beam search
(decoding constraints and diverse groups included) run their whole loop in one call (`native_sample`,
`native_beam_search`; an ensemble's members together); so does the prefill (`csrc/encoder.cpp`).
Elsewhere the decoder records its step once per shape and replays it (the recordings belong to this
Decoder; whoever holds it holds them): TorchScript traces on the CPU (bf16, torch's layers), CUDA graphs
on a GPU. Every backend sits behind `Decoder.step`, so switching one is a local change.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from satic.decoding.cache import KVCache, RerunPrefix, decode_capacity, longest_max_length, visibility
from satic.decoding.cuda_graphs import GraphedEncoder, GraphedStep
from satic.decoding.options import DecodeOptions
from satic.decoding.precision import Kernel, Precision, prepare_for_inference
from satic.decoding.small_gemm import FusedReferenceNorm, Int8WeightLinear, SmallRowLinear, kernel_ready
from satic.errors import SaticError
from satic.model.transformer import NEG_INF, GrowingKV, LayerKV, SATModel, block_mask, mask_bias

REGION_BUCKET = 16  # recorded steps: regions padded to a multiple of this, so few shapes are recorded
# warnings.catch_warnings saves and restores the process's filters: two threads tracing at once would restore each
# other's, leaving every warning of the host ignored for good
TRACING = threading.Lock()


class StepModule(nn.Module):
    """One cached decoding step with every input a tensor, so that a tracer or compiler can record it."""

    def __init__(self, model: SATModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, positions: Tensor, self_bias: Tensor, memory_bias: Tensor,
                memory_kv: tuple[LayerKV, ...], caches: tuple[Tensor, ...]) -> Tensor:
        hidden = self.model.decode(tokens, list(memory_kv), memory_bias, self_bias, list(caches), positions)
        return self.model.logprobs(hidden)


def pad_regions(kv: list[LayerKV], bias: Tensor | None) -> tuple[list[LayerKV], Tensor]:
    """Regions' keys/values (B, H, N, dk) -> N' a multiple of REGION_BUCKET, the padding hidden by the bias.
    Padded after projection, so that int8 activation scales see only the real regions."""
    batch, _, regions, _ = kv[0][0].shape
    extra = -(-regions // REGION_BUCKET) * REGION_BUCKET - regions
    if bias is None:
        bias = kv[0][0].new_zeros(batch, 1, 1, regions)
    kv = [(F.pad(k, (0, 0, 0, extra)), F.pad(v, (0, 0, 0, extra))) for k, v in kv]
    return kv, F.pad(bias, (0, extra), value=NEG_INF)


Backend = Literal["eager", "native", "torchscript", "inductor", "export"]
BACKENDS = ("eager", "native", "torchscript", "inductor", "export")
PENALTY_KINDS = ("", "wu", "avg")  # length_penalty kinds as the native beam search numbers them (0, 1, 2)
# On the CPU: the native step where the model's layers are the kernel's (fp32 or int8), else a TorchScript
# trace (see _record_step for the measurements behind it). On CUDA every backend but eager records graphs.
DEFAULT_BACKEND: Backend = "native"


def _record_step(backend: Backend, step: nn.Module, inputs: tuple) -> Callable[..., Tensor]:
    """A CPU step recorded for the shapes of `inputs` ('native' records a trace where its kernel does not apply).

    TorchScript is the recorder because the alternatives measured worse (benchmarks/decode_backends.py,
    2-core x86-64 VM, torch 2.13.0, batch 1 greedy, one thread; benchmarks/RESULTS.md): at the demo size
    (K=2, d_model 128) a step took 0.32 ms traced, 0.38 ms with torch.compile (inductor, default mode)
    and 1.16 ms as a torch.export program (0.58 ms eager), and inductor's first caption took 17-28 s
    of compiling per shape on 2 cores (24-58 s at the paper size), far over the 10 s a first
    caption may take, where a trace takes 0.1-0.3 s. 'inductor' and 'export' stay selectable."""
    if backend in ("torchscript", "native"):
        with TRACING, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript is deprecated; tracing still works
            return torch.jit.freeze(torch.jit.trace(step, inputs, check_trace=False))
    if backend == "inductor":
        return torch.compile(step, fullgraph=True, dynamic=False)
    if backend == "export":
        return torch.export.export(step, inputs, strict=False).module()
    raise ValueError(f"no recorded step for backend {backend!r}")


def _kernel_layers(model: SATModel, layers: list[nn.Module]) -> bool:
    """Whether a native call can read these layers: an eval-mode float32 model on the CPU, every layer one of
    the kernel's (the packed fp32 or int8 linear, the fused norm), the norms of one eps, and the kernel built."""
    if model.training or model.positions.device.type != "cpu" or model.dtype != torch.float32:
        return False
    kinds = (SmallRowLinear, Int8WeightLinear, FusedReferenceNorm)
    return (all(isinstance(m, kinds) for m in layers)
            and len({m.eps for m in layers if isinstance(m, FusedReferenceNorm)}) == 1 and kernel_ready())


def native_tensors(m: nn.Module) -> list[Tensor]:
    """A kernel layer's tensors as the native ops read them: a norm [weight, bias]; a linear layer [packed
    weight, scales (int8; empty for fp32), bias]."""
    if isinstance(m, FusedReferenceNorm):
        return [m.weight, m.bias]
    scale = m.scale if isinstance(m, Int8WeightLinear) else m.packed_bias.new_empty(0)
    return [m.packed, scale, m.packed_bias]


def native_encoder_weights(model: SATModel) -> list[Tensor] | None:
    """The tensors the native prefill (`csrc/encoder.cpp`) reads, in its order (`native_tensors` of each layer),
    or None when the model's layers are not all the small-row kernel's, fp32 or int8 (bf16, torch's layers,
    a GPU, dropout on)."""
    order = [model.region_embed]
    for layer in model.encoder_layers:
        order += [layer.norm1, layer.attn.qkv, layer.attn.out, layer.norm2, layer.ffn.w1, layer.ffn.w2]
    order += [model.encoder_norm, *(layer.cross_attn.kv for layer in model.decoder_layers)]
    return _native_weights(model, order)


def native_decoder_weights(model: SATModel) -> list[Tensor] | None:
    """The tensors the native step (`csrc/decoder.cpp`) reads, in its order: the word embedding, the position
    table, then `native_tensors` of each layer; or None when the model's decoder layers are not all the
    small-row kernel's, fp32 or int8 (bf16, torch's layers, a GPU, dropout on)."""
    order = []
    for layer in model.decoder_layers:
        order += [layer.norm1, layer.self_attn.qkv, layer.self_attn.out, layer.norm2, layer.cross_attn.q,
                  layer.cross_attn.out, layer.norm3, layer.ffn.w1, layer.ffn.w2]
    order += [model.decoder_norm, model.generator]
    weights = _native_weights(model, order)
    return None if weights is None else [model.word_embed.weight.detach(), model.positions, *weights]


def _native_weights(model: SATModel, layers: list[nn.Module]) -> list[Tensor] | None:
    """native_tensors of every layer in turn, or None unless a native call can read them all."""
    if not _kernel_layers(model, layers):
        return None
    return [t for m in layers for t in native_tensors(m)]


def _uses_kernel(model: nn.Module) -> bool:
    return any(isinstance(m, (SmallRowLinear, Int8WeightLinear, FusedReferenceNorm)) for m in model.modules())


@dataclass
class DecodeState:
    """One decode's images and cache: the regions' keys/values and bias per image (its rows share them in
    cross-attention), the self-attention cache of B * decoder_rows rows (image-major), and the CUDA graph
    it runs on, if any. `step` and `reorder` make it the stepper the search loops drive."""
    decoder: "Decoder"
    memory_kv: list[LayerKV]
    memory_bias: Tensor | None
    cache: KVCache | list[GrowingKV] | RerunPrefix
    decoder_rows: int
    graph: GraphedStep | None = None
    visible: Tensor | None = None  # (T+1, T) cache visibility bias per end position (static cache)
    group_size: int = field(init=False)
    _native_memory: list[Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.group_size = self.decoder.group_size

    def step(self, tokens: Tensor) -> Tensor:
        return self.decoder.step(self, tokens)

    def native_memory(self) -> list[Tensor]:
        """The regions' keys and values as the native step takes them: [k_0, v_0, k_1, v_1, ...]."""
        if self._native_memory is None:
            self._native_memory = [t for kv in self.memory_kv for t in kv]
        return self._native_memory

    def reorder(self, index: Tensor) -> None:
        if not isinstance(self.cache, KVCache):
            raise NotImplementedError("a differentiable decode samples; beam search reorders rows and runs "
                                      "without grad")
        self.cache.reorder(index)


class Decoder:
    """A model's decoding: `prefill` then `step`s. compile=True runs both natively on the CPU where the model's
    layers are the small-row kernel's (one call each, any shape; greedy decoding, sampling and beam search
    one call in all), and elsewhere records the step (and, on CUDA, the unmasked encoder)
    once per shape and replays it: far less per-step overhead, which dominates at batch 1, at the cost of
    a fraction of a second per new shape; inference only. A model in train mode decodes eagerly (dropout
    during decoding: every row draws its own masks)."""

    def __init__(self, model: SATModel, compile: bool | Backend = False) -> None:
        backend = DEFAULT_BACKEND if compile is True else "eager" if compile is False else compile
        if backend not in BACKENDS:
            raise SaticError(f"compile={compile!r}: choose True, False or one of {list(BACKENDS)}")
        self.model = model
        self.backend: Backend = backend  # on CUDA every backend but 'eager' records CUDA graphs
        self._recorded: dict = {}  # shape key -> recorded step (CPU), GraphedEncoder or [GraphedStep] (CUDA)
        self._visible: dict = {}  # (capacity, dtype, device) -> visibility bias
        self._step_args: dict = {}  # (capacity, dtype, device, start, length) -> a step's positions and bias
        self._native: list[Tensor] | None | bool = False  # native prefill's weights; False: not asked yet
        self._native_step: list[Tensor] | None | bool = False  # native step's weights (backend 'native')
        self._sizes: tuple | None = None  # see _native_sizes

    @classmethod
    def prepare(cls, model: SATModel, precision: Precision = "fp32", device: str | torch.device | None = None,
                compile: bool | Backend = False, kernel: Kernel = "auto") -> "Decoder":
        """An eval-mode copy of `model` on `device` at `precision` (see `prepare_for_inference`), decoded
        with recorded steps when compile=True."""
        if device is not None:
            model = model.to(device)
        return cls(prepare_for_inference(model, precision, kernel), compile)

    @property
    def config(self):
        return self.model.config

    @property
    def group_size(self) -> int:
        return self.model.config.group_size

    def recordings(self) -> tuple[int, int]:
        """(encoder recordings, step recordings) made so far."""
        encoders = sum(isinstance(e, GraphedEncoder) for e in self._recorded.values())
        steps = sum(len(e) if isinstance(e, list) else 1 for e in self._recorded.values()
                    if not isinstance(e, GraphedEncoder))
        return encoders, steps

    def _recording(self) -> bool:
        return self.backend != "eager" and not self.model.training

    @property
    def records_shapes(self) -> bool:
        """Whether each new batch shape is recorded once before it runs fast (a TorchScript trace on the CPU,
        CUDA graphs on a GPU), rather than every shape running natively (or eagerly) as it comes."""
        if not self._recording():
            return False
        like = self.model.positions
        return like.device.type != "cpu" or self._native_step_weights(like) is None

    def prefill(self, att_feats: Tensor, att_masks: Tensor | None, decoder_rows: int = 1, max_length: int = 20,
                differentiable: bool = False, rerun: bool = False) -> DecodeState:
        """Encode the images and set up an empty cache for B * decoder_rows rows. differentiable=True (SCST:
        the loss backpropagates through the pass that drew the words) keeps every step's keys/values for
        autograd (they grow by concatenation) and runs every row every step; it samples, never reorders.
        rerun=True (with differentiable) keeps no self-attention keys/values: each step runs the decoder over
        the whole prefix again, the reference's sampling pass (in train mode, fresh dropout masks for every
        position at every step; without dropout the same numbers as the cache, at more cost)."""
        c = self.model.config
        capacity = decode_capacity(max_length, c.group_size)
        if capacity > c.max_positions:
            raise SaticError(f"max_length {max_length} needs {capacity} positions but the model has "
                             f"max_positions={c.max_positions}; use a max_length of at most "
                             f"{longest_max_length(c.max_positions, c.group_size)}")
        if differentiable:
            memory, bias = self.model.encode(att_feats, att_masks)  # (B, N, d)
            memory_kv = self.model.memory_kv(memory, bias)
            cache = RerunPrefix() if rerun else [GrowingKV() for _ in range(c.num_layers)]
            return DecodeState(self, memory_kv, bias, cache, decoder_rows)
        rows = att_feats.size(0) * decoder_rows
        shape = (2, rows, c.num_heads, capacity, c.d_model // c.num_heads)  # keys and values
        if self._recording() and att_feats.device.type == "cuda":
            memory_kv, bias = self._graphed_prefill(att_feats, att_masks)
            state = DecodeState(self, memory_kv, bias, KVCache([]), decoder_rows)
            state.graph = self._graphed_step(state, rows, shape)
            state.memory_kv, state.memory_bias = state.graph.memory_kv, state.graph.memory_bias
            state.cache = KVCache(state.graph.caches)
            return state
        memory_kv, bias = self._prefill(att_feats, att_masks)
        dtype, device = memory_kv[0][0].dtype, memory_kv[0][0].device
        cache = KVCache([torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.num_layers)])
        visible = self._visibility(capacity, dtype, device)
        return DecodeState(self, memory_kv, bias, cache, decoder_rows, visible=visible)

    def _step_inputs(self, visible: Tensor, start: int, length: int) -> tuple[Tensor, Tensor]:
        """The positions (L,) of a step of `length` words from `start`, and its cache bias (1, 1, 1, T): made
        once per decoder (a batch-1 step is mostly such per-call work)."""
        key = (visible.size(1), visible.dtype, visible.device, start, length)  # _visibility's key, and the step
        inputs = self._step_args.get(key)
        if inputs is None:
            positions = torch.arange(start, start + length, device=visible.device)
            inputs = positions, visible[start + length].view(1, 1, 1, -1)
            self._step_args[key] = inputs
        return inputs

    def _visibility(self, capacity: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """visibility(capacity), made once per capacity: the steps only read it."""
        key = (capacity, dtype, device)
        if key not in self._visible:
            self._visible[key] = visibility(capacity, dtype, device)
        return self._visible[key]

    def _prefill(self, att_feats: Tensor, att_masks: Tensor | None, check: bool = True
                 ) -> tuple[list[LayerKV], Tensor | None]:
        """Encoder and the regions' keys/values, padded to the region bucket when steps are recorded. On the
        CPU with the small-row kernel (fp32 or int8) this is one native call (`csrc/encoder.cpp`); else the
        model's encode and memory_kv, whose row-wise layers run on the valid regions only. (A recorded encoder over
        regions padded to the bucket measured no faster than that eager one.)"""
        if self._recording() and att_feats.device.type == "cpu":
            native = self._native_prefill(att_feats, att_masks)
            if native is not None:
                return native
        memory, bias = self.model.encode(att_feats, att_masks, check)  # (B, N, d)
        memory_kv = self.model.memory_kv(memory, bias)
        return pad_regions(memory_kv, bias) if self._recording() else (memory_kv, bias)

    def _native_prefill(self, att_feats: Tensor, att_masks: Tensor | None
                        ) -> tuple[list[LayerKV], Tensor] | None:
        """The prefill in one call of the native encoder, or None when this model cannot use it. Its numbers
        are encode + memory_kv + pad_regions up to float rounding (tests/decoding)."""
        if self._native is False:
            self._native = native_encoder_weights(self.model)
        if self._native is None:
            return None
        c = self.model.config
        if att_feats.dim() != 3 or att_feats.size(-1) != c.att_feat_size or att_feats.size(1) == 0 or (
                att_masks is not None and att_masks.shape != att_feats.shape[:2]):
            self.model.check_features(att_feats, att_masks)  # raises the message that names the problem
        out = torch.ops.satic_small_gemm.encode(att_feats.float(), att_masks, self._native, c.num_layers, c.d_model,
                                                c.num_heads, c.d_ff, self.model.encoder_norm.eps, REGION_BUCKET)
        if not out:  # a NaN or infinite feature, or an image without a real region
            self.model.check_features(att_feats, att_masks)  # raises the SaticError that says which
        return list(zip(out[:-1:2], out[1:-1:2])), out[-1]

    def _graphed_prefill(self, att_feats: Tensor, att_masks: Tensor | None) -> tuple[list[LayerKV], Tensor]:
        """`_prefill`, recorded per shape when unmasked (a mask needs the data-dependent packing, which
        runs eagerly); the input checks run first, on the real input."""
        self.model.check_features(att_feats, att_masks)
        if att_masks is not None and not bool(att_masks.all()):
            return self._prefill(att_feats, att_masks, check=False)
        key = ("encoder", tuple(att_feats.shape), att_feats.dtype, att_feats.device)
        if key not in self._recorded:
            self._recorded[key] = GraphedEncoder(lambda feats: self._prefill(feats, None, check=False), att_feats)
        return self._recorded[key](att_feats)

    def _graphed_step(self, state: DecodeState, rows: int, cache_shape: tuple[int, ...]) -> GraphedStep:
        """A free recorded step for this decode's shapes (recorded now if there is none), loaded with its images."""
        k, bias = self.group_size, state.memory_bias
        key = ("step", rows, k, tuple(bias.shape), cache_shape, bias.dtype, bias.device)
        graphs = self._recorded.setdefault(key, [])
        graph = next((g for g in graphs if g.free()), None)
        if graph is None:
            tokens = torch.zeros(rows, k, dtype=torch.long, device=bias.device)
            caches = [bias.new_zeros(cache_shape) for _ in range(self.model.config.num_layers)]
            visible = visibility(cache_shape[3], bias.dtype, bias.device)
            graph = GraphedStep(StepModule(self.model).eval(), tokens, state.memory_kv, bias, caches, visible)
            graphs.append(graph)
        graph.load(state, state.memory_kv, bias)
        return graph

    def step(self, state: DecodeState, tokens: Tensor) -> Tensor:
        """tokens (R, K), the newest group of every row -> float32 log-probs (R, K, V+1) of the next K."""
        cache = state.cache
        if isinstance(cache, RerunPrefix):  # the whole prefix again, under the block mask
            prefix = cache.extend(tokens)  # (R, t + K)
            self_bias = mask_bias(block_mask(prefix.size(1), self.group_size, tokens.device),
                                  state.memory_kv[0][0].dtype)
            # the top layer for the newest group only: the earlier positions' top-layer outputs are never read
            hidden = self.model.decode(prefix, state.memory_kv, state.memory_bias, self_bias, last=tokens.size(1))
            return self.model.logprobs(hidden)
        if not isinstance(cache, KVCache):  # differentiable: grows, every key visible
            start = cache[0].kv.size(3) if cache[0].kv is not None else 0
            positions = torch.arange(start, start + tokens.size(1), device=tokens.device)
            hidden = self.model.decode(tokens, state.memory_kv, state.memory_bias, None, cache, positions)
            return self.model.logprobs(hidden)
        start = cache.length
        cache.length = start + tokens.size(1)
        if state.graph is not None:
            return state.graph(tokens, start)
        if start == 0 and state.decoder_rows > 1 and not self.model.training:  # dropout: each row its own
            return self._first_step_per_image(state, tokens)
        return self._run(state, tokens, start, cache.kv)

    def _first_step_per_image(self, state: DecodeState, tokens: Tensor) -> Tensor:
        """The first step feeds the same K zeros to every row of an image, so compute it once per image (on
        the cache's first B rows) and copy it to the image's rows: at K=4 with beam 3 on the CPU, a step
        of 4 rows instead of 12. (GPU graphs keep one shape: there a row costs next to nothing.)"""
        rows = state.decoder_rows
        images = tokens.size(0) // rows
        logprobs = self._run(state, tokens[::rows], 0, [c[:, :images] for c in state.cache.kv])  # (B, K, V+1)
        state.reorder(torch.arange(images, device=tokens.device).repeat_interleave(rows))
        return logprobs.repeat_interleave(rows, 0)

    def _native_step_weights(self, like: Tensor) -> list[Tensor] | None:
        """The native step's weights when it can run on `like`'s device (backend 'native', the kernel's fp32 or
        int8 layers on the CPU), else None."""
        if self.backend != "native" or like.device.type != "cpu":
            return None
        if self._native_step is False:
            self._native_step = native_decoder_weights(self.model)
        return self._native_step

    def _native_loop_weights(self, state: DecodeState) -> list[Tensor] | None:
        """The native step's weights when a whole search loop can run natively over `state`: a fresh static
        cache, no CUDA graph, recorded decoding without grad."""
        cache = state.cache
        if (not isinstance(cache, KVCache) or cache.length or state.graph is not None or not self._recording()
                or torch.is_grad_enabled()):
            return None
        return self._native_step_weights(cache.kv[0])

    def _native_sizes(self) -> tuple[list[int], float]:
        """[layers, heads, d_ff] and the norm eps: what the native loops take of this model besides its tensors."""
        if self._sizes is None:
            c = self.config
            self._sizes = [c.num_layers, c.num_heads, c.d_ff], self.model.decoder_norm.eps
        return self._sizes

    def sample(self, state: DecodeState, options: DecodeOptions, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """`native_sample` over this decoder's state alone."""
        return native_sample([state], [1.0], options, generator)

    def beam_search(self, state: DecodeState, batch: int, options: DecodeOptions
                    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """`native_beam_search` over this decoder's state alone."""
        return native_beam_search([state], [1.0], batch, options)

    def _run(self, state: DecodeState, tokens: Tensor, start: int, caches: list[Tensor]) -> Tensor:
        if self._recording() and (weights := self._native_step_weights(tokens)) is not None:
            return torch.ops.satic_small_gemm.decode_step(tokens, start, caches, state.native_memory(),
                                                          state.memory_bias, weights, self.config.num_heads,
                                                          self.config.d_ff, self.model.decoder_norm.eps)
        positions, self_bias = self._step_inputs(state.visible, start, tokens.size(1))
        if not self._recording():
            return self.model.logprobs(self.model.decode(tokens, state.memory_kv, state.memory_bias, self_bias,
                                                         caches, positions))
        inputs = (tokens, positions, self_bias, state.memory_bias, tuple(state.memory_kv), tuple(caches))
        bias = state.memory_bias
        key = (tokens.shape, tokens.device, positions.shape, self_bias.shape, bias.shape, bias.dtype, len(caches))
        if key not in self._recorded:
            if _uses_kernel(self.model):
                kernel_ready()  # built (or given up on) before a tracer meets the kernel layers
            self._recorded[key] = _record_step(self.backend, StepModule(self.model).eval(), inputs)
        return self._recorded[key](*inputs)  # (R, K, V+1)


def _native_loop_args(states: Sequence[DecodeState], mix: Sequence[float]) -> list | None:
    """The native loops' model arguments: the models' caches, regions' keys/values, region biases and weights,
    each a flat list in model order, then per model (layers, heads, d_ff) and (norm eps, mixture weight); or
    None unless every state can run a native loop."""
    weights = [state.decoder._native_loop_weights(state) for state in states]
    if any(w is None for w in weights):
        return None
    if len(states) == 1:  # the lists as they are: at batch 1 on a small model, a caption is ~80 us of Python
        state = states[0]
        sizes, eps = state.decoder._native_sizes()
        return [state.cache.kv, state.native_memory(), [state.memory_bias], weights[0], sizes, [eps, float(mix[0])]]
    return [[c for state in states for c in state.cache.kv], [t for state in states for t in state.native_memory()],
            [state.memory_bias for state in states], [t for w in weights for t in w],
            [n for state in states for n in state.decoder._native_sizes()[0]],
            [x for state, w in zip(states, mix) for x in (state.decoder._native_sizes()[1], float(w))]]


def native_sample(states: Sequence[DecodeState], mix: Sequence[float], options: DecodeOptions,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The whole loop of `search.sample` (greedy or drawing, with temperature, top-k and top-p, decoding
    constraints included) over fresh states in one native call (no Python between steps, which is most of a
    small model's step otherwise), or None where the native step does not run (or a state has already
    stepped, or grad is on). Draws take torch.rand's numbers from `generator` (or the default one) in the
    Python loop's order, so both give the same captions. Several states (an ensemble's members over the same
    images) decode together, each step the log of their probabilities' mean weighted by `mix`, as
    `EnsembleStepper`. Returns what sample() assembles from its loop, each (R, max_length): the output, the
    words drawn, their log-probs and the live positions."""
    if (args := _native_loop_args(states, mix)) is None:
        return None
    k = states[0].group_size
    seq, drawn, chosen, live, steps = torch.ops.satic_small_gemm.sample(
        states[0].cache.kv[0].size(1), k, options.max_length, *args, options.decoding_constraint,
        options.block_trigrams, options.sample_method == "sample", options.temperature, options.top_k or 0,
        options.top_p, generator)
    for state in states:
        state.cache.length = int(steps) * k
    return seq, drawn, chosen, live


def native_beam_search(states: Sequence[DecodeState], mix: Sequence[float], batch: int, options: DecodeOptions,
                       staggered: bool = False) -> tuple[Tensor, Tensor, Tensor] | None:
    """`search.beam_search` over fresh states in one native call, decoding constraints and beam groups (their
    groups advancing together) included; with staggered=True, `search.staggered_beam_search` (K=1, each group
    one position behind the one before, over states of beam_size / beam_groups rows per image). In Python a
    position is a dozen small torch operators per group, most of a caption's time at batch 1. None where the
    native step does not run. Several states decode as an ensemble (see native_sample). Returns the
    DecodeResult's seq, logprobs and scores."""
    k, width, groups = states[0].group_size, options.beam_size, options.beam_groups
    if (states[0].decoder_rows != (width // groups if staggered else width)
            or width // groups > states[0].decoder.config.num_outputs
            or (args := _native_loop_args(states, mix)) is None):
        return None
    kind, alpha = options.length_penalty_parts
    result = torch.ops.satic_small_gemm.beam_search(
        batch, width, k, options.max_length, *args, options.suppress_unk, PENALTY_KINDS.index(kind), alpha,
        options.n_best, options.decoding_constraint, options.block_trigrams, groups,
        options.diversity_lambda, staggered)
    for state in states:
        state.cache.length = decode_capacity(options.max_length, k)  # the states are spent
    return tuple(result)


def as_decoder(model: SATModel | Decoder) -> Decoder:
    """A Decoder as given, or an eager one around a model (cheap: nothing is recorded)."""
    return model if isinstance(model, Decoder) else Decoder(model)
