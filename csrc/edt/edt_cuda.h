// Torch-free interface of the CUDA kernels of the exact Euclidean distance transform (edt_kernels.cu). The ATen
// wrapper (edt_cuda.cpp) passes raw pointers, so the kernels compile with plain nvcc on a machine whose torch
// has no CUDA.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "edt.h"

namespace fastseg {
namespace edt {
namespace cuda {

struct Args {
  Geometry g;
  const uint8_t* mask;     // (B, *spatial) contiguous, nonzero = foreground
  const double* spacing;   // device, (B, ndim) row-major
  float* out;              // (B, *spatial) contiguous
};

// Bytes of device scratch edt() needs: per-sample flags, the offset words when an axis reaches 65535 voxels,
// and the envelope stacks of the lines processed by one launch (at most kStackBudget bytes of them).
size_t workspace_bytes(const Geometry& g);

// Writes every element of args.out. `workspace` holds at least workspace_bytes(args.g) bytes, 256-byte
// aligned. Everything runs on `stream`.
cudaError_t edt(const Args& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace edt
}  // namespace fastseg
