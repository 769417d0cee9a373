// x Wᵀ (+ addend) on the CPU with the weight reordered once for oneDNN (the copy bundled in
// torch, reached through its mkldnn::_linear_pointwise ops), for weights used by many GEMMs
// in a row, such as an LSTM's recurrent weights over the time steps.
//
// Why: on the AMD EPYC of our machines ATen's float32 GEMM (MKL) measured 2.0-3.4x slower
// than oneDNN's with a prepacked weight at batch 16-256 (benchmarks/NOTES.md); at batch 1
// oneDNN's per-call overhead makes it slower, so small batches keep ATen's GEMM. Falls back to
// ATen where torch has no oneDNN. float32 only (exact float32 arithmetic, as ATen's).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

#include "vectorize.h"
#include "weight_cache.h"

namespace fuseformer::cpu {

// x Wᵀ (+ bias) (+ addend) for up to kSmallRowsMax rows of float32 x, W (N, K) with unit
// column stride (csrc/cpu/gemv.cpp, AVX-512); nullopt where it does not apply (no AVX-512,
// other dtypes or layouts), for the caller's fallback. For op kernels (no autograd record).
constexpr int64_t kSmallRowsMax = 7;

// The library for the float32 GEMMs whose operands are made per call (attention's tiles,
// weight gradients), where oneDNN and ATen's BLAS both apply. MKL, the BLAS of the x86 torch
// wheels, takes its fast kernels on Intel CPUs only: on the AMD EPYC of most of our machines it
// runs AVX2 code and oneDNN measured 1.5-2x faster there; on an Intel Xeon (AVX-512) MKL is as
// fast or faster: the weight gradients 1.3-3.4x, attention's 256x64x512 tiles 1.2x
// (benchmarks/NOTES.md, 2026-12-02). On an AVX2-only AMD EPYC (Zen 3) both libraries run AVX2
// code and MKL is the faster: weight gradients 1.4-1.9x, the tiles 1.15-1.25x (2026-12-08). So
// kAten on Intel CPUs and on CPUs without AVX-512 when torch has MKL, else kOneDnn.
// FUSEFORMER_CPU_GEMM=onednn or aten overrides it (read once per process).
enum class GemmLibrary { kOneDnn, kAten };
GemmLibrary vendor_gemm_library();    // this CPU's choice (cpuid), without the override
GemmLibrary per_call_gemm_library();  // the override, else vendor_gemm_library()
std::optional<at::Tensor> small_rows_linear(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& addend = std::nullopt);

// An op family of the oneDNN torch bundles: the weight reorder and the fused op's unary and
// binary overloads, looked up once; ok when all three have CPU kernels here.
struct DnnlOps {
  std::optional<c10::OperatorHandle> reorder, unary, binary;
  bool ok = false;

  static DnnlOps find(const char* reorder_name, const char* pointwise_name) {
    auto& dispatcher = c10::Dispatcher::singleton();
    DnnlOps o;
    o.reorder = dispatcher.findOp({reorder_name, ""});
    o.unary = dispatcher.findOp({pointwise_name, ""});
    o.binary = dispatcher.findOp({pointwise_name, "binary"});
    o.ok = o.reorder && o.unary && o.binary && at::hasMKLDNN() &&
           o.unary->hasKernelForDispatchKey(c10::DispatchKey::CPU) &&
           o.binary->hasKernelForDispatchKey(c10::DispatchKey::CPU);
    return o;
  }
};

class PackedLinear {
 public:
  // From this many rows per GEMM oneDNN wins (measured crossover between batch 1 and 8).
  static constexpr int64_t kMinRows = 8;

  // weight (N, K), any strides; rows: the usual number of rows of x. cached: keep the packed
  // weight across calls (csrc/cpu/weight_cache.h: an in-place update such as an optimizer step
  // repacks it); for weights that persist (parameters).
  PackedLinear(const at::Tensor& weight, int64_t rows, bool cached = false) : weight_(weight) {
    if (usable(weight, rows) && !aten_is_faster(rows)) {
      packed_ = cacheable(weight, cached) ? cached_pack(weight, rows, false) : pack(weight, rows);
    }
  }

  // From this many rows ATen's MKL GEMM beats oneDNN's packed one where both run AVX2 code
  // (AVX2-only AMD EPYC, 2 threads: 256 rows 0.90x, 1024 1.14x, 2048 1.18x; benchmarks/NOTES.md).
  static constexpr int64_t kAtenFromRows = 512;

  // x · weight instead of x · weightᵀ (backward GEMMs: dX = dZ · W), with weightᵀ packed (and
  // cached like the forward's, under the same weight's identity).
  static PackedLinear transposed(const at::Tensor& weight, int64_t rows, bool cached = false) {
    PackedLinear linear(weight.t(), rows, false, /*pack_now=*/false);
    if (usable(weight, rows) && !aten_is_faster(rows)) {
      linear.packed_ = cacheable(weight, cached) ? cached_pack(weight, rows, true) : pack(weight.t(), rows);
    }
    return linear;
  }

  // x Wᵀ (+ bias) through oneDNN on the weight as it is (no reorder): for weights made per
  // call, which a reorder would cost a second pass over (measured 64x2048x2048: oneDNN on
  // the plain weight 1.26 ms, reorder + packed 1.8 ms, ATen's MKL 3.5 ms). ATen elsewhere.
  static at::Tensor plain(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    if (!usable(weight, x.size(0))) return bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    return onednn_linear(x, weight, bias);
  }

  // a bᵀ (+ addend (M, N)) for operands made per call, such as attention's tiles: a (M, K) and
  // b (N, K) as they are where oneDNN reads them fast (else copied: dense()), float32. oneDNN from
  // kMinProductMacs multiply-adds (single-threaded at attention's tile shapes, 256x64 by
  // 64x512: 2.0x ATen's MKL, which takes its AVX2 path on these AMD CPUs); below, its ~10 us
  // fixed cost a call loses to ATen's GEMM (32x64x32: 12 vs 3 us; even at 128x64x128: 19 vs
  // 21; benchmarks/NOTES.md), which also runs where oneDNN is missing.
  static constexpr int64_t kMinProductMacs = int64_t{1} << 20;
  static at::Tensor product(const at::Tensor& a, const at::Tensor& b,
                            const std::optional<at::Tensor>& addend = std::nullopt) {
    if (!dnnl_linear(a, b)) {
      return addend ? at::addmm(*addend, a, b.t()) : at::mm(a, b.t());
    }
    return addend ? onednn_linear_add(a, *addend, b) : onednn_linear(a, b, std::nullopt);
  }

  // The same into tile buffers that persist across a loop (attention's tiles): out = a bᵀ, or
  // out += alpha a bᵀ where accumulating; out (rows of a, rows of b) with unit column stride.
  // Accumulating updates out in place (it may be a view of a result); otherwise ATen writes
  // into out (no allocation per tile: a 256x512 float tile is 512 KB, which glibc may serve
  // with fresh pages each time) and oneDNN, which has no out= form, rebinds out to its result.
  static void product_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                           double alpha = 1.0) {
    TORCH_INTERNAL_ASSERT(accumulate || alpha == 1.0, "product_into scales only what it accumulates");
    if (!dnnl_linear(a, b)) {
      accumulate ? out.addmm_(a, b.t(), 1.0, alpha) : at::mm_out(out, a, b.t());
    } else if (accumulate) {
      out.add_(onednn_linear(a, b, std::nullopt), alpha);
    } else {
      out = onednn_linear(a, b, std::nullopt);
    }
  }

  // out += alpha dzᵀ x (weight_grad accumulated in place).
  static void weight_grad_into(at::Tensor& out, const at::Tensor& dz, const at::Tensor& x, double alpha = 1.0) {
    if (!dnnl_product(dz, x, dz.size(0) * dz.size(1) * x.size(1))) {
      out.addmm_(dz.t(), x, 1.0, alpha);
    } else {
      out.add_(weight_grad(dz, x), alpha);
    }
  }

  // dzᵀ x, a weight gradient ((N, K) from dz (M, N) and x (M, K)), through oneDNN: 1.45-2.0x
  // ATen's MKL at::mm(dz.t(), x) on our AMD CPUs (2 threads, float32, cold caches). oneDNN
  // copies its input operand into rows (the weight operand it reads strided), so the form
  // that copies less is taken: dzᵀ as the input (M·N elements copied), or (xᵀ dz)ᵀ (M·K for
  // the input, K·N for the result's transpose). Measured M x N x K: 1024x1024x256 1.46 vs
  // 2.82 ms, 8192x1024x256 11.8 vs 20.2, 2048x768x3072 26.2 vs 44.8, 4096x4096x1024 83 vs 151.
  static at::Tensor weight_grad(const at::Tensor& dz, const at::Tensor& x) {
    if (!dnnl_product(dz, x, dz.size(0) * dz.size(1) * x.size(1))) return at::mm(dz.t(), x);
    auto product_t = [](const at::Tensor& a, const at::Tensor& b) {  // aᵀ b
      auto rows_major = [](const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); };
      return onednn_linear(rows_major(a).t(), rows_major(b).t(), std::nullopt);
    };
    const int64_t m = dz.size(0), n = dz.size(1), k = x.size(1);
    return m * k + k * n < m * n ? product_t(x, dz).t().contiguous() : product_t(dz, x);
  }

  // The same from dzᵀ (N, M) in rows: oneDNN reads it and x (as the weight xᵀ, columns
  // packed) as they are, nothing copied (1024x1024x256: 1.05 ms against weight_grad's 1.45).
  static at::Tensor weight_grad_t(const at::Tensor& dz_t, const at::Tensor& x) {
    if (!dnnl_product(dz_t, x, dz_t.size(0) * dz_t.size(1) * x.size(1))) return at::mm(dz_t, x);
    return onednn_linear(dz_t, x.t(), std::nullopt);
  }

  // dz W, an input gradient ((M, K) for W (N, K)), from dzᵀ (N, M) in rows: as (Wᵀ dzᵀ)ᵀ,
  // for oneDNN takes dzᵀ as the weight operand as it is but would copy it as the input
  // (1024 x 1024 x 256: 1.19 ms with the result's transpose, against 1.52). Wᵀ is kept
  // (WeightCache) for weights that persist.
  static at::Tensor input_grad_t(const at::Tensor& weight, const at::Tensor& dz_t) {
    if (!dnnl_linear(dz_t.t(), weight.t())) return at::mm(dz_t.t(), weight);
    const auto transpose = [&] { return weight.t().contiguous(); };
    const at::Tensor weight_t =
        cacheable(weight, true)
            ? WeightCache::get({weight}, {kTransposedKey}, [&] { return std::vector<at::Tensor>{transpose()}; })[0]
            : transpose();
    return onednn_linear(weight_t, dz_t.t(), std::nullopt).t().contiguous();
  }

  // addend (M, N) + x (M, K) Wᵀ, or x Wᵀ (+ bias (N,)) without an addend.
  at::Tensor operator()(const at::Tensor& x, const std::optional<at::Tensor>& addend = std::nullopt,
                        const std::optional<at::Tensor>& bias = std::nullopt) const {
    if (!packed_.defined()) {
      if (x.size(0) <= kSmallRowsMax) {
        if (auto out = small_rows_linear(x, weight_, bias, addend)) return *out;
      }
      if (addend) return at::addmm(*addend, x, weight_.t());
      return bias ? at::addmm(*bias, x, weight_.t()) : at::mm(x, weight_.t());
    }
    return addend ? onednn_linear_add(x, *addend, packed_) : onednn_linear(x, packed_, bias);
  }

 private:
  static const DnnlOps& dnnl_ops() {
    static const DnnlOps ops = DnnlOps::find("mkldnn::_reorder_linear_weight", "mkldnn::_linear_pointwise");
    return ops;
  }

  // A 2-D operand as oneDNN takes it fast: rows or columns packed densely (either order), or
  // for the input (not the weight) rows with a stride. A weight with strided rows (a head's
  // keys in a (B, S, H, D) buffer) sends oneDNN down a path ~1000x slower (128x64x128: 21 ms
  // against 20 us), so it is copied: N·K elements against the GEMM's M·N·K.
  static at::Tensor dense(const at::Tensor& t, bool strided_rows_ok = false) {
    const bool row_major = t.stride(1) == 1 && (strided_rows_ok || t.stride(0) == t.size(1) || t.size(0) == 1);
    const bool col_major = t.stride(0) == 1 && (t.stride(1) == t.size(0) || t.size(1) == 1);
    return row_major || col_major ? t : t.contiguous();
  }

  // input Wᵀ (+ bias) by oneDNN's linear, W plain or reordered; operands made dense as needed.
  static at::Tensor onednn_linear(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias) {
    torch::jit::Stack stack{dense(input, true), dense_weight(weight),
                            bias ? c10::IValue(bias->contiguous()) : c10::IValue(), c10::IValue("none"),
                            c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    dnnl_ops().unary->callBoxed(&stack);
    return stack[0].toTensor();
  }

  // addend + input Wᵀ by oneDNN's linear with a sum post-op (its binary overload).
  static at::Tensor onednn_linear_add(const at::Tensor& input, const at::Tensor& addend, const at::Tensor& weight) {
    torch::jit::Stack stack{dense(input, true), addend.contiguous(), dense_weight(weight), c10::IValue(),
                            c10::IValue("add")};
    dnnl_ops().binary->callBoxed(&stack);
    return stack[0].toTensor();
  }

  static at::Tensor dense_weight(const at::Tensor& weight) { return weight.is_mkldnn() ? weight : dense(weight); }

  PackedLinear(const at::Tensor& weight, int64_t /*rows*/, bool /*cached*/, bool /*pack_now*/) : weight_(weight) {}

  static bool cacheable(const at::Tensor& weight, bool cached) {
    return cached && weight.is_contiguous() && WeightCache::cacheable(weight);
  }

  // Whether a float32 product of a and b made per call (macs multiply-adds) goes to oneDNN.
  static bool dnnl_product(const at::Tensor& a, const at::Tensor& b, int64_t macs) {
    return dnnl_ops().ok && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
           macs >= kMinProductMacs && at::globalContext().userEnabledMkldnn() &&
           per_call_gemm_library() == GemmLibrary::kOneDnn;
  }

  // Whether a bᵀ (a (M, K), b (N, K)) made per call goes to oneDNN's linear.
  static bool dnnl_linear(const at::Tensor& a, const at::Tensor& b) {
    return dnnl_product(a, b, a.size(0) * a.size(1) * b.size(0)) && usable(b, a.size(0));
  }

  static bool aten_is_faster(int64_t rows) {
    return rows >= kAtenFromRows && !has_avx512() && per_call_gemm_library() == GemmLibrary::kAten;
  }

  static bool usable(const at::Tensor& weight, int64_t rows) {
    return dnnl_ops().ok && rows >= kMinRows && weight.scalar_type() == at::kFloat &&
           at::globalContext().userEnabledMkldnn();
  }

  static at::Tensor pack(const at::Tensor& weight, int64_t rows) {
    torch::jit::Stack stack{weight.contiguous(), c10::IValue(rows)};
    dnnl_ops().reorder->callBoxed(&stack);
    return stack[0].toTensor();
  }

  // The packed format oneDNN picks depends on a class of the row count.
  static at::Tensor cached_pack(const at::Tensor& weight, int64_t rows, bool transposed) {
    const int64_t rows_class = rows >= 64 ? 64 : (rows >= 16 ? 16 : kMinRows);
    const WeightCache::Key key{kLinearKey, rows_class, transposed};
    return WeightCache::get({weight}, key, [&] {
      return std::vector<at::Tensor>{pack(transposed ? weight.t() : weight, rows_class)};
    })[0];
  }
  static constexpr int64_t kLinearKey = 1;
  static constexpr int64_t kTransposedKey = 6;  // lstm.cpp's layouts take 4 and 5

  at::Tensor weight_, packed_;
};

}  // namespace fuseformer::cpu
