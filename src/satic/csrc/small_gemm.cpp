#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "small_gemm.h"

namespace {

using satic::kPanel;
namespace simd = satic::simd;

// float32: rows (1..4) x 16 outputs of one panel, y = bias + x[rows, k] . panel[k, 16]. Every
// panel row is loaded once per pass and used for all `Rows` rows. Two accumulator sets (even and odd k) keep
// both FMA units busy despite the FMA latency; every row is summed in that one order, so its result does not
// depend on the rows beside it (a batch gives each image the bits it gets alone). With 4 rows the 16
// accumulators leave no register for the panel and x, so a little spills: a pass that streams its panel from
// memory hides that, a compute-bound one (many rows) runs 3 rows a pass. Prefetch: PfEvery 0 reads 4 KB
// ahead in its own stream; pass g of G (PfEvery G) fetches the g-th G-th of the next panel.
template <int Rows, int PfEvery>
void tile(const float* x, int64_t k, const float* panel, const float* bias, float* y, int64_t ldy, int64_t cols,
          const float* pf) {
  static_assert(Rows >= 1 && Rows <= 4, "more rows would spill most of the two accumulator sets");
  constexpr int64_t kAhead = 4096 / (kPanel * sizeof(float));  // panel rows in 4 KB; one row is a cache line
  constexpr int kSets = 2;
  simd::f32x8 acc[kSets][Rows][2];
  _Pragma("GCC unroll 8") for (int s = 0; s < kSets; ++s)
    _Pragma("GCC unroll 8") for (int r = 0; r < Rows; ++r) {
      acc[s][r][0] = s == 0 ? simd::load(bias) : simd::zero();
      acc[s][r][1] = s == 0 ? simd::load(bias + 8) : simd::zero();
    }
  int64_t p = 0;
  for (; p + kSets <= k; p += kSets) {
    _Pragma("GCC unroll 8") for (int s = 0; s < kSets; ++s) {
      const int64_t row = p + s;
      if (PfEvery == 0) {
        simd::prefetch_l1(panel + (row + kAhead) * kPanel);
      } else if (row % PfEvery == 0) {
        simd::prefetch_l2(pf + row / PfEvery * kPanel);
      }
      const simd::f32x8 w0 = simd::load(panel + row * kPanel), w1 = simd::load(panel + row * kPanel + 8);
      _Pragma("GCC unroll 8") for (int r = 0; r < Rows; ++r) {
        const simd::f32x8 xv = simd::broadcast(x + r * k + row);
        acc[s][r][0] = simd::fma(xv, w0, acc[s][r][0]);
        acc[s][r][1] = simd::fma(xv, w1, acc[s][r][1]);
      }
    }
  }
  for (; p < k; ++p) {  // odd k
    const simd::f32x8 w0 = simd::load(panel + p * kPanel), w1 = simd::load(panel + p * kPanel + 8);
    _Pragma("GCC unroll 8") for (int r = 0; r < Rows; ++r) {
      const simd::f32x8 xv = simd::broadcast(x + r * k + p);
      acc[0][r][0] = simd::fma(xv, w0, acc[0][r][0]);
      acc[0][r][1] = simd::fma(xv, w1, acc[0][r][1]);
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < Rows; ++r) {
    const simd::f32x8 lo = simd::add(acc[0][r][0], acc[1][r][0]), hi = simd::add(acc[0][r][1], acc[1][r][1]);
    simd::store_first(y + r * ldy, cols, lo);  // the last panel's columns beyond the layer's are not written
    simd::store_first(y + r * ldy + 8, cols - 8, hi);
  }
}

template <int PfEvery>
void rows_pass(int64_t rows, const float* x, int64_t k, const float* panel, const float* bias, float* y, int64_t ldy,
               int64_t cols, const float* pf) {
  switch (rows) {
    case 1: tile<1, PfEvery>(x, k, panel, bias, y, ldy, cols, pf); break;
    case 2: tile<2, PfEvery>(x, k, panel, bias, y, ldy, cols, pf); break;
    case 3: tile<3, PfEvery>(x, k, panel, bias, y, ldy, cols, pf); break;
    default: tile<4, PfEvery>(x, k, panel, bias, y, ldy, cols, pf); break;
  }
}

}  // namespace

namespace satic {

// A weight larger than this is taken to stream from memory: a decoding step's weights together outgrow the
// caches long before one layer does (the paper-size model's smallest layer is 1 MB, the demo's largest 192 KB).
constexpr int64_t kStreamingBytes = int64_t{256} << 10;

// All m rows times one panel: 1-3 rows in one pass that prefetches 4 KB ahead, and 4 too where the weight
// streams from memory (`streaming`), which hides the 4-row tile's spills; otherwise passes of 3 rows (G passes,
// the panel in cache after the first), where pass g prefetches the g-th G-th of the next panel, so the stream
// from memory never stalls while the later passes compute. Beyond 6 passes the product is compute-bound.
void panel_product(int64_t m, const float* x, int64_t k, const float* panel, const float* next, const float* bias,
                   float* y, int64_t ldy, int64_t cols, bool streaming) {
  const int64_t per = m <= 3 || (m == 4 && streaming) ? m : 3;
  const int64_t groups = (m + per - 1) / per;
  const int64_t share = (k + groups - 1) / groups * kPanel;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r = per * g, rows = std::min<int64_t>(per, m - r);
    const float* pf = next + std::min(g * share, k * kPanel - share);  // the last share ends where the panel does
    switch (groups) {
      case 1: rows_pass<0>(rows, x + r * k, k, panel, bias, y + r * ldy, ldy, cols, pf); break;
      case 2: rows_pass<2>(rows, x + r * k, k, panel, bias, y + r * ldy, ldy, cols, pf); break;
      case 3: rows_pass<3>(rows, x + r * k, k, panel, bias, y + r * ldy, ldy, cols, pf); break;
      case 4: rows_pass<4>(rows, x + r * k, k, panel, bias, y + r * ldy, ldy, cols, pf); break;
      case 5: rows_pass<5>(rows, x + r * k, k, panel, bias, y + r * ldy, ldy, cols, pf); break;
      case 6: rows_pass<6>(rows, x + r * k, k, panel, bias, y + r * ldy, ldy, cols, pf); break;
      default: rows_pass<0>(rows, x + r * k, k, panel, bias, y + r * ldy, ldy, cols, pf); break;
    }
  }
}

// y (m, out_features) = x (m, k) . packed weight + bias, the panels split over threads.
void packed_linear(int64_t m, const float* x, int64_t k, const float* w, int64_t panels, const float* b, float* y,
                   int64_t out_features) {
  if (m == 0) return;
  const bool streaming = panels * k * kPanel * int64_t{sizeof(float)} > kStreamingBytes;
  at::parallel_for(0, panels, grain_for(m * k * kPanel), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      // the last panel prefetches itself again; a PfEvery-0 pass may reach up to 4 KB past the weight's end,
      // harmless: a prefetch never faults
      panel_product(m, x, k, w + j * k * kPanel, w + std::min(j + 1, panels - 1) * k * kPanel, b + j * kPanel,
                    y + j * kPanel, out_features, std::min(kPanel, out_features - j * kPanel), streaming);
    }
  });
}

}  // namespace satic

namespace {

using satic::panel_product;

// int8 weights: rows x 16 outputs of one panel with integer products. The panel holds k-pairs (32 bytes each):
// bytes 2c and 2c+1 of pair p are column c's weights at k = 2p and 2p+1, so one vpmaddwd multiplies 8 columns
// by two inputs at once into exact int32 sums (its rate on AVX2 equals float FMA's, but the weights stay 8-bit
// and widen once per pair for all rows). Activations are int16 with one scale per row, few enough levels that
// no sum can overflow. y = bias + row_scale * scale * sum. Prefetch as in the float tile, per 32-byte pair.
template <int Rows, int PfEvery>
void int_tile(const int16_t* xq, int64_t pairs, const int8_t* panel, const float* row_scale, const float* scale,
              const float* bias, float* y, int64_t ldy, int64_t cols, const int8_t* pf) {
  simd::i32x8 acc[Rows][2];
  _Pragma("GCC unroll 8") for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = simd::zero_int();
  for (int64_t p = 0; p < pairs; ++p) {
    if (PfEvery == 0) {
      if (p % 2 == 0) simd::prefetch_l1(panel + p * 32 + 4096);
    } else if (p % (2 * PfEvery) == 0) {
      simd::prefetch_l2(pf + p / PfEvery * 32);
    }
    const simd::pairs8 w0 = simd::widen_int8(panel + p * 32), w1 = simd::widen_int8(panel + p * 32 + 16);
    _Pragma("GCC unroll 8") for (int r = 0; r < Rows; ++r) {
      const simd::pair16 xv = simd::int16_pair(xq + r * 2 * pairs + 2 * p);
      acc[r][0] = simd::add_pair_products(acc[r][0], xv, w0);
      acc[r][1] = simd::add_pair_products(acc[r][1], xv, w1);
    }
  }
  const simd::f32x8 s0 = simd::load(scale), s1 = simd::load(scale + 8);
  const simd::f32x8 b0 = simd::load(bias), b1 = simd::load(bias + 8);
  _Pragma("GCC unroll 8") for (int r = 0; r < Rows; ++r) {
    const simd::f32x8 rs = simd::set1(row_scale[r]);
    const simd::f32x8 lo = simd::fma(simd::to_float(acc[r][0]), simd::mul(rs, s0), b0);
    const simd::f32x8 hi = simd::fma(simd::to_float(acc[r][1]), simd::mul(rs, s1), b1);
    simd::store_first(y + r * ldy, cols, lo);
    simd::store_first(y + r * ldy + 8, cols - 8, hi);
  }
}

template <int PfEvery>
void int_rows_pass(int64_t rows, const int16_t* xq, int64_t pairs, const int8_t* panel, const float* row_scale,
                   const float* scale, const float* bias, float* y, int64_t ldy, int64_t cols, const int8_t* pf) {
  switch (rows) {
    case 1: int_tile<1, PfEvery>(xq, pairs, panel, row_scale, scale, bias, y, ldy, cols, pf); break;
    case 2: int_tile<2, PfEvery>(xq, pairs, panel, row_scale, scale, bias, y, ldy, cols, pf); break;
    case 3: int_tile<3, PfEvery>(xq, pairs, panel, row_scale, scale, bias, y, ldy, cols, pf); break;
    case 4: int_tile<4, PfEvery>(xq, pairs, panel, row_scale, scale, bias, y, ldy, cols, pf); break;
    case 5: int_tile<5, PfEvery>(xq, pairs, panel, row_scale, scale, bias, y, ldy, cols, pf); break;
    default: int_tile<6, PfEvery>(xq, pairs, panel, row_scale, scale, bias, y, ldy, cols, pf); break;
  }
}

// All m rows times one int8 panel, in passes of up to 6 rows (the integer sums are exact in any order): one
// prefetches 4 KB ahead, pass g of 2 or 3 the g-th share of the next panel.
void int_panel_product(int64_t m, const int16_t* xq, int64_t pairs, const int8_t* panel, const int8_t* next,
                       const float* row_scale, const float* scale, const float* bias, float* y, int64_t ldy,
                       int64_t cols) {
  const int64_t groups = (m + 5) / 6;
  const int64_t share = (pairs + groups - 1) / groups * 32;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r = 6 * g, rows = std::min<int64_t>(6, m - r);
    const int16_t* xr = xq + r * 2 * pairs;
    const int8_t* pf = next + g * share;
    switch (groups) {
      case 2: int_rows_pass<2>(rows, xr, pairs, panel, row_scale + r, scale, bias, y + r * ldy, ldy, cols, pf); break;
      case 3: int_rows_pass<3>(rows, xr, pairs, panel, row_scale + r, scale, bias, y + r * ldy, ldy, cols, pf); break;
      default: int_rows_pass<0>(rows, xr, pairs, panel, row_scale + r, scale, bias, y + r * ldy, ldy, cols, pf); break;
    }
  }
}

// Each row of x (m, k) as int16 in [-levels, levels] times its scale max|x| / levels, rounded to nearest
// even, k padded with zeros to `width`. A row holding NaN or infinity gets a NaN scale: its outputs are NaN.
void quantize_activations(const float* x, int64_t m, int64_t k, int64_t width, int64_t levels, int16_t* xq,
                          float* row_scale) {
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x + r * k;
    int16_t* out = xq + r * width;
    simd::f32x8 top = simd::zero();
    simd::mask8 not_finite = simd::no_lanes();
    int64_t c = 0;
    for (; c + 8 <= k; c += 8) {
      const simd::f32x8 v = simd::load(row + c);
      top = simd::max(top, simd::abs(v));
      not_finite = simd::either(not_finite, simd::not_finite(v));
    }
    float lanes[8];
    simd::store(lanes, top);
    float amax = *std::max_element(lanes, lanes + 8);
    bool finite = !simd::any(not_finite);
    for (int64_t t = c; t < k; ++t) {
      finite = finite && std::isfinite(row[t]);
      amax = std::max(amax, std::fabs(row[t]));
    }
    std::fill(out, out + width, int16_t{0});
    if (!finite) {
      row_scale[r] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    if (amax == 0.0f) {
      row_scale[r] = 1.0f;
      continue;
    }
    row_scale[r] = amax / static_cast<float>(levels);
    const float inverse = static_cast<float>(levels) / amax;
    const simd::f32x8 vinv = simd::set1(inverse);
    c = 0;
    for (; c + 16 <= k; c += 16) {  // rounding: nearest even, as std::nearbyint below
      simd::store_int16(out + c, simd::mul(simd::load(row + c), vinv), simd::mul(simd::load(row + c + 8), vinv));
    }
    for (; c < k; ++c) out[c] = static_cast<int16_t>(std::nearbyint(row[c] * inverse));
  }
}

// x (..., k) float32 -> (..., out_features) float32; fill(m, x, y) computes the (m, k) x rows into y.
template <typename Fill>
at::Tensor rows_times_weight(const at::Tensor& input, int64_t k, int64_t out_features, Fill fill) {
  TORCH_CHECK(input.scalar_type() == at::kFloat, "small_linear: float32 input only");
  TORCH_CHECK(input.size(-1) == k, "small_linear: input has ", input.size(-1), " features, weight expects ", k);
  const at::Tensor x = input.reshape({-1, k}).contiguous();
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = out_features;
  at::Tensor out = at::empty({x.size(0), out_features}, x.options());
  fill(x.size(0), x.data_ptr<float>(), out.data_ptr<float>());
  return out.view(shape);
}

void check_vector(const at::Tensor& t, int64_t panels, int64_t out_features, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == panels * kPanel &&
              out_features <= panels * kPanel, "small_linear: bad ", what);
}

// packed (panels, k, 16) float32, bias (panels * 16) zero-padded
at::Tensor small_linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& bias, int64_t out_features) {
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.dim() == 3 && packed.size(2) == kPanel &&
              packed.is_contiguous(), "linear: bad packed weight");
  const int64_t panels = packed.size(0), k = packed.size(1);
  check_vector(bias, panels, out_features, "bias");
  const float* w = packed.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  return rows_times_weight(input, k, out_features, [&](int64_t m, const float* x, float* y) {
    satic::packed_linear(m, x, k, w, panels, b, y, out_features);
  });
}

// packed (panels, pairs, 32) int8 in k-pairs; scale, bias (panels * 16) zero-padded; activations rounded to
// int16 in [-levels, levels], where 127 * levels * 2 * pairs must fit an int32.
at::Tensor small_linear_int8(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scale,
                             const at::Tensor& bias, int64_t out_features, int64_t levels) {
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 3 && packed.size(2) == 2 * kPanel &&
              packed.is_contiguous(), "linear_int8: bad packed weight");
  const int64_t panels = packed.size(0), pairs = packed.size(1), k = input.size(-1);
  check_vector(bias, panels, out_features, "bias");
  check_vector(scale, panels, out_features, "scales");
  TORCH_CHECK(levels >= 1 && levels <= 32767 && 127 * levels * 2 * pairs <= std::numeric_limits<int32_t>::max(),
              "linear_int8: ", levels, " activation levels can overflow an int32 sum of ", 2 * pairs, " products");
  TORCH_CHECK((k + 1) / 2 == pairs, "linear_int8: input has ", k, " features, weight expects ", 2 * pairs - 1,
              " or ", 2 * pairs);
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  return rows_times_weight(input, k, out_features, [&](int64_t m, const float* x, float* y) {
    satic::packed_linear_int8(m, x, k, w, pairs, panels, s, b, y, out_features, levels);
  });
}

}  // namespace

namespace satic {

void packed_linear_int8(int64_t m, const float* x, int64_t k, const int8_t* w, int64_t pairs, int64_t panels,
                        const float* scale, const float* bias, float* y, int64_t out_features, int64_t levels) {
  if (m == 0) return;
  std::vector<int16_t> xq(m * 2 * pairs);
  std::vector<float> row_scale(m);
  quantize_activations(x, m, k, 2 * pairs, levels, xq.data(), row_scale.data());
  at::parallel_for(0, panels, satic::grain_for(m * 2 * pairs * kPanel), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      int_panel_product(m, xq.data(), pairs, w + j * pairs * 32, w + std::min(j + 1, panels - 1) * pairs * 32,
                        row_scale.data(), scale + j * kPanel, bias + j * kPanel, y + j * kPanel, out_features,
                        std::min(kPanel, out_features - j * kPanel));
    }
  });
}

// rows x n: y = weight * (x - mean) / (unbiased std + eps) + bias per row, the rows split over threads.
void reference_norm_rows(const float* xp, int64_t rows, int64_t n, const float* wp, const float* bp, float eps,
                         float* yp) {
  at::parallel_for(0, rows, satic::grain_for(8 * n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * n;
      float* y = yp + r * n;
      simd::f32x8 sum = simd::zero();
      int64_t c = 0;
      for (; c + 8 <= n; c += 8) sum = simd::add(sum, simd::load(row + c));
      float total = horizontal_sum(sum);
      for (int64_t t = c; t < n; ++t) total += row[t];
      const float mean = total / static_cast<float>(n);
      const simd::f32x8 vmean = simd::set1(mean);
      simd::f32x8 squares = simd::zero();
      for (c = 0; c + 8 <= n; c += 8) {
        const simd::f32x8 d = simd::sub(simd::load(row + c), vmean);
        squares = simd::fma(d, d, squares);
      }
      float square_sum = horizontal_sum(squares);
      for (int64_t t = c; t < n; ++t) square_sum += (row[t] - mean) * (row[t] - mean);
      const float inverse = 1.0f / (std::sqrt(square_sum / static_cast<float>(n - 1)) + eps);
      const simd::f32x8 vinv = simd::set1(inverse);
      for (c = 0; c + 8 <= n; c += 8) {
        const simd::f32x8 scaled = simd::mul(simd::sub(simd::load(row + c), vmean), vinv);
        simd::store(y + c, simd::fma(scaled, simd::load(wp + c), simd::load(bp + c)));
      }
      for (int64_t t = c; t < n; ++t) y[t] = (row[t] - mean) * inverse * wp[t] + bp[t];
    }
  });
}

const at::Tensor& float_tensor(const std::vector<at::Tensor>& t, size_t i, const char* op) {
  TORCH_CHECK(i < t.size(), op, ": weight ", i, " is missing");
  TORCH_CHECK(t[i].scalar_type() == at::kFloat && t[i].is_contiguous() && t[i].device().is_cpu(),
              op, ": weight ", i, " is not a contiguous float32 CPU tensor");
  return t[i];
}

Linear linear_at(const std::vector<at::Tensor>& t, size_t i, int64_t in, int64_t out, const char* op) {
  TORCH_CHECK(i + 2 < t.size(), op, ": weight ", i, " is missing");
  const at::Tensor& packed = t[i];
  const at::Tensor& bias = float_tensor(t, i + 2, op);
  const int64_t panels = (out + kPanel - 1) / kPanel;
  TORCH_CHECK(bias.numel() == panels * kPanel, op, ": bias ", i + 2, " is not ", panels * kPanel, " values");
  if (packed.scalar_type() == at::kFloat) {
    TORCH_CHECK(packed.is_contiguous() && packed.dim() == 3 && packed.size(0) == panels && packed.size(1) == in &&
                    packed.size(2) == kPanel && t[i + 1].numel() == 0,
                op, ": weight ", i, " is not a packed (", panels, ", ", in, ", 16) float32 weight");
    return {packed.data_ptr<float>(), bias.data_ptr<float>(), in, out, panels};
  }
  const int64_t pairs = (in + 1) / 2;
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(0) == panels && packed.size(1) == pairs && packed.size(2) == 2 * kPanel,
              op, ": weight ", i, " is neither a packed float32 nor a packed (", panels, ", ", pairs,
              ", 32) int8 weight");
  const at::Tensor& scale = float_tensor(t, i + 1, op);
  TORCH_CHECK(scale.numel() == panels * kPanel, op, ": scales ", i + 1, " are not ", panels * kPanel, " values");
  Linear linear{nullptr, bias.data_ptr<float>(), in, out, panels};
  linear.q = packed.data_ptr<int8_t>();
  linear.scale = scale.data_ptr<float>();
  linear.pairs = pairs;  // as satic.decoding.small_gemm.activation_levels: an int32 sum cannot overflow
  linear.levels = std::min<int64_t>(32767, std::numeric_limits<int32_t>::max() / (127 * 2 * pairs));
  return linear;
}

Norm norm_at(const std::vector<at::Tensor>& t, size_t i, int64_t d, const char* op) {
  TORCH_CHECK(float_tensor(t, i, op).numel() == d && float_tensor(t, i + 1, op).numel() == d,
              op, ": norm ", i, " is not ", d, " values");
  return {t[i].data_ptr<float>(), t[i + 1].data_ptr<float>()};
}

}  // namespace satic

namespace {

// The reference's norm for inference: y = weight * (x - mean) / (unbiased std + eps) + bias over the last
// dimension, one call where torch needs seven operators (a paper-size decoding step runs 19 norms).
at::Tensor reference_norm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const int64_t n = input.size(-1);
  TORCH_CHECK(input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat,
              "reference_norm: float32 only");
  TORCH_CHECK(n >= 2 && weight.numel() == n && bias.numel() == n, "reference_norm: ", n, " features, weight ",
              weight.numel(), ", bias ", bias.numel());
  const at::Tensor x = input.contiguous(), w = weight.contiguous(), b = bias.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  satic::reference_norm_rows(xp, x.numel() / n, n, wp, bp, static_cast<float>(eps), yp);
  return out;
}

}  // namespace

TORCH_LIBRARY(satic_small_gemm, m) {
  m.def("linear(Tensor input, Tensor packed, Tensor bias, int out_features) -> Tensor");
  m.def("linear_int8(Tensor input, Tensor packed, Tensor scale, Tensor bias, int out_features, int levels) -> Tensor");
  m.def("reference_norm(Tensor input, Tensor weight, Tensor bias, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(satic_small_gemm, CPU, m) {
  m.impl("linear", &small_linear);
  m.impl("linear_int8", &small_linear_int8);
  m.impl("reference_norm", &reference_norm);
}
