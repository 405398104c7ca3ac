// ATen wrapper of the CUDA kernel of fastseg::calibration_stats (confidence_kernels.cu): checks, device guard,
// allocation, dtype tags, launch on the current stream. Built only into a CUDAExtension.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../common/aten_dtype.h"
#include "confidence.h"
#include "confidence_checks.h"
#include "confidence_cuda.h"

namespace fastseg {
namespace confidence {
namespace {

cuda::DType dtype_of(at::ScalarType t) {
  const auto tag = dtype_tag(t);
  TORCH_CHECK_TYPE(tag.has_value(), kOp, ": unsupported dtype ", t, " on CUDA");
  return *tag;
}

std::vector<at::Tensor> calibration_stats_cuda(const at::Tensor& probs_in, const at::Tensor& target_in,
                                               int64_t num_bins, std::optional<int64_t> ignore_index) {
  check_inputs(probs_in, target_in, num_bins);
  TORCH_CHECK_VALUE(probs_in.is_cuda(), kOp, ": expected CUDA tensors, got probs on ", probs_in.device());
  const c10::cuda::CUDAGuard guard(probs_in.device());
  const Problem pb = make_problem(probs_in, num_bins, ignore_index);
  std::vector<at::Tensor> out = zero_outputs(probs_in, pb);
  if (pb.B == 0 || pb.N == 0) return out;
  const at::Tensor probs = flat_probs(probs_in, pb);
  const at::Tensor target = flat_target(target_in, pb);

  const cuda::Args args{pb,
                        probs.const_data_ptr(),
                        dtype_of(probs.scalar_type()),
                        strides_of(probs),
                        target.const_data_ptr(),
                        dtype_of(target.scalar_type()),
                        strides_of(target),
                        out[0].mutable_data_ptr<double>(),
                        out[1].mutable_data_ptr<double>(),
                        out[2].mutable_data_ptr<double>()};
  const size_t ws_bytes = cuda::workspace_bytes(pb);
  // From the caching allocator on the current stream, so it is safely reused once the kernels are done.
  const at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, probs.options().dtype(at::kByte));
  const cudaError_t err = cuda::calibration_stats(args, ws.data_ptr(), ws_bytes, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kOp, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("calibration_stats", &calibration_stats_cuda);
}

}  // namespace confidence
}  // namespace fastseg
