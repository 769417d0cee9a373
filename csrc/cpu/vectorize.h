// Loops the compiler vectorizes for AVX-512 / AVX2 / baseline x86, one clone picked at load
// time (target_clones), so one build runs well on every x86 CPU.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FF_VECTORIZE __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FF_VECTORIZE
#endif

// What this CPU is, checked once (csrc/cpu/gemv.cpp; false off x86).
namespace fuseformer::cpu {
bool has_avx512();    // runs AVX-512F: the hand-written AVX-512 loops apply
bool cpu_is_intel();  // cpuid says GenuineIntel: choices measured opposite on Intel Xeon and AMD EPYC follow it
}  // namespace fuseformer::cpu
