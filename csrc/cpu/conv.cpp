// Convolution + bias (+ residual) + activation on the CPU, two ways:
// - inference (float32, no act' to save, an activation oneDNN has as a post-op): one oneDNN
//   convolution (the copy bundled in torch, through its mkldnn::_convolution_pointwise ops)
//   with the bias, the residual add and the activation as post-ops, and the weight reordered
//   into oneDNN's blocked format once and cached (csrc/cpu/weight_cache.h). The reorder is most
//   of a small-batch convolution's time in ATen's path, which redoes it at every call
//   (benchmarks/NOTES.md). conv2d_bn_act_fwd folds an eval-mode BatchNorm into that cached
//   weight, so a ResNet unit in inference is this one call.
// - otherwise: ATen's convolution (oneDNN), then one vectorized, parallel pass over its output
//   that adds the bias and the residual, applies the activation and, for training, writes act'
//   (what the backward multiplies into dz), as csrc/cpu/linear.cpp does for the GEMM. Both
//   layouts: NCHW (a channel's plane shares one bias value) and channels-last (a pixel's
//   channels read the bias vector).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstring>

#include <algorithm>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "activation.h"
#include "../allocate.h"
#include "gemm.h"
#include "vectorize.h"
#include "weight_cache.h"

namespace fuseformer::cpu {
namespace {

constexpr int64_t kBlock = 1024;

// z (in: the convolution, out: the activation) += bias (+ residual); s = act'.
template <Activation A, bool kScalarBias, bool kResidual, bool kSave>
__attribute__((always_inline)) inline void conv_loop(float* __restrict z, const float* __restrict b, float b0,
                                                     const float* __restrict r, float* __restrict s, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float v = z[j] + (kScalarBias ? b0 : b[j]);
    if constexpr (kResidual) v += r[j];
    float a, d;
    act_and_grad<A>(v, a, d);
    z[j] = a;
    if constexpr (kSave) s[j] = d;
  }
}

FF_VECTORIZE void conv_epilogue(Activation act, bool scalar_bias, bool residual, bool save, float* z, const float* b,
                                float b0, const float* r, float* s, int64_t n) {
  with_activation(act, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    if (scalar_bias) {
      if (residual) {
        save ? conv_loop<A, true, true, true>(z, b, b0, r, s, n) : conv_loop<A, true, true, false>(z, b, b0, r, s, n);
      } else {
        save ? conv_loop<A, true, false, true>(z, b, b0, r, s, n) : conv_loop<A, true, false, false>(z, b, b0, r, s, n);
      }
    } else if (residual) {
      save ? conv_loop<A, false, true, true>(z, b, b0, r, s, n) : conv_loop<A, false, true, false>(z, b, b0, r, s, n);
    } else {
      save ? conv_loop<A, false, false, true>(z, b, b0, r, s, n) : conv_loop<A, false, false, false>(z, b, b0, r, s, n);
    }
  });
}

template <typename scalar_t>
void run_conv_epilogue(Activation act, at::Tensor& out, const at::Tensor& bias, const at::Tensor& residual,
                       at::Tensor& saved, bool channels_last) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const int64_t batch = out.size(0), channels = out.size(1), pixels = out.size(2) * out.size(3);
  // Rows of the pass: a channel plane (NCHW) or a pixel's channels (channels-last).
  const int64_t rows = channels_last ? batch * pixels : batch * channels;
  const int64_t row_len = channels_last ? channels : pixels;
  const float* b = bias.data_ptr<float>();
  scalar_t* z_data = out.data_ptr<scalar_t>();
  const scalar_t* r_data = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* s_data = saved.defined() ? saved.data_ptr<scalar_t>() : nullptr;
  // Channels-last rows (a pixel's channels) are short: several pixels go through one call,
  // against the bias vector repeated for that many pixels.
  const int64_t per_call = channels_last && channels < kBlock ? kBlock / channels : 1;
  std::vector<float> bias_tiled;
  if (channels_last) {
    bias_tiled.resize(per_call * channels);
    for (int64_t i = 0; i < per_call; ++i) std::copy(b, b + channels, bias_tiled.begin() + i * channels);
  }
  const int64_t groups = (rows + per_call - 1) / per_call;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(row_len * per_call, 1));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kFloat ? 0 : 3 * kBlock);
    for (int64_t group = begin; group < end; ++group) {
      // A group is per_call consecutive rows; in channels-last they are contiguous and the bias
      // pattern repeats, so the group is one row of the tiled bias.
      const int64_t row = group * per_call;
      const int64_t group_len = std::min(per_call, rows - row) * row_len;
      const float b0 = channels_last ? 0.0f : b[row % channels];
      for (int64_t j0 = 0; j0 < group_len; j0 += kBlock) {
        const int64_t len = std::min(kBlock, group_len - j0);
        const int64_t at_ = row * row_len + j0;
        const float* br = channels_last ? bias_tiled.data() + j0 : nullptr;
        if constexpr (kFloat) {
          conv_epilogue(act, !channels_last, r_data != nullptr, s_data != nullptr, z_data + at_, br, b0,
                        r_data ? r_data + at_ : nullptr, s_data ? s_data + at_ : nullptr, len);
        } else {
          float *z = buf.data(), *r = z + kBlock, *s = r + kBlock;
          for (int64_t j = 0; j < len; ++j) z[j] = static_cast<float>(z_data[at_ + j]);
          if (r_data) {
            for (int64_t j = 0; j < len; ++j) r[j] = static_cast<float>(r_data[at_ + j]);
          }
          conv_epilogue(act, !channels_last, r_data != nullptr, s_data != nullptr, z, br, b0, r, s, len);
          for (int64_t j = 0; j < len; ++j) z_data[at_ + j] = static_cast<scalar_t>(z[j]);
          if (s_data) {
            for (int64_t j = 0; j < len; ++j) s_data[at_ + j] = static_cast<scalar_t>(s[j]);
          }
        }
      }
    }
  });
}


std::vector<int64_t> conv_output_shape(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation) {
  std::vector<int64_t> shape{x.size(0), weight.size(0)};
  for (int i = 0; i < 2; ++i) {
    shape.push_back((x.size(2 + i) + 2 * padding[i] - dilation[i] * (weight.size(2 + i) - 1) - 1) / stride[i] + 1);
  }
  return shape;
}

void check_residual_shape(const char* op, const std::optional<at::Tensor>& residual, const at::Tensor& x,
                          const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation) {
  TORCH_CHECK(!residual || residual->sizes() == at::IntArrayRef(conv_output_shape(x, weight, stride, padding, dilation)),
              op, ": residual must have the output's shape");
}

// ---- the oneDNN path (inference) ----------------------------------------------------------

const DnnlOps& dnnl_conv_ops() {
  static const DnnlOps ops = DnnlOps::find("mkldnn::_reorder_convolution_weight", "mkldnn::_convolution_pointwise");
  return ops;
}

// oneDNN's name for the activation as a post-op ({attr, algorithm}); attr is null where it
// has none. After a residual add oneDNN takes only ReLU (or nothing).
std::pair<const char*, const char*> dnnl_activation(Activation act, bool residual) {
  switch (act) {
    case Activation::kNone: return {"none", ""};
    case Activation::kRelu: return {"relu", ""};
    case Activation::kGelu: return {residual ? nullptr : "gelu", "none"};
    case Activation::kGeluTanh: return {residual ? nullptr : "gelu", "tanh"};
    case Activation::kSilu: return {residual ? nullptr : "swish", ""};
    default: return {nullptr, ""};
  }
}

// NCHW: oneDNN computes in channels-last, and converting the input and output costs more
// than it saves unless the weight is at least as large as the output (deep layers at small
// batch, where ATen's per-call reorder of the weight dominates): measured on ResNet-18 shapes
// (benchmarks/NOTES.md).
bool dnnl_conv_usable(const at::Tensor& x, const at::Tensor& weight, Activation act, bool residual, bool save) {
  if (save || x.scalar_type() != at::kFloat || !dnnl_conv_ops().ok || !at::globalContext().userEnabledMkldnn() ||
      dnnl_activation(act, residual).first == nullptr) {
    return false;
  }
  if (x.suggest_memory_format() == at::MemoryFormat::ChannelsLast) return true;
  const int64_t out_channels_per_pixel = weight.size(0);
  const int64_t pixels = x.size(0) * x.size(2) * x.size(3);  // an upper bound of the output's
  return weight.numel() >= out_channels_per_pixel * pixels;
}

// What the packed format depends on: the input's sizes and the convolution's parameters.
WeightCache::Key conv_key(int64_t kind, const at::Tensor& x, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups, int64_t extra) {
  return {kind, x.size(0), x.size(2), x.size(3), stride[0], stride[1], padding[0], padding[1],
          dilation[0], dilation[1], groups, extra};
}
constexpr int64_t kConvKey = 2, kConvBnKey = 3;

int64_t eps_bits(double eps) {
  int64_t bits;
  std::memcpy(&bits, &eps, sizeof bits);
  return bits;
}

at::Tensor pack_conv_weight(const at::Tensor& weight, const at::Tensor& x, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  torch::jit::Stack stack{weight.contiguous(), c10::IValue(padding.vec()), c10::IValue(stride.vec()),
                          c10::IValue(dilation.vec()), c10::IValue(groups), c10::IValue(x.sizes().vec())};
  dnnl_conv_ops().reorder->callBoxed(&stack);
  return stack[0].toTensor();
}

// act(conv(x, weight) + bias (+ residual)) in one oneDNN call; weight plain or packed. The
// output takes x's memory format (oneDNN writes channels-last).
at::Tensor dnnl_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups, Activation act) {
  const auto [attr, algorithm] = dnnl_activation(act, residual.defined());
  const auto format = x.suggest_memory_format();
  const at::Tensor xc = x.contiguous(format);
  const c10::IValue b = bias ? c10::IValue(bias->contiguous()) : c10::IValue();
  torch::jit::Stack stack;
  if (residual.defined()) {
    stack = {xc, residual.contiguous(at::MemoryFormat::ChannelsLast), weight, b, c10::IValue(padding.vec()),
             c10::IValue(stride.vec()), c10::IValue(dilation.vec()), c10::IValue(groups), c10::IValue("add"),
             c10::IValue(), act == Activation::kNone ? c10::IValue() : c10::IValue(attr),
             c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    dnnl_conv_ops().binary->callBoxed(&stack);
  } else {
    stack = {xc, weight, b, c10::IValue(padding.vec()), c10::IValue(stride.vec()), c10::IValue(dilation.vec()),
             c10::IValue(groups), c10::IValue(attr), c10::List<std::optional<at::Scalar>>(),
             c10::IValue(algorithm)};
    dnnl_conv_ops().unary->callBoxed(&stack);
  }
  return stack[0].toTensor().contiguous(format);
}

// weight (and bias) with an eval-mode BatchNorm folded in: scale = gamma / sqrt(var + eps),
// weight · scale per output channel, bias · scale + beta - mean · scale. Float32 arithmetic.
std::pair<at::Tensor, at::Tensor> fold_batch_norm(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                  const std::optional<at::Tensor>& bn_weight,
                                                  const std::optional<at::Tensor>& bn_bias,
                                                  const at::Tensor& running_mean, const at::Tensor& running_var,
                                                  double eps) {
  at::Tensor scale = at::rsqrt(running_var.to(at::kFloat) + eps);
  if (bn_weight) scale = scale * bn_weight->to(at::kFloat);
  at::Tensor shift = -running_mean.to(at::kFloat) * scale;
  if (bn_bias) shift = shift + bn_bias->to(at::kFloat);
  if (bias) shift = shift + bias->to(at::kFloat) * scale;
  const at::Tensor folded = (weight * scale.to(weight.scalar_type()).view({-1, 1, 1, 1})).contiguous();
  return {folded, shift.to(weight.scalar_type())};
}

// ---- the ops --------------------------------------------------------------------------------

// cache_weight: keep the packed weight across calls (a parameter; not a weight made per call).
std::tuple<at::Tensor, at::Tensor> conv2d_act(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                              c10::string_view activation, bool save, bool cache_weight) {
  const char* op = "fuseformer conv2d_act";
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, op, ": x and weight must be 4-D (N, C, H, W) and (K, C/groups, R, S)");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype && (!bias || bias->scalar_type() == dtype) &&
                  (!residual || residual->scalar_type() == dtype),
              op, ": weight, bias and residual must have x's dtype ", dtype);
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()), op);
  if (dnnl_conv_usable(x, weight, act, residual.has_value(), save)) {
    check_residual_shape(op, residual, x, weight, stride, padding, dilation);
    const at::Tensor packed =
        cache_weight && WeightCache::cacheable(weight)
            ? WeightCache::get({weight}, conv_key(kConvKey, x, stride, padding, dilation, groups, 0), [&] {
                return std::vector<at::Tensor>{pack_conv_weight(weight, x, stride, padding, dilation, groups)};
              })[0]
            : weight.contiguous();
    return {dnnl_conv(x, packed, bias, residual ? *residual : at::Tensor(), stride, padding, dilation, groups, act),
            at::empty({0}, x.options())};
  }
  const auto format = x.suggest_memory_format();
  const bool half = dtype != at::kFloat;
  // Half dtypes: the bias inside the convolution (added to its float accumulator, rounded once,
  // as F.conv2d does); float32: in the pass.
  at::Tensor out = at::convolution(x, weight, half ? bias : std::nullopt, stride, padding, dilation, false, {0, 0},
                                   groups)
                       .contiguous(format);
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(!residual || residual->sizes() == out.sizes(), op, ": residual must have the output's shape ",
              out.sizes(), ", got ", residual->sizes());
  const at::Tensor res = residual ? residual->contiguous(format) : at::Tensor();
  const at::Tensor b = bias && !half ? bias->contiguous() : at::zeros({out.size(1)}, x.options().dtype(at::kFloat));
  at::Tensor saved = save ? empty_output_like(out) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fuseformer_conv2d_act", [&] {
    run_conv_epilogue<scalar_t>(act, out, b, res, saved, channels_last);
  });
  return {out, saved.defined() ? saved : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor> conv2d_act_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      const std::optional<at::Tensor>& residual,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, int64_t groups,
                                                      c10::string_view activation, bool save) {
  return conv2d_act(x, weight, bias, residual, stride, padding, dilation, groups, activation, save, true);
}

at::Tensor conv2d_bn_act_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                                 const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                                 const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                 c10::string_view activation) {
  const char* op = "fuseformer conv2d_bn_act";
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, op, ": x and weight must be 4-D (N, C, H, W) and (K, C/groups, R, S)");
  const int64_t k = weight.size(0);
  for (const auto* t : {&running_mean, &running_var}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == k, op, ": BatchNorm statistics must have shape [", k, "], got ",
                t->sizes());
  }
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()), op);
  const bool sources_cacheable = WeightCache::cacheable(weight) && (!bias || WeightCache::cacheable(*bias)) &&
                                 (!bn_weight || WeightCache::cacheable(*bn_weight)) &&
                                 (!bn_bias || WeightCache::cacheable(*bn_bias)) &&
                                 WeightCache::cacheable(running_mean) && WeightCache::cacheable(running_var);
  if (dnnl_conv_usable(x, weight, act, residual.has_value(), false) && sources_cacheable) {
    check_residual_shape(op, residual, x, weight, stride, padding, dilation);
    const auto derived = WeightCache::get(
        {weight, bias ? *bias : at::Tensor(), bn_weight ? *bn_weight : at::Tensor(), bn_bias ? *bn_bias : at::Tensor(),
         running_mean, running_var},
        conv_key(kConvBnKey, x, stride, padding, dilation, groups, eps_bits(eps)), [&] {
          auto [w, b] = fold_batch_norm(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps);
          return std::vector<at::Tensor>{pack_conv_weight(w, x, stride, padding, dilation, groups), b};
        });
    return dnnl_conv(x, derived[0], derived[1], residual ? *residual : at::Tensor(), stride, padding, dilation, groups,
                     act);
  }
  auto [w, b] = fold_batch_norm(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps);
  return std::get<0>(conv2d_act(x, w, b, residual, stride, padding, dilation, groups, activation, false, false));
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, CPU, m) {
  m.impl("conv2d_act_fwd", &conv2d_act_fwd_cpu);
  m.impl("conv2d_bn_act_fwd", &conv2d_bn_act_fwd_cpu);
}

}  // namespace fuseformer::cpu
