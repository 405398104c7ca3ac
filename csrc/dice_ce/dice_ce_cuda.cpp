// ATen wrapper of the CUDA kernels of the fused Dice + cross-entropy statistics (dice_ce_kernels.cu): checks,
// device guard, allocation, dtype tags, launch on the current stream. Built only into a CUDAExtension.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../common/aten_dtype.h"
#include "dice_ce.h"
#include "dice_ce_checks.h"
#include "dice_ce_cuda.h"

namespace fastseg {
namespace dice_ce {
namespace {

cuda::DType dtype_of(const char* op, const char* what, at::ScalarType t) {
  const auto tag = dtype_tag(t);
  TORCH_CHECK_VALUE(tag.has_value(), op, ": unsupported ", what, " dtype ", t,
                    " on CUDA (labels: uint8, int8, int16, int32 or int64)");
  return *tag;
}

cuda::Operand operand(const char* op, const char* what, const at::Tensor& t) {
  return cuda::Operand{t.const_data_ptr(), dtype_of(op, what, t.scalar_type()), strides_of(t)};
}

void check_cuda_inputs(const char* op, const at::Tensor& logits, const Problem& pb) {
  TORCH_CHECK_VALUE(logits.is_cuda(), op, ": expected CUDA tensors, got logits on ", logits.device());
  TORCH_CHECK_VALUE(pb.C <= cuda::kMaxClasses, op, ": at most ", cuda::kMaxClasses, " classes on CUDA, got ",
                    pb.C);
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor dice_ce_stats_cuda(const at::Tensor& logits, const at::Tensor& target_in, int64_t activation,
                              std::optional<int64_t> ignore_index, bool squared_pred) {
  constexpr const char* op = "fastseg::dice_ce_stats";
  const at::Tensor target = as_readable_target(target_in);
  check_inputs(op, logits, target, activation);
  const Problem pb = make_problem(logits, ignore_index, squared_pred);
  check_cuda_inputs(op, logits, pb);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor stats = at::zeros({pb.B, pb.C, kNumStats}, logits.options().dtype(stats_dtype(logits)));
  if (pb.B == 0 || pb.N == 0) return stats;

  const cuda::ForwardArgs args{pb,
                               activation,
                               operand(op, "logits", logits),
                               operand(op, "target", target),
                               target_is_labels(target),
                               stats.data_ptr()};
  size_t ws_bytes = 0;
  check_launch(op, cuda::forward_workspace_bytes(args, &ws_bytes));
  // From the caching allocator on the current stream, so it is safely reused once the kernels are done.
  const at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));
  check_launch(op, cuda::forward(args, ws.data_ptr(), ws_bytes, at::cuda::getCurrentCUDAStream()));
  return stats;
}

at::Tensor dice_ce_stats_backward_cuda(const at::Tensor& grad_stats, const at::Tensor& logits,
                                       const at::Tensor& target_in, int64_t activation,
                                       std::optional<int64_t> ignore_index, bool squared_pred) {
  constexpr const char* op = "fastseg::dice_ce_stats_backward";
  const at::Tensor target = as_readable_target(target_in);
  check_inputs(op, logits, target, activation);
  check_grad_stats(op, grad_stats, logits);
  const Problem pb = make_problem(logits, ignore_index, squared_pred);
  check_cuda_inputs(op, logits, pb);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty_like(logits);
  if (grad.numel() == 0) return grad;

  const at::Tensor gs = grad_stats.to(stats_dtype(logits)).contiguous();
  const cuda::BackwardArgs args{pb,
                                activation,
                                gs.const_data_ptr(),
                                operand(op, "logits", logits),
                                operand(op, "target", target),
                                target_is_labels(target),
                                grad.data_ptr(),
                                strides_of(grad)};
  check_launch(op, cuda::backward(args, at::cuda::getCurrentCUDAStream()));
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("dice_ce_stats", &dice_ce_stats_cuda);
  m.impl("dice_ce_stats_backward", &dice_ce_stats_backward_cuda);
}

}  // namespace dice_ce
}  // namespace fastseg
