// Loops the compiler vectorizes for AVX-512 / AVX2 / baseline x86, one clone picked at load
// time (target_clones), so one build runs well on every x86 CPU.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FF_VECTORIZE __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FF_VECTORIZE
#endif

namespace fuseformer::cpu {
// The CPU's vendor is Intel (cpuid, read once; false off x86): memory-side choices that
// measured opposite on Intel Xeon and AMD EPYC follow it (csrc/cpu/gemv.cpp).
bool cpu_is_intel();
}  // namespace fuseformer::cpu
