// CPU kernel of fastseg::calibration_stats (maths in confidence.h).
//
// The voxels of each sample are cut into tiles of T voxels; a tile's probabilities are gathered once into a
// clamped (C, T) buffer whatever the input layout and dtype, so the argmax and bin-index loops run over T
// contiguous values and vectorise. The bin updates are scatter-adds into per-thread float64 histograms; each
// histogram has kCopies interleaved copies (voxel t goes to copy t % kCopies) because most probabilities of
// a class share one bin (near 0 or near 1) and a single copy would chain every add of a tile through the
// same memory word. Ignored voxels go to an extra bin K that is never read, which keeps the loops branch-free.
// Tiles are spread over threads with at::parallel_for; the threads' partials are added in thread order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "confidence.h"
#include "confidence_checks.h"

#include "../common/cpu_dispatch.h"

namespace fastseg {
namespace confidence {
namespace {

constexpr int kCopies = 4;
constexpr int64_t kNoBadLabel = std::numeric_limits<int64_t>::min();

int64_t tile_size(int64_t C) {
  // A tile's (C, T) buffer stays in L1/L2 while T stays a multiple of the vector width.
  const int64_t t = 8192 / std::max<int64_t>(C, 1);
  return std::clamp<int64_t>(t / 16 * 16, 16, 512);
}

// Offsets of one thread's partial sums (doubles): class-wise (C, kCopies, K + 1, 3), top-label
// (kCopies, K + 1, 3), confusion (C, 6).
struct Layout {
  int64_t K1, copy_stride, class_stride, top, confusion, size;
  explicit Layout(const Problem& pb) {
    K1 = pb.K + 1;
    copy_stride = K1 * kBinStats;
    class_stride = kCopies * copy_stride;
    top = pb.C * class_stride;
    confusion = top + class_stride;
    size = confusion + pb.C * kConfusionStats;
  }
};

// best[t], arg[t] = max and argmax over the C rows of the (C, ld) tile x. Every store is unconditional, so
// the selects vectorise.
template <typename T>
FASTSEG_TILE_INLINE void argmax_body(const T* __restrict x, int64_t C, int64_t n, int64_t ld, T* __restrict best,
                                     int32_t* __restrict arg) {
  for (int64_t t = 0; t < n; ++t) {
    best[t] = T(-1);
    arg[t] = 0;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* __restrict xc = x + c * ld;
    const int32_t ci = static_cast<int32_t>(c);
    for (int64_t t = 0; t < n; ++t) {
      T b = best[t];
      int32_t a = arg[t];
      argmax_step(xc[t], ci, b, a);
      best[t] = b;
      arg[t] = a;
    }
  }
}

// kb[t] = bin of v[t], or the discarded bin K for an ignored voxel (y[t] < 0).
template <typename T>
FASTSEG_TILE_INLINE void bins_body(const T* __restrict v, const int32_t* __restrict y, int64_t n, int32_t K,
                                   int32_t* __restrict kb) {
  for (int64_t t = 0; t < n; ++t) {
    const int32_t k = bin_of(v[t], K);
    kb[t] = y[t] >= 0 ? k : K;
  }
}

FASTSEG_CPU_CLONES void argmax_tile(const float* x, int64_t C, int64_t n, int64_t ld, float* best, int32_t* arg) {
  argmax_body(x, C, n, ld, best, arg);
}
FASTSEG_CPU_CLONES void argmax_tile(const double* x, int64_t C, int64_t n, int64_t ld, double* best, int32_t* arg) {
  argmax_body(x, C, n, ld, best, arg);
}
FASTSEG_CPU_CLONES void bins_tile(const float* v, const int32_t* y, int64_t n, int32_t K, int32_t* kb) {
  bins_body(v, y, n, K, kb);
}
FASTSEG_CPU_CLONES void bins_tile(const double* v, const int32_t* y, int64_t n, int32_t K, int32_t* kb) {
  bins_body(v, y, n, K, kb);
}

// Adds [1, v[t], hit(t)] to bin kb[t] of the kCopies-interleaved histogram h.
template <typename T, typename Hit>
inline void scatter_bins(double* h, int64_t copy_stride, const int32_t* kb, const T* v, int64_t n,
                         const Hit& hit) {
  int64_t t = 0;
  for (; t + kCopies <= n; t += kCopies) {
    for (int j = 0; j < kCopies; ++j) {
      double* s = h + j * copy_stride + int64_t{kb[t + j]} * kBinStats;
      s[kCount] += 1.0;
      s[kSum] += static_cast<double>(v[t + j]);
      s[kHits] += hit(t + j) ? 1.0 : 0.0;
    }
  }
  for (; t < n; ++t) {
    double* s = h + int64_t{kb[t]} * kBinStats;
    s[kCount] += 1.0;
    s[kSum] += static_cast<double>(v[t]);
    s[kHits] += hit(t) ? 1.0 : 0.0;
  }
}

// Per-thread tile buffers and the processing of one tile into a thread's partial sums.
template <typename scalar_t, typename T, typename tgt_t>
struct TileWorker {
  const Problem& pb;
  const Layout& lay;
  const scalar_t* probs;
  Strides ps;
  const tgt_t* target;
  Strides ts;
  int64_t ld, tiles_per_sample;
  std::vector<T> x, best;
  std::vector<int32_t> y, arg, kb;
  int64_t bad = kNoBadLabel;

  TileWorker(const Problem& pb_, const Layout& lay_, const scalar_t* p, Strides ps_, const tgt_t* tg, Strides ts_)
      : pb(pb_), lay(lay_), probs(p), ps(ps_), target(tg), ts(ts_) {
    ld = tile_size(pb.C);
    tiles_per_sample = (pb.N + ld - 1) / ld;
    x.assign(pb.C * ld, T(0));
    best.assign(ld, T(0));
    y.assign(ld, -1);
    arg.assign(ld, 0);
    kb.assign(ld, 0);
  }

  void gather(const scalar_t* base, int64_t n) {
    T* out = x.data();
    if (ps.n == 1) {
      for (int64_t c = 0; c < pb.C; ++c) {
        const scalar_t* src = base + c * ps.c;
        T* dst = out + c * ld;
        for (int64_t t = 0; t < n; ++t) dst[t] = clamp_prob(static_cast<T>(src[t]));
      }
    } else {
      for (int64_t t = 0; t < n; ++t) {
        const scalar_t* src = base + t * ps.n;
        for (int64_t c = 0; c < pb.C; ++c) out[c * ld + t] = clamp_prob(static_cast<T>(src[c * ps.c]));
      }
    }
  }

  // Branch-free decode; the rare bad label is located by a second, scalar look.
  void load_labels(const tgt_t* lab, int64_t n) {
    const int64_t C = pb.C, ign = pb.ignore_index;
    const bool has_ign = pb.has_ignore;
    int32_t any_bad = 0;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t raw = static_cast<int64_t>(lab[t * ts.n]);
      const bool ignored = has_ign && raw == ign;
      const bool in_range = raw >= 0 && raw < C;
      any_bad |= static_cast<int32_t>(!ignored && !in_range);
      y[t] = (!ignored && in_range) ? static_cast<int32_t>(raw) : -1;
    }
    if (any_bad && bad == kNoBadLabel) {
      for (int64_t t = 0; t < n; ++t) {
        bool is_bad = false;
        const int64_t raw = static_cast<int64_t>(lab[t * ts.n]);
        decode_label(raw, pb, is_bad);
        if (is_bad) {
          bad = raw;
          break;
        }
      }
    }
  }

  void argmax(int64_t n) {
    argmax_tile(x.data(), pb.C, n, ld, best.data(), arg.data());
  }

  void bins(const T* v, int64_t n) {
    bins_tile(v, y.data(), n, static_cast<int32_t>(pb.K), kb.data());
  }

  void run(int64_t tile, double* acc) {
    const int64_t b = tile / tiles_per_sample;
    const int64_t v0 = (tile % tiles_per_sample) * ld;
    const int64_t n = std::min(ld, pb.N - v0);
    gather(probs + b * ps.b + v0 * ps.n, n);
    load_labels(target + b * ts.b + v0 * ts.n, n);
    argmax(n);
    const int32_t* yy = y.data();
    for (int64_t c = 0; c < pb.C; ++c) {
      const T* xc = x.data() + c * ld;
      bins(xc, n);
      const int32_t ci = static_cast<int32_t>(c);
      scatter_bins(acc + c * lay.class_stride, lay.copy_stride, kb.data(), xc, n,
                   [&](int64_t t) { return yy[t] == ci; });
    }
    bins(best.data(), n);
    const int32_t* am = arg.data();
    scatter_bins(acc + lay.top, lay.copy_stride, kb.data(), best.data(), n,
                 [&](int64_t t) { return am[t] == yy[t]; });
    double* conf = acc + lay.confusion;
    for (int64_t t = 0; t < n; ++t) {
      const int32_t label = yy[t];
      if (label < 0) continue;
      const int32_t a = am[t];
      double* s = conf + predicted_slot(a, label);
      s[0] += 1.0;
      s[1] += static_cast<double>(best[t]);
      if (a != label) {
        double* f = conf + missed_slot(label);
        f[0] += 1.0;
        f[1] += static_cast<double>(x[label * ld + t]);
      }
    }
  }
};

// Adds every thread's partial (and every copy of the bins) into the three outputs, in a fixed order.
void reduce_partials(const std::vector<double>& partial, int64_t nthreads, const Layout& lay, const Problem& pb,
                     std::vector<at::Tensor>& out) {
  double* cls = out[0].data_ptr<double>();
  double* top = out[1].data_ptr<double>();
  double* conf = out[2].data_ptr<double>();
  for (int64_t tid = 0; tid < nthreads; ++tid) {
    const double* p = partial.data() + tid * lay.size;
    for (int64_t c = 0; c <= pb.C; ++c) {  // c == C: the top-label histogram, stored right after the classes
      double* dst = c < pb.C ? cls + c * pb.K * kBinStats : top;
      for (int j = 0; j < kCopies; ++j) {
        const double* src = p + c * lay.class_stride + j * lay.copy_stride;
        for (int64_t i = 0; i < pb.K * kBinStats; ++i) dst[i] += src[i];
      }
    }
    for (int64_t i = 0; i < pb.C * kConfusionStats; ++i) conf[i] += p[lay.confusion + i];
  }
}

template <typename scalar_t, typename T, typename tgt_t>
void stats_impl(const at::Tensor& probs, const at::Tensor& target, const Problem& pb,
                std::vector<at::Tensor>& out) {
  const Layout lay(pb);
  const int64_t nthreads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(nthreads * lay.size), 0.0);
  std::vector<int64_t> bad(nthreads, kNoBadLabel);
  const int64_t ld = tile_size(pb.C);
  const int64_t tiles = pb.B * ((pb.N + ld - 1) / ld);
  const int64_t grain = std::max<int64_t>(1, 65536 / (ld * pb.C));

  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    TileWorker<scalar_t, T, tgt_t> worker(pb, lay, probs.const_data_ptr<scalar_t>(), strides_of(probs),
                                          target.const_data_ptr<tgt_t>(), strides_of(target));
    double* acc = partial.data() + tid * lay.size;
    for (int64_t tile = begin; tile < end; ++tile) worker.run(tile, acc);
    if (bad[tid] == kNoBadLabel) bad[tid] = worker.bad;
  });

  for (int64_t v : bad) {
    TORCH_CHECK_VALUE(v == kNoBadLabel, kOp, ": target must hold class labels in [0, ", pb.C, ")",
                      pb.has_ignore ? " or ignore_index=" + std::to_string(pb.ignore_index) : std::string(),
                      ", got label ", v);
  }
  reduce_partials(partial, nthreads, lay, pb, out);
}

std::vector<at::Tensor> calibration_stats_cpu(const at::Tensor& probs_in, const at::Tensor& target_in,
                                              int64_t num_bins, std::optional<int64_t> ignore_index) {
  check_inputs(probs_in, target_in, num_bins);
  const Problem pb = make_problem(probs_in, num_bins, ignore_index);
  std::vector<at::Tensor> out = zero_outputs(probs_in, pb);
  if (pb.B == 0 || pb.N == 0) return out;
  const at::Tensor probs = flat_probs(probs_in, pb);
  const at::Tensor target = flat_target(target_in, pb);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "fastseg_calibration_stats", [&] {
    using scalar_t_ = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t_, double>, double, float>;
    AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "fastseg_calibration_stats_labels", [&] {
      stats_impl<scalar_t_, acc_t, scalar_t>(probs, target, pb, out);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("calibration_stats", &calibration_stats_cpu);
}

}  // namespace confidence
}  // namespace fastseg
