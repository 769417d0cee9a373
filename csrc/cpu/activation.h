// a = act(z) and d = act'(z) in float32 for the CPU epilogues (linear, conv), inlined into
// their vectorized loops.
#pragma once

#include "../activation.h"
#include "math.h"

namespace fuseformer::cpu {

template <Activation A>
__attribute__((always_inline)) inline void act_and_grad(float z, float& a, float& d) {
  constexpr float kInvSqrt2Pi = 0.39894228040143268f;
  constexpr float kSqrt2OverPi = 0.79788456080286536f;
  constexpr float kGeluTanhC = 0.044715f;
  if constexpr (A == Activation::kRelu) {
    a = z > 0 ? z : 0.0f;
    d = z > 0 ? 1.0f : 0.0f;
  } else if constexpr (A == Activation::kGelu) {
    float g;
    const float cdf = normal_cdf_f32(z, g);
    a = z * cdf;
    d = cdf + z * kInvSqrt2Pi * g;
  } else if constexpr (A == Activation::kGeluTanh) {
    const float t = tanh_f32(kSqrt2OverPi * (z + kGeluTanhC * z * z * z));
    a = 0.5f * z * (1.0f + t);
    d = 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhC * z * z);
  } else if constexpr (A == Activation::kSilu) {
    const float s = sigmoid_f32(z);
    a = z * s;
    d = s * (1.0f + z * (1.0f - s));
  } else if constexpr (A == Activation::kRelu2) {
    const float r = z > 0 ? z : 0.0f;
    a = r * r;
    d = 2.0f * r;
  } else {
    a = z;
    d = 1.0f;
  }
}

}  // namespace fuseformer::cpu
