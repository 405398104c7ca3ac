// Device helpers shared by the .cu kernels (torch-free; nvcc only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "dtype.h"

namespace fastseg {
namespace cuda_device {

template <typename T>
struct TypeTag {
  using type = T;
};

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Explicit conversions: torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__ and friends.
template <typename A, typename T>
__device__ __forceinline__ A load_as(const T* p) {
  if constexpr (std::is_same_v<T, __half>) {
    return static_cast<A>(__half2float(*p));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return static_cast<A>(__bfloat162float(*p));
  } else {
    return static_cast<A>(*p);
  }
}

// The label dtype is a runtime tag (a warp-uniform branch per voxel) rather than a template parameter:
// five label types would otherwise multiply the number of kernels by five.
__device__ __forceinline__ int64_t load_label(const void* base, int64_t off, DType t) {
  switch (t) {
    case DType::kUInt8:
      return static_cast<const uint8_t*>(base)[off];
    case DType::kInt8:
      return static_cast<const int8_t*>(base)[off];
    case DType::kInt16:
      return static_cast<const int16_t*>(base)[off];
    case DType::kInt32:
      return static_cast<const int32_t*>(base)[off];
    default:
      return static_cast<const int64_t*>(base)[off];
  }
}

}  // namespace cuda_device
}  // namespace fastseg
