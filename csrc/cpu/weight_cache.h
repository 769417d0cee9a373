// A small LRU of tensors derived from parameters: oneDNN-packed copies of weights, and
// BatchNorm-folded convolution weights. Deriving them costs a full pass over the weight (and
// for a packed weight, most of a small-batch GEMM's or convolution's time), while the weights
// change only at optimizer steps, so a cached copy pays for itself from the second call.
//
// An entry depends on up to kMaxSources source tensors and on a key of integers (shapes, the
// packed format's variant). It holds its sources weakly (a freed weight's entry dies with it)
// and matches each by TensorImpl, version counter, data pointer and a 32-element bitwise
// sample: an optimizer step bumps the version; a write through an alias that does not
// (param.data.add_(...)) changes the sample. The bytes held are bounded.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <list>
#include <mutex>
#include <optional>
#include <vector>

namespace fuseformer::cpu {

class WeightCache {
 public:
  static constexpr size_t kMaxSources = 6;
  using Key = std::array<int64_t, 12>;

  // A source can be cached when it is a dense float32 tensor of its own (a view's TensorImpl is
  // new at every call, so it would never hit). Undefined sources (a missing bias) always can.
  static bool cacheable(const at::Tensor& t) {
    return !t.defined() ||
           (!t.is_view() && t.scalar_type() == at::kFloat && t.is_non_overlapping_and_dense() && t.numel() > 0);
  }

  // The tensors derived from sources under key: cached, or make()'s result (then cached).
  // The caller checks cacheable() on every source first.
  template <typename Make>
  static std::vector<at::Tensor> get(std::initializer_list<at::Tensor> sources, const Key& key, Make&& make) {
    TORCH_INTERNAL_ASSERT(sources.size() <= kMaxSources);
    std::array<Source, kMaxSources> ids{};
    size_t i = 0;
    for (const at::Tensor& t : sources) ids[i++] = Source::of(t);
    {
      std::lock_guard<std::mutex> lock(mutex());
      auto& list = entries();
      for (auto it = list.begin(); it != list.end(); ++it) {
        if (it->key == key && it->ids == ids && !it->expired()) {
          list.splice(list.begin(), list, it);
          return list.front().derived;
        }
      }
    }
    std::vector<at::Tensor> derived = make();
    Entry entry{key, ids, {}, derived};
    i = 0;
    for (const at::Tensor& t : sources) {
      if (t.defined()) entry.alive[i].emplace(t.getIntrusivePtr());
      ++i;
    }
    std::lock_guard<std::mutex> lock(mutex());
    auto& list = entries();
    list.remove_if([](const Entry& e) { return e.expired(); });
    list.push_front(std::move(entry));
    int64_t bytes = 0;
    size_t kept = 0;
    for (auto it = list.begin(); it != list.end();) {
      for (const at::Tensor& d : it->derived) bytes += d.defined() ? static_cast<int64_t>(d.nbytes()) : 0;
      if (++kept > kMaxEntries || (kept > 1 && bytes > kMaxBytes)) {
        it = list.erase(it);
      } else {
        ++it;
      }
    }
    return derived;
  }

 private:
  static constexpr size_t kMaxEntries = 256;
  static constexpr int64_t kMaxBytes = int64_t{2} << 30;
  static constexpr int kSamples = 32;

  struct Source {
    const c10::TensorImpl* impl = nullptr;
    uint32_t version = 0;
    const void* data = nullptr;
    std::array<uint32_t, kSamples> sample{};

    static Source of(const at::Tensor& t) {
      Source s;
      if (!t.defined()) return s;
      s.impl = t.unsafeGetTensorImpl();
      s.version = s.impl->version_counter().current_version();
      s.data = t.const_data_ptr();
      // Dense storage: element j of the storage order is data[j], whatever the strides.
      const auto* words = static_cast<const uint32_t*>(s.data);
      const int64_t n = t.numel();
      for (int k = 0; k < kSamples; ++k) s.sample[k] = words[(n - 1) * k / (kSamples - 1)];
      return s;
    }
    bool operator==(const Source& o) const {
      return impl == o.impl && version == o.version && data == o.data && sample == o.sample;
    }
  };

  struct Entry {
    Key key;
    std::array<Source, kMaxSources> ids;
    std::array<std::optional<c10::weak_intrusive_ptr<c10::TensorImpl>>, kMaxSources> alive;
    std::vector<at::Tensor> derived;

    bool expired() const {
      for (size_t i = 0; i < kMaxSources; ++i) {
        if (ids[i].impl != nullptr && (!alive[i] || alive[i]->expired())) return true;
      }
      return false;
    }
  };

  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::list<Entry>& entries() {
    static std::list<Entry> list;
    return list;
  }
};

}  // namespace fuseformer::cpu
