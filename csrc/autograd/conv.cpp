// Autograd of the C++ conv op (fuseformer::conv2d_act_fwd), in C++: the formula of the Python
// registration the Triton op keeps (python/fuseformer/ops/conv.py), without the Python
// autograd path's ~60-90 us of host time per backward (a 1x1 ResNet-50 layer's whole
// backward is ~0.5 ms on our CPUs).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "untracked.h"

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fuseformer::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Tensor2 = std::tuple<at::Tensor, at::Tensor>;

Tensor2 call_conv_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, int64_t groups, c10::string_view activation, bool save) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fuseformer::conv2d_act_fwd", "")
                       .typed<Tensor2(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                      const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                      at::IntArrayRef, int64_t, c10::string_view, bool)>();
  return op.call(x, weight, bias, residual, stride, padding, dilation, groups, activation, save);
}

class ConvActFunction : public torch::autograd::Function<ConvActFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, c10::string_view activation, bool save) {
    const std::string act(activation.data(), activation.size());
    // relu's derivative is out > 0 and none's is 1: nothing saved; any other needs act'.
    TORCH_CHECK(save || act == "relu" || act == "none", "fuseformer conv2d_act: the gradient through activation '",
                act, "' needs the op called with save=True (fuseformer.ops.conv2d_act passes it when an input ",
                "requires grad)");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, saved] = call_conv_fwd(x, weight, bias, residual, stride, padding, dilation, groups, activation, save);
    ctx->save_for_backward({x, weight, save ? saved : (act == "relu" ? out : at::Tensor())});
    ctx->saved_data["conv"] = std::vector<int64_t>{stride[0], stride[1], padding[0], padding[1], dilation[0],
                                                   dilation[1], groups};
    ctx->saved_data["activation"] = act;
    ctx->saved_data["save"] = save;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_residual"] = residual.has_value();
    ctx->mark_non_differentiable({saved});
    ctx->set_materialize_grads(false);  // no zero-filled gradient for the save (output-sized)
    return {out, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(10);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &act_grad = saved[2];
    const at::Tensor& grad_out = grads[0];
    const std::string& act = ctx->saved_data["activation"].toStringRef();
    const bool save = ctx->saved_data["save"].toBool();
    const at::Tensor dz =
        act == "none" ? grad_out : (save ? grad_out * act_grad : at::threshold_backward(grad_out, act_grad, 0));
    // needs_input_grad counts the tensors that were given (an absent optional has no edge).
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const bool present[4] = {true, true, has_bias, has_residual};
    bool needs[4] = {};
    for (size_t i = 0, edge = 0; i < 4; ++i) {
      if (present[i]) needs[i] = ctx->needs_input_grad(edge++);
    }
    const std::vector<int64_t> conv = ctx->saved_data["conv"].toIntVector();
    const at::IntArrayRef stride(conv.data(), 2), padding(conv.data() + 2, 2), dilation(conv.data() + 4, 2);
    // float32: the bias gradient comes out of ATen's convolution backward (oneDNN/cuDNN sum it
    // in the same pass). Half dtypes: summed from the float product instead of the rounded dz.
    const bool half = grad_out.scalar_type() != at::kFloat;
    const bool want_bias = has_bias && needs[2];
    const std::vector<int64_t> bias_sizes{weight.size(0)};
    auto [grad_x, grad_w, grad_b] = at::convolution_backward(
        dz, x, weight, want_bias && !half ? std::optional<at::IntArrayRef>(bias_sizes) : std::nullopt, stride, padding,
        dilation, false, {0, 0}, conv[6], {needs[0], needs[1], want_bias && !half});
    if (want_bias && half) {
      // relu / none: dz is grad_out or zero, exact in any dtype
      const at::Tensor full = save ? grad_out.to(at::kFloat) * act_grad.to(at::kFloat) : dz.to(at::kFloat);
      grad_b = full.sum({0, 2, 3}).to(grad_out.scalar_type());
    }
    return {
        needs[0] ? grad_x : at::Tensor(),
        needs[1] ? grad_w : at::Tensor(),
        want_bias ? grad_b : at::Tensor(),
        has_residual && needs[3] ? dz : at::Tensor(),
        at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
    };
  }
};

Tensor2 conv2d_act_fwd_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                c10::string_view activation, bool save) {
  if (untracked(x, weight, bias, residual)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_conv_fwd(x, weight, bias, residual, stride, padding, dilation, groups, activation, save);
  }
  auto outs = ConvActFunction::apply(x, weight, bias, residual, stride, padding, dilation, groups, activation, save);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, Autograd, m) { m.impl("conv2d_act_fwd", &conv2d_act_fwd_autograd); }

}  // namespace fuseformer::autograd
