#include "softmax.h"

#include <algorithm>
#include <limits>

#include "math.h"
#include "vectorize.h"

namespace fuseformer::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Reductions keep kLanes partial results so the compiler can vectorize them without
// reassociating float math (which -O3 alone does not allow).
constexpr int64_t kLanes = 16;

}  // namespace

FF_VECTORIZE float row_max(const float* s, int64_t n) {
  float lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = kNegInf;
  const int64_t full = n - n % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = lanes[l] > s[j + l] ? lanes[l] : s[j + l];
  }
  float m = kNegInf;
  for (int64_t l = 0; l < kLanes; ++l) m = std::max(m, lanes[l]);
  for (int64_t j = full; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

FF_VECTORIZE float exp_shifted_sum(float* s, int64_t n, float scale, float shift) {
  float lanes[kLanes] = {};
  const int64_t full = n - n % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      s[j + l] = exp_f32(scale * s[j + l] - shift);
      lanes[l] += s[j + l];
    }
  }
  float sum = 0.0f;
  for (int64_t j = full; j < n; ++j) {
    s[j] = exp_f32(scale * s[j] - shift);
    sum += s[j];
  }
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

FF_VECTORIZE void scale_row(float* x, int64_t n, float factor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

FF_VECTORIZE void affine_row(float* x, int64_t n, float factor, float offset) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = x[j] * factor + offset;
}

FF_VECTORIZE float row_sum(const float* x, int64_t n) {
  constexpr int64_t kBlock = 1024;
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    float lanes[kLanes] = {};
    const int64_t full = start + (end - start) / kLanes * kLanes;
    for (int64_t j = start; j < full; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[j + l];
    }
    float block = 0.0f;
    for (int64_t j = full; j < end; ++j) block += x[j];
    for (int64_t l = 0; l < kLanes; ++l) block += lanes[l];
    total += block;
  }
  return static_cast<float>(total);
}

}  // namespace fuseformer::cpu
