// LSTM layer on the CPU: the time loop of csrc/lstm.h with oneDNN GEMMs on weights reordered
// once per call (csrc/cpu/gemm.h) and the fused pointwise cell below (one vectorized, parallel pass per step for the four gate
// activations, the cell and hidden update, and the saves the backward reads; the unfused
// step is a dozen ATen ops and as many passes over the gates). float32: the caller upcasts
// half inputs (python/fuseformer/ops/lstm.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../lstm.h"
#include "gemm.h"
#include "math.h"
#include "vectorize.h"

namespace fuseformer::cpu {
namespace {

// Rows per task: enough elements that a thread's share outweighs waking it.
int64_t row_grain(int64_t hidden) { return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(hidden, 1)); }

// One row of the forward cell. z: the four pre-activation gates, H apart.
template <bool kSave, bool kOut2>
__attribute__((always_inline)) inline void cell_fwd_row(const float* __restrict z, const float* __restrict c_prev,
                                                        float* __restrict c_out, float* __restrict c_n,
                                                        float* __restrict h, float* __restrict h2,
                                                        float* __restrict g_saved, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const float i = sigmoid_f32(z[j]);
    const float f = sigmoid_f32(z[H + j]);
    const float g = tanh_f32(z[2 * H + j]);
    const float o = sigmoid_f32(z[3 * H + j]);
    const float c = f * c_prev[j] + i * g;
    const float hv = o * tanh_f32(c);
    c_out[j] = c;
    c_n[j] = c;
    h[j] = hv;
    if constexpr (kOut2) h2[j] = hv;
    if constexpr (kSave) {
      g_saved[j] = i;
      g_saved[H + j] = f;
      g_saved[2 * H + j] = g;
      g_saved[3 * H + j] = o;
    }
  }
}

FF_VECTORIZE void cell_fwd_rows(bool save, bool out2, const float* z, const float* c_prev, float* c_out, float* c_n,
                                float* h, float* h2, float* g_saved, int64_t H) {
  if (save) {
    out2 ? cell_fwd_row<true, true>(z, c_prev, c_out, c_n, h, h2, g_saved, H)
         : cell_fwd_row<true, false>(z, c_prev, c_out, c_n, h, h2, g_saved, H);
  } else {
    out2 ? cell_fwd_row<false, true>(z, c_prev, c_out, c_n, h, h2, g_saved, H)
         : cell_fwd_row<false, false>(z, c_prev, c_out, c_n, h, h2, g_saved, H);
  }
}

// One row of the backward cell: gates i|f|g|o (activated), c this step's cell, c_prev the
// previous one; dc in: the gradient reaching c from the next step, out: the one for c_prev.
template <bool kTwoDh, bool kHRaw>
__attribute__((always_inline)) inline void cell_bwd_row(const float* __restrict dh_a, const float* __restrict dh_b,
                                                        float* __restrict dc, const float* __restrict gates,
                                                        const float* __restrict c, const float* __restrict c_prev,
                                                        float* __restrict dz, float* __restrict h_raw, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    float dh = dh_a[j];
    if constexpr (kTwoDh) dh += dh_b[j];
    const float i = gates[j], f = gates[H + j], g = gates[2 * H + j], o = gates[3 * H + j];
    const float tc = tanh_f32(c[j]);
    const float dcv = dc[j] + dh * o * (1.0f - tc * tc);
    dz[j] = dcv * g * i * (1.0f - i);
    dz[H + j] = dcv * c_prev[j] * f * (1.0f - f);
    dz[2 * H + j] = dcv * i * (1.0f - g * g);
    dz[3 * H + j] = dh * tc * o * (1.0f - o);
    dc[j] = dcv * f;
    if constexpr (kHRaw) h_raw[j] = o * tc;
  }
}

FF_VECTORIZE void cell_bwd_rows(bool two_dh, bool with_h_raw, const float* dh_a, const float* dh_b, float* dc,
                                const float* gates, const float* c, const float* c_prev, float* dz, float* h_raw,
                                int64_t H) {
  if (two_dh) {
    with_h_raw ? cell_bwd_row<true, true>(dh_a, dh_b, dc, gates, c, c_prev, dz, h_raw, H)
               : cell_bwd_row<true, false>(dh_a, dh_b, dc, gates, c, c_prev, dz, h_raw, H);
  } else {
    with_h_raw ? cell_bwd_row<false, true>(dh_a, dh_b, dc, gates, c, c_prev, dz, h_raw, H)
               : cell_bwd_row<false, false>(dh_a, dh_b, dc, gates, c, c_prev, dz, h_raw, H);
  }
}

struct CpuCells {
  using Linear = PackedLinear;

  static void cell_fwd(const lstm::CellFwd& a) {
    const int64_t H = a.c0.size(1);
    const float* pre = a.pre.const_data_ptr<float>();
    const float* prev = a.prev_cells.const_data_ptr<float>();
    const float* c0 = a.c0.const_data_ptr<float>();
    float* c_out = a.c_out.data_ptr<float>();
    float* c_n = a.c_n.data_ptr<float>();
    float* h = a.h_out.data_ptr<float>();
    float* h2 = a.h_out2.defined() ? a.h_out2.data_ptr<float>() : nullptr;
    float* g = a.gates.defined() ? a.gates.data_ptr<float>() : nullptr;
    at::parallel_for(0, a.n, row_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* cp = r < a.prev_rows ? prev + r * H : c0 + r * H;
        cell_fwd_rows(g != nullptr, h2 != nullptr, pre + r * 4 * H, cp, c_out + r * H, c_n + r * H, h + r * H,
                      h2 ? h2 + r * H : nullptr, g ? g + r * 4 * H : nullptr, H);
      }
    });
  }

  static void cell_bwd(const lstm::CellBwd& a) {
    const int64_t H = a.c0.size(1);
    const at::Tensor dh_a = a.dh_a.contiguous();
    const float* da = dh_a.const_data_ptr<float>();
    const float* db = a.dh_b.defined() ? a.dh_b.const_data_ptr<float>() : nullptr;
    float* dc = a.dc.data_ptr<float>();
    const float* gates = a.gates.const_data_ptr<float>();
    const float* c = a.cells.const_data_ptr<float>();
    const float* prev = a.prev_cells.const_data_ptr<float>();
    const float* c0 = a.c0.const_data_ptr<float>();
    float* dz = a.dgates.data_ptr<float>();
    float* h_raw = a.h_raw.defined() ? a.h_raw.data_ptr<float>() : nullptr;
    at::parallel_for(0, a.n, row_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* cp = r < a.prev_rows ? prev + r * H : c0 + r * H;
        cell_bwd_rows(db != nullptr, h_raw != nullptr, da + r * H, db ? db + r * H : nullptr, dc + r * H,
                      gates + r * 4 * H, c + r * H, cp, dz + r * 4 * H, h_raw ? h_raw + r * H : nullptr, H);
      }
    });
  }
};

void check_float(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": the CPU kernels take float32 (the caller upcasts), got ",
              t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cpu(
    const at::Tensor& x, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias, const at::Tensor& batch_sizes,
    bool padded, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, bool save) {
  const char* op = "fuseformer lstm_layer_fwd";
  check_float(x, op);
  return lstm::layer_fwd<CpuCells>(op, x, w_ih, bias, batch_sizes, padded, h0, c0, w_hh, w_hr, reverse, save);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& x,
    const at::Tensor& w_ih, bool has_bias, bool needs_input_grad, const at::Tensor& batch_sizes, bool padded,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& out, const at::Tensor& gates, const at::Tensor& cells, bool reverse) {
  const char* op = "fuseformer lstm_layer_bwd";
  check_float(x, op);
  return lstm::layer_bwd<CpuCells>(op, grad_out, grad_h_n, grad_c_n, x, w_ih, has_bias, needs_input_grad,
                                   batch_sizes, padded, h0, c0, w_hh, w_hr, out, gates, cells, reverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, CPU, m) {
  m.impl("lstm_layer_fwd", &lstm_layer_fwd_cpu);
  m.impl("lstm_layer_bwd", &lstm_layer_bwd_cpu);
}

}  // namespace fuseformer::cpu
