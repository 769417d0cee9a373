// Autograd of the C++ linear op (fuseformer::linear_fwd), in C++: the formula of the Python
// registration of the Triton op (python/fuseformer/ops/linear.py) without the Python
// autograd.Function path on every training step.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "untracked.h"

#include <optional>
#include <string>
#include <tuple>

namespace fuseformer::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Tensor3 call_linear_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& weight_up,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bias_up,
                        c10::string_view activation, bool save) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fuseformer::linear_fwd", "")
                       .typed<Tensor3(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                      c10::string_view, bool)>();
  return op.call(x, weight, weight_up, bias, bias_up, activation, save);
}

Tensor5 call_linear_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& weight_up, const at::Tensor& saved, const at::Tensor& saved2,
                        c10::string_view activation, bool has_bias, bool has_bias_up, bool needs_input_grad,
                        bool needs_weight_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fuseformer::linear_bwd", "")
                       .typed<Tensor5(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                      c10::string_view, bool, bool, bool, bool)>();
  return op.call(grad_out, x, weight, weight_up, saved, saved2, activation, has_bias, has_bias_up, needs_input_grad,
                 needs_weight_grad);
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& weight_up, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& bias_up, c10::string_view activation, bool save) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, saved, saved2] = call_linear_fwd(x, weight, weight_up, bias, bias_up, activation, save);
    ctx->save_for_backward({x, weight, weight_up.value_or(at::Tensor()), saved, saved2});
    ctx->saved_data["activation"] = std::string(activation.data(), activation.size());
    ctx->saved_data["bias_dtype"] = bias ? bias->scalar_type() : at::kFloat;
    ctx->saved_data["bias_up_dtype"] = bias_up ? bias_up->scalar_type() : at::kFloat;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_bias_up"] = bias_up.has_value();
    ctx->saved_data["has_weight_up"] = weight_up.has_value();
    ctx->mark_non_differentiable({saved, saved2});
    // The saves never get gradients: without this, autograd would zero-fill two (M, N)
    // tensors for them on every backward.
    ctx->set_materialize_grads(false);
    return {out, saved, saved2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(7);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const std::optional<at::Tensor> weight_up = saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool has_bias_up = ctx->saved_data["has_bias_up"].toBool();
    // needs_input_grad counts the tensors that were given (an absent optional has no
    // edge): x and weight, then weight_up, bias, bias_up when present.
    const bool present[5] = {true, true, ctx->saved_data["has_weight_up"].toBool(), has_bias, has_bias_up};
    bool needs[5] = {};
    for (size_t i = 0, edge = 0; i < 5; ++i) {
      if (present[i]) needs[i] = ctx->needs_input_grad(edge++);
    }
    const bool needs_weight_grad = needs[1] || needs[2] || needs[3] || needs[4];
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    auto [grad_x, grad_w, grad_w2, grad_b, grad_b2] =
        call_linear_bwd(grads[0], x, weight, weight_up, saved[3], saved[4], activation, has_bias, has_bias_up,
                        needs[0], needs_weight_grad);
    auto defined_if = [](bool keep, const at::Tensor& t) { return keep ? t : at::Tensor(); };
    return {
        defined_if(needs[0], grad_x),
        defined_if(needs_weight_grad, grad_w),
        defined_if(needs_weight_grad && weight_up.has_value(), grad_w2),
        has_bias && needs_weight_grad ? grad_b.to(ctx->saved_data["bias_dtype"].toScalarType()) : at::Tensor(),
        has_bias_up && needs_weight_grad ? grad_b2.to(ctx->saved_data["bias_up_dtype"].toScalarType()) : at::Tensor(),
        at::Tensor(),
        at::Tensor(),
    };
  }
};

Tensor3 linear_fwd_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& weight_up,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bias_up,
                            c10::string_view activation, bool save) {
  if (untracked(x, weight, weight_up, bias, bias_up)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_linear_fwd(x, weight, weight_up, bias, bias_up, activation, save);
  }
  auto outs = LinearFunction::apply(x, weight, weight_up, bias, bias_up, activation, save);
  return {outs[0], outs[1], outs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, Autograd, m) { m.impl("linear_fwd", &linear_fwd_autograd); }

}  // namespace fuseformer::autograd
