// CUDA kernel of fastseg::calibration_stats (maths in confidence.h, accumulation contract in confidence_cuda.h).
// Torch-free: raw pointers, element strides and dtype tags.
//
// One thread per voxel, in a grid-stride loop that whole warps run together; each thread walks its voxel's
// classes once, binning every p_c and keeping the running argmax, then adds the top-label and confusion
// terms. All sums go into 64-bit fixed-point accumulators (integers, so the result does not depend on the
// order of the atomics): a per-block copy in shared memory when it fits, flushed to global memory at the end,
// or the global copy directly otherwise.
//
// The bins are heavily contended (most probabilities of a class sit in its first or last bin), so a warp
// first merges the lanes that hit the same slot: __match_any_sync groups them, the group's lowest lane adds
// the group's count (__popc), hits (__ballot_sync) and fixed-point sum (__reduce_add_sync on sm_80+, over
// 16-bit halves of the values so that 32 of them fit 32 bits). This is warp-aggregated atomics (NVIDIA, CUDA
// C++ Programming Guide, "Warp Match Functions"; Adinets, "CUDA Pro Tip: Optimized Filtering with
// Warp-Aggregated Atomics", 2014) with a key per lane instead of one per warp.
//
// A launch covers at most kChunk voxels so that no fixed-point sum (<= kChunk * 2^32) overflows 64 bits; a
// second kernel adds each chunk's accumulators, converted to double, into the outputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "confidence.h"
#include "confidence_cuda.h"
#include "../common/cuda_device.cuh"

namespace fastseg {
namespace confidence {
namespace cuda {
namespace {

using u64 = unsigned long long;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr size_t kSmemBudget = 48 * 1024;  // no opt-in needed on any architecture
constexpr int64_t kChunk = int64_t{1} << 31;
constexpr double kFixedScale = 4294967296.0;  // 2^32

using cuda_device::ceil_div;
using cuda_device::load_as;
using cuda_device::load_label;
using cuda_device::TypeTag;

// p in [0, 1] -> round(p * 2^32), exact scaling then one rounding.
__device__ __forceinline__ u64 to_fixed(double p) {
  return __double2ull_rn(p * kFixedScale);
}

// Every lane with `active` adds 1 to acc[slot], q to acc[slot + 1] and, with kHits, 1[hit] to acc[slot + 2].
// All 32 lanes of the warp must call it (inactive lanes pass active = false).
template <bool kHits>
__device__ __forceinline__ void warp_add(u64* acc, int32_t slot, bool active, u64 q, bool hit) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  const unsigned full = 0xffffffffu;
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const unsigned peers = __match_any_sync(full, active ? slot : -1);
  const unsigned hits = kHits ? (__ballot_sync(full, hit) & peers) : 0u;
  const bool leader = active && (__ffs(peers) - 1 == lane);
#if __CUDA_ARCH__ >= 800
  // q <= 2^32: its 16-bit halves summed over at most 32 lanes stay below 2^21.
  const unsigned hi = __reduce_add_sync(peers, static_cast<unsigned>(q >> 16));
  const unsigned lo = __reduce_add_sync(peers, static_cast<unsigned>(q & 0xffffu));
  if (leader) atomicAdd(acc + slot + kSum, (static_cast<u64>(hi) << 16) + lo);
#else
  if (active) atomicAdd(acc + slot + kSum, q);
#endif
  if (leader) {
    atomicAdd(acc + slot + kCount, static_cast<u64>(__popc(peers)));
    if (kHits && hits != 0u) atomicAdd(acc + slot + kHits, static_cast<u64>(__popc(hits)));
  }
#else
  if (active) {
    atomicAdd(acc + slot + kCount, u64{1});
    atomicAdd(acc + slot + kSum, q);
    if (kHits && hit) atomicAdd(acc + slot + kHits, u64{1});
  }
#endif
}

struct Params {
  Problem pb;
  const void* probs;
  Strides ps;
  const void* target;
  DType tdtype;
  Strides ts;
  int64_t begin, end;  // flattened voxel range [b * N + v) of this launch
  u64* acc;            // total_size(pb) global accumulators
};

template <typename scalar_t, typename acc_t, bool kShared>
__global__ void __launch_bounds__(kThreads) stats_kernel(const Params p) {
  extern __shared__ __align__(16) u64 smem[];
  const Problem pb = p.pb;
  const int64_t total = total_size(pb);
  u64* acc = kShared ? smem : p.acc;
  if constexpr (kShared) {
    for (int64_t i = threadIdx.x; i < total; i += kThreads) smem[i] = 0;
    __syncthreads();
  }
  u64* cls = acc;
  u64* top = cls + classwise_size(pb);
  u64* conf = top + top_size(pb);
  const int32_t K = static_cast<int32_t>(pb.K);
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  const auto* probs = static_cast<const scalar_t*>(p.probs);

  // Warp-uniform loop bounds: every lane reaches every warp_add.
  const int64_t step = int64_t{gridDim.x} * kThreads;
  for (int64_t base = p.begin + (int64_t{blockIdx.x} * kWarps + warp) * 32; base < p.end; base += step) {
    const int64_t i = base + lane;
    int64_t b = 0, v = 0;
    int32_t y = -1;
    if (i < p.end) {
      b = i / pb.N;
      v = i - b * pb.N;
      bool bad = false;
      y = decode_label(load_label(p.target, b * p.ts.b + v * p.ts.n, p.tdtype), pb, bad);
    }
    const bool valid = y >= 0;
    const scalar_t* pv = probs + b * p.ps.b + v * p.ps.n;
    acc_t best = acc_t(-1), py = acc_t(0);
    int32_t arg = 0;
    for (int64_t c = 0; c < pb.C; ++c) {
      const acc_t pc = valid ? clamp_prob(load_as<acc_t>(pv + c * p.ps.c)) : acc_t(0);
      const int32_t ci = static_cast<int32_t>(c);
      argmax_step(pc, ci, best, arg);
      py = ci == y ? pc : py;
      warp_add<true>(cls, (ci * K + bin_of(pc, K)) * kBinStats, valid, to_fixed(pc), ci == y);
    }
    warp_add<true>(top, bin_of(best, K) * kBinStats, valid, to_fixed(best), arg == y);
    warp_add<false>(conf, static_cast<int32_t>(predicted_slot(arg, y)), valid, to_fixed(best), false);
    warp_add<false>(conf, static_cast<int32_t>(missed_slot(y)), valid && arg != y, to_fixed(py), false);
  }

  if constexpr (kShared) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < total; i += kThreads) {
      if (smem[i] != 0) atomicAdd(p.acc + i, smem[i]);
    }
  }
}

// Adds the accumulators into the three float64 outputs: counts as they are, sums scaled by 2^-32.
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const u64* __restrict__ acc, Problem pb, double* cls, double* top, double* conf) {
  const int64_t ncls = classwise_size(pb), ntop = top_size(pb), total = total_size(pb);
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < total; i += int64_t{gridDim.x} * kThreads) {
    double* out;
    bool is_sum;
    if (i < ncls) {
      out = cls + i;
      is_sum = i % kBinStats == kSum;
    } else if (i < ncls + ntop) {
      out = top + (i - ncls);
      is_sum = (i - ncls) % kBinStats == kSum;
    } else {
      out = conf + (i - ncls - ntop);
      is_sum = (i - ncls - ntop) % 2 == 1;  // kTPSum, kFPSum, kFNSum
    }
    const double a = static_cast<double>(acc[i]);
    *out += is_sum ? a / kFixedScale : a;
  }
}

// Enough blocks for one full wave of resident blocks on the current device, no more than there are voxels for.
template <typename Kernel>
cudaError_t grid_size(Kernel kernel, size_t smem, int64_t voxels, int64_t* out) {
  int dev = 0, sms = 0, occ = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  const int64_t resident = int64_t{sms > 0 ? sms : 1} * (occ > 0 ? occ : 1);
  const int64_t need = ceil_div(voxels, kThreads);
  *out = resident < need ? resident : need;
  if (*out < 1) *out = 1;
  return cudaSuccess;
}

template <typename scalar_t, typename acc_t>
cudaError_t run(const Args& a, u64* ws, cudaStream_t stream) {
  const Problem& pb = a.pb;
  const int64_t total = total_size(pb);
  const size_t smem_bytes = sizeof(u64) * static_cast<size_t>(total);
  const bool shared = smem_bytes <= kSmemBudget;
  const size_t smem = shared ? smem_bytes : 0;
  auto kernel = shared ? stats_kernel<scalar_t, acc_t, true> : stats_kernel<scalar_t, acc_t, false>;
  const int64_t voxels = pb.B * pb.N;
  int64_t blocks = 1;
  cudaError_t err = grid_size(kernel, smem, voxels < kChunk ? voxels : kChunk, &blocks);
  if (err != cudaSuccess) return err;
  const int64_t fblocks = ceil_div(total, kThreads) < 1024 ? ceil_div(total, kThreads) : 1024;
  for (int64_t begin = 0; begin < voxels; begin += kChunk) {
    const int64_t end = voxels - begin < kChunk ? voxels : begin + kChunk;
    if ((err = cudaMemsetAsync(ws, 0, smem_bytes, stream)) != cudaSuccess) return err;
    const Params params{pb,       a.probs, a.probs_strides, a.target, a.target_dtype, a.target_strides,
                        begin,    end,     ws};
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(params);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    finalize_kernel<<<static_cast<unsigned>(fblocks), kThreads, 0, stream>>>(ws, pb, a.classwise, a.top,
                                                                              a.confusion);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

bool valid_problem(const Problem& pb) {
  return pb.B >= 0 && pb.N >= 0 && pb.C >= 1 && pb.K >= 1 && pb.K <= kMaxBins &&
         pb.C * pb.K * kBinStats < INT32_MAX;
}

bool valid_labels(DType t) {
  return t == DType::kUInt8 || t == DType::kInt8 || t == DType::kInt16 || t == DType::kInt32 ||
         t == DType::kInt64;
}

}  // namespace

size_t workspace_bytes(const Problem& pb) {
  return sizeof(u64) * static_cast<size_t>(total_size(pb));
}

cudaError_t calibration_stats(const Args& args, void* workspace, size_t ws_bytes, cudaStream_t stream) {
  const Problem& pb = args.pb;
  if (!valid_problem(pb) || !valid_labels(args.target_dtype)) return cudaErrorInvalidValue;
  if (pb.B == 0 || pb.N == 0) return cudaSuccess;  // nothing to add: the caller's outputs are zeros
  if (workspace == nullptr || ws_bytes < workspace_bytes(pb)) return cudaErrorInvalidValue;
  u64* ws = static_cast<u64*>(workspace);
  switch (args.probs_dtype) {
    case DType::kFloat:
      return run<float, float>(args, ws, stream);
    case DType::kDouble:
      return run<double, double>(args, ws, stream);
    case DType::kHalf:
      return run<__half, float>(args, ws, stream);
    case DType::kBFloat16:
      return run<__nv_bfloat16, float>(args, ws, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace confidence
}  // namespace fastseg
