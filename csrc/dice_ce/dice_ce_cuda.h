// Torch-free interface of the CUDA kernels of the fused Dice + cross-entropy statistics (dice_ce_kernels.cu).
// The ATen wrapper (dice_ce_cuda.cpp) passes raw pointers, element strides and dtype tags, so the kernels
// compile with plain nvcc on a machine whose torch has no CUDA.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common/dtype.h"
#include "dice_ce.h"

namespace fastseg {
namespace dice_ce {
namespace cuda {

// Element types. Logits: kFloat, kDouble, kHalf (IEEE binary16, layout of __half / at::Half), kBFloat16
// (__nv_bfloat16 / at::BFloat16). Label targets: kUInt8, kInt8, kInt16, kInt32, kInt64. Mask targets:
// kUInt8, or the accumulation type (kFloat; kDouble for double logits). Sums and grad_stats are in the
// accumulation type.
using ::fastseg::DType;

// A (B, C, N) tensor, or (B, N) labels with strides.c unused.
struct Operand {
  const void* data;
  DType dtype;
  Strides strides;
};

struct ForwardArgs {
  Problem pb;
  int64_t activation;  // kSoftmax or kSigmoid
  Operand logits;
  Operand target;
  bool labels;  // target is (B, N) labels; else a (B, C, N) mask
  void* stats;  // (B, C, 5) contiguous, accumulation type
};

struct BackwardArgs {
  Problem pb;
  int64_t activation;
  const void* grad_stats;  // (B, C, 5) contiguous, accumulation type
  Operand logits;
  Operand target;
  bool labels;
  void* grad;  // (B, C, N) of the logits' dtype, strides below
  Strides grad_strides;
};

// Labels outside [0, C) that are not ignore_index are counted as ignored (the Python layer raises on them
// before launching). C has no upper bound beyond this one (labels are decoded to int32 classes).
constexpr int64_t kMaxClasses = INT32_MAX;

// Bytes of device scratch the forward pass needs (per-block partial sums, and a per-voxel log-sum-exp when
// softmax classes are split over several blocks). Depends on the current device; 0 for an empty problem.
cudaError_t forward_workspace_bytes(const ForwardArgs& args, size_t* bytes);

// Writes every element of args.stats; deterministic for a given device (fixed-order reductions, no atomics).
// `workspace` holds at least forward_workspace_bytes(args) bytes, 256-byte aligned.
cudaError_t forward(const ForwardArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Writes every element of args.grad.
cudaError_t backward(const BackwardArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace dice_ce
}  // namespace fastseg
