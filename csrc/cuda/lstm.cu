// LSTM layer on CUDA: the time loop of csrc/lstm.h with cuBLAS GEMMs (ATen) and the fused
// pointwise cell kernels below, one launch per step each way. Elementwise over (row, unit):
// a thread reads the four gates of its unit (H apart in the row) and writes the cell, the
// hidden state and the saves; the state math is float32 whatever the activation dtype.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../lstm.h"

namespace fuseformer::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + __expf(-z)); }

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lstm_cell_fwd_kernel(const T* __restrict__ pre, const float* __restrict__ prev, const float* __restrict__ c0,
                         float* __restrict__ c_out, float* __restrict__ c_n, T* __restrict__ h, T* __restrict__ h2,
                         float* __restrict__ gates, int64_t n, int64_t prev_rows, int64_t H) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= n * H) return;
  const int64_t r = idx / H, j = idx % H;
  const T* z = pre + r * 4 * H;
  const float i = sigmoid(static_cast<float>(z[j]));
  const float f = sigmoid(static_cast<float>(z[H + j]));
  const float g = tanhf(static_cast<float>(z[2 * H + j]));
  const float o = sigmoid(static_cast<float>(z[3 * H + j]));
  const float cp = r < prev_rows ? prev[idx] : c0[idx];
  const float c = f * cp + i * g;
  const T hv = static_cast<T>(o * tanhf(c));
  c_out[idx] = c;
  c_n[idx] = c;
  h[idx] = hv;
  if (h2) h2[idx] = hv;
  if (gates) {
    float* gr = gates + r * 4 * H;
    gr[j] = i;
    gr[H + j] = f;
    gr[2 * H + j] = g;
    gr[3 * H + j] = o;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lstm_cell_bwd_kernel(const T* __restrict__ dh_a, const T* __restrict__ dh_b, float* __restrict__ dc,
                         const float* __restrict__ gates, const float* __restrict__ cells,
                         const float* __restrict__ prev, const float* __restrict__ c0, T* __restrict__ dz,
                         T* __restrict__ h_raw, int64_t n, int64_t prev_rows, int64_t H) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= n * H) return;
  const int64_t r = idx / H, j = idx % H;
  float dh = static_cast<float>(dh_a[idx]);
  if (dh_b) dh += static_cast<float>(dh_b[idx]);
  const float* gr = gates + r * 4 * H;
  const float i = gr[j], f = gr[H + j], g = gr[2 * H + j], o = gr[3 * H + j];
  const float tc = tanhf(cells[idx]);
  const float cp = r < prev_rows ? prev[idx] : c0[idx];
  const float dcv = dc[idx] + dh * o * (1.0f - tc * tc);
  T* dzr = dz + r * 4 * H;
  dzr[j] = static_cast<T>(dcv * g * i * (1.0f - i));
  dzr[H + j] = static_cast<T>(dcv * cp * f * (1.0f - f));
  dzr[2 * H + j] = static_cast<T>(dcv * i * (1.0f - g * g));
  dzr[3 * H + j] = static_cast<T>(dh * tc * o * (1.0f - o));
  dc[idx] = dcv * f;
  if (h_raw) h_raw[idx] = static_cast<T>(o * tc);
}

int blocks_for(int64_t elements) { return static_cast<int>((elements + kThreads - 1) / kThreads); }

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

struct CudaCells {
  using Linear = lstm::AtenLinear;  // cuBLAS

  // The backward walks the steps with lstm::walk_bwd (a cell kernel and a cuBLAS GEMM each).
  static bool fused_bwd_walk(const lstm::Steps&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, lstm::WalkResult&) {
    return false;
  }

  static void cell_fwd(const lstm::CellFwd& a) {
    const int64_t H = a.c0.size(1);
    if (a.n * H == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.pre.scalar_type(), "fuseformer_lstm_cell_fwd", [&] {
      lstm_cell_fwd_kernel<scalar_t><<<blocks_for(a.n * H), kThreads, 0, stream>>>(
          a.pre.const_data_ptr<scalar_t>(), a.prev_cells.const_data_ptr<float>(), a.c0.const_data_ptr<float>(),
          a.c_out.data_ptr<float>(), a.c_n.data_ptr<float>(), a.h_out.data_ptr<scalar_t>(),
          ptr_or_null<scalar_t>(a.h_out2), ptr_or_null<float>(a.gates), a.n, a.prev_rows, H);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void cell_bwd(const lstm::CellBwd& a) {
    const int64_t H = a.c0.size(1);
    if (a.n * H == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    const at::Tensor dh_a = a.dh_a.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dgates.scalar_type(), "fuseformer_lstm_cell_bwd", [&] {
      lstm_cell_bwd_kernel<scalar_t><<<blocks_for(a.n * H), kThreads, 0, stream>>>(
          dh_a.const_data_ptr<scalar_t>(), a.dh_b.defined() ? a.dh_b.const_data_ptr<scalar_t>() : nullptr,
          a.dc.data_ptr<float>(), a.gates.const_data_ptr<float>(), a.cells.const_data_ptr<float>(),
          a.prev_cells.const_data_ptr<float>(), a.c0.const_data_ptr<float>(), a.dgates.data_ptr<scalar_t>(),
          ptr_or_null<scalar_t>(a.h_raw), a.n, a.prev_rows, H);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cuda(
    const at::Tensor& x, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias, const at::Tensor& batch_sizes,
    bool padded, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, bool save) {
  const char* op = "fuseformer lstm_layer_fwd";
  const c10::cuda::CUDAGuard guard(x.device());
  return lstm::layer_fwd<CudaCells>(op, x, w_ih, bias, batch_sizes, padded, h0, c0, w_hh, w_hr, reverse, save);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& x,
    const at::Tensor& w_ih, bool has_bias, bool needs_input_grad, const at::Tensor& batch_sizes, bool padded,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& out, const at::Tensor& gates, const at::Tensor& cells, bool reverse) {
  const char* op = "fuseformer lstm_layer_bwd";
  const c10::cuda::CUDAGuard guard(x.device());
  return lstm::layer_bwd<CudaCells>(op, grad_out, grad_h_n, grad_c_n, x, w_ih, has_bias, needs_input_grad,
                                   batch_sizes, padded, h0, c0, w_hh, w_hr, out, gates, cells, reverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, CUDA, m) {
  m.impl("lstm_layer_fwd", &lstm_layer_fwd_cuda);
  m.impl("lstm_layer_bwd", &lstm_layer_bwd_cuda);
}

}  // namespace fuseformer::cuda
