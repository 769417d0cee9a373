// KV-cache decode attention on CUDA (flash-decoding): a few new queries per sequence against
// a long cache, split over the cache so that a batch-1 decode still fills the GPU.
//
// Split kernel: one block per (cache chunk, batch, kv head, block of kMaxRows query rows). The
// queries of the heads of the GQA group (groups x n_q rows; more than kMaxRows take several
// blocks) sit in shared memory as float. The block
// walks its chunk in tiles of kTileKeys keys:
//   scores: thread j owns key j of the tile and computes its dot product with every query
//           row, reading the key once in 16-byte vectors (the rows are shared-memory
//           broadcasts);
//   softmax: warp w updates rows w, w + 4, ...: tile max and sum by warp shuffles, online
//           rescaling of the running max / sum (stored in shared memory);
//   values: thread (slot, c) owns 8 head-dim columns (vector c) of query rows slot,
//           slot + slots, ... and accumulates P·V in float registers.
// It writes the chunk's normalized partial output and log-sum-exp (float32). The combine
// kernel merges the chunks by their log-sum-exps.
//
// Masking as kernels/attention.py: new token t sits at key position seqlen - n_q + t
// (lower-right), window (left, right) around it (causal: right = 0), ALiBi, softcap.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "../attention.h"

namespace fuseformer::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTileKeys = kThreads;  // one key per thread in the score phase
constexpr int kMaxRows = 16;         // GQA group size x new tokens
constexpr int kMaxHeadDim = 256;
constexpr int kVec = 8;               // head-dim elements per 16-byte vector (half / bf16)
constexpr int kMaxRowsPerThread = 4;  // rows per thread in the value phase (head dim 256: 4 slots)
constexpr int kMaxSplits = 128;

template <typename T>
struct alignas(16) Vec8 {
  T v[kVec];
};

struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  float* part_out;  // (B, H, n_q, splits, D)
  float* part_lse;  // (B, H, n_q, splits)
  const int* seqlens;
  const float* slopes;  // (H,) or (B, H), or null
  int64_t q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, slopes_sb;
  int heads, kv_heads, groups, n_q, head_dim, chunk, num_splits;
  float scale, softcap;
  int window_left, window_right;
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ __launch_bounds__(kThreads) void decode_split_kernel(const DecodeParams p) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const int split = blockIdx.x, b = blockIdx.y / p.kv_heads, kvh = blockIdx.y % p.kv_heads;
  // This block's query rows: row0 + r, r < rows, of the group's groups x n_q rows.
  const int row0 = blockIdx.z * kMaxRows;
  const int rows = min(kMaxRows, p.groups * p.n_q - row0), D = p.head_dim, chunks = D / kVec;
  const int seqlen = p.seqlens[b];
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;

  __shared__ float q_s[kMaxRows * kMaxHeadDim];
  __shared__ float p_s[kMaxRows][kTileKeys];
  __shared__ float m_s[kMaxRows], l_s[kMaxRows], alpha_s[kMaxRows];

  for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const int t = (row0 + r) / p.groups, h = kvh * p.groups + (row0 + r) % p.groups;
    q_s[idx] = static_cast<float>(q[b * p.q_sb + h * p.q_sh + t * p.q_ss + d]);
  }
  if (threadIdx.x < rows) {
    m_s[threadIdx.x] = kNegInf;
    l_s[threadIdx.x] = 0.f;
  }

  int lo = split * p.chunk;
  const int hi = min(lo + p.chunk, seqlen);
  if (p.window_left >= 0) lo = max(lo, seqlen - p.n_q - p.window_left);  // the first row's first key

  const int slots = kThreads / chunks, slot = threadIdx.x / chunks, c = threadIdx.x % chunks;
  const bool v_active = slot < slots;
  float acc[kMaxRowsPerThread][kVec];
#pragma unroll
  for (int i = 0; i < kMaxRowsPerThread; ++i)
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[i][e] = 0.f;
  __syncthreads();

  for (int tile = lo; tile < hi; tile += kTileKeys) {
    // ---- scores: thread j owns key tile + j ----
    const int key = tile + threadIdx.x;
    float s[kMaxRows];
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) s[r] = 0.f;
    if (key < hi) {
      const Vec8<T>* k_row = reinterpret_cast<const Vec8<T>*>(k + key * p.k_ss);
      for (int cc = 0; cc < chunks; ++cc) {
        const Vec8<T> kv = k_row[cc];
        float kf[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) kf[e] = static_cast<float>(kv.v[e]);
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r) {
          if (r < rows) {
            const float* qr = q_s + r * D + cc * kVec;
#pragma unroll
            for (int e = 0; e < kVec; ++e) s[r] = fmaf(qr[e], kf[e], s[r]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r < rows) {
        const int t = (row0 + r) / p.groups, h = kvh * p.groups + (row0 + r) % p.groups;
        const int pos = seqlen - p.n_q + t;
        float x = s[r] * p.scale;
        if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
        if (p.slopes) x -= p.slopes[b * p.slopes_sb + h] * fabsf(static_cast<float>(pos - key));
        bool visible = key < hi;
        if (p.window_right >= 0) visible = visible && key <= pos + p.window_right;
        if (p.window_left >= 0) visible = visible && key >= pos - p.window_left;
        p_s[r][threadIdx.x] = visible ? x : kNegInf;
      }
    }
    __syncthreads();

    // ---- online softmax: warp w updates rows w, w + kWarps, ... ----
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int r = warp; r < rows; r += kWarps) {
      float mx = kNegInf;
      for (int j = lane; j < kTileKeys; j += 32) mx = fmaxf(mx, p_s[r][j]);
      mx = warp_max(mx);
      const float m_new = fmaxf(m_s[r], mx);
      const float shift = m_new == kNegInf ? 0.f : m_new;  // no visible key yet: exp(-inf) = 0
      float sum = 0.f;
      for (int j = lane; j < kTileKeys; j += 32) {
        const float e = __expf(p_s[r][j] - shift);
        p_s[r][j] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float alpha = __expf(m_s[r] - shift);
        alpha_s[r] = alpha;
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = m_new;
      }
    }
    __syncthreads();

    // ---- values: acc[row] = acc[row] * alpha + sum_j P[row, j] V[j] ----
    if (v_active) {
#pragma unroll
      for (int i = 0; i < kMaxRowsPerThread; ++i) {
        const int r = slot + i * slots;
        if (r < rows) {
          const float alpha = alpha_s[r];
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[i][e] *= alpha;
        }
      }
      const int keys_here = min(kTileKeys, hi - tile);
      for (int j = 0; j < keys_here; ++j) {
        const Vec8<T> vv = reinterpret_cast<const Vec8<T>*>(v + (tile + j) * p.v_ss)[c];
        float vf[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) vf[e] = static_cast<float>(vv.v[e]);
#pragma unroll
        for (int i = 0; i < kMaxRowsPerThread; ++i) {
          const int r = slot + i * slots;
          if (r < rows) {
            const float pj = p_s[r][j];
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[i][e] = fmaf(pj, vf[e], acc[i][e]);
          }
        }
      }
    }
    __syncthreads();  // p_s and alpha_s are rewritten by the next tile
  }

  // ---- the chunk's normalized output and log-sum-exp ----
  if (v_active) {
#pragma unroll
    for (int i = 0; i < kMaxRowsPerThread; ++i) {
      const int r = slot + i * slots;
      if (r < rows) {
        const int t = (row0 + r) / p.groups, h = kvh * p.groups + (row0 + r) % p.groups;
        const float l = l_s[r];
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int64_t row = ((static_cast<int64_t>(b) * p.heads + h) * p.n_q + t) * p.num_splits + split;
        float* out = p.part_out + row * D + c * kVec;
#pragma unroll
        for (int e = 0; e < kVec; ++e) out[e] = acc[i][e] * inv;
      }
    }
  }
  if (threadIdx.x < rows) {
    const int r = threadIdx.x;
    const int t = (row0 + r) / p.groups, h = kvh * p.groups + (row0 + r) % p.groups;
    const int64_t row = ((static_cast<int64_t>(b) * p.heads + h) * p.n_q + t) * p.num_splits + split;
    p.part_lse[row] = l_s[r] > 0.f ? m_s[r] + logf(l_s[r]) : kNegInf;
  }
}

// One block per (batch, head, token): out = sum_s w_s o_s / sum_s w_s, w_s = exp(lse_s - max).
template <typename T>
__global__ __launch_bounds__(kThreads) void decode_combine_kernel(const float* part_out, const float* part_lse, T* out,
                                                                  float* lse, int head_dim, int num_splits) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t row = blockIdx.x;  // (b, h, t) flattened, as out and lse are contiguous
  __shared__ float w_s[kMaxSplits];
  __shared__ float total_s, max_s;
  if (threadIdx.x == 0) {
    float mx = kNegInf;
    for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, part_lse[row * num_splits + s]);
    const float shift = mx == kNegInf ? 0.f : mx;
    float total = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      w_s[s] = __expf(part_lse[row * num_splits + s] - shift);
      total += w_s[s];
    }
    total_s = total;
    max_s = shift;
  }
  __syncthreads();
  const float total = total_s;
  const float inv = total > 0.f ? 1.f / total : 0.f;
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    float o = 0.f;
    for (int s = 0; s < num_splits; ++s) o = fmaf(w_s[s], part_out[(row * num_splits + s) * head_dim + d], o);
    out[row * head_dim + d] = static_cast<T>(o * inv);
  }
  if (threadIdx.x == 0) lse[row] = total > 0.f ? max_s + logf(total) : kNegInf;
}

template <typename T>
void launch(const DecodeParams& p, at::Tensor& out, at::Tensor& lse, int64_t query_rows, int64_t batch_kv_heads) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const int row_blocks = (p.groups * p.n_q + kMaxRows - 1) / kMaxRows;
  decode_split_kernel<T><<<dim3(p.num_splits, batch_kv_heads, row_blocks), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  decode_combine_kernel<T><<<query_rows, kThreads, 0, stream>>>(p.part_out, p.part_lse, out.data_ptr<T>(),
                                                               lse.data_ptr<float>(), p.head_dim, p.num_splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int dim = 0; dim < 3; ++dim)
    if (t.stride(dim) % kVec != 0) return false;
  return true;
}

std::tuple<at::Tensor, at::Tensor> attention_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                                                    const std::optional<at::Tensor>& alibi_slopes, double scale,
                                                    double softcap, int64_t window_left, int64_t window_right,
                                                    int64_t num_splits) {
  const char* op = "fuseformer attention_decode (cuda)";
  const attention::DecodeShape d = attention::check_decode_args(op, q, k_cache, v_cache, seqlens_k, alibi_slopes);
  const int64_t batch = d.batch, heads = d.heads, n_q = d.n_q, head_dim = d.head_dim, kv_heads = d.kv_heads,
                max_k = d.max_k;
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor");
  TORCH_CHECK((q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) &&
                  k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              op, ": q and the caches must share a dtype, float16 or bfloat16");
  TORCH_CHECK(head_dim % kVec == 0 && head_dim <= kMaxHeadDim, op, ": head dim must be a multiple of 8, at most ",
              kMaxHeadDim, "; got ", head_dim);
  const int64_t groups = heads / kv_heads;
  TORCH_CHECK(aligned16(k_cache) && aligned16(v_cache), op,
              ": the caches must be 16-byte aligned with strides that are multiples of 8 elements");
  const at::Tensor slopes = alibi_slopes ? alibi_slopes->contiguous() : at::Tensor();
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({batch, heads, n_q, head_dim}, q.options());
  at::Tensor lse = at::empty({batch, heads, n_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse.fill_(-std::numeric_limits<float>::infinity())};

  // Two waves of blocks over the SMs, chunks of whole tiles.
  int64_t splits = num_splits;
  if (splits <= 0) {
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    splits = (2 * sms + batch * kv_heads - 1) / (batch * kv_heads);
  }
  const int64_t tiles = std::max<int64_t>(1, (max_k + kTileKeys - 1) / kTileKeys);
  splits = std::clamp<int64_t>(splits, 1, std::min<int64_t>(tiles, kMaxSplits));
  const int64_t chunk = ((tiles + splits - 1) / splits) * kTileKeys;
  splits = std::max<int64_t>(1, (max_k + chunk - 1) / chunk);

  at::Tensor part_out = at::empty({batch, heads, n_q, splits, head_dim}, q.options().dtype(at::kFloat));
  at::Tensor part_lse = at::empty({batch, heads, n_q, splits}, q.options().dtype(at::kFloat));
  DecodeParams p{};
  p.q = q.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.part_out = part_out.data_ptr<float>();
  p.part_lse = part_lse.data_ptr<float>();
  p.seqlens = seqlens_k.data_ptr<int>();
  p.slopes = alibi_slopes ? slopes.data_ptr<float>() : nullptr;
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_ss = q.stride(2);
  p.k_sb = k_cache.stride(0), p.k_sh = k_cache.stride(1), p.k_ss = k_cache.stride(2);
  p.v_sb = v_cache.stride(0), p.v_sh = v_cache.stride(1), p.v_ss = v_cache.stride(2);
  p.slopes_sb = alibi_slopes && slopes.dim() == 2 ? heads : 0;
  p.heads = heads, p.kv_heads = kv_heads, p.groups = groups, p.n_q = n_q, p.head_dim = head_dim;
  p.chunk = chunk, p.num_splits = splits;
  p.scale = static_cast<float>(scale), p.softcap = static_cast<float>(softcap);
  p.window_left = window_left, p.window_right = window_right;

  if (q.scalar_type() == at::kHalf) {
    launch<at::Half>(p, out, lse, batch * heads * n_q, batch * kv_heads);
  } else {
    launch<at::BFloat16>(p, out, lse, batch * heads * n_q, batch * kv_heads);
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, CUDA, m) { m.impl("attention_decode", &attention_decode); }

}  // namespace fuseformer::cuda
