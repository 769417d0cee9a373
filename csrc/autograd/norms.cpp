// Autograd of the C++ norm op (fuseformer::norm_fwd), in C++: the same formula as the
// Python registration of the Triton op (python/fuseformer/ops/norms.py), without the Python
// autograd.Function path, which costs tens of microseconds of host time per call.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "untracked.h"

#include <optional>
#include <tuple>

namespace fuseformer::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_norm_fwd(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fuseformer::norm_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, double, bool)>();
  return op.call(input, residual, weight, bias, eps, rms);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_norm_bwd(const at::Tensor& grad_out,
                                                             const std::optional<at::Tensor>& grad_residual_out,
                                                             const at::Tensor& input,
                                                             const std::optional<at::Tensor>& weight,
                                                             const at::Tensor& mean, const at::Tensor& rstd, bool rms,
                                                             bool has_bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fuseformer::norm_bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, bool, bool)>();
  return op.call(grad_out, grad_residual_out, input, weight, mean, rstd, rms, has_bias);
}

class NormFunction : public torch::autograd::Function<NormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps, bool rms) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, residual_out, mean, rstd] = call_norm_fwd(input, residual, weight, bias, eps, rms);
    // The backward needs the tensor that was normalized: the sum when a residual was added.
    ctx->save_for_backward({residual ? residual_out : input, weight.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["rms"] = rms;
    ctx->saved_data["has_residual"] = residual.has_value();
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["bias_dtype"] = bias ? bias->scalar_type() : at::kFloat;
    ctx->mark_non_differentiable({mean, rstd});
    // mean / rstd never get gradients, nor residual_out when it goes unused: no zero-filled
    // gradients for them (a (rows, N) tensor for residual_out).
    ctx->set_materialize_grads(false);
    return {out, residual_out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& normalized = saved[0];
    const std::optional<at::Tensor> weight = saved[1].defined() ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool residual_grad = has_residual && grads[1].defined();
    if (!grads[0].defined() && !residual_grad) return variable_list(6);
    // Only the sum used downstream: the normalized output's gradient is zero.
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(normalized);
    auto [grad_input, grad_weight, grad_bias] =
        call_norm_bwd(grad_out, residual_grad ? std::optional<at::Tensor>(grads[1]) : std::nullopt, normalized, weight,
                      saved[2], saved[3], ctx->saved_data["rms"].toBool(), has_bias);
    return {
        grad_input,
        has_residual ? grad_input : at::Tensor(),
        weight ? grad_weight.to(weight->scalar_type()) : at::Tensor(),
        has_bias ? grad_bias.to(ctx->saved_data["bias_dtype"].toScalarType()) : at::Tensor(),
        at::Tensor(),
        at::Tensor(),
    };
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms) {
  if (untracked(input, residual, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_norm_fwd(input, residual, weight, bias, eps, rms);
  }
  auto outs = NormFunction::apply(input, residual, weight, bias, eps, rms);
  return {outs[0], outs[1], outs[2], outs[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, Autograd, m) { m.impl("norm_fwd", &norm_fwd_autograd); }

}  // namespace fuseformer::autograd
