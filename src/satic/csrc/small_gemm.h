// The fp32 pieces that encoder.cpp and decoder.cpp build on (defined in small_gemm.cpp and encoder.cpp).
#pragma once

#include <cstdint>

namespace satic {

// y (m, out_features), row stride out_features = x (m, k) . w + b, where w is packed (panels, k, 16) as
// satic.decoding.small_gemm.pack_weight packs it and b is zero-padded to panels * 16.
void packed_linear(int64_t m, const float* x, int64_t k, const float* w, int64_t panels, const float* b, float* y,
                   int64_t out_features);

// The reference's norm of each of `rows` rows of n: weight * (x - mean) / (unbiased std + eps) + bias.
void reference_norm_rows(const float* x, int64_t rows, int64_t n, const float* weight, const float* bias, float eps,
                         float* y);

// A packed linear layer's tensors: y (rows, out) = x (rows, in) . w + b, w packed in `panels` panels of 16.
struct Linear {
  const float* w;
  const float* b;
  int64_t in, out, panels;

  void operator()(int64_t rows, const float* x, float* y) const { packed_linear(rows, x, in, w, panels, b, y, out); }
};

// A norm's weight and bias (reference_norm_rows).
struct Norm {
  const float* w;
  const float* b;
};

// a . b over n floats (AVX2, 8 lanes summed pairwise, then the tail).
float dot(const float* a, const float* b, int64_t n);

// One query of inference attention, in the model's order of operations: scores[j] = q . key_j / sqrt(dk)
// (+ bias[j]), their softmax over the lk keys, out (dk) = the weighted sum of the values. Keys and values
// are rows `key_stride` / `value_stride` floats apart; scores is scratch for lk floats; bias may be null.
void attend_query(const float* q, const float* keys, int64_t key_stride, const float* values, int64_t value_stride,
                  const float* bias, int64_t lk, int64_t dk, float* scores, float* out);

}  // namespace satic
