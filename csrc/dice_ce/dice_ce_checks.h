// Argument checks shared by the CPU and CUDA wrappers of the dice_ce ops. The Python layer raises the same
// errors before launching; these guard direct torch.ops.fastseg calls.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "dice_ce.h"

namespace fastseg {
namespace dice_ce {

inline bool target_is_labels(const at::Tensor& target) {
  return target.dim() == 2;
}

inline void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target,
                         int64_t activation) {
  TORCH_CHECK_VALUE(logits.dim() == 3, op, ": logits must be (B, C, N), got shape ", logits.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(logits.scalar_type()), op,
                    ": logits must be floating point, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, op, ": logits need at least one class channel");
  TORCH_CHECK_VALUE(activation == kSoftmax || activation == kSigmoid, op,
                    ": activation must be 0 (softmax) or 1 (sigmoid), got ", activation);
  TORCH_CHECK_VALUE(logits.device() == target.device(), op, ": logits are on ", logits.device(),
                    " but target is on ", target.device());
  if (target_is_labels(target)) {
    TORCH_CHECK_VALUE(!at::isFloatingType(target.scalar_type()), op,
                      ": a (B, N) target holds integer labels, got ", target.scalar_type());
    TORCH_CHECK_VALUE(target.size(0) == logits.size(0) && target.size(1) == logits.size(2), op,
                      ": labels of shape (B, N) = ", target.sizes(), " do not match logits ", logits.sizes());
  } else {
    TORCH_CHECK_VALUE(target.dim() == 3, op, ": target must be (B, N) labels or a (B, C, N) mask, got shape ",
                      target.sizes());
    TORCH_CHECK_VALUE(target.sizes() == logits.sizes(), op, ": mask target of shape ", target.sizes(),
                      " does not match logits ", logits.sizes());
    const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK_VALUE(target.scalar_type() == at::kByte || target.scalar_type() == at::kBool ||
                          target.scalar_type() == acc,
                      op, ": a mask target must be bool, uint8 or ", acc, ", got ", target.scalar_type());
  }
}

inline at::ScalarType stats_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_grad_stats(const char* op, const at::Tensor& grad_stats, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(grad_stats.dim() == 3 && grad_stats.size(0) == logits.size(0) &&
                        grad_stats.size(1) == logits.size(1) && grad_stats.size(2) == kNumStats,
                    op, ": grad_stats must be (B, C, ", kNumStats, "), got ", grad_stats.sizes());
  TORCH_CHECK_VALUE(grad_stats.device() == logits.device(), op, ": grad_stats is on ", grad_stats.device(),
                    " but logits are on ", logits.device());
}

inline Problem make_problem(const at::Tensor& logits, std::optional<int64_t> ignore_index, bool squared) {
  return Problem{logits.size(0), logits.size(1), logits.size(2), squared, ignore_index.has_value(),
                 ignore_index.value_or(0)};
}

inline Strides strides_of(const at::Tensor& t) {
  if (t.dim() == 2) return Strides{t.stride(0), 0, t.stride(1)};
  return Strides{t.stride(0), t.stride(1), t.stride(2)};
}

// bool labels and masks are read as uint8.
inline at::Tensor as_readable_target(const at::Tensor& target) {
  return target.scalar_type() == at::kBool ? target.view(at::kByte) : target;
}

}  // namespace dice_ce
}  // namespace fastseg
