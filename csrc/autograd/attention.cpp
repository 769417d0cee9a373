// Autograd of the C++ attention op (fuseformer::attention_fwd, the CPU kernels), in C++: the
// formula of the Triton op's Python registration (python/fuseformer/ops/attention.py),
// without the Python autograd.Function on the hot path.
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
using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> call_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const OptTensor& mask, const OptTensor& slopes,
                                                      const OptTensor& seqlens_k, double scale, double softcap,
                                                      int64_t window_left, int64_t window_right, bool lower_right) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fuseformer::attention_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, double, double, int64_t, int64_t, bool)>();
  return op.call(q, k, v, mask, slopes, seqlens_k, scale, softcap, window_left, window_right, lower_right);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_attention_bwd(
    const at::Tensor& grad_out, const OptTensor& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const OptTensor& mask, const OptTensor& slopes,
    const OptTensor& seqlens_k, double scale, double softcap, int64_t window_left, int64_t window_right,
    bool lower_right) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fuseformer::attention_bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, double, double, int64_t, int64_t, bool)>();
  return op.call(grad_out, grad_lse, q, k, v, out, lse, mask, slopes, seqlens_k, scale, softcap, window_left,
                 window_right, lower_right);
}

OptTensor defined_or_none(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptTensor& mask, const OptTensor& slopes, const OptTensor& seqlens_k,
                               double scale, double softcap, int64_t window_left, int64_t window_right,
                               bool lower_right) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = call_attention_fwd(q, k, v, mask, slopes, seqlens_k, scale, softcap, window_left,
                                         window_right, lower_right);
    ctx->save_for_backward({q, k, v, out, lse, mask.value_or(at::Tensor()), slopes.value_or(at::Tensor()),
                            seqlens_k.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["lower_right"] = lower_right;
    // An unused log-sum-exp gets no zero-filled gradient (nor any work in the backward).
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined() && !grads[1].defined()) return variable_list(11);
    const auto s = ctx->get_saved_variables();
    // grads[1] reaches the log-sum-exp (undefined when it goes unused).
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(s[3]);
    auto [dq, dk, dv] = call_attention_bwd(
        grad_out, defined_or_none(grads[1]), s[0], s[1], s[2], s[3], s[4], defined_or_none(s[5]), defined_or_none(s[6]),
        defined_or_none(s[7]), ctx->saved_data["scale"].toDouble(), ctx->saved_data["softcap"].toDouble(),
        ctx->saved_data["window_left"].toInt(), ctx->saved_data["window_right"].toInt(),
        ctx->saved_data["lower_right"].toBool());
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_fwd_autograd(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const OptTensor& mask,
                                                          const OptTensor& slopes, const OptTensor& seqlens_k,
                                                          double scale, double softcap, int64_t window_left,
                                                          int64_t window_right, bool lower_right) {
  if (untracked(q, k, v, mask, slopes)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_attention_fwd(q, k, v, mask, slopes, seqlens_k, scale, softcap, window_left, window_right,
                              lower_right);
  }
  auto outs = AttentionFunction::apply(q, k, v, mask, slopes, seqlens_k, scale, softcap, window_left, window_right,
                                       lower_right);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, Autograd, m) { m.impl("attention_fwd", &attention_fwd_autograd); }

}  // namespace fuseformer::autograd
