// Flash-style attention on the CPU, forward and backward, float32.
//
// Tiling: tasks are (batch, head, tile of block_m queries), run in parallel. A task streams
// the visible keys in tiles of kBlockN: S = Q·Kᵀ and O += P·V are GEMMs on tile views
// (PackedLinear::product_into: oneDNN, 2x ATen's MKL at these shapes on our AMD CPUs; MKL
// on Intel CPUs, gemm.h), into tile buffers reused across the task's tiles, so
// only a block_m x kBlockN score tile ever exists; the softmax is online (running row max and sum,
// accumulator rescaled). The elementwise row work (softcap, ALiBi, mask, exp) runs in float
// loops the compiler vectorizes, with an exp of our own (below): libm's expf does not
// vectorize, and a call per score costs more than both GEMMs.
//
// Backward: tasks are (batch, kv head); each walks the query heads of its GQA group and their
// query tiles, recomputes P from the saved log-sum-exp and accumulates dK, dV of its keys and
// dQ of its queries. Every output row has exactly one writer: deterministic, no atomics.
//
// Decode (attention_decode: a few new queries against a KV cache) has a kernel of its own,
// below: at one query per head the tiled kernel's GEMM calls cost more than their work.
//
// Masking as in kernels/attention.py: query row i sits at key position i + offset (offset 0,
// or L_b - S for lower-right alignment); keys outside [pos - left, pos + right] or past the
// batch's key count are invisible; rows with no visible key give zeros and lse = -inf.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../attention.h"
#include "../allocate.h"
#include "gemm.h"
#include "math.h"
#include "softmax.h"
#include "vectorize.h"

namespace fuseformer::cpu {
namespace {

// Query rows per task: 256 makes the GEMMs most efficient (measured, benchmarks/NOTES.md);
// 128 when a window or causal mask makes tall tiles compute scores that are then masked.
constexpr int64_t kBlockMLarge = 256;
constexpr int64_t kBlockMMasked = 128;
// Query rows (GQA group x queries) up to which the heads of a group share one tile.
constexpr int64_t kPackedRows = 64;
constexpr int64_t kBlockN = 512;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Options {
  float scale;
  float softcap;  // 0: none
  int64_t window_left, window_right;  // -1: unbounded
};

// Visible key range [lo, hi) of the query at key position `pos`, among `keys` keys.
inline std::pair<int64_t, int64_t> visible_range(int64_t pos, int64_t keys, const Options& o) {
  int64_t lo = 0, hi = keys;
  if (o.window_right >= 0) hi = std::min(hi, pos + o.window_right + 1);
  if (o.window_left >= 0) lo = std::max<int64_t>(0, pos - o.window_left);
  return {lo, std::max(lo, hi)};
}

// One row of a score tile, in place: raw q·k (n keys from key col0) -> final scores
// (scale, softcap, ALiBi, additive mask; -inf outside [vis_lo, vis_hi)). `tanh_out` (when not
// null) receives tanh(scale·q·k / softcap) for the backward.
FF_VECTORIZE void finish_scores(float* s, int64_t n, int64_t col0, int64_t pos, const Options& o, float slope,
                                const float* mask_row, int64_t mask_stride, int64_t vis_lo, int64_t vis_hi,
                                float* tanh_out) {
  const float scale = o.scale;
  if (o.softcap > 0) {
    const float inv_cap = 1.0f / o.softcap, cap = o.softcap;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float t = tanh_f32(s[j] * scale * inv_cap);
      if (tanh_out) tanh_out[j] = t;
      s[j] = cap * t;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] *= scale;
  }
  if (slope != 0.0f) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] -= slope * static_cast<float>(std::abs(pos - (col0 + j)));
  }
  if (mask_row) {
    for (int64_t j = 0; j < n; ++j) s[j] += mask_row[(col0 + j) * mask_stride];
  }
  for (int64_t j = 0; j < std::min(n, vis_lo - col0); ++j) s[j] = kNegInf;
  for (int64_t j = std::max<int64_t>(0, vis_hi - col0); j < n; ++j) s[j] = kNegInf;
}

// dS = P (dP - delta) [(1 - t²) with a softcap], in place in dp.
FF_VECTORIZE void grad_scores_row(const float* p, float* dp, const float* t, int64_t n, float delta) {
  if (t) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta) * (1.0f - t[j] * t[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
  }
}

// ---- shapes and per-row context ------------------------------------------------------------

struct Problem {
  int64_t batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, groups;
  bool lower_right;
  Options opt;
  const at::Tensor* mask;  // float32 (B, H, S, L) view, or null
  const float* slopes;     // (H,) or (B, H), or null
  int64_t slopes_batch_stride;
  const int32_t* seqlens_k;  // per-batch key counts, or null

  int64_t keys(int64_t b) const { return seqlens_k ? seqlens_k[b] : seqlen_k; }
  int64_t offset(int64_t b) const { return lower_right ? keys(b) - seqlen_q : 0; }
  float slope(int64_t b, int64_t h) const { return slopes ? slopes[b * slopes_batch_stride + h] : 0.0f; }
  const float* mask_row(int64_t b, int64_t h, int64_t i) const {
    if (!mask) return nullptr;
    return mask->data_ptr<float>() + b * mask->stride(0) + h * mask->stride(1) + i * mask->stride(2);
  }
  int64_t mask_col_stride() const { return mask ? mask->stride(3) : 0; }
};

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                  const std::optional<at::Tensor>& slopes, const std::optional<at::Tensor>& seqlens_k) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "fuseformer attention (cpu): q, k, v must be 4-D float32 CPU tensors");
    TORCH_CHECK(t->stride(3) == 1, "fuseformer attention (cpu): q, k, v need a contiguous last dimension");
  }
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "fuseformer attention (cpu): k and v must be (B, H_kv, L, D) with q's B and D");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "fuseformer attention (cpu): q's heads must be a multiple of k's heads");
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kFloat && mask->dim() == 4 && mask->size(0) == q.size(0) &&
                    mask->size(1) == q.size(1) && mask->size(2) == q.size(2) && mask->size(3) == k.size(2),
                "fuseformer attention (cpu): mask must be a float32 (B, H, S, L) view");
  }
  if (slopes) {
    TORCH_CHECK(slopes->scalar_type() == at::kFloat && slopes->is_contiguous() &&
                    (slopes->dim() == 1 || (slopes->dim() == 2 && slopes->size(0) == q.size(0))) &&
                    slopes->size(-1) == q.size(1),
                "fuseformer attention (cpu): alibi_slopes must be contiguous float32 (H,) or (B, H)");
  }
  if (seqlens_k) {
    TORCH_CHECK(seqlens_k->scalar_type() == at::kInt && seqlens_k->dim() == 1 && seqlens_k->size(0) == q.size(0) &&
                    seqlens_k->is_contiguous(),
                "fuseformer attention (cpu): seqlens_k must be a contiguous int32 (B,) tensor");
  }
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                     const std::optional<at::Tensor>& slopes, const std::optional<at::Tensor>& seqlens_k, double scale,
                     double softcap, int64_t window_left, int64_t window_right, bool lower_right) {
  Problem p{};
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.seqlen_q = q.size(2);
  p.seqlen_k = k.size(2);
  p.head_dim = q.size(3);
  p.groups = p.heads / p.kv_heads;
  p.lower_right = lower_right;
  p.opt = {static_cast<float>(scale), static_cast<float>(softcap), window_left, window_right};
  p.mask = mask ? &*mask : nullptr;
  p.slopes = slopes ? slopes->data_ptr<float>() : nullptr;
  p.slopes_batch_stride = slopes && slopes->dim() == 2 ? p.heads : 0;
  p.seqlens_k = seqlens_k ? seqlens_k->data_ptr<int32_t>() : nullptr;
  if (p.seqlens_k) {
    for (int64_t b = 0; b < p.batch; ++b) {
      TORCH_CHECK(p.seqlens_k[b] >= 0 && p.seqlens_k[b] <= p.seqlen_k,
                  "fuseformer attention (cpu): seqlens_k must lie in [0, L]");
    }
  }
  return p;
}

// Keys any row of query tile [m0, m1) can see, rounded out to whole key tiles.
std::pair<int64_t, int64_t> tile_key_range(const Problem& p, int64_t b, int64_t m0, int64_t m1) {
  const int64_t keys = p.keys(b), off = p.offset(b);
  // Both ends of a row's range grow with its position: the first row has the lowest start,
  // the last row the highest end.
  const int64_t lo = visible_range(m0 + off, keys, p.opt).first;
  const int64_t hi = visible_range(m1 - 1 + off, keys, p.opt).second;
  return {std::min(lo, keys), std::min(keys, std::max(lo, hi))};
}

// t (B, H, S, D) with each head's rows packed: the tile GEMMs read key and value tiles (and
// in the backward query tiles) as oneDNN weights, which must be dense (PackedLinear::dense).
// A (B, S, H, D) buffer viewed as (B, H, S, D), as after a QKV projection, is copied once a
// call: B·H·S·D elements against the attention's 4·B·H·S·L·D FLOPs.
at::Tensor dense_heads(const at::Tensor& t) { return t.stride(2) == t.size(3) || t.size(2) <= 1 ? t : t.contiguous(); }

// A contiguous (rows, cols) tile on the front of a flat buffer reused across the tiles of a task.
at::Tensor tile_view(const at::Tensor& store, int64_t rows, int64_t cols) {
  return store.narrow(0, 0, rows * cols).view({rows, cols});
}

// ---- forward -------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, const std::optional<at::Tensor>& mask,
                                                 const std::optional<at::Tensor>& alibi_slopes,
                                                 const std::optional<at::Tensor>& seqlens_k, double scale,
                                                 double softcap, int64_t window_left, int64_t window_right,
                                                 bool lower_right) {
  check_inputs(q, k_in, v_in, mask, alibi_slopes, seqlens_k);
  const at::Tensor k = dense_heads(k_in), v = dense_heads(v_in);
  const Problem p = make_problem(q, k, mask, alibi_slopes, seqlens_k, scale, softcap, window_left, window_right,
                                 lower_right);
  // out (B, H, S, D) in (B, S, H, D) memory, as SDPA's flash kernels return it: the
  // transpose(1, 2).contiguous() before the output projection is then free (no copy, and
  // the tensor autograd keeps for the backward is the projection's input too).
  at::Tensor out = empty_output({p.batch, p.seqlen_q, p.heads, p.head_dim}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({p.batch, p.heads, p.seqlen_q}, q.options());
  const int64_t block_m = p.opt.window_right >= 0 || p.opt.window_left >= 0 ? kBlockMMasked : kBlockMLarge;
  // Decode-like calls (a few queries, GQA): the queries of all heads that share a kv head
  // form one tile, so each key tile is read once per group and the GEMMs have groups x S
  // rows instead of S (matrix-vector products for S = 1).
  const bool packed = p.groups > 1 && p.groups * p.seqlen_q <= kPackedRows;
  const int64_t m_tiles = packed ? 1 : (p.seqlen_q + block_m - 1) / block_m;
  const int64_t heads_per_task = packed ? p.groups : 1;
  const int64_t tasks = p.batch * (p.heads / heads_per_task) * m_tiles;
  const int64_t tile_rows = packed ? p.groups * p.seqlen_q : block_m;
  const int64_t d = p.head_dim;

  // Scale > 0 keeps the row max of q·k the max of the scores: the fused path below relies on it.
  const bool plain = !mask && !alibi_slopes && softcap <= 0 && scale > 0;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    // The tile GEMMs are internal: no autograd (the guard is thread-local, so it is set in
    // each worker), and no autograd dispatch cost.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::vector<float> row_m(tile_rows), row_l(tile_rows);
    at::Tensor s_store = at::empty({tile_rows * kBlockN}, q.options()), acc_store = at::empty({tile_rows * d}, q.options());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m_tile = task % m_tiles, bh = task / m_tiles;
      const int64_t b = bh / (p.heads / heads_per_task), h0 = bh % (p.heads / heads_per_task) * heads_per_task;
      const int64_t kvh = h0 / p.groups;
      // Tile row r is query i_of(r) of head h_of(r).
      const int64_t m0 = packed ? 0 : m_tile * block_m;
      const int64_t m1 = packed ? p.seqlen_q : std::min(p.seqlen_q, m0 + block_m);
      const int64_t span = m1 - m0, rows = span * heads_per_task;
      auto h_of = [&](int64_t r) { return h0 + r / span; };
      auto i_of = [&](int64_t r) { return m0 + r % span; };
      const int64_t keys = p.keys(b), off = p.offset(b);
      const at::Tensor q_tile = packed ? q[b].narrow(0, h0, heads_per_task).reshape({rows, d})
                                       : q[b][h0].narrow(0, m0, rows);
      const at::Tensor k_bh = k[b][kvh], v_bh = v[b][kvh];
      at::Tensor acc_tile = tile_view(acc_store, rows, d);  // O's unnormalized rows
      std::fill(row_m.begin(), row_m.end(), kNegInf);
      std::fill(row_l.begin(), row_l.end(), 0.0f);

      const auto [lo, hi] = tile_key_range(p, b, m0, m1);
      bool accumulated = false;
      for (int64_t n0 = lo; n0 < hi; n0 += kBlockN) {
        const int64_t cols = std::min(kBlockN, hi - n0);
        at::Tensor s = tile_view(s_store, rows, cols);
        PackedLinear::product_into(s, q_tile, k_bh.narrow(0, n0, cols), false);
        float* s_ptr = s.data_ptr<float>();
        float* acc_ptr = accumulated ? acc_tile.data_ptr<float>() : nullptr;
        for (int64_t r = 0; r < rows; ++r) {
          float* s_row = s_ptr + r * cols;
          const int64_t h = h_of(r), i = i_of(r), pos = i + off;
          const auto [vis_lo, vis_hi] = visible_range(pos, keys, p.opt);
          // Nothing to add or mask in a fully visible row: the scale goes inside the
          // exponential (max(scale·s) = scale·max(s) for scale > 0), one pass fewer.
          const bool fused = plain && vis_lo <= n0 && vis_hi >= n0 + cols;
          float tile_max;
          if (fused) {
            tile_max = p.opt.scale * row_max(s_row, cols);
          } else {
            finish_scores(s_row, cols, n0, pos, p.opt, p.slope(b, h), p.mask_row(b, h, i), p.mask_col_stride(),
                          vis_lo, vis_hi, nullptr);
            tile_max = row_max(s_row, cols);
          }
          const float m_new = std::max(row_m[r], tile_max);
          const float shift = m_new == kNegInf ? 0.0f : m_new;  // no visible key yet: exp(-inf) = 0
          const float tile_sum = exp_shifted_sum(s_row, cols, fused ? p.opt.scale : 1.0f, shift);
          const float alpha = exp_f32(row_m[r] - shift);
          row_l[r] = row_l[r] * alpha + tile_sum;
          row_m[r] = m_new;
          if (acc_ptr && alpha != 1.0f) scale_row(acc_ptr + r * d, d, alpha);
        }
        PackedLinear::product_into(acc_tile, s, v_bh.narrow(0, n0, cols).t(), accumulated);
        accumulated = true;
      }
      if (!accumulated) acc_tile.zero_();  // no visible key
      float* out_b = out[b].data_ptr<float>();  // (S, H, D) in memory
      float* lse_b = lse[b].data_ptr<float>();
      const float* acc_ptr = acc_tile.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = h_of(r) * p.seqlen_q + i_of(r);
        const bool empty = row_l[r] == 0.0f;
        const float inv = empty ? 0.0f : 1.0f / row_l[r];
        float* o_row = out_b + (i_of(r) * p.heads + h_of(r)) * d;
        for (int64_t j = 0; j < d; ++j) o_row[j] = acc_ptr[r * d + j] * inv;
        lse_b[row] = empty ? kNegInf : row_m[r] + std::log(row_l[r]);
      }
    }
  });
  return {out, lse};
}

// ---- backward ------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& seqlens_k, double scale,
    double softcap, int64_t window_left, int64_t window_right, bool lower_right) {
  check_inputs(q_in, k_in, v_in, mask, alibi_slopes, seqlens_k);
  const at::Tensor q = dense_heads(q_in), k = dense_heads(k_in), v = dense_heads(v_in);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat,
              "fuseformer attention (cpu): grad_out and out must be float32 and shaped like q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(2) == q.size(2),
              "fuseformer attention (cpu): lse must be float32 (B, H, S)");
  const Problem p = make_problem(q, k, mask, alibi_slopes, seqlens_k, scale, softcap, window_left, window_right,
                                 lower_right);
  const at::Tensor d_out = grad_out.contiguous();
  // delta = rowsum(dO * O) - dL/dlse: d lse / d s = P, so a gradient on lse enters here.
  at::Tensor delta = (d_out * out).sum(-1);
  if (grad_lse) delta.sub_(*grad_lse);
  delta = delta.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = zeros_output(q.sizes(), q.options());
  at::Tensor dk = zeros_output(k.sizes(), k.options());
  at::Tensor dv = zeros_output(v.sizes(), v.options());
  // As the forward's: 256-row tiles without a window or causal mask (non-causal forward+backward
  // 5-12% faster than at 128 with the oneDNN tile GEMMs; benchmarks/NOTES.md).
  const int64_t block_m = p.opt.window_right >= 0 || p.opt.window_left >= 0 ? kBlockMMasked : kBlockMLarge;
  const int64_t m_tiles = (p.seqlen_q + block_m - 1) / block_m;
  const bool has_softcap = p.opt.softcap > 0;

  at::parallel_for(0, p.batch * p.kv_heads, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor tanh_buffer = has_softcap ? at::empty({block_m * kBlockN}, q.options()) : at::Tensor();
    at::Tensor s_store = at::empty({block_m * kBlockN}, q.options()), dp_store = at::empty_like(s_store);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.kv_heads, kvh = task % p.kv_heads;
      const int64_t keys = p.keys(b), off = p.offset(b);
      const at::Tensor k_bh = k[b][kvh], v_bh = v[b][kvh];
      at::Tensor dk_bh = dk[b][kvh], dv_bh = dv[b][kvh];
      for (int64_t g = 0; g < p.groups; ++g) {
        const int64_t h = kvh * p.groups + g;
        const float slope = p.slope(b, h);
        const float* lse_ptr = lse_c[b][h].data_ptr<float>();
        const float* delta_ptr = delta[b][h].data_ptr<float>();
        for (int64_t m_tile = 0; m_tile < m_tiles; ++m_tile) {
          const int64_t m0 = m_tile * block_m, m1 = std::min(p.seqlen_q, m0 + block_m), rows = m1 - m0;
          const at::Tensor q_tile = q[b][h].narrow(0, m0, rows);
          const at::Tensor do_tile = d_out[b][h].narrow(0, m0, rows);
          at::Tensor dq_tile = dq[b][h].narrow(0, m0, rows);
          const auto [lo, hi] = tile_key_range(p, b, m0, m1);
          for (int64_t n0 = lo; n0 < hi; n0 += kBlockN) {
            const int64_t cols = std::min(kBlockN, hi - n0);
            const at::Tensor k_tile = k_bh.narrow(0, n0, cols), v_tile = v_bh.narrow(0, n0, cols);
            at::Tensor s = tile_view(s_store, rows, cols), dp = tile_view(dp_store, rows, cols);
            PackedLinear::product_into(s, q_tile, k_tile, false);
            PackedLinear::product_into(dp, do_tile, v_tile, false);
            float* s_ptr = s.data_ptr<float>();
            float* dp_ptr = dp.data_ptr<float>();
            for (int64_t i = 0; i < rows; ++i) {
              float* s_row = s_ptr + i * cols;
              float* t_row = has_softcap ? tanh_buffer.data_ptr<float>() + i * cols : nullptr;
              const int64_t pos = m0 + i + off;
              const auto [vis_lo, vis_hi] = visible_range(pos, keys, p.opt);
              finish_scores(s_row, cols, n0, pos, p.opt, slope, p.mask_row(b, h, m0 + i), p.mask_col_stride(),
                            vis_lo, vis_hi, t_row);
              const float row_lse = lse_ptr[m0 + i];
              // P = exp(s - lse); a row with no visible key (lse -inf) has s = -inf: P = 0.
              exp_shifted_sum(s_row, cols, 1.0f, row_lse == kNegInf ? 0.0f : row_lse);
              grad_scores_row(s_row, dp_ptr + i * cols, t_row, cols, delta_ptr[m0 + i]);
            }
            // s now holds P, dp holds dS (w.r.t. scale·q·k).
            at::Tensor dv_tile = dv_bh.narrow(0, n0, cols), dk_tile = dk_bh.narrow(0, n0, cols);
            PackedLinear::weight_grad_into(dv_tile, s, do_tile);
            PackedLinear::weight_grad_into(dk_tile, dp, q_tile, scale);
            PackedLinear::product_into(dq_tile, dp, k_tile.t(), true, scale);
          }
        }
      }
    }
  });
  return {dq, dk, dv};
}

// ---- KV-cache decode -------------------------------------------------------------------------
//
// A task is (batch, kv head, chunk of the cache). Its rows are the GQA group's query heads x
// the n new tokens (row r: token r / groups, head kvh·groups + r % groups, as the CUDA
// kernel), so each key and value row is read once for the whole group. Per block of keys:
// scores by direct dot products (key-outer, so a key row stays in L1 across the rows), the
// online softmax, and P·V accumulated a value row at a time. With fewer (batch, kv head)
// pairs than threads, the cache is split into chunks whose partial results are combined by
// their log-sum-exp (flash-decoding, as on CUDA).

constexpr int64_t kDecodeKeys = 256;

// scores[r, j] = q_r · key_j and acc[r] += sum_j p[r, j] · value_j for a block of n keys,
// key-outer (each key and value row is loaded once for all rows). The head dim is a template
// parameter for the common sizes (64, 128: the loops unroll completely, one horizontal sum
// per score), 0 for any other.
template <int64_t kD>
__attribute__((always_inline)) inline void decode_scores_impl(const float* __restrict qf, int64_t rows, int64_t d_,
                                                              const float* __restrict keys, int64_t key_stride,
                                                              int64_t n, float* __restrict scores) {
  const int64_t d = kD > 0 ? kD : d_;
  for (int64_t j = 0; j < n; ++j) {
    const float* key = keys + j * key_stride;
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = qf + r * d;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t e = 0; e < d; ++e) sum += qr[e] * key[e];
      scores[r * kDecodeKeys + j] = sum;
    }
  }
}

template <int64_t kD>
__attribute__((always_inline)) inline void decode_values_impl(float* __restrict acc, int64_t rows, int64_t d_,
                                                              const float* __restrict values, int64_t value_stride,
                                                              int64_t n, const float* __restrict probs) {
  const int64_t d = kD > 0 ? kD : d_;
  for (int64_t j = 0; j < n; ++j) {
    const float* value = values + j * value_stride;
    for (int64_t r = 0; r < rows; ++r) {
      const float pj = probs[r * kDecodeKeys + j];
      float* ar = acc + r * d;
#pragma omp simd
      for (int64_t e = 0; e < d; ++e) ar[e] += pj * value[e];
    }
  }
}

FF_VECTORIZE void decode_scores(const float* qf, int64_t rows, int64_t d, const float* keys, int64_t key_stride,
                                int64_t n, float* scores) {
  if (d == 64) return decode_scores_impl<64>(qf, rows, d, keys, key_stride, n, scores);
  if (d == 128) return decode_scores_impl<128>(qf, rows, d, keys, key_stride, n, scores);
  decode_scores_impl<0>(qf, rows, d, keys, key_stride, n, scores);
}

FF_VECTORIZE void decode_values(float* acc, int64_t rows, int64_t d, const float* values, int64_t value_stride,
                                int64_t n, const float* probs) {
  if (d == 64) return decode_values_impl<64>(acc, rows, d, values, value_stride, n, probs);
  if (d == 128) return decode_values_impl<128>(acc, rows, d, values, value_stride, n, probs);
  decode_values_impl<0>(acc, rows, d, values, value_stride, n, probs);
}

FF_VECTORIZE void axpy_row(float* __restrict y, const float* __restrict x, float a, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

template <typename scalar_t>
const float* as_float_rows(const scalar_t* src, int64_t rows, int64_t row_stride, int64_t d, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    (void)rows, (void)d, (void)buf;
    return src;
  } else {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t e = 0; e < d; ++e) buf[i * d + e] = static_cast<float>(src[i * row_stride + e]);
    }
    return buf;
  }
}

struct DecodeProblem {
  int64_t batch, heads, kv_heads, groups, n_q, head_dim, chunk, splits;
  int64_t q_s[3], k_s[3], v_s[3];
  const int32_t* seqlens;
  const float* slopes;
  int64_t slopes_batch_stride;
  Options opt;
};

// Rows of one (b, kvh, split): acc (rows, D) normalized, and lse per row, into part_out/part_lse.
template <typename scalar_t>
void decode_chunk(const DecodeProblem& p, const scalar_t* q, const scalar_t* k, const scalar_t* v, int64_t b,
                  int64_t kvh, int64_t split, float* part_out, float* part_lse) {
  const int64_t D = p.head_dim, rows = p.groups * p.n_q, seqlen = p.seqlens[b];
  std::vector<float> qf(rows * D), acc(rows * D, 0.0f), scores(rows * kDecodeKeys), m(rows, kNegInf), l(rows, 0.0f);
  std::vector<float> kbuf(std::is_same_v<scalar_t, float> ? 0 : 2 * kDecodeKeys * D);
  std::vector<int64_t> vis_lo(rows), vis_hi(rows), pos(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = r / p.groups, h = kvh * p.groups + r % p.groups;
    const scalar_t* qr = q + b * p.q_s[0] + h * p.q_s[1] + t * p.q_s[2];
    for (int64_t e = 0; e < D; ++e) qf[r * D + e] = static_cast<float>(qr[e]);
    pos[r] = seqlen - p.n_q + t;
    std::tie(vis_lo[r], vis_hi[r]) = visible_range(pos[r], seqlen, p.opt);
  }
  int64_t lo = std::min(split * p.chunk, seqlen);
  const int64_t hi = std::min(lo + p.chunk, seqlen);
  lo = std::max(lo, *std::min_element(vis_lo.begin(), vis_lo.end()));
  const scalar_t* kb = k + b * p.k_s[0] + kvh * p.k_s[1];
  const scalar_t* vb = v + b * p.v_s[0] + kvh * p.v_s[1];
  for (int64_t n0 = lo; n0 < hi; n0 += kDecodeKeys) {
    const int64_t n = std::min(kDecodeKeys, hi - n0);
    const float* keys = as_float_rows(kb + n0 * p.k_s[2], n, p.k_s[2], D, kbuf.data());
    const int64_t key_stride = std::is_same_v<scalar_t, float> ? p.k_s[2] : D;
    decode_scores(qf.data(), rows, D, keys, key_stride, n, scores.data());
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = kvh * p.groups + r % p.groups;
      float* s = scores.data() + r * kDecodeKeys;
      finish_scores(s, n, n0, pos[r], p.opt, p.slopes ? p.slopes[b * p.slopes_batch_stride + h] : 0.0f, nullptr, 0,
                    vis_lo[r], vis_hi[r], nullptr);
      const float m_new = std::max(m[r], row_max(s, n));
      const float shift = m_new == kNegInf ? 0.0f : m_new;  // no visible key yet: exp(-inf) = 0
      const float sum = exp_shifted_sum(s, n, 1.0f, shift);
      const float alpha = std::exp(m[r] - shift);
      if (alpha != 1.0f) scale_row(acc.data() + r * D, D, alpha);
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
    }
    const float* values = as_float_rows(vb + n0 * p.v_s[2], n, p.v_s[2], D, kbuf.data() + kDecodeKeys * D);
    const int64_t value_stride = std::is_same_v<scalar_t, float> ? p.v_s[2] : D;
    decode_values(acc.data(), rows, D, values, value_stride, n, scores.data());
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = r / p.groups, h = kvh * p.groups + r % p.groups;
    const int64_t row = ((b * p.heads + h) * p.n_q + t) * p.splits + split;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int64_t e = 0; e < D; ++e) part_out[row * D + e] = acc[r * D + e] * inv;
    part_lse[row] = l[r] > 0.0f ? m[r] + std::log(l[r]) : kNegInf;
  }
}

std::tuple<at::Tensor, at::Tensor> attention_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                                                    const std::optional<at::Tensor>& alibi_slopes, double scale,
                                                    double softcap, int64_t window_left, int64_t window_right,
                                                    int64_t num_splits) {
  const char* op = "fuseformer attention_decode (cpu)";
  const attention::DecodeShape d = attention::check_decode_args(op, q, k_cache, v_cache, seqlens_k, alibi_slopes);
  const int64_t batch = d.batch, heads = d.heads, n_q = d.n_q, head_dim = d.head_dim, kv_heads = d.kv_heads,
                max_k = d.max_k;
  const auto dtype = q.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) &&
                  k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
              op, ": q and the caches must share a dtype, float32, float16 or bfloat16");
  const int32_t* seqlens = seqlens_k.const_data_ptr<int32_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(seqlens[b] >= 0 && seqlens[b] <= max_k, op, ": seqlens_k must lie in [0, L_max]");
    longest = std::max<int64_t>(longest, seqlens[b]);
  }
  const at::Tensor slopes = alibi_slopes ? alibi_slopes->contiguous() : at::Tensor();
  at::Tensor out = empty_output({batch, heads, n_q, head_dim}, q.options());
  at::Tensor lse = at::empty({batch, heads, n_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse.fill_(kNegInf)};

  // Chunks of whole key blocks: enough tasks for every thread when the cache is long.
  const int64_t pairs = batch * kv_heads, blocks = std::max<int64_t>(1, (longest + kDecodeKeys - 1) / kDecodeKeys);
  int64_t splits = num_splits > 0 ? num_splits : (at::get_num_threads() + pairs - 1) / pairs;
  splits = std::clamp<int64_t>(splits, 1, blocks);
  const int64_t chunk = (blocks + splits - 1) / splits * kDecodeKeys;
  splits = std::max<int64_t>(1, (longest + chunk - 1) / chunk);

  DecodeProblem p{};
  p.batch = batch, p.heads = heads, p.kv_heads = kv_heads, p.groups = heads / kv_heads, p.n_q = n_q;
  p.head_dim = head_dim, p.chunk = chunk, p.splits = splits;
  for (int i = 0; i < 3; ++i) p.q_s[i] = q.stride(i), p.k_s[i] = k_cache.stride(i), p.v_s[i] = v_cache.stride(i);
  p.seqlens = seqlens;
  p.slopes = alibi_slopes ? slopes.const_data_ptr<float>() : nullptr;
  p.slopes_batch_stride = alibi_slopes && slopes.dim() == 2 ? heads : 0;
  p.opt = {static_cast<float>(scale), static_cast<float>(softcap), window_left, window_right};

  const bool direct = splits == 1 && dtype == at::kFloat;
  at::Tensor part_out = direct ? out : at::empty({batch, heads, n_q, splits, head_dim}, q.options().dtype(at::kFloat));
  at::Tensor part_lse = direct ? lse : at::empty({batch, heads, n_q, splits}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fuseformer_attention_decode", [&] {
    const scalar_t* qd = q.const_data_ptr<scalar_t>();
    const scalar_t* kd = k_cache.const_data_ptr<scalar_t>();
    const scalar_t* vd = v_cache.const_data_ptr<scalar_t>();
    float* po = part_out.data_ptr<float>();
    float* pl = part_lse.data_ptr<float>();
    at::parallel_for(0, pairs * splits, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t split = task % splits, pair = task / splits;
        decode_chunk<scalar_t>(p, qd, kd, vd, pair / kv_heads, pair % kv_heads, split, po, pl);
      }
    });
    if (direct) return;
    // Combine the chunks of each (b, h, token) row: weights exp(lse_s - max).
    scalar_t* od = out.data_ptr<scalar_t>();
    float* ld = lse.data_ptr<float>();
    for (int64_t row = 0; row < batch * heads * n_q; ++row) {
      float mx = kNegInf;
      for (int64_t s = 0; s < splits; ++s) mx = std::max(mx, pl[row * splits + s]);
      const float shift = mx == kNegInf ? 0.0f : mx;
      float total = 0.0f;
      std::vector<float> o(head_dim, 0.0f);
      for (int64_t s = 0; s < splits; ++s) {
        const float w = std::exp(pl[row * splits + s] - shift);
        if (w == 0.0f) continue;
        total += w;
        axpy_row(o.data(), po + (row * splits + s) * head_dim, w, head_dim);
      }
      const float inv = total > 0.0f ? 1.0f / total : 0.0f;
      for (int64_t e = 0; e < head_dim; ++e) od[row * head_dim + e] = static_cast<scalar_t>(o[e] * inv);
      ld[row] = total > 0.0f ? shift + std::log(total) : kNegInf;
    }
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_decode", &attention_decode);
}

}  // namespace fuseformer::cpu
