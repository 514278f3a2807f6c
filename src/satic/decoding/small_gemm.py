"""A linear layer for few rows that streams its weights once.

At batch 1 a decoding step multiplies 1..16 rows (K words, or beams) by each weight matrix. MKL's
fp32 GEMM is much slower per byte for 2..16 rows than for one (GEMV), so a step of K words cost
2-4x a step of one word; for the encoder's few dozen rows (one image's regions) it reaches about
half of this CPU's FMA peak, where this kernel comes near it. The kernel packs each weight into
panels of 16 output columns (panel-major, contiguous), reads every panel once and multiplies it
with all rows held in registers (AVX2/FMA, up to 6 rows x 16 columns of accumulators per pass;
with 7..18 rows the later passes prefetch the next panel, which keeps memory busy: 12 rows, K=4
with beam 3, ~25% faster). It is compiled on first use with torch's C++ extension loader (cached,
~15 s once) and registered as a torch operator, so TorchScript traces of the decoding step record
it. Without a compiler or AVX2 the swap is skipped with one warning and decoding uses torch's linear.
"""
from __future__ import annotations

import functools
import platform
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from satic.errors import SaticError
from satic.io import atomic_path

PANEL = 16  # output columns per packed panel (two AVX2 registers)
MAX_ROWS = 64  # more rows than this: torch's GEMM is as fast, use it
_NAME = "satic_small_gemm_v7"  # bump when the source changes

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kPanel = 16;

// One panel row (16 output columns at one k) as two vectors of 8 floats: fp32 as stored, int8 widened
// (exact; the column scales are applied once at the end).
inline void load_row(const float* p, __m256& w0, __m256& w1) {
  w0 = _mm256_loadu_ps(p);
  w1 = _mm256_loadu_ps(p + 8);
}

inline void load_row(const int8_t* p, __m256& w0, __m256& w1) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
  w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
}

// rows x 16 outputs of one panel: y = bias + scale * (x[rows, k] . panel[k, 16]) (no scale for fp32). Every
// panel row is loaded once per pass and used for all `Rows` rows. With few rows, two accumulator sets (even
// and odd k) keep both FMA units busy despite the FMA latency. Prefetch: one pass (PfEvery 0) reads 4 KB
// ahead in its own stream; pass g of G (PfEvery G) fetches its share of the next panel.
template <typename W, int Rows, int PfEvery>
void tile(const float* x, int64_t k, const W* panel, const float* scale, const float* bias, float* y, int64_t ldy,
          int64_t cols, const W* pf) {
  constexpr bool kScaled = sizeof(W) == 1;
  constexpr int64_t kRowsPerLine = 64 / (kPanel * sizeof(W));  // panel rows per cache line
  constexpr int64_t kAhead = 4096 / (kPanel * sizeof(W));
  constexpr int kSets = Rows <= 3 ? 2 : 1;
  __m256 acc[kSets][Rows][2];
  _Pragma("GCC unroll 8") for (int s = 0; s < kSets; ++s)
    _Pragma("GCC unroll 8") for (int r = 0; r < Rows; ++r) {
      const bool with_bias = s == 0 && !kScaled;
      acc[s][r][0] = with_bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
      acc[s][r][1] = with_bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
    }
  int64_t p = 0;
  for (; p + kSets <= k; p += kSets) {
    _Pragma("GCC unroll 8") for (int s = 0; s < kSets; ++s) {
      const int64_t row = p + s;
      if (PfEvery == 0) {
        if (row % kRowsPerLine == 0) _mm_prefetch(reinterpret_cast<const char*>(panel + (row + kAhead) * kPanel), _MM_HINT_T0);
      } else if (row % (PfEvery * kRowsPerLine) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(pf + row / PfEvery * kPanel), _MM_HINT_T1);
      }
      __m256 w0, w1;
      load_row(panel + row * kPanel, w0, w1);
      _Pragma("GCC unroll 8") for (int r = 0; r < Rows; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x + r * k + row);
        acc[s][r][0] = _mm256_fmadd_ps(xv, w0, acc[s][r][0]);
        acc[s][r][1] = _mm256_fmadd_ps(xv, w1, acc[s][r][1]);
      }
    }
  }
  for (; p < k; ++p) {  // odd k
    __m256 w0, w1;
    load_row(panel + p * kPanel, w0, w1);
    _Pragma("GCC unroll 8") for (int r = 0; r < Rows; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * k + p);
      acc[0][r][0] = _mm256_fmadd_ps(xv, w0, acc[0][r][0]);
      acc[0][r][1] = _mm256_fmadd_ps(xv, w1, acc[0][r][1]);
    }
  }
  // masked stores: the last panel may be partly padding (cols < 16)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols)), lane);
  const __m256i mask1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols) - 8), lane);
  _Pragma("GCC unroll 8") for (int r = 0; r < Rows; ++r) {
    __m256 lo = acc[0][r][0], hi = acc[0][r][1];
    if (kSets == 2) {
      lo = _mm256_add_ps(lo, acc[kSets - 1][r][0]);
      hi = _mm256_add_ps(hi, acc[kSets - 1][r][1]);
    }
    if (kScaled) {
      lo = _mm256_fmadd_ps(lo, _mm256_loadu_ps(scale), _mm256_loadu_ps(bias));
      hi = _mm256_fmadd_ps(hi, _mm256_loadu_ps(scale + 8), _mm256_loadu_ps(bias + 8));
    }
    _mm256_maskstore_ps(y + r * ldy, mask0, lo);
    _mm256_maskstore_ps(y + r * ldy + 8, mask1, hi);
  }
}

template <typename W, int PfEvery>
void rows_pass(int64_t rows, const float* x, int64_t k, const W* panel, const float* scale, const float* bias, float* y,
               int64_t ldy, int64_t cols, const W* pf) {
  switch (rows) {
    case 1: tile<W, 1, PfEvery>(x, k, panel, scale, bias, y, ldy, cols, pf); break;
    case 2: tile<W, 2, PfEvery>(x, k, panel, scale, bias, y, ldy, cols, pf); break;
    case 3: tile<W, 3, PfEvery>(x, k, panel, scale, bias, y, ldy, cols, pf); break;
    case 4: tile<W, 4, PfEvery>(x, k, panel, scale, bias, y, ldy, cols, pf); break;
    case 5: tile<W, 5, PfEvery>(x, k, panel, scale, bias, y, ldy, cols, pf); break;
    default: tile<W, 6, PfEvery>(x, k, panel, scale, bias, y, ldy, cols, pf); break;
  }
}

// All m rows times one panel. One 6-row group: a single pass that prefetches 4 KB ahead. G groups (G passes,
// the panel in cache after the first): pass g prefetches the g-th G-th of the next panel, so the stream from
// memory never stalls while the later passes compute. Beyond 3 groups the product is compute-bound.
template <typename W>
void panel_product(int64_t m, const float* x, int64_t k, const W* panel, const W* next, const float* scale,
                   const float* bias, float* y, int64_t ldy, int64_t cols) {
  const int64_t groups = (m + 5) / 6;
  const int64_t share = (k + groups - 1) / groups * kPanel;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r = 6 * g, rows = std::min<int64_t>(6, m - r);
    const W* pf = next + g * share;
    switch (groups) {
      case 1: rows_pass<W, 0>(rows, x + r * k, k, panel, scale, bias, y + r * ldy, ldy, cols, pf); break;
      case 2: rows_pass<W, 2>(rows, x + r * k, k, panel, scale, bias, y + r * ldy, ldy, cols, pf); break;
      case 3: rows_pass<W, 3>(rows, x + r * k, k, panel, scale, bias, y + r * ldy, ldy, cols, pf); break;
      default: rows_pass<W, 0>(rows, x + r * k, k, panel, scale, bias, y + r * ldy, ldy, cols, pf); break;
    }
  }
}

// int8 panel, more than 6 rows: widen the panel to float32 once (exact, in a per-thread buffer that stays in
// cache) and run the float passes on it, instead of widening again in every 6-row pass; then scale and add
// the bias.
void int8_panel_product(int64_t m, const float* x, int64_t k, const int8_t* panel, const float* scale,
                        const float* bias, float* y, int64_t ldy, int64_t cols, float* widened) {
  for (int64_t p = 0; p < k; ++p) {
    __m256 w0, w1;
    load_row(panel + p * kPanel, w0, w1);
    _mm256_storeu_ps(widened + p * kPanel, w0);
    _mm256_storeu_ps(widened + p * kPanel + 8, w1);
  }
  static const float kZeros[kPanel] = {};
  panel_product<float>(m, x, k, widened, widened, nullptr, kZeros, y, ldy, cols);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = 0; c < cols; ++c) y[r * ldy + c] = y[r * ldy + c] * scale[c] + bias[c];
  }
}

// x (..., k) float32; packed (panels, k, 16) float32 or int8; scale (panels * 16) for int8; bias (panels * 16),
// zero-padded -> (..., out_features) float32
template <typename W>
at::Tensor run_linear(const at::Tensor& input, const at::Tensor& packed, const float* scale, const at::Tensor& bias,
                      int64_t out_features) {
  TORCH_CHECK(input.scalar_type() == at::kFloat, "small_linear: float32 input only");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous(), "small_linear: bad packed weight");
  const int64_t k = packed.size(1), panels = packed.size(0);
  TORCH_CHECK(input.size(-1) == k, "small_linear: input has ", input.size(-1), " features, weight expects ", k);
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == panels * kPanel && out_features <= panels * kPanel,
              "small_linear: bad bias");
  const at::Tensor x = input.reshape({-1, k}).contiguous();
  const at::Tensor b = bias.contiguous();
  const int64_t m = x.size(0);
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = out_features;
  at::Tensor out = at::empty({m, out_features}, x.options());
  const float* xp = x.data_ptr<float>();
  const W* wp = static_cast<const W*>(packed.data_ptr());
  const float* bp = b.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  at::parallel_for(0, panels, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> widened(sizeof(W) == 1 && m > 6 ? k * kPanel : 0);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t cols = std::min(kPanel, out_features - j * kPanel);
      if constexpr (sizeof(W) == 1) {
        if (m > 6) {
          int8_panel_product(m, xp, k, wp + j * k * kPanel, scale + j * kPanel, bp + j * kPanel, yp + j * kPanel,
                             out_features, cols, widened.data());
          continue;
        }
      }
      // the last panel prefetches itself again: harmless, and never past the end of the weight
      panel_product<W>(m, xp, k, wp + j * k * kPanel, wp + std::min(j + 1, panels - 1) * k * kPanel,
                       scale == nullptr ? nullptr : scale + j * kPanel, bp + j * kPanel, yp + j * kPanel,
                       out_features, cols);
    }
  });
  return out.view(shape);
}

at::Tensor small_linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& bias, int64_t out_features) {
  TORCH_CHECK(packed.scalar_type() == at::kFloat, "linear: float32 packed weight expected");
  return run_linear<float>(input, packed, nullptr, bias, out_features);
}

at::Tensor small_linear_int8(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scale,
                             const at::Tensor& bias, int64_t out_features) {
  TORCH_CHECK(packed.scalar_type() == at::kChar, "linear_int8: int8 packed weight expected");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == packed.size(0) * kPanel,
              "linear_int8: bad scales");
  return run_linear<int8_t>(input, packed, scale.data_ptr<float>(), bias, out_features);
}

}  // namespace

TORCH_LIBRARY(satic_small_gemm, m) {
  m.def("linear(Tensor input, Tensor packed, Tensor bias, int out_features) -> Tensor");
  m.def("linear_int8(Tensor input, Tensor packed, Tensor scale, Tensor bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(satic_small_gemm, CPU, m) {
  m.impl("linear", &small_linear);
  m.impl("linear_int8", &small_linear_int8);
}
"""


@functools.cache
def load_kernel() -> str | None:
    """Build (first time only, cached by torch) and load the kernel; None with the reason if it cannot be."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel needs an x86-64 CPU, this is {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the kernel needs AVX2, this CPU offers {torch.backends.cpu.get_cpu_capability()}"
    try:
        from torch.utils.cpp_extension import get_default_build_root, load

        build_dir = Path(get_default_build_root()) / _NAME
        source = build_dir / "small_gemm.cpp"  # a file of its own: load_inline would add torch/extension.h (slow)
        if not source.exists() or source.read_text() != _SOURCE:
            with atomic_path(source) as tmp:
                tmp.write_text(_SOURCE)
        load(_NAME, sources=[str(source)], build_directory=str(build_dir), is_python_module=False,
             extra_cflags=["-O3", "-mavx2", "-mfma"])
    except Exception as err:  # noqa: BLE001 - no compiler/ninja or a failed build: any of them means "not available"
        return f"building the small-row kernel failed ({type(err).__name__}: {str(err).strip()[:300]})"
    return None


def kernel_available() -> bool:
    """True when the kernel is built and loaded; warns once with the reason when it is not."""
    reason = load_kernel()
    if reason is not None:
        _warn_once(reason)
    return reason is None


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"{reason}; decoding uses torch's linear layers (slower at batch 1)", stacklevel=3)


def pack_weight(weight: Tensor) -> Tensor:
    """(N, K) -> (ceil(N / 16), K, 16): panel j holds output columns 16j..16j+15, zero-padded."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    padded = F.pad(weight.detach(), (0, 0, 0, panels * PANEL - n))  # (panels * 16, K)
    return padded.view(panels, PANEL, k).transpose(1, 2).contiguous()


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
        if x.numel() <= MAX_ROWS * x.size(-1) and x.dtype == torch.float32:
            return torch.ops.satic_small_gemm.linear(x, self.packed, self.packed_bias, self.out_features)
        return F.linear(x, self.weight, self.bias)


class Int8WeightLinear(nn.Module):
    """nn.Linear with int8 weights (one scale per output row) and float32 activations: a quarter of the
    bytes a batch-1 step reads, and no activation rounding (torch's dynamic quantization rounds those to
    8 bits too, which changes more captions). Every batch size runs through the kernel, so captions do not
    depend on how images are batched."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        _check_cpu_float(linear)
        self.out_features = linear.out_features
        q, scale = quantize_rows(linear.weight)
        packed = pack_weight(q)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", F.pad(scale, (0, packed.size(0) * PANEL - scale.numel())))
        self.register_buffer("packed_bias", padded_bias(linear, packed.size(0)))

    def dequantized_weight(self) -> Tensor:
        """The (N, K) float32 weight this layer multiplies by."""
        k = self.packed.size(1)
        weight = self.packed.float().transpose(1, 2).reshape(-1, k) * self.scale[:, None]
        return weight[: self.out_features]

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.satic_small_gemm.linear_int8(x, self.packed, self.scale, self.packed_bias, self.out_features)


def swap_linears(model: nn.Module, int8: bool = False) -> int:
    """Replace every nn.Linear of `model` by SmallRowLinear (or Int8WeightLinear), in place; returns how many
    were swapped."""
    layer = Int8WeightLinear if int8 else SmallRowLinear
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer(module))
    return len(targets)
