// Shape checks and output allocation shared by the CPU and CUDA norm kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "allocate.h"

namespace fuseformer::norms {

struct Dims {
  int64_t rows;
  int64_t cols;
};

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// input: (..., N), normalized over the last dimension.
inline Dims check_input(const at::Tensor& input, const char* name) {
  TORCH_CHECK(input.dim() >= 1, "fuseformer norm: ", name, " must have at least 1 dimension");
  TORCH_CHECK(is_supported_dtype(input.scalar_type()), "fuseformer norm: ", name,
              " must be float32, float16 or bfloat16, got ", input.scalar_type());
  const int64_t cols = input.size(-1);
  TORCH_CHECK(cols > 0, "fuseformer norm: the normalized size must be positive");
  return {input.numel() / cols, cols};
}

// weight / bias: N elements, the input's dtype or float32.
inline void check_param(const std::optional<at::Tensor>& param, const at::Tensor& input,
                        int64_t cols, const char* name) {
  if (!param.has_value()) return;
  TORCH_CHECK(param->numel() == cols, "fuseformer norm: ", name, " must have ", cols,
              " elements, got ", param->numel());
  TORCH_CHECK(param->scalar_type() == input.scalar_type() || param->scalar_type() == at::kFloat,
              "fuseformer norm: ", name, " must be ", input.scalar_type(),
              " or float32, got ", param->scalar_type());
  TORCH_CHECK(param->device() == input.device(), "fuseformer norm: ", name, " is on ",
              param->device(), " but input is on ", input.device());
}

inline at::Tensor stats_like(const at::Tensor& input) {
  auto sizes = input.sizes().vec();
  sizes.pop_back();
  return at::empty(sizes, input.options().dtype(at::kFloat));
}

inline at::Tensor empty_marker(const at::Tensor& like) { return at::empty({0}, like.options()); }

// The forward's checks, shared by both devices; input and residual come back contiguous
// (residual undefined when absent).
struct FwdArgs {
  Dims dims;
  at::Tensor input;
  at::Tensor residual;
};

inline FwdArgs check_fwd_args(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, bool rms) {
  const Dims dims = check_input(input, "input");
  check_param(weight, input, dims.cols, "weight");
  check_param(bias, input, dims.cols, "bias");
  TORCH_CHECK(!(rms && bias.has_value()), "fuseformer norm: RMSNorm takes no bias");
  TORCH_CHECK(!(weight.has_value() && bias.has_value()) ||
                  weight->scalar_type() == bias->scalar_type(),
              "fuseformer norm: weight and bias must have the same dtype");
  at::Tensor residual_contiguous;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == input.sizes() && residual->scalar_type() == input.scalar_type(),
                "fuseformer norm: residual must match input in shape and dtype");
    residual_contiguous = residual->contiguous();
  }
  return {dims, input.contiguous(), residual_contiguous};
}

// out, residual_out (empty without a residual), mean (empty for RMSNorm), rstd.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> allocate_fwd_outputs(
    const at::Tensor& input, bool has_residual, bool rms) {
  return {empty_output_like(input), has_residual ? empty_output_like(input) : empty_marker(input),
          rms ? at::empty({0}, input.options().dtype(at::kFloat)) : stats_like(input),
          stats_like(input)};
}

}  // namespace fuseformer::norms
