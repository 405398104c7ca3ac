// CPU kernels of the fused Dice + cross-entropy statistics (maths in dice_ce.h).
//
// The voxels of each sample are cut into tiles of T voxels. A tile's logits are gathered once into a
// (C, T) float buffer whatever the input layout (channels-first or channels-last, any dtype), taking each
// voxel's class max on the way; the sweeps over the classes then run over blocks of 16 voxels with the
// per-voxel sums in registers, and the backward writes a channels-first gradient from its last sweep
// (through streaming stores when it is large). Each thread's run of tiles (loads, label decoding, maths,
// stores) is one function compiled per ISA level (run_at_best_isa). Threads take chunks of tiles from a
// shared counter; the forward keeps float64 sums per chunk and adds them in chunk order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "dice_ce.h"
#include "dice_ce_checks.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../common/cpu_convert.h"
#include "../common/cpu_dispatch.h"
#include "../common/cpu_stream.h"

namespace fastseg {
namespace dice_ce {
namespace {

constexpr int64_t kNoBadLabel = std::numeric_limits<int64_t>::min();

// Runs body(begin, end) compiled for this CPU's best ISA level; float64 logits (gradcheck, references) keep
// the baseline build, as three ISA copies of their loops would only lengthen the compile.
template <typename T, typename Body>
void run_tiles(const Body& body, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<T, double>) {
    body(begin, end);
  } else {
    run_at_best_isa(body, begin, end);
  }
}

// Voxels per register block (one AVX-512 register of floats). Tile buffers are padded to whole blocks with
// neutral values (logits 0, labels -1, mask 0), so the block loops need no tail.
constexpr int64_t kBlock = 16;

int64_t padded(int64_t n) {
  return (n + kBlock - 1) / kBlock * kBlock;
}

// Fills entries [n, padded(n)) of `rows` rows of leading dimension ld with v.
template <typename T>
void pad_rows(T* rows, int64_t count, int64_t ld, int64_t n, T v) {
  for (int64_t r = 0; r < count; ++r) std::fill(rows + r * ld + n, rows + r * ld + padded(n), v);
}

// One tile: logits x (C, T), exp buffer e (C, T), per-voxel class y and mask m, or a mask target g (C, T);
// three rows of T: the class max (softmax, from the load on), and two per-voxel scratch rows.
template <typename T>
struct Tile {
  int64_t C, n, ld;  // classes, voxels in this tile, leading dimension (= T)
  T* x;
  T* e;
  const T* g;
  const int32_t* y;
  const T* m;
  T* mx;
  T* s1;
  T* s2;
};

template <typename T, bool kLabels>
FASTSEG_TILE_INLINE T target_at(const Tile<T>& tl, int64_t c, int64_t t) {
  if constexpr (kLabels) {
    return static_cast<T>(tl.y[t] == static_cast<int32_t>(c));  // an int32 compare: one instruction a vector
  } else {
    return tl.g[c * tl.ld + t];
  }
}

// Calls f(std::bool_constant<labels>{}, std::bool_constant<squared>{}): both are compile-time constants in the
// tile loops.
template <typename F>
FASTSEG_TILE_INLINE void with_flags(bool labels, bool squared, const F& f) {
  auto with_squared = [&](auto labels_tag) FASTSEG_TILE_INLINE_LAMBDA {
    if (squared) {
      f(labels_tag, std::true_type{});
    } else {
      f(labels_tag, std::false_type{});
    }
  };
  if (labels) {
    with_squared(std::true_type{});
  } else {
    with_squared(std::false_type{});
  }
}

// Adds sum_t term(t) over t < n, a whole number of blocks (tiles are padded), to the lane-wise sums
// lanes[k * kBlock + j] of the five statistics k. Lane-wise float sums over the tile, vectorisable without
// -fassociative-math (an `omp simd reduction` here defeats gcc's vectoriser), then added to the float64 lanes,
// which are reduced across lanes once a chunk, not once a tile (that reduction is scalar).
template <typename T, typename F>
FASTSEG_TILE_INLINE void add_terms(int64_t n, const F& term, double* lanes) {
  T acc[kNumStats][kBlock] = {};
  for (int64_t t = 0; t < n; t += kBlock) {
    for (int64_t j = 0; j < kBlock; ++j) {
      const Terms<T> d = term(t + j);
      acc[kI][j] += d.I, acc[kP][j] += d.P, acc[kG][j] += d.G, acc[kA][j] += d.A, acc[kU][j] += d.U;
    }
  }
  for (int k = 0; k < kNumStats; ++k)
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) lanes[k * kBlock + j] += static_cast<double>(acc[k][j]);
}

// Two sweeps over the classes: e = exp(x - max) with the softmax sum, then the five sums. The mask m is 0 or 1
// and a label target is 0 wherever m is, so m is folded into p and -log p once per voxel (bit-identical to
// multiplying every term by m).
template <typename T, bool kLabels, bool kSquared>
FASTSEG_TILE_INLINE void softmax_forward(const Tile<T>& tl, double* lanes) {
  const int64_t n = tl.n, ld = tl.ld;
  T* pm = tl.s1;  // m / softmax sum
  T* lse = tl.s2;
  for (int64_t t0 = 0; t0 < n; t0 += kBlock) {  // the block's softmax sums stay in registers
    const T* mx = tl.mx + t0;
    T sum[kBlock] = {};
    for (int64_t c = 0; c < tl.C; ++c) {
      const T* xc = tl.x + c * ld + t0;
      T* ec = tl.e + c * ld + t0;
#pragma omp simd
      for (int64_t j = 0; j < kBlock; ++j) {
        ec[j] = exp_nonpos(xc[j] - mx[j]);
        sum[j] += ec[j];
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) {
      lse[t0 + j] = mx[j] + log_ge1(sum[j]);
      pm[t0 + j] = tl.m[t0 + j] / sum[j];
    }
  }
  for (int64_t c = 0; c < tl.C; ++c) {
    const T* xc = tl.x + c * ld;
    const T* ec = tl.e + c * ld;
    add_terms<T>(
        padded(n),
        [&](int64_t t) {
          return softmax_terms(ec[t] * pm[t], (lse[t] - xc[t]) * tl.m[t], target_at<T, kLabels>(tl, c, t), T(1),
                               kSquared);
        },
        lanes + c * kNumStats * kBlock);
  }
}

template <typename T, bool kLabels, bool kSquared>
FASTSEG_TILE_INLINE void sigmoid_forward(const Tile<T>& tl, double* lanes) {
  for (int64_t c = 0; c < tl.C; ++c) {
    const T* xc = tl.x + c * tl.ld;
    add_terms<T>(
        padded(tl.n),
        [&](int64_t t) {
          return sigmoid_terms(sigmoid_of(xc[t]), target_at<T, kLabels>(tl, c, t), tl.m[t], kSquared);
        },
        lanes + c * kNumStats * kBlock);
  }
}

// Writes d loss / d x of the tile to row c of dst at dst + c * dst_ld (the gradient itself, or a staging
// buffer), whole blocks: dst must have room for padded(n) values a row. Per block of kBlock voxels, two
// sweeps over the classes with the per-voxel sums held in registers: the first computes e = exp(x - max)
// and, alongside the softmax sum, the sums needed for sum_c p_c a_c = m (S1 / s + 2 S2 / s^2) with
// S1 = sum_c e_c (gI_c g_c + [!squared] gP_c), S2 = [squared] sum_c e_c^2 gP_c, and
// H / m = sum_c gA_c g_c + gU_c; the second writes the gradient.
template <typename T, bool kLabels, bool kSquared, typename dst_t>
FASTSEG_TILE_INLINE void softmax_backward(const Tile<T>& tl, const T* gs, dst_t* dst, int64_t dst_ld) {
  const int64_t ld = tl.ld;
  for (int64_t t0 = 0; t0 < tl.n; t0 += kBlock) {
    const T* mx = tl.mx + t0;
    const T* m = tl.m + t0;
    T sum[kBlock] = {}, S1[kBlock] = {}, S2[kBlock] = {}, H[kBlock] = {};
    for (int64_t c = 0; c < tl.C; ++c) {
      const T* xc = tl.x + c * ld + t0;
      T* ec = tl.e + c * ld + t0;
      const T* g = gs + c * kNumStats;
      const T gP1 = kSquared ? T(0) : g[kP];
#pragma omp simd
      for (int64_t j = 0; j < kBlock; ++j) {
        const T e = exp_nonpos(xc[j] - mx[j]);
        const T gt = target_at<T, kLabels>(tl, c, t0 + j);
        ec[j] = e;
        sum[j] += e;
        S1[j] += e * (g[kI] * gt + gP1);
        if constexpr (kSquared) S2[j] += e * e * g[kP];
        H[j] += g[kA] * gt + g[kU];
      }
    }
    T inv[kBlock], S[kBlock];
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) {
      inv[j] = T(1) / sum[j];
      S[j] = m[j] * (S1[j] * inv[j] + T(2) * S2[j] * inv[j] * inv[j]);  // sum_c p_c a_c
      H[j] *= m[j];
    }
    for (int64_t c = 0; c < tl.C; ++c) {
      const T* ec = tl.e + c * ld + t0;
      const T* g = gs + c * kNumStats;
      dst_t* dx = dst + c * dst_ld + t0;
#pragma omp simd
      for (int64_t j = 0; j < kBlock; ++j) {
        const T p = ec[j] * inv[j];
        const T gt = target_at<T, kLabels>(tl, c, t0 + j);
        const T a = dice_dp(p, gt, m[j], g[kI], g[kP], kSquared);
        const T h = softmax_ce_h(gt, m[j], g[kA], g[kU]);
        dx[j] = convert_to<dst_t>(softmax_grad(p, a, h, S[j], H[j]));
      }
    }
  }
}

template <typename T, bool kLabels, bool kSquared, typename dst_t>
FASTSEG_TILE_INLINE void sigmoid_backward(const Tile<T>& tl, const T* gs, dst_t* dst, int64_t dst_ld) {
  const int64_t n = tl.n, ld = tl.ld;
  for (int64_t c = 0; c < tl.C; ++c) {
    const T* xc = tl.x + c * ld;
    dst_t* dx = dst + c * dst_ld;
    const T* g = gs + c * kNumStats;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) {
      dx[t] = convert_to<dst_t>(sigmoid_grad(sigmoid_of(xc[t]).s, target_at<T, kLabels>(tl, c, t), tl.m[t], g[kI],
                                             g[kP], g[kA], g[kU], kSquared));
    }
  }
}

// Copies a (C, n) block of a strided (B, C, N) tensor into a (C, ld) buffer; with kMax, also the class max of
// each voxel into mx (over whole blocks with the running max in registers, then the tail).
template <bool kMax, typename src_t, typename dst_t>
FASTSEG_TILE_INLINE void gather(const src_t* base, Strides s, int64_t C, int64_t n, int64_t ld, dst_t* out,
                                dst_t* mx) {
  if (s.n == 1 && !kMax) {
    for (int64_t c = 0; c < C; ++c) {
      const src_t* src = base + c * s.c;
      dst_t* o = out + c * ld;
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) o[t] = static_cast<dst_t>(src[t]);
    }
  } else if (s.n == 1) {
    const int64_t whole = n / kBlock * kBlock;
    for (int64_t t0 = 0; t0 < whole; t0 += kBlock) {
      dst_t m[kBlock];
#pragma omp simd
      for (int64_t j = 0; j < kBlock; ++j) out[t0 + j] = m[j] = static_cast<dst_t>(base[t0 + j]);
      for (int64_t c = 1; c < C; ++c) {
        const src_t* src = base + c * s.c + t0;
        dst_t* o = out + c * ld + t0;
#pragma omp simd
        for (int64_t j = 0; j < kBlock; ++j) {
          o[j] = static_cast<dst_t>(src[j]);
          m[j] = max_(m[j], o[j]);
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < kBlock; ++j) mx[t0 + j] = m[j];
    }
    for (int64_t t = whole; t < n; ++t) {
      mx[t] = out[t] = static_cast<dst_t>(base[t]);
      for (int64_t c = 1; c < C; ++c) mx[t] = max_(mx[t], out[c * ld + t] = static_cast<dst_t>(base[c * s.c + t]));
    }
  } else {
    for (int64_t t = 0; t < n; ++t) {
      const src_t* src = base + t * s.n;
      dst_t m = static_cast<dst_t>(src[0]);
      for (int64_t c = 0; c < C; ++c) {
        const dst_t v = static_cast<dst_t>(src[c * s.c]);
        out[c * ld + t] = v;
        m = max_(m, v);
      }
      if (kMax) mx[t] = m;
    }
  }
}

template <typename src_t, typename dst_t>
FASTSEG_TILE_INLINE void scatter(const src_t* in, int64_t C, int64_t n, int64_t ld, dst_t* base, Strides s) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < C; ++c) base[c * s.c + t * s.n] = convert_to<dst_t>(in[c * ld + t]);
}

int64_t tile_size(int64_t C) {
  // Keep a tile's few (C, T) float buffers inside L1/L2 while T stays a multiple of the vector width.
  const int64_t t = 4096 / std::max<int64_t>(C, 1);
  return std::clamp<int64_t>(t / 16 * 16, 16, 256);
}

// Loading one tile's target (n voxels from `first`, whose element type the function knows): labels give
// y (class or -1) and m (1, or 0 where ignored); a mask gives g (C, ld) and m = 1; both padded to whole
// blocks with y = -1, g = 0, m = 0. Returns the first bad
// label seen, or kNoBadLabel. Type-erased so that the ISA-compiled tile loops are instantiated per logits
// type only, not per logits x target type.
template <typename T>
using TargetLoad = int64_t (*)(const void* first, Strides s, const Problem& pb, int64_t n, int64_t ld, int32_t* y,
                               T* m, T* g);

// Branch-free decode (vectorises); the rare bad label is located by a second, scalar look.
template <typename tgt_t, typename T>
int64_t load_labels(const void* first, Strides s, const Problem& pb, int64_t n, int64_t, int32_t* y, T* m, T*) {
  const tgt_t* lab = static_cast<const tgt_t*>(first);
  int32_t any_bad = 0;
  run_tiles<T>(
      [&](int64_t, int64_t) FASTSEG_TILE_INLINE_LAMBDA {
        // Locals, not the captures, in the loop: stores through y and m could otherwise alias them.
        const int64_t C = pb.C, ign = pb.ignore_index, stride = s.n, count = n;
        const bool has_ign = pb.has_ignore;
        int32_t* __restrict yd = y;
        T* __restrict md = m;
        int32_t flag = 0;
        for (int64_t t = 0; t < count; ++t) {
          const int64_t raw = static_cast<int64_t>(lab[t * stride]);
          const bool ignored = has_ign && raw == ign;
          const bool in_range = raw >= 0 && raw < C;
          flag |= static_cast<int32_t>(!ignored && !in_range);
          const int32_t yt = (!ignored && in_range) ? static_cast<int32_t>(raw) : -1;
          yd[t] = yt;
          md[t] = yt >= 0 ? T(1) : T(0);
        }
        any_bad = flag;
      },
      0, n);
  pad_rows(y, 1, 0, n, int32_t{-1});
  pad_rows(m, 1, 0, n, T(0));
  if (any_bad) {
    for (int64_t t = 0; t < n; ++t) {
      bool is_bad = false;
      const int64_t raw = static_cast<int64_t>(lab[t * s.n]);
      decode_label(raw, pb, is_bad);
      if (is_bad) return raw;
    }
  }
  return kNoBadLabel;
}

template <typename tgt_t, typename T>
int64_t load_mask(const void* first, Strides s, const Problem& pb, int64_t n, int64_t ld, int32_t*, T* m, T* g) {
  run_tiles<T>(
      [&](int64_t, int64_t) FASTSEG_TILE_INLINE_LAMBDA {
        gather<false>(static_cast<const tgt_t*>(first), s, pb.C, n, ld, g, static_cast<T*>(nullptr));
        T* __restrict md = m;
        for (int64_t t = 0, count = n; t < count; ++t) md[t] = T(1);
      },
      0, n);
  pad_rows(g, pb.C, ld, n, T(0));
  pad_rows(m, 1, 0, n, T(0));
  return kNoBadLabel;
}

// The loader of a target tensor's dtype: integer labels when (B, N), a uint8 or float mask when (B, C, N).
template <typename T>
TargetLoad<T> target_loader(const at::Tensor& target) {
  if (!target_is_labels(target)) {
    return target.scalar_type() == at::kByte ? &load_mask<uint8_t, T> : &load_mask<T, T>;
  }
  TargetLoad<T> fn = nullptr;
  AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "fastseg_dice_ce_labels", [&] { fn = &load_labels<scalar_t, T>; });
  return fn;
}

// Per-thread buffers and the loading of one tile; tiles never straddle two samples.
template <typename scalar_t, typename T, bool kSoftmax>
struct TileLoader {
  const Problem& pb;
  const scalar_t* logits;
  Strides ls;
  const char* target;
  Strides ts;
  int64_t target_size;
  TargetLoad<T> load_target;
  int64_t ld, tiles_per_sample;
  std::vector<T> buf;
  std::vector<int32_t> y;
  int64_t bad = kNoBadLabel;

  TileLoader(const Problem& pb_, const at::Tensor& l, const at::Tensor& tg, TargetLoad<T> load_target_)
      : pb(pb_),
        logits(l.const_data_ptr<scalar_t>()),
        ls(strides_of(l)),
        target(static_cast<const char*>(tg.const_data_ptr())),
        ts(strides_of(tg)),
        target_size(tg.element_size()),
        load_target(load_target_) {
    ld = tile_size(pb.C);
    tiles_per_sample = (pb.N + ld - 1) / ld;
    buf.assign(3 * pb.C * ld + 4 * ld, T(0));
    y.assign(ld, -1);
  }

  int64_t first_voxel(int64_t tile) const { return (tile % tiles_per_sample) * ld; }

  const char* target_at_voxel(int64_t b, int64_t v) const { return target + (b * ts.b + v * ts.n) * target_size; }

  FASTSEG_TILE_INLINE Tile<T> load(int64_t tile, int64_t& b) {
    b = tile / tiles_per_sample;
    const int64_t v0 = first_voxel(tile);
    const int64_t n = std::min(ld, pb.N - v0);
    T* x = buf.data();
    T* e = x + pb.C * ld;
    T* g = e + pb.C * ld;
    T* m = g + pb.C * ld;
    T* s = m + ld;
    Tile<T> tl{pb.C, n, ld, x, e, g, y.data(), m, s, s + ld, s + 2 * ld};
    gather<kSoftmax>(logits + b * ls.b + v0 * ls.n, ls, pb.C, n, ld, x, tl.mx);
    pad_rows(x, pb.C, ld, n, T(0));
    pad_rows(tl.mx, 1, 0, n, T(0));
    const int64_t found = load_target(target_at_voxel(b, v0), ts, pb, n, ld, y.data(), m, g);
    if (bad == kNoBadLabel) bad = found;
    return tl;
  }
};

// The work of one sample is cut into chunks of whole tiles, handed out one at a time from a shared counter
// rather than split evenly between the threads up front: a thread whose core is busy with something else
// then takes fewer chunks instead of holding up the step. The chunk size depends on the problem only.
struct Chunks {
  int64_t tiles_per_sample, tiles_per_chunk, per_sample, count;

  Chunks(const Problem& pb, int64_t ld) {
    tiles_per_sample = (pb.N + ld - 1) / ld;
    // ~64k logits a chunk (a few hundred microseconds of work), and at most ~256 chunks a sample.
    tiles_per_chunk = std::max({int64_t{1}, 65536 / (ld * pb.C), (tiles_per_sample + 255) / 256});
    per_sample = (tiles_per_sample + tiles_per_chunk - 1) / tiles_per_chunk;
    count = pb.B * per_sample;
  }

  // Tiles [begin, end) of chunk k (tile indices count over all samples, as TileLoader::load takes them).
  void tiles_of(int64_t k, int64_t& begin, int64_t& end) const {
    const int64_t b = k / per_sample, first = (k % per_sample) * tiles_per_chunk;
    begin = b * tiles_per_sample + first;
    end = b * tiles_per_sample + std::min(tiles_per_sample, first + tiles_per_chunk);
  }
};

// Calls worker(next) once on each of up to at::get_num_threads() threads (one per 32k logits at most, so that
// small problems stay on the calling thread), where next(k) sets k to the next chunk not yet taken and
// returns false when there is none left.
template <typename Worker>
void run_chunks(const Problem& pb, const Chunks& chunks, const Worker& worker) {
  std::atomic<int64_t> counter{0};
  auto next = [&](int64_t& k) {
    k = counter.fetch_add(1, std::memory_order_relaxed);
    return k < chunks.count;
  };
  const int64_t workers = std::min({int64_t{at::get_num_threads()}, chunks.count, 1 + pb.B * pb.C * pb.N / 32768});
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(next); });
}

// Each chunk sums its tiles into its own (C, 5) doubles; a sample's chunks are then added in chunk order, so
// the result is the same whatever thread did which chunk, and for any number of threads.
template <typename scalar_t, typename T, bool kSoftmax>
void forward_impl(const at::Tensor& logits, const at::Tensor& target, const Problem& pb, at::Tensor& stats) {
  const int64_t ld = tile_size(pb.C);
  const Chunks chunks(pb, ld);
  const int64_t per = pb.C * kNumStats;
  std::vector<double> partial(chunks.count * per, 0.0);
  std::vector<int64_t> bad(chunks.count, kNoBadLabel);
  const TargetLoad<T> load_target = target_loader<T>(target);
  const bool labels = target_is_labels(target);

  run_chunks(pb, chunks, [&](const auto& next) {
    TileLoader<scalar_t, T, kSoftmax> loader(pb, logits, target, load_target);
    std::vector<double> lanes(per * kBlock);
    int64_t k, begin, end;
    auto tiles_with = [&](auto labels_tag, auto squared_tag) FASTSEG_TILE_INLINE_LAMBDA {
      constexpr bool kLabels = decltype(labels_tag)::value, kSq = decltype(squared_tag)::value;
      run_tiles<T>(
          [&](int64_t first, int64_t last) FASTSEG_TILE_INLINE_LAMBDA {
            for (int64_t tile = first; tile < last; ++tile) {
              int64_t b;
              const Tile<T> tl = loader.load(tile, b);
              if constexpr (kSoftmax) {
                softmax_forward<T, kLabels, kSq>(tl, lanes.data());
              } else {
                sigmoid_forward<T, kLabels, kSq>(tl, lanes.data());
              }
            }
          },
          begin, end);
    };
    while (next(k)) {
      chunks.tiles_of(k, begin, end);
      std::fill(lanes.begin(), lanes.end(), 0.0);
      with_flags(labels, pb.squared, tiles_with);
      for (int64_t i = 0; i < per; ++i) {
        double sum = 0.0;
        for (int64_t j = 0; j < kBlock; ++j) sum += lanes[i * kBlock + j];
        partial[k * per + i] = sum;
      }
      bad[k] = loader.bad;
      loader.bad = kNoBadLabel;
    }
  });

  for (int64_t v : bad) {
    TORCH_CHECK_VALUE(v == kNoBadLabel, "fastseg.dice_ce: target must hold class labels in [0, ", pb.C, ")",
                      pb.has_ignore ? " or ignore_index=" + std::to_string(pb.ignore_index) : std::string(),
                      ", got label ", v);
  }
  T* out = stats.data_ptr<T>();
  for (int64_t b = 0; b < pb.B; ++b) {
    for (int64_t i = 0; i < per; ++i) {
      double sum = 0.0;
      for (int64_t k = b * chunks.per_sample; k < (b + 1) * chunks.per_sample; ++k) sum += partial[k * per + i];
      out[b * per + i] = static_cast<T>(sum);
    }
  }
}

// A channels-first gradient (unit voxel stride) is written by the last sweep itself, unless it is large enough
// to be streamed (worth_streaming): then each tile's rows go through a staging buffer and streaming stores,
// which at (2, 8, 96^3) save the read of every gradient line before its write. Other layouts are staged and
// scattered.
template <typename scalar_t, typename T, bool kSoftmax>
void backward_impl(const at::Tensor& grad_stats, const at::Tensor& logits, const at::Tensor& target,
                   const Problem& pb, at::Tensor& grad) {
  const int64_t ld = tile_size(pb.C);
  const Chunks chunks(pb, ld);
  const T* gs = grad_stats.const_data_ptr<T>();
  const Strides gst = strides_of(grad);
  scalar_t* const gbase = grad.data_ptr<scalar_t>();
  const TargetLoad<T> load_target = target_loader<T>(target);
  const bool labels = target_is_labels(target);
  const bool stream = gst.n == 1 && worth_streaming(static_cast<int64_t>(grad.nbytes()));
  const bool direct = gst.n == 1 && !stream;
  const RowCopy copy_rows = stream_rows();
  run_chunks(pb, chunks, [&](const auto& next) {
    TileLoader<scalar_t, T, kSoftmax> loader(pb, logits, target, load_target);
    std::vector<scalar_t> stage(pb.C * ld);
    int64_t k, begin, end;
    auto tiles_with = [&](auto labels_tag, auto squared_tag) FASTSEG_TILE_INLINE_LAMBDA {
      constexpr bool kLabels = decltype(labels_tag)::value, kSq = decltype(squared_tag)::value;
      run_tiles<T>(
          [&](int64_t first, int64_t last) FASTSEG_TILE_INLINE_LAMBDA {
            for (int64_t tile = first; tile < last; ++tile) {
              int64_t b;
              const Tile<T> tl = loader.load(tile, b);
              const T* g = gs + b * pb.C * kNumStats;
              scalar_t* out = gbase + b * gst.b + loader.first_voxel(tile) * gst.n;
              // A sample's last tile is staged too: the kernels write whole blocks.
              const bool into_out = direct && tl.n == ld;
              scalar_t* dst = into_out ? out : stage.data();
              const int64_t dst_ld = into_out ? gst.c : ld;
              if constexpr (kSoftmax) {
                softmax_backward<T, kLabels, kSq>(tl, g, dst, dst_ld);
              } else {
                sigmoid_backward<T, kLabels, kSq>(tl, g, dst, dst_ld);
              }
              if (into_out) continue;
              if (gst.n == 1) {
                constexpr int64_t kSize = sizeof(scalar_t);
                (stream ? copy_rows : copy_rows_plain)(reinterpret_cast<const char*>(dst), ld * kSize,
                                                       reinterpret_cast<char*>(out), gst.c * kSize, pb.C,
                                                       tl.n * kSize);
              } else {
                scatter(dst, pb.C, tl.n, ld, out, gst);
              }
            }
          },
          begin, end);
    };
    while (next(k)) {
      chunks.tiles_of(k, begin, end);
      with_flags(labels, pb.squared, tiles_with);
    }
    if (stream) stream_fence();
  });
}

// Calls f.template operator()<scalar_t, acc_t, kSoftmax>() for the runtime logits dtype and activation.
template <typename F>
void dispatch(const at::Tensor& logits, int64_t activation, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fastseg_dice_ce", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (activation == kSoftmax) {
      f.template operator()<scalar_t, acc_t, true>();
    } else {
      f.template operator()<scalar_t, acc_t, false>();
    }
  });
}

// The gradient is as large as the logits and freshly allocated at every step, so first-touch page faults
// cost about a fifth of the backward at (2, 8, 96^3). On Linux, large gradients are backed by transparent
// huge pages (512 x fewer faults); elsewhere, or if that allocation fails, a plain empty_like.
at::Tensor empty_like_for_gradient(const at::Tensor& like) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (bytes >= 4 * kHuge) {
    const size_t size = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, size) == 0) {
      madvise(p, size, MADV_HUGEPAGE);
      const at::Tensor layout = at::empty_like(like, like.options().device(at::kMeta));
      return at::from_blob(p, layout.sizes(), layout.strides(), [](void* q) { std::free(q); }, like.options());
    }
  }
#endif
  return at::empty_like(like);
}

struct ForwardFn {
  const at::Tensor& logits;
  const at::Tensor& target;
  const Problem& pb;
  at::Tensor& stats;
  template <typename s_t, typename a_t, bool S>
  void operator()() const {
    forward_impl<s_t, a_t, S>(logits, target, pb, stats);
  }
};

struct BackwardFn {
  const at::Tensor& grad_stats;
  const at::Tensor& logits;
  const at::Tensor& target;
  const Problem& pb;
  at::Tensor& grad;
  template <typename s_t, typename a_t, bool S>
  void operator()() const {
    backward_impl<s_t, a_t, S>(grad_stats, logits, target, pb, grad);
  }
};

at::Tensor dice_ce_stats_cpu(const at::Tensor& logits, const at::Tensor& target_in, int64_t activation,
                             std::optional<int64_t> ignore_index, bool squared_pred) {
  const at::Tensor target = as_readable_target(target_in);
  check_inputs("fastseg::dice_ce_stats", logits, target, activation);
  const Problem pb = make_problem(logits, ignore_index, squared_pred);
  at::Tensor stats = at::zeros({pb.B, pb.C, kNumStats}, logits.options().dtype(stats_dtype(logits)));
  if (pb.B == 0 || pb.N == 0) return stats;
  dispatch(logits, activation, ForwardFn{logits, target, pb, stats});
  return stats;
}

at::Tensor dice_ce_stats_backward_cpu(const at::Tensor& grad_stats, const at::Tensor& logits,
                                      const at::Tensor& target_in, int64_t activation,
                                      std::optional<int64_t> ignore_index, bool squared_pred) {
  const at::Tensor target = as_readable_target(target_in);
  check_inputs("fastseg::dice_ce_stats_backward", logits, target, activation);
  check_grad_stats("fastseg::dice_ce_stats_backward", grad_stats, logits);
  const Problem pb = make_problem(logits, ignore_index, squared_pred);
  at::Tensor grad = empty_like_for_gradient(logits);
  if (grad.numel() == 0) return grad;
  const at::Tensor gs = grad_stats.to(stats_dtype(logits)).contiguous();
  dispatch(logits, activation, BackwardFn{gs, logits, target, pb, grad});
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("dice_ce_stats", &dice_ce_stats_cpu);
  m.impl("dice_ce_stats_backward", &dice_ce_stats_backward_cpu);
}

}  // namespace dice_ce
}  // namespace fastseg
