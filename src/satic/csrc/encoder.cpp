// The native prefill, and the attention of inference on the CPU.
//
// The whole prefill of a decode in one call: the SAT encoder over each image's valid regions, the final
// norm, and every decoder layer's cross-attention keys/values, padded to a bucket of regions. At batch 1
// the eager prefill is ~45 torch operators on a few dozen rows, so per-operator overhead, not arithmetic,
// is most of its cost; here every row-wise layer runs the packed small-row kernel directly.
//
// The numbers are the model's encode() + memory_kv() in eval mode (no dropout), up to float rounding:
// each image is encoded on its valid regions only, as the packed eager path does (padding is hidden
// from attention as keys, so it never changes a valid region), and the padded regions' keys/values are 0.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "small_gemm.h"

namespace {

constexpr float kNegInf = -1e9f;  // the model's mask value (NEG_INF)

using satic::Linear;
using satic::linear_at;
using satic::Norm;
using satic::norm_at;

struct EncoderLayer {
  Norm norm1, norm2;
  Linear qkv, out, w1, w2;
};

// The weights in the order satic.decoding.engine.native_encoder_weights lists them; linear layers fp32 or int8.
struct Weights {
  Linear embed;
  std::vector<EncoderLayer> layers;
  Norm final_norm;
  std::vector<Linear> memory_kv;
  int64_t d_model, num_heads, d_ff;
  float eps;
};

Weights read_weights(const std::vector<at::Tensor>& t, int64_t feat_size, int64_t layers, int64_t d, int64_t heads,
                     int64_t d_ff, double eps) {
  constexpr const char* kOp = "encode";
  const int64_t expected = 5 + 19 * layers;  // per layer: 2 norms and 4 linears, and the decoder's keys/values
  TORCH_CHECK(static_cast<int64_t>(t.size()) == expected, "encode: expected ", expected, " weight tensors for ",
              layers, " layers, got ", t.size());
  TORCH_CHECK(heads > 0 && d % heads == 0, "encode: d_model ", d, " is not a multiple of ", heads, " heads");
  Weights w;
  w.d_model = d, w.num_heads = heads, w.d_ff = d_ff, w.eps = static_cast<float>(eps);
  w.embed = linear_at(t, 0, feat_size, d, kOp);
  size_t i = 3;
  for (int64_t l = 0; l < layers; ++l, i += 16) {
    w.layers.push_back({norm_at(t, i, d, kOp), norm_at(t, i + 8, d, kOp), linear_at(t, i + 2, d, 3 * d, kOp),
                        linear_at(t, i + 5, d, d, kOp), linear_at(t, i + 10, d, d_ff, kOp),
                        linear_at(t, i + 13, d_ff, d, kOp)});
  }
  w.final_norm = norm_at(t, i, d, kOp);
  for (i += 2; i < t.size(); i += 3) w.memory_kv.push_back(linear_at(t, i, d, 2 * d, kOp));
  return w;
}

}  // namespace

namespace satic {

float dot(const float* a, const float* b, int64_t n) {
  simd::f32x8 acc = simd::zero();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) acc = simd::fma(simd::load(a + c), simd::load(b + c), acc);
  float total = horizontal_sum(acc);
  for (; c < n; ++c) total += a[c] * b[c];
  return total;
}

void attend_query(const float* q, const float* keys, int64_t key_stride, const float* values, int64_t value_stride,
                  const float* bias, int64_t lk, int64_t dk, float* scores, float* out) {
  const float scale = static_cast<float>(std::sqrt(static_cast<double>(dk)));
  float top = -INFINITY;
  for (int64_t j = 0; j < lk; ++j) {
    float s = dot(q, keys + j * key_stride, dk) / scale;
    if (bias != nullptr) s += bias[j];
    scores[j] = s;
    top = std::max(top, s);
  }
  float total = 0.0f;
  for (int64_t j = 0; j < lk; ++j) total += (scores[j] = std::exp(scores[j] - top));
  const float inverse = 1.0f / total;
  std::fill(out, out + dk, 0.0f);
  for (int64_t j = 0; j < lk; ++j) {
    const float w = scores[j] * inverse;
    if (w == 0.0f) continue;  // a hidden slot (bias -1e9): exp underflowed to exactly 0
    const float* vj = values + j * value_stride;
    for (int64_t c = 0; c < dk; ++c) out[c] += w * vj[c];
  }
}

}  // namespace satic

namespace {

// Self-attention within each image: qkv (R, 3d) as [q | k | v] for the images' regions in turn (image b's
// at rows starts[b]..starts[b+1]), head h in columns h*dk..; out (R, d), heads merged. scores = q.k /
// sqrt(dk), softmax over the image's regions, then the weighted sum of values (the model's order). The
// (image, head) pairs are split over the threads.
void attend(const float* qkv, const std::vector<int64_t>& starts, int64_t d, int64_t heads, float* out) {
  const int64_t dk = d / heads, stride = 3 * d, images = static_cast<int64_t>(starts.size()) - 1;
  int64_t longest = 0;
  for (int64_t b = 0; b < images; ++b) longest = std::max(longest, starts[b + 1] - starts[b]);
  at::parallel_for(0, images * heads, satic::grain_for(2 * longest * longest * dk), [&](int64_t begin, int64_t end) {
    std::vector<float> scores(longest);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads, first = starts[b], n = starts[b + 1] - first;
      const float* image = qkv + first * stride;
      for (int64_t i = 0; i < n; ++i) {
        satic::attend_query(image + i * stride + h * dk, image + d + h * dk, stride, image + 2 * d + h * dk, stride,
                            nullptr, n, dk, scores.data(), out + (first + i) * d + h * dk);
      }
    }
  });
}

// Every image at once, layer by layer: feats (R, D) holds the valid regions of the images in turn (image b's
// at rows starts[b]..starts[b+1]), and each linear layer runs over all R rows in one pass over its weights,
// its panels split over the threads (one pass per image would stream every weight once per image).
// Attention stays within each image. Each row's numbers are those of the image encoded alone. The keys and
// values of region i of image b go to row slots[b][i] of that image's (H, N', dk) block in k_out[l], v_out[l].
void encode_rows(const Weights& w, const float* feats, const std::vector<int64_t>& starts,
                 const std::vector<std::vector<int64_t>>& slots, const std::vector<float*>& k_out,
                 const std::vector<float*>& v_out, int64_t padded) {
  const int64_t d = w.d_model, heads = w.num_heads, dk = d / heads, rows = starts.back();
  std::vector<float> x(rows * d), h(rows * d), wide(rows * std::max(3 * d, w.d_ff)), att(rows * d);
  w.embed(rows, feats, x.data());
  satic::relu(x.data(), rows * d);
  for (const EncoderLayer& layer : w.layers) {
    satic::reference_norm_rows(x.data(), rows, d, layer.norm1.w, layer.norm1.b, w.eps, h.data());
    layer.qkv(rows, h.data(), wide.data());
    attend(wide.data(), starts, d, heads, att.data());
    layer.out(rows, att.data(), h.data());
    satic::add_into(x.data(), h.data(), rows * d);
    satic::feed_forward(rows, d, w.d_ff, layer.norm2, layer.w1, layer.w2, w.eps, x.data(), h.data(), wide.data());
  }
  satic::reference_norm_rows(x.data(), rows, d, w.final_norm.w, w.final_norm.b, w.eps, h.data());  // memory
  const int64_t block = heads * padded * dk;  // one image's keys (or values) of one layer
  for (size_t l = 0; l < w.memory_kv.size(); ++l) {
    w.memory_kv[l](rows, h.data(), wide.data());  // (R, 2d): keys | values
    for (size_t b = 0; b + 1 < starts.size(); ++b) {
      for (int64_t i = 0; i < starts[b + 1] - starts[b]; ++i) {
        const float* row = wide.data() + (starts[b] + i) * 2 * d;
        for (int64_t hh = 0; hh < heads; ++hh) {
          const int64_t at = b * block + (hh * padded + slots[b][i]) * dk;
          std::copy(row + hh * dk, row + (hh + 1) * dk, k_out[l] + at);
          std::copy(row + d + hh * dk, row + d + (hh + 1) * dk, v_out[l] + at);
        }
      }
    }
  }
}

// feats (B, N, D) float32, mask (B, N) bool or None -> [k_0, v_0, ..., k_{L-1}, v_{L-1}, bias]: keys and
// values (B, H, N', dk) and the bias (B, 1, 1, N') (0 for a real region, -1e9 else), where N' is the
// regions up to the last real one of any image, rounded up to a multiple of `bucket`. An empty list when
// the input is bad (a NaN or infinite feature, or an image without a real region): the caller says why.
std::vector<at::Tensor> encode(const at::Tensor& feats_in, const c10::optional<at::Tensor>& mask_in,
                               const std::vector<at::Tensor>& weights, int64_t num_layers, int64_t d_model,
                               int64_t num_heads, int64_t d_ff, double eps, int64_t bucket) {
  TORCH_CHECK(feats_in.dim() == 3 && feats_in.scalar_type() == at::kFloat && feats_in.device().is_cpu(),
              "encode: features must be (B, N, D) float32 on the CPU");
  TORCH_CHECK(bucket >= 1, "encode: bucket must be positive");
  const at::Tensor feats = feats_in.contiguous();
  const int64_t batch = feats.size(0), regions = feats.size(1), feat_size = feats.size(2);
  const Weights w = read_weights(weights, feat_size, num_layers, d_model, num_heads, d_ff, eps);
  const float* fp = feats.data_ptr<float>();
  for (int64_t i = 0, total = feats.numel(); i < total; ++i) {
    if (!std::isfinite(fp[i])) return {};
  }
  std::vector<std::vector<int64_t>> valid(batch);
  if (mask_in.has_value()) {
    const at::Tensor mask = mask_in->to(at::kBool).contiguous();
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == batch && mask.size(1) == regions, "encode: mask must be (B, N)");
    const bool* mp = mask.data_ptr<bool>();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t j = 0; j < regions; ++j) {
        if (mp[b * regions + j]) valid[b].push_back(j);
      }
      if (valid[b].empty()) return {};
    }
  } else {
    for (int64_t b = 0; b < batch; ++b) {
      valid[b].resize(regions);
      for (int64_t j = 0; j < regions; ++j) valid[b][j] = j;
    }
  }
  int64_t used = 0;  // regions up to the last real one of any image (the model's crop of trailing padding)
  for (const auto& v : valid) used = std::max(used, v.empty() ? 0 : v.back() + 1);
  const int64_t padded = (used + bucket - 1) / bucket * bucket, dk = d_model / num_heads;
  const auto options = feats.options();
  std::vector<at::Tensor> out;
  for (size_t l = 0; l < w.memory_kv.size(); ++l) {
    out.push_back(at::zeros({batch, num_heads, padded, dk}, options));
    out.push_back(at::zeros({batch, num_heads, padded, dk}, options));
  }
  at::Tensor bias = at::full({batch, 1, 1, padded}, kNegInf, options);
  float* bp = bias.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j : valid[b]) bp[b * padded + j] = 0.0f;
  }
  std::vector<int64_t> starts{0};  // the images' valid regions, gathered one after another
  for (const auto& v : valid) starts.push_back(starts.back() + static_cast<int64_t>(v.size()));
  std::vector<float> gathered(starts.back() * feat_size);
  for (int64_t b = 0; b < batch; ++b) {
    const float* image = fp + b * regions * feat_size;
    for (size_t i = 0; i < valid[b].size(); ++i) {
      std::copy(image + valid[b][i] * feat_size, image + (valid[b][i] + 1) * feat_size,
                gathered.data() + (starts[b] + static_cast<int64_t>(i)) * feat_size);
    }
  }
  std::vector<float*> k_out, v_out;
  for (size_t l = 0; l < w.memory_kv.size(); ++l) {
    k_out.push_back(out[2 * l].data_ptr<float>());
    v_out.push_back(out[2 * l + 1].data_ptr<float>());
  }
  encode_rows(w, gathered.data(), starts, valid, k_out, v_out, padded);
  out.push_back(bias);
  return out;
}

// Inference attention in one call: softmax(q . k / sqrt(dk) + bias) . v for q (B, H, Lq, dk), k and v
// (B, H, Lk, dk), bias (1 or B, 1, 1, Lk) or None -> (B, H, Lq, dk). A decoding step's four attentions
// are then four calls instead of twenty torch operators; the order of operations is the model's. Each
// input may have any strides with a contiguous last dimension (q is a view into the fused QKV projection,
// its heads transposed), so nothing is copied; the output is laid out as (B, Lq, H, dk) and returned as
// its (B, H, Lq, dk) view, so that merging the heads back is a view too. With K words per step this
// saves two copies per attention, eight per step.
at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                     const c10::optional<at::Tensor>& bias_in) {
  for (const at::Tensor* t : {&q_in, &k_in, &v_in}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "attention: q, k, v must be (B, H, L, dk) float32 on the CPU");
  }
  const auto unit_last = [](const at::Tensor& t) { return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const int64_t batch = q.size(0), heads = q.size(1), lq = q.size(2), dk = q.size(3), lk = k.size(2);
  TORCH_CHECK(k.size(0) == batch && k.size(1) == heads && k.size(3) == dk && v.sizes() == k.sizes(),
              "attention: k and v must be (", batch, ", ", heads, ", Lk, ", dk, ")");
  const float* bp = nullptr;
  int64_t bias_rows = 0;
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 4 && bias.size(1) == 1 && bias.size(2) == 1 &&
                    bias.size(3) == lk && (bias.size(0) == 1 || bias.size(0) == batch),
                "attention: bias must be (1 or B, 1, 1, Lk) float32");
    bp = bias.data_ptr<float>();
    bias_rows = bias.size(0);
  }
  at::Tensor out = at::empty({batch, lq, heads, dk}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * heads, satic::grain_for(2 * lq * lk * dk), [&](int64_t begin, int64_t end) {
    std::vector<float> scores(lk);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t n = bh / heads, h = bh % heads;
      const float* keys = kp + n * k.stride(0) + h * k.stride(1);
      const float* values = vp + n * v.stride(0) + h * v.stride(1);
      const float* b = bp == nullptr ? nullptr : bp + (bias_rows == 1 ? 0 : n) * lk;
      for (int64_t i = 0; i < lq; ++i) {
        const float* qi = qp + n * q.stride(0) + h * q.stride(1) + i * q.stride(2);
        satic::attend_query(qi, keys, k.stride(2), values, v.stride(2), b, lk, dk, scores.data(),
                            op + ((n * lq + i) * heads + h) * dk);
      }
    }
  });
  return out.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(satic_small_gemm, m) {
  m.def("encode(Tensor feats, Tensor? mask, Tensor[] weights, int num_layers, int d_model, int num_heads, int d_ff, "
        "float eps, int bucket) -> Tensor[]");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(satic_small_gemm, CPU, m) {
  m.impl("encode", &encode);
  m.impl("attention", &attention);
}
