// LayerNorm / RMSNorm on CUDA. One block per row; each thread owns the 16-byte vectors
// tid, tid + blockDim, ... of the row. Rows that fit (<= kCache vectors per thread) stay in
// registers between the passes (sum, centered sum of squares, normalize), so each element
// is read from memory once; longer rows are re-read (from L2) in each pass.
// Backward: a grid of a few blocks per SM walks the rows; a thread's columns never change,
// so it accumulates dweight/dbias in registers and writes one partial row per block.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "norms.h"

namespace fuseformer::cuda {
namespace {

constexpr int kCache = 4;        // vectors per thread kept in registers
constexpr int kMaxThreads = 512;  // with __launch_bounds__: up to 128 registers per thread

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packed {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* base, int64_t vi, float (&out)[VEC]) {
  const Packed<T, VEC> p = reinterpret_cast<const Packed<T, VEC>*>(base)[vi];
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = static_cast<float>(p.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* base, int64_t vi, const float (&in)[VEC]) {
  Packed<T, VEC> p;
#pragma unroll
  for (int j = 0; j < VEC; ++j) p.v[j] = static_cast<T>(in[j]);
  reinterpret_cast<Packed<T, VEC>*>(base)[vi] = p;
}

// Weights may be float32 while activations are half: load them element by element.
template <typename W, int VEC>
__device__ __forceinline__ void load_param(const W* p, int64_t vi, float (&out)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = p ? static_cast<float>(p[vi * VEC + j]) : 0.f;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch may still be read from the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? scratch[lane] : 0.f;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Visits this thread's vectors. When CACHED the loop is unrolled, so k is a compile-time
// index and the per-thread caches stay in registers (a runtime index would spill them).
template <bool CACHED, typename F>
__device__ __forceinline__ void for_each_vec(int64_t nvec, F&& f) {
  if constexpr (CACHED) {
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t vi = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (vi < nvec) f(k, vi);
    }
  } else {
    for (int64_t vi = threadIdx.x; vi < nvec; vi += blockDim.x) f(0, vi);
  }
}

template <typename T, typename W, int VEC, bool CACHED>
__global__ void __launch_bounds__(kMaxThreads) norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                const W* __restrict__ weight, const W* __restrict__ bias,
                                T* __restrict__ y, T* __restrict__ residual_out,
                                float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                int64_t cols, float eps, bool rms) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t nvec = cols / VEC;
  x += row * cols;
  y += row * cols;
  if (residual) {
    residual += row * cols;
    residual_out += row * cols;
  }
  // The tensor normalized: x, or x + residual rounded to T (as the unfused sum would be).
  const T* source = residual ? residual_out : x;

  float cache[CACHED ? kCache : 1][VEC];
  float sum = 0.f;
  for_each_vec<CACHED>(nvec, [&](int k, int64_t vi) {
    float v[VEC];
    load_vec<T, VEC>(x, vi, v);
    if (residual) {
      float r[VEC];
      load_vec<T, VEC>(residual, vi, r);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = static_cast<float>(static_cast<T>(v[j] + r[j]));
      store_vec<T, VEC>(residual_out, vi, v);  // re-read below only by this same thread
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      sum += v[j];
      if constexpr (CACHED) cache[k][j] = v[j];
    }
  });
  const float mean = rms ? 0.f : block_sum(sum, scratch) / cols;

  auto row_values = [&](int k, int64_t vi, float (&v)[VEC]) {
    if constexpr (CACHED) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = cache[k][j];
    } else {
      load_vec<T, VEC>(source, vi, v);
    }
  };
  float sq = 0.f;
  for_each_vec<CACHED>(nvec, [&](int k, int64_t vi) {
    float v[VEC];
    row_values(k, vi, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) sq += (v[j] - mean) * (v[j] - mean);
  });
  const float rstd = rsqrtf(block_sum(sq, scratch) / cols + eps);

  for_each_vec<CACHED>(nvec, [&](int k, int64_t vi) {
    float v[VEC], w[VEC], b[VEC];
    row_values(k, vi, v);
    load_param<W, VEC>(weight, vi, w);
    load_param<W, VEC>(bias, vi, b);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float xhat = (v[j] - mean) * rstd;
      v[j] = (weight ? xhat * w[j] : xhat) + b[j];
    }
    store_vec<T, VEC>(y, vi, v);
  });
  if (threadIdx.x == 0) {
    if (!rms) mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T, typename W, int VEC, bool CACHED>
__global__ void __launch_bounds__(kMaxThreads) norm_bwd_kernel(const T* __restrict__ dy_all, const T* __restrict__ dres_all,
                                const T* __restrict__ x_all, const W* __restrict__ weight,
                                const float* __restrict__ mean, const float* __restrict__ rstd,
                                T* __restrict__ dx_all, float* __restrict__ dw_partial,
                                float* __restrict__ db_partial, int64_t rows, int64_t cols,
                                bool rms) {
  __shared__ float scratch[32];
  const int64_t nvec = cols / VEC;
  constexpr int C = CACHED ? kCache : 1;
  float dw_acc[C][VEC], db_acc[C][VEC];
#pragma unroll
  for (int k = 0; k < C; ++k)
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw_acc[k][j] = db_acc[k][j] = 0.f;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* x = x_all + row * cols;
    const T* dy = dy_all + row * cols;
    T* dx = dx_all + row * cols;
    const float mu = rms ? 0.f : mean[row];
    const float rs = rstd[row];

    float dot = 0.f, total = 0.f;
    for (int64_t vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
      float v[VEC], g[VEC], w[VEC];
      load_vec<T, VEC>(x, vi, v);
      load_vec<T, VEC>(dy, vi, g);
      load_param<W, VEC>(weight, vi, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float wdy = weight ? w[j] * g[j] : g[j];
        dot += wdy * (v[j] - mu) * rs;
        total += wdy;
      }
    }
    const float dot_mean = block_sum(dot, scratch) / cols;
    const float total_mean = rms ? 0.f : block_sum(total, scratch) / cols;

    for_each_vec<CACHED>(nvec, [&](int k, int64_t vi) {
      // Second read of x and dy: from L1/L2, the row was just read.
      float v[VEC], g[VEC], w[VEC], d[VEC];
      load_vec<T, VEC>(x, vi, v);
      load_vec<T, VEC>(dy, vi, g);
      load_param<W, VEC>(weight, vi, w);
      if (dres_all) {
        load_vec<T, VEC>(dres_all + row * cols, vi, d);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) d[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xhat = (v[j] - mu) * rs;
        const float wdy = weight ? w[j] * g[j] : g[j];
        d[j] += rs * (wdy - xhat * dot_mean - total_mean);
        if constexpr (CACHED) {
          dw_acc[k][j] += g[j] * xhat;
          db_acc[k][j] += g[j];
        } else {
          if (dw_partial) dw_partial[blockIdx.x * cols + vi * VEC + j] += g[j] * xhat;
          if (db_partial) db_partial[blockIdx.x * cols + vi * VEC + j] += g[j];
        }
      }
      store_vec<T, VEC>(dx, vi, d);
    });
  }
  if constexpr (CACHED) {
    for_each_vec<CACHED>(nvec, [&](int k, int64_t vi) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (dw_partial) dw_partial[blockIdx.x * cols + vi * VEC + j] = dw_acc[k][j];
        if (db_partial) db_partial[blockIdx.x * cols + vi * VEC + j] = db_acc[k][j];
      }
    });
  }
}

// ---- launch configuration -----------------------------------------------------------------

template <typename T>
int vector_width(int64_t cols, std::initializer_list<const void*> ptrs) {
  int vec = 16 / sizeof(T);
  while (vec > 1) {
    bool ok = cols % vec == 0;
    for (const void* p : ptrs) ok = ok && (reinterpret_cast<uintptr_t>(p) % (vec * sizeof(T)) == 0);
    if (ok) break;
    vec /= 2;
  }
  return vec;
}

int threads_for(int64_t nvec) {
  // About two vectors per thread, in whole warps, 32..kMaxThreads threads.
  int64_t t = (nvec + 1) / 2;
  t = std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (t + 31) / 32 * 32));
  return static_cast<int>(t);
}

// Calls fn.template operator()<VEC, CACHED>() for the runtime choice.
template <typename Fn>
void dispatch_vec_cache(int vec, bool cached, Fn&& fn) {
  auto with_cache = [&](auto vec_c) {
    if (cached) fn.template operator()<decltype(vec_c)::value, true>();
    else fn.template operator()<decltype(vec_c)::value, false>();
  };
  switch (vec) {
    case 8: with_cache(std::integral_constant<int, 8>{}); break;
    case 4: with_cache(std::integral_constant<int, 4>{}); break;
    case 2: with_cache(std::integral_constant<int, 2>{}); break;
    default: with_cache(std::integral_constant<int, 1>{}); break;
  }
}

template <typename Fn>
void dispatch_types(at::ScalarType input, std::optional<at::ScalarType> param, Fn&& fn) {
  const bool float_params = param.has_value() && *param == at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input, "fuseformer_norm", [&] {
    using T = scalar_t;
    if (float_params) fn.template operator()<T, float>();
    else fn.template operator()<T, T>();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd(
    const at::Tensor& input_, const std::optional<at::Tensor>& residual_,
    const std::optional<at::Tensor>& weight_, const std::optional<at::Tensor>& bias_,
    double eps, bool rms) {
  const c10::cuda::CUDAGuard guard(input_.device());
  const auto [dims, input, residual] = norms::check_fwd_args(input_, residual_, weight_, bias_, rms);
  const at::Tensor weight = weight_.has_value() ? weight_->contiguous() : at::Tensor();
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  auto [out, residual_out, mean, rstd] = norms::allocate_fwd_outputs(input, residual.defined(), rms);
  if (dims.rows == 0) return {out, residual_out, mean, rstd};

  std::optional<at::ScalarType> param_type;
  if (weight.defined()) param_type = weight.scalar_type();
  else if (bias.defined()) param_type = bias.scalar_type();
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_types(input.scalar_type(), param_type, [&]<typename T, typename W>() {
    const T* r = residual.defined() ? residual.data_ptr<T>() : nullptr;
    T* ro = residual.defined() ? residual_out.data_ptr<T>() : nullptr;
    const int vec = vector_width<T>(dims.cols, {input.data_ptr(), out.data_ptr(), r, ro});
    const int64_t nvec = dims.cols / vec;
    const int threads = threads_for(nvec);
    const bool cached = nvec <= static_cast<int64_t>(kCache) * threads;
    dispatch_vec_cache(vec, cached, [&]<int VEC, bool CACHED>() {
      norm_fwd_kernel<T, W, VEC, CACHED><<<dims.rows, threads, 0, stream>>>(
          input.data_ptr<T>(), r, weight.defined() ? weight.data_ptr<W>() : nullptr,
          bias.defined() ? bias.data_ptr<W>() : nullptr, out.data_ptr<T>(), ro,
          rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(), dims.cols,
          static_cast<float>(eps), rms);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, residual_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(
    const at::Tensor& grad_out_, const std::optional<at::Tensor>& grad_residual_out_,
    const at::Tensor& input_, const std::optional<at::Tensor>& weight_, const at::Tensor& mean_,
    const at::Tensor& rstd_, bool rms, bool has_bias) {
  const auto dims = norms::check_input(input_, "input");
  norms::check_param(weight_, input_, dims.cols, "weight");
  TORCH_CHECK(grad_out_.sizes() == input_.sizes(), "fuseformer norm: grad_out must match input");
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor grad_out = grad_out_.to(input.scalar_type()).contiguous();
  at::Tensor dres;
  if (grad_residual_out_.has_value()) dres = grad_residual_out_->to(input.scalar_type()).contiguous();
  const at::Tensor weight = weight_.has_value() ? weight_->contiguous() : at::Tensor();
  const at::Tensor mean = mean_.contiguous();
  const at::Tensor rstd = rstd_.contiguous();
  at::Tensor grad_input = at::empty_like(input);

  // One full wave of blocks (2048 threads, at most 32 blocks per SM): each block walks
  // rows serially, so the number resident is what hides memory latency.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int block_threads = threads_for(dims.cols * input.element_size() / 16);
  const int64_t per_sm = std::min<int64_t>(32, std::max<int64_t>(1, 2048 / block_threads));
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(dims.rows, per_sm * sms));
  auto float_opts = input.options().dtype(at::kFloat);
  // Partial rows are zeroed: the streaming kernel accumulates into them.
  at::Tensor dw_partial = weight.defined() ? at::zeros({blocks, dims.cols}, float_opts) : at::Tensor();
  at::Tensor db_partial = has_bias ? at::zeros({blocks, dims.cols}, float_opts) : at::Tensor();
  if (dims.rows > 0) {
    std::optional<at::ScalarType> param_type;
    if (weight.defined()) param_type = weight.scalar_type();
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_types(input.scalar_type(), param_type, [&]<typename T, typename W>() {
      const T* d = dres.defined() ? dres.data_ptr<T>() : nullptr;
      const int vec =
          vector_width<T>(dims.cols, {input.data_ptr(), grad_out.data_ptr(), grad_input.data_ptr(), d});
      const int64_t nvec = dims.cols / vec;
      const int threads = threads_for(nvec);
      const bool cached = nvec <= static_cast<int64_t>(kCache) * threads;
      dispatch_vec_cache(vec, cached, [&]<int VEC, bool CACHED>() {
        norm_bwd_kernel<T, W, VEC, CACHED><<<blocks, threads, 0, stream>>>(
            grad_out.data_ptr<T>(), d, input.data_ptr<T>(),
            weight.defined() ? weight.data_ptr<W>() : nullptr,
            rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(),
            grad_input.data_ptr<T>(), dw_partial.defined() ? dw_partial.data_ptr<float>() : nullptr,
            db_partial.defined() ? db_partial.data_ptr<float>() : nullptr, dims.rows, dims.cols,
            rms);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor grad_weight = weight.defined() ? dw_partial.sum(0) : norms::empty_marker(input);
  at::Tensor grad_bias = has_bias ? db_partial.sum(0) : norms::empty_marker(input);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, CUDA, m) {
  m.impl("norm_fwd", &norm_fwd);
  m.impl("norm_bwd", &norm_bwd);
}

}  // namespace fuseformer::cuda
