// Elementwise math shared by the CPU and CUDA kernels. Torch-free, so plain nvcc compiles it.
//
// exp/log for float use Cody-Waite range reduction with the Cephes single-precision polynomials
// (S. L. Moshier, "Methods and Programs for Mathematical Functions", 1989): about 1 ulp, written
// branch-free so that gcc vectorises the CPU loops that call them, and identical on the GPU so the
// CPU tests exercise the same arithmetic. double keeps the libm functions (gradcheck needs them).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTSEG_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced inlining lets the CPU kernels' AVX2 clones (target_clones) vectorise these with AVX2 too.
#define FASTSEG_HD inline __attribute__((always_inline))
#else
#define FASTSEG_HD inline
#endif

namespace fastseg {

// __builtin_bit_cast, unlike memcpy, keeps gcc's loop vectoriser going.
FASTSEG_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#elif defined(__GNUC__)
  return __builtin_bit_cast(float, b);
#else
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
#endif
}

FASTSEG_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#elif defined(__GNUC__)
  return __builtin_bit_cast(uint32_t, f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
#endif
}

// exp(x) for x <= 0 (every caller passes x - max or -|x|); clamped so the result stays a normal float.
FASTSEG_HD float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  // Round-to-nearest through the 1.5 * 2^23 magic constant: vectorises without SSE4.1's roundps.
  const float magic = 12582912.0f;
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  return p * bits_to_float(static_cast<uint32_t>(e) << 23);
}

// log(x) for finite x >= 1 (softmax denominators and 1 + exp(-|x|)).
FASTSEG_HD float log_ge1(float x) {
  const uint32_t b = float_to_bits(x);
  int32_t e = static_cast<int32_t>((b >> 23) & 0xffu) - 126;
  float f = bits_to_float((b & 0x807fffffu) | 0x3f000000u);  // mantissa in [0.5, 1)
  const bool below = f < 0.70710678118654752f;
  e = below ? e - 1 : e;
  f = below ? f + f - 1.0f : f - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float ef = static_cast<float>(e);
  y = y - 2.12194440e-4f * ef;
  y = y - 0.5f * z;
  return f + y + 0.693359375f * ef;
}

FASTSEG_HD double exp_nonpos(double x) {
  return exp(x);
}

FASTSEG_HD double log_ge1(double x) {
  return log(x);
}

template <typename T>
FASTSEG_HD T max_(T a, T b) {
  return a > b ? a : b;
}

}  // namespace fastseg
