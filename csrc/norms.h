// Shape checks and output allocation shared by the CPU and CUDA norm kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

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

}  // namespace fuseformer::norms
