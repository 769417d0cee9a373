// x Wᵀ (+ bias) for a few rows of x (decode: one token per sequence), float32, AVX-512.
//
// At one to seven rows the product is a read of the weight, so its speed is the bandwidth at
// which the weight streams in. ATen's GEMM (MKL, which runs AVX2 code on the AMD EPYC of our
// machines) reaches ~70 GB/s on one row from L2/L3 and ~25 GB/s from memory, and ~25 GB/s
// already at four rows; this kernel splits the output columns over the threads and, per
// group of four weight rows, streams them once against every row of x (csrc/cpu/quant.cpp's
// weight-only GEMV is the same loop over codes). benchmarks/NOTES.md has the numbers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string_view>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include "gemm.h"
#include "vectorize.h"

namespace fuseformer::cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
struct GemvArgs {
  const float* x;  // (m, k), rows ldx apart
  const float* w;  // (n, k), rows ldw apart
  const float* bias;    // (n,) or null
  const float* addend;  // (m, n) contiguous or null
  float* out;           // (m, n) contiguous
  int64_t m, n, k, ldx, ldw;
};

constexpr int kCols = 4;  // weight rows streamed together

// out[m0 : m0 + MT, n0 : n0 + NT] with NT <= kCols weight rows, full vectors then a masked tail.
template <int MT, int NT>
__attribute__((target("avx512f"))) void gemv_tile(const GemvArgs& a, int64_t m0, int64_t n0) {
  __m512 acc[MT][NT];
  for (int i = 0; i < MT; ++i) {
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  const float* w = a.w + n0 * a.ldw;
  const float* x = a.x + m0 * a.ldx;
  int64_t k0 = 0;
  for (; k0 + 16 <= a.k; k0 += 16) {
    __m512 wv[NT];
    for (int j = 0; j < NT; ++j) wv[j] = _mm512_loadu_ps(w + j * a.ldw + k0);
    for (int i = 0; i < MT; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * a.ldx + k0);
      for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k0 < a.k) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (a.k - k0)) - 1);
    __m512 wv[NT];
    for (int j = 0; j < NT; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, w + j * a.ldw + k0);
    for (int i = 0; i < MT; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * a.ldx + k0);
      for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i) {
    for (int j = 0; j < NT; ++j) {
      const int64_t at_ = (m0 + i) * a.n + n0 + j;
      a.out[at_] = _mm512_reduce_add_ps(acc[i][j]) + (a.bias ? a.bias[n0 + j] : 0.0f) +
                   (a.addend ? a.addend[at_] : 0.0f);
    }
  }
}

template <int MT>
__attribute__((target("avx512f"))) void gemv_rows(const GemvArgs& a, int64_t m0, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kCols <= n_end; n += kCols) gemv_tile<MT, kCols>(a, m0, n);
  switch (n_end - n) {
    case 3: gemv_tile<MT, 3>(a, m0, n); break;
    case 2: gemv_tile<MT, 2>(a, m0, n); break;
    case 1: gemv_tile<MT, 1>(a, m0, n); break;
    default: break;
  }
}

// Four rows of x at a time (16 accumulators: the weight vectors and x's leave 16 of the 32
// registers for loads); the remaining rows in one pass of their own.
__attribute__((target("avx512f"))) void gemv_columns(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
  int64_t m0 = 0;
  for (; m0 + 4 <= a.m; m0 += 4) gemv_rows<4>(a, m0, n_begin, n_end);
  switch (a.m - m0) {
    case 3: gemv_rows<3>(a, m0, n_begin, n_end); break;
    case 2: gemv_rows<2>(a, m0, n_begin, n_end); break;
    case 1: gemv_rows<1>(a, m0, n_begin, n_end); break;
    default: break;
  }
}

#endif

}  // namespace

bool has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
#else
  return false;
#endif
}

bool cpu_is_intel() {
  static const bool intel = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid(0, &eax, &ebx, &ecx, &edx)) {
      char vendor[12];
      std::memcpy(vendor, &ebx, 4), std::memcpy(vendor + 4, &edx, 4), std::memcpy(vendor + 8, &ecx, 4);
      return std::string_view(vendor, 12) == "GenuineIntel";
    }
#endif
    return false;
  }();
  return intel;
}

GemmLibrary vendor_gemm_library() {
  return (cpu_is_intel() || !has_avx512()) && at::hasMKL() ? GemmLibrary::kAten : GemmLibrary::kOneDnn;
}

GemmLibrary per_call_gemm_library() {
  static const GemmLibrary library = [] {
    if (const char* env = std::getenv("FUSEFORMER_CPU_GEMM")) {
      const std::string_view v(env);
      if (v == "onednn") return GemmLibrary::kOneDnn;
      if (v == "aten") return GemmLibrary::kAten;
      TORCH_CHECK(v.empty() || v == "auto", "FUSEFORMER_CPU_GEMM must be onednn, aten or auto, got '", v, "'");
    }
    return vendor_gemm_library();
  }();
  return library;
}

std::optional<at::Tensor> small_rows_linear(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& addend) {
#if defined(__x86_64__) && defined(__GNUC__)
  auto f32 = [](const std::optional<at::Tensor>& t) {
    return !t || (t->scalar_type() == at::kFloat && t->is_contiguous());
  };
  if (!has_avx512() || x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat || x.dim() != 2 ||
      weight.dim() != 2 || x.size(0) > kSmallRowsMax || x.stride(1) != 1 || weight.stride(1) != 1 || !f32(bias) ||
      !f32(addend) || (addend && addend->sizes() != at::IntArrayRef{x.size(0), weight.size(0)})) {
    return std::nullopt;
  }
  const int64_t m = x.size(0), n = weight.size(0), k = weight.size(1);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  if (k == 0) return std::nullopt;  // ATen's semantics for the empty reduction
  const GemvArgs a{x.const_data_ptr<float>(), weight.const_data_ptr<float>(),
                   bias ? bias->const_data_ptr<float>() : nullptr,
                   addend ? addend->const_data_ptr<float>() : nullptr, out.data_ptr<float>(), m, n, k, x.stride(0),
                   weight.stride(0)};
  // Each task streams at least ~64 KB of the weight: below that a thread's wake-up costs more
  // than its share.
  const int64_t grain = std::max<int64_t>(kCols, ((int64_t{1} << 14) / std::max<int64_t>(k, 1) + kCols - 1) / kCols * kCols);
  at::parallel_for(0, (n + kCols - 1) / kCols, std::max<int64_t>(1, grain / kCols), [&](int64_t begin, int64_t end) {
    gemv_columns(a, begin * kCols, std::min(end * kCols, n));
  });
  return out;
#else
  return std::nullopt;
#endif
}

}  // namespace fuseformer::cpu
