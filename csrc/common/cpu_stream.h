// Streaming (non-temporal) row copies for large CPU outputs written once. A plain store to a line that is
// not cached first reads the line from memory (read-for-ownership); streaming stores skip that read and
// leave the caches to the inputs. Worth it only when the output could not stay cached anyway.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTSEG_STREAM_STORES 1
#else
#define FASTSEG_STREAM_STORES 0
#endif

namespace fastseg {

// Copies `rows` rows of `bytes` bytes from src to dst (row pitches in bytes).
using RowCopy = void (*)(const char* src, int64_t src_pitch, char* dst, int64_t dst_pitch, int64_t rows,
                         int64_t bytes);

inline void copy_rows_plain(const char* src, int64_t src_pitch, char* dst, int64_t dst_pitch, int64_t rows,
                            int64_t bytes) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * dst_pitch, src + r * src_pitch, bytes);
}

#if FASTSEG_STREAM_STORES
// A row's bytes [0, head) lie before dst's first kWidth-aligned address; [head, end) is the aligned middle.
inline void aligned_middle(const char* dst, int64_t bytes, int64_t width, int64_t& head, int64_t& end) {
  head = std::min<int64_t>(bytes, static_cast<int64_t>((-reinterpret_cast<uintptr_t>(dst)) & (width - 1)));
  end = head + (bytes - head) / width * width;
}

// One function per ISA (intrinsics need their target on the function that holds them): the aligned middle
// of each row is streamed, the unaligned ends copied.
__attribute__((target("avx512f"))) inline void stream_rows_avx512(const char* src, int64_t src_pitch, char* dst,
                                                                   int64_t dst_pitch, int64_t rows, int64_t bytes) {
  for (int64_t r = 0; r < rows; ++r) {
    const char* s = src + r * src_pitch;
    char* d = dst + r * dst_pitch;
    int64_t head, end;
    aligned_middle(d, bytes, 64, head, end);
    std::memcpy(d, s, head);
    for (int64_t i = head; i < end; i += 64)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), _mm512_loadu_si512(s + i));
    std::memcpy(d + end, s + end, bytes - end);
  }
}

__attribute__((target("avx"))) inline void stream_rows_avx(const char* src, int64_t src_pitch, char* dst,
                                                           int64_t dst_pitch, int64_t rows, int64_t bytes) {
  for (int64_t r = 0; r < rows; ++r) {
    const char* s = src + r * src_pitch;
    char* d = dst + r * dst_pitch;
    int64_t head, end;
    aligned_middle(d, bytes, 32, head, end);
    std::memcpy(d, s, head);
    for (int64_t i = head; i < end; i += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    std::memcpy(d + end, s + end, bytes - end);
  }
}

inline void stream_rows_sse2(const char* src, int64_t src_pitch, char* dst, int64_t dst_pitch, int64_t rows,
                             int64_t bytes) {
  for (int64_t r = 0; r < rows; ++r) {
    const char* s = src + r * src_pitch;
    char* d = dst + r * dst_pitch;
    int64_t head, end;
    aligned_middle(d, bytes, 16, head, end);
    std::memcpy(d, s, head);
    for (int64_t i = head; i < end; i += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    std::memcpy(d + end, s + end, bytes - end);
  }
}
#endif

// The widest streaming row copy this CPU has (a plain copy where there is none).
inline RowCopy stream_rows() {
#if FASTSEG_STREAM_STORES
  if (__builtin_cpu_supports("avx512f")) return &stream_rows_avx512;
  if (__builtin_cpu_supports("avx")) return &stream_rows_avx;
  return &stream_rows_sse2;
#else
  return &copy_rows_plain;
#endif
}

// Orders a thread's streaming stores before whatever it does next (they are weakly ordered).
inline void stream_fence() {
#if FASTSEG_STREAM_STORES
  _mm_sfence();
#endif
}

// Whether an output of `bytes` is worth streaming: from 16 MB on, the output and the inputs it is computed
// from overflow a typical last-level cache slice (32 MB), so the output would not stay cached anyway. (The
// OS's cache sizes are no guide inside VMs: this 32 MB L3 EPYC guest reports 320 MB.)
inline bool worth_streaming(int64_t bytes) {
  return bytes >= (int64_t(16) << 20);
}

}  // namespace fastseg
