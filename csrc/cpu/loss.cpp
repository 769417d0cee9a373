// Linear + cross-entropy on the CPU: F.cross_entropy(F.linear(x, W, b), target) and, in the
// same call, its gradients, without the (M, V) logits ever existing whole.
//
// Rows go through in chunks. z = x_c Wᵀ + b (c, V) is the linear kernels' GEMM (gemm.h:
// oneDNN with the weight packed once, kept across calls); one parallel pass per row then
// takes the log-sum-exp and the row's loss and overwrites z with the loss's gradient
//   dz = (softmax(z) - (1 - ε)·onehot(t) - ε/V) · scale     (scale: 1/n_valid for "mean", 1 for "sum")
// and the chunk's gradients are GEMMs: dX_c = dz W, dW += dzᵀ x_c, db += Σ_rows dz. Taking the
// gradients in the forward is what lets a chunk's logits die before the next chunk's: the
// backward only scales them by the upstream gradient (python/fuseformer/ops/loss.py). Eager
// PyTorch keeps the (M, V) logits, their log-softmax and, in the backward, their gradient.
//
// A softcap (Gemma 2's head: logits c·tanh(z/c)) is applied in the row pass, its derivative
// 1 - tanh² kept in a row buffer for the gradient.
//
// Half inputs: the GEMMs run in x's dtype (as F.linear's do), the row pass in float32, the
// weight gradient accumulates over the chunks in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "../allocate.h"
#include "gemm.h"
#include "math.h"
#include "softmax.h"
#include "vectorize.h"

namespace fuseformer::cpu {
namespace {

using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Rows per chunk when the caller leaves it to us: the chunk's logits in at most
// kChunkLogitBytes (float32), and at least kMinChunkRows rows, below which the GEMMs lose
// efficiency (oneDNN's packed GEMM is at its best from 64 rows: gemm.h).
constexpr int64_t kChunkLogitBytes = int64_t{32} << 20;
constexpr int64_t kMinChunkRows = 64;

int64_t auto_chunk_rows(int64_t rows, int64_t vocab) {
  const int64_t fit = kChunkLogitBytes / (vocab * static_cast<int64_t>(sizeof(float)));
  return std::min(rows, std::max(kMinChunkRows, fit / 16 * 16));
}

struct RowOptions {
  int64_t vocab;
  int64_t ignore_index;
  float smoothing;
  float softcap;  // 0: none
  float scale;    // of the gradient
  bool grad;
};

// z <- c·tanh(z / c), t <- tanh(z / c) (the backward's 1 - t²).
FF_VECTORIZE void softcap_row(float* __restrict z, float* __restrict t, int64_t n, float cap) {
  const float inv_cap = 1.0f / cap;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    t[j] = tanh_f32(z[j] * inv_cap);
    z[j] = cap * t[j];
  }
}

// dz <- dz' · (1 - t²): the gradient through the softcap.
FF_VECTORIZE void softcap_grad_row(float* __restrict g, const float* __restrict t, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) g[j] *= 1.0f - t[j] * t[j];
}

// One row of float32 logits, in place: returns the row's loss; z receives its gradient when
// o.grad. Ignored rows have loss and gradient 0. tanh_buffer: V floats when o.softcap > 0.
float cross_entropy_row(float* z, int64_t target, const RowOptions& o, float* tanh_buffer) {
  if (target == o.ignore_index) {
    if (o.grad) std::fill(z, z + o.vocab, 0.0f);
    return 0.0f;
  }
  if (o.softcap > 0) softcap_row(z, tanh_buffer, o.vocab, o.softcap);
  const float z_target = z[target];
  // Label smoothing's loss adds ε/V·Σ_j (lse - z_j): it needs Σ_j z_j before z is overwritten.
  const float z_sum = o.smoothing > 0 ? row_sum(z, o.vocab) : 0.0f;
  const float m = row_max(z, o.vocab);
  const float sum = exp_shifted_sum(z, o.vocab, 1.0f, m);  // z <- exp(z - m)
  const float lse = m + std::log(sum);
  const float smooth_share = o.smoothing / static_cast<float>(o.vocab);
  if (o.grad) {
    affine_row(z, o.vocab, o.scale / sum, -smooth_share * o.scale);
    z[target] -= (1.0f - o.smoothing) * o.scale;
    if (o.softcap > 0) softcap_grad_row(z, tanh_buffer, o.vocab);
  }
  return lse - (1.0f - o.smoothing) * z_target - smooth_share * z_sum;
}

// The loss pass over a chunk's logits (c, V) in x's dtype, in parallel over rows; losses (c,).
void cross_entropy_rows(at::Tensor& z, const int64_t* targets, float* losses, const RowOptions& o) {
  const int64_t rows = z.size(0);
  if (z.scalar_type() == at::kFloat) {
    float* base = z.data_ptr<float>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> tanh_buffer(o.softcap > 0 ? o.vocab : 0);
      for (int64_t r = begin; r < end; ++r) {
        losses[r] = cross_entropy_row(base + r * o.vocab, targets[r], o, tanh_buffer.data());
      }
    });
    return;
  }
  // Half logits: each row through a float32 buffer, the gradient rounded back into it.
  AT_DISPATCH_REDUCED_FLOATING_TYPES(z.scalar_type(), "linear_cross_entropy", [&] {
    scalar_t* base = z.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(o.vocab), tanh_buffer(o.softcap > 0 ? o.vocab : 0);
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* row = base + r * o.vocab;
        std::copy(row, row + o.vocab, buffer.begin());
        losses[r] = cross_entropy_row(buffer.data(), targets[r], o, tanh_buffer.data());
        if (o.grad) std::copy(buffer.begin(), buffer.end(), row);
      }
    });
  });
}

// The rows that count (target != ignore_index); every other target must be a class index.
int64_t count_targets(const at::Tensor& target, int64_t vocab, int64_t ignore_index) {
  const int64_t* t = target.data_ptr<int64_t>();
  int64_t counted = 0;
  for (int64_t i = 0; i < target.numel(); ++i) {
    if (t[i] == ignore_index) continue;
    TORCH_CHECK_INDEX(t[i] >= 0 && t[i] < vocab, "fuseformer linear_cross_entropy: target[", i, "] = ", t[i],
                      " is not a class index in [0, ", vocab, ") nor ignore_index (", ignore_index, ")");
    ++counted;
  }
  return counted;
}

Tensor4 linear_cross_entropy_fwd(const at::Tensor& x_, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& target_, int64_t ignore_index, double label_smoothing,
                                 double softcap, bool mean, int64_t chunk_rows, bool needs_input_grad,
                                 bool needs_weight_grad) {
  const auto dtype = x_.scalar_type();
  TORCH_CHECK(x_.dim() == 2, "fuseformer linear_cross_entropy: x must be 2-D (M, C), got ", x_.dim(), " dimensions");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "fuseformer linear_cross_entropy: x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x_.size(1) && weight.scalar_type() == dtype,
              "fuseformer linear_cross_entropy: weight must be (V, ", x_.size(1), ") of x's dtype, got ",
              weight.sizes(), " ", weight.scalar_type());
  const int64_t m = x_.size(0), vocab = weight.size(0);
  TORCH_CHECK(vocab > 0, "fuseformer linear_cross_entropy: weight must have at least one row (class)");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == vocab && bias->scalar_type() == dtype),
              "fuseformer linear_cross_entropy: bias must be (", vocab, ") of x's dtype");
  TORCH_CHECK(target_.dim() == 1 && target_.size(0) == m && target_.scalar_type() == at::kLong,
              "fuseformer linear_cross_entropy: target must be int64 (", m, "), got ", target_.sizes(), " ",
              target_.scalar_type());
  const at::Tensor x = x_.contiguous();
  const at::Tensor target = target_.contiguous();
  const int64_t counted = count_targets(target, vocab, ignore_index);
  const bool grad = needs_input_grad || needs_weight_grad;
  TORCH_CHECK(softcap >= 0, "fuseformer linear_cross_entropy: softcap must be >= 0 (0: none), got ", softcap);
  const RowOptions o{vocab, ignore_index, static_cast<float>(label_smoothing), static_cast<float>(softcap),
                     mean ? 1.0f / static_cast<float>(counted) : 1.0f, grad};

  const int64_t rows = chunk_rows > 0 ? std::min(chunk_rows, m) : auto_chunk_rows(m, vocab);
  const PackedLinear logits_of(weight, rows, /*cached=*/true);
  const std::optional<PackedLinear> input_grad_of =
      needs_input_grad ? std::optional(PackedLinear::transposed(weight, rows, /*cached=*/true)) : std::nullopt;
  const auto float_opts = x.options().dtype(at::kFloat);
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_x = needs_input_grad ? empty_output({m, x.size(1)}, x.options()) : empty();
  at::Tensor grad_w = needs_weight_grad ? at::zeros(weight.sizes(), float_opts) : empty();
  at::Tensor grad_b = needs_weight_grad && bias ? at::zeros({vocab}, float_opts) : empty();
  at::Tensor losses = at::empty({m}, float_opts);

  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t c = std::min(rows, m - r0);
    const at::Tensor xc = x.narrow(0, r0, c);
    at::Tensor z = logits_of(xc, std::nullopt, bias).contiguous();
    cross_entropy_rows(z, target.data_ptr<int64_t>() + r0, losses.data_ptr<float>() + r0, o);
    if (!grad) continue;
    if (needs_input_grad) grad_x.narrow(0, r0, c).copy_((*input_grad_of)(z));
    if (needs_weight_grad) {
      if (dtype == at::kFloat) {
        PackedLinear::weight_grad_into(grad_w, z, xc);
      } else {
        grad_w.add_(at::mm(z.t(), xc));
      }
      if (bias) grad_b.add_(z.sum(0, /*keepdim=*/false, at::kFloat));
    }
  }
  // float64 over the rows, as PyTorch's reduction keeps the loss of 10^5 rows accurate.
  const double total = losses.sum(at::kDouble).item<double>();
  const at::Tensor loss = at::scalar_tensor(mean ? total / static_cast<double>(counted) : total, float_opts);
  if (needs_weight_grad && dtype != at::kFloat) grad_w = grad_w.to(dtype);
  return {loss, grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, CPU, m) { m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd); }

}  // namespace fuseformer::cpu
