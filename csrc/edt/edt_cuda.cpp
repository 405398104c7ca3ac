// ATen wrapper of the CUDA kernels of the exact Euclidean distance transform (edt_kernels.cu): checks, device
// guard, allocation, spacing upload, launch on the current stream. Built only into a CUDAExtension.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "edt.h"
#include "edt_checks.h"
#include "edt_cuda.h"

namespace fastseg {
namespace edt {
namespace {

at::Tensor edt_cuda(const at::Tensor& mask_in, at::ArrayRef<double> spacing) {
  constexpr const char* op = "fastseg::edt";
  check_inputs(op, mask_in, spacing);
  TORCH_CHECK_VALUE(mask_in.is_cuda(), op, ": expected a CUDA mask, got ", mask_in.device());
  const c10::cuda::CUDAGuard guard(mask_in.device());
  const at::Tensor mask = as_readable_mask(mask_in).contiguous();
  at::Tensor out = at::empty(mask.sizes(), mask.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;

  const Geometry g = geometry_of(mask);
  const std::vector<double> sp = spacing_per_batch(spacing, g);
  // (B, ndim) doubles: a pageable host-to-device copy, ordered on the current stream.
  const at::Tensor sp_dev = at::tensor(sp, at::TensorOptions().dtype(at::kDouble)).to(mask.device());
  const size_t ws_bytes = cuda::workspace_bytes(g);
  // From the caching allocator on the current stream, so it is safely reused once the kernels are done.
  const at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, mask.options().dtype(at::kByte));
  const cuda::Args args{g, mask.const_data_ptr<uint8_t>(), sp_dev.const_data_ptr<double>(),
                        out.mutable_data_ptr<float>()};
  const cudaError_t err = cuda::edt(args, ws.data_ptr(), ws_bytes, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("edt", &edt_cuda);
}

}  // namespace edt
}  // namespace fastseg
