// CPU kernel of fastseg::patch_stats: the exact per-class statistics of patch sampling that
// fastseg/imbalance.py turns into presence probabilities, voxel shares and the imbalance score.
//
// The sampler (fastseg.data.sampling, "Patch sampling semantics"): a case of shape S is padded to
// max(S, P) per axis (label 0, centred), a patch is the box [lo, lo + P). Random patches draw lo uniformly;
// foreground patches draw a class uniformly among the foreground classes of the case, a voxel v uniformly
// among its voxels, and lo = clip(v - P / 2, 0, S' - P) per axis. For each class the op returns, per patch
// size, the expected number of its voxels in a patch and the probability that the patch holds one, under
// each of the two modes, exactly (no sampling), and the share of the class that a foreground patch
// drawn for it shows (its coverage).
//
// Everything is separable over the axes, and the label map is read once per case into runs of equal labels
// along the last axis (all later work is per run, never per voxel):
//
// * Presence (random mode) of class c = share of the positions whose patch meets c: the class OR-dilated
//   by the patch, one bit per position along the last axis, then OR-reduced over windows along axes 1 and
//   0. Positions whose window clips the class's box to the same range form one run (at most
//   min(w + P - 1, 2w - 1) per axis, so a small organ costs little even under a large patch), and each
//   window is a prefix, a suffix or has length P exactly: prefix / suffix ORs and the block trick of van
//   Herk (1992) / Gil & Werman (1993) answer each in O(1), whatever P.
// * Presence (foreground mode): sum over every source voxel v of the weight W(v) = 1 / (K * N_class(v))
//   of the dilation bit at start(v); per source run that is a bit-range popcount.
// * Expected counts are linear in the class mask, so they have closed forms. Random mode: sum over the
//   class's voxels of the product of per-axis coverages (number of positions whose window holds the voxel);
//   per run, a prefix sum of the last axis's coverage. Foreground mode: sum over the class's voxels u of
//   G(u) = sum of W(v) over the voxels v whose patch contains u; that set is a product of per-axis voxel
//   intervals (start() is monotone), so G is a box sum from one summed-volume table of W over the
//   foreground's bounding box; along the last axis the table is summed once more, so a run costs O(1).
// * Background presence: one minus the probability that the patch lies wholly inside non-background
//   voxels, the same scheme with AND-erosion instead of OR-dilation.
// * Organ coverage (foreground mode): the mean over a class's voxels v of the share of the class inside the
//   patch centred on v, i.e. <M, K M> / N^2 for the class mask M and the patch window K; each |c ∩ patch(v)|
//   is a box sum on a summed-volume table of the class over its box, and a run sums them in O(1).
// * Co-presence (foreground mode): per source class s, the share of its voxels whose centred patch holds class
//   c; the presence sum above already counts them per source, so it costs nothing more.
//
// Tasks (patch size x class, and one erosion per patch size) are handed out from a shared counter,
// largest first; each writes its own output slots, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastseg {
namespace imbalance {
namespace {

using Word = uint64_t;
constexpr int64_t kWordBits = 64;
constexpr int kDims = 3;  // 1D and 2D maps get leading axes of size 1 (patch 1)
constexpr int kStats = 5;  // random count, random presence, foreground count, foreground presence, coverage

int64_t clamp(int64_t v, int64_t lo, int64_t hi) { return std::min(std::max(v, lo), hi); }

// One axis of the sampler's geometry: voxel coordinates u, v of the unpadded case, positions lo (padded).
struct Axis {
  int64_t size = 1, patch = 1, pad = 0, last = 0, half = 0;

  Axis() = default;
  Axis(int64_t s, int64_t p) : size(s), patch(p) {
    const int64_t padded = std::max(s, p);
    pad = (padded - s) / 2;
    last = padded - p;
    half = p / 2;
  }
  int64_t positions() const { return last + 1; }
  // Position of the foreground patch centred on voxel v.
  int64_t start(int64_t v) const { return clamp(v + pad - half, 0, last); }
  // Positions whose window holds voxel u.
  int64_t first_holding(int64_t u) const { return std::max<int64_t>(0, u + pad - patch + 1); }
  int64_t last_holding(int64_t u) const { return std::min(last, u + pad); }
  int64_t coverage(int64_t u) const { return last_holding(u) - first_holding(u) + 1; }
  // Voxels v with start(v) in [l, h]: [vl, vh) (start is monotone; the clipped ends absorb the border).
  void sources(int64_t l, int64_t h, int64_t& vl, int64_t& vh) const {
    const int64_t shift = half - pad;
    vl = l > 0 ? clamp(l + shift, 0, size) : 0;
    vh = h < last ? clamp(h + shift + 1, 0, size) : size;
    vh = std::max(vh, vl);
  }
};

struct Run {
  int32_t x, y, z0, z1;  // voxels (x, y, [z0, z1)) of one label
};

struct ClassRuns {
  std::vector<Run> runs;  // sorted by (x, y, z)
  int64_t count = 0;
  int64_t lo[kDims] = {0, 0, 0}, hi[kDims] = {0, 0, 0};  // bounding box [lo, hi)
  int64_t longest = 0;  // longest run

  void finish() {
    count = 0;
    longest = 0;
    for (int a = 0; a < kDims; ++a) lo[a] = INT64_MAX, hi[a] = INT64_MIN;
    for (const Run& r : runs) {
      count += r.z1 - r.z0;
      longest = std::max<int64_t>(longest, r.z1 - r.z0);
      lo[0] = std::min<int64_t>(lo[0], r.x), hi[0] = std::max<int64_t>(hi[0], r.x + 1);
      lo[1] = std::min<int64_t>(lo[1], r.y), hi[1] = std::max<int64_t>(hi[1], r.y + 1);
      lo[2] = std::min<int64_t>(lo[2], r.z0), hi[2] = std::max<int64_t>(hi[2], r.z1);
    }
  }
  int64_t extent(int a) const { return hi[a] - lo[a]; }
  // Runs with x in [x0, x1).
  std::pair<const Run*, const Run*> rows(int64_t x0, int64_t x1) const {
    auto key = [](const Run& r, int64_t x) { return r.x < x; };
    const Run* b = std::lower_bound(runs.data(), runs.data() + runs.size(), x0, key);
    const Run* e = std::lower_bound(b, runs.data() + runs.size(), x1, key);
    return {b, e};
  }
};

// ------------------------------------------------------------------------------------ summed tables

// Pieces of a monotone index function e(u) along the last axis on which it is affine with slope d in {0, 1}.
struct Piece {
  int64_t p, q, d, e;  // u in [p, q), e(u) = e + d * (u - p)
};

std::vector<Piece> pieces_of(const std::vector<int64_t>& e) {
  std::vector<Piece> out;
  const int64_t n = static_cast<int64_t>(e.size());
  int64_t p = 0;
  while (p < n) {
    int64_t q = p + 1, d = 0;
    if (q < n && (e[q] - e[p] == 0 || e[q] - e[p] == 1)) {
      d = e[q] - e[p];
      while (q < n && e[q] - e[q - 1] == d) ++q;
    }
    out.push_back({p, q, d, e[p]});
    p = q;
  }
  return out;
}

// sum over u in [z0, z1) of T[e(u)], from a Q row (Q[k] = sum_{m<k} T[m]).
template <typename V>
V sum_over_pieces(const V* q, const std::vector<Piece>& pieces, int64_t z0, int64_t z1) {
  V s = 0;
  for (const Piece& pc : pieces) {
    const int64_t a = std::max(z0, pc.p), b = std::min(z1, pc.q);
    if (a >= b) continue;
    const int64_t e = pc.e + pc.d * (a - pc.p);
    s += pc.d ? q[e + (b - a)] - q[e] : static_cast<V>(b - a) * (q[e + 1] - q[e]);
  }
  return s;
}

// In place: values stored at [i + 1][j + 1][m + 1] of an (n0, n1, n2) table become Q, the summed-volume table
// T (T[i][j][m] = sum over [0, i) x [0, j) x [0, m)) summed once more along the last axis: Q[i][j][k] =
// sum_{m < k} T[i][j][m]. A run's sum of T over a slope-1 range of the last axis is then a Q difference.
template <typename V>
void integrate_table(V* q, int64_t n0, int64_t n1, int64_t n2) {
  at::parallel_for(1, n0, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = 1; j < n1; ++j) {
        V* row = q + (i * n1 + j) * n2;
        const V* prev = row - n2;
        for (int64_t k = 0; k < n2; ++k) row[k] += prev[k];
      }
    }
  });
  for (int64_t i = 1; i < n0; ++i) {
    V* plane = q + i * n1 * n2;
    const V* prev = plane - n1 * n2;
    for (int64_t k = 0; k < n1 * n2; ++k) plane[k] += prev[k];
  }
  // a shifted running sum along the last axis turns T into Q (Q[0] = 0)
  at::parallel_for(0, n0 * n1, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      V* row = q + r * n2;
      V t = 0, acc = 0;
      for (int64_t k = 0; k < n2; ++k) {
        const V w = row[k];
        row[k] = acc;
        t += w;
        acc += t;
      }
    }
  });
}

// A summed-volume table over a box [lo, lo + ext) of the case, in the Q form of integrate_table: painted run
// by run, integrated once, then read as box sums over [i0, i1) x [j0, j1) x [from(u), to(u)) summed over a
// run's voxels u (four corners in (x, y), piece sums along the last axis).
template <typename V>
struct SummedTable {
  int64_t lo[kDims] = {0, 0, 0}, ext[kDims] = {0, 0, 0};
  std::vector<V> Q;

  void reset(const int64_t* box_lo, const int64_t* box_ext) {
    for (int a = 0; a < kDims; ++a) lo[a] = box_lo[a], ext[a] = box_ext[a];
    Q.assign(static_cast<size_t>((ext[0] + 1) * (ext[1] + 1) * (ext[2] + 2)), V(0));
  }
  int64_t row_at(int64_t i, int64_t j) const { return (i * (ext[1] + 1) + j) * (ext[2] + 2); }
  void paint(const std::vector<Run>& runs, V value) {
    for (const Run& r : runs) {
      V* row = Q.data() + row_at(r.x - lo[0] + 1, r.y - lo[1] + 1) + 1 - lo[2];
      for (int64_t z = r.z0; z < r.z1; ++z) row[z] = value;
    }
  }
  void integrate() { integrate_table(Q.data(), ext[0] + 1, ext[1] + 1, ext[2] + 2); }
  V run_sum(int64_t i0, int64_t i1, int64_t j0, int64_t j1, const std::vector<Piece>& from,
            const std::vector<Piece>& to, int64_t z0, int64_t z1) const {
    const int64_t rows[4] = {row_at(i1, j1), row_at(i0, j1), row_at(i1, j0), row_at(i0, j0)};
    const V sign[4] = {V(1), V(-1), V(-1), V(1)};
    V total = 0;
    for (int k = 0; k < 4; ++k) {
      const V* q = Q.data() + rows[k];
      total += sign[k] * (sum_over_pieces(q, to, z0, z1) - sum_over_pieces(q, from, z0, z1));
    }
    return total;
  }
};

// The patch-size independent part of one case.
struct Case {
  int64_t shape[kDims];
  int64_t num_classes;              // C; code C stands for the ignore label
  std::vector<ClassRuns> codes;     // index 1..C (0 unused)
  ClassRuns nonbg;                  // runs of any nonzero label (classes and ignored voxels)
  std::vector<int64_t> foreground;  // classes 1..C-1 present
  std::vector<double> weight;       // per code: W = 1 / (K * N_code) for foreground classes, else 0
  SummedTable<double> weights;      // of W over the foreground's bounding box
};

template <typename T>
void scan_rows(const T* label, const int64_t* shape, int64_t C, bool has_ignore, int64_t ignore, int64_t x0,
               int64_t x1, std::vector<std::vector<Run>>& runs, std::vector<Run>& nonbg,
               std::atomic<bool>& bad, std::atomic<int64_t>& bad_value) {
  const int64_t S1 = shape[1], S2 = shape[2];
  for (int64_t x = x0; x < x1; ++x) {
    for (int64_t y = 0; y < S1; ++y) {
      const T* row = label + (x * S1 + y) * S2;
      int64_t z = 0;
      while (z < S2) {
        if (row[z] == 0) {
          ++z;
          continue;
        }
        const int64_t begin = z;
        while (z < S2 && row[z] != 0) {
          const T value = row[z];
          const int64_t from = z;
          while (z < S2 && row[z] == value) ++z;
          const int64_t v = static_cast<int64_t>(value);
          int64_t code;
          if (has_ignore && v == ignore) {
            code = C;
          } else if (v > 0 && v < C) {
            code = v;
          } else {
            bad_value.store(v);
            bad.store(true);
            continue;
          }
          runs[code].push_back(
              {static_cast<int32_t>(x), static_cast<int32_t>(y), static_cast<int32_t>(from), static_cast<int32_t>(z)});
        }
        nonbg.push_back(
            {static_cast<int32_t>(x), static_cast<int32_t>(y), static_cast<int32_t>(begin), static_cast<int32_t>(z)});
      }
    }
  }
}

void build_weight_table(Case& cs) {
  const int64_t K = static_cast<int64_t>(cs.foreground.size());
  for (const int64_t c : cs.foreground) cs.weight[c] = 1.0 / (static_cast<double>(K) * cs.codes[c].count);
  int64_t lo[kDims], ext[kDims];
  for (int a = 0; a < kDims; ++a) {
    int64_t l = INT64_MAX, h = INT64_MIN;
    for (const int64_t c : cs.foreground) l = std::min(l, cs.codes[c].lo[a]), h = std::max(h, cs.codes[c].hi[a]);
    lo[a] = l;
    ext[a] = h - l;
  }
  cs.weights.reset(lo, ext);
  for (const int64_t c : cs.foreground) cs.weights.paint(cs.codes[c].runs, cs.weight[c]);
  cs.weights.integrate();
}

template <typename T>
Case scan_case(const at::Tensor& label, int64_t C, bool has_ignore, int64_t ignore) {
  Case cs;
  const int nd = static_cast<int>(label.dim());
  for (int a = 0; a < kDims; ++a) cs.shape[a] = a < kDims - nd ? 1 : label.size(a - (kDims - nd));
  cs.num_classes = C;
  cs.codes.resize(static_cast<size_t>(C + 1));
  cs.weight.assign(static_cast<size_t>(C + 1), 0.0);
  const T* data = label.data_ptr<T>();
  // Fixed slabs of axis 0, concatenated in order: runs stay sorted whatever the thread count.
  const int64_t slabs = std::min<int64_t>(cs.shape[0], 256);
  std::vector<std::vector<std::vector<Run>>> runs(static_cast<size_t>(slabs),
                                                   std::vector<std::vector<Run>>(static_cast<size_t>(C + 1)));
  std::vector<std::vector<Run>> nonbg(static_cast<size_t>(slabs));
  std::atomic<bool> bad{false};
  std::atomic<int64_t> bad_value{0};
  at::parallel_for(0, slabs, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      scan_rows<T>(data, cs.shape, C, has_ignore, ignore, s * cs.shape[0] / slabs, (s + 1) * cs.shape[0] / slabs,
                   runs[s], nonbg[s], bad, bad_value);
    }
  });
  TORCH_CHECK_VALUE(!bad.load(), "fastseg::patch_stats: label values must lie in [0, num_classes=", C, ")",
                    has_ignore ? " or equal ignore_label" : "", ", got ", bad_value.load());
  for (int64_t s = 0; s < slabs; ++s) {
    for (int64_t c = 1; c <= C; ++c) cs.codes[c].runs.insert(cs.codes[c].runs.end(), runs[s][c].begin(), runs[s][c].end());
    cs.nonbg.runs.insert(cs.nonbg.runs.end(), nonbg[s].begin(), nonbg[s].end());
  }
  for (int64_t c = 1; c <= C; ++c) {
    cs.codes[c].finish();
    if (c < C && cs.codes[c].count > 0) cs.foreground.push_back(c);
  }
  cs.nonbg.finish();
  if (!cs.foreground.empty()) build_weight_table(cs);
  return cs;
}

// ----------------------------------------------------------------------------------------- bit rows

void set_bits(Word* row, int64_t a, int64_t b) {  // bits [a, b]
  for (int64_t w = a / kWordBits; w <= b / kWordBits; ++w) {
    const int64_t lo = std::max(a, w * kWordBits) - w * kWordBits;
    const int64_t hi = std::min(b, w * kWordBits + kWordBits - 1) - w * kWordBits;
    const Word ones = hi - lo == kWordBits - 1 ? ~Word(0) : ((Word(1) << (hi - lo + 1)) - 1);
    row[w] |= ones << lo;
  }
}

int64_t count_bits(const Word* row, int64_t a, int64_t b) {  // bits [a, b)
  if (b <= a) return 0;
  int64_t n = 0;
  const int64_t w0 = a / kWordBits, w1 = (b - 1) / kWordBits;
  for (int64_t w = w0; w <= w1; ++w) {
    Word m = row[w];
    if (w == w0) m &= ~Word(0) << (a - w0 * kWordBits);
    if (w == w1 && b - w1 * kWordBits < kWordBits) m &= (Word(1) << (b - w1 * kWordBits)) - 1;
    n += __builtin_popcountll(m);
  }
  return n;
}

bool bit(const Word* row, int64_t k) { return (row[k / kWordBits] >> (k % kWordBits)) & 1; }

template <bool kAnd>
inline void combine(Word* dst, const Word* a, const Word* b, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = kAnd ? (a[k] & b[k]) : (a[k] | b[k]);
}

// out[j] = OR (AND) of the elements in[s[j] .. e[j]) of a sequence of n elements of E words each. Every
// window is a prefix, a suffix, or has length P exactly: prefix / suffix reductions, and van Herk / Gil &
// Werman blocks of P elements (window [s, s + P) = suffix-in-block(s) op prefix-in-block(s + P - 1)).
template <bool kAnd>
void reduce_windows(const Word* in, int64_t n, int64_t E, int64_t P, const std::vector<int32_t>& s,
                    const std::vector<int32_t>& e, Word* out) {
  const int64_t R = static_cast<int64_t>(s.size());
  bool need_pre = false, need_suf = false, need_blocks = false;
  for (int64_t j = 0; j < R; ++j) {
    if (s[j] == 0) need_pre = true;
    else if (e[j] == n) need_suf = true;
    else need_blocks = true;
  }
  std::vector<Word> pre, suf, g, h;
  if (need_pre) {
    pre.resize(static_cast<size_t>(n * E));
    std::memcpy(pre.data(), in, sizeof(Word) * E);
    for (int64_t i = 1; i < n; ++i) combine<kAnd>(pre.data() + i * E, pre.data() + (i - 1) * E, in + i * E, E);
  }
  if (need_suf) {
    suf.resize(static_cast<size_t>(n * E));
    std::memcpy(suf.data() + (n - 1) * E, in + (n - 1) * E, sizeof(Word) * E);
    for (int64_t i = n - 2; i >= 0; --i) combine<kAnd>(suf.data() + i * E, suf.data() + (i + 1) * E, in + i * E, E);
  }
  if (need_blocks) {
    g.resize(static_cast<size_t>(n * E));
    h.resize(static_cast<size_t>(n * E));
    for (int64_t i = 0; i < n; ++i) {
      if (i % P == 0) std::memcpy(g.data() + i * E, in + i * E, sizeof(Word) * E);
      else combine<kAnd>(g.data() + i * E, g.data() + (i - 1) * E, in + i * E, E);
    }
    for (int64_t i = n - 1; i >= 0; --i) {
      if (i == n - 1 || (i + 1) % P == 0) std::memcpy(h.data() + i * E, in + i * E, sizeof(Word) * E);
      else combine<kAnd>(h.data() + i * E, h.data() + (i + 1) * E, in + i * E, E);
    }
  }
  for (int64_t j = 0; j < R; ++j) {
    Word* dst = out + j * E;
    if (s[j] == 0) {
      std::memcpy(dst, pre.data() + (e[j] - 1) * E, sizeof(Word) * E);
    } else if (e[j] == n) {
      std::memcpy(dst, suf.data() + s[j] * E, sizeof(Word) * E);
    } else {
      combine<kAnd>(dst, h.data() + s[j] * E, g.data() + (e[j] - 1) * E, E);
    }
  }
}

// Positions along one axis grouped into rows: positions [A, A + of.size()), row of[lo - A]; each row's
// window [s, e) on the source sequence and its number of positions.
struct Rows {
  int64_t A = 0;
  std::vector<int32_t> of, s, e;
  std::vector<int64_t> mult;

  int64_t size() const { return static_cast<int64_t>(s.size()); }
  int64_t row_of(int64_t lo) const {
    const int64_t k = lo - A;
    return k >= 0 && k < static_cast<int64_t>(of.size()) ? of[k] : -1;
  }
};

// Dilation rows: positions whose window meets the box [b, b + w), one row per run of equal clipped windows.
Rows dilation_rows(const Axis& ax, int64_t b, int64_t w) {
  Rows r;
  r.A = std::max<int64_t>(0, b + ax.pad - ax.patch + 1);
  const int64_t Z = std::min(ax.last, b + w - 1 + ax.pad);
  r.of.resize(static_cast<size_t>(Z - r.A + 1));
  for (int64_t lo = r.A; lo <= Z; ++lo) {
    const int64_t first = lo - ax.pad - b;
    const int32_t s = static_cast<int32_t>(clamp(first, 0, w)), e = static_cast<int32_t>(clamp(first + ax.patch, 0, w));
    if (r.s.empty() || s != r.s.back() || e != r.e.back()) {
      r.s.push_back(s);
      r.e.push_back(e);
      r.mult.push_back(0);
    }
    ++r.mult.back();
    r.of[lo - r.A] = static_cast<int32_t>(r.s.size() - 1);
  }
  return r;
}

// Erosion rows: positions whose window lies inside the box [b, b + w), one row each (empty if none).
Rows erosion_rows(const Axis& ax, int64_t b, int64_t w) {
  Rows r;
  r.A = std::max<int64_t>(0, b + ax.pad);
  const int64_t Z = std::min(ax.last, b + w + ax.pad - ax.patch);
  for (int64_t lo = r.A; lo <= Z; ++lo) {
    const int32_t s = static_cast<int32_t>(lo - ax.pad - b);
    r.of.push_back(static_cast<int32_t>(r.s.size()));
    r.s.push_back(s);
    r.e.push_back(static_cast<int32_t>(s + ax.patch));
    r.mult.push_back(1);
  }
  return r;
}

// Per position bits of a dilation (erosion): rows over axes 0 and 1, bits over the positions
// [A2, A2 + L2) of the last axis.
struct PositionBits {
  Rows r0, r1;
  int64_t A2 = 0, L2 = 0, W = 0;
  std::vector<Word> bits;  // (r0.size(), r1.size(), W)

  const Word* row(int64_t j0, int64_t j1) const { return bits.data() + (j0 * r1.size() + j1) * W; }

  // Weighted number of positions: sum over rows of (positions in the row) * popcount.
  int64_t positions_set() const {
    int64_t total = 0;
    for (int64_t j0 = 0; j0 < r0.size(); ++j0) {
      int64_t plane = 0;
      for (int64_t j1 = 0; j1 < r1.size(); ++j1) plane += r1.mult[j1] * count_bits(row(j0, j1), 0, L2);
      total += r0.mult[j0] * plane;
    }
    return total;
  }

  // Number of voxels z in [z0, z1) (of a column whose start lands in row (j0, j1)) whose start(z) bit is set.
  int64_t hits(const Word* row, const Axis& ax, int64_t z0, int64_t z1) const {
    auto at = [&](int64_t p) -> int64_t { return p >= A2 && p < A2 + L2 && bit(row, p - A2); };
    if (ax.last == 0) return (z1 - z0) * at(0);
    const int64_t off = ax.pad - ax.half;
    const int64_t m0 = std::max(z0, 1 - off), m1 = std::min(z1, ax.last - off);
    int64_t n = std::max<int64_t>(0, std::min(z1, 1 - off) - z0) * at(0) +
                std::max<int64_t>(0, z1 - std::max(z0, ax.last - off)) * at(ax.last);
    if (m1 > m0) n += count_bits(row, clamp(m0 + off - A2, 0, L2), clamp(m1 + off - A2, 0, L2));
    return n;
  }
};

// sum over the source classes of W * (their voxels whose centred patch lands on a set bit); per source class s,
// the share of its voxels that do goes to given[s] (the probability given a patch drawn for s), if given.
double foreground_hits(const Case& cs, const Axis* ax, const PositionBits& pb, int64_t self, double* given) {
  double total = 0.0;
  int64_t vl0, vh0, vl1, vh1;
  ax[0].sources(pb.r0.A, pb.r0.A + static_cast<int64_t>(pb.r0.of.size()) - 1, vl0, vh0);
  ax[1].sources(pb.r1.A, pb.r1.A + static_cast<int64_t>(pb.r1.of.size()) - 1, vl1, vh1);
  for (const int64_t s : cs.foreground) {
    const ClassRuns& src = cs.codes[s];
    if (s == self) {  // a patch centred on a voxel always contains it
      total += cs.weight[s] * static_cast<double>(src.count);
      if (given) given[s] = 1.0;
      continue;
    }
    if (src.hi[0] <= vl0 || src.lo[0] >= vh0 || src.hi[1] <= vl1 || src.lo[1] >= vh1) continue;
    int64_t n = 0;
    const auto range = src.rows(vl0, vh0);
    for (const Run* r = range.first; r != range.second; ++r) {
      if (r->y < vl1 || r->y >= vh1) continue;
      const int64_t j0 = pb.r0.row_of(ax[0].start(r->x)), j1 = pb.r1.row_of(ax[1].start(r->y));
      n += pb.hits(pb.row(j0, j1), ax[2], r->z0, r->z1);
    }
    total += cs.weight[s] * static_cast<double>(n);
    if (given) given[s] = static_cast<double>(n) / static_cast<double>(src.count);
  }
  return total;
}

// Reduce the per-column position bits cols (w0 x w1 columns of pb.W words) over the patch windows of
// pb.r1 along axis 1, then of pb.r0 along axis 0, into pb.bits (OR for dilation, AND for erosion).
template <bool And>
void reduce_leading_axes(const std::vector<Word>& cols, int64_t w0, int64_t w1, const Axis* ax, PositionBits& pb) {
  const int64_t W = pb.W, R0 = pb.r0.size(), R1 = pb.r1.size();
  std::vector<Word> mid(static_cast<size_t>(w0 * R1 * W));
  for (int64_t x = 0; x < w0; ++x) {
    reduce_windows<And>(cols.data() + x * w1 * W, w1, W, ax[1].patch, pb.r1.s, pb.r1.e, mid.data() + x * R1 * W);
  }
  pb.bits.resize(static_cast<size_t>(R0 * R1 * W));
  reduce_windows<And>(mid.data(), w0, R1 * W, ax[0].patch, pb.r0.s, pb.r0.e, pb.bits.data());
}

// Class `cls` OR-dilated by the patch.
PositionBits dilate(const ClassRuns& cls, const Axis* ax) {
  PositionBits pb;
  const int64_t b0 = cls.lo[0], b1 = cls.lo[1], b2 = cls.lo[2];
  const int64_t w0 = cls.extent(0), w1 = cls.extent(1), w2 = cls.extent(2);
  pb.r0 = dilation_rows(ax[0], b0, w0);
  pb.r1 = dilation_rows(ax[1], b1, w1);
  const Rows r2 = dilation_rows(ax[2], b2, w2);
  pb.A2 = r2.A;
  pb.L2 = static_cast<int64_t>(r2.of.size());
  pb.W = (pb.L2 + kWordBits - 1) / kWordBits;
  const int64_t W = pb.W;
  std::vector<Word> cols(static_cast<size_t>(w0 * w1 * W), 0);
  for (const Run& r : cls.runs) {
    const int64_t p0 = std::max(ax[2].first_holding(r.z0), pb.A2), p1 = ax[2].last_holding(r.z1 - 1);
    set_bits(cols.data() + ((r.x - b0) * w1 + (r.y - b1)) * W, p0 - pb.A2, p1 - pb.A2);
  }
  reduce_leading_axes<false>(cols, w0, w1, ax, pb);
  return pb;
}

// The non-background voxels AND-eroded by the patch: positions whose patch holds no background voxel.
// Returns false when there are none.
bool erode(const Case& cs, const Axis* ax, PositionBits& pb) {
  const ClassRuns& nb = cs.nonbg;
  if (nb.count == 0 || nb.longest < ax[2].patch) return false;
  const int64_t b0 = nb.lo[0], b1 = nb.lo[1], b2 = nb.lo[2];
  const int64_t w0 = nb.extent(0), w1 = nb.extent(1), w2 = nb.extent(2);
  pb.r0 = erosion_rows(ax[0], b0, w0);
  pb.r1 = erosion_rows(ax[1], b1, w1);
  const Rows r2 = erosion_rows(ax[2], b2, w2);
  if (pb.r0.size() == 0 || pb.r1.size() == 0 || r2.size() == 0) return false;
  pb.A2 = r2.A;
  pb.L2 = r2.size();
  pb.W = (pb.L2 + kWordBits - 1) / kWordBits;
  const int64_t W = pb.W;
  std::vector<Word> cols(static_cast<size_t>(w0 * w1 * W), 0);
  bool any = false;
  for (const Run& r : nb.runs) {
    // positions whose window [lo - pad, lo - pad + P) lies inside the run
    const int64_t p0 = std::max<int64_t>(r.z0 + ax[2].pad, pb.A2);
    const int64_t p1 = std::min<int64_t>(r.z1 + ax[2].pad - ax[2].patch, pb.A2 + pb.L2 - 1);
    if (p1 < p0) continue;
    set_bits(cols.data() + ((r.x - b0) * w1 + (r.y - b1)) * W, p0 - pb.A2, p1 - pb.A2);
    any = true;
  }
  if (!any) return false;
  reduce_leading_axes<true>(cols, w0, w1, ax, pb);
  return true;
}

// ------------------------------------------------------------------------------------ expected counts

// Patch-size dependent tables of one case shared by its tasks.
struct PatchPlan {
  Axis ax[kDims];
  std::vector<int64_t> cover0, cover1, cover2_prefix;  // coverage per voxel; prefix sums along the last axis
  // Foreground box indices [lo, hi) of the voxels whose patch contains u, per axis
  std::vector<int64_t> lo0, hi0, lo1, hi1;
  std::vector<Piece> lo2, hi2;

  PatchPlan(const Case& cs, const int64_t* patch) {
    for (int a = 0; a < kDims; ++a) ax[a] = Axis(cs.shape[a], patch[a]);
    auto covers = [&](int a) {
      std::vector<int64_t> c(static_cast<size_t>(cs.shape[a]));
      for (int64_t u = 0; u < cs.shape[a]; ++u) c[u] = ax[a].coverage(u);
      return c;
    };
    cover0 = covers(0);
    cover1 = covers(1);
    cover2_prefix.assign(static_cast<size_t>(cs.shape[2] + 1), 0);
    for (int64_t u = 0; u < cs.shape[2]; ++u) cover2_prefix[u + 1] = cover2_prefix[u] + ax[2].coverage(u);
    if (cs.foreground.empty()) return;
    auto bounds = [&](int a, std::vector<int64_t>& lo, std::vector<int64_t>& hi) {
      lo.resize(static_cast<size_t>(cs.shape[a]));
      hi.resize(static_cast<size_t>(cs.shape[a]));
      for (int64_t u = 0; u < cs.shape[a]; ++u) {
        int64_t vl, vh;
        ax[a].sources(ax[a].first_holding(u), ax[a].last_holding(u), vl, vh);
        lo[u] = clamp(vl - cs.weights.lo[a], 0, cs.weights.ext[a]);
        hi[u] = clamp(vh - cs.weights.lo[a], 0, cs.weights.ext[a]);
      }
    };
    bounds(0, lo0, hi0);
    bounds(1, lo1, hi1);
    std::vector<int64_t> l2, h2;
    bounds(2, l2, h2);
    lo2 = pieces_of(l2);
    hi2 = pieces_of(h2);
  }
};

// Expected voxel counts of one class in a random and in a foreground patch.
void expected_counts(const Case& cs, const PatchPlan& plan, const ClassRuns& cls, double& random, double& fg) {
  int64_t cover = 0;  // exact: at most prod over axes of (positions * patch)
  for (const Run& r : cls.runs) {
    cover += plan.cover0[r.x] * plan.cover1[r.y] * (plan.cover2_prefix[r.z1] - plan.cover2_prefix[r.z0]);
  }
  const int64_t positions = plan.ax[0].positions() * plan.ax[1].positions() * plan.ax[2].positions();
  random = static_cast<double>(cover) / static_cast<double>(positions);
  if (cs.foreground.empty()) {
    fg = random;
    return;
  }
  double total = 0.0;
  for (const Run& r : cls.runs) {
    const int64_t i0 = plan.lo0[r.x], i1 = plan.hi0[r.x], j0 = plan.lo1[r.y], j1 = plan.hi1[r.y];
    if (i0 >= i1 || j0 >= j1) continue;
    total += cs.weights.run_sum(i0, i1, j0, j1, plan.lo2, plan.hi2, r.z0, r.z1);
  }
  fg = total;
}

// ------------------------------------------------------------------------------------- organ coverage

// Coverage of a class c with N voxels: (1 / N^2) * sum over its voxels v of |c ∩ patch(v)|, patch(v) the
// foreground patch centred on v. On a summed-volume table of c's mask over its box, |c ∩ patch(v)| is a box
// sum: the patch's extent along axes 0 and 1 is fixed within a run, and its bounds along the last axis are
// monotone in v with slope 0 or 1 (SummedTable::run_sum). One table per class serves every patch size; all
// sums are integers (int64, exact).
SummedTable<int64_t> coverage_table(const ClassRuns& cls) {
  SummedTable<int64_t> t;
  const int64_t ext[kDims] = {cls.extent(0), cls.extent(1), cls.extent(2)};
  t.reset(cls.lo, ext);
  t.paint(cls.runs, 1);
  t.integrate();
  return t;
}

// The patch's extent in the class box along axis a, [lo, hi) per voxel v of the case (clipped to the box).
void patch_bounds(const Axis& ax, int64_t box_lo, int64_t box_ext, std::vector<int64_t>& lo, std::vector<int64_t>& hi) {
  lo.resize(static_cast<size_t>(ax.size));
  hi.resize(static_cast<size_t>(ax.size));
  for (int64_t v = 0; v < ax.size; ++v) {
    const int64_t first = ax.start(v) - ax.pad - box_lo;  // the window in unpadded coordinates, from the box
    lo[v] = clamp(first, 0, box_ext);
    hi[v] = clamp(first + ax.patch, 0, box_ext);
  }
}

double organ_coverage(const ClassRuns& cls, const SummedTable<int64_t>& t, const Axis* ax) {
  std::vector<int64_t> lo0, hi0, lo1, hi1, lo2, hi2;
  patch_bounds(ax[0], t.lo[0], t.ext[0], lo0, hi0);
  patch_bounds(ax[1], t.lo[1], t.ext[1], lo1, hi1);
  patch_bounds(ax[2], t.lo[2], t.ext[2], lo2, hi2);
  const std::vector<Piece> from = pieces_of(lo2), to = pieces_of(hi2);
  int64_t total = 0;
  for (const Run& r : cls.runs) {
    total += t.run_sum(lo0[r.x], hi0[r.x], lo1[r.y], hi1[r.y], from, to, r.z0, r.z1);
  }
  const double n = static_cast<double>(cls.count);
  return static_cast<double>(total) / (n * n);
}

// ------------------------------------------------------------------------------------------ the op

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_stats_cpu(const at::Tensor& label_in,
                                                               at::IntArrayRef patch_sizes, int64_t num_classes,
                                                               std::optional<int64_t> ignore_label) {
  const char* op = "fastseg::patch_stats";
  TORCH_CHECK_VALUE(label_in.dim() >= 1 && label_in.dim() <= kDims, op,
                    ": label must have 1 to 3 spatial axes, got shape ", label_in.sizes());
  TORCH_CHECK_VALUE(label_in.numel() > 0, op, ": label must not be empty, got shape ", label_in.sizes());
  TORCH_CHECK_VALUE(num_classes >= 1, op, ": num_classes must be >= 1, got ", num_classes);
  const int64_t nd = label_in.dim();
  TORCH_CHECK_VALUE(!patch_sizes.empty() && static_cast<int64_t>(patch_sizes.size()) % nd == 0, op,
                    ": patch_sizes must hold K * ", nd, " positive integers (K patch sizes), got ", patch_sizes);
  for (const int64_t p : patch_sizes) TORCH_CHECK_VALUE(p >= 1, op, ": patch sizes must be >= 1, got ", patch_sizes);
  for (int64_t a = 0; a < nd; ++a) {
    TORCH_CHECK_VALUE(label_in.size(a) < INT32_MAX, op, ": spatial size ", label_in.size(a), " is too large");
  }
  TORCH_CHECK_VALUE(!ignore_label.has_value() || *ignore_label != 0, op, ": ignore_label must not be 0 (the background)");
  const at::Tensor label = label_in.contiguous();
  const int64_t C = num_classes;
  const bool has_ignore = ignore_label.has_value();
  const int64_t ignore = has_ignore ? *ignore_label : 0;
  Case cs;
  switch (label.scalar_type()) {
    case at::kBool: cs = scan_case<bool>(label, C, has_ignore, ignore); break;
    case at::kByte: cs = scan_case<uint8_t>(label, C, has_ignore, ignore); break;
    case at::kChar: cs = scan_case<int8_t>(label, C, has_ignore, ignore); break;
    case at::kShort: cs = scan_case<int16_t>(label, C, has_ignore, ignore); break;
    case at::kInt: cs = scan_case<int32_t>(label, C, has_ignore, ignore); break;
    case at::kLong: cs = scan_case<int64_t>(label, C, has_ignore, ignore); break;
    default: TORCH_CHECK_VALUE(false, op, ": label must hold integers (bool, uint8, int8, int16, int32, int64), got ",
                               label.scalar_type());
  }

  const int64_t K = static_cast<int64_t>(patch_sizes.size()) / nd;
  std::vector<PatchPlan> plans;
  plans.reserve(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) {
    int64_t patch[kDims];
    for (int a = 0; a < kDims; ++a) patch[a] = a < kDims - nd ? 1 : patch_sizes[k * nd + a - (kDims - nd)];
    plans.emplace_back(cs, patch);
  }
  // per (patch, code): [random count, random presence, fg count, fg presence, coverage]; per patch: inside
  // (random, fg)
  std::vector<double> per_code(static_cast<size_t>(K * (C + 1) * kStats), 0.0);
  std::vector<double> inside(static_cast<size_t>(K * 2), 0.0);
  // per (patch, code, source class s): the probability that a foreground patch drawn for s holds the code
  // (code 0: lies wholly inside the non-background voxels)
  const int64_t C1 = C + 1;
  std::vector<double> given(static_cast<size_t>(K * C1 * C1), 0.0);
  struct Task {
    int64_t k, code, cost;  // code 0: the background erosion; k = -1: the code's coverage at every patch size
  };
  std::vector<Task> tasks;
  for (int64_t k = 0; k < K; ++k) {
    tasks.push_back({k, 0, cs.nonbg.count});
    for (int64_t c = 1; c <= C; ++c) {
      if (cs.codes[c].count > 0) tasks.push_back({k, c, cs.codes[c].count});
    }
  }
  for (const int64_t c : cs.foreground) tasks.push_back({-1, c, cs.codes[c].count});
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  auto run = [&](const Task& t) {
    if (t.k < 0) {
      const SummedTable<int64_t> table = coverage_table(cs.codes[t.code]);
      for (int64_t k = 0; k < K; ++k) {
        per_code[(k * (C + 1) + t.code) * kStats + 4] = organ_coverage(cs.codes[t.code], table, plans[k].ax);
      }
      return;
    }
    const PatchPlan& plan = plans[t.k];
    const double positions =
        static_cast<double>(plan.ax[0].positions() * plan.ax[1].positions() * plan.ax[2].positions());
    if (t.code == 0) {
      PositionBits pb;
      if (!erode(cs, plan.ax, pb)) return;
      inside[t.k * 2] = static_cast<double>(pb.positions_set()) / positions;
      inside[t.k * 2 + 1] = cs.foreground.empty() ? inside[t.k * 2]
                                                  : foreground_hits(cs, plan.ax, pb, -1, &given[t.k * C1 * C1]);
      return;
    }
    const ClassRuns& cls = cs.codes[t.code];
    double* out = per_code.data() + (t.k * (C + 1) + t.code) * kStats;
    expected_counts(cs, plan, cls, out[0], out[2]);
    if (t.code == C) return;  // the ignore label: counts only (they are not background)
    const PositionBits pb = dilate(cls, plan.ax);
    out[1] = static_cast<double>(pb.positions_set()) / positions;
    out[3] = cs.foreground.empty() ? out[1]
                                   : foreground_hits(cs, plan.ax, pb, t.code, &given[(t.k * C1 + t.code) * C1]);
  };
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n_tasks; i = next.fetch_add(1)) run(tasks[i]);
  });

  at::Tensor stats = at::zeros({K, kStats, C}, label.options().dtype(at::kDouble));
  at::Tensor counts = at::zeros({C}, label.options().dtype(at::kLong));
  double* st = stats.data_ptr<double>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t c = 1; c < C; ++c) cnt[c] = cs.codes[c].count;
  int64_t bg = label.numel();
  for (int64_t c = 1; c <= C; ++c) bg -= cs.codes[c].count;
  cnt[0] = bg;
  for (int64_t k = 0; k < K; ++k) {
    double volume = 1.0, random_sum = 0.0, fg_sum = 0.0;
    for (int a = 0; a < kDims; ++a) volume *= static_cast<double>(plans[k].ax[a].patch);
    for (int64_t c = 1; c <= C; ++c) {
      const double* v = per_code.data() + (k * (C + 1) + c) * kStats;
      random_sum += v[0];
      fg_sum += v[2];
      if (c < C) {
        for (int s = 0; s < kStats; ++s) st[(k * kStats + s) * C + c] = v[s];
      }
    }
    // the background is what the classes and the ignored voxels leave of the patch
    st[(k * kStats + 0) * C] = volume - random_sum;
    st[(k * kStats + 1) * C] = 1.0 - inside[k * 2];
    st[(k * kStats + 2) * C] = cs.foreground.empty() ? volume - random_sum : volume - fg_sum;
    st[(k * kStats + 3) * C] = 1.0 - (cs.foreground.empty() ? inside[k * 2] : inside[k * 2 + 1]);
  }
  at::Tensor joint = at::zeros({K, C, C}, label.options().dtype(at::kDouble));
  double* jt = joint.data_ptr<double>();
  for (int64_t k = 0; k < K; ++k) {
    for (const int64_t src : cs.foreground) {
      double* row = jt + (k * C + src) * C;
      row[0] = 1.0 - given[k * C1 * C1 + src];
      for (int64_t c = 1; c < C; ++c) row[c] = given[(k * C1 + c) * C1 + src];
    }
  }
  return {stats, counts, joint};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) { m.impl("patch_stats", &patch_stats_cpu); }

}  // namespace imbalance
}  // namespace fastseg
