// Argument checks and activation names shared by the CPU and CUDA linear kernels.
#pragma once

#include <ATen/ATen.h>

#include "activation.h"

#include <optional>
#include <string_view>

namespace fuseformer::linear {

using fuseformer::Activation;

inline Activation parse_activation(std::string_view name) { return fuseformer::parse_activation(name, "fuseformer linear"); }

struct Dims {
  int64_t m, n, k;
};

// x (M, K); weight and weight_up (N, K); biases (N,); one dtype (fp32/fp16/bf16) and device.
inline Dims check_fwd_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& weight_up,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bias_up) {
  TORCH_CHECK(x.dim() == 2, "fuseformer linear: x must be 2-D (M, K), got ", x.dim(), " dimensions");
  TORCH_CHECK(weight.dim() == 2, "fuseformer linear: weight must be 2-D (N, K), got ", weight.dim(), " dimensions");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "fuseformer linear: x must be float32, float16 or bfloat16, got ", dtype);
  const Dims d{x.size(0), weight.size(0), x.size(1)};
  TORCH_CHECK(weight.size(1) == d.k, "fuseformer linear: weight must have K=", d.k, " columns, got ",
              weight.size(1));
  auto check = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.sizes() == shape, "fuseformer linear: ", name, " must have shape ", shape, ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype, "fuseformer linear: ", name, " must be ", dtype, " like x, got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "fuseformer linear: ", name, " is on ", t.device(), " but x is on ",
                x.device());
  };
  check(weight, "weight", {d.n, d.k});
  if (weight_up) check(*weight_up, "weight_up", {d.n, d.k});
  if (bias) check(*bias, "bias", {d.n});
  if (bias_up) {
    TORCH_CHECK(weight_up.has_value(), "fuseformer linear: bias_up needs weight_up");
    check(*bias_up, "bias_up", {d.n});
  }
  return d;
}

}  // namespace fuseformer::linear
