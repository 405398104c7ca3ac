// Label decoding shared by the op families' CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "fast_math.h"

namespace fastseg {

// Label -> class index, or -1 when ignored. A label that is neither a class in [0, pb.C) nor pb.ignore_index
// sets `bad`. Problem is any family's problem description with C, has_ignore and ignore_index.
template <typename Problem>
FASTSEG_HD int32_t decode_label(int64_t y, const Problem& pb, bool& bad) {
  if (pb.has_ignore && y == pb.ignore_index) return -1;
  if (y < 0 || y >= pb.C) {
    bad = true;
    return -1;
  }
  return static_cast<int32_t>(y);
}

}  // namespace fastseg
