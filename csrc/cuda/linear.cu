// GEMM + bias + activation (and the gated form) on CUDA: cuBLASLt GEMMs with their epilogues,
// and one elementwise kernel for what cuBLASLt has no epilogue for.
//
// Forward (out = act(x Wᵀ + b), row-major; in cuBLASLt's column-major terms outᵀ = W·xᵀ):
//   inference, none / relu / gelu_tanh  one cuBLASLt call, epilogue [RELU_|GELU_]BIAS
//   training, gelu_tanh                 GELU_AUX_BIAS: saved = the pre-activation (aux)
//   everything else (gelu, silu, relu2, the gated form, relu in training)
//                                       BIAS epilogue into out (and the up projection), then
//                                       the elementwise kernel: act, and act' for the backward
// Backward: one elementwise kernel forms dz (= g·act'(z), from the saved derivative, or from
// the saved pre-activation for gelu_tanh; gated: dzg, dzu); dX = dz W through cuBLAS, and
// dW = dzᵀ X through cuBLASLt with the BGRADB epilogue, which sums dz into the bias gradient
// in the same GEMM. Where cuBLASLt offers no algorithm for an epilogue (some dtypes), the
// same result comes from a plain GEMM and ATen.
//
// cuBLASLt's GELU epilogue is the tanh approximation, so it serves "gelu_tanh" only; "gelu"
// (erf) goes through the elementwise kernel.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

#include "linear.h"

namespace fuseformer::cuda {
namespace {

using linear::Activation;

#define FF_CUBLASLT_CHECK(expr)                                                                           \
  do {                                                                                                    \
    const cublasStatus_t status_ = (expr);                                                                \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "fuseformer linear: ", #expr, " failed with cuBLAS status ", \
                static_cast<int>(status_));                                                               \
  } while (0)

cudaDataType_t cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

// C (m x n, column-major, ldc) = op(A) (m x k) · op(B) (k x n), A and B column-major, with an
// epilogue. bias: the BIAS epilogues' input (m elements) or the BGRADB output (n elements).
struct LtGemm {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* c = nullptr;
  int64_t ldc = 0;
  at::ScalarType dtype = at::kFloat;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
  void* aux = nullptr;  // GELU_AUX: the pre-activation, m x n with leading dimension ldc
};

// Destroys the cuBLASLt descriptors however the call ends.
struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// The largest power of two up to 256 that divides the address.
uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

// Runs the GEMM; false (nothing run) when cuBLASLt has no algorithm for this epilogue here.
bool run_lt_gemm(const LtGemm& g) {
  // The epilogue's vectors are read (and the aux written) 16 bytes at a time, with no
  // preference to filter algorithms by their alignment, and the aux's leading dimension must
  // be a multiple of 8: such calls take the caller's unfused path (a bias view such as
  // b[1:] of a fused projection's bias would otherwise fault).
  if ((g.bias && alignment_of(g.bias) < 16) || (g.aux && (alignment_of(g.aux) < 16 || g.ldc % 8 != 0))) return false;
  const cudaDataType_t dt = cuda_dtype(g.dtype);
  // float32 follows PyTorch's TF32 switch for matmuls, as F.linear does.
  const cublasComputeType_t compute = g.dtype == at::kFloat && at::globalContext().allowTF32CuBLAS()
                                          ? CUBLAS_COMPUTE_32F_FAST_TF32
                                          : CUBLAS_COMPUTE_32F;
  LtDescriptors d;
  FF_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&d.op, compute, CUDA_R_32F));
  const cublasOperation_t ta = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t tb = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  FF_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  FF_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  FF_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &g.epilogue, sizeof(g.epilogue)));
  if (g.bias) {
    FF_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
  }
  if (g.aux) {
    const int64_t aux_ld = g.ldc;
    FF_CUBLASLT_CHECK(
        cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g.aux, sizeof(g.aux)));
    FF_CUBLASLT_CHECK(
        cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)));
  }
  FF_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&d.a, dt, g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, g.lda));
  FF_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&d.b, dt, g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, g.ldb));
  FF_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&d.c, dt, g.m, g.n, g.ldc));

  const cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  size_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  FF_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
  FF_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                         &workspace_size, sizeof(workspace_size)));
  // The heuristic assumes 256-byte aligned operands unless told: views with an offset (rows of
  // a larger buffer, odd sizes in half precision) must only get algorithms that read them.
  const uint32_t align_a = alignment_of(g.a), align_b = alignment_of(g.b), align_c = alignment_of(g.c);
  FF_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                                                         sizeof(align_a)));
  FF_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                                                         sizeof(align_b)));
  FF_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c,
                                                         sizeof(align_c)));
  FF_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c,
                                                         sizeof(align_c)));
  cublasLtMatmulHeuristicResult_t result = {};
  int returned = 0;
  const cublasStatus_t found =
      cublasLtMatmulAlgoGetHeuristic(handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &result, &returned);
  if (found != CUBLAS_STATUS_SUCCESS || returned == 0) return false;
  const float alpha = 1.0f, beta = 0.0f;
  FF_CUBLASLT_CHECK(cublasLtMatmul(handle, d.op, &alpha, g.a, d.a, g.b, d.b, &beta, g.c, d.c, g.c, d.c, &result.algo,
                                   workspace, workspace_size, at::cuda::getCurrentCUDAStream()));
  return true;
}

// out (M x N, row-major) = x (M x K) · wᵀ (w: N x K), both row-major contiguous: in column-major
// terms outᵀ (N x M) = op(w_cm (K x N))ᵀ · x_cm (K x M).
LtGemm forward_gemm(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  LtGemm g;
  g.trans_a = true;
  g.m = w.size(0);
  g.n = x.size(0);
  g.k = x.size(1);
  g.a = w.data_ptr();
  g.lda = g.k;
  g.b = x.data_ptr();
  g.ldb = g.k;
  g.c = out.data_ptr();
  g.ldc = g.m;
  g.dtype = x.scalar_type();
  return g;
}

// out = x wᵀ + bias (bias optional), by the BIAS epilogue, else addmm.
void gemm_bias(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, at::Tensor& out) {
  LtGemm g = forward_gemm(x, w, out);
  if (bias) {
    g.epilogue = CUBLASLT_EPILOGUE_BIAS;
    g.bias = bias->data_ptr();
  }
  if (!run_lt_gemm(g)) {
    bias ? at::addmm_out(out, *bias, x, w.t()) : at::mm_out(out, x, w.t());
  }
}

// ---- elementwise --------------------------------------------------------------------------

constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhC = 0.044715f;

template <Activation A>
__device__ __forceinline__ void act_and_grad(float z, float& a, float& d) {
  if constexpr (A == Activation::kRelu) {
    a = fmaxf(z, 0.0f);
    d = z > 0.0f ? 1.0f : 0.0f;
  } else if constexpr (A == Activation::kGelu) {
    const float cdf = normcdff(z);  // accurate in both tails
    a = z * cdf;
    d = cdf + z * kInvSqrt2Pi * expf(-0.5f * z * z);
  } else if constexpr (A == Activation::kGeluTanh) {
    const float t = tanhf(kSqrt2OverPi * (z + kGeluTanhC * z * z * z));
    a = 0.5f * z * (1.0f + t);
    d = 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhC * z * z);
  } else if constexpr (A == Activation::kSilu) {
    const float s = 1.0f / (1.0f + expf(-z));  // exp overflow gives s = 0, the right limit
    a = z * s;
    d = s * (1.0f + z * (1.0f - s));
  } else if constexpr (A == Activation::kRelu2) {
    const float r = fmaxf(z, 0.0f);
    a = r * r;
    d = 2.0f * r;
  } else {
    a = z;
    d = 1.0f;
  }
}

// Forward epilogue over n elements (biases already added by the GEMM). Plain: out = act(z)
// with z read from `z` (may be out itself), s = act'(z). Gated: out = act(zg)·zu with zg in
// out and zu in `us`; when saving, us = act(zg) and s = zu·act'(zg).
template <typename scalar_t, Activation A, bool kGated, bool kSave>
__global__ void epilogue_kernel(scalar_t* out, const scalar_t* z, scalar_t* us, scalar_t* s, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float a, d;
    act_and_grad<A>(static_cast<float>(z[i]), a, d);
    if constexpr (kGated) {
      const float up = static_cast<float>(us[i]);
      out[i] = static_cast<scalar_t>(a * up);
      if constexpr (kSave) {
        us[i] = static_cast<scalar_t>(a);
        s[i] = static_cast<scalar_t>(up * d);
      }
    } else {
      out[i] = static_cast<scalar_t>(a);
      if constexpr (kSave) s[i] = static_cast<scalar_t>(d);
    }
  }
}

// Backward: dz = g·f (f: the saved derivative), or g·act'(z) when kFromPreact (f is z).
template <typename scalar_t, Activation A, bool kFromPreact>
__global__ void grad_kernel(const scalar_t* g, const scalar_t* f, scalar_t* dz, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float factor = static_cast<float>(f[i]);
    if constexpr (kFromPreact) {
      float a;
      act_and_grad<A>(factor, a, factor);
    }
    dz[i] = static_cast<scalar_t>(static_cast<float>(g[i]) * factor);
  }
}

std::pair<int, int> launch_shape(int64_t n) {
  constexpr int kThreads = 256;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 8);
  return {static_cast<int>(std::max<int64_t>(blocks, 1)), kThreads};
}

void launch_epilogue(Activation act, bool gated, bool save, at::Tensor& out, const at::Tensor& z, at::Tensor& us,
                     at::Tensor& s) {
  const int64_t n = out.numel();
  const auto [blocks, threads] = launch_shape(n);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fuseformer_linear_epilogue", [&] {
    with_activation(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      scalar_t* o = out.data_ptr<scalar_t>();
      const scalar_t* zp = z.data_ptr<scalar_t>();
      scalar_t* up = us.defined() ? us.data_ptr<scalar_t>() : nullptr;
      scalar_t* sp = s.defined() ? s.data_ptr<scalar_t>() : nullptr;
      if (gated) {
        save ? epilogue_kernel<scalar_t, A, true, true><<<blocks, threads, 0, stream>>>(o, zp, up, sp, n)
             : epilogue_kernel<scalar_t, A, true, false><<<blocks, threads, 0, stream>>>(o, zp, up, sp, n);
      } else {
        save ? epilogue_kernel<scalar_t, A, false, true><<<blocks, threads, 0, stream>>>(o, zp, up, sp, n)
             : epilogue_kernel<scalar_t, A, false, false><<<blocks, threads, 0, stream>>>(o, zp, up, sp, n);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor launch_grad(Activation act, bool from_preact, const at::Tensor& g, const at::Tensor& f) {
  at::Tensor dz = at::empty_like(g);
  const int64_t n = g.numel();
  const auto [blocks, threads] = launch_shape(n);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fuseformer_linear_grad", [&] {
    with_activation(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t* fp = f.data_ptr<scalar_t>();
      from_preact ? grad_kernel<scalar_t, A, true><<<blocks, threads, 0, stream>>>(gp, fp, dz.data_ptr<scalar_t>(), n)
                  : grad_kernel<scalar_t, A, false><<<blocks, threads, 0, stream>>>(gp, fp, dz.data_ptr<scalar_t>(), n);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dz;
}

// ---- ops ----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                                const std::optional<at::Tensor>& weight_up_in,
                                                                const std::optional<at::Tensor>& bias_in,
                                                                const std::optional<at::Tensor>& bias_up_in,
                                                                c10::string_view activation, bool save) {
  if (x_in.dim() != 2) {
    return linear::fwd_on_rows(x_in, [&](const at::Tensor& rows) {
      return linear_fwd_cuda(rows, weight_in, weight_up_in, bias_in, bias_up_in, activation, save);
    });
  }
  linear::check_fwd_args(x_in, weight_in, weight_up_in, bias_in, bias_up_in);
  const Activation act = linear::parse_activation(std::string_view(activation.data(), activation.size()));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool gated = weight_up_in.has_value();
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  std::optional<at::Tensor> bias, bias_up;
  if (bias_in) bias = bias_in->contiguous();
  if (bias_up_in) bias_up = bias_up_in->contiguous();
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());

  if (!gated && (act == Activation::kNone || ((act == Activation::kRelu || act == Activation::kGeluTanh) && !save) ||
                 (act == Activation::kGeluTanh && save))) {
    // One cuBLASLt call: the activation (and, training gelu_tanh, the saved pre-activation)
    // in the epilogue.
    LtGemm g = forward_gemm(x, weight, out);
    at::Tensor saved = act == Activation::kGeluTanh && save ? at::empty_like(out) : empty();
    const bool b = bias.has_value();
    if (act == Activation::kNone) {
      g.epilogue = b ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    } else if (act == Activation::kRelu) {
      g.epilogue = b ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
    } else if (save) {
      g.epilogue = b ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
      g.aux = saved.data_ptr();
    } else {
      g.epilogue = b ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
    }
    g.bias = b ? bias->data_ptr() : nullptr;
    if (run_lt_gemm(g)) return {out, saved, empty()};
    // No fused algorithm here: the GEMM with its bias, then the elementwise kernel (which
    // keeps the gelu_tanh pre-activation in `saved`, the form the backward expects).
    at::Tensor z = save ? saved : out;
    gemm_bias(x, weight, bias, z);
    at::Tensor none;
    launch_epilogue(act, false, false, out, z, none, none);
    return {out, saved, empty()};
  }

  // GEMM(s) with their biases, then the elementwise epilogue (act, and what the backward reads).
  gemm_bias(x, weight, bias, out);
  at::Tensor saved = save ? at::empty_like(out) : at::Tensor();
  at::Tensor saved2 = save && gated ? at::empty_like(out) : at::Tensor();
  at::Tensor up;
  if (gated) {
    up = save ? saved : at::empty_like(out);  // the up projection, overwritten with act(zg) when saved
    gemm_bias(x, weight_up_in->contiguous(), bias_up, up);
  }
  at::Tensor& s = gated ? saved2 : saved;
  launch_epilogue(act, gated, save, out, out, up, s);
  return {out, saved.defined() ? saved : empty(), saved2.defined() ? saved2 : empty()};
}

// dW (N x K, row-major) = dzᵀ x, with the bias gradient (sum of dz over M) from the BGRADB
// epilogue when there is a bias: in column-major terms dWᵀ (K x N) = x_cm (K x M) · op(dz_cm (N x M)).
std::pair<at::Tensor, at::Tensor> weight_grad(const at::Tensor& dz, const at::Tensor& x, bool has_bias) {
  at::Tensor grad_w = at::empty({dz.size(1), x.size(1)}, x.options());
  at::Tensor grad_b = has_bias ? at::empty({dz.size(1)}, x.options()) : at::Tensor();
  LtGemm g;
  g.trans_b = true;
  g.m = x.size(1);
  g.n = dz.size(1);
  g.k = x.size(0);
  g.a = x.data_ptr();
  g.lda = g.m;
  g.b = dz.data_ptr();
  g.ldb = g.n;
  g.c = grad_w.data_ptr();
  g.ldc = g.m;
  g.dtype = x.scalar_type();
  if (has_bias) {
    g.epilogue = CUBLASLT_EPILOGUE_BGRADB;
    g.bias = grad_b.data_ptr();
  }
  if (run_lt_gemm(g)) return {grad_w, has_bias ? grad_b.to(at::kFloat) : at::Tensor()};
  at::mm_out(grad_w, dz.t(), x);
  return {grad_w, has_bias ? dz.sum(0, /*keepdim=*/false, at::kFloat) : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& weight,
    const std::optional<at::Tensor>& weight_up, const at::Tensor& saved, const at::Tensor& saved2,
    c10::string_view activation, bool has_bias, bool has_bias_up, bool needs_input_grad, bool needs_weight_grad) {
  if (x_in.dim() != 2) {
    return linear::bwd_on_rows(grad_out, x_in, saved, saved2, [&](const at::Tensor& g, const at::Tensor& rows,
                                                                  const at::Tensor& s, const at::Tensor& s2) {
      return linear_bwd_cuda(g, rows, weight, weight_up, s, s2, activation, has_bias, has_bias_up, needs_input_grad,
                             needs_weight_grad);
    });
  }
  const auto d = linear::check_fwd_args(x_in, weight, weight_up, std::nullopt, std::nullopt);
  const Activation act = linear::parse_activation(std::string_view(activation.data(), activation.size()));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool gated = weight_up.has_value();
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({d.m, d.n}) && grad_out.scalar_type() == x_in.scalar_type(),
              "fuseformer linear: grad_out must be (", d.m, ", ", d.n, ") ", x_in.scalar_type());
  const bool has_factor = gated || act != Activation::kNone;
  TORCH_CHECK(!has_factor || (saved.sizes() == grad_out.sizes() && (!gated || saved2.sizes() == grad_out.sizes())),
              "fuseformer linear: the saved tensors must be (", d.m, ", ", d.n, "): run the forward with save=True");
  auto empty = [&] { return at::empty({0}, x_in.options()); };
  const at::Tensor x = x_in.contiguous(), g = grad_out.contiguous();

  // dz per weight (gate first). Gated: dzg = g·saved2, dzu = g·saved. gelu_tanh (plain) saved
  // the pre-activation (the GELU_AUX output).
  std::vector<at::Tensor> dzs;
  if (gated) {
    dzs = {launch_grad(Activation::kNone, false, g, saved2.contiguous()),
           launch_grad(Activation::kNone, false, g, saved.contiguous())};
  } else if (has_factor) {
    dzs = {launch_grad(act, act == Activation::kGeluTanh, g, saved.contiguous())};
  } else {
    dzs = {g};
  }
  at::Tensor grad_x = empty();
  if (needs_input_grad) {
    grad_x = at::mm(dzs[0], weight);
    if (gated) grad_x.addmm_(dzs[1], *weight_up);
  }
  at::Tensor grad_w = empty(), grad_w2 = empty(), grad_b = empty(), grad_b2 = empty();
  if (needs_weight_grad) {
    auto [w, b] = weight_grad(dzs[0], x, has_bias);
    grad_w = w;
    if (has_bias) grad_b = b;
    if (gated) {
      auto [w2, b2] = weight_grad(dzs[1], x, has_bias_up);
      grad_w2 = w2;
      if (has_bias_up) grad_b2 = b2;
    }
  }
  return {grad_x, grad_w, grad_w2, grad_b, grad_b2};
}

}  // namespace

TORCH_LIBRARY_IMPL(fuseformer, CUDA, m) {
  m.impl("linear_fwd", &linear_fwd_cuda);
  m.impl("linear_bwd", &linear_bwd_cuda);
}

}  // namespace fuseformer::cuda
