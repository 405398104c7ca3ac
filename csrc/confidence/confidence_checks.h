// Argument checks and problem set-up shared by the CPU and CUDA wrappers of fastseg::calibration_stats. The
// Python layer (fastseg/confidence.py) raises the same errors before calling; these guard direct
// torch.ops.fastseg calls.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "confidence.h"

namespace fastseg {
namespace confidence {

constexpr const char* kOp = "fastseg::calibration_stats";

inline void check_inputs(const at::Tensor& probs, const at::Tensor& target, int64_t num_bins) {
  TORCH_CHECK_VALUE(probs.dim() >= 2, kOp, ": probs must be (B, C, *spatial), got shape ", probs.sizes());
  const auto pt = probs.scalar_type();
  TORCH_CHECK_TYPE(pt == at::kFloat || pt == at::kHalf || pt == at::kBFloat16 || pt == at::kDouble, kOp,
                   ": probs must be float16, bfloat16, float32 or float64, got ", pt);
  TORCH_CHECK_VALUE(probs.size(1) >= 1, kOp, ": probs need at least one class channel, got shape ",
                    probs.sizes());
  TORCH_CHECK_VALUE(num_bins >= 1 && num_bins <= kMaxBins, kOp, ": num_bins must be in [1, ", kMaxBins,
                    "], got ", num_bins);
  // Bin slots are int32 on the GPU.
  TORCH_CHECK_VALUE(probs.size(1) * num_bins * kBinStats < INT32_MAX, kOp, ": C * num_bins = ",
                    probs.size(1) * num_bins, " is too large");
  TORCH_CHECK_VALUE(probs.device() == target.device(), kOp, ": probs are on ", probs.device(),
                    " but target is on ", target.device());
  const auto tt = target.scalar_type();
  TORCH_CHECK_TYPE(tt == at::kByte || tt == at::kChar || tt == at::kShort || tt == at::kInt || tt == at::kLong ||
                       tt == at::kBool,
                   kOp, ": target must hold integer class labels (bool, uint8, int8, int16, int32 or int64), got ",
                   tt);
  std::vector<int64_t> expected{probs.size(0)};
  for (int64_t d = 2; d < probs.dim(); ++d) expected.push_back(probs.size(d));
  TORCH_CHECK_VALUE(target.sizes() == at::IntArrayRef(expected), kOp, ": target must be (B, *spatial) = ",
                    at::IntArrayRef(expected), " to match probs of shape ", probs.sizes(), ", got ", target.sizes());
}

inline Problem make_problem(const at::Tensor& probs, int64_t num_bins, std::optional<int64_t> ignore_index) {
  const int64_t B = probs.size(0), C = probs.size(1);
  int64_t N = 1;
  for (int64_t d = 2; d < probs.dim(); ++d) N *= probs.size(d);
  return Problem{B, C, N, num_bins, ignore_index.has_value(), ignore_index.value_or(0)};
}

// (B, C, N) and (B, N) views: no copy when the spatial dims collapse into one stride (contiguous and
// channels-last layouts do); a copy otherwise (e.g. a permuted spatial view). bool labels are read as uint8.
inline at::Tensor flat_probs(const at::Tensor& probs, const Problem& pb) {
  return probs.reshape({pb.B, pb.C, pb.N});
}

inline at::Tensor flat_target(const at::Tensor& target, const Problem& pb) {
  const at::Tensor t = target.scalar_type() == at::kBool ? target.view(at::kByte) : target;
  return t.reshape({pb.B, pb.N});
}

inline Strides strides_of(const at::Tensor& t) {
  if (t.dim() == 2) return Strides{t.stride(0), 0, t.stride(1)};
  return Strides{t.stride(0), t.stride(1), t.stride(2)};
}

// The three outputs, zero-filled float64 on probs' device.
inline std::vector<at::Tensor> zero_outputs(const at::Tensor& probs, const Problem& pb) {
  const auto opts = probs.options().dtype(at::kDouble);
  return {at::zeros({pb.C, pb.K, kBinStats}, opts), at::zeros({pb.K, kBinStats}, opts),
          at::zeros({pb.C, kConfusionStats}, opts)};
}

}  // namespace confidence
}  // namespace fastseg
