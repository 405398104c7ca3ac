// float -> storage-type conversions that gcc vectorises, for CPU kernels that write half / bfloat16
// outputs. c10's own float -> Half / BFloat16 conversions branch (NaN test, range checks), which keeps the
// loops that call them scalar: writing a bfloat16 gradient took twice as long as a float one.
// Both round to nearest even and agree bit for bit with c10's portable conversions (checked over all 2^32
// floats; a NaN becomes c10's quiet NaN, its payload is not kept).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cpu_dispatch.h"
#include "fast_math.h"

namespace fastseg {

// Rounds by adding 0x7fff plus the lowest kept bit, so that exact ties go to the even neighbour.
FASTSEG_TILE_INLINE uint16_t bfloat16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

// Normal results: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits as above; a carry
// out of the largest finite half gives the infinity encoding, larger inputs are clamped to it. Subnormal
// results (|f| < 2^-14): adding 0.5, whose ulp is 2^-24 (the subnormal step), makes the float adder round
// |f| to a multiple of 2^-24; the low bits of the sum are that multiple.
FASTSEG_TILE_INLINE uint16_t half_bits(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t normal = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t clamped = a >= 0x47800000u ? 0x7c00u : normal;
  const uint32_t subnormal = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  const uint32_t finite = a < 0x38800000u ? subnormal : clamped;
  return static_cast<uint16_t>(sign | (a > 0x7f800000u ? 0x7e00u : finite));
}

// static_cast<T>(v), through the functions above for half and bfloat16.
template <typename T, typename V>
FASTSEG_TILE_INLINE T convert_to(V v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return c10::BFloat16(bfloat16_bits(static_cast<float>(v)), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return c10::Half(half_bits(static_cast<float>(v)), c10::Half::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

}  // namespace fastseg
