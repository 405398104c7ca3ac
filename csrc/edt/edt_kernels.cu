// CUDA kernels of the exact Euclidean distance transform: the separable passes of Meijster, Roerdink &
// Hesselink (2000) and Felzenszwalb & Huttenlocher, "Distance Transforms of Sampled Functions" (2012). The
// per-line maths (lower envelope of parabolas, offsets carried between passes so that the last pass evaluates
// scipy's float64 expression exactly, runs cut at f = 0 voxels) is edt.h, shared with the CPU kernel, so both
// devices give bit-identical distances. Torch-free: raw pointers and a stream from edt_cuda.h.
//
// Passes, each one kernel launch:
//   flags     any zero voxel per sample (samples without one take scipy's all-ones convention at the end);
//   axis 0    one thread per (sample, column) sweeps the column forwards and back; neighbouring threads
//             own neighbouring columns, so every row access is coalesced;
//   axis 1    (3D) one thread per line along axis 1; neighbouring threads own neighbouring lines (stride n2
//             apart), coalesced again;
//   last axis one thread per contiguous line. Each thread walks its own line, so a warp touches 32 lines per
//             step: uncoalesced, carried by L1/L2 reuse of the lines' cache sectors.
// Each thread keeps its F&H stack in global scratch, entry k of thread t at k * lines + t so that threads at
// the same depth coalesce; lines are launched in batches whose stacks fit kStackBudget. Offsets are packed in
// uint32 words stored in the float32 output itself (overwritten in place by the last pass, through uint32
// accesses only), or uint64 words in the workspace when an axis reaches 65535 voxels.
//
// One thread per line leaves parallelism on the table for small volumes and the last pass uncoalesced; the
// Parallel Banding Algorithm (Cao, Tang, Yang & Yan, "Parallel banding algorithm to compute exact distance
// transform with the GPU", I3D 2010) is the candidate for a faster kernel.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "edt.h"
#include "edt_cuda.h"

namespace fastseg {
namespace edt {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride kernels
constexpr size_t kAlign = 256;
constexpr size_t kStackBudget = size_t(512) << 20;

size_t align_up(size_t x) {
  return (x + kAlign - 1) / kAlign * kAlign;
}

int grid_for(int64_t n, bool stride_loop) {
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (stride_loop) blocks = std::min(blocks, kMaxBlocks);
  return static_cast<int>(std::max<int64_t>(blocks, 1));
}

// Workspace layout, identical in workspace_bytes() and edt().
struct Layout {
  bool wide = false;  // uint64 words in the workspace
  size_t flags = 0, words = 0, x = 0, h = 0, w = 0, total = 0;
  int64_t line = 0;   // longest envelope line
  int64_t batch = 0;  // lines per launch
};

Layout layout_of(const Geometry& g) {
  Layout L;
  L.wide = !fits_uint32_words(g);
  const size_t word_size = L.wide ? sizeof(uint64_t) : sizeof(uint32_t);
  int64_t most_lines = 0;
  if (g.ndim >= 2) {
    const int64_t last = g.dims[g.ndim - 1];
    L.line = last;
    most_lines = g.B * (g.N / last);
    if (g.ndim == 3) {
      L.line = std::max(L.line, g.dims[1]);
      most_lines = std::max(most_lines, g.B * g.dims[0] * g.dims[2]);
    }
  }
  size_t off = 0;
  L.flags = off;
  off += align_up(static_cast<size_t>(g.B) * sizeof(int));
  L.words = off;
  if (L.wide) off += align_up(static_cast<size_t>(g.B * g.N) * word_size);
  if (L.line > 0) {
    const size_t entry = sizeof(int32_t) + sizeof(double) + word_size;
    L.batch = std::max<int64_t>(1, std::min<int64_t>(most_lines, kStackBudget / (L.line * entry)));
    const size_t n = static_cast<size_t>(L.batch * L.line);
    L.x = off;
    off += align_up(n * sizeof(int32_t));
    L.h = off;
    off += align_up(n * sizeof(double));
    L.w = off;
    off += align_up(n * word_size);
  }
  L.total = off;
  return L;
}

__global__ void has_zero_kernel(const uint8_t* __restrict__ mask, int64_t total, int64_t N, int* flags) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    if (mask[i] == 0) {
      const int64_t b = i / N;
      if (flags[b] == 0) flags[b] = 1;
    }
  }
}

template <typename Word>
__global__ void scan_axis0_kernel(const uint8_t* __restrict__ mask, Word* __restrict__ words,
                                  const int* __restrict__ flags, int64_t B, int64_t n0, int64_t R, int64_t N) {
  constexpr Word kInf = Packing<Word>::kInf;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * R; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = t / R, j = t % R;
    if (!flags[b]) continue;
    const uint8_t* m = mask + b * N + j;
    Word* wd = words + b * N + j;
    Word prev = m[0] ? kInf : Word(0);
    wd[0] = prev;
    for (int64_t i = 1; i < n0; ++i) {
      const Word a = prev + 1;
      prev = m[i * R] ? (a < kInf ? a : kInf) : Word(0);
      wd[i * R] = prev;
    }
    Word next = prev;
    for (int64_t i = n0 - 2; i >= 0; --i) {
      const Word a = next + 1;
      Word cur = wd[i * R];
      cur = a < cur ? a : cur;
      wd[i * R] = cur;
      next = cur;
    }
  }
}

template <typename Word>
__global__ void final_1d_kernel(Word* words, float* out, const int* __restrict__ flags,
                                const double* __restrict__ spacing, int64_t B, int64_t N) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * N; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / N;
    if (!flags[b]) continue;
    store_distance(words, out, i, distance_from_sq(carried_sq(words[i], 1, spacing + b)));
  }
}

template <typename Word>
struct Scratch {
  int32_t* x;
  double* h;
  Word* w;
};

// Axis-1 pass of 3D problems: offsets (o0) -> (o0, o1). Line l = ((b, i0), i2), stride n2.
template <typename Word>
__global__ void axis1_kernel(Word* words, const int* __restrict__ flags, const double* __restrict__ spacing,
                             Geometry g, int64_t line0, int64_t count, Scratch<Word> sc) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= count) return;
  const int64_t l = line0 + t;
  const int64_t n0 = g.dims[0], n1 = g.dims[1], n2 = g.dims[2];
  const int64_t b = l / (n0 * n2), rem = l % (n0 * n2);
  if (!flags[b]) return;
  Word* line = words + b * g.N + (rem / n2) * n1 * n2 + rem % n2;
  const double* s = spacing + b * 3;
  const Stack<Word> st{sc.x + t, sc.h + t, sc.w + t, count};
  envelope_line<Word>(
      n1, s[1] * s[1], [=](int64_t i) { return line[i * n2]; },
      [=](Word x) { return carried_sq(x, 1, s); }, st,
      [=](int64_t p, int64_t, Word wq, int64_t d) {
        line[p * n2] = low_offset(wq) | (static_cast<Word>(d < 0 ? -d : d) << Packing<Word>::kShift);
      },
      [](int64_t) {});
}

// Last pass, along the innermost axis: contiguous line l of n = dims[ndim - 1] voxels.
template <typename Word>
__global__ void last_axis_kernel(Word* words, float* out, const int* __restrict__ flags,
                                 const double* __restrict__ spacing, Geometry g, int64_t line0, int64_t count,
                                 Scratch<Word> sc) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= count) return;
  const int carried = g.ndim - 1;
  const int64_t n = g.dims[carried];
  const int64_t base = (line0 + t) * n;
  const int64_t b = base / g.N;
  if (!flags[b]) return;
  const double* s = spacing + b * g.ndim;
  const double sl = s[carried];
  Word* row = words + base;
  float* orow = out + base;
  const Stack<Word> st{sc.x + t, sc.h + t, sc.w + t, count};
  envelope_line<Word>(
      n, sl * sl, [=](int64_t i) { return row[i]; }, [=](Word x) { return carried_sq(x, carried, s); }, st,
      [=](int64_t p, int64_t, Word wq, int64_t d) {
        const double v = add_rn(carried_sq(wq, carried, s), axis_term(static_cast<double>(d < 0 ? -d : d), sl));
        store_distance(row, orow, p, distance_from_sq(v));
      },
      [=](int64_t p) {
        // A uint32 word 0 already reads as 0.0f.
        if constexpr (sizeof(Word) != sizeof(float)) orow[p] = 0.0f;
      });
}

__global__ void all_ones_kernel(float* out, const int* __restrict__ flags, const double* __restrict__ spacing,
                                Geometry g) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < g.B * g.N;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / g.N;
    if (flags[b]) continue;
    int64_t idx[kMaxDims], rest = i % g.N;
    for (int k = g.ndim - 1; k >= 0; --k) {
      idx[k] = rest % g.dims[k];
      rest /= g.dims[k];
    }
    out[i] = all_ones_distance(g.ndim, idx, spacing + b * g.ndim);
  }
}

#define FASTSEG_EDT_LAUNCHED()               \
  do {                                       \
    const cudaError_t err_ = cudaGetLastError(); \
    if (err_ != cudaSuccess) return err_;    \
  } while (0)

template <typename Word>
cudaError_t run(const Args& a, Word* words, const int* flags, const Layout& L, char* ws, cudaStream_t stream) {
  const Geometry& g = a.g;
  const int64_t n0 = g.dims[0], R = g.N / n0;
  scan_axis0_kernel<Word><<<grid_for(g.B * R, true), kThreads, 0, stream>>>(a.mask, words, flags, g.B, n0, R, g.N);
  FASTSEG_EDT_LAUNCHED();
  if (g.ndim == 1) {
    final_1d_kernel<Word><<<grid_for(g.B * g.N, true), kThreads, 0, stream>>>(words, a.out, flags, a.spacing, g.B,
                                                                               g.N);
    FASTSEG_EDT_LAUNCHED();
    return cudaSuccess;
  }
  const Scratch<Word> sc{reinterpret_cast<int32_t*>(ws + L.x), reinterpret_cast<double*>(ws + L.h),
                         reinterpret_cast<Word*>(ws + L.w)};
  if (g.ndim == 3) {
    const int64_t lines = g.B * g.dims[0] * g.dims[2];
    for (int64_t l0 = 0; l0 < lines; l0 += L.batch) {
      const int64_t count = std::min(L.batch, lines - l0);
      axis1_kernel<Word><<<grid_for(count, false), kThreads, 0, stream>>>(words, flags, a.spacing, g, l0, count, sc);
      FASTSEG_EDT_LAUNCHED();
    }
  }
  const int64_t lines = g.B * (g.N / g.dims[g.ndim - 1]);
  for (int64_t l0 = 0; l0 < lines; l0 += L.batch) {
    const int64_t count = std::min(L.batch, lines - l0);
    last_axis_kernel<Word>
        <<<grid_for(count, false), kThreads, 0, stream>>>(words, a.out, flags, a.spacing, g, l0, count, sc);
    FASTSEG_EDT_LAUNCHED();
  }
  return cudaSuccess;
}

}  // namespace

size_t workspace_bytes(const Geometry& g) {
  if (g.B == 0 || g.N == 0) return 0;
  return layout_of(g).total;
}

cudaError_t edt(const Args& a, void* workspace, size_t bytes, cudaStream_t stream) {
  const Geometry& g = a.g;
  if (g.B == 0 || g.N == 0) return cudaSuccess;
  const Layout L = layout_of(g);
  if (workspace == nullptr || bytes < L.total) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  int* flags = reinterpret_cast<int*>(ws + L.flags);
  cudaError_t err = cudaMemsetAsync(flags, 0, static_cast<size_t>(g.B) * sizeof(int), stream);
  if (err != cudaSuccess) return err;
  has_zero_kernel<<<grid_for(g.B * g.N, true), kThreads, 0, stream>>>(a.mask, g.B * g.N, g.N, flags);
  FASTSEG_EDT_LAUNCHED();
  err = L.wide ? run<uint64_t>(a, reinterpret_cast<uint64_t*>(ws + L.words), flags, L, ws, stream)
               : run<uint32_t>(a, reinterpret_cast<uint32_t*>(a.out), flags, L, ws, stream);
  if (err != cudaSuccess) return err;
  all_ones_kernel<<<grid_for(g.B * g.N, true), kThreads, 0, stream>>>(a.out, flags, a.spacing, g);
  FASTSEG_EDT_LAUNCHED();
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace edt
}  // namespace fastseg
