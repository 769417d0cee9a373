// The activations of the fused GEMM and convolution epilogues: names and codes, shared by the
// CPU and CUDA kernels (the codes match kernels/linear.py's ACTIVATIONS).
#pragma once

#include <c10/util/Exception.h>

#include <string>
#include <string_view>
#include <type_traits>

namespace fuseformer {

enum class Activation { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4, kRelu2 = 5 };

inline Activation parse_activation(std::string_view name, const char* op) {
  if (name == "none") return Activation::kNone;
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  if (name == "relu2") return Activation::kRelu2;
  TORCH_CHECK(false, op, ": activation must be one of none, relu, gelu, gelu_tanh, silu, relu2; got '",
              std::string(name), "'");
}

// Calls f(std::integral_constant<Activation, A>) for the runtime activation `act`.
template <typename F>
void with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kNone: return f(std::integral_constant<Activation, Activation::kNone>{});
    case Activation::kRelu: return f(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kGelu: return f(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh: return f(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kSilu: return f(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kRelu2: return f(std::integral_constant<Activation, Activation::kRelu2>{});
  }
}

}  // namespace fuseformer
