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

#include <array>
#include <list>
#include <mutex>
#include <optional>

namespace fuseformer::cpu {

class PackedLinear {
 public:
  // From this many rows per GEMM oneDNN wins (measured crossover between batch 1 and 8).
  static constexpr int64_t kMinRows = 8;

  // weight (N, K), any strides; rows: the usual number of rows of x. cached: keep the packed
  // weight across calls (keyed by the weight's identity and version counter, so an in-place
  // update such as an optimizer step repacks it); for weights that persist (parameters).
  PackedLinear(const at::Tensor& weight, int64_t rows, bool cached = false) : weight_(weight) {
    if (usable(weight, rows)) packed_ = cacheable(weight, cached) ? cached_pack(weight, rows, false) : pack(weight, rows);
  }

  // x · weight instead of x · weightᵀ (backward GEMMs: dX = dZ · W), with weightᵀ packed (and
  // cached like the forward's, under the same weight's identity).
  static PackedLinear transposed(const at::Tensor& weight, int64_t rows, bool cached = false) {
    PackedLinear linear(weight.t(), rows, false, /*pack_now=*/false);
    if (usable(weight, rows)) {
      linear.packed_ = cacheable(weight, cached) ? cached_pack(weight, rows, true) : pack(weight.t(), rows);
    }
    return linear;
  }

  // addend (M, N) + x (M, K) Wᵀ, or x Wᵀ (+ bias (N,)) without an addend.
  at::Tensor operator()(const at::Tensor& x, const std::optional<at::Tensor>& addend = std::nullopt,
                        const std::optional<at::Tensor>& bias = std::nullopt) const {
    if (!packed_.defined()) {
      if (addend) return at::addmm(*addend, x, weight_.t());
      return bias ? at::addmm(*bias, x, weight_.t()) : at::mm(x, weight_.t());
    }
    const Ops& ops = dnnl_ops();
    if (addend) {
      torch::jit::Stack stack{x.contiguous(), addend->contiguous(), packed_, c10::IValue(), c10::IValue("add")};
      ops.binary->callBoxed(&stack);
      return stack[0].toTensor();
    }
    torch::jit::Stack stack{x.contiguous(), packed_, bias ? c10::IValue(bias->contiguous()) : c10::IValue(),
                            c10::IValue("none"),
                            c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    ops.unary->callBoxed(&stack);
    return stack[0].toTensor();
  }

 private:
  struct Ops {
    std::optional<c10::OperatorHandle> reorder, unary, binary;
    bool ok = false;
  };
  static const Ops& dnnl_ops() {
    static const Ops ops = [] {
      auto& dispatcher = c10::Dispatcher::singleton();
      Ops o;
      o.reorder = dispatcher.findOp({"mkldnn::_reorder_linear_weight", ""});
      o.unary = dispatcher.findOp({"mkldnn::_linear_pointwise", ""});
      o.binary = dispatcher.findOp({"mkldnn::_linear_pointwise", "binary"});
      o.ok = o.reorder && o.unary && o.binary && at::hasMKLDNN() &&
             o.unary->hasKernelForDispatchKey(c10::DispatchKey::CPU) &&
             o.binary->hasKernelForDispatchKey(c10::DispatchKey::CPU);
      return o;
    }();
    return ops;
  }

  PackedLinear(const at::Tensor& weight, int64_t /*rows*/, bool /*cached*/, bool /*pack_now*/) : weight_(weight) {}

  static bool cacheable(const at::Tensor& weight, bool cached) {
    return cached && !weight.is_view() && weight.is_contiguous();
  }

  // A bitwise sample of the weight: writes through an alias that does not bump the version
  // counter (param.data.add_(...)) change it too, and the stale pack is not used.
  static constexpr int kSamples = 32;
  using Fingerprint = std::array<float, kSamples>;
  static Fingerprint fingerprint(const at::Tensor& weight) {
    Fingerprint f{};
    const float* data = weight.const_data_ptr<float>();
    const int64_t n = weight.numel();
    for (int i = 0; i < kSamples; ++i) f[i] = data[(n - 1) * i / (kSamples - 1)];
    return f;
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

  // A small LRU of packed weights. Entries hold the weight weakly (a freed weight's entry
  // dies with it) and are matched by TensorImpl, version, data pointer, a bitwise sample and a
  // class of the row count (the packed format oneDNN picks depends on it); the bytes held are
  // bounded.
  static at::Tensor cached_pack(const at::Tensor& weight, int64_t rows, bool transposed) {
    struct Entry {
      c10::weak_intrusive_ptr<c10::TensorImpl> weight;
      const c10::TensorImpl* impl;
      uint32_t version;
      int64_t rows_class;
      bool transposed;
      const void* data;
      Fingerprint sample;
      at::Tensor packed;
    };
    static std::mutex mutex;
    static std::list<Entry> entries;
    constexpr size_t kMaxEntries = 256;
    constexpr int64_t kMaxBytes = int64_t{2} << 30;
    const int64_t rows_class = rows >= 64 ? 64 : (rows >= 16 ? 16 : kMinRows);
    const c10::TensorImpl* impl = weight.unsafeGetTensorImpl();
    const uint32_t version = impl->version_counter().current_version();
    const Fingerprint sample = fingerprint(weight);
    const void* data = weight.const_data_ptr();
    {
      std::lock_guard<std::mutex> lock(mutex);
      for (auto it = entries.begin(); it != entries.end(); ++it) {
        if (it->impl == impl && it->version == version && it->rows_class == rows_class &&
            it->transposed == transposed && it->data == data && it->sample == sample && !it->weight.expired()) {
          entries.splice(entries.begin(), entries, it);
          return entries.front().packed;
        }
      }
    }
    at::Tensor packed = pack(transposed ? weight.t() : weight, rows_class);
    std::lock_guard<std::mutex> lock(mutex);
    entries.remove_if([](const Entry& e) { return e.weight.expired(); });
    entries.push_front({c10::weak_intrusive_ptr<c10::TensorImpl>(weight.getIntrusivePtr()), impl, version, rows_class,
                        transposed, data, sample, packed});
    int64_t bytes = 0;
    size_t kept = 0;
    for (auto it = entries.begin(); it != entries.end();) {
      bytes += it->packed.nbytes();
      if (++kept > kMaxEntries || (kept > 1 && bytes > kMaxBytes)) {
        it = entries.erase(it);
      } else {
        ++it;
      }
    }
    return packed;
  }

  at::Tensor weight_, packed_;
};

}  // namespace fuseformer::cpu
