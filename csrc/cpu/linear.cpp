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
#include "activation.h"
#include "gemm.h"
#include "vectorize.h"

namespace fuseformer::cpu {
namespace {

using linear::Activation;

// Columns converted and processed at a time: a few rows of L1.
constexpr int64_t kBlock = 1024;

// The loops below are templated on everything that would otherwise be a branch per element,
// and their pointers are restrict, so each compiles to straight vector code.

// Plain: z holds the GEMM result and receives act(z + b); s receives act'(z + b).
template <Activation A, bool kBias, bool kSave>
__attribute__((always_inline)) inline void plain_loop(float* __restrict z, float* __restrict s,
                                                      const float* __restrict b, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float a, d;
    act_and_grad<A>(z[j] + (kBias ? b[j] : 0.0f), a, d);
    z[j] = a;
    if constexpr (kSave) s[j] = d;
  }
}

// Gated: z holds the gate GEMM and receives the output; us holds the up GEMM and receives
// act(zg) (when saving; it is read first, element by element); s2 receives zu·act'(zg).
template <Activation A, bool kBias, bool kSave>
__attribute__((always_inline)) inline void gated_loop(float* __restrict z, float* __restrict us,
                                                      const float* __restrict b, const float* __restrict bu,
                                                      float* __restrict s2, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float a, d;
    act_and_grad<A>(z[j] + (kBias ? b[j] : 0.0f), a, d);
    const float up = us[j] + (kBias ? bu[j] : 0.0f);
    z[j] = a * up;
    if constexpr (kSave) {
      us[j] = a;
      s2[j] = up * d;
    }
  }
}

template <Activation A>
__attribute__((always_inline)) inline void epilogue_for(bool gated, bool bias, bool save, float* z, float* us,
                                                        const float* b, const float* bu, float* s2, int64_t n) {
  if (gated) {
    if (bias) {
      save ? gated_loop<A, true, true>(z, us, b, bu, s2, n) : gated_loop<A, true, false>(z, us, b, bu, s2, n);
    } else {
      save ? gated_loop<A, false, true>(z, us, b, bu, s2, n) : gated_loop<A, false, false>(z, us, b, bu, s2, n);
    }
  } else if (bias) {
    save ? plain_loop<A, true, true>(z, us, b, n) : plain_loop<A, true, false>(z, us, b, n);
  } else {
    save ? plain_loop<A, false, true>(z, us, b, n) : plain_loop<A, false, false>(z, us, b, n);
  }
}

// One block of a row. Plain: us is the act' output. Gated: us is the up GEMM (in) and act(zg)
// (out). b and bu are both given or both null (a missing one is zeros).
FF_VECTORIZE void epilogue(Activation act, bool gated, bool save, float* z, float* us, const float* b,
                           const float* bu, float* s2, int64_t n) {
  const bool bias = b != nullptr;
  switch (act) {
    case Activation::kNone: return epilogue_for<Activation::kNone>(gated, bias, save, z, us, b, bu, s2, n);
    case Activation::kRelu: return epilogue_for<Activation::kRelu>(gated, bias, save, z, us, b, bu, s2, n);
    case Activation::kGelu: return epilogue_for<Activation::kGelu>(gated, bias, save, z, us, b, bu, s2, n);
    case Activation::kGeluTanh: return epilogue_for<Activation::kGeluTanh>(gated, bias, save, z, us, b, bu, s2, n);
    case Activation::kSilu: return epilogue_for<Activation::kSilu>(gated, bias, save, z, us, b, bu, s2, n);
    case Activation::kRelu2: return epilogue_for<Activation::kRelu2>(gated, bias, save, z, us, b, bu, s2, n);
  }
}

// dz = g·f (no factor: dz = g), and sum += dz.
template <bool kFactor, bool kSum>
__attribute__((always_inline)) inline void grad_loop(const float* __restrict g, const float* __restrict f,
                                                     float* __restrict dz, float* __restrict sum, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = kFactor ? g[j] * f[j] : g[j];
    dz[j] = v;
    if constexpr (kSum) sum[j] += v;
  }
}

FF_VECTORIZE void grad_block(const float* g, const float* f, float* dz, float* sum, int64_t n) {
  if (f) {
    sum ? grad_loop<true, true>(g, f, dz, sum, n) : grad_loop<true, false>(g, f, dz, sum, n);
  } else {
    sum ? grad_loop<false, true>(g, f, dz, sum, n) : grad_loop<false, false>(g, f, dz, sum, n);
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
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const int64_t m = out.size(0), n = out.size(1);
  const bool gated = up.defined();
  const float* b = float_ptr(bias);
  const float* bu = float_ptr(bias_up);
  scalar_t* out_data = out.data_ptr<scalar_t>();
  // Gated: the up GEMM's result; it is `saved` itself when saving (overwritten in place).
  scalar_t* us_data = gated ? up.data_ptr<scalar_t>() : (saved.defined() ? saved.data_ptr<scalar_t>() : nullptr);
  scalar_t* s_data = saved.defined() ? saved.data_ptr<scalar_t>() : nullptr;
  scalar_t* s2_data = saved2.defined() ? saved2.data_ptr<scalar_t>() : nullptr;
  const bool save = s_data != nullptr;
  // Rows of at least ~16K elements per task: the pass is memory-bound.
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(n, 1));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kFloat ? 0 : 3 * kBlock);
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
        const int64_t len = std::min(kBlock, n - j0);
        const int64_t at_ = i * n + j0;
        float *z, *us, *s2;
        if constexpr (kFloat) {  // in place on the tensors
          z = out_data + at_;
          us = us_data ? us_data + at_ : nullptr;
          s2 = s2_data ? s2_data + at_ : nullptr;
        } else {
          z = buf.data();
          us = z + kBlock;
          s2 = us + kBlock;
          as_float(out_data + at_, z, len);
          if (gated) as_float(us_data + at_, us, len);
        }
        epilogue(act, gated, save, z, us, b ? b + j0 : nullptr, bu ? bu + j0 : nullptr, s2, len);
        if constexpr (!kFloat) {
          store(out_data + at_, z, len);
          if (save) store(s_data + at_, us, len);
          if (s2_data) store(s2_data + at_, s2, len);
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
  if (x.dim() != 2) {
    return linear::fwd_on_rows(x, [&](const at::Tensor& rows) {
      return linear_fwd_cpu(rows, weight, weight_up, bias, bias_up, activation, save);
    });
  }
  linear::check_fwd_args(x, weight, weight_up, bias, bias_up);
  const Activation act = linear::parse_activation(std::string_view(activation.data(), activation.size()));
  const bool gated = weight_up.has_value();
  // Outputs never alias one another (custom-op rule): a fresh empty tensor for each absent one.
  auto empty = [&] { return at::empty({0}, x.options()); };
  // The GEMMs: float32 through oneDNN with the weight packed once and kept across calls
  // (csrc/cpu/gemm.h: 2-3x ATen's MKL on the AMD CPUs of our machines); other dtypes ATen.
  const int64_t rows = x.size(0);
  if (!gated && act == Activation::kNone) {
    // Nothing to fuse: the bias goes into the GEMM.
    return {PackedLinear(weight, rows, /*cached=*/true)(x, std::nullopt, bias), empty(), empty()};
  }
  // Half dtypes: the biases go into the GEMM (added to the float accumulator, rounded once, as
  // F.linear does), so ReLU-like activations see the sign PyTorch sees; adding them to the
  // rounded product would flip the activation of pre-activations within a rounding of zero.
  // Float32: the epilogue adds them (addmm would first copy the bias into every row).
  const bool half = x.scalar_type() != at::kFloat;
  auto project = [&](const at::Tensor& w, const std::optional<at::Tensor>& b) {
    return PackedLinear(w, rows, /*cached=*/true)(x, std::nullopt, half ? b : std::nullopt);
  };
  at::Tensor out = project(weight, bias);
  // Gated: the up projection doubles as `saved` when that is kept; the epilogue reads each
  // element before it overwrites it with act(zg).
  at::Tensor up = gated ? project(*weight_up, bias_up) : at::Tensor();
  at::Tensor saved = save ? (gated ? up : at::empty_like(out)) : at::Tensor();
  at::Tensor saved2 = save && gated ? at::empty_like(out) : at::Tensor();
  // Float biases for the epilogue; a gated layer with one bias gets zeros for the other.
  at::Tensor b, bu;
  if (!half && (bias || bias_up)) {
    const auto f32 = x.options().dtype(at::kFloat);
    b = bias ? bias->contiguous() : at::zeros({weight.size(0)}, f32);
    if (gated) bu = bias_up ? bias_up->contiguous() : at::zeros({weight.size(0)}, f32);
  }
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
  if (x.dim() != 2) {
    return linear::bwd_on_rows(grad_out, x, saved, saved2, [&](const at::Tensor& g, const at::Tensor& rows,
                                                               const at::Tensor& s, const at::Tensor& s2) {
      return linear_bwd_cpu(g, rows, weight, weight_up, s, s2, activation, has_bias, has_bias_up, needs_input_grad,
                            needs_weight_grad);
    });
  }
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
    // dX = dZ W through oneDNN with Wᵀ packed once per weight version (a training step packs
    // each weight twice: W for the forward, Wᵀ here).
    grad_x = PackedLinear::transposed(weight, d.m, /*cached=*/true)(dzs[0]);
    if (gated) grad_x.add_(PackedLinear::transposed(*weight_up, d.m, /*cached=*/true)(dzs[1]));
  }
  at::Tensor grad_w = empty(), grad_w2 = empty();
  if (needs_weight_grad) {
    grad_w = PackedLinear::weight_grad(dzs[0], x);
    if (gated) grad_w2 = PackedLinear::weight_grad(dzs[1], x);
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
