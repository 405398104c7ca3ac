// CUDA kernels of the fused Dice + cross-entropy statistics (maths in dice_ce.h, reference semantics in
// dice_ce_cpu.cpp). Torch-free: raw pointers, element strides and dtype tags from dice_ce_cuda.h.
//
// The op is memory-bound on paper (each logit is read once, and in the backward its gradient written once),
// but the per-element arithmetic (fast_math.h's polynomial exp, about 16 instructions) is close to the
// H200's FP32 rate at full bandwidth, so the kernels compute exactly one exponential per logit.
//
// Layout: `lanes` neighbouring lanes of a warp (a power of two, 1 for C <= kGroup, up to 32) share one
// voxel; lane s of them owns `per` <= kGroup consecutive classes, kept in registers. Softmax merges the
// per-lane max and sum-of-exponentials with butterfly shuffles (two-pass softmax, as the CPU kernel), so
// registers stay bounded by kGroup whatever C. Each lane issues the loads of kVox voxels before any
// arithmetic, to keep enough bytes in flight when C is small.
//
// Forward: a grid-stride loop over one sample's voxels (grid.y = sample) keeps each lane's 5 sums per class
// in registers; the block reduces them once per sample (shuffles across the warp, then the warps in a fixed
// order in shared memory) into per-block partials (B, C, 5, blocks), and a second kernel adds the partials
// of each (b, c, stat) in a fixed order, in double: deterministic, no float atomics. Beyond 32 kGroup
// classes the classes are split into groups of blocks (interleaved in grid.x so that the groups of one
// voxel range run together and share the L2); softmax then first stores each voxel's log-sum-exp, computed
// in one read with the online normaliser of Milakov & Gimelshein, "Online normalizer calculation for
// softmax" (2018).
//
// Backward: the same layout recomputes the activation, merges sum_c p_c a_c and H = sum_c h_c across the
// voxel's lanes and writes dx. The sample's grad_stats row sits in shared memory. Softmax beyond 32 kGroup
// classes uses one thread per voxel with its row cached in shared memory (or recomputed).
//
// Sums are per-lane in float (double for double logits); the partials are added in double.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "dice_ce.h"
#include "dice_ce_cuda.h"
#include "../common/cuda_device.cuh"

namespace fastseg {
namespace dice_ce {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridY = 65535;
constexpr size_t kSmemBudget = 48 * 1024;       // no opt-in needed on any architecture
constexpr size_t kGradStatsSmemMax = 16 * 1024;  // larger grad_stats rows are read from global memory
constexpr size_t kWorkspaceAlign = 256;

enum TargetKind : int { kLabelTarget = 0, kByteMask = 1, kAccMask = 2 };

using cuda_device::ceil_div;
using cuda_device::load_as;
using cuda_device::load_label;
using cuda_device::TypeTag;

template <typename T>
__host__ __device__ __forceinline__ T min_(T a, T b) {
  return a < b ? a : b;
}

template <typename T>
__host__ __device__ __forceinline__ T clamp_(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

template <typename T, typename A>
__device__ __forceinline__ void store_as(T* p, A v) {
  if constexpr (std::is_same_v<T, __half>) {
    *p = __float2half_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    *p = __float2bfloat16_rn(static_cast<float>(v));
  } else {
    *p = static_cast<T>(v);
  }
}

// Butterfly reductions over aligned runs of `lanes` lanes; every lane of a run gets the same value (a + b
// and max_(a, b) are symmetric). All 32 lanes must call them.
template <typename T>
__device__ __forceinline__ T lanes_max(T v, int lanes) {
  for (int o = 1; o < lanes; o <<= 1) v = max_(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename T>
__device__ __forceinline__ T lanes_sum(T v, int lanes) {
  for (int o = 1; o < lanes; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ void accumulate(T (&st)[kNumStats], const Terms<T>& d) {
  st[kI] += d.I;
  st[kP] += d.P;
  st[kG] += d.G;
  st[kA] += d.A;
  st[kU] += d.U;
}

// The block's dynamic shared memory (one declaration, as bytes, whatever the kernel's types).
__device__ __forceinline__ unsigned char* dyn_smem() {
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
}

template <typename acc_t, int kTarget>
struct Target {
  const void* data;
  Strides s;
  DType dtype;

  // Class y (-1 when not counted) and mask m of voxel v. A label that is neither a class nor ignore_index
  // is counted as ignored: the kernel cannot raise, and it must not index out of bounds.
  __device__ __forceinline__ void voxel(const Problem& pb, int64_t b, int64_t v, int32_t& y, acc_t& m) const {
    if constexpr (kTarget == kLabelTarget) {
      bool bad = false;
      y = decode_label(load_label(data, b * s.b + v * s.n, dtype), pb, bad);
      m = y >= 0 ? acc_t(1) : acc_t(0);
    } else {
      y = -1;
      m = acc_t(1);
    }
  }

  __device__ __forceinline__ acc_t at(int64_t b, int64_t c, int64_t v, int32_t y) const {
    if constexpr (kTarget == kLabelTarget) {
      return y == c ? acc_t(1) : acc_t(0);
    } else if constexpr (kTarget == kByteMask) {
      return static_cast<acc_t>(static_cast<const uint8_t*>(data)[b * s.b + c * s.c + v * s.n]);
    } else {
      return static_cast<const acc_t*>(data)[b * s.b + c * s.c + v * s.n];
    }
  }
};

// How the lanes of a warp cover voxels and classes (see the top of the file).
struct Layout {
  int lanes;              // lanes per voxel: a power of two <= 32
  int per;                // classes per lane
  int64_t group_classes;  // classes per group of blocks (forward)
  int64_t groups;
};

// The fewest lanes per voxel that leave at most kGroup classes to each.
template <int kGroup>
Layout make_layout(int64_t C) {
  const int64_t cg = min_<int64_t>(C, int64_t{32} * kGroup);
  int lanes = 1;
  while (lanes < 32 && ceil_div(cg, lanes) > kGroup) lanes *= 2;
  return Layout{lanes, static_cast<int>(ceil_div(cg, lanes)), cg, ceil_div(C, cg)};
}

// ------------------------------------------------------------------------------------------------ forward

template <typename scalar_t, typename acc_t>
struct ForwardParams {
  Problem pb;
  const scalar_t* x;
  Strides xs;
  const void* t;
  Strides ts;
  DType tdtype;
  const acc_t* lse;  // (B, N) log-sum-exp when softmax classes are split over groups
  acc_t* partial;    // (B, C, 5, blocks)
  int64_t blocks;    // blocks per (sample, class group)
  Layout lay;
};

// Per-voxel log-sum-exp over all classes in one read of the logits (online normaliser).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    lse_kernel(const scalar_t* __restrict__ x, Strides xs, int64_t B, int64_t C, int64_t N, int64_t blocks,
               acc_t* __restrict__ lse) {
  const int64_t stride = blocks * kThreads;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int64_t v = blockIdx.x * int64_t{kThreads} + threadIdx.x; v < N; v += stride) {
      const scalar_t* xv = x + b * xs.b + v * xs.n;
      acc_t m = load_as<acc_t>(xv);
      acc_t s = acc_t(1);
#pragma unroll 4
      for (int64_t c = 1; c < C; ++c) {
        const acc_t xc = load_as<acc_t>(xv + c * xs.c);
        const acc_t d = xc - m;
        // exp(-|d|) is the one exponential either way: rescale the running sum, or add the new term.
        const acc_t e = exp_nonpos(d > acc_t(0) ? -d : d);
        if (d > acc_t(0)) {
          s = s * e + acc_t(1);
          m = xc;
        } else {
          s += e;
        }
      }
      lse[b * N + v] = m + log_ge1(s);
    }
  }
}

template <typename scalar_t, typename acc_t, int kTarget, bool kSoftmax, bool kLse, int kGroup, int kVox>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardParams<scalar_t, acc_t> p) {
  const Problem pb = p.pb;
  const Target<acc_t, kTarget> tg{p.t, p.ts, p.tdtype};
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int lanes = p.lay.lanes, per = p.lay.per;
  // Groups of the same voxel range are neighbours in grid.x, so they run together and share the L2.
  const int64_t grp = blockIdx.x % p.lay.groups;
  const int64_t blk = blockIdx.x / p.lay.groups;
  const int64_t cg0 = grp * p.lay.group_classes;
  const int64_t cg = min_(p.lay.group_classes, pb.C - cg0);
  const int slice = lane % lanes;
  const int64_t c0 = cg0 + int64_t{slice} * per;  // this lane's first class
  const int nc = static_cast<int>(clamp_<int64_t>(cg - int64_t{slice} * per, 0, per));
  const int vpw = 32 / lanes;       // voxels per warp and per kVox step
  const int vlane = lane / lanes;   // this lane's voxel among them
  const int64_t step = p.blocks * kWarps * kVox * vpw;
  const acc_t neg_inf = static_cast<acc_t>(-HUGE_VAL);
  acc_t* red = reinterpret_cast<acc_t*>(dyn_smem());  // (cg, 5)

  for (int64_t b = blockIdx.y; b < pb.B; b += gridDim.y) {
    acc_t st[kGroup][kNumStats];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
#pragma unroll
      for (int k = 0; k < kNumStats; ++k) st[j][k] = acc_t(0);
    }
    const scalar_t* xb = p.x + b * p.xs.b + c0 * p.xs.c;

    // The loop bound is uniform over the warp, as the shuffles need.
    for (int64_t base = (blk * kWarps + warp) * kVox * vpw; base < pb.N; base += step) {
      acc_t x[kVox][kGroup];
      acc_t g[kVox][kGroup];
      acc_t m[kVox];
      acc_t lse[kVox];
      int32_t y[kVox];
#pragma unroll
      for (int i = 0; i < kVox; ++i) {
        const int64_t v = base + i * vpw + vlane;
        m[i] = lse[i] = acc_t(0);
        y[i] = -1;
#pragma unroll
        for (int j = 0; j < kGroup; ++j) x[i][j] = g[i][j] = acc_t(0);
        if (v < pb.N) {
          tg.voxel(pb, b, v, y[i], m[i]);
          if constexpr (kLse) lse[i] = p.lse[b * pb.N + v];
#pragma unroll
          for (int j = 0; j < kGroup; ++j) {
            if (j < nc) {
              x[i][j] = load_as<acc_t>(xb + j * p.xs.c + v * p.xs.n);
              if constexpr (kTarget != kLabelTarget) g[i][j] = tg.at(b, c0 + j, v, y[i]);
            }
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kVox; ++i) {
        const bool ok = base + i * vpw + vlane < pb.N;
        auto gt = [&](int j) {
          return kTarget == kLabelTarget ? (y[i] == c0 + j ? acc_t(1) : acc_t(0)) : g[i][j];
        };
        if constexpr (kSoftmax && !kLse) {
          // Two-pass softmax as in the CPU tile: max, then the sum of exp(x - max); the lanes of the voxel
          // merge both.
          acc_t mx = nc > 0 ? x[i][0] : neg_inf;
#pragma unroll
          for (int j = 1; j < kGroup; ++j) {
            if (j < nc) mx = max_(mx, x[i][j]);
          }
          mx = lanes_max(mx, lanes);
          acc_t e[kGroup];
          acc_t s = acc_t(0);
#pragma unroll
          for (int j = 0; j < kGroup; ++j) {
            e[j] = acc_t(0);
            if (j < nc) {
              e[j] = exp_nonpos(x[i][j] - mx);
              s += e[j];
            }
          }
          s = lanes_sum(s, lanes);
          const acc_t inv = acc_t(1) / s;
          const acc_t l = mx + log_ge1(s);
          if (ok) {
#pragma unroll
            for (int j = 0; j < kGroup; ++j) {
              if (j < nc) accumulate(st[j], softmax_terms(e[j] * inv, l - x[i][j], gt(j), m[i], pb.squared));
            }
          }
        } else if constexpr (kSoftmax) {
          if (ok) {
#pragma unroll
            for (int j = 0; j < kGroup; ++j) {
              if (j < nc) {
                const acc_t pj = exp_nonpos(x[i][j] - lse[i]);
                accumulate(st[j], softmax_terms(pj, lse[i] - x[i][j], gt(j), m[i], pb.squared));
              }
            }
          }
        } else {
          if (ok) {
#pragma unroll
            for (int j = 0; j < kGroup; ++j) {
              if (j < nc) accumulate(st[j], sigmoid_terms(sigmoid_of(x[i][j]), gt(j), m[i], pb.squared));
            }
          }
        }
      }
    }

    // Block reduction, once per sample: across the warp's voxels (lanes of equal slice), then the warps one
    // after the other in shared memory, so the order is fixed.
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
#pragma unroll
      for (int k = 0; k < kNumStats; ++k) {
        for (int o = lanes; o < 32; o <<= 1) st[j][k] += __shfl_xor_sync(0xffffffffu, st[j][k], o);
      }
    }
    for (int64_t i = threadIdx.x; i < cg * kNumStats; i += kThreads) red[i] = acc_t(0);
    __syncthreads();
    for (int w = 0; w < kWarps; ++w) {
      if (warp == w && lane < lanes) {
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          if (j < nc) {
#pragma unroll
            for (int k = 0; k < kNumStats; ++k) red[(int64_t{slice} * per + j) * kNumStats + k] += st[j][k];
          }
        }
      }
      __syncthreads();
    }
    for (int64_t i = threadIdx.x; i < cg * kNumStats; i += kThreads) {
      p.partial[((b * pb.C + cg0) * kNumStats + i) * p.blocks + blk] = red[i];
    }
    __syncthreads();  // red is reused by the next sample
  }
}

// One warp per (b, c, stat): adds the blocks' partials in a fixed order, in double.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ stats, int64_t rows, int64_t blocks) {
  const int64_t row = (blockIdx.x * int64_t{kThreads} + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave together
  double s = 0.0;
  for (int64_t i = lane; i < blocks; i += 32) s += static_cast<double>(partial[row * blocks + i]);
  s = lanes_sum(s, 32);
  if (lane == 0) stats[row] = static_cast<acc_t>(s);
}

// ----------------------------------------------------------------------------------------------- backward

template <typename scalar_t, typename acc_t>
struct BackwardParams {
  Problem pb;
  const acc_t* gs;  // (B, C, 5) contiguous
  const scalar_t* x;
  Strides xs;
  const void* t;
  Strides ts;
  DType tdtype;
  scalar_t* dx;
  Strides ds;
  int64_t blocks;   // blocks per sample
  bool gs_in_smem;  // stage each sample's grad_stats row in shared memory
  int lanes, per;   // Layout (one group)
};

// Where the threads read sample b's grad_stats row: staged in shared memory when it fits.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ const acc_t* grad_stats_row(const BackwardParams<scalar_t, acc_t>& p, int64_t b) {
  const acc_t* row = p.gs + b * p.pb.C * kNumStats;
  if (!p.gs_in_smem) return row;
  acc_t* sh = reinterpret_cast<acc_t*>(dyn_smem());
  __syncthreads();  // the previous sample's readers are done
  for (int64_t i = threadIdx.x; i < p.pb.C * kNumStats; i += blockDim.x) sh[i] = row[i];
  __syncthreads();
  return sh;
}

// Softmax with C <= 32 kGroup (each lane's classes in registers), or sigmoid (lanes == 1, classes in
// chunks of kGroup).
template <typename scalar_t, typename acc_t, int kTarget, bool kSoftmax, int kGroup, int kVox>
__global__ void __launch_bounds__(kThreads, 2) backward_kernel(const BackwardParams<scalar_t, acc_t> p) {
  const Problem pb = p.pb;
  const Target<acc_t, kTarget> tg{p.t, p.ts, p.tdtype};
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int lanes = p.lanes, per = p.per;
  const int slice = lane % lanes;
  const int64_t c0 = int64_t{slice} * per;
  const int ncl = static_cast<int>(clamp_<int64_t>(pb.C - c0, 0, per));  // <= kGroup for softmax
  const int vpw = 32 / lanes;
  const int vlane = lane / lanes;
  const int64_t step = p.blocks * kWarps * kVox * vpw;
  const acc_t neg_inf = static_cast<acc_t>(-HUGE_VAL);

  for (int64_t b = blockIdx.y; b < pb.B; b += gridDim.y) {
    const acc_t* gs = grad_stats_row(p, b) + c0 * kNumStats;
    const scalar_t* xb = p.x + b * p.xs.b + c0 * p.xs.c;
    scalar_t* db = p.dx + b * p.ds.b + c0 * p.ds.c;

    for (int64_t base = (blockIdx.x * int64_t{kWarps} + warp) * kVox * vpw; base < pb.N; base += step) {
      acc_t m[kVox];
      int32_t y[kVox];
#pragma unroll
      for (int i = 0; i < kVox; ++i) {
        const int64_t v = base + i * vpw + vlane;
        m[i] = acc_t(0);
        y[i] = -1;
        if (v < pb.N) tg.voxel(pb, b, v, y[i], m[i]);
      }
      // Softmax: exactly one chunk, also on a lane without classes (it still joins the shuffles).
      for (int jc = 0; kSoftmax ? jc == 0 : jc < ncl; jc += kGroup) {
        const int nc = min_(kGroup, ncl - jc);
        acc_t x[kVox][kGroup];
        acc_t g[kVox][kGroup];
#pragma unroll
        for (int i = 0; i < kVox; ++i) {
          const int64_t v = base + i * vpw + vlane;
#pragma unroll
          for (int j = 0; j < kGroup; ++j) {
            x[i][j] = g[i][j] = acc_t(0);
            if (v < pb.N && j < nc) {
              x[i][j] = load_as<acc_t>(xb + (jc + j) * p.xs.c + v * p.xs.n);
              if constexpr (kTarget != kLabelTarget) g[i][j] = tg.at(b, c0 + jc + j, v, y[i]);
            }
          }
        }
#pragma unroll
        for (int i = 0; i < kVox; ++i) {
          const int64_t v = base + i * vpw + vlane;
          const bool ok = v < pb.N;
          auto gt = [&](int j) {
            return kTarget == kLabelTarget ? (y[i] == c0 + jc + j ? acc_t(1) : acc_t(0)) : g[i][j];
          };
          if constexpr (kSoftmax) {
            acc_t mx = nc > 0 ? x[i][0] : neg_inf;
#pragma unroll
            for (int j = 1; j < kGroup; ++j) {
              if (j < nc) mx = max_(mx, x[i][j]);
            }
            mx = lanes_max(mx, lanes);
            acc_t s = acc_t(0);
#pragma unroll
            for (int j = 0; j < kGroup; ++j) {
              if (j < nc) {
                x[i][j] = exp_nonpos(x[i][j] - mx);
                s += x[i][j];
              }
            }
            const acc_t inv = acc_t(1) / lanes_sum(s, lanes);
            acc_t pa = acc_t(0), hs = acc_t(0);
#pragma unroll
            for (int j = 0; j < kGroup; ++j) {
              if (j < nc) {
                const acc_t* gc = gs + j * kNumStats;
                x[i][j] *= inv;  // now p_j
                pa += x[i][j] * dice_dp(x[i][j], gt(j), m[i], gc[kI], gc[kP], pb.squared);
                hs += softmax_ce_h(gt(j), m[i], gc[kA], gc[kU]);
              }
            }
            pa = lanes_sum(pa, lanes);
            hs = lanes_sum(hs, lanes);
            if (ok) {
#pragma unroll
              for (int j = 0; j < kGroup; ++j) {
                if (j < nc) {
                  const acc_t* gc = gs + j * kNumStats;
                  const acc_t a = dice_dp(x[i][j], gt(j), m[i], gc[kI], gc[kP], pb.squared);
                  const acc_t h = softmax_ce_h(gt(j), m[i], gc[kA], gc[kU]);
                  store_as(db + j * p.ds.c + v * p.ds.n, softmax_grad(x[i][j], a, h, pa, hs));
                }
              }
            }
          } else if (ok) {
#pragma unroll
            for (int j = 0; j < kGroup; ++j) {
              if (j < nc) {
                const acc_t* gc = gs + (jc + j) * kNumStats;
                store_as(db + (jc + j) * p.ds.c + v * p.ds.n,
                         sigmoid_grad(sigmoid_of(x[i][j]).s, gt(j), m[i], gc[kI], gc[kP], gc[kA], gc[kU],
                                      pb.squared));
              }
            }
          }
        }
      }
    }
  }
}

// Softmax with more than 32 kGroup classes: one thread per voxel caches its row in shared memory (column
// threadIdx.x of a (C, blockDim) array, so a warp's accesses hit 32 banks) or, without kCache, recomputes
// it from the logits (re-reads that mostly hit L1/L2, one exponential per pass).
template <typename scalar_t, typename acc_t, int kTarget, bool kCache>
__global__ void __launch_bounds__(kThreads) softmax_backward_wide_kernel(const BackwardParams<scalar_t, acc_t> p) {
  const Problem pb = p.pb;
  const Target<acc_t, kTarget> tg{p.t, p.ts, p.tdtype};
  const int64_t bd = blockDim.x;
  const int64_t stride = p.blocks * bd;
  acc_t* cache = reinterpret_cast<acc_t*>(dyn_smem()) + (p.gs_in_smem ? pb.C * kNumStats : 0) + threadIdx.x;

  for (int64_t b = blockIdx.y; b < pb.B; b += gridDim.y) {
    const acc_t* gs = grad_stats_row(p, b);
    const scalar_t* xb = p.x + b * p.xs.b;
    scalar_t* db = p.dx + b * p.ds.b;
    for (int64_t v = blockIdx.x * bd + threadIdx.x; v < pb.N; v += stride) {
      int32_t y;
      acc_t m;
      tg.voxel(pb, b, v, y, m);
      const scalar_t* xv = xb + v * p.xs.n;
      auto logit = [&](int64_t c) { return load_as<acc_t>(xv + c * p.xs.c); };
      acc_t mx = logit(0);
      if constexpr (kCache) cache[0] = mx;
      for (int64_t c = 1; c < pb.C; ++c) {
        const acc_t xc = logit(c);
        if constexpr (kCache) cache[c * bd] = xc;
        mx = max_(mx, xc);
      }
      acc_t s = acc_t(0);
      for (int64_t c = 0; c < pb.C; ++c) {
        const acc_t e = exp_nonpos((kCache ? cache[c * bd] : logit(c)) - mx);
        if constexpr (kCache) cache[c * bd] = e;
        s += e;
      }
      const acc_t inv = acc_t(1) / s;
      acc_t pa = acc_t(0), hs = acc_t(0);
      for (int64_t c = 0; c < pb.C; ++c) {
        const acc_t pc = (kCache ? cache[c * bd] : exp_nonpos(logit(c) - mx)) * inv;
        if constexpr (kCache) cache[c * bd] = pc;
        const acc_t gt = tg.at(b, c, v, y);
        const acc_t* gc = gs + c * kNumStats;
        pa += pc * dice_dp(pc, gt, m, gc[kI], gc[kP], pb.squared);
        hs += softmax_ce_h(gt, m, gc[kA], gc[kU]);
      }
      for (int64_t c = 0; c < pb.C; ++c) {
        const acc_t pc = kCache ? cache[c * bd] : exp_nonpos(logit(c) - mx) * inv;
        const acc_t gt = tg.at(b, c, v, y);
        const acc_t* gc = gs + c * kNumStats;
        const acc_t a = dice_dp(pc, gt, m, gc[kI], gc[kP], pb.squared);
        const acc_t h = softmax_ce_h(gt, m, gc[kA], gc[kU]);
        store_as(db + c * p.ds.c + v * p.ds.n, softmax_grad(pc, a, h, pa, hs));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------- launch

// Blocks per launch unit (a sample, or a (sample, class group)): enough for one full wave of resident
// blocks on the current device, no more than there are voxels for.
template <typename Kernel>
cudaError_t blocks_per_unit(Kernel kernel, int threads, size_t smem, int64_t units, int64_t voxels_per_block,
                            int64_t N, int64_t* out) {
  int dev = 0, sms = 0, occ = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, threads, smem);
  if (err != cudaSuccess) return err;
  const int64_t resident = int64_t{sms > 0 ? sms : 1} * (occ > 0 ? occ : 1);
  const int64_t want = ceil_div(resident, units > 0 ? units : 1);
  const int64_t need = ceil_div(N, voxels_per_block);
  *out = want < need ? want : need;
  if (*out < 1) *out = 1;
  return cudaSuccess;
}

dim3 grid_of(int64_t x, int64_t B) {
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(min_<int64_t>(B, kMaxGridY)), 1);
}

size_t align_up(size_t n) {
  return (n + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

template <int G, int V>
struct Cfg {
  static constexpr int kGroup = G;
  static constexpr int kVox = V;
};

// Register tiles per accumulation type: kGroup classes per lane (5 kGroup sums) times kVox voxels whose
// loads are issued together. C <= 4 gets more voxels per lane to keep loads in flight.
template <typename acc_t>
struct Configs;
template <>
struct Configs<float> {
  using Small = Cfg<4, 4>;
  using General = Cfg<8, 2>;
};
template <>
struct Configs<double> {
  using Small = Cfg<4, 2>;
  using General = Cfg<8, 1>;
};

// Calls f(TypeTag<scalar_t>, TypeTag<acc_t>, integral_constant<int, kTarget>) for the runtime dtypes.
template <typename F>
cudaError_t dispatch_types(const Operand& logits, const Operand& target, bool labels, F&& f) {
  auto by_target = [&](auto st, auto at) -> cudaError_t {
    using acc_t = typename decltype(at)::type;
    constexpr DType acc_dtype = std::is_same_v<acc_t, double> ? DType::kDouble : DType::kFloat;
    if (labels) {
      switch (target.dtype) {
        case DType::kUInt8:
        case DType::kInt8:
        case DType::kInt16:
        case DType::kInt32:
        case DType::kInt64:
          return f(st, at, std::integral_constant<int, kLabelTarget>{});
        default:
          return cudaErrorInvalidValue;
      }
    }
    if (target.dtype == DType::kUInt8) return f(st, at, std::integral_constant<int, kByteMask>{});
    if (target.dtype == acc_dtype) return f(st, at, std::integral_constant<int, kAccMask>{});
    return cudaErrorInvalidValue;
  };
  switch (logits.dtype) {
    case DType::kFloat:
      return by_target(TypeTag<float>{}, TypeTag<float>{});
    case DType::kDouble:
      return by_target(TypeTag<double>{}, TypeTag<double>{});
    case DType::kHalf:
      return by_target(TypeTag<__half>{}, TypeTag<float>{});
    case DType::kBFloat16:
      return by_target(TypeTag<__nv_bfloat16>{}, TypeTag<float>{});
    default:
      return cudaErrorInvalidValue;
  }
}

bool valid_problem(const Problem& pb, int64_t activation) {
  return pb.B >= 0 && pb.N >= 0 && pb.C >= 1 && pb.C <= kMaxClasses &&
         (activation == kSoftmax || activation == kSigmoid);
}

// Plans (need != nullptr: stores the workspace size and launches nothing) or runs the forward pass.
template <typename scalar_t, typename acc_t, int kTarget, bool kSoftmax, bool kLse, typename Config>
cudaError_t run_forward(const ForwardArgs& a, void* ws, size_t ws_bytes, size_t* need, cudaStream_t stream) {
  const Problem& pb = a.pb;
  auto kernel = forward_kernel<scalar_t, acc_t, kTarget, kSoftmax, kLse, Config::kGroup, Config::kVox>;
  const Layout lay = make_layout<Config::kGroup>(pb.C);
  const size_t smem = sizeof(acc_t) * lay.group_classes * kNumStats;
  const int64_t units = min_<int64_t>(pb.B, kMaxGridY) * lay.groups;
  const int64_t voxels_per_block = int64_t{kWarps} * Config::kVox * (32 / lay.lanes);
  int64_t blocks = 1;
  cudaError_t err = blocks_per_unit(kernel, kThreads, smem, units, voxels_per_block, pb.N, &blocks);
  if (err != cudaSuccess) return err;
  const size_t partial_bytes = align_up(sizeof(acc_t) * pb.B * pb.C * kNumStats * blocks);
  const size_t lse_bytes = kLse ? align_up(sizeof(acc_t) * pb.B * pb.N) : 0;
  if (need != nullptr) {
    *need = partial_bytes + lse_bytes;
    return cudaSuccess;
  }
  if (ws == nullptr || ws_bytes < partial_bytes + lse_bytes) return cudaErrorInvalidValue;
  acc_t* partial = static_cast<acc_t*>(ws);
  acc_t* lse = kLse ? reinterpret_cast<acc_t*>(static_cast<unsigned char*>(ws) + partial_bytes) : nullptr;
  const auto* x = static_cast<const scalar_t*>(a.logits.data);
  if constexpr (kLse) {
    auto lk = lse_kernel<scalar_t, acc_t>;
    int64_t lblocks = 1;
    err = blocks_per_unit(lk, kThreads, 0, min_<int64_t>(pb.B, kMaxGridY), kThreads, pb.N, &lblocks);
    if (err != cudaSuccess) return err;
    lk<<<grid_of(lblocks, pb.B), kThreads, 0, stream>>>(x, a.logits.strides, pb.B, pb.C, pb.N, lblocks, lse);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  const ForwardParams<scalar_t, acc_t> params{
      pb, x, a.logits.strides, a.target.data, a.target.strides, a.target.dtype, lse, partial, blocks, lay};
  kernel<<<grid_of(blocks * lay.groups, pb.B), kThreads, smem, stream>>>(params);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const int64_t rows = pb.B * pb.C * kNumStats;
  finalize_kernel<acc_t><<<static_cast<unsigned>(ceil_div(rows, kWarps)), kThreads, 0, stream>>>(
      partial, static_cast<acc_t*>(a.stats), rows, blocks);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t, int kTarget, bool kSoftmax>
cudaError_t forward_by_classes(const ForwardArgs& a, void* ws, size_t ws_bytes, size_t* need,
                               cudaStream_t stream) {
  using Small = typename Configs<acc_t>::Small;
  using General = typename Configs<acc_t>::General;
  if (a.pb.C <= Small::kGroup) {
    return run_forward<scalar_t, acc_t, kTarget, kSoftmax, false, Small>(a, ws, ws_bytes, need, stream);
  }
  if constexpr (kSoftmax) {
    if (a.pb.C > 32 * General::kGroup) {
      return run_forward<scalar_t, acc_t, kTarget, true, true, General>(a, ws, ws_bytes, need, stream);
    }
  }
  return run_forward<scalar_t, acc_t, kTarget, kSoftmax, false, General>(a, ws, ws_bytes, need, stream);
}

cudaError_t forward_impl(const ForwardArgs& a, void* ws, size_t ws_bytes, size_t* need, cudaStream_t stream) {
  if (!valid_problem(a.pb, a.activation)) return cudaErrorInvalidValue;
  if (a.pb.B == 0 || a.pb.N == 0) {
    if (need != nullptr) *need = 0;
    return cudaSuccess;  // nothing to launch: the caller's stats are zeros
  }
  return dispatch_types(a.logits, a.target, a.labels, [&](auto st, auto at, auto tk) -> cudaError_t {
    using scalar_t = typename decltype(st)::type;
    using acc_t = typename decltype(at)::type;
    constexpr int kTarget = decltype(tk)::value;
    if (a.activation == kSoftmax) {
      return forward_by_classes<scalar_t, acc_t, kTarget, true>(a, ws, ws_bytes, need, stream);
    }
    return forward_by_classes<scalar_t, acc_t, kTarget, false>(a, ws, ws_bytes, need, stream);
  });
}

template <typename scalar_t, typename acc_t>
BackwardParams<scalar_t, acc_t> backward_params(const BackwardArgs& a, bool gs_in_smem, int lanes, int per) {
  return BackwardParams<scalar_t, acc_t>{a.pb,
                                         static_cast<const acc_t*>(a.grad_stats),
                                         static_cast<const scalar_t*>(a.logits.data),
                                         a.logits.strides,
                                         a.target.data,
                                         a.target.strides,
                                         a.target.dtype,
                                         static_cast<scalar_t*>(a.grad),
                                         a.grad_strides,
                                         1,
                                         gs_in_smem,
                                         lanes,
                                         per};
}

template <typename scalar_t, typename acc_t, int kTarget, bool kSoftmax, typename Config>
cudaError_t run_backward(const BackwardArgs& a, cudaStream_t stream) {
  const Problem& pb = a.pb;
  const size_t gs_bytes = sizeof(acc_t) * pb.C * kNumStats;
  const bool gs_in_smem = gs_bytes <= kGradStatsSmemMax;
  const size_t smem = gs_in_smem ? gs_bytes : 0;
  // Sigmoid needs no merge across classes: one lane per voxel walks its classes in chunks.
  const Layout lay = kSoftmax ? make_layout<Config::kGroup>(pb.C) : Layout{1, static_cast<int>(pb.C), pb.C, 1};
  auto kernel = backward_kernel<scalar_t, acc_t, kTarget, kSoftmax, Config::kGroup, Config::kVox>;
  auto params = backward_params<scalar_t, acc_t>(a, gs_in_smem, lay.lanes, lay.per);
  const int64_t voxels_per_block = int64_t{kWarps} * Config::kVox * (32 / lay.lanes);
  cudaError_t err = blocks_per_unit(kernel, kThreads, smem, min_<int64_t>(pb.B, kMaxGridY), voxels_per_block,
                                    pb.N, &params.blocks);
  if (err != cudaSuccess) return err;
  kernel<<<grid_of(params.blocks, pb.B), kThreads, smem, stream>>>(params);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t, int kTarget>
cudaError_t run_backward_wide(const BackwardArgs& a, cudaStream_t stream) {
  const Problem& pb = a.pb;
  const size_t gs_bytes = sizeof(acc_t) * pb.C * kNumStats;
  const bool gs_in_smem = gs_bytes <= kGradStatsSmemMax;
  const size_t row_bytes = sizeof(acc_t) * pb.C;
  const size_t budget = kSmemBudget - (gs_in_smem ? gs_bytes : 0);
  int threads = kThreads;
  while (threads > 32 && threads * row_bytes > budget) threads /= 2;
  const bool cache = threads * row_bytes <= budget;
  if (!cache) threads = kThreads;
  const size_t smem = (gs_in_smem ? gs_bytes : 0) + (cache ? threads * row_bytes : 0);
  auto params = backward_params<scalar_t, acc_t>(a, gs_in_smem, 1, static_cast<int>(pb.C));
  auto launch = [&](auto kernel) -> cudaError_t {
    cudaError_t err = blocks_per_unit(kernel, threads, smem, min_<int64_t>(pb.B, kMaxGridY), threads, pb.N,
                                      &params.blocks);
    if (err != cudaSuccess) return err;
    kernel<<<grid_of(params.blocks, pb.B), threads, smem, stream>>>(params);
    return cudaGetLastError();
  };
  if (cache) return launch(softmax_backward_wide_kernel<scalar_t, acc_t, kTarget, true>);
  return launch(softmax_backward_wide_kernel<scalar_t, acc_t, kTarget, false>);
}

template <typename scalar_t, typename acc_t, int kTarget, bool kSoftmax>
cudaError_t backward_by_classes(const BackwardArgs& a, cudaStream_t stream) {
  using Small = typename Configs<acc_t>::Small;
  using General = typename Configs<acc_t>::General;
  if (a.pb.C <= Small::kGroup) return run_backward<scalar_t, acc_t, kTarget, kSoftmax, Small>(a, stream);
  if constexpr (kSoftmax) {
    if (a.pb.C > 32 * General::kGroup) return run_backward_wide<scalar_t, acc_t, kTarget>(a, stream);
  }
  return run_backward<scalar_t, acc_t, kTarget, kSoftmax, General>(a, stream);
}

}  // namespace

cudaError_t forward_workspace_bytes(const ForwardArgs& args, size_t* bytes) {
  *bytes = 0;
  return forward_impl(args, nullptr, 0, bytes, nullptr);
}

cudaError_t forward(const ForwardArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return forward_impl(args, workspace, workspace_bytes, nullptr, stream);
}

cudaError_t backward(const BackwardArgs& a, cudaStream_t stream) {
  if (!valid_problem(a.pb, a.activation)) return cudaErrorInvalidValue;
  if (a.pb.B == 0 || a.pb.N == 0) return cudaSuccess;
  return dispatch_types(a.logits, a.target, a.labels, [&](auto st, auto at, auto tk) -> cudaError_t {
    using scalar_t = typename decltype(st)::type;
    using acc_t = typename decltype(at)::type;
    constexpr int kTarget = decltype(tk)::value;
    if (a.activation == kSoftmax) return backward_by_classes<scalar_t, acc_t, kTarget, true>(a, stream);
    return backward_by_classes<scalar_t, acc_t, kTarget, false>(a, stream);
  });
}

}  // namespace cuda
}  // namespace dice_ce
}  // namespace fastseg
