// Argument checks and problem set-up shared by the CPU and CUDA wrappers of fastseg::edt. The Python layer
// (fastseg/metrics/edt.py) raises the same errors as ValueError before calling; these guard direct
// torch.ops.fastseg.edt calls.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "edt.h"

namespace fastseg {
namespace edt {

inline void check_inputs(const char* op, const at::Tensor& mask, at::ArrayRef<double> spacing) {
  TORCH_CHECK_VALUE(mask.dim() >= 2 && mask.dim() <= kMaxDims + 1, op,
                    ": mask must be (B, *spatial) with 1 to 3 spatial dims, got shape ", mask.sizes());
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kByte || mask.scalar_type() == at::kBool, op,
                    ": mask must be uint8 or bool (nonzero = foreground), got ", mask.scalar_type());
  const int64_t B = mask.size(0), nd = mask.dim() - 1;
  TORCH_CHECK_VALUE(static_cast<int64_t>(spacing.size()) == nd || static_cast<int64_t>(spacing.size()) == B * nd,
                    op, ": spacing must hold ", nd, " values (one per spatial axis) or B * ", nd, " = ", B * nd,
                    " (one row per batch element), got ", spacing.size());
  for (const double s : spacing) {
    TORCH_CHECK_VALUE(std::isfinite(s) && s > 0, op, ": spacing values must be finite and > 0, got ", spacing);
  }
  for (int64_t k = 1; k < mask.dim(); ++k) {
    // Line coordinates are int32 in the envelope's stack.
    TORCH_CHECK_VALUE(mask.size(k) < INT32_MAX, op, ": spatial size ", mask.size(k), " is too large");
  }
}

inline Geometry geometry_of(const at::Tensor& mask) {
  Geometry g;
  g.B = mask.size(0);
  g.ndim = static_cast<int>(mask.dim() - 1);
  g.N = 1;
  for (int k = 0; k < g.ndim; ++k) {
    g.dims[k] = mask.size(k + 1);
    g.N *= g.dims[k];
  }
  return g;
}

// (B, ndim) spacing, row-major.
inline std::vector<double> spacing_per_batch(at::ArrayRef<double> spacing, const Geometry& g) {
  std::vector<double> out(static_cast<size_t>(g.B * g.ndim));
  const bool shared = static_cast<int64_t>(spacing.size()) == g.ndim;
  for (int64_t b = 0; b < g.B; ++b) {
    for (int k = 0; k < g.ndim; ++k) out[b * g.ndim + k] = spacing[shared ? k : b * g.ndim + k];
  }
  return out;
}

// bool masks are read as uint8.
inline at::Tensor as_readable_mask(const at::Tensor& mask) {
  return mask.scalar_type() == at::kBool ? mask.view(at::kByte) : mask;
}

}  // namespace edt
}  // namespace fastseg
