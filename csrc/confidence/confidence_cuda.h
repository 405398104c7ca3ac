// Torch-free interface of the CUDA kernel of fastseg::calibration_stats (confidence_kernels.cu). The ATen wrapper
// (confidence_cuda.cpp) passes raw pointers, element strides and dtype tags, so the kernel compiles with plain
// nvcc on a machine whose torch has no CUDA.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common/dtype.h"
#include "confidence.h"

namespace fastseg {
namespace confidence {
namespace cuda {

// Probabilities: kFloat, kDouble, kHalf (layout of __half / at::Half), kBFloat16 (__nv_bfloat16 /
// at::BFloat16). Labels: kUInt8, kInt8, kInt16, kInt32, kInt64.
using ::fastseg::DType;

struct Args {
  Problem pb;
  const void* probs;  // (B, C, N) with probs_strides
  DType probs_dtype;
  Strides probs_strides;
  const void* target;  // (B, N) labels with target_strides.b and .n
  DType target_dtype;
  Strides target_strides;
  double* classwise;  // (C, K, 3) contiguous, zero-filled by the caller; the kernel adds into them
  double* top;        // (K, 3)
  double* confusion;  // (C, 6)
};

// Labels outside [0, C) that are not ignore_index are counted as ignored (the kernel cannot raise; the Python
// layer checks the labels before launching).
//
// Sums of probabilities are accumulated in 64-bit fixed point with 32 fractional bits (each probability
// rounded to the nearest multiple of 2^-32, at most 2^-33 off; exact for every float16 value, for bfloat16
// values >= 2^-25 and for float32 values >= 2^-9), converted to double at the end: integer additions are associative, so the result is
// the same bit for bit whatever the block scheduling. A sum of n probabilities differs from the CPU
// kernel's float64 sum by at most n * 2^-33. Counts are exact.

// Bytes of device scratch calibration_stats needs (the fixed-point accumulators).
size_t workspace_bytes(const Problem& pb);

// Adds the statistics into args' outputs. `workspace` holds at least workspace_bytes(args.pb) bytes, 8-byte
// aligned. Everything runs on `stream`.
cudaError_t calibration_stats(const Args& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace confidence
}  // namespace fastseg
