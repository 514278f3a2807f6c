// The vector operations the kernels are written in: 8 float lanes (f32x8), their comparisons (mask8), 8 int32
// lanes (i32x8) and the int8 products' operands, with the few compound steps the kernels take with them.
//
// Three builds of one meaning:
// - an x86-64 CPU with AVX2 and FMA (-mavx2 -mfma): AVX2 intrinsics, one or two instructions each;
// - arm64: NEON intrinsics, two 4-lane registers per 8 lanes;
// - any other CPU, or SATIC_PORTABLE_SIMD defined: portable C++ on GCC/Clang vector types.
// Each operation gives the same bits in all three, for the inputs it documents (store_int16: numbers within
// int32's range; pow2: whole numbers in [-126, 127]; the kernels pass no others): a fused multiply-add is
// fused, min/max and comparisons treat NaN as the AVX2 instructions do, float-to-int conversions round to
// nearest (ties to even), and int8 products are summed exactly. tests/decoding/simd_check.cpp checks them
// lane for lane, NaN, infinities, -0.0 and denormals included.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && !defined(SATIC_PORTABLE_SIMD)
#define SATIC_SIMD_AVX2 1
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON) && !defined(SATIC_PORTABLE_SIMD)
#define SATIC_SIMD_NEON 1
#include <arm_neon.h>
#endif

namespace satic::simd {

#if defined(SATIC_SIMD_AVX2)

inline constexpr const char* kBackend = "avx2";

using f32x8 = __m256;
using mask8 = __m256;     // a comparison's lanes: all bits set where true
using i32x8 = __m256i;    // int32 sums
using pair16 = __m256i;   // two int16 inputs (of k and k+1) in every int32 lane
using pairs8 = __m256i;   // 8 columns' int8 weights at k and k+1, widened to int16, interleaved

inline f32x8 zero() { return _mm256_setzero_ps(); }
inline f32x8 set1(float v) { return _mm256_set1_ps(v); }
inline f32x8 load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, f32x8 v) { _mm256_storeu_ps(p, v); }
inline f32x8 broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline f32x8 add(f32x8 a, f32x8 b) { return _mm256_add_ps(a, b); }
inline f32x8 sub(f32x8 a, f32x8 b) { return _mm256_sub_ps(a, b); }
inline f32x8 mul(f32x8 a, f32x8 b) { return _mm256_mul_ps(a, b); }
inline f32x8 div(f32x8 a, f32x8 b) { return _mm256_div_ps(a, b); }
inline f32x8 max(f32x8 a, f32x8 b) { return _mm256_max_ps(a, b); }  // a > b ? a : b (b where either is NaN)
inline f32x8 min(f32x8 a, f32x8 b) { return _mm256_min_ps(a, b); }  // a < b ? a : b
inline f32x8 fma(f32x8 a, f32x8 b, f32x8 c) { return _mm256_fmadd_ps(a, b, c); }    // a * b + c, rounded once
inline f32x8 fnma(f32x8 a, f32x8 b, f32x8 c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b, rounded once
inline f32x8 abs(f32x8 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
inline f32x8 round_even(f32x8 v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline mask8 no_lanes() { return _mm256_setzero_ps(); }
inline mask8 less(f32x8 a, f32x8 b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }  // false where either is NaN
inline mask8 not_finite(f32x8 v) { return _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ); }
inline mask8 either(mask8 a, mask8 b) { return _mm256_or_ps(a, b); }
inline bool any(mask8 m) { return _mm256_movemask_ps(m) != 0; }
inline f32x8 zero_where(mask8 m, f32x8 v) { return _mm256_andnot_ps(m, v); }

// 2^n for lanes holding whole numbers n in [-126, 127], built in the float's exponent field.
inline f32x8 pow2(f32x8 n) {
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
}

// v's first `count` lanes (none for count <= 0, all for count >= 8) written to p, the memory of the others untouched.
inline void store_first(float* p, int64_t count, f32x8 v) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int n = static_cast<int>(count < 0 ? 0 : count > 8 ? 8 : count);
  _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane), v);
}

inline i32x8 zero_int() { return _mm256_setzero_si256(); }
inline f32x8 to_float(i32x8 v) { return _mm256_cvtepi32_ps(v); }

// p[0], p[1]: the inputs at k and k + 1.
inline pair16 int16_pair(const int16_t* p) {
  int32_t two;
  std::memcpy(&two, p, sizeof(two));
  return _mm256_set1_epi32(two);
}

// 16 int8 weights, column c's at k and k + 1 in bytes 2c and 2c + 1.
inline pairs8 widen_int8(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// acc + x[k] * w[k, c] + x[k+1] * w[k+1, c] for the 8 columns c, in int32 (the kernels' sums never overflow).
inline i32x8 add_pair_products(i32x8 acc, pair16 x, pairs8 w) { return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w)); }

// 16 floats, a's 8 lanes then b's, rounded to the nearest int (ties to even) and saturated to int16, stored to p.
// Every lane must be a number within int32's range (the kernels' are at most 32767 in size).
inline void store_int16(int16_t* p, f32x8 a, f32x8 b) {
  const __m256i packed = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));  // within 128-bit halves
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));  // a0-7, b0-7
}

inline void prefetch_l1(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

#elif defined(SATIC_SIMD_NEON)

inline constexpr const char* kBackend = "neon";

struct f32x8 {
  float32x4_t lo, hi;
};
struct mask8 {
  uint32x4_t lo, hi;
};
struct i32x8 {
  int32x4_t lo, hi;
};
struct pair16 {
  int32x4_t first, second;  // x[k] and x[k+1] in every lane
};
struct pairs8 {
  int32x4_t first_lo, first_hi, second_lo, second_hi;  // the 8 columns' weights at k, then at k + 1
};

inline f32x8 zero() { return {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}; }
inline f32x8 set1(float v) { return {vdupq_n_f32(v), vdupq_n_f32(v)}; }
inline f32x8 load(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
inline void store(float* p, f32x8 v) {
  vst1q_f32(p, v.lo);
  vst1q_f32(p + 4, v.hi);
}
inline f32x8 broadcast(const float* p) { return set1(*p); }
inline f32x8 add(f32x8 a, f32x8 b) { return {vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)}; }
inline f32x8 sub(f32x8 a, f32x8 b) { return {vsubq_f32(a.lo, b.lo), vsubq_f32(a.hi, b.hi)}; }
inline f32x8 mul(f32x8 a, f32x8 b) { return {vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi)}; }
inline f32x8 div(f32x8 a, f32x8 b) { return {vdivq_f32(a.lo, b.lo), vdivq_f32(a.hi, b.hi)}; }
// NEON's own max/min return NaN where either lane is NaN; these keep AVX2's choice of b
inline f32x8 max(f32x8 a, f32x8 b) {
  return {vbslq_f32(vcgtq_f32(a.lo, b.lo), a.lo, b.lo), vbslq_f32(vcgtq_f32(a.hi, b.hi), a.hi, b.hi)};
}
inline f32x8 min(f32x8 a, f32x8 b) {
  return {vbslq_f32(vcltq_f32(a.lo, b.lo), a.lo, b.lo), vbslq_f32(vcltq_f32(a.hi, b.hi), a.hi, b.hi)};
}
inline f32x8 fma(f32x8 a, f32x8 b, f32x8 c) { return {vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi)}; }
inline f32x8 fnma(f32x8 a, f32x8 b, f32x8 c) { return {vfmsq_f32(c.lo, a.lo, b.lo), vfmsq_f32(c.hi, a.hi, b.hi)}; }
inline f32x8 abs(f32x8 v) { return {vabsq_f32(v.lo), vabsq_f32(v.hi)}; }
inline f32x8 round_even(f32x8 v) { return {vrndnq_f32(v.lo), vrndnq_f32(v.hi)}; }
inline mask8 no_lanes() { return {vdupq_n_u32(0), vdupq_n_u32(0)}; }
inline mask8 less(f32x8 a, f32x8 b) { return {vcltq_f32(a.lo, b.lo), vcltq_f32(a.hi, b.hi)}; }
inline mask8 not_finite(f32x8 v) {  // v - v is 0 for a finite v, NaN for infinity and NaN
  const float32x4_t z = vdupq_n_f32(0.0f);
  return {vmvnq_u32(vceqq_f32(vsubq_f32(v.lo, v.lo), z)), vmvnq_u32(vceqq_f32(vsubq_f32(v.hi, v.hi), z))};
}
inline mask8 either(mask8 a, mask8 b) { return {vorrq_u32(a.lo, b.lo), vorrq_u32(a.hi, b.hi)}; }
inline bool any(mask8 m) { return vmaxvq_u32(vorrq_u32(m.lo, m.hi)) != 0; }
inline f32x8 zero_where(mask8 m, f32x8 v) {
  return {vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(v.lo), m.lo)),
          vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(v.hi), m.hi))};
}
inline f32x8 pow2(f32x8 n) {
  const int32x4_t bias = vdupq_n_s32(127);
  return {vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n.lo), bias), 23)),
          vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n.hi), bias), 23))};
}
inline void store_first(float* p, int64_t count, f32x8 v) {
  if (count >= 8) {
    store(p, v);
    return;
  }
  float lanes[8];
  store(lanes, v);
  for (int64_t i = 0; i < count; ++i) p[i] = lanes[i];
}

inline i32x8 zero_int() { return {vdupq_n_s32(0), vdupq_n_s32(0)}; }
inline f32x8 to_float(i32x8 v) { return {vcvtq_f32_s32(v.lo), vcvtq_f32_s32(v.hi)}; }
inline pair16 int16_pair(const int16_t* p) { return {vdupq_n_s32(p[0]), vdupq_n_s32(p[1])}; }
inline pairs8 widen_int8(const int8_t* p) {
  const int8x8x2_t split = vld2_s8(p);  // the even bytes (weights at k), the odd ones (at k + 1)
  const int16x8_t first = vmovl_s8(split.val[0]), second = vmovl_s8(split.val[1]);
  return {vmovl_s16(vget_low_s16(first)), vmovl_high_s16(first), vmovl_s16(vget_low_s16(second)),
          vmovl_high_s16(second)};
}
inline i32x8 add_pair_products(i32x8 acc, pair16 x, pairs8 w) {
  return {vmlaq_s32(vmlaq_s32(acc.lo, w.first_lo, x.first), w.second_lo, x.second),
          vmlaq_s32(vmlaq_s32(acc.hi, w.first_hi, x.first), w.second_hi, x.second)};
}
inline void store_int16(int16_t* p, f32x8 a, f32x8 b) {
  vst1q_s16(p, vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(a.lo)), vqmovn_s32(vcvtnq_s32_f32(a.hi))));
  vst1q_s16(p + 8, vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(b.lo)), vqmovn_s32(vcvtnq_s32_f32(b.hi))));
}

inline void prefetch_l1(const void* p) { __builtin_prefetch(p, 0, 3); }
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

#else  // portable

inline constexpr const char* kBackend = "portable";

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t mask8 __attribute__((vector_size(32)));  // -1 where true, 0 where false
typedef int32_t i32x8 __attribute__((vector_size(32)));
struct pair16 {
  int32_t first, second;  // x[k], x[k+1]
};
struct pairs8 {
  i32x8 first, second;  // the 8 columns' weights at k, then at k + 1
};

namespace detail {
// float -> int32 as AVX2's cvtps2dq: to nearest, ties to even; NaN and out-of-range lanes give INT32_MIN.
inline int32_t round_to_int(float x) {
  const float r = std::nearbyint(x);
  return r >= -2147483648.0f && r < 2147483648.0f ? static_cast<int32_t>(r) : INT32_MIN;
}
inline int16_t saturate16(int32_t v) { return static_cast<int16_t>(v < -32768 ? -32768 : v > 32767 ? 32767 : v); }
}  // namespace detail

inline f32x8 zero() { return f32x8{}; }
inline f32x8 set1(float v) { return f32x8{v, v, v, v, v, v, v, v}; }
inline f32x8 load(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }
inline f32x8 broadcast(const float* p) { return set1(*p); }
inline f32x8 add(f32x8 a, f32x8 b) { return a + b; }
inline f32x8 sub(f32x8 a, f32x8 b) { return a - b; }
inline f32x8 mul(f32x8 a, f32x8 b) { return a * b; }
inline f32x8 div(f32x8 a, f32x8 b) { return a / b; }
inline f32x8 max(f32x8 a, f32x8 b) {
  f32x8 r;
  for (int i = 0; i < 8; ++i) r[i] = a[i] > b[i] ? a[i] : b[i];
  return r;
}
inline f32x8 min(f32x8 a, f32x8 b) {
  f32x8 r;
  for (int i = 0; i < 8; ++i) r[i] = a[i] < b[i] ? a[i] : b[i];
  return r;
}
inline f32x8 fma(f32x8 a, f32x8 b, f32x8 c) {
  f32x8 r;
  for (int i = 0; i < 8; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
}
inline f32x8 fnma(f32x8 a, f32x8 b, f32x8 c) {
  f32x8 r;
  for (int i = 0; i < 8; ++i) r[i] = std::fma(-a[i], b[i], c[i]);
  return r;
}
inline f32x8 abs(f32x8 v) {
  f32x8 r;
  for (int i = 0; i < 8; ++i) r[i] = std::fabs(v[i]);
  return r;
}
inline f32x8 round_even(f32x8 v) {
  f32x8 r;
  for (int i = 0; i < 8; ++i) r[i] = std::nearbyint(v[i]);
  return r;
}
inline mask8 no_lanes() { return mask8{}; }
inline mask8 less(f32x8 a, f32x8 b) {
  mask8 r;
  for (int i = 0; i < 8; ++i) r[i] = a[i] < b[i] ? -1 : 0;
  return r;
}
inline mask8 not_finite(f32x8 v) {
  mask8 r;
  for (int i = 0; i < 8; ++i) r[i] = std::isfinite(v[i]) ? 0 : -1;
  return r;
}
inline mask8 either(mask8 a, mask8 b) { return a | b; }
inline bool any(mask8 m) {
  bool r = false;
  for (int i = 0; i < 8; ++i) r = r || m[i] != 0;
  return r;
}
inline f32x8 zero_where(mask8 m, f32x8 v) {
  f32x8 r;
  for (int i = 0; i < 8; ++i) r[i] = m[i] != 0 ? 0.0f : v[i];
  return r;
}
inline f32x8 pow2(f32x8 n) {
  uint32_t bits[8];
  for (int i = 0; i < 8; ++i) bits[i] = static_cast<uint32_t>(detail::round_to_int(n[i]) + 127) << 23;
  f32x8 r;
  std::memcpy(&r, bits, sizeof(r));
  return r;
}
inline void store_first(float* p, int64_t count, f32x8 v) {
  for (int i = 0; i < 8 && i < count; ++i) p[i] = v[i];
}

inline i32x8 zero_int() { return i32x8{}; }
inline f32x8 to_float(i32x8 v) {
  f32x8 r;
  for (int i = 0; i < 8; ++i) r[i] = static_cast<float>(v[i]);
  return r;
}
inline pair16 int16_pair(const int16_t* p) { return {p[0], p[1]}; }
inline pairs8 widen_int8(const int8_t* p) {
  pairs8 w;
  for (int i = 0; i < 8; ++i) {
    w.first[i] = p[2 * i];
    w.second[i] = p[2 * i + 1];
  }
  return w;
}
inline i32x8 add_pair_products(i32x8 acc, pair16 x, pairs8 w) { return acc + w.first * x.first + w.second * x.second; }
inline void store_int16(int16_t* p, f32x8 a, f32x8 b) {
  for (int i = 0; i < 8; ++i) {
    p[i] = detail::saturate16(detail::round_to_int(a[i]));
    p[8 + i] = detail::saturate16(detail::round_to_int(b[i]));
  }
}

inline void prefetch_l1(const void* p) { __builtin_prefetch(p, 0, 3); }
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

#endif

}  // namespace satic::simd
