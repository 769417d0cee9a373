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

// tanh(y) = sign(y) (1 - e) / (1 + e), e = exp(-2|y|): no overflow. Below |y| = 1/8 the
// subtraction would cancel (absolute error ~1e-7 becomes a large relative one for small y,
// as the LSTM's small cells and hidden states have), so there the odd Taylor series to y^9
// (truncation < 1e-10 relative). Both branches are computed: the loop stays vectorized.
__attribute__((always_inline)) inline float tanh_f32(float y) {
  const float ay = std::fabs(y);
  const float e = exp_f32(-2.0f * ay);
  const float t = (1.0f - e) / (1.0f + e);
  const float y2 = y * y;
  const float p =
      y * (1.0f + y2 * (-1.0f / 3.0f + y2 * (2.0f / 15.0f + y2 * (-17.0f / 315.0f + y2 * (62.0f / 2835.0f)))));
  return ay < 0.125f ? p : (y < 0 ? -t : t);
}

// sigmoid(z) from e = exp(-|z|): no overflow, and both tails keep full relative precision.
__attribute__((always_inline)) inline float sigmoid_f32(float z) {
  const float e = exp_f32(-std::fabs(z));
  const float r = 1.0f / (1.0f + e);
  return z >= 0 ? r : e * r;
}

// Φ(z), the standard normal CDF, and g = exp(-z²/2) (GELU's derivative needs both):
// Φ(-|z|) = erfc(|z|/√2) / 2 by Abramowitz & Stegun 7.1.26 (absolute error of erf < 1.5e-7,
// the approximation PyTorch's vectorized CPU erf uses), computed as a product so the lower
// tail has no cancellation. One exp serves both results.
__attribute__((always_inline)) inline float normal_cdf_f32(float z, float& g) {
  const float ax = std::fabs(z) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  g = exp_f32(-ax * ax);
  const float tail = 0.5f * p * t * g;
  return z >= 0 ? 1.0f - tail : tail;
}

}  // namespace fuseformer::cpu
