// at::ScalarType -> fastseg::DType for the ATen side of the CUDA wrappers. Each op raises its own message
// for a dtype without a tag.
#pragma once

#include <c10/core/ScalarType.h>

#include <optional>

#include "dtype.h"

namespace fastseg {

inline std::optional<DType> dtype_tag(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat:
      return DType::kFloat;
    case c10::kDouble:
      return DType::kDouble;
    case c10::kHalf:
      return DType::kHalf;
    case c10::kBFloat16:
      return DType::kBFloat16;
    case c10::kByte:
      return DType::kUInt8;
    case c10::kChar:
      return DType::kInt8;
    case c10::kShort:
      return DType::kInt16;
    case c10::kInt:
      return DType::kInt32;
    case c10::kLong:
      return DType::kInt64;
    default:
      return std::nullopt;
  }
}

}  // namespace fastseg
