// The KV-cache decode op's argument contract (fuseformer::attention_decode), shared by its
// CPU and CUDA kernels: q (B, H, n, D) against caches (B, H_kv, L_max, D) with H a multiple of
// H_kv, a contiguous last dimension, seqlens_k an int32 (B,) tensor on q's device, ALiBi slopes
// float32 (H,) or (B, H). The kernels add what is theirs (dtypes, alignment, head dims).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fuseformer::attention {

struct DecodeShape {
  int64_t batch, heads, n_q, head_dim, kv_heads, max_k;
};

inline DecodeShape check_decode_args(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                                     const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, op, ": q, k_cache, v_cache must be 4-D");
  TORCH_CHECK(k_cache.device() == q.device() && v_cache.device() == q.device() && seqlens_k.device() == q.device(),
              op, ": q, the caches and seqlens_k must be on one device");
  const DecodeShape d{q.size(0), q.size(1), q.size(2), q.size(3), k_cache.size(1), k_cache.size(2)};
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == d.batch && k_cache.size(3) == d.head_dim, op,
              ": k_cache and v_cache must be (B, H_kv, L_max, D) with q's B and D");
  TORCH_CHECK(d.kv_heads > 0 && d.heads % d.kv_heads == 0, op, ": q's heads must be a multiple of the caches' heads");
  TORCH_CHECK(q.stride(3) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1, op,
              ": q and the caches need a contiguous last dimension");
  TORCH_CHECK(seqlens_k.scalar_type() == at::kInt && seqlens_k.dim() == 1 && seqlens_k.size(0) == d.batch &&
                  seqlens_k.is_contiguous(),
              op, ": seqlens_k must be a contiguous int32 (B,) tensor");
  if (alibi_slopes) {
    const at::Tensor& s = *alibi_slopes;
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.device() == q.device() && s.size(-1) == d.heads &&
                    (s.dim() == 1 || (s.dim() == 2 && s.size(0) == d.batch)),
                op, ": alibi_slopes must be float32 (H,) or (B, H) on q's device");
  }
  return d;
}

}  // namespace fuseformer::attention
