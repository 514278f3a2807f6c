"""A linear layer for few rows that streams its weights once.

At batch 1 a decoding step multiplies 1..16 rows (K words, or beams) by each weight matrix. MKL's
fp32 GEMM is much slower per byte for 2..16 rows than for one (GEMV), so a step of K words cost
2-4x a step of one word; for the encoder's few dozen rows (one image's regions) it reaches about
half of this CPU's FMA peak, where this kernel comes near it. The kernel packs each weight into
panels of 16 output columns (panel-major, contiguous), reads every panel once and multiplies it
with all rows held in registers (8-lane vectors with FMA, `csrc/simd.h`: AVX2 on x86-64, NEON on arm64;
up to 4 rows x 16 columns of accumulators per pass, or 3 a pass for more rows, in two sets, so that every row is
summed in one order and its result does not depend on the rows beside it; with 5..18 rows each pass
prefetches its share of the next panel, which keeps memory busy). int8 weights use integer multiply-adds on
int16 activations (Int8WeightLinear). The C++ source is `satic/csrc/small_gemm.cpp`, built into one library with
`csrc/encoder.cpp` and `csrc/decoder.cpp` (the native prefill and step: `satic.decoding.engine`); the first call
of a kernel layer builds it with torch's C++ extension loader (~20 s once, in a folder named by a hash of
the sources, so a changed source builds afresh; `satic build-kernels` builds it ahead) and registers it
as torch operators, so traces of the decoding step record it. Without a compiler, or on a CPU
with neither AVX2 nor NEON, the swap is skipped with one warning and decoding uses torch's linear.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from satic.errors import SaticError
from satic.io import atomic_path
from satic.model.layers import InferenceNorm, LayerNorm, reference_norm
from satic.model.transformer import CrossAttention, SelfAttention, attend

PANEL = 16  # output columns per packed panel (two 8-lane vectors)
MAX_ROWS = 64  # more rows than this: torch's GEMM is as fast, use it
CSRC = Path(__file__).resolve().parent.parent / "csrc"
# one library: the kernels, the native prefill and the native step
SOURCES = (CSRC / "small_gemm.cpp", CSRC / "encoder.cpp", CSRC / "decoder.cpp")
HEADERS = (CSRC / "small_gemm.h", CSRC / "simd.h")
# -ffp-contract=off: no a * b + c fused into one FMA where the source writes two roundings (GCC fuses them by default
# in C++): the native loops' penalties (block_trigrams, diversity) then round as the Python loops' torch operators do,
# so both loops give the same numbers to the bit, and every CPU and compiler rounds alike (the kernels' own FMAs are
# explicit, csrc/simd.h)
BASE_FLAGS = ("-O3", "-ffp-contract=off")
AVX2_FLAGS = ("-mavx2", "-mfma")
PORTABLE = "SATIC_PORTABLE_SIMD"  # =1 in the environment: csrc/simd.h's portable vectors wherever satic runs
# ATen's parallel_for splits work over torch's threads only in code compiled with OpenMP (without it every
# parallel_for of the kernels runs on one thread); the library then links torch's own OpenMP runtime. A
# compiler without OpenMP (clang lacking libomp) gets the single-threaded build instead.
THREADED = ("-fopenmp",)
BUILT = "built.ok"  # written once a build has loaded: the next process loads the library without ninja
TORCH_LOCK = "lock"  # torch's extension loader's lock file in a build folder (see _held_build_folder)
FAILED = "failed.txt"  # written when only the threaded build fails: later processes go straight to the other


def has_avx2() -> bool:
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def is_arm64() -> bool:
    """An arm64 CPU, where csrc/simd.h builds its NEON vectors."""
    return platform.machine().lower() in ("aarch64", "arm64")


def compile_flags() -> tuple[str, ...]:
    """How the kernel is compiled here. csrc/simd.h writes its vectors as AVX2 intrinsics on an x86-64 CPU with
    AVX2 (built with AVX2_FLAGS), as NEON intrinsics on arm64, and as portable C++ vectors elsewhere (built
    only with SATIC_PORTABLE_SIMD=1, see build_problem); all three give the same bits. SATIC_PORTABLE_SIMD=1
    builds the portable ones on every CPU (with the same instruction-set flags), which is how the tests check
    them against the others."""
    flags = (*BASE_FLAGS, *(AVX2_FLAGS if has_avx2() else ()))
    return (*flags, "-DSATIC_PORTABLE_SIMD") if os.environ.get(PORTABLE) == "1" else flags


def source_text() -> str:
    """The kernel's C++ sources and headers, concatenated: what names its build folder."""
    return "".join(path.read_text() for path in (*SOURCES, *HEADERS))


def build_directory(source: str, root: str | Path | None = None, threaded: bool = True) -> Path:
    """Where the kernel built from `source` (source_text()) lives: a folder named by a hash of the source, the flags and
    torch's version, so a changed source (or another torch) builds afresh and never loads a stale library. It is under
    `root`, else $TORCH_EXTENSIONS_DIR (as for torch's own extensions), else torch's per-user cache folder."""
    from torch.utils.cpp_extension import get_default_build_root

    flags = compile_flags() + (THREADED if threaded else ())
    key = "\0".join([source, *flags, torch.__version__, sys.version.split()[0]]).encode()
    root = root or os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"satic_small_gemm_{hashlib.sha256(key).hexdigest()[:16]}"


def built_directory(source: str) -> Path | None:
    """The folder of a finished build of `source`, the threaded one first; None before any (or where the build
    folder cannot be read)."""
    for threaded in (True, False):
        folder = build_directory(source, threaded=threaded)
        with contextlib.suppress(OSError):  # a cache folder this user may not enter
            if (folder / BUILT).exists():
                return folder
    return None


def build_problem() -> str | None:
    """Why the kernel cannot be built or loaded here (None if it can), without building it: the CPU (x86-64
    with AVX2, or arm64; any other builds the portable vectors only when asked), then a library built earlier
    for this source, else a C++ compiler and ninja on PATH."""
    if _load.cache_info().currsize:
        return _load()
    if not (has_avx2() or is_arm64() or os.environ.get(PORTABLE) == "1"):
        return (f"the kernel's vectors are AVX2 or NEON, and this {platform.machine()} CPU has neither; its portable "
                f"build would be slower than torch's linear here ({PORTABLE}=1 builds it anyway)")
    if built_directory(source_text()) is not None:
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"building the small-row kernel needs a C++ compiler ({compiler!r} is not on PATH)"
    if shutil.which("ninja", path=tool_path()) is None:
        return "building the small-row kernel needs ninja (pip install ninja)"
    return None


def tool_path() -> str:
    """PATH and then this interpreter's folder, where pip puts ninja: a virtual environment run without
    activating it (.venv/bin/python -m satic) is not on PATH."""
    path, here = os.environ.get("PATH", os.defpath), str(Path(sys.executable).parent)
    return path if here in path.split(os.pathsep) else os.pathsep.join(filter(None, (path, here)))


@contextlib.contextmanager
def _build_tools_on_path():
    """torch's extension loader runs `ninja` from PATH."""
    before = os.environ.get("PATH")
    os.environ["PATH"] = tool_path()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def build_kernel() -> tuple[Path, float]:
    """Build (unless built before for this source) and load the kernel: (its folder, seconds taken)."""
    start = time.perf_counter()
    reason = load_kernel()
    if reason is not None:
        raise SaticError(reason)
    return built_directory(source_text()), time.perf_counter() - start


def load_kernel() -> str | None:
    """Build (first time only) and load the kernel; None once loaded, else the reason it cannot be."""
    reason = build_problem()
    return reason if reason is not None else _load()


@functools.cache
def _load() -> str | None:
    source = source_text()
    built = built_directory(source)
    threaded, single = (build_directory(source, threaded=t) for t in (True, False))
    try:
        if built is not None and (built / f"{built.name}.so").exists():
            torch.ops.load_library(str(built / f"{built.name}.so"))
        elif (threaded / FAILED).exists():  # an earlier process found a compiler without OpenMP
            _build(single, threaded=False)
        else:
            try:
                _build(threaded, threaded=True)
            except Exception as err:  # noqa: BLE001 - the compiler's own message, kept if the other build works
                _build(single, threaded=False)  # a compiler that fails here too lacks more than OpenMP: not recorded
                with atomic_path(threaded / FAILED, replace=True) as tmp:  # a cache: whoever builds last wins
                    tmp.write_text(f"{type(err).__name__}: {err}\n")
    except Exception as err:  # noqa: BLE001 - no compiler/ninja or a failed build: any of them means "not available"
        hint = ("; set TORCH_EXTENSIONS_DIR to a folder you can write to build it there"
                if isinstance(err, OSError) else "")
        return f"building the small-row kernel failed ({type(err).__name__}: {str(err).strip()[:300]}){hint}"
    _register_shapes()
    return None


def _build(build_dir: Path, threaded: bool) -> None:
    """Build and load the kernel in build_dir, with OpenMP when `threaded`. A threaded build that fails while the
    single-threaded one works (a compiler without OpenMP) is recorded by _load as FAILED in its folder, so that
    later processes go straight to the other; a compiler that fails both ways (not installed, broken) leaves no
    such record, and is tried again once fixed."""
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    with _build_tools_on_path(), _held_build_folder(build_dir):
        load(build_dir.name, sources=[str(path) for path in SOURCES], build_directory=str(build_dir),
             is_python_module=False, extra_cflags=list(compile_flags() + (THREADED if threaded else ())),
             extra_ldflags=list(THREADED if threaded else ()))
    with atomic_path(build_dir / BUILT, replace=True) as tmp:
        tmp.write_text("".join(f"{path}\n" for path in SOURCES))


@contextlib.contextmanager
def _held_build_folder(build_dir: Path) -> Iterator[None]:
    """One process builds in `build_dir` at a time, the others wait here. torch's loader has a lock of its own, a
    file that a process killed while building (SIGKILL, out of memory, a power cut) leaves behind, and it waits for
    that file to go for ever. This lock is the system's (flock), let go when its process ends, so a torch lock found
    while holding it was left by a process killed half-way, and is removed."""
    import fcntl

    with open(build_dir / "satic.lock", "a") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network ones): torch's lock alone, as before
            pass
        else:
            (build_dir / TORCH_LOCK).unlink(missing_ok=True)
        yield


def _register_shapes() -> None:
    """Output shapes of the ops for torch.compile and torch.export, which trace them without running them."""
    def linear(x: Tensor, packed: Tensor, bias: Tensor, out_features: int) -> Tensor:
        return x.new_empty((*x.shape[:-1], out_features))

    def linear_int8(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor, out_features: int, levels: int) -> Tensor:
        return x.new_empty((*x.shape[:-1], out_features))

    def norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        return torch.empty_like(x)

    def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        b, h, length, dk = q.shape
        return q.new_empty((b, length, h, dk)).transpose(1, 2)  # heads-merged layout, as the kernel

    def decode_step(tokens: Tensor, start: int, caches: list[Tensor], memory: list[Tensor], memory_bias: Tensor | None,
                    weights: list[Tensor], num_heads: int, d_ff: int, eps: float) -> Tensor:
        return tokens.new_empty((*tokens.shape, weights[0].size(0)), dtype=torch.float32)

    for name, fake in (("linear", linear), ("linear_int8", linear_int8), ("reference_norm", norm),
                       ("attention", attention), ("decode_step", decode_step)):
        torch.library.register_fake(f"satic_small_gemm::{name}", fake)


@functools.cache
def kernel_available() -> bool:
    """True when the kernel is built and loaded (building it on the first call); warns once with the
    reason when it cannot be. The kernel layers ask this at their first call, not when they are made."""
    reason = load_kernel()
    if reason is not None:
        warnings.warn(f"{reason}; decoding uses torch's linear layers (slower at batch 1)", stacklevel=2)
    return reason is None


_ready: bool | None = None  # kernel_available(), once asked


def kernel_ready() -> bool:
    """kernel_available() from a plain flag after the first call: cheap in every layer call, and a constant
    that torch.compile guards on instead of tracing the loader."""
    global _ready
    if _ready is None:
        _ready = kernel_available()
    return _ready


def pack_weight(weight: Tensor) -> Tensor:
    """(N, K) -> (ceil(N / 16), K, 16): panel j holds output columns 16j..16j+15, zero-padded."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    padded = F.pad(weight.detach(), (0, 0, 0, panels * PANEL - n))  # (panels * 16, K)
    return padded.view(panels, PANEL, k).transpose(1, 2).contiguous()


def pack_pairs(q: Tensor) -> Tensor:
    """int8 (N, K) -> (ceil(N / 16), ceil(K / 2), 32): in panel j, pair p holds columns 16j..16j+15's weights
    at inputs 2p and 2p+1 side by side (zero-padded), the order one multiply-add-pairs instruction reads."""
    n, k = q.shape
    panels, pairs = -(-n // PANEL), -(-k // 2)
    padded = F.pad(q, (0, 2 * pairs - k, 0, panels * PANEL - n))  # (panels * 16, 2 * pairs)
    return padded.view(panels, PANEL, pairs, 2).permute(0, 2, 1, 3).reshape(panels, pairs, 2 * PANEL).contiguous()


def activation_levels(in_features: int) -> int:
    """Levels each side of 0 for the int8 kernel's int16 inputs: as many as an exact int32 sum of
    in_features products with weights up to 127 allows (8256 for 2048 inputs), at most 32767."""
    pairs = -(-in_features // 2)
    levels = min(32767, (2**31 - 1) // (127 * 2 * pairs))
    if levels < 255:
        raise SaticError(f"the int8 kernel rounds inputs to fewer than 8 bits with {in_features} input features; "
                         "use kernel='torch'")
    return levels


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output row: (N, K) -> int8 (N, K) and float32 scales (N,), weight ~ q * scale."""
    scale = weight.detach().float().abs().amax(1) / 127.0  # (N,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = (weight.detach().float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def padded_bias(linear: nn.Linear, panels: int) -> Tensor:
    bias = torch.zeros(panels * PANEL)
    if linear.bias is not None:
        bias[: linear.out_features] = linear.bias.detach().float()
    return bias


def _check_cpu_float(linear: nn.Linear) -> None:
    if linear.weight.dtype != torch.float32 or linear.weight.device.type != "cpu":
        raise SaticError(f"the small-row kernel is for float32 on the CPU, got {linear.weight.dtype} "
                         f"on {linear.weight.device}; use kernel='torch'")


class SmallRowLinear(nn.Module):
    """nn.Linear for inference: up to MAX_ROWS rows through the packed kernel, more through F.linear."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        _check_cpu_float(linear)
        self.out_features = linear.out_features
        self.register_buffer("weight", linear.weight.detach().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        packed = pack_weight(self.weight)
        self.register_buffer("packed", packed)
        self.register_buffer("packed_bias", padded_bias(linear, packed.size(0)))

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() <= MAX_ROWS * x.size(-1) and x.dtype == torch.float32 and kernel_ready():
            return torch.ops.satic_small_gemm.linear(x, self.packed, self.packed_bias, self.out_features)
        return F.linear(x, self.weight, self.bias)


class Int8WeightLinear(nn.Module):
    """nn.Linear with int8 weights (one scale per output row), for inference. The kernel rounds each input
    row to int16 (activation_levels(in_features) levels each side of 0, one scale per row) and sums the
    integer products exactly: a quarter of the bytes a batch-1 step reads, and weights that stay 8-bit in
    cache while many rows (the encoder's regions, beam search's 12 rows) reuse them (vpmaddwd multiplies
    no faster than float FMAs on this CPU, so the gain is in bytes, not in arithmetic).
    The activations keep 13+ bits (up to 4096 inputs), so nearly all of the change from fp32 is the weights'
    rounding (torch's dynamic quantization rounds activations to 7-8 bits, which changes more captions). Every
    batch size runs through the kernel, and a row's result does not depend on the other rows, so captions do
    not depend on how images are batched."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        _check_cpu_float(linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.levels = activation_levels(linear.in_features)
        q, scale = quantize_rows(linear.weight)
        packed = pack_pairs(q)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", F.pad(scale, (0, packed.size(0) * PANEL - scale.numel())))
        self.register_buffer("packed_bias", padded_bias(linear, packed.size(0)))

    def dequantized_weight(self) -> Tensor:
        """The (N, K) float32 weight this layer multiplies by."""
        panels, pairs, _ = self.packed.shape
        q = self.packed.view(panels, pairs, PANEL, 2).permute(0, 2, 1, 3).reshape(panels * PANEL, 2 * pairs)
        weight = q.float() * self.scale[:, None]
        return weight[: self.out_features, : self.in_features]

    def forward(self, x: Tensor) -> Tensor:
        if x.size(-1) != self.in_features:
            raise SaticError(f"int8 linear layer: input has {x.size(-1)} features, the layer expects "
                             f"{self.in_features}")
        if not kernel_ready():  # the build failed after all: the same int8 weights, float activations
            return F.linear(x, self.dequantized_weight(), self.packed_bias[: self.out_features])
        return torch.ops.satic_small_gemm.linear_int8(x, self.packed, self.scale, self.packed_bias, self.out_features,
                                                      self.levels)


class FusedReferenceNorm(InferenceNorm):
    """The model's LayerNorm (the reference's formula) for inference on the CPU in one kernel call instead
    of seven torch operators: at batch 1 a decoding step is mostly per-operator overhead besides the
    weights, and the paper-size model runs 19 norms per step."""

    def forward(self, x: Tensor) -> Tensor:
        if not kernel_ready():
            return torch.addcmul(self.bias, reference_norm(x, self.eps)[0], self.weight)
        return torch.ops.satic_small_gemm.reference_norm(x, self.weight, self.bias, self.eps)


MAX_QUERIES = 64  # more query rows than this (an encoder over many regions): torch's batched GEMMs are as fast


def fused_attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout: nn.Module) -> Tensor:
    """The model's `attend` for inference on the CPU in one kernel call (the scores, bias, softmax and
    weighted sum) instead of five torch operators; at batch 1 a decoding step runs four attentions per
    layer-pair. Inference only: no gradient, no dropout."""
    per_key = bias is None or (bias.dim() == 4 and bias.shape[1:3] == (1, 1) and bias.size(0) in (1, q.size(0))
                               and bias.dtype == torch.float32)  # a bias per query row (training masks): torch
    if q.size(2) <= MAX_QUERIES and q.dtype == torch.float32 and per_key and kernel_ready():
        return torch.ops.satic_small_gemm.attention(q, k, v, bias)
    return attend(q, k, v, bias, dropout)


def replace_modules(model: nn.Module, replacement) -> int:
    """Replace, in place, every submodule m of `model` for which replacement(m) is not None; returns the count."""
    targets = [(name, new) for name, module in model.named_modules() if (new := replacement(module)) is not None]
    for name, new in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return len(targets)


def swap_layers(model: nn.Module, int8: bool = False) -> int:
    """Replace, in place, every nn.Linear of `model` by SmallRowLinear (or Int8WeightLinear), every
    LayerNorm by FusedReferenceNorm and every attention's function by fused_attend; returns how many
    modules were swapped."""
    for module in model.modules():
        if isinstance(module, (SelfAttention, CrossAttention)):
            module.attend = fused_attend

    def replacement(module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Linear):
            return Int8WeightLinear(module) if int8 else SmallRowLinear(module)
        if isinstance(module, LayerNorm):
            return FusedReferenceNorm(module)
        return None

    return replace_modules(model, replacement)
