// The pieces that encoder.cpp and decoder.cpp build on (defined in small_gemm.cpp and encoder.cpp, or here).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace satic {

constexpr int64_t kPanel = 16;  // output columns per packed panel (two 8-lane vectors)

// The grain of a parallel loop whose items cost `work` multiply-adds (or float operations) each: a thread is
// worth waking only for about kMinWork of them (tens of microseconds). Less work stays on the calling
// thread, so a small model's loops do not pay the threads' wake-up, nor leave them spinning beside the
// server's other threads.
constexpr int64_t kMinWork = int64_t{1} << 20;
inline int64_t grain_for(int64_t work) { return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work)); }

// y (m, out_features), row stride out_features = x (m, k) . w + b, where w is packed (panels, k, 16) as
// satic.decoding.small_gemm.pack_weight packs it and b is zero-padded to panels * 16.
void packed_linear(int64_t m, const float* x, int64_t k, const float* w, int64_t panels, const float* b, float* y,
                   int64_t out_features);

// The same with int8 weights packed in k-pairs (panels, pairs, 32), one scale per output column: each row
// of x rounded to int16 in [-levels, levels] with its own scale, the products summed exactly in int32.
void packed_linear_int8(int64_t m, const float* x, int64_t k, const int8_t* w, int64_t pairs, int64_t panels,
                        const float* scale, const float* bias, float* y, int64_t out_features, int64_t levels);

// The reference's norm of each of `rows` rows of n: weight * (x - mean) / (unbiased std + eps) + bias.
void reference_norm_rows(const float* x, int64_t rows, int64_t n, const float* weight, const float* bias, float eps,
                         float* y);

// A packed linear layer's tensors: y (rows, out) = x (rows, in) . w + b, w packed in `panels` panels of 16;
// or, where q is set, int8 weights q in k-pairs with their scales (packed_linear_int8).
struct Linear {
  const float* w;
  const float* b;
  int64_t in, out, panels;
  const int8_t* q = nullptr;
  const float* scale = nullptr;
  int64_t pairs = 0, levels = 0;

  void operator()(int64_t rows, const float* x, float* y) const {
    if (q != nullptr) {
      packed_linear_int8(rows, x, in, q, pairs, panels, scale, b, y, out, levels);
    } else {
      packed_linear(rows, x, in, w, panels, b, y, out);
    }
  }
};

// A norm's weight and bias (reference_norm_rows).
struct Norm {
  const float* w;
  const float* b;
};

// The native ops' readers of their weight lists (satic.decoding.engine.native_tensors lays them out); `op` names
// the op in their errors. A linear layer is t[i..i+2]: the packed weight (float32, or int8 in k-pairs), its
// scales (int8; empty for float32) and its bias, with `in` inputs and `out` outputs. A norm is t[i..i+1].
const at::Tensor& float_tensor(const std::vector<at::Tensor>& t, size_t i, const char* op);
Linear linear_at(const std::vector<at::Tensor>& t, size_t i, int64_t in, int64_t out, const char* op);
Norm norm_at(const std::vector<at::Tensor>& t, size_t i, int64_t d, const char* op);

// x += y and x = max(x, 0), elementwise over `count` floats.
inline void add_into(float* x, const float* y, int64_t count) {
  for (int64_t c = 0; c < count; ++c) x[c] += y[c];
}

inline void relu(float* x, int64_t count) {
  for (int64_t c = 0; c < count; ++c) x[c] = std::max(x[c], 0.0f);
}

// The feed-forward sublayer of an encoder or decoder layer over `rows` rows of d: x += w2(relu(w1(norm(x)))).
// h (rows, d) and wide (rows, d_ff) are scratch.
inline void feed_forward(int64_t rows, int64_t d, int64_t d_ff, const Norm& norm, const Linear& w1, const Linear& w2,
                         float eps, float* x, float* h, float* wide) {
  reference_norm_rows(x, rows, d, norm.w, norm.b, eps, h);
  w1(rows, h, wide);
  relu(wide, rows * d_ff);
  w2(rows, wide, h);
  add_into(x, h, rows * d);
}

// The sum of v's 8 lanes, added pairwise.
inline float horizontal_sum(simd::f32x8 v) {
  float lanes[8];
  simd::store(lanes, v);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// a . b over n floats (8 lanes summed pairwise, then the tail).
float dot(const float* a, const float* b, int64_t n);

// One query of inference attention, in the model's order of operations: scores[j] = q . key_j / sqrt(dk)
// (+ bias[j]), their softmax over the lk keys, out (dk) = the weighted sum of the values. Keys and values
// are rows `key_stride` / `value_stride` floats apart; scores is scratch for lk floats; bias may be null.
void attend_query(const float* q, const float* keys, int64_t key_stride, const float* values, int64_t value_stride,
                  const float* bias, int64_t lk, int64_t dk, float* scores, float* out);

}  // namespace satic
