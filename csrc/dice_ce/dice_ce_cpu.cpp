// CPU kernels of the fused Dice + cross-entropy statistics (maths in dice_ce.h).
//
// The voxels of each sample are cut into tiles of T voxels. A tile's logits are gathered once into a
// (C, T) float buffer whatever the input layout (channels-first or channels-last, any dtype), so every
// inner loop runs over T contiguous floats and vectorises; tiles are spread over threads with
// at::parallel_for and each thread sums its tiles into private (B, C, 5) doubles, reduced in thread order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "dice_ce.h"
#include "dice_ce_checks.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../common/cpu_dispatch.h"

namespace fastseg {
namespace dice_ce {
namespace {

constexpr int64_t kNoBadLabel = std::numeric_limits<int64_t>::min();

// One tile: logits x (C, T), exp buffer e (C, T), per-voxel class y and mask m, or a mask target g (C, T);
// five scratch rows s0..s4 of T.
template <typename T>
struct Tile {
  int64_t C, n, ld;  // classes, voxels in this tile, leading dimension (= T)
  bool squared;
  T* x;
  T* e;
  const T* g;
  const int32_t* y;
  const T* m;
  T* s0;
  T* s1;
  T* s2;
  T* s3;
  T* s4;
};

template <typename T, bool kLabels>
FASTSEG_TILE_INLINE T target_at(const Tile<T>& tl, int64_t c, int64_t t) {
  if constexpr (kLabels) {
    return static_cast<T>(tl.y[t] == c);
  } else {
    return tl.g[c * tl.ld + t];
  }
}

// mx[t] = max over classes of the tile's logits.
template <typename T>
FASTSEG_TILE_INLINE void class_max(const Tile<T>& tl, T* mx) {
#pragma omp simd
  for (int64_t t = 0; t < tl.n; ++t) mx[t] = tl.x[t];
  for (int64_t c = 1; c < tl.C; ++c) {
    const T* xc = tl.x + c * tl.ld;
#pragma omp simd
    for (int64_t t = 0; t < tl.n; ++t) mx[t] = max_(mx[t], xc[t]);
  }
}

// Softmax pieces of a tile: e = exp(x - max), s1 = 1 / sum e, s2 = log-sum-exp.
template <typename T>
FASTSEG_TILE_INLINE void softmax_tile(const Tile<T>& tl) {
  const int64_t n = tl.n, ld = tl.ld;
  T* mx = tl.s0;
  T* inv = tl.s1;
  T* lse = tl.s2;
  class_max(tl, mx);
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) inv[t] = T(0);
  for (int64_t c = 0; c < tl.C; ++c) {
    const T* xc = tl.x + c * ld;
    T* ec = tl.e + c * ld;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) {
      ec[t] = exp_nonpos(xc[t] - mx[t]);
      inv[t] += ec[t];
    }
  }
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    lse[t] = mx[t] + log_ge1(inv[t]);
    inv[t] = T(1) / inv[t];
  }
}

// Adds sum_t term(t) to st[0..5). Lane-wise partial sums: a vectorisable loop without needing
// -fassociative-math (an `omp simd reduction` here defeats gcc's vectoriser).
template <typename T, typename F>
FASTSEG_TILE_INLINE void add_terms(int64_t n, const F& term, T* st) {
  constexpr int L = 8;
  T acc[kNumStats][L] = {};
  int64_t t = 0;
  for (; t + L <= n; t += L) {
    for (int j = 0; j < L; ++j) {
      const Terms<T> d = term(t + j);
      acc[kI][j] += d.I, acc[kP][j] += d.P, acc[kG][j] += d.G, acc[kA][j] += d.A, acc[kU][j] += d.U;
    }
  }
  for (; t < n; ++t) {
    const Terms<T> d = term(t);
    acc[kI][0] += d.I, acc[kP][0] += d.P, acc[kG][0] += d.G, acc[kA][0] += d.A, acc[kU][0] += d.U;
  }
  for (int k = 0; k < kNumStats; ++k)
    for (int j = 0; j < L; ++j) st[k] += acc[k][j];
}

template <typename T, bool kLabels>
FASTSEG_TILE_INLINE void softmax_forward(const Tile<T>& tl, T* st) {
  softmax_tile(tl);
  for (int64_t c = 0; c < tl.C; ++c) {
    const T* xc = tl.x + c * tl.ld;
    const T* ec = tl.e + c * tl.ld;
    add_terms(
        tl.n,
        [&](int64_t t) {
          return softmax_terms(ec[t] * tl.s1[t], tl.s2[t] - xc[t], target_at<T, kLabels>(tl, c, t), tl.m[t],
                               tl.squared);
        },
        st + c * kNumStats);
  }
}

template <typename T, bool kLabels>
FASTSEG_TILE_INLINE void sigmoid_forward(const Tile<T>& tl, T* st) {
  for (int64_t c = 0; c < tl.C; ++c) {
    const T* xc = tl.x + c * tl.ld;
    add_terms(
        tl.n,
        [&](int64_t t) {
          return sigmoid_terms(sigmoid_of(xc[t]), target_at<T, kLabels>(tl, c, t), tl.m[t], tl.squared);
        },
        st + c * kNumStats);
  }
}

// Writes d loss / d x of the tile into tl.x. Two sweeps over the classes: the first computes e = exp(x - max)
// and, alongside the softmax sum, the sums needed for sum_c p_c a_c = m (S1 / s + 2 S2 / s^2) with
// S1 = sum_c e_c (gI_c g_c + [!squared] gP_c) and S2 = [squared] sum_c e_c^2 gP_c, and H / m = sum_c gA_c g_c + gU_c.
template <typename T, bool kLabels>
FASTSEG_TILE_INLINE void softmax_backward(const Tile<T>& tl, const T* gs) {
  const int64_t n = tl.n, ld = tl.ld;
  const bool sq = tl.squared;
  T* mx = tl.s0;
  T* sum = tl.s1;
  T* S1 = tl.s2;
  T* S2 = tl.s3;
  T* H = tl.s4;
  class_max(tl, mx);
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) sum[t] = S1[t] = S2[t] = H[t] = T(0);
  for (int64_t c = 0; c < tl.C; ++c) {
    const T* xc = tl.x + c * ld;
    T* ec = tl.e + c * ld;
    const T* g = gs + c * kNumStats;
    const T gP1 = sq ? T(0) : g[kP];
    const T gP2 = sq ? g[kP] : T(0);
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) {
      const T e = exp_nonpos(xc[t] - mx[t]);
      const T gt = target_at<T, kLabels>(tl, c, t);
      ec[t] = e;
      sum[t] += e;
      S1[t] += e * (g[kI] * gt + gP1);
      S2[t] += e * e * gP2;
      H[t] += g[kA] * gt + g[kU];
    }
  }
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    const T inv = T(1) / sum[t];
    sum[t] = inv;
    S1[t] = tl.m[t] * (S1[t] * inv + T(2) * S2[t] * inv * inv);  // sum_c p_c a_c
    H[t] *= tl.m[t];
  }
  for (int64_t c = 0; c < tl.C; ++c) {
    const T* ec = tl.e + c * ld;
    T* dx = tl.x + c * ld;
    const T* g = gs + c * kNumStats;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) {
      const T p = ec[t] * sum[t];
      const T gt = target_at<T, kLabels>(tl, c, t);
      const T a = dice_dp(p, gt, tl.m[t], g[kI], g[kP], sq);
      const T h = softmax_ce_h(gt, tl.m[t], g[kA], g[kU]);
      dx[t] = softmax_grad(p, a, h, S1[t], H[t]);
    }
  }
}

template <typename T, bool kLabels>
FASTSEG_TILE_INLINE void sigmoid_backward(const Tile<T>& tl, const T* gs) {
  const int64_t n = tl.n, ld = tl.ld;
  for (int64_t c = 0; c < tl.C; ++c) {
    T* xc = tl.x + c * ld;
    const T* g = gs + c * kNumStats;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) {
      xc[t] = sigmoid_grad(sigmoid_of(xc[t]).s, target_at<T, kLabels>(tl, c, t), tl.m[t], g[kI], g[kP], g[kA], g[kU],
                           tl.squared);
    }
  }
}

// float versions get ISA clones (FASTSEG_CPU_CLONES); double (gradcheck, float64 logits) uses the templates directly.
#define FASTSEG_FLOAT_CLONE(name, Labels, ...)                                        \
  FASTSEG_CPU_CLONES void name##_f_##Labels(const Tile<float>& tl, __VA_ARGS__ arg) { \
    name<float, Labels>(tl, arg);                                                     \
  }
FASTSEG_FLOAT_CLONE(softmax_forward, true, float*)
FASTSEG_FLOAT_CLONE(softmax_forward, false, float*)
FASTSEG_FLOAT_CLONE(sigmoid_forward, true, float*)
FASTSEG_FLOAT_CLONE(sigmoid_forward, false, float*)
FASTSEG_FLOAT_CLONE(softmax_backward, true, const float*)
FASTSEG_FLOAT_CLONE(softmax_backward, false, const float*)
FASTSEG_FLOAT_CLONE(sigmoid_backward, true, const float*)
FASTSEG_FLOAT_CLONE(sigmoid_backward, false, const float*)
#undef FASTSEG_FLOAT_CLONE

template <typename T, bool kLabels, bool kSoftmax>
void run_forward(const Tile<T>& tl, T* st) {
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (kSoftmax) {
      kLabels ? softmax_forward_f_true(tl, st) : softmax_forward_f_false(tl, st);
    } else {
      kLabels ? sigmoid_forward_f_true(tl, st) : sigmoid_forward_f_false(tl, st);
    }
  } else if constexpr (kSoftmax) {
    softmax_forward<T, kLabels>(tl, st);
  } else {
    sigmoid_forward<T, kLabels>(tl, st);
  }
}

template <typename T, bool kLabels, bool kSoftmax>
void run_backward(const Tile<T>& tl, const T* gs) {
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (kSoftmax) {
      kLabels ? softmax_backward_f_true(tl, gs) : softmax_backward_f_false(tl, gs);
    } else {
      kLabels ? sigmoid_backward_f_true(tl, gs) : sigmoid_backward_f_false(tl, gs);
    }
  } else if constexpr (kSoftmax) {
    softmax_backward<T, kLabels>(tl, gs);
  } else {
    sigmoid_backward<T, kLabels>(tl, gs);
  }
}

// Copies a (C, n) block of a strided (B, C, N) tensor into a (C, ld) buffer, or back.
template <typename src_t, typename dst_t>
void gather(const src_t* base, Strides s, int64_t C, int64_t n, int64_t ld, dst_t* out) {
  if (s.n == 1) {
    for (int64_t c = 0; c < C; ++c)
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) out[c * ld + t] = static_cast<dst_t>(base[c * s.c + t]);
  } else {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = 0; c < C; ++c) out[c * ld + t] = static_cast<dst_t>(base[c * s.c + t * s.n]);
  }
}

template <typename src_t, typename dst_t>
void scatter(const src_t* in, int64_t C, int64_t n, int64_t ld, dst_t* base, Strides s) {
  if (s.n == 1) {
    for (int64_t c = 0; c < C; ++c)
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) base[c * s.c + t] = static_cast<dst_t>(in[c * ld + t]);
  } else {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = 0; c < C; ++c) base[c * s.c + t * s.n] = static_cast<dst_t>(in[c * ld + t]);
  }
}

int64_t tile_size(int64_t C) {
  // Keep a tile's few (C, T) float buffers inside L1/L2 while T stays a multiple of the vector width.
  const int64_t t = 4096 / std::max<int64_t>(C, 1);
  return std::clamp<int64_t>(t / 16 * 16, 16, 256);
}

// Per-thread buffers and the loading of one tile; tiles never straddle two samples.
template <typename scalar_t, typename T, typename tgt_t, bool kLabels>
struct TileLoader {
  const Problem& pb;
  const scalar_t* logits;
  Strides ls;
  const tgt_t* target;
  Strides ts;
  int64_t ld, tiles_per_sample;
  std::vector<T> buf;
  std::vector<int32_t> y;
  int64_t bad = kNoBadLabel;

  TileLoader(const Problem& pb_, const scalar_t* l, Strides ls_, const tgt_t* tg, Strides ts_)
      : pb(pb_), logits(l), ls(ls_), target(tg), ts(ts_) {
    ld = tile_size(pb.C);
    tiles_per_sample = (pb.N + ld - 1) / ld;
    buf.assign((kLabels ? 2 : 3) * pb.C * ld + 6 * ld, T(0));
    y.assign(kLabels ? ld : 0, -1);
  }

  // Branch-free decode (vectorises); the rare bad label is located by a second, scalar look.
  void load_labels(const tgt_t* lab, int64_t stride, int64_t n, T* m) {
    const int64_t C = pb.C, ign = pb.ignore_index;
    const bool has_ign = pb.has_ignore;
    int32_t any_bad = 0;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t raw = static_cast<int64_t>(lab[t * stride]);
      const bool ignored = has_ign && raw == ign;
      const bool in_range = raw >= 0 && raw < C;
      any_bad |= static_cast<int32_t>(!ignored && !in_range);
      y[t] = (!ignored && in_range) ? static_cast<int32_t>(raw) : -1;
      m[t] = y[t] >= 0 ? T(1) : T(0);
    }
    if (any_bad && bad == kNoBadLabel) {
      for (int64_t t = 0; t < n; ++t) {
        bool is_bad = false;
        const int64_t raw = static_cast<int64_t>(lab[t * stride]);
        decode_label(raw, pb, is_bad);
        if (is_bad) {
          bad = raw;
          break;
        }
      }
    }
  }

  Tile<T> load(int64_t tile, int64_t& b) {
    b = tile / tiles_per_sample;
    const int64_t v0 = (tile % tiles_per_sample) * ld;
    const int64_t n = std::min(ld, pb.N - v0);
    T* x = buf.data();
    T* e = x + pb.C * ld;
    T* m = e + pb.C * ld;
    T* g = m + ld;
    Tile<T> tl{pb.C, n, ld, pb.squared, x, e, nullptr, y.data(), m, g, g + ld, g + 2 * ld, g + 3 * ld, g + 4 * ld};
    gather(logits + b * ls.b + v0 * ls.n, ls, pb.C, n, ld, x);
    if constexpr (kLabels) {
      load_labels(target + b * ts.b + v0 * ts.n, ts.n, n, m);
    } else {
      T* gm = g + 5 * ld;
      gather(target + b * ts.b + v0 * ts.n, ts, pb.C, n, ld, gm);
      tl.g = gm;
      for (int64_t t = 0; t < n; ++t) m[t] = T(1);
    }
    return tl;
  }
};

template <typename scalar_t, typename T, typename tgt_t, bool kLabels, bool kSoftmax>
void forward_impl(const at::Tensor& logits, const at::Tensor& target, const Problem& pb, at::Tensor& stats) {
  const int64_t nthreads = at::get_num_threads();
  const int64_t per = pb.B * pb.C * kNumStats;
  std::vector<double> partial(nthreads * per, 0.0);
  std::vector<int64_t> bad(nthreads, kNoBadLabel);
  const int64_t ld = tile_size(pb.C);
  const int64_t tiles = pb.B * ((pb.N + ld - 1) / ld);
  const int64_t grain = std::max<int64_t>(1, 32768 / (ld * pb.C));

  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    TileLoader<scalar_t, T, tgt_t, kLabels> loader(pb, logits.const_data_ptr<scalar_t>(), strides_of(logits),
                                                   target.const_data_ptr<tgt_t>(), strides_of(target));
    std::vector<T> st(pb.C * kNumStats);
    double* acc = partial.data() + tid * per;
    for (int64_t tile = begin; tile < end; ++tile) {
      int64_t b;
      const Tile<T> tl = loader.load(tile, b);
      std::fill(st.begin(), st.end(), T(0));
      run_forward<T, kLabels, kSoftmax>(tl, st.data());
      double* out = acc + b * pb.C * kNumStats;
      for (int64_t i = 0; i < pb.C * kNumStats; ++i) out[i] += static_cast<double>(st[i]);
    }
    bad[tid] = loader.bad;
  });

  for (int64_t v : bad) {
    TORCH_CHECK_VALUE(v == kNoBadLabel, "fastseg.dice_ce: target must hold class labels in [0, ", pb.C, ")",
                      pb.has_ignore ? " or ignore_index=" + std::to_string(pb.ignore_index) : std::string(),
                      ", got label ", v);
  }
  T* out = stats.data_ptr<T>();
  for (int64_t i = 0; i < per; ++i) {
    double sum = 0.0;
    for (int64_t k = 0; k < nthreads; ++k) sum += partial[k * per + i];
    out[i] = static_cast<T>(sum);
  }
}

template <typename scalar_t, typename T, typename tgt_t, bool kLabels, bool kSoftmax>
void backward_impl(const at::Tensor& grad_stats, const at::Tensor& logits, const at::Tensor& target,
                   const Problem& pb, at::Tensor& grad) {
  const int64_t ld = tile_size(pb.C);
  const int64_t tiles = pb.B * ((pb.N + ld - 1) / ld);
  const int64_t grain = std::max<int64_t>(1, 32768 / (ld * pb.C));
  const T* gs = grad_stats.const_data_ptr<T>();
  const Strides gst = strides_of(grad);
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    TileLoader<scalar_t, T, tgt_t, kLabels> loader(pb, logits.const_data_ptr<scalar_t>(), strides_of(logits),
                                                   target.const_data_ptr<tgt_t>(), strides_of(target));
    for (int64_t tile = begin; tile < end; ++tile) {
      int64_t b;
      const Tile<T> tl = loader.load(tile, b);
      run_backward<T, kLabels, kSoftmax>(tl, gs + b * pb.C * kNumStats);
      const int64_t v0 = (tile % loader.tiles_per_sample) * ld;
      scatter(tl.x, pb.C, tl.n, ld, grad.data_ptr<scalar_t>() + b * gst.b + v0 * gst.n, gst);
    }
  });
}

template <typename X>
struct TypeTag {
  using type = X;
};

// Calls f.template operator()<scalar_t, acc_t, tgt_t, kLabels, kSoftmax>() for the runtime types.
template <typename F>
void dispatch(const at::Tensor& logits, const at::Tensor& target, int64_t activation, F&& f) {
  const bool labels = target_is_labels(target);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fastseg_dice_ce", [&] {
    using scalar_t_ = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t_, double>, double, float>;
    auto by_activation = [&](auto tgt_tag, auto labels_tag) {
      using tgt_t = typename decltype(tgt_tag)::type;
      constexpr bool kLabels = decltype(labels_tag)::value;
      if (activation == kSoftmax) {
        f.template operator()<scalar_t_, acc_t, tgt_t, kLabels, true>();
      } else {
        f.template operator()<scalar_t_, acc_t, tgt_t, kLabels, false>();
      }
    };
    if (labels) {
      AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "fastseg_dice_ce_labels", [&] {
        by_activation(TypeTag<scalar_t>{}, std::true_type{});
      });
    } else if (target.scalar_type() == at::kByte) {
      by_activation(TypeTag<uint8_t>{}, std::false_type{});
    } else {
      by_activation(TypeTag<acc_t>{}, std::false_type{});
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
  template <typename s_t, typename a_t, typename t_t, bool L, bool S>
  void operator()() const {
    forward_impl<s_t, a_t, t_t, L, S>(logits, target, pb, stats);
  }
};

struct BackwardFn {
  const at::Tensor& grad_stats;
  const at::Tensor& logits;
  const at::Tensor& target;
  const Problem& pb;
  at::Tensor& grad;
  template <typename s_t, typename a_t, typename t_t, bool L, bool S>
  void operator()() const {
    backward_impl<s_t, a_t, t_t, L, S>(grad_stats, logits, target, pb, grad);
  }
};

at::Tensor dice_ce_stats_cpu(const at::Tensor& logits, const at::Tensor& target_in, int64_t activation,
                             std::optional<int64_t> ignore_index, bool squared_pred) {
  const at::Tensor target = as_readable_target(target_in);
  check_inputs("fastseg::dice_ce_stats", logits, target, activation);
  const Problem pb = make_problem(logits, ignore_index, squared_pred);
  at::Tensor stats = at::zeros({pb.B, pb.C, kNumStats}, logits.options().dtype(stats_dtype(logits)));
  if (pb.B == 0 || pb.N == 0) return stats;
  dispatch(logits, target, activation, ForwardFn{logits, target, pb, stats});
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
  dispatch(logits, target, activation, BackwardFn{gs, logits, target, pb, grad});
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("dice_ce_stats", &dice_ce_stats_cpu);
  m.impl("dice_ce_stats_backward", &dice_ce_stats_backward_cpu);
}

}  // namespace dice_ce
}  // namespace fastseg
