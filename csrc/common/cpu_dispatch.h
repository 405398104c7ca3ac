// CPU code-generation switches shared by the op families' CPU kernels.
#pragma once

// Hot tile loops are compiled twice, for AVX2 and for the baseline ISA, and picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTSEG_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTSEG_CPU_CLONES
#endif
#if defined(__GNUC__)
#define FASTSEG_TILE_INLINE inline __attribute__((always_inline))
#else
#define FASTSEG_TILE_INLINE inline
#endif
