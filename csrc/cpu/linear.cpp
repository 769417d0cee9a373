// GEMM + bias + activation (and the gated form) on the CPU, forward and backward.
//
// The GEMMs go through ATen (MKL / oneDNN / OpenBLAS underneath); everything elementwise is
// one parallel, vectorized pass over the output rows:
//   forward   out = act(z + b)              saved = act'(z + b)
//   gated     out = act(zg + bg)·(zu + bu)  saved = act(zg + bg), saved2 = (zu + bu)·act'(zg + bg)
//   backward  dz = g·saved (gated: dzu = g·saved, dzg = g·saved2), the bias gradients
//             summed in the same pass, then dX = dz W and dW = dzᵀ X as GEMMs.
// Eager PyTorch makes two passes in the forward (addmm's bias copy, then the activation) and
// recomputes the activation's derivative in the backward; saving the derivative makes the
// backward's elementwise work one multiply (kernels/linear.py does the same on the GPU).
// Elementwise math is float32 whatever the dtype; half rows are converted in blocks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "linear.h"
#include "math.h"
#include "vectorize.h"

namespace fuseformer::cpu {
namespace {

using linear::Activation;

constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhC = 0.044715f;
// Columns converted and processed at a time: a few rows of L1.
constexpr int64_t kBlock = 1024;

// a = act(z), d = act'(z).
template <Activation A>
__attribute__((always_inline)) inline void act_and_grad(float z, float& a, float& d) {
  if constexpr (A == Activation::kRelu) {
    a = z > 0 ? z : 0.0f;
    d = z > 0 ? 1.0f : 0.0f;
  } else if constexpr (A == Activation::kGelu) {
    const float cdf = 0.5f * erfc_f32(-z * kSqrt1_2);
    a = z * cdf;
    d = cdf + z * kInvSqrt2Pi * exp_f32(-0.5f * z * z);
  } else if constexpr (A == Activation::kGeluTanh) {
    const float t = tanh_f32(kSqrt2OverPi * (z + kGeluTanhC * z * z * z));
    a = 0.5f * z * (1.0f + t);
    d = 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhC * z * z);
  } else if constexpr (A == Activation::kSilu) {
    const float s = sigmoid_f32(z);
    a = z * s;
    d = s * (1.0f + z * (1.0f - s));
  } else if constexpr (A == Activation::kRelu2) {
    const float r = z > 0 ? z : 0.0f;
    a = r * r;
    d = 2.0f * r;
  } else {
    a = z;
    d = 1.0f;
  }
}

// One block of a row. z: the GEMM result (gated: of the gate), overwritten with the output;
// u: the up GEMM's result (gated only); s, s2: what the backward reads (null: not saved).
template <Activation A>
__attribute__((always_inline)) inline void epilogue_block(float* z, const float* u, const float* b, const float* bu,
                                                          float* s, float* s2, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float a, d;
    act_and_grad<A>(z[j] + (b ? b[j] : 0.0f), a, d);
    if (u) {
      const float up = u[j] + (bu ? bu[j] : 0.0f);
      z[j] = a * up;
      if (s) {
        s[j] = a;
        s2[j] = up * d;
      }
    } else {
      z[j] = a;
      if (s) s[j] = d;
    }
  }
}

FF_VECTORIZE void epilogue(Activation act, float* z, const float* u, const float* b, const float* bu, float* s,
                           float* s2, int64_t n) {
  switch (act) {
    case Activation::kNone: return epilogue_block<Activation::kNone>(z, u, b, bu, s, s2, n);
    case Activation::kRelu: return epilogue_block<Activation::kRelu>(z, u, b, bu, s, s2, n);
    case Activation::kGelu: return epilogue_block<Activation::kGelu>(z, u, b, bu, s, s2, n);
    case Activation::kGeluTanh: return epilogue_block<Activation::kGeluTanh>(z, u, b, bu, s, s2, n);
    case Activation::kSilu: return epilogue_block<Activation::kSilu>(z, u, b, bu, s, s2, n);
    case Activation::kRelu2: return epilogue_block<Activation::kRelu2>(z, u, b, bu, s, s2, n);
  }
}

// dz = g·f (f null: dz = g), bias_sum += dz.
FF_VECTORIZE void grad_block(const float* g, const float* f, float* dz, float* bias_sum, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = f ? g[j] * f[j] : g[j];
    dz[j] = v;
    if (bias_sum) bias_sum[j] += v;
  }
}

// A row segment as float: the row itself for float32, else converted into `buffer`.
template <typename scalar_t>
const float* as_float(const scalar_t* src, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) buffer[j] = static_cast<float>(src[j]);
    return buffer;
  }
}

template <typename scalar_t>
void store(scalar_t* dst, const float* src, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (dst != src) std::memcpy(dst, src, n * sizeof(float));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
  }
}

const float* float_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// ---- forward ------------------------------------------------------------------------------

template <typename scalar_t>
void run_epilogue(Activation act, at::Tensor& out, const at::Tensor& up, const at::Tensor& bias,
                  const at::Tensor& bias_up, at::Tensor& saved, at::Tensor& saved2) {
  const int64_t m = out.size(0), n = out.size(1);
  const float* b = float_ptr(bias);
  const float* bu = float_ptr(bias_up);
  scalar_t* out_data = out.data_ptr<scalar_t>();
  const scalar_t* up_data = up.defined() ? up.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* s_data = saved.defined() ? saved.data_ptr<scalar_t>() : nullptr;
  scalar_t* s2_data = saved2.defined() ? saved2.data_ptr<scalar_t>() : nullptr;
  // Rows of at least ~16K elements per task: the pass is memory-bound.
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(n, 1));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(4 * kBlock);
    float *z = buf.data(), *u = z + kBlock, *s = u + kBlock, *s2 = s + kBlock;
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
        const int64_t len = std::min(kBlock, n - j0);
        const int64_t at_ = i * n + j0;
        float* zr;
        if constexpr (std::is_same_v<scalar_t, float>) {
          zr = out_data + at_;  // in place
        } else {
          zr = z;
          as_float(out_data + at_, z, len);
        }
        const float* ur = up_data ? as_float(up_data + at_, u, len) : nullptr;
        float* sr = nullptr;
        float* s2r = nullptr;
        if (s_data) {
          if constexpr (std::is_same_v<scalar_t, float>) {
            sr = s_data + at_;
            s2r = s2_data ? s2_data + at_ : nullptr;
          } else {
            sr = s;
            s2r = s2;
          }
        }
        epilogue(act, zr, ur, b ? b + j0 : nullptr, bu ? bu + j0 : nullptr, sr, s2r, len);
        if constexpr (!std::is_same_v<scalar_t, float>) {
          store(out_data + at_, zr, len);
          if (s_data) store(s_data + at_, sr, len);
          if (s2_data) store(s2_data + at_, s2r, len);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& weight_up,
                                                               const std::optional<at::Tensor>& bias,
                                                               const std::optional<at::Tensor>& bias_up,
                                                               c10::string_view activation, bool save) {
  linear::check_fwd_args(x, weight, weight_up, bias, bias_up);
  const Activation act = linear::parse_activation(std::string_view(activation.data(), activation.size()));
  const bool gated = weight_up.has_value();
  // Outputs never alias one another (custom-op rule): a fresh empty tensor for each absent one.
  auto empty = [&] { return at::empty({0}, x.options()); };
  if (!gated && act == Activation::kNone) {
    // Nothing to fuse: addmm already folds the bias into the GEMM.
    return {bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t()), empty(), empty()};
  }
  // Half dtypes: the bias goes into the GEMM (added to the float accumulator, rounded once, as
  // F.linear does), so ReLU-like activations see the sign PyTorch sees; adding it to the
  // rounded product would flip the activation of pre-activations within a rounding of zero.
  const bool bias_in_gemm = bias.has_value() && x.scalar_type() != at::kFloat;
  at::Tensor out = bias_in_gemm ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  at::Tensor saved = save ? at::empty_like(out) : at::Tensor();
  at::Tensor saved2 = save && gated ? at::empty_like(out) : at::Tensor();
  at::Tensor up;
  if (gated) {
    // The up projection lands in `saved` when that is kept: the epilogue reads each element
    // before it overwrites it with act(zg).
    if (bias_up.has_value() && bias_in_gemm) {
      up = save ? at::addmm_out(saved, *bias_up, x, weight_up->t()) : at::addmm(*bias_up, x, weight_up->t());
    } else {
      up = save ? at::mm_out(saved, x, weight_up->t()) : at::mm(x, weight_up->t());
    }
  }
  const at::Tensor b = bias && !bias_in_gemm ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor bu = bias_up && !bias_in_gemm ? bias_up->to(at::kFloat).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fuseformer_linear_fwd", [&] {
    run_epilogue<scalar_t>(act, out, up, b, bu, saved, saved2);
  });
  return {out, saved.defined() ? saved : empty(), saved2.defined() ? saved2 : empty()};
}

// ---- backward -----------------------------------------------------------------------------

// dz = g·factor for each factor (none: dz = g), written to the matching dz tensor, and the
// column sums of each dz added into its float32 bias-gradient row (when requested).
template <typename scalar_t>
void run_grad_pass(const at::Tensor& grad_out, const std::vector<at::Tensor>& factors, std::vector<at::Tensor>& dzs,
                   std::vector<at::Tensor>& bias_grads) {
  const int64_t m = grad_out.size(0), n = grad_out.size(1);
  const int64_t outs = static_cast<int64_t>(dzs.size());
  const scalar_t* g_data = grad_out.const_data_ptr<scalar_t>();
  // Rows are split into one chunk per thread; each keeps its own bias partial sums, added
  // up afterwards in chunk order (deterministic for a given thread count).
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), m));
  std::vector<float> partial(static_cast<size_t>(chunks * outs * n), 0.0f);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> buf(3 * kBlock);
    float *g = buf.data(), *f = g + kBlock, *dz = f + kBlock;
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t i = c * m / chunks; i < (c + 1) * m / chunks; ++i) {
        for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
          const int64_t len = std::min(kBlock, n - j0);
          const int64_t at_ = i * n + j0;
          const float* gr = as_float(g_data + at_, g, len);
          for (int64_t o = 0; o < outs; ++o) {
            const float* fr = factors[o].defined() ? as_float(factors[o].const_data_ptr<scalar_t>() + at_, f, len)
                                                   : nullptr;
            float* sum = bias_grads[o].defined() ? partial.data() + (c * outs + o) * n + j0 : nullptr;
            scalar_t* dz_out = dzs[o].defined() ? dzs[o].data_ptr<scalar_t>() + at_ : nullptr;
            float* dzr = dz;
            if constexpr (std::is_same_v<scalar_t, float>) {
              if (dz_out) dzr = dz_out;
            }
            grad_block(gr, fr, dzr, sum, len);
            if (dz_out) store(dz_out, dzr, len);
          }
        }
      }
    }
  });
  for (int64_t o = 0; o < outs; ++o) {
    if (!bias_grads[o].defined()) continue;
    float* db = bias_grads[o].data_ptr<float>();
    std::fill(db, db + n, 0.0f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* p = partial.data() + (c * outs + o) * n;
      for (int64_t j = 0; j < n; ++j) db[j] += p[j];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& weight_up, const at::Tensor& saved, const at::Tensor& saved2,
    c10::string_view activation, bool has_bias, bool has_bias_up, bool needs_input_grad, bool needs_weight_grad) {
  const auto d = linear::check_fwd_args(x, weight, weight_up, std::nullopt, std::nullopt);
  const Activation act = linear::parse_activation(std::string_view(activation.data(), activation.size()));
  const bool gated = weight_up.has_value();
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({d.m, d.n}) && grad_out.scalar_type() == x.scalar_type(),
              "fuseformer linear: grad_out must be (", d.m, ", ", d.n, ") ", x.scalar_type());
  const bool has_factor = gated || act != Activation::kNone;
  if (has_factor) {
    TORCH_CHECK(saved.sizes() == grad_out.sizes() && (!gated || saved2.sizes() == grad_out.sizes()),
                "fuseformer linear: the saved activation gradients must be (", d.m, ", ", d.n,
                "): run the forward with save=True");
  }
  auto empty = [&] { return at::empty({0}, x.options()); };
  const at::Tensor g = grad_out.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);

  // dz per weight (gate first), with the bias gradients when the weights need gradients.
  std::vector<at::Tensor> factors, dzs, bias_grads;
  if (gated) {
    factors = {saved2.contiguous(), saved.contiguous()};
  } else {
    factors = {has_factor ? saved.contiguous() : at::Tensor()};
  }
  const std::vector<bool> has_b = gated ? std::vector<bool>{has_bias, has_bias_up} : std::vector<bool>{has_bias};
  for (size_t o = 0; o < factors.size(); ++o) {
    dzs.push_back(has_factor ? at::empty_like(g) : at::Tensor());
    bias_grads.push_back(needs_weight_grad && has_b[o] ? at::empty({d.n}, f32) : at::Tensor());
  }
  const bool any_bias = std::any_of(bias_grads.begin(), bias_grads.end(), [](const at::Tensor& t) { return t.defined(); });
  if (has_factor || any_bias) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fuseformer_linear_bwd", [&] {
      run_grad_pass<scalar_t>(g, factors, dzs, bias_grads);
    });
  }
  if (!has_factor) dzs[0] = g;

  at::Tensor grad_x = empty();
  if (needs_input_grad) {
    grad_x = at::mm(dzs[0], weight);
    if (gated) grad_x.addmm_(dzs[1], *weight_up);
  }
  at::Tensor grad_w = empty(), grad_w2 = empty();
  if (needs_weight_grad) {
    grad_w = at::mm(dzs[0].t(), x);
    if (gated) grad_w2 = at::mm(dzs[1].t(), x);
  }
  auto bias_out = [&](size_t o) { return o < bias_grads.size() && bias_grads[o].defined() ? bias_grads[o] : empty(); };
  return {grad_x, grad_w, grad_w2, bias_out(0), bias_out(1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, CPU, m) {
  m.impl("linear_fwd", &linear_fwd_cpu);
  m.impl("linear_bwd", &linear_bwd_cpu);
}

}  // namespace fuseformer::cpu
