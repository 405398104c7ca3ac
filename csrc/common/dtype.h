// Element-type tags shared by the torch-free CUDA interfaces (*_cuda.h): the ATen wrappers translate
// at::ScalarType into these (aten_dtype.h), the kernels dispatch on them.
#pragma once

namespace fastseg {

// kHalf has the layout of __half / at::Half, kBFloat16 that of __nv_bfloat16 / at::BFloat16.
enum class DType : int { kFloat, kDouble, kHalf, kBFloat16, kUInt8, kInt8, kInt16, kInt32, kInt64 };

}  // namespace fastseg
