// Float32 elementary functions the compiler can vectorize (libm's expf / erff calls do not,
// and one call per element costs more than the GEMM around it). Shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

namespace fuseformer::cpu {

// exp(x): 2^n · e^r with n = round(x / ln 2), |r| <= ln2 / 2, and e^r from its degree-7
// Taylor polynomial (truncation < 6e-9 relative). Below -87.3 the result would be
// subnormal: it returns 0 (and exp(-inf) = 0, as masked attention scores need).
__attribute__((always_inline)) inline float exp_f32(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-06f;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const bool underflow = x < -87.3f;
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float result = p * std::bit_cast<float>(bits);
  return underflow ? 0.0f : result;
}

// tanh(y) = sign(y) (1 - e) / (1 + e), e = exp(-2|y|): no overflow; absolute error ~1e-7.
__attribute__((always_inline)) inline float tanh_f32(float y) {
  const float e = exp_f32(-2.0f * std::fabs(y));
  const float t = (1.0f - e) / (1.0f + e);
  return y < 0 ? -t : t;
}

// sigmoid(z) from e = exp(-|z|): no overflow, and both tails keep full relative precision.
__attribute__((always_inline)) inline float sigmoid_f32(float z) {
  const float e = exp_f32(-std::fabs(z));
  const float r = 1.0f / (1.0f + e);
  return z >= 0 ? r : e * r;
}

// erfc(x) by the Chebyshev-fitted form t·exp(-x² + P(t)), t = 1 / (1 + |x|/2), whose relative
// error is below 1.2e-7 for every x (Numerical Recipes, "erfcc"); erfc(-x) = 2 - erfc(x).
// Relative precision in the tail is what GELU's Φ(z) = erfc(-z/√2) / 2 needs for z << 0.
__attribute__((always_inline)) inline float erfc_f32(float x) {
  const float ax = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.5f * ax);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const float r = t * exp_f32(p - ax * ax);
  return x >= 0 ? r : 2.0f - r;
}

}  // namespace fuseformer::cpu
