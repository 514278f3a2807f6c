// Native decoding on the CPU: a step (K new words of every row in, the log-probs of the next K out), and
// the sampling (greedy or drawn) and beam search loops of satic.decoding.search around it (decoding
// constraints and diverse beam groups included), each in one call, for one model or an ensemble whose word
// probabilities are mixed.
//
// A step is the model's decode() + logprobs() over a static key/value cache in eval mode (no dropout), with
// the same pieces a recorded step runs (the packed small-row linear, fp32 or int8, the reference's norm, the
// fused inference attention), so its numbers equal the recorded step's up to float rounding. A recorded
// step still dispatches ~10 operators per layer, and the search loops a dozen more per step in Python; at
// batch 1 on a small model that is most of a step's time, and here it is gone, leaving the weights'
// streaming and the arithmetic. The loops keep the Python loops' semantics exactly (tests compare them).
//
// Self-attention reads the cache slots before the end of this group only: the slots after it hold -1e9
// in the model's bias, whose softmax weight is exactly 0, so leaving them out changes nothing.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "small_gemm.h"

namespace {

constexpr int64_t kWeightsPerLayer = 24;  // 3 norms (weight, bias) and 6 linears (packed, scale, bias)

namespace simd = satic::simd;
using satic::float_tensor;
using satic::Linear;
using satic::linear_at;
using satic::Norm;
using satic::norm_at;

struct DecoderLayer {
  Norm norm1, norm2, norm3;
  Linear qkv, self_out, cross_q, cross_out, w1, w2;
};

struct Weights {
  const float* embed;      // (V+1, d)
  const float* positions;  // (max_positions, d)
  int64_t vocab, max_positions, d_model, d_ff;
  std::vector<DecoderLayer> layers;
  Norm final_norm;
  Linear generator;
};

// The order of satic.decoding.engine.native_decoder_weights: word embedding, position table, per layer
// [norm1, qkv, self out, norm2, cross q, cross out, norm3, w1, w2], final norm, generator.
Weights read_weights(const std::vector<at::Tensor>& t, int64_t d_ff) {
  constexpr const char* kOp = "decode_step";
  TORCH_CHECK(t.size() >= 7 && (t.size() - 7) % kWeightsPerLayer == 0, "decode_step: ", t.size(),
              " weight tensors is not 7 + 24 per layer");
  Weights w;
  const at::Tensor& embed = float_tensor(t, 0, kOp);
  const at::Tensor& positions = float_tensor(t, 1, kOp);
  TORCH_CHECK(embed.dim() == 2 && positions.dim() == 2 && positions.size(1) == embed.size(1),
              "decode_step: the word embedding and the position table must be (V+1, d) and (P, d)");
  w.embed = embed.data_ptr<float>(), w.positions = positions.data_ptr<float>();
  w.vocab = embed.size(0), w.max_positions = positions.size(0), w.d_model = embed.size(1), w.d_ff = d_ff;
  const int64_t d = w.d_model, layers = static_cast<int64_t>((t.size() - 7) / kWeightsPerLayer);
  size_t i = 2;
  for (int64_t l = 0; l < layers; ++l, i += kWeightsPerLayer) {
    w.layers.push_back({norm_at(t, i, d, kOp), norm_at(t, i + 8, d, kOp), norm_at(t, i + 16, d, kOp),
                        linear_at(t, i + 2, d, 3 * d, kOp), linear_at(t, i + 5, d, d, kOp),
                        linear_at(t, i + 10, d, d, kOp), linear_at(t, i + 13, d, d, kOp),
                        linear_at(t, i + 18, d, d_ff, kOp), linear_at(t, i + 21, d_ff, d, kOp)});
  }
  w.final_norm = norm_at(t, i, d, kOp);
  w.generator = linear_at(t, i + 2, d, w.vocab, kOp);
  return w;
}

// exp of 8 floats (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial of r, times 2^n), within
// 2 ulp of std::exp; 0 below -87.3 (where float's exp underflows), as for the -1e9 of a masked logit.
inline simd::f32x8 exp8(simd::f32x8 x) {
  using namespace simd;
  const f32x8 lo = set1(-87.33654f), hi = set1(88.37626f);
  const mask8 under = less(x, lo);
  x = min(max(x, lo), hi);
  const f32x8 n = round_even(mul(x, set1(1.44269504088896341f)));
  f32x8 r = fnma(n, set1(0.693359375f), x);
  r = fnma(n, set1(-2.12194440e-4f), r);
  f32x8 p = set1(1.9875691500e-4f);
  p = fma(p, r, set1(1.3981999507e-3f));
  p = fma(p, r, set1(8.3334519073e-3f));
  p = fma(p, r, set1(4.1665795894e-2f));
  p = fma(p, r, set1(1.6666665459e-1f));
  p = fma(p, r, set1(5.0000001201e-1f));
  p = fma(mul(p, r), r, add(r, set1(1.0f)));
  return zero_where(under, mul(p, pow2(n)));
}

// logits (n) -> log-softmax in place: x - (max + log(sum(exp(x - max)))), torch's formula; 8 lanes at a time.
void log_softmax_row(float* x, int64_t n) {
  simd::f32x8 top8 = simd::set1(-INFINITY);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) top8 = simd::max(top8, simd::load(x + c));
  float lanes[8];
  simd::store(lanes, top8);
  float top = *std::max_element(lanes, lanes + 8);
  for (; c < n; ++c) top = std::max(top, x[c]);
  const simd::f32x8 shift8 = simd::set1(top);
  simd::f32x8 sum8 = simd::zero();
  for (c = 0; c + 8 <= n; c += 8) sum8 = simd::add(sum8, exp8(simd::sub(simd::load(x + c), shift8)));
  float total = satic::horizontal_sum(sum8);
  for (; c < n; ++c) total += std::exp(x[c] - top);
  const float shift = top + std::log(total);
  for (c = 0; c < n; ++c) x[c] -= shift;
}

// Attention of every (row, head) pair's `length` queries; query row m = r * length + i at q + m * q_stride
// + h * dk, output at out + m * d + h * dk. keys(r, h) / values(r, h) give a pair's first key and value, lk
// and bias(r) its keys and their bias (or null).
template <typename Keys, typename Values, typename Bias>
void attend_all(int64_t rows, int64_t length, int64_t heads, int64_t dk, const float* q, int64_t q_stride, float* out,
                int64_t lk, Keys keys, Values values, Bias bias) {
  const int64_t d = heads * dk;
  at::parallel_for(0, rows * heads, satic::grain_for(2 * length * lk * dk), [&](int64_t begin, int64_t end) {
    std::vector<float> scores(lk);
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / heads, h = rh % heads;
      for (int64_t i = 0; i < length; ++i) {
        const int64_t m = r * length + i;
        satic::attend_query(q + m * q_stride + h * dk, keys(r, h), dk, values(r, h), dk, bias(r), lk, dk,
                            scores.data(), out + m * d + h * dk);
      }
    }
  });
}

// What every step of one decode reads, checked once: the weights, the caches (per layer (2, R, H, T, dk),
// each (H, T, dk) block contiguous), the regions' keys and values (per layer (B, H, N, dk), R = B * S rows
// image-major) and their bias ((1 or B, 1, 1, N) or none).
struct Decode {
  Weights w;
  int64_t rows, length, heads, dk, capacity, regions, per_image, bias_images = 0;
  float eps;
  std::vector<float*> caches;
  std::vector<int64_t> kv_strides, row_strides;
  std::vector<const float*> keys, values;
  const float* bias = nullptr;
  at::Tensor bias_tensor;  // keeps a contiguous copy alive
};

Decode prepare(int64_t rows, int64_t length, const std::vector<at::Tensor>& caches,
               const std::vector<at::Tensor>& memory, const c10::optional<at::Tensor>& memory_bias,
               const std::vector<at::Tensor>& weights, int64_t num_heads, int64_t d_ff, double norm_eps) {
  Decode s;
  TORCH_CHECK(d_ff > 0, "decode_step: d_ff must be positive");
  s.w = read_weights(weights, d_ff);
  const int64_t d = s.w.d_model, layers = static_cast<int64_t>(s.w.layers.size());
  TORCH_CHECK(num_heads > 0 && d % num_heads == 0, "decode_step: d_model ", d, " is not a multiple of ", num_heads,
              " heads");
  TORCH_CHECK(rows > 0 && length > 0, "decode_step: no rows or no words to decode");
  s.rows = rows, s.length = length, s.heads = num_heads, s.dk = d / num_heads, s.eps = static_cast<float>(norm_eps);
  TORCH_CHECK(static_cast<int64_t>(caches.size()) == layers && static_cast<int64_t>(memory.size()) == 2 * layers,
              "decode_step: expected ", layers, " caches and ", 2 * layers, " memory tensors");
  s.capacity = caches.empty() || caches[0].dim() != 5 ? 0 : caches[0].size(3);
  for (const at::Tensor& c : caches) {
    TORCH_CHECK(c.dim() == 5 && c.scalar_type() == at::kFloat && c.device().is_cpu() && c.size(0) == 2 &&
                    c.size(1) == rows && c.size(2) == num_heads && c.size(3) == s.capacity && c.size(4) == s.dk &&
                    c.stride(4) == 1 && c.stride(3) == s.dk && c.stride(2) == s.capacity * s.dk,
                "decode_step: each cache must be (2, ", rows, ", ", num_heads, ", T, ", s.dk,
                ") float32 with contiguous (H, T, dk) blocks");
    s.caches.push_back(c.data_ptr<float>());
    s.kv_strides.push_back(c.stride(0));
    s.row_strides.push_back(c.stride(1));
  }
  const int64_t batch = memory.empty() ? 0 : memory[0].size(0);
  s.regions = memory.empty() ? 0 : memory[0].size(2);
  for (size_t i = 0; i < memory.size(); ++i) {
    const at::Tensor& m = memory[i];
    TORCH_CHECK(m.dim() == 4 && m.scalar_type() == at::kFloat && m.device().is_cpu() && m.is_contiguous() &&
                    m.size(0) == batch && m.size(1) == num_heads && m.size(2) == s.regions && m.size(3) == s.dk,
                "decode_step: the regions' keys and values must be contiguous (B, ", num_heads, ", N, ", s.dk,
                ") float32");
    (i % 2 == 0 ? s.keys : s.values).push_back(m.data_ptr<float>());
  }
  TORCH_CHECK(batch > 0 && rows % batch == 0, "decode_step: ", rows, " rows do not split among ", batch, " images");
  s.per_image = rows / batch;
  if (memory_bias.has_value()) {
    s.bias_tensor = memory_bias->contiguous();
    const at::Tensor& b = s.bias_tensor;
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 4 && b.size(1) == 1 && b.size(2) == 1 &&
                    b.size(3) == s.regions && (b.size(0) == 1 || b.size(0) == batch),
                "decode_step: memory_bias must be (1 or B, 1, 1, N) float32");
    s.bias = b.data_ptr<float>();
    s.bias_images = b.size(0);
  }
  return s;
}

void check_positions(const Decode& s, int64_t start) {
  const int64_t end = start + s.length;
  TORCH_CHECK(start >= 0 && end <= s.w.max_positions, "decode_step: positions ", start, "..", end - 1,
              " are outside the model's ", s.w.max_positions);
  TORCH_CHECK(end <= s.capacity, "decode_step: positions up to ", end - 1, " do not fit a cache of ", s.capacity);
}

// One step: tokens (R * K) at positions start..start+K-1 -> their keys/values written to the caches and the
// log-probs (R * K, V+1) of the next K words in `out`.
void run_step(const Decode& s, const int64_t* tokens, int64_t start, float* out) {
  const Weights& w = s.w;
  const int64_t d = w.d_model, rows = s.rows, length = s.length, m_rows = rows * length, end = start + length;
  const int64_t heads = s.heads, dk = s.dk, capacity = s.capacity, regions = s.regions, per_image = s.per_image;
  std::vector<float> x(m_rows * d), h(m_rows * d), att(m_rows * d), wide(m_rows * std::max(3 * d, w.d_ff));
  const float scale = static_cast<float>(std::sqrt(static_cast<double>(d)));
  for (int64_t m = 0; m < m_rows; ++m) {  // word embedding * sqrt(d) + position
    const float* e = w.embed + tokens[m] * d;
    const float* p = w.positions + (start + m % length) * d;
    for (int64_t c = 0; c < d; ++c) x[m * d + c] = e[c] * scale + p[c];
  }
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const DecoderLayer& layer = w.layers[l];
    float* cache = s.caches[l];
    const int64_t kv_stride = s.kv_strides[l], row_stride = s.row_strides[l];
    // self-attention: write the group's keys/values, then every query attends to the slots before `end`
    satic::reference_norm_rows(x.data(), m_rows, d, layer.norm1.w, layer.norm1.b, s.eps, h.data());
    layer.qkv(m_rows, h.data(), wide.data());  // (M, 3d): q | k | v
    for (int64_t m = 0; m < m_rows; ++m) {
      const int64_t r = m / length, slot = start + m % length;
      for (int64_t hh = 0; hh < heads; ++hh) {
        const float* k = wide.data() + m * 3 * d + d + hh * dk;
        float* k_slot = cache + r * row_stride + (hh * capacity + slot) * dk;
        std::copy(k, k + dk, k_slot);
        std::copy(k + d, k + d + dk, k_slot + kv_stride);
      }
    }
    attend_all(rows, length, heads, dk, wide.data(), 3 * d, att.data(), end,
               [&](int64_t r, int64_t hh) { return cache + r * row_stride + hh * capacity * dk; },
               [&](int64_t r, int64_t hh) { return cache + kv_stride + r * row_stride + hh * capacity * dk; },
               [](int64_t) -> const float* { return nullptr; });
    layer.self_out(m_rows, att.data(), h.data());
    satic::add_into(x.data(), h.data(), m_rows * d);
    // cross-attention: an image's rows read its regions
    satic::reference_norm_rows(x.data(), m_rows, d, layer.norm2.w, layer.norm2.b, s.eps, h.data());
    layer.cross_q(m_rows, h.data(), wide.data());  // (M, d)
    const float* keys = s.keys[l];
    const float* values = s.values[l];
    attend_all(rows, length, heads, dk, wide.data(), d, att.data(), regions,
               [&](int64_t r, int64_t hh) { return keys + ((r / per_image) * heads + hh) * regions * dk; },
               [&](int64_t r, int64_t hh) { return values + ((r / per_image) * heads + hh) * regions * dk; },
               [&](int64_t r) -> const float* {
                 return s.bias == nullptr ? nullptr : s.bias + (s.bias_images == 1 ? 0 : r / per_image) * regions;
               });
    layer.cross_out(m_rows, att.data(), h.data());
    satic::add_into(x.data(), h.data(), m_rows * d);
    satic::feed_forward(m_rows, d, w.d_ff, layer.norm3, layer.w1, layer.w2, s.eps, x.data(), h.data(), wide.data());
  }
  satic::reference_norm_rows(x.data(), m_rows, d, w.final_norm.w, w.final_norm.b, s.eps, h.data());
  w.generator(m_rows, h.data(), out);
  at::parallel_for(0, m_rows, satic::grain_for(4 * w.vocab), [&](int64_t begin, int64_t stop) {
    for (int64_t m = begin; m < stop; ++m) log_softmax_row(out + m * w.vocab, w.vocab);
  });
}

// An ensemble's members' log-probs lp[m] (n values each) -> the log of the members' weighted mean
// probability, log(sum_m exp(lp_m) * w_m / W) with W the weights' sum, the members added in order (the
// reference eval_ensemble's formula), into `out` (which may be lp[0]). Eight values at a time with exp8.
void mix_logprobs(const std::vector<const float*>& lp, const std::vector<float>& weights, int64_t n, float* out) {
  float total = 0.0f;
  for (float w : weights) total += w;
  const simd::f32x8 total8 = simd::set1(total);
  const int64_t members = static_cast<int64_t>(lp.size());
  at::parallel_for(0, (n + 7) / 8, satic::grain_for(64 * members), [&](int64_t begin, int64_t end) {
    float x[8], acc[8];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c = b * 8, lanes = std::min<int64_t>(8, n - c);
      simd::f32x8 sum8 = simd::zero();
      for (int64_t m = 0; m < members; ++m) {
        std::fill(x, x + 8, -INFINITY);
        std::copy(lp[m] + c, lp[m] + c + lanes, x);
        const simd::f32x8 p = simd::mul(exp8(simd::load(x)), simd::set1(weights[m]));
        sum8 = simd::add(sum8, simd::div(p, total8));
      }
      simd::store(acc, sum8);
      for (int64_t i = 0; i < lanes; ++i) out[c + i] = std::log(acc[i]);
    }
  });
}

// The models a search loop decodes with: one, or an ensemble's members whose word probabilities are mixed.
struct Members {
  std::vector<Decode> models;
  std::vector<float> weights;  // the mixture's (unnormalised) weights, one per model
  std::vector<float> scratch;  // the later members' log-probs of a step
};

// The op's flat lists -> one Decode per model. Model m has sizes[3m..3m+2] = (layers L, heads, d_ff) and
// scalars[2m..2m+1] = (norm eps, mixture weight); its tensors follow the earlier models' in each list: L caches
// (each sliced to its first `rows` rows), 2L regions' keys/values, memory_bias[m] and 7 + 24 L weights.
Members prepare_members(int64_t rows, int64_t length, const std::vector<at::Tensor>& caches,
                        const std::vector<at::Tensor>& memory, const c10::List<c10::optional<at::Tensor>>& memory_bias,
                        const std::vector<at::Tensor>& weights, const std::vector<int64_t>& sizes,
                        const std::vector<double>& scalars) {
  const size_t n = memory_bias.size();
  TORCH_CHECK(n >= 1 && sizes.size() == 3 * n && scalars.size() == 2 * n,
              "decode loop: sizes need 3 and scalars 2 entries per model (memory_bias has one)");
  Members out;
  size_t c = 0, w = 0;
  for (size_t m = 0; m < n; ++m) {
    const int64_t layers = sizes[3 * m], heads = sizes[3 * m + 1], d_ff = sizes[3 * m + 2];
    const double eps = scalars[2 * m], mix = scalars[2 * m + 1];
    const size_t l = static_cast<size_t>(std::max<int64_t>(layers, 0)), count = 7 + kWeightsPerLayer * l;
    TORCH_CHECK(layers >= 1 && c + l <= caches.size() && 2 * (c + l) <= memory.size() &&
                    w + count <= weights.size(),
                "decode loop: the tensors of model ", m, " are missing");
    std::vector<at::Tensor> model_caches;
    for (size_t i = c; i < c + l; ++i) {
      const at::Tensor& cache = caches[i];
      model_caches.push_back(cache.dim() > 1 && cache.size(1) > rows ? cache.slice(1, 0, rows) : cache);
    }
    const std::vector<at::Tensor> model_memory(memory.begin() + 2 * c, memory.begin() + 2 * (c + l));
    const std::vector<at::Tensor> model_weights(weights.begin() + w, weights.begin() + w + count);
    out.models.push_back(prepare(rows, length, model_caches, model_memory, memory_bias.get(m), model_weights,
                                 heads, d_ff, eps));
    TORCH_CHECK(out.models[m].w.vocab == out.models[0].w.vocab, "decode loop: model ", m, " has ",
                out.models[m].w.vocab, " outputs, model 0 ", out.models[0].w.vocab);
    TORCH_CHECK(std::isfinite(mix) && mix > 0, "decode loop: mixture weight ", m, " must be positive");
    out.weights.push_back(static_cast<float>(mix));
    c += l, w += count;
  }
  TORCH_CHECK(c == caches.size() && 2 * c == memory.size() && w == weights.size(),
              "decode loop: more tensors than the models' layers take");
  return out;
}

// One step of every model -> the log-probs (R * K, V+1) in `out`: the model's own, or the ensemble's mixture.
void run_members(Members& members, const int64_t* tokens, int64_t start, float* out) {
  const std::vector<Decode>& models = members.models;
  run_step(models[0], tokens, start, out);
  if (models.size() == 1) return;
  const Decode& s = models[0];
  const int64_t n = s.rows * s.length * s.w.vocab;
  members.scratch.resize((models.size() - 1) * n);
  std::vector<const float*> lp{out};
  for (size_t m = 1; m < models.size(); ++m) {
    float* mine = members.scratch.data() + (m - 1) * n;
    run_step(models[m], tokens, start, mine);
    lp.push_back(mine);
  }
  mix_logprobs(lp, members.weights, n, out);
}

// logprobs: the members' (..., V+1) float32 log-probs, all of one shape -> their mixture (mix_logprobs), the
// step of satic.decoding.ensemble's Python loop, which then equals the native loops' to the bit.
at::Tensor mix_step(const std::vector<at::Tensor>& logprobs, const std::vector<double>& weights) {
  TORCH_CHECK(!logprobs.empty() && logprobs.size() == weights.size(), "mix_logprobs: one weight per member");
  std::vector<const float*> lp;
  std::vector<at::Tensor> keep;
  for (const at::Tensor& t : logprobs) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.sizes() == logprobs[0].sizes(),
                "mix_logprobs: the members' log-probs must be float32 CPU tensors of one shape");
    keep.push_back(t.contiguous());
    lp.push_back(keep.back().data_ptr<float>());
  }
  at::Tensor out = at::empty(logprobs[0].sizes(), logprobs[0].options());
  const std::vector<float> w(weights.begin(), weights.end());
  mix_logprobs(lp, w, out.numel(), out.data_ptr<float>());
  return out;
}

// tokens (R, K) int64, the newest group of every row at positions start..start+K-1 -> float32 log-probs
// (R, K, V+1) of the next K words; their keys/values are written to the caches (see Decode).
at::Tensor decode_step(const at::Tensor& tokens_in, int64_t start, const std::vector<at::Tensor>& caches,
                       const std::vector<at::Tensor>& memory, const c10::optional<at::Tensor>& memory_bias,
                       const std::vector<at::Tensor>& weights, int64_t num_heads, int64_t d_ff, double norm_eps) {
  TORCH_CHECK(tokens_in.dim() == 2 && tokens_in.scalar_type() == at::kLong && tokens_in.device().is_cpu(),
              "decode_step: tokens must be (R, K) int64 on the CPU");
  const at::Tensor tokens = tokens_in.contiguous();
  const Decode s =
      prepare(tokens.size(0), tokens.size(1), caches, memory, memory_bias, weights, num_heads, d_ff, norm_eps);
  check_positions(s, start);
  const int64_t* tp = tokens.data_ptr<int64_t>();
  for (int64_t m = 0, n = tokens.numel(); m < n; ++m) {
    TORCH_CHECK(tp[m] >= 0 && tp[m] < s.w.vocab, "decode_step: token ", tp[m], " is outside the vocabulary of ",
                s.w.vocab);
  }
  at::Tensor out = at::empty({s.rows, s.length, s.w.vocab}, tokens.options().dtype(at::kFloat));
  run_step(s, tp, start, out.data_ptr<float>());
  return out;
}

// Counts of words: (word, uses), in order of first use; a caption's few words, so a list.
using WordCounts = std::vector<std::pair<int64_t, int64_t>>;

void count_word(WordCounts& counts, int64_t word) {
  auto at = std::find_if(counts.begin(), counts.end(), [&](const auto& c) { return c.first == word; });
  if (at == counts.end()) counts.emplace_back(word, 1);
  else ++at->second;
}

// What satic.decoding.search.constrain does to the log-probs lp (V+1) of position pos of a row whose words so
// far are prefix[0..pos-1]: decoding_constraint (no_repeat) sets the previous word's to -inf, block_trigrams
// lowers each word w by kTrigramPenalty times the number of earlier trigrams (prefix[pos-2], prefix[pos-1], w),
// in float32 as torch adds the penalty. -> lp itself where neither applies, else `row`, the constrained copy.
constexpr float kTrigramPenalty = static_cast<float>(-0.693 * 2.0);  // log(1/2) * the reference's alpha of 2

const float* constrain_row(const float* lp, const int64_t* prefix, int64_t pos, bool no_repeat, bool trigrams,
                           int64_t vocab, std::vector<float>& row) {
  const bool repeat = no_repeat && pos > 0, blocked = trigrams && pos >= 3;
  if (!repeat && !blocked) return lp;
  std::copy(lp, lp + vocab, row.begin());
  if (repeat) row[prefix[pos - 1]] = -INFINITY;
  if (blocked) {
    WordCounts counts;  // (word, earlier trigrams it would repeat)
    for (int64_t j = 0; j + 2 < pos; ++j) {
      if (prefix[j] == prefix[pos - 2] && prefix[j + 1] == prefix[pos - 1]) count_word(counts, prefix[j + 2]);
    }
    for (const auto& [word, count] : counts) row[word] += static_cast<float>(count) * kTrigramPenalty;
  }
  return row.data();
}

// Copy cache slots < filled of row index[r] to row r, for every r of every layer (the rows read first).
void reorder_rows(const Decode& s, const std::vector<int64_t>& index, int64_t filled) {
  const int64_t block = s.capacity * s.dk;  // one head's slots
  std::vector<float> saved(static_cast<size_t>(s.rows) * s.heads * filled * s.dk);
  for (size_t l = 0; l < s.caches.size(); ++l) {
    for (int64_t half = 0; half < 2; ++half) {
      float* base = s.caches[l] + half * s.kv_strides[l];
      for (int64_t r = 0; r < s.rows; ++r) {
        for (int64_t h = 0; h < s.heads; ++h) {
          const float* from = base + index[r] * s.row_strides[l] + h * block;
          std::copy(from, from + filled * s.dk, saved.data() + (r * s.heads + h) * filled * s.dk);
        }
      }
      for (int64_t r = 0; r < s.rows; ++r) {
        for (int64_t h = 0; h < s.heads; ++h) {
          const float* from = saved.data() + (r * s.heads + h) * filled * s.dk;
          std::copy(from, from + filled * s.dk, base + r * s.row_strides[l] + h * block);
        }
      }
    }
  }
}

// What the beam searches' options ask of every position (see beam_search).
struct BeamOptions {
  int64_t width;  // beams per group, W
  int64_t length;  // max_length
  bool no_repeat, trigrams;  // decoding_constraint, block_trigrams
  float lambda;  // diversity_lambda
  int64_t length_penalty;
  double alpha;
};

// A beam search's running beams, `units` of W rows (a unit: one image's beams of one group), and the finished
// beams kept per unit, expanded one position at a time as satic.decoding.search.beam_search and
// staggered_beam_search do (select_beams, extend_beams, store_finished).
class Beams {
 public:
  static constexpr float kDoneScore = -1000.0f;  // a beam's running sum once it is stored as finished

  Beams(int64_t running_units, int64_t finished_units, int64_t vocab, const BeamOptions& o)
      : o_(o), vocab_(vocab), top_(std::min(o.width, vocab)) {
    const int64_t W = o.width, T = o.length, rows = running_units * W, kept = finished_units * W;
    sums.assign(rows, 0.0f), seq.assign(rows * T, 0), seq_lp.assign(rows * T, 0.0f), parents.assign(rows, 0);
    next_seq_.resize(rows * T), next_lp_.resize(rows * T);
    fin_seq.assign(kept * T, 0), fin_lp.assign(kept * T, 0.0f), fin_score.assign(kept, -INFINITY);
    cand_lp_.resize(W * top_), cand_word_lp_.resize(W * top_), cand_word_.resize(W * top_), order_.resize(W * top_);
    new_sum_.resize(W), chosen_.resize(W), parent_.resize(W), word_.resize(W), words_.resize(vocab);
    row_.resize(vocab), diverse_.resize(vocab), keys_.resize(2 * W), key_order_.resize(2 * W);
  }

  // Running unit u at position pos, which is position i of a step of k whose log-probs (rows (u * W + w) * k + i,
  // V+1 each) are in step_lp: each beam's top W words by its log-prob after constrain_row and, where `used` holds
  // the words of earlier groups, lowered by lambda per use; the best W (beam, word) pairs by summed score (ties
  // candidate-major, a stable sort), the chosen words keeping their constrained log-probs; the beams follow their
  // parents (prefixes, the step's later positions, start-of-step rows `parents`); beams that emit 0 or reach the
  // last position are stored in finished unit f (kept ones first, a stable sort by score) and run on from -1000.
  void expand(int64_t u, int64_t f, int64_t pos, int64_t i, int64_t k, float* step_lp, const WordCounts& used) {
    const int64_t W = o_.width, T = o_.length, vocab = vocab_, top = top_;
    const int64_t live_rows = pos == 0 ? 1 : W;  // at the first position every beam of a group is the same
    for (int64_t w = 0; w < live_rows; ++w) {
      const float* lp = constrain_row(step_lp + ((u * W + w) * k + i) * vocab, seq.data() + (u * W + w) * T, pos,
                                      o_.no_repeat, o_.trigrams, vocab, row_);
      const float* ranked = lp;  // diverse beam search: lowered by lambda per earlier use, as torch subtracts it
      if (!used.empty()) {
        std::copy(lp, lp + vocab, diverse_.begin());
        for (const auto& [v, count] : used) diverse_[v] = lp[v] - o_.lambda * static_cast<float>(count);
        ranked = diverse_.data();
      }
      for (int64_t v = 0; v < vocab; ++v) words_[v] = v;
      std::partial_sort(words_.begin(), words_.begin() + top, words_.end(), [&](int64_t x, int64_t y) {
        return ranked[x] > ranked[y] || (ranked[x] == ranked[y] && x < y);
      });
      for (int64_t c = 0; c < top; ++c) {  // candidate-major: c * rows + w
        cand_word_[c * live_rows + w] = words_[c];
        cand_lp_[c * live_rows + w] = sums[u * W + w] + ranked[words_[c]];
        cand_word_lp_[c * live_rows + w] = lp[words_[c]];  // the model's (constrained), not the penalised
      }
    }
    const int64_t candidates = top * live_rows;
    for (int64_t j = 0; j < candidates; ++j) order_[j] = j;
    std::stable_sort(order_.begin(), order_.begin() + candidates,
                     [&](int64_t x, int64_t y) { return cand_lp_[x] > cand_lp_[y]; });
    for (int64_t w = 0; w < W; ++w) {
      const int64_t j = order_[w];
      parent_[w] = j % live_rows, word_[w] = cand_word_[j], new_sum_[w] = cand_lp_[j], chosen_[w] = cand_word_lp_[j];
    }
    // the beams follow their parents: prefixes, log-probs, the step's later positions, start-of-step rows
    for (int64_t w = 0; w < W; ++w) {
      const int64_t from = (u * W + parent_[w]) * T, to = (u * W + w) * T;
      std::copy(seq.begin() + from, seq.begin() + from + T, next_seq_.begin() + to);
      std::copy(seq_lp.begin() + from, seq_lp.begin() + from + T, next_lp_.begin() + to);
      next_seq_[to + pos] = word_[w];
      next_lp_[to + pos] = chosen_[w];
    }
    std::copy(next_seq_.begin() + u * W * T, next_seq_.begin() + (u + 1) * W * T, seq.begin() + u * W * T);
    std::copy(next_lp_.begin() + u * W * T, next_lp_.begin() + (u + 1) * W * T, seq_lp.begin() + u * W * T);
    if (i + 1 < k) {
      const int64_t rest = (k - i - 1) * vocab;
      later_.resize(W * rest);
      for (int64_t w = 0; w < W; ++w) {
        const float* from = step_lp + ((u * W + parent_[w]) * k + i + 1) * vocab;
        std::copy(from, from + rest, later_.data() + w * rest);
      }
      for (int64_t w = 0; w < W; ++w) {
        float* to = step_lp + ((u * W + w) * k + i + 1) * vocab;
        std::copy(later_.data() + w * rest, later_.data() + (w + 1) * rest, to);
      }
    }
    {
      std::vector<int64_t> start(parents.begin() + u * W, parents.begin() + (u + 1) * W);
      for (int64_t w = 0; w < W; ++w) parents[u * W + w] = i == 0 ? parent_[w] : start[parent_[w]];
    }
    bool any_done = false;
    std::vector<uint8_t> done(W);
    for (int64_t w = 0; w < W; ++w) {
      done[w] = pos == T - 1 || word_[w] == 0;
      any_done = any_done || done[w];
    }
    if (any_done) store(u, f, pos, done);
    for (int64_t w = 0; w < W; ++w) sums[u * W + w] = done[w] ? kDoneScore : new_sum_[w];
  }

  // Without a length penalty (and a negative diversity_lambda) a finished score only falls: settled once every unit's
  // worst kept beam beats every running sum of the unit (and -1000), where running unit u keeps its finished beams in
  // finished unit u.
  bool settled(int64_t units) const {
    const int64_t W = o_.width;
    for (int64_t u = 0; u < units; ++u) {
      double ceiling = kDoneScore;
      for (int64_t w = 0; w < W; ++w) ceiling = std::max(ceiling, static_cast<double>(sums[u * W + w]));
      if (fin_score[u * W + W - 1] < ceiling) return false;
    }
    return true;
  }

  // [seq (B * n_best, T) int64, log-probs (B * n_best, T) float32, scores (B * n_best) float64]: each image's first
  // n_best kept beams, its `per_image` finished slots (its groups in order) read as one list.
  std::vector<at::Tensor> result(int64_t batch, int64_t per_image, int64_t n_best) const {
    const int64_t T = o_.length;
    const auto longs = at::TensorOptions().dtype(at::kLong);
    at::Tensor out_seq = at::empty({batch * n_best, T}, longs);
    at::Tensor out_lp = at::empty({batch * n_best, T}, longs.dtype(at::kFloat));
    at::Tensor out_score = at::empty({batch * n_best}, longs.dtype(at::kDouble));
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t w = 0; w < n_best; ++w) {
        const int64_t from = (b * per_image + w) * T, to = (b * n_best + w) * T;
        std::copy(fin_seq.begin() + from, fin_seq.begin() + from + T, out_seq.data_ptr<int64_t>() + to);
        std::copy(fin_lp.begin() + from, fin_lp.begin() + from + T, out_lp.data_ptr<float>() + to);
        out_score.data_ptr<double>()[b * n_best + w] = fin_score[b * per_image + w];
      }
    }
    return {out_seq, out_lp, out_score};
  }

  std::vector<float> sums, seq_lp, fin_lp;
  std::vector<int64_t> seq, parents, fin_seq;
  std::vector<double> fin_score;

 private:
  // score of a beam of len words whose log-probs sum to `sum`, after the length penalty (0 none, 1 'wu': (5 +
  // len)^alpha / 6^alpha, 2 'avg': len)
  double penalized(int64_t len, float sum) const {
    const double score = static_cast<double>(sum);
    if (o_.length_penalty == 1) return score / (std::pow(5.0 + len, o_.alpha) / std::pow(6.0, o_.alpha));
    if (o_.length_penalty == 2) return score / static_cast<double>(len);
    return score;
  }

  void store(int64_t u, int64_t f, int64_t pos, const std::vector<uint8_t>& done) {
    const int64_t W = o_.width, T = o_.length;
    double* kept = fin_score.data() + f * W;
    for (int64_t w = 0; w < W; ++w) {
      keys_[w] = kept[w];
      keys_[W + w] = done[w] ? std::max(penalized(pos + 1, new_sum_[w]), std::numeric_limits<double>::lowest())
                             : -INFINITY;
    }
    for (int64_t j = 0; j < 2 * W; ++j) key_order_[j] = j;
    std::stable_sort(key_order_.begin(), key_order_.end(), [&](int64_t x, int64_t y) { return keys_[x] > keys_[y]; });
    const int64_t slots = f * W * T, running = u * W * T;
    const std::vector<int64_t> kept_seq(fin_seq.begin() + slots, fin_seq.begin() + slots + W * T);
    const std::vector<float> kept_lp(fin_lp.begin() + slots, fin_lp.begin() + slots + W * T);
    for (int64_t w = 0; w < W; ++w) {
      const int64_t j = key_order_[w];  // < W: a kept beam; else beam j - W of this position
      const int64_t* from_seq = j < W ? kept_seq.data() + j * T : seq.data() + running + (j - W) * T;
      const float* from_lp = j < W ? kept_lp.data() + j * T : seq_lp.data() + running + (j - W) * T;
      std::copy(from_seq, from_seq + T, fin_seq.begin() + slots + w * T);
      std::copy(from_lp, from_lp + T, fin_lp.begin() + slots + w * T);
      kept[w] = keys_[j];
    }
  }

  BeamOptions o_;
  int64_t vocab_, top_;
  std::vector<int64_t> next_seq_, cand_word_, order_, parent_, word_, words_, key_order_;
  std::vector<float> next_lp_, cand_lp_, cand_word_lp_, new_sum_, chosen_, row_, diverse_, later_;
  std::vector<double> keys_;
};

// The first step of a beam search over a fresh cache: once per image (rows 0..B-1 of the caches, `first`), its
// log-probs (K of V+1 per row) copied to the image's `per_image` rows of step_lp and its keys/values to the
// image's rows of `all`'s caches, as Decoder._first_step_per_image.
void first_step(Members& first, Members& all, const int64_t* zeros, int64_t per_image, float* step_lp) {
  const Decode& s = all.models[0];
  const int64_t rows = s.rows, block = s.length * s.w.vocab;
  run_members(first, zeros, 0, step_lp);
  for (int64_t r = rows - 1; r >= 0; --r) {  // row r <- image r / per_image (backwards: sources are the first rows)
    std::copy(step_lp + (r / per_image) * block, step_lp + (r / per_image + 1) * block, step_lp + r * block);
  }
  std::vector<int64_t> index(rows);
  for (int64_t r = 0; r < rows; ++r) index[r] = r / per_image;
  for (const Decode& m : all.models) reorder_rows(m, index, s.length);
}

// How sample_loop picks one position's words when it draws them (satic.decoding.search.choose with
// sample_method 'sample', then draw): log-probs / temperature, all but the top_k highest set to -inf, then
// the nucleus (top_p), then a draw from exp(score - the row's max) by inverting its cumulative sum at one
// uniform number per row. Every step that can round differently elsewhere runs the very torch operator the
// Python loop runs, on a tensor of the same shape (the exp, the sort and softmax of top_p) or repeats its
// arithmetic (the division, the cumulative sum in double as torch's CPU cumsum), and the uniform numbers are
// torch.rand's from the same generator in the same order, so both loops draw the same words.
struct Drawing {
  float temperature = 1.0f;
  int64_t top_k = 0;    // 0: off
  double top_p = 1.0;   // 1: off
  c10::optional<at::Generator> generator;
};

// scores (R, V): one position's constrained log-probs of every row, overwritten -> the word drawn for each row.
void draw_words(float* scores, int64_t rows, int64_t vocab, const Drawing& d, int64_t* words) {
  const auto floats = at::TensorOptions().dtype(at::kFloat);
  if (d.temperature != 1.0f) {
    for (int64_t m = 0; m < rows * vocab; ++m) scores[m] /= d.temperature;
  }
  if (d.top_k > 0) {  // below the k-th highest score (ties counted, as topk's k-th value): -inf
    std::vector<float> row(vocab);
    const int64_t kth = std::min(d.top_k, vocab) - 1;
    for (int64_t r = 0; r < rows; ++r) {
      float* x = scores + r * vocab;
      std::copy(x, x + vocab, row.begin());
      std::nth_element(row.begin(), row.begin() + kth, row.end(), std::greater<float>());
      for (int64_t v = 0; v < vocab; ++v) {
        if (x[v] < row[kth]) x[v] = -INFINITY;
      }
    }
  }
  at::Tensor all = at::from_blob(scores, {rows, vocab}, floats);
  if (d.top_p < 1.0) {  // the words after the nucleus (the first is always kept): -inf
    auto [sorted, order] = all.sort(-1, /*descending=*/true);
    const at::Tensor probs = at::softmax(sorted, -1);
    all.scatter_(1, order, sorted.masked_fill(probs.cumsum(-1).sub(probs).ge(d.top_p), -INFINITY));
  }
  std::vector<float> shifted(rows * vocab);  // score - the row's max: no underflow at a low temperature
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = scores + r * vocab;
    const float top = *std::max_element(x, x + vocab);
    for (int64_t v = 0; v < vocab; ++v) shifted[r * vocab + v] = x[v] - top;
  }
  const at::Tensor weights = at::exp(at::from_blob(shifted.data(), {rows, vocab}, floats));
  const at::Tensor uniform = at::rand({rows, 1}, d.generator, floats);
  const float* w = weights.data_ptr<float>();
  const float* u = uniform.data_ptr<float>();
  std::vector<float> cumulative(vocab);
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0.0;
    for (int64_t v = 0; v < vocab; ++v) cumulative[v] = static_cast<float>(sum += w[r * vocab + v]);
    const float total = cumulative[vocab - 1];
    const float at = std::min(u[r] * total, std::nextafter(total, 0.0f));  // in [0, total)
    const int64_t word = std::upper_bound(cumulative.begin(), cumulative.end(), at) - cumulative.begin();
    // the first whose cumulative sum exceeds at: it adds weight; a row without weight (every word -inf): word 0, its
    // argmax, as satic.decoding.search.draw
    words[r] = total > 0 ? std::min(word, vocab - 1) : 0;
  }
}

// The whole loop of satic.decoding.search.sample over a fresh cache, greedy or drawing (Drawing), decoding
// constraints included: steps at t = 0, K, 2K, ... while t + K <= max_length, the first fed K zeros (once per
// image, as Decoder._first_step_per_image, where an image has several rows). Position by position, each row's
// word is the argmax (the first on a tie, as torch.max) of its log-probs after constrain_row, or drawn from
// them (draw_words, every row at once), constrain_row reading the words drawn earlier in the step and the
// output before it, as sample_loop's seq; the words' own log-probs are kept. A row is finished once a word of its
// group is 0, and its later groups are output and fed as 0; the loop stops once every row is finished. ->
// [output (R, T), the words drawn (R, T), their log-probs (R, T) float32, live (R, T) bool (the position's group
// came before the row finished, or is its finishing group), the steps run S (a 0-dim int64)], T = max_length,
// every position after the S steps 0 (False): the tensors sample() assembles from its per-step lists. Several
// models (see prepare_members) decode as an ensemble, each step's log-probs their mixture.
std::vector<at::Tensor> sample(int64_t rows, int64_t group_size, int64_t max_length,
                               const std::vector<at::Tensor>& caches, const std::vector<at::Tensor>& memory,
                               const c10::List<c10::optional<at::Tensor>>& memory_bias,
                               const std::vector<at::Tensor>& weights, const std::vector<int64_t>& sizes,
                               const std::vector<double>& scalars, bool decoding_constraint, bool block_trigrams,
                               bool draw, double temperature, int64_t top_k, double top_p,
                               c10::optional<at::Generator> generator) {
  Members members = prepare_members(rows, group_size, caches, memory, memory_bias, weights, sizes, scalars);
  const int64_t k = group_size, most = max_length / k, vocab = members.models[0].w.vocab;
  const int64_t per_image = members.models[0].per_image;
  TORCH_CHECK(most >= 1, "sample: max_length ", max_length, " is shorter than one group of ", k);
  TORCH_CHECK(!draw || (temperature > 0 && top_k >= 0 && top_p > 0 && top_p <= 1),
              "sample: temperature and top_p must be positive (top_p at most 1), top_k at least 0");
  for (const Decode& s : members.models) check_positions(s, (most - 1) * k);
  const Drawing drawing{static_cast<float>(temperature), top_k, top_p, std::move(generator)};
  const auto longs = at::TensorOptions().dtype(at::kLong);
  at::Tensor output = at::zeros({rows, max_length}, longs), drawn = at::zeros({rows, max_length}, longs);
  at::Tensor chosen = at::zeros({rows, max_length}, longs.dtype(at::kFloat));
  at::Tensor live = at::zeros({rows, max_length}, longs.dtype(at::kBool));
  int64_t* op = output.data_ptr<int64_t>();
  int64_t* dp = drawn.data_ptr<int64_t>();
  float* cp = chosen.data_ptr<float>();
  bool* lp_live = live.data_ptr<bool>();
  std::vector<int64_t> tokens(rows * k, 0), words(rows);
  std::vector<float> logprobs(rows * k * vocab), scores(draw ? rows * vocab : 0), row(vocab);
  std::vector<uint8_t> unfinished(rows, 1);
  std::vector<int64_t> prefix(rows * max_length, 0);  // sample_loop's seq
  int64_t steps = 0;
  while (steps < most) {
    if (steps == 0 && per_image > 1) {
      Members first = prepare_members(rows / per_image, k, caches, memory, memory_bias, weights, sizes, scalars);
      first_step(first, members, tokens.data(), per_image, logprobs.data());
    } else {
      run_members(members, tokens.data(), steps * k, logprobs.data());
    }
    for (int64_t i = 0; i < k; ++i) {
      const int64_t pos = steps * k + i;
      for (int64_t r = 0; r < rows; ++r) {
        const float* lp = logprobs.data() + (r * k + i) * vocab;
        const float* x = constrain_row(lp, prefix.data() + r * max_length, pos, decoding_constraint, block_trigrams,
                                       vocab, row);
        if (draw) {
          std::copy(x, x + vocab, scores.begin() + r * vocab);
          continue;
        }
        int64_t best = 0;
        for (int64_t v = 1; v < vocab; ++v) {
          if (x[v] > x[best] || (std::isnan(x[v]) && !std::isnan(x[best]))) best = v;
        }
        words[r] = best;
      }
      if (draw) draw_words(scores.data(), rows, vocab, drawing, words.data());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t at = r * max_length + pos;
        prefix[at] = dp[at] = words[r];
        cp[at] = logprobs[(r * k + i) * vocab + words[r]];
        op[at] = tokens[r * k + i] = unfinished[r] ? words[r] : 0;
        lp_live[at] = unfinished[r] != 0;
      }
    }
    bool any = false;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t* group = dp + r * max_length + steps * k;
      std::copy(op + r * max_length + steps * k, op + r * max_length + (steps + 1) * k,
                prefix.begin() + r * max_length + steps * k);
      unfinished[r] = unfinished[r] && std::all_of(group, group + k, [](int64_t w) { return w != 0; });
      any = any || unfinished[r];
    }
    ++steps;
    if (!any) break;
  }
  return {output, drawn, chosen, live, at::scalar_tensor(steps, longs)};
}

// The reference's beam search as satic.decoding.search.beam_search runs it, for `batch` images of `width` beams in
// `groups` groups of W (rows image-major, then group-major, in the caches), over a fresh cache: the first step once
// per image (first_step), then each step's K positions one at a time, each group of each image in turn (Beams::
// expand), groups after the first penalised by the words the image's earlier groups chose at that position. The
// loop ends after the last position, or without a length penalty once no running beam can enter the finished ones.
// suppress_unk lowers the last word (UNK's place) by 1000 at every step. length_penalty: 0 none, 1 'wu_alpha', 2
// 'avg'. Several models decode as an ensemble (see greedy). -> Beams::result.
std::vector<at::Tensor> beam_search(int64_t batch, int64_t width, int64_t group_size, int64_t max_length,
                                    const std::vector<at::Tensor>& caches, const std::vector<at::Tensor>& memory,
                                    const c10::List<c10::optional<at::Tensor>>& memory_bias,
                                    const std::vector<at::Tensor>& weights, const std::vector<int64_t>& sizes,
                                    const std::vector<double>& scalars, bool suppress_unk, int64_t length_penalty,
                                    double alpha, int64_t n_best, bool decoding_constraint, bool block_trigrams,
                                    int64_t groups, double diversity_lambda, bool staggered) {
  constexpr float kUnkPenalty = 1000.0f;
  TORCH_CHECK(batch > 0 && width > 0 && n_best >= 1 && n_best <= width && length_penalty >= 0 && length_penalty <= 2,
              "beam_search: bad batch, width, n_best or length_penalty");
  TORCH_CHECK(groups >= 1 && width % groups == 0, "beam_search: ", width, " beams do not split into ", groups,
              " groups");
  TORCH_CHECK(!staggered || group_size == 1, "beam_search: staggered groups need K = 1");
  const int64_t k = group_size, length = max_length, W = width / groups;
  const int64_t per_image = staggered ? W : width, rows = batch * per_image;  // the cache's rows
  Members first = prepare_members(batch, k, caches, memory, memory_bias, weights, sizes, scalars);
  Members all = prepare_members(rows, k, caches, memory, memory_bias, weights, sizes, scalars);
  const int64_t vocab = all.models[0].w.vocab;
  TORCH_CHECK(W <= vocab, "beam_search: ", W, " beams per group exceed the ", vocab, " outputs");
  TORCH_CHECK(length >= 1, "beam_search: max_length must be positive");
  for (const Decode& s : all.models) check_positions(s, ((length + k - 1) / k - 1) * k);
  const BeamOptions options{W, length, decoding_constraint, block_trigrams, static_cast<float>(diversity_lambda),
                            length_penalty, alpha};
  std::vector<float> step_lp(rows * k * vocab);  // a step's log-probs, the later positions reordered as beams go
  std::vector<int64_t> tokens(rows * k, 0);
  const auto unk = [&] {
    if (!suppress_unk) return;
    for (int64_t m = 0; m < rows * k; ++m) step_lp[m * vocab + vocab - 1] -= kUnkPenalty;
  };
  const auto next_step = [&](const Beams& beams, int64_t t) {  // the caches follow the beams, fed their newest words
    std::vector<int64_t> index(rows);
    for (int64_t r = 0; r < rows; ++r) index[r] = (r / W) * W + beams.parents[r];
    for (const Decode& s : all.models) reorder_rows(s, index, t + k);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < k; ++i) tokens[r * k + i] = beams.seq[r * length + t + i];
    }
    run_members(all, tokens.data(), t + k, step_lp.data());
  };
  if (!staggered) {  // every group of every image advances together: unit u = b * groups + g
    Beams beams(batch * groups, batch * groups, vocab, options);
    first_step(first, all, tokens.data(), width, step_lp.data());
    WordCounts used;
    for (int64_t t = 0;; t += k) {
      unk();
      for (int64_t i = 0; i < std::min(k, length - t); ++i) {
        for (int64_t u = 0; u < batch * groups; ++u) {
          used.clear();
          for (int64_t r = (u - u % groups) * W; r < u * W; ++r) count_word(used, beams.seq[r * length + t + i]);
          beams.expand(u, u, t + i, i, k, step_lp.data(), used);
        }
      }
      // settled only where no running sum can rise: no length penalty, and no bonus for an earlier group's words
      if (t + k >= length || (length_penalty == 0 && (groups == 1 || diversity_lambda >= 0) &&
                              beams.settled(batch * groups))) {
        return beams.result(batch, width, n_best);
      }
      next_step(beams, t);
    }
  }
  // The reference's diverse beam search for K = 1 (satic.decoding.search.staggered_beam_search): group g runs g
  // positions behind group 0, so at position p it is penalised by the words an earlier group e held at p after
  // p + g - e positions (at most the last). The groups run one after another over the cache's W rows per image, a
  // fresh decode each, every one all max_length positions; each group's beams after every position are kept.
  Beams beams(batch, batch * groups, vocab, options);
  std::vector<int64_t> history(groups * length * rows * length);  // [group][after position][row][position]
  WordCounts used;
  for (int64_t g = 0; g < groups; ++g) {
    std::fill(beams.sums.begin(), beams.sums.end(), 0.0f);
    std::fill(beams.seq.begin(), beams.seq.end(), 0);
    std::fill(beams.seq_lp.begin(), beams.seq_lp.end(), 0.0f);
    std::fill(tokens.begin(), tokens.end(), 0);
    first_step(first, all, tokens.data(), W, step_lp.data());
    for (int64_t pos = 0; pos < length; ++pos) {
      unk();
      for (int64_t b = 0; b < batch; ++b) {
        used.clear();
        for (int64_t e = 0; e < g; ++e) {
          const int64_t* held = history.data() + ((e * length + std::min(pos + g - e, length - 1)) * rows) * length;
          for (int64_t r = b * W; r < (b + 1) * W; ++r) count_word(used, held[r * length + pos]);
        }
        beams.expand(b, b * groups + g, pos, 0, 1, step_lp.data(), used);
      }
      std::copy(beams.seq.begin(), beams.seq.end(), history.begin() + (g * length + pos) * rows * length);
      if (pos + 1 < length) next_step(beams, pos);
    }
  }
  return beams.result(batch, width, n_best);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(satic_small_gemm, m) {
  m.def("decode_step(Tensor tokens, int start, Tensor[] caches, Tensor[] memory, Tensor? memory_bias, "
        "Tensor[] weights, int num_heads, int d_ff, float eps) -> Tensor");
  m.def("sample(int rows, int group_size, int max_length, Tensor[] caches, Tensor[] memory, Tensor?[] memory_bias, "
        "Tensor[] weights, int[] sizes, float[] scalars, bool decoding_constraint, bool block_trigrams, bool draw, "
        "float temperature, int top_k, float top_p, Generator? generator) -> Tensor[]");
  m.def("beam_search(int batch, int width, int group_size, int max_length, Tensor[] caches, Tensor[] memory, "
        "Tensor?[] memory_bias, Tensor[] weights, int[] sizes, float[] scalars, bool suppress_unk, "
        "int length_penalty, float alpha, int n_best, bool decoding_constraint, bool block_trigrams, int groups, "
        "float diversity_lambda, bool staggered) -> Tensor[]");
  m.def("mix_logprobs(Tensor[] logprobs, float[] weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(satic_small_gemm, CPU, m) { m.impl("decode_step", &decode_step); }

// The loops and the mixture take no tensor they dispatch on (their tensors are in lists): catch-all kernels.
TORCH_LIBRARY_IMPL(satic_small_gemm, CatchAll, m) {
  m.impl("sample", &sample);
  m.impl("beam_search", &beam_search);
  m.impl("mix_logprobs", &mix_step);
}
