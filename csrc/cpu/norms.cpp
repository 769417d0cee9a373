// LayerNorm / RMSNorm on the CPU: rows in parallel (at::parallel_for), each row converted to
// a float32 scratch buffer once, then reduced and normalized by float-only loops that the
// compiler vectorizes for AVX-512 / AVX2 / baseline, picked at load time (target_clones).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "norms.h"
#include "vectorize.h"

namespace fuseformer::cpu {
namespace {

// ---- float-only row loops (vectorized) ---------------------------------------------------
// Sums run over blocks of kSumBlock floats (vector lanes, float) and add the block sums in
// double: a single float chain over a 2^20-element row loses ~3 more digits than PyTorch.

constexpr int64_t kSumBlock = 2048;

FF_VECTORIZE float block_sum(const float* x, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

FF_VECTORIZE float block_sum_sq(const float* x, int64_t n, float shift) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += (x[i] - shift) * (x[i] - shift);
  return s;
}

float row_sum(const float* x, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; i += kSumBlock) total += block_sum(x + i, std::min(kSumBlock, n - i));
  return static_cast<float>(total);
}

// sum((x - shift)^2): variance around the mean (two-pass, no cancellation) or the plain
// sum of squares for RMSNorm (shift = 0).
float row_sum_sq(const float* x, int64_t n, float shift) {
  double total = 0.0;
  for (int64_t i = 0; i < n; i += kSumBlock) total += block_sum_sq(x + i, std::min(kSumBlock, n - i), shift);
  return static_cast<float>(total);
}

FF_VECTORIZE void row_normalize(const float* x, int64_t n, float mean, float rstd,
                                const float* w, const float* b, float* y) {
  if (w && b) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd * w[i] + b[i];
  } else if (w) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd * w[i];
  } else if (b) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd + b[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd;
  }
}

FF_VECTORIZE void row_add(const float* __restrict a, const float* __restrict b, float* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

// Returns sum(w·dy·x̂) in *dot and sum(w·dy) in *total (w = 1 when absent).
template <bool kW>
__attribute__((always_inline)) inline void block_grad_sums(const float* __restrict x, const float* __restrict dy,
                                                           const float* __restrict w, int64_t n, float mean,
                                                           float rstd, float* dot, float* total) {
  float d = 0.f, t = 0.f;
#pragma omp simd reduction(+ : d, t)
  for (int64_t i = 0; i < n; ++i) {
    const float wdy = kW ? w[i] * dy[i] : dy[i];
    d += wdy * (x[i] - mean) * rstd;
    t += wdy;
  }
  *dot = d;
  *total = t;
}

FF_VECTORIZE void row_grad_sums(const float* x, const float* dy, const float* w, int64_t n, float mean, float rstd,
                                float* dot, float* total) {
  double d = 0.0, t = 0.0;
  for (int64_t i = 0; i < n; i += kSumBlock) {
    float bd, bt;
    const int64_t len = std::min(kSumBlock, n - i);
    w ? block_grad_sums<true>(x + i, dy + i, w + i, len, mean, rstd, &bd, &bt)
      : block_grad_sums<false>(x + i, dy + i, nullptr, len, mean, rstd, &bd, &bt);
    d += bd;
    t += bt;
  }
  *dot = static_cast<float>(d);
  *total = static_cast<float>(t);
}

// One pass: dx = rstd (w·dy − x̂·dot_mean − total_mean) (+ dres), and the parameter gradients
// dw += dy·x̂, db += dy (total_mean is 0 for RMSNorm).
template <bool kW, bool kRes, bool kDW, bool kDB>
__attribute__((always_inline)) inline void grad_row(const float* __restrict x, const float* __restrict dy,
                                                    const float* __restrict w, int64_t n, float mean, float rstd,
                                                    float dot_mean, float total_mean, const float* __restrict dres,
                                                    float* __restrict dx, float* __restrict dw,
                                                    float* __restrict db) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xhat = (x[i] - mean) * rstd;
    const float wdy = kW ? w[i] * dy[i] : dy[i];
    float g = rstd * (wdy - xhat * dot_mean - total_mean);
    if constexpr (kRes) g += dres[i];
    dx[i] = g;
    if constexpr (kDW) dw[i] += dy[i] * xhat;
    if constexpr (kDB) db[i] += dy[i];
  }
}

FF_VECTORIZE void row_grad_input_and_params(const float* x, const float* dy, const float* w, int64_t n, float mean,
                                            float rstd, float dot_mean, float total_mean, const float* dres,
                                            float* dx, float* dw, float* db) {
  // Weight and bias gradients come together (LayerNorm with both, RMSNorm with its weight).
  if (w) {
    if (dres) {
      db ? grad_row<true, true, true, true>(x, dy, w, n, mean, rstd, dot_mean, total_mean, dres, dx, dw, db)
         : grad_row<true, true, true, false>(x, dy, w, n, mean, rstd, dot_mean, total_mean, dres, dx, dw, db);
    } else {
      db ? grad_row<true, false, true, true>(x, dy, w, n, mean, rstd, dot_mean, total_mean, dres, dx, dw, db)
         : grad_row<true, false, true, false>(x, dy, w, n, mean, rstd, dot_mean, total_mean, dres, dx, dw, db);
    }
  } else if (dres) {
    db ? grad_row<false, true, false, true>(x, dy, w, n, mean, rstd, dot_mean, total_mean, dres, dx, dw, db)
       : grad_row<false, true, false, false>(x, dy, w, n, mean, rstd, dot_mean, total_mean, dres, dx, dw, db);
  } else {
    db ? grad_row<false, false, false, true>(x, dy, w, n, mean, rstd, dot_mean, total_mean, dres, dx, dw, db)
       : grad_row<false, false, false, false>(x, dy, w, n, mean, rstd, dot_mean, total_mean, dres, dx, dw, db);
  }
}

// ---- dtype conversion ---------------------------------------------------------------------

template <typename T>
void load_row(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

template <typename T>
void store_row(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

std::vector<float> param_as_float(const std::optional<at::Tensor>& p) {
  if (!p.has_value()) return {};
  at::Tensor f = p->to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

// Rows per parallel task: enough work (~32k elements) to amortize the task.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / cols); }

// ---- forward ------------------------------------------------------------------------------

template <typename T>
void norm_fwd_kernel(const T* x, const T* residual, const float* w, const float* b, T* y,
                     T* residual_out, float* mean_out, float* rstd_out, int64_t rows,
                     int64_t cols, float eps, bool rms) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  // The next row's lines requested while the passes over this row run from L1: on an Intel
  // Xeon the memory would otherwise idle (LayerNorm 4096x1024 forward 5-15% faster,
  // alternating builds); on AMD EPYC the hardware prefetchers do it and the requests cost
  // 5-12% (LayerNorm and RMSNorm 4096x1024 and 4096x4096; benchmarks/NOTES.md).
  const bool prefetch = cpu_is_intel();
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    // float32 rows are read and written in place; half rows go through float scratch.
    std::vector<float> row_buf(kFloat ? 0 : cols), scratch(!kFloat && residual ? cols : 0), out_buf(kFloat ? 0 : cols);
    for (int64_t r = begin; r < end; ++r) {
      if (prefetch && r + 1 < end) {
        const char* next = reinterpret_cast<const char*>(x + (r + 1) * cols);
        for (int64_t byte = 0; byte < cols * static_cast<int64_t>(sizeof(T)); byte += 64) __builtin_prefetch(next + byte);
      }
      const float* row;
      if constexpr (kFloat) {
        if (residual) {
          // x + residual straight into residual_out, which the passes below then read from L1
          // (through a scratch row and a copy out: 1.7x the time at 4096x1024; NOTES.md).
          row_add(x + r * cols, residual + r * cols, residual_out + r * cols, cols);
          row = residual_out + r * cols;
        } else {
          row = x + r * cols;
        }
      } else {
        load_row(x + r * cols, row_buf.data(), cols);
        if (residual) {
          load_row(residual + r * cols, scratch.data(), cols);
          for (int64_t i = 0; i < cols; ++i) row_buf[i] += scratch[i];
          // The normalized value is the sum rounded to the input dtype, as in x + residual.
          store_row(row_buf.data(), residual_out + r * cols, cols);
          load_row(residual_out + r * cols, row_buf.data(), cols);
        }
        row = row_buf.data();
      }
      const float mean = rms ? 0.f : row_sum(row, cols) / cols;
      const float var = row_sum_sq(row, cols, mean) / cols;
      const float rstd = 1.f / std::sqrt(var + eps);
      if constexpr (kFloat) {
        row_normalize(row, cols, mean, rstd, w, b, reinterpret_cast<float*>(y + r * cols));
      } else {
        row_normalize(row, cols, mean, rstd, w, b, out_buf.data());
        store_row(out_buf.data(), y + r * cols, cols);
      }
      if (!rms) mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd(
    const at::Tensor& input_, const std::optional<at::Tensor>& residual_,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms) {
  const auto [dims, input, residual] = norms::check_fwd_args(input_, residual_, weight, bias, rms);
  auto [out, residual_out, mean, rstd] = norms::allocate_fwd_outputs(input, residual.defined(), rms);
  const auto w = param_as_float(weight);
  const auto b = param_as_float(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "norm_fwd", [&] {
    norm_fwd_kernel<scalar_t>(
        input.data_ptr<scalar_t>(), residual.defined() ? residual.data_ptr<scalar_t>() : nullptr,
        w.empty() ? nullptr : w.data(), b.empty() ? nullptr : b.data(), out.data_ptr<scalar_t>(),
        residual.defined() ? residual_out.data_ptr<scalar_t>() : nullptr,
        rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(), dims.rows, dims.cols,
        static_cast<float>(eps), rms);
  });
  return {out, residual_out, mean, rstd};
}

// ---- backward -----------------------------------------------------------------------------

template <typename T>
void norm_bwd_kernel(const T* dy, const T* dres, const T* x, const float* w, const float* mean,
                     const float* rstd, T* dx, float* dw_partial, float* db_partial,
                     int64_t chunks, int64_t rows, int64_t cols, bool rms) {
  // Each chunk of rows owns one row of the dw/db partial sums: no atomics, summed afterwards.
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  // float32 rows are read in place; half rows are converted into float scratch rows once.
  constexpr bool kFloat = std::is_same_v<T, float>;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> xr(kFloat ? 0 : cols), dyr(kFloat ? 0 : cols), dxr(kFloat ? 0 : cols),
        dresr(dres && !kFloat ? cols : 0);
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      float* dw = dw_partial ? dw_partial + c * cols : nullptr;
      float* db = db_partial ? db_partial + c * cols : nullptr;
      const int64_t row_end = std::min(rows, (c + 1) * rows_per_chunk);
      for (int64_t r = c * rows_per_chunk; r < row_end; ++r) {
        const float *xp, *dyp, *dresp = nullptr;
        float* dxp;
        if constexpr (kFloat) {
          xp = x + r * cols, dyp = dy + r * cols, dxp = dx + r * cols;
          if (dres) dresp = dres + r * cols;
        } else {
          load_row(x + r * cols, xr.data(), cols);
          load_row(dy + r * cols, dyr.data(), cols);
          if (dres) load_row(dres + r * cols, dresr.data(), cols);
          xp = xr.data(), dyp = dyr.data(), dxp = dxr.data();
          if (dres) dresp = dresr.data();
        }
        const float mu = rms ? 0.f : mean[r];
        float dot, total;
        row_grad_sums(xp, dyp, w, cols, mu, rstd[r], &dot, &total);
        row_grad_input_and_params(xp, dyp, w, cols, mu, rstd[r], dot / cols, rms ? 0.f : total / cols, dresp, dxp,
                                  dw, db);
        if constexpr (!kFloat) store_row(dxr.data(), dx + r * cols, cols);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(
    const at::Tensor& grad_out_, const std::optional<at::Tensor>& grad_residual_out_,
    const at::Tensor& input_, const std::optional<at::Tensor>& weight, const at::Tensor& mean_,
    const at::Tensor& rstd_, bool rms, bool has_bias) {
  const auto dims = norms::check_input(input_, "input");
  norms::check_param(weight, input_, dims.cols, "weight");
  TORCH_CHECK(grad_out_.sizes() == input_.sizes(), "fuseformer norm: grad_out must match input");
  const at::Tensor input = input_.contiguous();
  const at::Tensor grad_out = grad_out_.to(input.scalar_type()).contiguous();
  at::Tensor grad_residual_out;
  if (grad_residual_out_.has_value()) {
    grad_residual_out = grad_residual_out_->to(input.scalar_type()).contiguous();
  }
  const at::Tensor mean = mean_.contiguous();
  const at::Tensor rstd = rstd_.contiguous();
  // One chunk per thread, but only as many as there is work for (a thread wake-up and a
  // partial row each cost more than a small tensor's whole backward).
  const int64_t work_chunks = std::max<int64_t>(1, dims.rows * dims.cols / 32768);
  const int64_t chunks = std::min<int64_t>({at::get_num_threads(), std::max<int64_t>(dims.rows, 1), work_chunks});
  auto float_opts = input.options().dtype(at::kFloat);
  at::Tensor dw_partial =
      weight.has_value() ? at::zeros({chunks, dims.cols}, float_opts) : at::Tensor();
  at::Tensor db_partial = has_bias ? at::zeros({chunks, dims.cols}, float_opts) : at::Tensor();
  at::Tensor grad_input = empty_output_like(input);
  const auto w = param_as_float(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "norm_bwd", [&] {
    norm_bwd_kernel<scalar_t>(
        grad_out.data_ptr<scalar_t>(),
        grad_residual_out.defined() ? grad_residual_out.data_ptr<scalar_t>() : nullptr,
        input.data_ptr<scalar_t>(), w.empty() ? nullptr : w.data(),
        rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(),
        grad_input.data_ptr<scalar_t>(), dw_partial.defined() ? dw_partial.data_ptr<float>() : nullptr,
        db_partial.defined() ? db_partial.data_ptr<float>() : nullptr, chunks, dims.rows,
        dims.cols, rms);
  });
  auto reduce = [&](const at::Tensor& partial) { return chunks == 1 ? partial[0] : partial.sum(0); };
  at::Tensor grad_weight = weight.has_value() ? reduce(dw_partial) : norms::empty_marker(input);
  at::Tensor grad_bias = has_bias ? reduce(db_partial) : norms::empty_marker(input);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, CPU, m) {
  m.impl("norm_fwd", &norm_fwd);
  m.impl("norm_bwd", &norm_bwd);
}

}  // namespace fuseformer::cpu
