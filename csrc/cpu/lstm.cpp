// LSTM layer on the CPU: the time loop of csrc/lstm.h with oneDNN GEMMs on weights reordered
// once per call (csrc/cpu/gemm.h) and the fused pointwise cell below (one vectorized, parallel pass per step for the four gate
// activations, the cell and hidden update, and the saves the backward reads; the unfused
// step is a dozen ATen ops and as many passes over the gates). float32: the caller upcasts
// half inputs (python/fuseformer/ops/lstm.py).
//
// Small batches (1-64 rows, no projection, AVX-512) take a forward loop of their own
// (small_batch_layer_fwd below): one parallel pass per step in which each thread owns blocks
// of 16 hidden units, computes their four gates for every row from a copy of W_hh interleaved
// so that one 256-byte run per k holds the block's four gate columns (no horizontal sums), and
// applies the cell to them in registers: one fork/join per step instead of the GEMM's and the
// cell's. In inference the gates never reach memory; in training the same pass writes the
// activated gates and the cell the backward (csrc/lstm.h) reads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../lstm.h"
#include "gemm.h"
#include "math.h"
#include "vectorize.h"
#include "weight_cache.h"

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

// One row of the backward cell: gates i|f|g|o (activated, H apart), c this step's cell, c_prev
// the previous one; dc in: the gradient reaching c from the next step, out: the one for
// c_prev; dz's gates dz_gates apart.
template <bool kTwoDh, bool kHRaw>
__attribute__((always_inline)) inline void cell_bwd_row(const float* __restrict dh_a, const float* __restrict dh_b,
                                                        float* __restrict dc, const float* __restrict gates,
                                                        const float* __restrict c, const float* __restrict c_prev,
                                                        float* __restrict dz, float* __restrict h_raw, int64_t H,
                                                        int64_t units, int64_t dz_gates) {
  for (int64_t j = 0; j < units; ++j) {
    float dh = dh_a[j];
    if constexpr (kTwoDh) dh += dh_b[j];
    const float i = gates[j], f = gates[H + j], g = gates[2 * H + j], o = gates[3 * H + j];
    const float tc = tanh_f32(c[j]);
    const float dcv = dc[j] + dh * o * (1.0f - tc * tc);
    dz[j] = dcv * g * i * (1.0f - i);
    dz[dz_gates + j] = dcv * c_prev[j] * f * (1.0f - f);
    dz[2 * dz_gates + j] = dcv * i * (1.0f - g * g);
    dz[3 * dz_gates + j] = dh * tc * o * (1.0f - o);
    dc[j] = dcv * f;
    if constexpr (kHRaw) h_raw[j] = o * tc;
  }
}

FF_VECTORIZE void cell_bwd_rows(bool two_dh, bool with_h_raw, const float* dh_a, const float* dh_b, float* dc,
                                const float* gates, const float* c, const float* c_prev, float* dz, float* h_raw,
                                int64_t H) {
  if (two_dh) {
    with_h_raw ? cell_bwd_row<true, true>(dh_a, dh_b, dc, gates, c, c_prev, dz, h_raw, H, H, H)
               : cell_bwd_row<true, false>(dh_a, dh_b, dc, gates, c, c_prev, dz, h_raw, H, H, H);
  } else {
    with_h_raw ? cell_bwd_row<false, true>(dh_a, dh_b, dc, gates, c, c_prev, dz, h_raw, H, H, H)
               : cell_bwd_row<false, false>(dh_a, dh_b, dc, gates, c, c_prev, dz, h_raw, H, H, H);
  }
}

struct CpuCells {
  using Linear = PackedLinear;

  // Up to 64 rows, hidden a multiple of 16, AVX-512: the small-batch backward loop below.
  static bool fused_bwd_walk(const lstm::Steps& s, const at::Tensor& grad_out, const at::Tensor& gates,
                             const at::Tensor& cells, const at::Tensor& c0, const at::Tensor& w_hh, at::Tensor& dh_run,
                             at::Tensor& dc_run, lstm::WalkResult& result);

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

// ---- small batches ------------------------------------------------------------

#if defined(__x86_64__) && defined(__GNUC__)
constexpr int64_t kUnits = 16;         // hidden units per block: one AVX-512 vector
constexpr int64_t kRowTile = 4;        // rows per pass over the weight: 4 gates x 4 rows of accumulators
// Rows in row tiles of 4; from 65 the GEMM path (csrc/lstm.h). At 17-64 rows the loop still
// beats our per-step GEMM + cell (inference 24x256: 1.95 vs 2.64 ms; training 32x256: 8.9 vs
// 10.3 ms); where it beats torch is python/fuseformer/ops/lstm.py's routing.
constexpr int64_t kSmallBatchMax = 64;

// W_hh (4H, H) -> (H/16, H, 4, 16): block u, input k, gate g, unit j = W_hh[g·H + 16u + j, k].
at::Tensor interleave_recurrent(const at::Tensor& w_hh, int64_t H) {
  return w_hh.contiguous().view({4, H / kUnits, kUnits, H}).permute({1, 3, 0, 2}).contiguous();
}

struct SmallStep {
  const float* w;              // interleaved W_hh
  const float* pre;            // this step's x_proj rows (n, 4H)
  const float* h_prev[kSmallBatchMax];
  const float* c_prev[kSmallBatchMax];
  float* h_out;                // this step's output rows (n, H)
  float* h_n;                  // (B, H)
  float* c_n;                  // (B, H) float32, also the running cell state
  float* gates;                // training: this step's activated gates (n, 4H), else null
  float* cells;                // training: this step's cell states (n, H)
  int64_t n, H;
};

// Rows [r0, r0 + MT) of block u. kSave: also write what the backward reads (csrc/lstm.h's
// layout: activated gates i|f|g|o and the cell, float32).
template <int MT, bool kSave>
__attribute__((target("avx512f"))) void small_step_block(const SmallStep& a, int64_t u, int64_t r0) {
  const int64_t H = a.H, j0 = u * kUnits;
  __m512 acc[MT][4];
  for (int r = 0; r < MT; ++r) {
    for (int g = 0; g < 4; ++g) acc[r][g] = _mm512_loadu_ps(a.pre + (r0 + r) * 4 * H + g * H + j0);
  }
  const float* w = a.w + u * H * 4 * kUnits;
  for (int64_t k = 0; k < H; ++k) {
    const float* wk = w + k * 4 * kUnits;
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16), w2 = _mm512_loadu_ps(wk + 32),
                 w3 = _mm512_loadu_ps(wk + 48);
    for (int r = 0; r < MT; ++r) {
      const __m512 h = _mm512_set1_ps(a.h_prev[r0 + r][k]);
      acc[r][0] = _mm512_fmadd_ps(h, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(h, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(h, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(h, w3, acc[r][3]);
    }
  }
  alignas(64) float z[4][kUnits];
  for (int r = 0; r < MT; ++r) {
    for (int g = 0; g < 4; ++g) _mm512_store_ps(z[g], acc[r][g]);
    const float* cp = a.c_prev[r0 + r] + j0;
    float* h = a.h_out + (r0 + r) * H + j0;
    float* hn = a.h_n + (r0 + r) * H + j0;
    float* cn = a.c_n + (r0 + r) * H + j0;
    float* gs = kSave ? a.gates + (r0 + r) * 4 * H + j0 : nullptr;
    float* cs = kSave ? a.cells + (r0 + r) * H + j0 : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < kUnits; ++j) {
      const float gi = sigmoid_f32(z[0][j]), gf = sigmoid_f32(z[1][j]), gg = tanh_f32(z[2][j]),
                  go = sigmoid_f32(z[3][j]);
      const float c = gf * cp[j] + gi * gg;
      const float hv = go * tanh_f32(c);
      cn[j] = c;
      h[j] = hv;
      hn[j] = hv;
      if constexpr (kSave) {
        gs[j] = gi;
        gs[H + j] = gf;
        gs[2 * H + j] = gg;
        gs[3 * H + j] = go;
        cs[j] = c;
      }
    }
  }
}

template <bool kSave>
__attribute__((target("avx512f"))) void small_step(const SmallStep& a, int64_t u_begin, int64_t u_end) {
  for (int64_t u = u_begin; u < u_end; ++u) {
    for (int64_t r0 = 0; r0 < a.n; r0 += kRowTile) {  // the block's weight stays in L1 across tiles
      switch (std::min(kRowTile, a.n - r0)) {
        case 4: small_step_block<4, kSave>(a, u, r0); break;
        case 3: small_step_block<3, kSave>(a, u, r0); break;
        case 2: small_step_block<2, kSave>(a, u, r0); break;
        default: small_step_block<1, kSave>(a, u, r0); break;
      }
    }
  }
}

// The backward's walk for the same batches (CpuCells::fused_bwd_walk): one parallel pass per
// step in which the thread owning a block of 16 hidden units first carries dh to it from the
// step after (dh[:, block] = dgates_next W_hh[:, block], a GEMM slice over 4H gate rows of a
// copy of W_hh blocked so that each gate row's 16 columns are one vector) and then runs the
// backward cell for the same units, which needs nothing from the other blocks: one fork/join
// per step instead of the cell pass's and the GEMM's. The block's new dgates columns then go,
// transposed in registers, into dgatesᵀ (which the weight gradients' GEMMs read as it is:
// 1.1 ms each at 1024 rows x 1024 x 256, against 1.45 for the transposes around dgates) and
// into a packed (4H, n) copy of the step's, from which the next pass's carry broadcasts (16
// rows from one base register; 16 row pointers would not fit the general registers), and
// are summed into the bias gradient.
constexpr int64_t kBwdRowTile = 16;  // rows per pass over a block's weights: 16 accumulators

// W_hh (4H, H) -> (H/16, 4H, 16): block u, gate row m, unit j = W_hh[m, 16u + j].
at::Tensor block_recurrent(const at::Tensor& w_hh, int64_t H) {
  return w_hh.contiguous().view({4 * H, H / kUnits, kUnits}).permute({1, 0, 2}).contiguous();
}

struct SmallBwdStep {
  const float* w;          // block_recurrent(W_hh)
  const float* dz_t_next;  // the step after's dgatesᵀ packed (4H, n_next); null at the walk's start
  float* dz_t_step;        // this step's, packed (4H, n), for the next pass
  int64_t n_next;
  const float* grad_out;   // this step's rows (n, H)
  const float* gates;      // (n, 4H) activated, float32
  const float* cells;      // (n, H)
  const float* c_prev[kSmallBatchMax];
  float* dh;               // dh_run (B, H): in, the gradient reaching h from later steps
  float* dc;               // dc_run (B, H)
  float* dz_t;             // dgatesᵀ (4H, rows_total): this step's columns start at off
  double* grad_bias;       // (4H): the sum of dgates over rows, accumulated step by step
  int64_t rows_total, off;
  int64_t n, H;            // n = 0: carry only (the walk's end)
};

template <int MT>
__attribute__((target("avx512f"))) void carry_block(const SmallBwdStep& a, int64_t u, int64_t r0) {
  const int64_t H4 = 4 * a.H, ld = a.n_next;
  __m512 acc[MT];
  for (int r = 0; r < MT; ++r) acc[r] = _mm512_setzero_ps();
  const float* w = a.w + u * H4 * kUnits;
  // The step after's dgates, transposed and packed (4H, n_next): a gate row's MT values are
  // adjacent, one base register for every row's broadcast, and the rows follow in memory.
  const float* dz = a.dz_t_next + r0;
  for (int64_t m = 0; m < H4; ++m) {
    const __m512 wm = _mm512_loadu_ps(w + m * kUnits);
    for (int r = 0; r < MT; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(dz[m * ld + r]), wm, acc[r]);
  }
  for (int r = 0; r < MT; ++r) _mm512_storeu_ps(a.dh + (r0 + r) * a.H + u * kUnits, acc[r]);
}

FF_VECTORIZE void cell_bwd_units(const float* dh, const float* grad_out, float* dc, const float* gates, const float* c,
                                 const float* c_prev, float* dz, int64_t H) {
  cell_bwd_row<true, false>(dh, grad_out, dc, gates, c, c_prev, dz, nullptr, H, kUnits, kUnits);
}

// A 16x16 tile transposed in registers: unpack pairs, then 64- and 128-bit lane shuffles.
__attribute__((target("avx512f"), always_inline)) inline void transpose_16x16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// bias[0, 16) += sum, in double.
__attribute__((target("avx512f"), always_inline)) inline void add_to_bias(double* bias, __m512 sum) {
  const __m256 lo = _mm512_castps512_ps256(sum);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1));
  _mm512_storeu_pd(bias, _mm512_add_pd(_mm512_loadu_pd(bias), _mm512_cvtps_pd(lo)));
  _mm512_storeu_pd(bias + 8, _mm512_add_pd(_mm512_loadu_pd(bias + 8), _mm512_cvtps_pd(hi)));
}

constexpr int64_t kScalarTransposeRows = 8;

// One gate's 16 columns of a block's dgates (block_dz: n rows of 4 x 16, in L1), gate g: into
// dgatesᵀ, 16 rows at a time through a register transpose (each column's rows are one run
// there), and summed over the rows into the bias gradient, which this thread alone owns.
__attribute__((target("avx512f"))) void transpose_block(const SmallBwdStep& a, const float* block_dz, int64_t g,
                                                        int64_t j0) {
  const int64_t col = g * a.H + j0;
  __m512 sum = _mm512_setzero_ps();
  if (a.n < kScalarTransposeRows) {  // a register transpose would move mostly zeros
    for (int64_t r = 0; r < a.n; ++r) {
      const float* row = block_dz + (r * 4 + g) * kUnits;
      sum = _mm512_add_ps(sum, _mm512_load_ps(row));
      for (int64_t j = 0; j < kUnits; ++j) {
        a.dz_t[(col + j) * a.rows_total + a.off + r] = row[j];
        a.dz_t_step[(col + j) * a.n + r] = row[j];
      }
    }
    add_to_bias(a.grad_bias + col, sum);
    return;
  }
  alignas(64) float stage[kUnits][kSmallBatchMax];
  for (int64_t r0 = 0; r0 < a.n; r0 += kUnits) {
    const int64_t rn = std::min(kUnits, a.n - r0);
    __m512 r[kUnits];
    for (int64_t i = 0; i < kUnits; ++i) {
      r[i] = i < rn ? _mm512_load_ps(block_dz + ((r0 + i) * 4 + g) * kUnits) : _mm512_setzero_ps();
      sum = _mm512_add_ps(sum, r[i]);
    }
    transpose_16x16(r);
    const __mmask16 rows = static_cast<__mmask16>((1u << rn) - 1);
    for (int64_t j = 0; j < kUnits; ++j) {
      _mm512_store_ps(stage[j] + r0, r[j]);
      _mm512_mask_storeu_ps(a.dz_t_step + (col + j) * a.n + r0, rows, r[j]);
    }
  }
  // Then each column's run of n rows at once: dgatesᵀ's rows lie a multiple of 4 KB apart
  // (rows_total floats), so its 16 columns share one L1 set; stored chunk by chunk above,
  // a column's line would be evicted between its chunks (2x slower walk at 64 rows).
  for (int64_t j = 0; j < kUnits; ++j) {
    float* dst = a.dz_t + (col + j) * a.rows_total + a.off;
    int64_t r0 = 0;
    for (; r0 + kUnits <= a.n; r0 += kUnits) _mm512_storeu_ps(dst + r0, _mm512_load_ps(stage[j] + r0));
    if (r0 < a.n) {
      _mm512_mask_storeu_ps(dst + r0, static_cast<__mmask16>((1u << (a.n - r0)) - 1), _mm512_load_ps(stage[j] + r0));
    }
  }
  add_to_bias(a.grad_bias + col, sum);
}

__attribute__((target("avx512f"))) void small_bwd_step(const SmallBwdStep& a, int64_t u_begin, int64_t u_end) {
  const int64_t H = a.H;
  alignas(64) float block_dz[kSmallBatchMax * 4 * kUnits];  // the block's dgates, row by row
  for (int64_t u = u_begin; u < u_end; ++u) {
    if (a.dz_t_next) {
      for (int64_t r0 = 0, tile = 0; r0 < a.n_next; r0 += tile) {
        // Tiles of 16 rows, then at most 8 (9-15 rows left: 8 and the rest).
        tile = a.n_next - r0 >= kBwdRowTile ? kBwdRowTile : std::min<int64_t>(8, a.n_next - r0);
        switch (tile) {
          case 16: carry_block<16>(a, u, r0); break;
          case 8: carry_block<8>(a, u, r0); break;
          case 7: carry_block<7>(a, u, r0); break;
          case 6: carry_block<6>(a, u, r0); break;
          case 5: carry_block<5>(a, u, r0); break;
          case 4: carry_block<4>(a, u, r0); break;
          case 3: carry_block<3>(a, u, r0); break;
          case 2: carry_block<2>(a, u, r0); break;
          default: carry_block<1>(a, u, r0); break;
        }
      }
    }
    if (a.n == 0) continue;
    const int64_t j0 = u * kUnits;
    for (int64_t r = 0; r < a.n; ++r) {
      cell_bwd_units(a.dh + r * H + j0, a.grad_out + r * H + j0, a.dc + r * H + j0, a.gates + r * 4 * H + j0,
                     a.cells + r * H + j0, a.c_prev[r] + j0, block_dz + r * 4 * kUnits, H);
    }
    for (int64_t g = 0; g < 4; ++g) transpose_block(a, block_dz, g, j0);
  }
}
#endif

// The small-batch loops' range: no projection (h is H wide), rows up to kSmallBatchMax,
// hidden a multiple of 16, AVX-512.
bool small_batch_fits(int64_t batch, int64_t hidden, bool projected) {
#if defined(__x86_64__) && defined(__GNUC__)
  return !projected && has_avx512() && batch <= kSmallBatchMax && hidden > 0 && hidden % kUnits == 0;
#else
  (void)batch, (void)hidden, (void)projected;
  return false;
#endif
}

bool small_batch_applies(const at::Tensor& h0, const at::Tensor& c0, const std::optional<at::Tensor>& w_hr) {
  return h0.dim() == 2 && c0.dim() == 2 && small_batch_fits(h0.size(0), c0.size(1), w_hr.has_value());
}

#if defined(__x86_64__) && defined(__GNUC__)
// A layout of W_hh made once per weight version (WeightCache, keyed by `key`), or per call for
// a weight the cache cannot hold.
template <typename Make>
at::Tensor recurrent_layout(const at::Tensor& w_hh, int64_t key, int64_t H, Make&& make) {
  if (!WeightCache::cacheable(w_hh) || !w_hh.is_contiguous()) return make(w_hh, H);
  return WeightCache::get({w_hh}, {key, H}, [&] { return std::vector<at::Tensor>{make(w_hh, H)}; })[0];
}
#endif

// The layer forward of csrc/lstm.h for small_batch_applies() calls: the same arguments,
// checks, layout and results (gates and cells empty unless saving).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> small_batch_layer_fwd(
    const char* op, const at::Tensor& x_in, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias,
    const at::Tensor& batch_sizes, bool padded, const at::Tensor& h0_in, const at::Tensor& c0_in,
    const at::Tensor& w_hh, bool reverse, bool save) {
#if defined(__x86_64__) && defined(__GNUC__)
  lstm::check_input_args(op, x_in, w_ih, bias);
  const lstm::Steps s = lstm::check_layer_args(op, x_in.size(0), w_ih.size(0), x_in.scalar_type(), x_in.device(),
                                               batch_sizes, padded, h0_in, c0_in, w_hh, std::nullopt, reverse);
  const int64_t H = s.hidden;
  const at::Tensor x = x_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  at::Tensor x_proj = PackedLinear(w_ih, x.size(0), /*cached=*/true)(x, std::nullopt, bias).contiguous();
  constexpr int64_t kInterleavedKey = 4;
  const at::Tensor w = recurrent_layout(w_hh, kInterleavedKey, H, interleave_recurrent);
  const int64_t rows = x_proj.size(0);
  at::Tensor out = s.rows_buffer({rows, H}, x_proj.options());
  at::Tensor h_n = h0.clone(), c_n = c0.clone();  // rows that never run keep their initial state
  // Padding rows of the saves are never written: zeros, as csrc/lstm.h's. The activated
  // gates overwrite x_proj in place (a block reads its pre-activations before it writes the
  // gates at the same addresses, and no other thread reads them): no second (rows, 4H)
  // buffer to allocate, fault in and write.
  at::Tensor cells = !save ? at::empty({0}, x_proj.options())
                     : s.rows_buffer({rows, H}, x_proj.options());
  at::Tensor gates = save ? x_proj : at::empty({0}, x_proj.options());
  const float* out_data = out.const_data_ptr<float>();
  const int64_t blocks = H / kUnits;
  // A task is at least ~4 blocks of 256 inputs (~16k multiply-adds per row): below that
  // waking a thread costs more than its share (measured: hidden 256 runs on both threads).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 10) / H);
  for (int64_t position = 0; position < s.steps(); ++position) {
    const int64_t t = s.at(position), n = s.sizes[t], off = s.offsets[t];
    if (n == 0) continue;
    const lstm::Prev prev = lstm::previous(s, position);
    SmallStep a{};
    a.w = w.const_data_ptr<float>();
    a.pre = x_proj.const_data_ptr<float>() + off * 4 * H;
    for (int64_t r = 0; r < n; ++r) {
      const bool carried = r < prev.rows;  // else the row starts here, from h0 / c0
      a.h_prev[r] = carried ? out_data + (prev.offset + r) * H : h0.const_data_ptr<float>() + r * H;
      a.c_prev[r] = carried ? c_n.const_data_ptr<float>() + r * H : c0.const_data_ptr<float>() + r * H;
    }
    a.h_out = out.data_ptr<float>() + off * H;
    a.h_n = h_n.data_ptr<float>();
    a.c_n = c_n.data_ptr<float>();
    a.gates = save ? gates.data_ptr<float>() + off * 4 * H : nullptr;
    a.cells = save ? cells.data_ptr<float>() + off * H : nullptr;
    a.n = n, a.H = H;
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      save ? small_step<true>(a, begin, end) : small_step<false>(a, begin, end);
    });
  }
  if (save && s.has_padding()) {  // x_proj's padding rows still hold bias + x W_ihᵀ
    for (int64_t t = 0; t < s.steps(); ++t) {
      if (s.sizes[t] < s.batch) gates.narrow(0, s.offsets[t] + s.sizes[t], s.batch - s.sizes[t]).zero_();
    }
  }
  return {out, h_n, c_n, gates, cells};
#else
  TORCH_CHECK(false, op, ": the small-batch path needs x86-64 AVX-512");
#endif
}

bool CpuCells::fused_bwd_walk(const lstm::Steps& s, const at::Tensor& grad_out, const at::Tensor& gates,
                              const at::Tensor& cells, const at::Tensor& c0, const at::Tensor& w_hh, at::Tensor& dh_run,
                              at::Tensor& dc_run, lstm::WalkResult& result) {
#if defined(__x86_64__) && defined(__GNUC__)
  const int64_t H = s.hidden;
  auto plain_f32 = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.is_contiguous(); };
  if (!small_batch_fits(s.batch, H, s.proj != H) || !plain_f32(grad_out) || !plain_f32(gates) || !plain_f32(cells) || !plain_f32(c0) ||
      !plain_f32(dh_run) || !plain_f32(dc_run) || w_hh.scalar_type() != at::kFloat) {
    return false;
  }
  constexpr int64_t kBlockedKey = 5;
  const at::Tensor w = recurrent_layout(w_hh, kBlockedKey, H, block_recurrent);
  const float* go = grad_out.const_data_ptr<float>();
  const float* g = gates.const_data_ptr<float>();
  const float* c = cells.const_data_ptr<float>();
  const float* c_init = c0.const_data_ptr<float>();
  const int64_t rows = grad_out.size(0);
  // Padding rows (never written) are zero columns.
  at::Tensor dz_t = s.rows_buffer({4 * H, rows}, grad_out.options());
  at::Tensor grad_bias = at::zeros({4 * H}, grad_out.options().dtype(at::kDouble));
  SmallBwdStep a{};
  a.w = w.const_data_ptr<float>();
  a.dh = dh_run.data_ptr<float>();
  a.dc = dc_run.data_ptr<float>();
  a.dz_t = dz_t.data_ptr<float>();
  at::Tensor packed_steps = at::empty({2, 4 * H, s.batch}, grad_out.options());
  float* packed[2] = {packed_steps[0].data_ptr<float>(), packed_steps[1].data_ptr<float>()};
  a.dz_t_step = packed[0];
  a.grad_bias = grad_bias.data_ptr<double>();
  a.rows_total = rows;
  a.H = H;
  const int64_t blocks = H / kUnits;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 10) / H);  // as the forward's
  auto run = [&] { at::parallel_for(0, blocks, grain, [&](int64_t b, int64_t e) { small_bwd_step(a, b, e); }); };
  for (int64_t position = s.steps() - 1; position >= 0; --position) {
    const int64_t t = s.at(position), n = s.sizes[t], off = s.offsets[t];
    if (n == 0) continue;
    const lstm::Prev prev = lstm::previous(s, position);
    a.grad_out = go + off * H;
    a.gates = g + off * 4 * H;
    a.cells = c + off * H;
    for (int64_t r = 0; r < n; ++r) a.c_prev[r] = r < prev.rows ? c + (prev.offset + r) * H : c_init + r * H;
    a.off = off;
    a.n = n;
    run();
    // The next pass (the step before) starts by carrying dh through these.
    a.dz_t_next = a.dz_t_step;
    a.dz_t_step = a.dz_t_step == packed[0] ? packed[1] : packed[0];
    a.n_next = n;
  }
  if (a.dz_t_next) {  // dh for the initial state
    a.n = 0;
    run();
  }
  result.dgates_t = dz_t;
  result.grad_bias = grad_bias.to(at::kFloat);
  return true;
#else
  (void)s, (void)grad_out, (void)gates, (void)cells, (void)c0, (void)w_hh, (void)dh_run, (void)dc_run, (void)result;
  return false;
#endif
}

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
  if (small_batch_applies(h0, c0, w_hr)) {
    return small_batch_layer_fwd(op, x, w_ih, bias, batch_sizes, padded, h0, c0, w_hh, reverse, save);
  }
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
