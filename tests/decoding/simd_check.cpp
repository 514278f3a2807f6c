// Prints every operation of src/satic/csrc/simd.h on fixed inputs, special values included, one line per result
// lane, as bit patterns (NaN as "nan": the kernels never read a NaN's payload, and CPUs make different ones).
// tests/decoding/test_decoding_simd.py builds it once per back-end (AVX2, NEON, portable) and compares the lines.
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>

#include "simd.h"

namespace s = satic::simd;

namespace {

void put(const char* op, int variant, const float* lanes, int count) {
  for (int i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, lanes + i, sizeof(bits));
    if (std::isnan(lanes[i])) {
      std::printf("%s %d %d nan\n", op, variant, i);
    } else {
      std::printf("%s %d %d %08" PRIx32 "\n", op, variant, i, bits);
    }
  }
}

void put(const char* op, int variant, s::f32x8 v) {
  float lanes[8];
  s::store(lanes, v);
  put(op, variant, lanes, 8);
}

void put_mask(const char* op, int variant, s::mask8 m) {
  // a mask is read only through any() and zero_where(): print what they make of it
  const float ones[8] = {1, 1, 1, 1, 1, 1, 1, 1};
  put(op, variant, s::zero_where(m, s::load(ones)));
  std::printf("%s %d any %d\n", op, variant, s::any(m) ? 1 : 0);
}

}  // namespace

int main() {
  std::printf("backend %s\n", s::kBackend);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const float denormal = std::numeric_limits<float>::denorm_min() * 3;
  float values[64] = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, 1.5f, 2.5f, -2.5f,
                      3.5f, -0.5f, denormal, -denormal, 3.4e38f, -3.4e38f, inf, -inf,
                      nan, 1e-3f, 7.0f, -7.25f, 1.0e7f + 0.5f, 8388609.0f, -1e-30f, 2.0f,
                      32767.5f, -32768.5f, 40000.0f, -40000.0f, 0.3f, 1.0f / 3.0f, 88.0f, -87.5f};
  uint32_t state = 12345;
  for (int i = 32; i < 64; ++i) {  // the rest: pseudo-random numbers in about [-64, 64]
    state = state * 1664525u + 1013904223u;
    values[i] = static_cast<float>(static_cast<int32_t>(state >> 8) - (1 << 23)) / 131072.0f;
  }
  for (int v = 0; v + 8 <= 64; v += 4) {  // overlapping windows: every value meets several partners
    const s::f32x8 a = s::load(values + v), b = s::load(values + (v + 13) % 56), c = s::load(values + (v + 29) % 56);
    put("load", v, a);
    put("broadcast", v, s::broadcast(values + v + 3));
    put("set1", v, s::set1(values[v + 5]));
    put("add", v, s::add(a, b));
    put("sub", v, s::sub(a, b));
    put("mul", v, s::mul(a, b));
    put("div", v, s::div(a, b));
    put("max", v, s::max(a, b));
    put("min", v, s::min(a, b));
    put("max_swapped", v, s::max(b, a));
    put("fma", v, s::fma(a, b, c));
    put("fnma", v, s::fnma(a, b, c));
    put("abs", v, s::abs(a));
    put("round_even", v, s::round_even(a));
    put_mask("less", v, s::less(a, b));
    put_mask("not_finite", v, s::not_finite(a));
    put_mask("either", v, s::either(s::less(a, b), s::not_finite(c)));
    int16_t q[16];
    // store_int16 is defined for numbers within int32's range: replace the others by 0
    float in[16];
    for (int i = 0; i < 16; ++i) {
      const float x = values[(v + i) % 64];
      in[i] = std::isfinite(x) && std::fabs(x) < 2e9f ? x : 0.0f;
    }
    s::store_int16(q, s::load(in), s::load(in + 8));
    for (int i = 0; i < 16; ++i) std::printf("store_int16 %d %d %d\n", v, i, q[i]);
  }
  put_mask("no_lanes", 0, s::no_lanes());
  for (int n = -126; n <= 127; n += 11) {
    const float whole[8] = {static_cast<float>(n), -1, 0, 1, 127, -126, 64, -64};
    put("pow2", n, s::pow2(s::load(whole)));
  }
  for (int count = -1; count <= 9; ++count) {
    float out[8];
    for (float& x : out) x = -99.0f;
    s::store_first(out, count, s::load(values + 40));
    put("store_first", count, out, 8);
  }
  const int32_t ints[8] = {0, -1, 16777217, -16777217, std::numeric_limits<int32_t>::max(),
                           std::numeric_limits<int32_t>::min(), 123456789, -7};
  s::i32x8 acc = s::zero_int();
  put("to_float_zero", 0, s::to_float(acc));
  int8_t weights[32];
  for (int i = 0; i < 32; ++i) weights[i] = static_cast<int8_t>(i * 37 - 128);
  weights[0] = -128, weights[1] = 127, weights[2] = 127, weights[3] = -128;
  const int16_t inputs[6] = {32767, -32767, -1, 300, 0, 12345};
  for (int p = 0; p < 3; ++p) {
    const s::pair16 x = s::int16_pair(inputs + 2 * p);
    for (int half = 0; half < 2; ++half) {
      acc = s::add_pair_products(acc, x, s::widen_int8(weights + 16 * half));
      put("pair_products", 2 * p + half, s::to_float(acc));
    }
  }
  for (int shift = 0; shift < 8; ++shift) {  // sums beyond 2^24, which to_float rounds
    s::i32x8 big = s::zero_int();
    int16_t pair[2] = {static_cast<int16_t>(ints[shift] & 0x7fff), 1};
    for (int r = 0; r < 20; ++r) big = s::add_pair_products(big, s::int16_pair(pair), s::widen_int8(weights));
    put("to_float", shift, s::to_float(big));
  }
  const s::f32x8 x = s::load(values + 32);
  put("exp_parts", 0, s::zero_where(s::less(x, s::set1(-10.0f)), s::mul(x, s::pow2(s::round_even(x)))));
  return 0;
}
