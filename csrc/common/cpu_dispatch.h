// CPU code-generation switches shared by the op families' CPU kernels.
#pragma once

#include <cstdint>

// Hot tile loops are compiled three times, for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline
// ISA, and picked at load time. Plain "avx2" would leave out FMA: the v3/v4 levels cut the dice_ce kernels'
// CPU time by about a fifth at (2, 8, 96^3).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTSEG_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FASTSEG_ISA_LEVELS 1
#else
#define FASTSEG_CPU_CLONES
#define FASTSEG_ISA_LEVELS 0
#endif
#if defined(__GNUC__)
#define FASTSEG_TILE_INLINE inline __attribute__((always_inline))
#else
#define FASTSEG_TILE_INLINE inline
#endif

namespace fastseg {

// The same levels for code that target_clones cannot reach (templates): run_at_best_isa compiles a whole
// per-thread work function once per level. The body's call operator must be FASTSEG_TILE_INLINE (a lambda:
// `[&](int64_t begin, int64_t end) FASTSEG_TILE_INLINE_LAMBDA {...}`), and so must everything it calls in
// its hot loops, so that they are compiled inside each level's entry point.
#if defined(__GNUC__)
#define FASTSEG_TILE_INLINE_LAMBDA __attribute__((always_inline))
#define FASTSEG_NOINLINE __attribute__((noinline))
#else
#define FASTSEG_TILE_INLINE_LAMBDA
#define FASTSEG_NOINLINE
#endif

#if FASTSEG_ISA_LEVELS
template <typename Body>
__attribute__((target("arch=x86-64-v4"), noinline)) void run_isa_v4(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}
template <typename Body>
__attribute__((target("arch=x86-64-v3"), noinline)) void run_isa_v3(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}
#endif
template <typename Body>
FASTSEG_NOINLINE void run_isa_baseline(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}

inline int cpu_isa_level() {
#if FASTSEG_ISA_LEVELS
  static const int level = __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 1;
  return level;
#else
  return 1;
#endif
}

template <typename Body>
void run_at_best_isa(const Body& body, int64_t begin, int64_t end) {
#if FASTSEG_ISA_LEVELS
  switch (cpu_isa_level()) {
    case 4:
      return run_isa_v4(body, begin, end);
    case 3:
      return run_isa_v3(body, begin, end);
    default:
      break;
  }
#endif
  run_isa_baseline(body, begin, end);
}

}  // namespace fastseg
