// Argument checks and activation names shared by the CPU and CUDA linear kernels.
#pragma once

#include <ATen/ATen.h>

#include "activation.h"

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace fuseformer::linear {

using fuseformer::Activation;

inline Activation parse_activation(std::string_view name) { return fuseformer::parse_activation(name, "fuseformer linear"); }

struct Dims {
  int64_t m, n, k;
};

// The ops take x (..., K) as F.linear does; the kernels work on rows (M, K). Flattening in
// C++ rather than in Python saves a reshape and a view per call (~1.5 us of host time, most
// of what separates a decode-sized call from the GEMM itself).
inline at::Tensor as_rows(const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, "fuseformer linear: x must have at least 1 dimension (..., K), got a scalar");
  if (t.dim() == 2) return t;
  const int64_t k = t.size(-1);
  return t.reshape({k == 0 ? 0 : t.numel() / k, k});
}

// A (M, N) result back under `like`'s leading dimensions; placeholders (empty 1-D) as they are.
inline at::Tensor with_leading_dims(const at::Tensor& rows, const at::Tensor& like) {
  if (like.dim() == 2 || rows.dim() != 2) return rows;
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end() - 1);
  shape.push_back(rows.size(1));
  return rows.view(shape);
}

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// fwd(x (M, K), ...) applied to x (..., K): its three (M, N) outputs get x's leading dims.
template <typename Fwd>
Tensor3 fwd_on_rows(const at::Tensor& x, Fwd&& fwd) {
  auto [out, saved, saved2] = fwd(as_rows(x));
  return {with_leading_dims(out, x), with_leading_dims(saved, x), with_leading_dims(saved2, x)};
}

// bwd(grad_out (M, N), x (M, K), saved, saved2) applied to (..., N) / (..., K) tensors:
// grad_x takes x's shape back.
template <typename Bwd>
Tensor5 bwd_on_rows(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& saved,
                    const at::Tensor& saved2, Bwd&& bwd) {
  // saved / saved2 are shaped like grad_out, or empty placeholders.
  auto rows_or_empty = [&](const at::Tensor& t) { return t.sizes() == grad_out.sizes() ? as_rows(t) : t; };
  auto [grad_x, grad_w, grad_w2, grad_b, grad_b2] =
      bwd(as_rows(grad_out), as_rows(x), rows_or_empty(saved), rows_or_empty(saved2));
  if (grad_x.dim() == 2 && x.dim() != 2) grad_x = grad_x.view(x.sizes());
  return {grad_x, grad_w, grad_w2, grad_b, grad_b2};
}

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
