// Convolution + bias (+ residual) + activation on the CPU: ATen's convolution (oneDNN), then
// one vectorized, parallel pass over its output that adds the bias and the residual, applies
// the activation and, for training, writes act' (what the backward multiplies into dz), as
// csrc/cpu/linear.cpp does for the GEMM. Both layouts: NCHW (a channel's plane shares one bias
// value) and channels-last (a pixel's channels read the bias vector).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "activation.h"
#include "vectorize.h"

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

std::tuple<at::Tensor, at::Tensor> conv2d_act_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      const std::optional<at::Tensor>& residual,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, int64_t groups,
                                                      c10::string_view activation, bool save) {
  const char* op = "fuseformer conv2d_act";
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, op, ": x and weight must be 4-D (N, C, H, W) and (K, C/groups, R, S)");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype && (!bias || bias->scalar_type() == dtype) &&
                  (!residual || residual->scalar_type() == dtype),
              op, ": weight, bias and residual must have x's dtype ", dtype);
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()), op);
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
  at::Tensor saved = save ? at::empty_like(out) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fuseformer_conv2d_act", [&] {
    run_conv_epilogue<scalar_t>(act, out, b, res, saved, channels_last);
  });
  return {out, saved.defined() ? saved : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, CPU, m) { m.impl("conv2d_act_fwd", &conv2d_act_fwd_cpu); }

}  // namespace fuseformer::cpu
