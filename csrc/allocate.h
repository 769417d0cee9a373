// Kernel outputs; on the CPU, large ones come from a cache of blocks already mapped.
//
// A large CPU block from glibc costs page faults and the kernel's zeroing of every page, often
// at every call: blocks of 32 MiB or more (its largest mmap threshold) are a fresh mmap,
// unmapped on free (a 64 MiB LayerNorm output: 16384 faults, 2-4x the kernel's own time on
// the 2-core machines), and smaller ones are handed back to the system whenever they lie at
// the top of the heap past its trim threshold, which depends on what was freed before
// (add_rms_norm 4096x1024 forward: 8160 faults and 8.5 ms a call in one process, none and
// 1.7 ms in the next; benchmarks/NOTES.md, 2026-12-02). So blocks of kCachedMinBytes or more
// are kept when freed, up to a budget (FUSEFORMER_CPU_CACHE_MIB, default kDefaultBudgetMiB;
// 0 turns the cache off), and the next output of the same size class takes one back: no
// fault, no zeroing. Blocks of 32 MiB or more are 2 MiB-aligned and advised MADV_HUGEPAGE
// (honoured where THP is "madvise" or "always", the usual Linux settings): 32 faults for a
// 64 MiB block the first time. The cache is fuseformer's outputs only (ATen's and oneDNN's
// stay with glibc); fuseformer.empty_cpu_cache() returns its blocks to the system.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/native/TensorFactories.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fuseformer {

class OutputAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kCachedMinBytes = size_t{1} << 20;
  static constexpr size_t kHugeMinBytes = size_t{32} << 20;
  static constexpr size_t kHugePage = size_t{2} << 20;
  static constexpr size_t kDefaultBudgetMiB = 512;

  // Blocks under kCachedMinBytes (a resize_ can ask for any size) go to ATen's CPU allocator.
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kCachedMinBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t bytes = size_class(nbytes);
    void* data = take(bytes);
    if (data == nullptr) data = map(bytes);
    if (data == nullptr) return c10::GetCPUAllocator()->allocate(nbytes);
    report(data, static_cast<int64_t>(bytes));
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees every cached block (fuseformer.empty_cpu_cache()); returns the bytes freed.
  size_t empty_cache() {
    std::vector<void*> blocks;
    size_t freed = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const Cached& c : cached_) blocks.push_back(c.data), freed += c.bytes;
      cached_.clear();
      cached_bytes_ = 0;
    }
    for (void* data : blocks) std::free(data);
    return freed;
  }

  // The most bytes the cache holds (FUSEFORMER_CPU_CACHE_MIB).
  size_t budget() const { return budget_; }

  // The bytes the cache holds now.
  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

  // Never destroyed: tensors may be freed after static destructors have run (at exit).
  static OutputAllocator* get() {
    static OutputAllocator* allocator = new OutputAllocator();
    return allocator;
  }

 private:
  struct Cached {
    void* data;
    size_t bytes;
  };

  OutputAllocator() : budget_(read_budget()) {}

  static size_t read_budget() {
    const char* env = std::getenv("FUSEFORMER_CPU_CACHE_MIB");
    if (env == nullptr || *env == '\0') return kDefaultBudgetMiB << 20;
    char* end = nullptr;
    const long long mib = std::strtoll(env, &end, 10);
    TORCH_CHECK(*end == '\0' && mib >= 0, "FUSEFORMER_CPU_CACHE_MIB must be a whole number of MiB (0: no cache), got '",
                env, "'");
    return static_cast<size_t>(mib) << 20;
  }

  // Size classes: 2 MiB steps for huge-page blocks, 64 KiB below, so that outputs of nearly
  // the same size (a batch's last, shorter step) share blocks.
  static size_t size_class(size_t nbytes) {
    const size_t step = nbytes >= kHugeMinBytes ? kHugePage : size_t{64} << 10;
    return (nbytes + step - 1) / step * step;
  }

  void* map(size_t bytes) {
    void* data = nullptr;
    const size_t alignment = bytes >= kHugeMinBytes ? kHugePage : 64;
    if (posix_memalign(&data, alignment, bytes) != 0) return nullptr;
#if defined(__linux__)
    if (bytes >= kHugeMinBytes) madvise(data, bytes, MADV_HUGEPAGE);  // advice only
#endif
    std::lock_guard<std::mutex> lock(mutex_);
    sizes_[data] = bytes;
    return data;
  }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = cached_.rbegin(); it != cached_.rend(); ++it) {  // the most recently freed first
      if (it->bytes == bytes) {
        void* data = it->data;
        cached_.erase(std::next(it).base());
        cached_bytes_ -= bytes;
        return data;
      }
    }
    return nullptr;
  }

  // torch.profiler(profile_memory=True) sees our blocks as it sees ATen's: a live block
  // counts as allocated, a cached one as reserved. A thread-local check when no profiler runs.
  void report(void* data, int64_t delta) {
    size_t live, cached;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_bytes_ += delta;
      live = live_bytes_;
      cached = cached_bytes_;
    }
    c10::reportMemoryUsageToProfiler(data, delta, live, live + cached, c10::Device(c10::DeviceType::CPU));
  }

  // A freed block joins the cache; the oldest cached blocks leave it (freed) to keep the
  // budget. A block larger than the budget is freed at once.
  static void release(void* data) {
    OutputAllocator& self = *get();
    std::vector<void*> evicted;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      const auto known = self.sizes_.find(data);
      // Not one of ours: raw_allocate's blocks under kCachedMinBytes come from ATen's CPU
      // allocator, whose memory free() releases.
      bytes = known == self.sizes_.end() ? 0 : known->second;
      if (bytes == 0 || bytes > self.budget_) {
        if (bytes != 0) self.sizes_.erase(known);
        evicted.push_back(data);
      } else {
        size_t drop = 0;
        while (self.cached_bytes_ + bytes > self.budget_) {
          const Cached& oldest = self.cached_[drop++];
          self.cached_bytes_ -= oldest.bytes;
          self.sizes_.erase(oldest.data);
          evicted.push_back(oldest.data);
        }
        self.cached_.erase(self.cached_.begin(), self.cached_.begin() + drop);
        self.cached_.push_back({data, bytes});
        self.cached_bytes_ += bytes;
      }
    }
    for (void* block : evicted) std::free(block);
    if (bytes != 0) self.report(data, -static_cast<int64_t>(bytes));
  }

  const size_t budget_;
  std::mutex mutex_;
  std::vector<Cached> cached_;                 // freed blocks, oldest first
  size_t cached_bytes_ = 0;
  size_t live_bytes_ = 0;                      // handed out and not yet freed
  std::unordered_map<void*, size_t> sizes_;    // every block this allocator made, cached or live
};

// at::empty for a kernel's output: large CPU outputs from OutputAllocator, anything else at::empty.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                               c10::MemoryFormat memory_format = c10::MemoryFormat::Contiguous) {
#if defined(__linux__)
  if (options.device().is_cpu() && !options.pinned_memory()) {
    at::Tensor out = at::detail::empty_generic(sizes, OutputAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                               options.dtype().toScalarType(), memory_format);
    // As at::empty does: under torch.utils.deterministic.fill_uninitialized_memory (the tests'
    // poison_outputs), uninitialized outputs are NaN, so an element a kernel forgot to write
    // shows, even in a reused block that holds the previous call's right answer.
    if (C10_UNLIKELY(at::globalContext().deterministicAlgorithms() &&
                     at::globalContext().deterministicFillUninitializedMemory())) {
      at::native::fill_empty_deterministic_(out);
    }
    return out;
  }
#endif
  return at::empty(sizes, options.memory_format(memory_format));
}

// at::empty_like for a contiguous or channels-last like.
inline at::Tensor empty_output_like(const at::Tensor& like) {
  return empty_output(like.sizes(), like.options(), like.suggest_memory_format());
}

inline at::Tensor zeros_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_output(sizes, options).zero_();
}

}  // namespace fuseformer
