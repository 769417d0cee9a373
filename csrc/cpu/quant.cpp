// Weight-only quantized linear on the CPU: y = x Wᵀ (+ b) with W stored as int8 per output row
// or int4 in groups along K (python/fuseformer/ops/quant.py has the format).
//
// Decode-sized inputs (up to kGemvRows rows) are bound by reading the weight, so the codes are
// read once, straight from their packed bytes, and converted to float32 inside the dot
// product: 1 byte (int8) or half a byte (int4) per weight instead of float32's 4. Each output
// row n is a task: its codes stream from memory once; per group a vector dot of x with (u - z)
// (the zero point subtracted before the product: no cancellation), scaled into the row's
// total. Runtime dispatch: AVX-512 intrinsics where the CPU has them (codes converted once for
// up to 4 input rows), else the compiler's AVX2 / baseline loops. Larger inputs are compute
// bound: the weight is dequantized once to float32 and multiplied by oneDNN's GEMM on it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "gemm.h"
#include "vectorize.h"

namespace fuseformer::cpu {
namespace {

// Crossover measured at 2048x2048 (benchmarks/NOTES.md): 8 rows GEMV 0.36 ms, 12 rows 0.78 ms,
// dequantize + oneDNN 0.64 ms from 11 rows up to 17.
constexpr int64_t kGemvRows = 10;

struct QuantArgs {
  const float* x;       // (M, K); int4: deinterleaved to x_even | x_odd, (M, K) as 2 (M, K/2)
  const float* x_odd;   // int4: the odd columns
  const void* codes;    // int8 (N, K) or uint8 (N, K/2)
  const float* scales;  // (N, G)
  const uint8_t* zeros; // (N, G) or null (int4 symmetric: 8; int8: none)
  const float* bias;    // (N,) or null
  float* out;           // (M, N)
  int64_t m, n, k, groups, group_size;
};

// One output row n for every row of x. `omp simd` with the reduction: the compiler keeps one
// vector of partial sums per loop (float addition is not associative, so without it the
// loops stay scalar).
template <int BITS>
__attribute__((always_inline)) inline void quant_row(const QuantArgs& a, int64_t n) {
  const float* scales = a.scales + n * a.groups;
  const float bias = a.bias ? a.bias[n] : 0.0f;
  if constexpr (BITS == 8) {
    const int8_t* q = static_cast<const int8_t*>(a.codes) + n * a.k;
    for (int64_t m = 0; m < a.m; ++m) {
      const float* x = a.x + m * a.k;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < a.k; ++k) acc += x[k] * static_cast<float>(q[k]);
      a.out[m * a.n + n] = acc * scales[0] + bias;
    }
  } else {
    const uint8_t* q = static_cast<const uint8_t*>(a.codes) + n * (a.k / 2);
    const int64_t half = a.k / 2, pairs = a.group_size / 2;
    for (int64_t m = 0; m < a.m; ++m) {
      const float* xe = a.x + m * half;
      const float* xo = a.x_odd + m * half;
      float total = 0.0f;
      for (int64_t g = 0; g < a.groups; ++g) {
        // The zero point comes off each code before the product (no cancellation at the end).
        const float z = a.zeros ? static_cast<float>(a.zeros[n * a.groups + g]) : 8.0f;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = g * pairs; j < (g + 1) * pairs; ++j) {
          acc += xe[j] * (static_cast<float>(q[j] & 15) - z) + xo[j] * (static_cast<float>(q[j] >> 4) - z);
        }
        total += scales[g] * acc;
      }
      a.out[m * a.n + n] = total + bias;
    }
  }
}

template <int BITS>
FF_VECTORIZE void quant_rows(const QuantArgs& a, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) quant_row<BITS>(a, n);
}

#if defined(__x86_64__) && defined(__GNUC__)
// AVX-512: the codes of 16 bytes are widened and converted once and multiplied into up to
// kTile rows of x; two accumulators per row hide the FMA latency, and each group's sum is
// scaled into a vector total (one horizontal sum per output). The auto-vectorized loops
// above end every group with a horizontal sum and convert the codes again for every row.
constexpr int kTile = 4;

template <int MT>
__attribute__((target("avx512f"))) void int8_row_avx512(const QuantArgs& a, int64_t n, int64_t m0) {
  const int8_t* q = static_cast<const int8_t*>(a.codes) + n * a.k;
  __m512 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t k0 = 0;
  for (; k0 + 32 <= a.k; k0 += 32) {
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k0))));
    const __m512 w1 =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k0 + 16))));
    for (int m = 0; m < MT; ++m) {
      const float* x = a.x + (m0 + m) * a.k + k0;
      acc[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x), w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + 16), w1, acc[m][1]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
    const float* x = a.x + (m0 + m) * a.k;
    for (int64_t k = k0; k < a.k; ++k) sum += x[k] * static_cast<float>(q[k]);
    a.out[(m0 + m) * a.n + n] = sum * a.scales[n] + (a.bias ? a.bias[n] : 0.0f);
  }
}

template <int MT>
__attribute__((target("avx512f"))) void int4_row_avx512(const QuantArgs& a, int64_t n, int64_t m0) {
  const uint8_t* q = static_cast<const uint8_t*>(a.codes) + n * (a.k / 2);
  const int64_t half = a.k / 2, pairs = a.group_size / 2;  // pairs: a multiple of 16
  const __m512i nibble = _mm512_set1_epi32(15);
  __m512 total[MT];
  for (int m = 0; m < MT; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    const __m512 z = _mm512_set1_ps(a.zeros ? static_cast<float>(a.zeros[n * a.groups + g]) : 8.0f);
    __m512 acc[MT][2];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t j = g * pairs; j < (g + 1) * pairs; j += 16) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
      const __m512 lo = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, nibble)), z);
      const __m512 hi = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), z);
      for (int m = 0; m < MT; ++m) {
        acc[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(a.x + (m0 + m) * half + j), lo, acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(a.x_odd + (m0 + m) * half + j), hi, acc[m][1]);
      }
    }
    const __m512 s = _mm512_set1_ps(a.scales[n * a.groups + g]);
    for (int m = 0; m < MT; ++m) total[m] = _mm512_fmadd_ps(_mm512_add_ps(acc[m][0], acc[m][1]), s, total[m]);
  }
  for (int m = 0; m < MT; ++m) {
    a.out[(m0 + m) * a.n + n] = _mm512_reduce_add_ps(total[m]) + (a.bias ? a.bias[n] : 0.0f);
  }
}

template <int BITS, int MT>
__attribute__((target("avx512f"))) void row_avx512(const QuantArgs& a, int64_t n, int64_t m0) {
  if constexpr (BITS == 8) {
    int8_row_avx512<MT>(a, n, m0);
  } else {
    int4_row_avx512<MT>(a, n, m0);
  }
}

template <int BITS>
__attribute__((target("avx512f"))) void quant_rows_avx512(const QuantArgs& a, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    int64_t m0 = 0;
    for (; m0 + kTile <= a.m; m0 += kTile) row_avx512<BITS, kTile>(a, n, m0);
    switch (a.m - m0) {
      case 3: row_avx512<BITS, 3>(a, n, m0); break;
      case 2: row_avx512<BITS, 2>(a, n, m0); break;
      case 1: row_avx512<BITS, 1>(a, n, m0); break;
      default: break;
    }
  }
}

#else
template <int BITS>
void quant_rows_avx512(const QuantArgs&, int64_t, int64_t) {}
#endif

// One row of the float32 weight: (u - z)·s per element (int4: a byte's low nibble is the even
// column, per group one scale and zero point).
FF_VECTORIZE void dequantize_row(int64_t bits, const void* codes, const float* s, const uint8_t* z, float* out,
                                 int64_t k, int64_t group_size) {
  if (bits == 8) {
    const int8_t* q = static_cast<const int8_t*>(codes);
    const float scale = s[0];
#pragma omp simd
    for (int64_t c = 0; c < k; ++c) out[c] = static_cast<float>(q[c]) * scale;
    return;
  }
  const uint8_t* q = static_cast<const uint8_t*>(codes);
  const int64_t pairs = group_size / 2;
  for (int64_t g = 0; g < k / group_size; ++g) {
    const float scale = s[g], zero = z ? static_cast<float>(z[g]) : 8.0f;
    const uint8_t* qg = q + g * pairs;
    float* o = out + g * group_size;
#pragma omp simd
    for (int64_t j = 0; j < pairs; ++j) {
      o[2 * j] = (static_cast<float>(qg[j] & 15) - zero) * scale;
      o[2 * j + 1] = (static_cast<float>(qg[j] >> 4) - zero) * scale;
    }
  }
}

// The float32 (N, K) weight.
at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                      int64_t bits, int64_t k, int64_t group_size) {
  const int64_t n = codes.size(0), groups = scales.size(1);
  at::Tensor w = at::empty({n, k}, scales.options());
  float* out = w.data_ptr<float>();
  const float* s = scales.const_data_ptr<float>();
  const uint8_t* z = zeros ? zeros->const_data_ptr<uint8_t>() : nullptr;
  const auto* q = static_cast<const uint8_t*>(codes.const_data_ptr());
  const int64_t row_bytes = bits == 8 ? k : k / 2;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      dequantize_row(bits, q + r * row_bytes, s + r * groups, z ? z + r * groups : nullptr, out + r * k, k,
                     group_size);
    }
  });
  return w;
}

at::Tensor quantized_linear_cpu(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales_in,
                                const std::optional<at::Tensor>& zeros_in, const std::optional<at::Tensor>& bias_in,
                                int64_t bits, int64_t group_size) {
  const char* op = "fuseformer quantized_linear";
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits must be 8 or 4, got ", bits);
  TORCH_CHECK(x_in.dim() == 2 && codes.dim() == 2 && scales_in.dim() == 2, op,
              ": x (M, K), qweight and scales must be 2-D");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dtype);
  const int64_t m = x_in.size(0), k = x_in.size(1), n = codes.size(0);
  TORCH_CHECK(codes.scalar_type() == (bits == 8 ? at::kChar : at::kByte) && codes.size(1) == (bits == 8 ? k : k / 2),
              op, ": qweight must be ", bits == 8 ? "int8 (N, K)" : "uint8 (N, K/2)", " for K=", k, ", got ",
              codes.scalar_type(), " ", codes.sizes());
  TORCH_CHECK(group_size > 0 && k % group_size == 0 && (bits == 8 ? group_size == k : group_size % 32 == 0), op,
              ": group_size ", group_size, " does not fit K=", k, " (int8: K; int4: a multiple of 32 dividing K)");
  const int64_t groups = k / group_size;
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.size(0) == n && scales_in.size(1) == groups, op,
              ": scales must be float32 [", n, ", ", groups, "], got ", scales_in.scalar_type(), " ", scales_in.sizes());
  TORCH_CHECK(!zeros_in || (bits == 4 && zeros_in->scalar_type() == at::kByte && zeros_in->size(0) == n &&
                            zeros_in->size(1) == groups),
              op, ": zeros must be uint8 [", n, ", ", groups, "] (int4 only)");
  TORCH_CHECK(!bias_in || (bias_in->dim() == 1 && bias_in->size(0) == n), op, ": bias must be [", n, "]");
  const at::Tensor scales = scales_in.contiguous(), c = codes.contiguous();
  const std::optional<at::Tensor> zeros = zeros_in ? std::optional<at::Tensor>(zeros_in->contiguous()) : std::nullopt;
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor bias = bias_in ? bias_in->to(at::kFloat).contiguous() : at::Tensor();
  if (m > kGemvRows) {
    // Prefill: the float weight for this call, then oneDNN's GEMM on it as it is.
    const at::Tensor w = dequantize(c, scales, zeros, bits, k, group_size);
    return PackedLinear::plain(x, w, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt).to(dtype);
  }
  at::Tensor out = at::empty({m, n}, x.options());
  QuantArgs a{x.const_data_ptr<float>(), nullptr, c.const_data_ptr(), scales.const_data_ptr<float>(),
              zeros ? zeros->const_data_ptr<uint8_t>() : nullptr, bias.defined() ? bias.const_data_ptr<float>() : nullptr,
              out.data_ptr<float>(), m, n, k, groups, group_size};
  at::Tensor x_even, x_odd;
  if (bits == 4) {
    // Even and odd columns apart, so the low and high nibbles of a byte meet contiguous x.
    x_even = x.slice(1, 0, k, 2).contiguous();
    x_odd = x.slice(1, 1, k, 2).contiguous();
    a.x = x_even.const_data_ptr<float>();
    a.x_odd = x_odd.const_data_ptr<float>();
  }
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(k * m, 1));
  const bool avx512 = has_avx512();
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    if (avx512) {
      bits == 8 ? quant_rows_avx512<8>(a, begin, end) : quant_rows_avx512<4>(a, begin, end);
    } else {
      bits == 8 ? quant_rows<8>(a, begin, end) : quant_rows<4>(a, begin, end);
    }
  });
  return out.to(dtype);
}

// ---- W8A8: int8 activations quantized per row, int8 x int8 -> int32 GEMM ----

// Codes and scale of one row: s = max|x| / 127, q = round(x / s) half to even (the float32
// magic number 1.5·2^23, as fuseformer.ops.quantize_activation: every backend's codes agree).
FF_VECTORIZE void quantize_row(const float* __restrict x, int8_t* __restrict q, float* scale, int64_t k) {
  float amax = 0.0f;
#pragma omp simd reduction(max : amax)
  for (int64_t j = 0; j < k; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float s = std::max(amax / 127.0f, std::numeric_limits<float>::min());
  constexpr float kRound = 12582912.0f;
  for (int64_t j = 0; j < k; ++j) {
    const float v = (x[j] / s + kRound) - kRound;
    q[j] = static_cast<int8_t>(std::min(std::max(v, -127.0f), 127.0f));
  }
  *scale = s;
}

at::Tensor int8_dynamic_linear_cpu(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales_in,
                                   const std::optional<at::Tensor>& bias_in) {
  const char* op = "fuseformer int8_dynamic_linear";
  TORCH_CHECK(x_in.dim() == 2 && qweight.dim() == 2 && qweight.scalar_type() == at::kChar, op,
              ": x must be 2-D (M, K) and qweight int8 (N, K)");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dtype);
  const int64_t m = x_in.size(0), k = x_in.size(1), n = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == k, op, ": qweight must have K=", k, " columns, got ", qweight.size(1));
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.numel() == n, op, ": scales must be float32 with ",
              n, " values");
  TORCH_CHECK(!bias_in || (bias_in->dim() == 1 && bias_in->size(0) == n), op, ": bias must be [", n, "]");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor qx = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({m}, x.options());
  const float* xp = x.const_data_ptr<float>();
  int8_t* qp = qx.data_ptr<int8_t>();
  float* sp = sx.data_ptr<float>();
  at::parallel_for(0, m, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) quantize_row(xp + r * k, qp + r * k, sp + r, k);
  });
  // oneDNN's int8 GEMM (VNNI / AMX where the CPU has them), exact in int32.
  const at::Tensor acc = at::_int_mm(qx, qweight.t());
  at::Tensor out = (acc.to(at::kFloat) * sx.unsqueeze(1)) * scales_in.reshape({1, n}).to(at::kFloat);
  if (bias_in) out.add_(bias_in->to(at::kFloat));
  return out.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, CPU, m) {
  m.impl("quantized_linear", &quantized_linear_cpu);
  m.impl("int8_dynamic_linear", &int8_dynamic_linear_cpu);
}

}  // namespace fuseformer::cpu
