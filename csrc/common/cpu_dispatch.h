// CPU code-generation switches shared by the op families' CPU kernels.
#pragma once

// Hot tile loops are compiled three times, for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline
// ISA, and picked at load time. Plain "avx2" would leave out FMA: the v3/v4 levels cut the dice_ce kernels'
// CPU time by about a fifth at (2, 8, 96^3).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTSEG_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTSEG_CPU_CLONES
#endif
#if defined(__GNUC__)
#define FASTSEG_TILE_INLINE inline __attribute__((always_inline))
#else
#define FASTSEG_TILE_INLINE inline
#endif
