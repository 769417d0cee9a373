// Weight-only quantized linear on CUDA (python/fuseformer/ops/quant.py has the format).
//
// Decode (up to kGemvRows rows of x): a GEMV bound by reading the codes. One warp per output
// row n: each lane loads 16 bytes of codes at a time (16 int8 weights, or 32 int4 in one
// group: groups are multiples of 32), converts them in registers and accumulates the dot with
// every row of x in float32; a warp shuffle sums the lanes. Larger inputs: the weight is
// dequantized once (one thread per byte) and multiplied by cuBLAS.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace fuseformer::cuda {
namespace {

constexpr int kGemvRows = 8;
constexpr int kWarps = 4;

template <typename T, int BITS, int M>
__global__ void __launch_bounds__(kWarps * 32)
    quant_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                      const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ out, int rows,
                      int64_t n, int64_t k, int64_t groups, int64_t group_size) {
  // M: the row count rounded up to a template size; rows: the real one.
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;
  constexpr int kPerByte = BITS == 8 ? 1 : 2;
  const int64_t row_bytes = k / kPerByte;
  const uint8_t* q = codes + row * row_bytes;
  float acc[M] = {};
  for (int64_t b0 = lane * 16; b0 < row_bytes; b0 += 32 * 16) {
    const uint4 packed = *reinterpret_cast<const uint4*>(q + b0);
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&packed);
    const int64_t k0 = b0 * kPerByte;
    const int64_t g = k0 / group_size;
    const float s = scales[row * groups + g];
    const float z = BITS == 8 ? 0.0f : (zeros ? static_cast<float>(zeros[row * groups + g]) : 8.0f);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      if constexpr (BITS == 8) {
        const float w = static_cast<float>(static_cast<int8_t>(bytes[j])) * s;
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (m < rows) acc[m] += static_cast<float>(x[m * k + k0 + j]) * w;
        }
      } else {
        const float lo = (static_cast<float>(bytes[j] & 15) - z) * s;
        const float hi = (static_cast<float>(bytes[j] >> 4) - z) * s;
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (m < rows) {
            acc[m] += static_cast<float>(x[m * k + k0 + 2 * j]) * lo +
                      static_cast<float>(x[m * k + k0 + 2 * j + 1]) * hi;
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float v = acc[m];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0 && m < rows) out[m * n + row] = static_cast<T>(v + (bias ? static_cast<float>(bias[row]) : 0.0f));
  }
}

// The (N, K) weight in x's dtype, one thread per byte of codes.
template <typename T, int BITS>
__global__ void dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                                  const uint8_t* __restrict__ zeros, T* __restrict__ w, int64_t n, int64_t k,
                                  int64_t groups, int64_t group_size) {
  constexpr int kPerByte = BITS == 8 ? 1 : 2;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * (k / kPerByte)) return;
  const int64_t row = idx / (k / kPerByte), col = (idx % (k / kPerByte)) * kPerByte;
  const int64_t g = col / group_size;
  const float s = scales[row * groups + g];
  if constexpr (BITS == 8) {
    w[row * k + col] = static_cast<T>(static_cast<float>(static_cast<int8_t>(codes[idx])) * s);
  } else {
    const float z = zeros ? static_cast<float>(zeros[row * groups + g]) : 8.0f;
    w[row * k + col] = static_cast<T>((static_cast<float>(codes[idx] & 15) - z) * s);
    w[row * k + col + 1] = static_cast<T>((static_cast<float>(codes[idx] >> 4) - z) * s);
  }
}

template <typename T, int BITS, int M>
void launch_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const uint8_t* zeros,
                 const T* bias, at::Tensor& out, int64_t group_size, cudaStream_t stream) {
  const int64_t n = codes.size(0), k = x.size(1);
  quant_gemv_kernel<T, BITS, M><<<static_cast<unsigned>((n + kWarps - 1) / kWarps), kWarps * 32, 0, stream>>>(
      x.const_data_ptr<T>(), static_cast<const uint8_t*>(codes.const_data_ptr()), scales.const_data_ptr<float>(),
      zeros, bias, out.data_ptr<T>(), static_cast<int>(x.size(0)), n, k, scales.size(1), group_size);
}

template <typename T, int BITS>
void gemv(int64_t m, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const uint8_t* zeros,
          const T* bias, at::Tensor& out, int64_t group_size, cudaStream_t stream) {
  switch (m) {
    case 1: return launch_gemv<T, BITS, 1>(x, codes, scales, zeros, bias, out, group_size, stream);
    case 2: return launch_gemv<T, BITS, 2>(x, codes, scales, zeros, bias, out, group_size, stream);
    case 3:  // rows past x.size(0) are masked in the kernel
    case 4: return launch_gemv<T, BITS, 4>(x, codes, scales, zeros, bias, out, group_size, stream);
    default: return launch_gemv<T, BITS, 8>(x, codes, scales, zeros, bias, out, group_size, stream);
  }
}

at::Tensor quantized_linear_cuda(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& scales_in,
                                 const std::optional<at::Tensor>& zeros_in, const std::optional<at::Tensor>& bias_in,
                                 int64_t bits, int64_t group_size) {
  const char* op = "fuseformer quantized_linear";
  const c10::cuda::CUDAGuard guard(x_in.device());
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits must be 8 or 4, got ", bits);
  TORCH_CHECK(x_in.dim() == 2 && codes_in.dim() == 2 && scales_in.dim() == 2, op, ": x, qweight, scales must be 2-D");
  const int64_t m = x_in.size(0), k = x_in.size(1), n = codes_in.size(0);
  TORCH_CHECK(codes_in.size(1) == (bits == 8 ? k : k / 2) && k % group_size == 0, op,
              ": qweight / group_size do not match K=", k);
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.size(0) == n && scales_in.size(1) == k / group_size,
              op, ": scales must be float32 [", n, ", ", k / group_size, "]");
  const at::Tensor x = x_in.contiguous(), codes = codes_in.contiguous(), scales = scales_in.contiguous();
  const at::Tensor zeros = zeros_in ? zeros_in->contiguous() : at::Tensor();
  const at::Tensor bias = bias_in ? bias_in->to(x.scalar_type()).contiguous() : at::Tensor();
  const uint8_t* z = zeros.defined() ? zeros.const_data_ptr<uint8_t>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  // The GEMV reads 16 aligned bytes of codes per lane under one scale: rows of codes must be
  // 16-byte multiples from a 16-byte aligned start, and groups multiples of what one load
  // holds (16 int8 codes, 32 int4).
  const int64_t per_load = bits == 8 ? 16 : 32;
  const bool gemv_fits = m <= kGemvRows && k % per_load == 0 && group_size % per_load == 0 &&
                         reinterpret_cast<uintptr_t>(codes.const_data_ptr()) % 16 == 0;
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fuseformer_quantized_linear", [&] {
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    if (gemv_fits) {
      out = at::empty({m, n}, x.options());
      bits == 8 ? gemv<scalar_t, 8>(m, x, codes, scales, z, b, out, group_size, stream)
                : gemv<scalar_t, 4>(m, x, codes, scales, z, b, out, group_size, stream);
    } else {
      at::Tensor w = at::empty({n, k}, x.options());
      const int64_t work = n * (bits == 8 ? k : k / 2);
      const unsigned blocks = static_cast<unsigned>((work + 255) / 256);
      const uint8_t* c = static_cast<const uint8_t*>(codes.const_data_ptr());
      if (bits == 8) {
        dequantize_kernel<scalar_t, 8><<<blocks, 256, 0, stream>>>(c, scales.const_data_ptr<float>(), z,
                                                                    w.data_ptr<scalar_t>(), n, k, scales.size(1),
                                                                    group_size);
      } else {
        dequantize_kernel<scalar_t, 4><<<blocks, 256, 0, stream>>>(c, scales.const_data_ptr<float>(), z,
                                                                    w.data_ptr<scalar_t>(), n, k, scales.size(1),
                                                                    group_size);
      }
      out = bias.defined() ? at::addmm(bias, x, w.t()) : at::mm(x, w.t());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, CUDA, m) { m.impl("quantized_linear", &quantized_linear_cuda); }

}  // namespace fuseformer::cuda
