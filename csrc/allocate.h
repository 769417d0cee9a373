// Kernel outputs; on the CPU, allocated on transparent huge pages when they are large.
//
// glibc serves every block of 32 MiB or more (its largest mmap threshold) with a fresh mmap and
// unmaps it on free, so each such output faults in all of its 4 KiB pages at first touch: for a
// 64 MiB LayerNorm output, 16384 faults, which took 2-4x the kernel's own time on the 2-core
// machine (benchmarks/NOTES.md, 2026-12-02). On 2 MiB-aligned memory advised MADV_HUGEPAGE
// (honoured where THP is "madvise" or "always", the usual Linux settings) the same output takes
// 32 faults. Smaller blocks come from glibc's heap, already mapped, and stay with ATen's
// allocator. PyTorch does the same for all of its allocations under THP_MEM_ALLOC_ENABLE=1;
// this applies it to fuseformer's outputs only, without an environment variable.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fuseformer {

class HugePageAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHugePage = size_t{2} << 20;
  static constexpr size_t kMinBytes = size_t{32} << 20;

  // Blocks under kMinBytes (a resize_ can ask for any size) go to ATen's CPU allocator.
  c10::DataPtr allocate(size_t nbytes) override {
    // Rounded up so that the last huge page lies inside the block that madvise names.
    const size_t bytes = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = nullptr;
    if (nbytes < kMinBytes || posix_memalign(&data, kHugePage, bytes) != 0) {
      return c10::GetCPUAllocator()->allocate(nbytes);
    }
#if defined(__linux__)
    madvise(data, bytes, MADV_HUGEPAGE);  // advice only: without THP the pages stay 4 KiB
#endif
    // The context is the data pointer (a "simple" DataPtr, as ATen's own), freed by free().
    return {data, data, &std::free, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &std::free; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static HugePageAllocator* get() {
    static HugePageAllocator allocator;
    return &allocator;
  }
};

// at::empty for a kernel's output: large CPU outputs on huge pages, anything else at::empty.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                               c10::MemoryFormat memory_format = c10::MemoryFormat::Contiguous) {
#if defined(__linux__)
  if (options.device().is_cpu() && !options.pinned_memory()) {
    return at::detail::empty_generic(sizes, HugePageAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), memory_format);
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
