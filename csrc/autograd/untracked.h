// When an autograd kernel may call its op straight through: no input takes part in
// backward-mode AD (requires_grad with grad mode on) or carries a forward-mode tangent.
// torch::autograd::Function::apply costs ~1.5 us of host time even then (a node, saved
// variables, wrapped outputs): most of a decode-sized op, and the kernels' results are the same.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <optional>

namespace fuseformer::autograd {

inline bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
inline bool has_tangent(const std::optional<at::Tensor>& t) { return t && has_tangent(*t); }
inline bool wants_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool wants_grad(const std::optional<at::Tensor>& t) { return t && wants_grad(*t); }

template <typename... Tensors>
bool untracked(const Tensors&... inputs) {
  if (c10::GradMode::is_enabled() && (wants_grad(inputs) || ...)) return false;
  return !(has_tangent(inputs) || ...);
}

}  // namespace fuseformer::autograd
