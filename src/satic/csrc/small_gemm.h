// The fp32 pieces of small_gemm.cpp that encoder.cpp builds on.
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

}  // namespace satic
