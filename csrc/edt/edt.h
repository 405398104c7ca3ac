// Exact Euclidean distance transform: the per-line maths shared by the CPU kernel (edt_cpu.cpp) and the CUDA
// kernels (edt_kernels.cu). Torch-free, so plain nvcc compiles it.
//
// Separable exact EDT (Meijster, Roerdink & Hesselink, "A general algorithm for computing distance transforms
// in linear time", 2000; Felzenszwalb & Huttenlocher, "Distance Transforms of Sampled Functions", Theory of
// Computing 8, 2012): a binary 1D scan along axis 0 gives each voxel its distance to the nearest zero of its
// axis-0 line; then for each further axis k one pass over every line along k replaces f by
//     f'(p) = min_q  s_k^2 (p - q)^2 + f(q),
// the lower envelope of the parabolas rooted at the voxels q of the line (F&H's algorithm, O(n) per line).
//
// Exactness. scipy.ndimage.distance_transform_edt computes a feature transform (the nearest zero z of every
// voxel p) and then, in float64, d = sqrt(sum_k fl(fl((z_k - p_k) s_k)^2)) summed in axis order. So instead
// of carrying squared distances between passes we carry the integer offsets |z_k - p_k| of the axes already
// processed, packed into one word per voxel (axis 0 in the low half, axis 1 in the high half), and the last
// pass evaluates exactly scipy's expression from the offsets of the winner. The envelope itself is built in
// double from those offsets; its selection can only differ from scipy's feature on exact or near ties
// (|difference| ~ 1e-16 relative), which leave the float32-rounded distance unchanged. With integer spacing
// every quantity below is an integer < 2^53, so the selection is exact too.
//
// Sparse masks. A voxel whose carried offsets are all 0 (f = 0, a zero voxel or one whose nearest zero lies
// on its own line of an earlier axis) is its own minimiser. The line is therefore cut into runs of f > 0
// voxels bounded by f = 0 voxels, and the envelope of a run [l, r] only needs the parabolas of [l-1, r+1]:
// any q < l-1 is beaten by q = l-1 (f = 0, closer). Work is proportional to the foreground, not the volume.
//
// "No feature" (a line of an earlier axis with no zero at all) is carried as the offset kInf and is no
// candidate. If the image holds one zero, every voxel's last-pass line has a candidate, so kInf never reaches
// the output; images without any zero take scipy's convention instead (all_ones_distance below).
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/fast_math.h"

namespace fastseg {
namespace edt {

constexpr int kMaxDims = 3;

// A (B, *spatial) problem with 1 to 3 spatial dims, contiguous; dims[k] = 1 beyond ndim.
struct Geometry {
  int64_t B = 0;
  int ndim = 0;
  int64_t dims[kMaxDims] = {1, 1, 1};
  int64_t N = 0;  // voxels per batch element
};

// uint32 words (16-bit offsets) for axes shorter than kInf = 65535 voxels: the word buffer is then the float32 output
// itself, overwritten in place by the last pass. uint64 words (32-bit offsets) otherwise, in a separate buffer.
template <typename Word>
struct Packing;

template <>
struct Packing<uint32_t> {
  static constexpr int kShift = 16;
  static constexpr uint32_t kInf = 0xFFFFu;
};

template <>
struct Packing<uint64_t> {
  static constexpr int kShift = 32;
  static constexpr uint64_t kInf = 0xFFFFFFFFull;
};

// 16-bit offsets (uint32 words, stored in the output) when every offset and the "no feature" value fit.
inline bool fits_uint32_words(const Geometry& g) {
  for (int k = 0; k < g.ndim; ++k) {
    if (g.dims[k] >= static_cast<int64_t>(Packing<uint32_t>::kInf)) return false;
  }
  return true;
}

template <typename Word>
FASTSEG_HD Word low_offset(Word w) {
  return w & Packing<Word>::kInf;
}

template <typename Word>
FASTSEG_HD Word high_offset(Word w) {
  return w >> Packing<Word>::kShift;
}

template <typename Word>
FASTSEG_HD bool is_inf(Word w) {
  return low_offset(w) == Packing<Word>::kInf;
}

// Rounded double product and sum that the compiler may not fuse into an FMA: scipy rounds each of them, and a
// fused a * b + c would differ in the last bit. Host builds get FMA only with -march flags or on aarch64; the
// empty asm forces the product to be materialised there.
FASTSEG_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  double r = a * b;
#if defined(__GNUC__) && defined(__x86_64__)
  __asm__("" : "+x"(r));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(r));
#endif
  return r;
#endif
}

FASTSEG_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// fl(fl(offset * s)^2): one axis' term of scipy's float64 squared distance (scipy multiplies by 1.0 when no
// sampling is given, which is exact, so spacing 1 reproduces that case too).
FASTSEG_HD double axis_term(double offset, double s) {
  const double x = mul_rn(offset, s);
  return mul_rn(x, x);
}

FASTSEG_HD float distance_from_sq(double sq) {
#if defined(__CUDA_ARCH__)
  return __double2float_rn(__dsqrt_rn(sq));
#else
  return static_cast<float>(std::sqrt(sq));
#endif
}

// scipy's result when the image has no zero voxel: its feature transform leaves the features at
// (-1, 0, 0) (the initial value), so d^2 = ((i0 + 1) s0)^2 + (i1 s1)^2 + (i2 s2)^2.
FASTSEG_HD float all_ones_distance(int ndim, const int64_t* idx, const double* s) {
  double sq = axis_term(static_cast<double>(idx[0] + 1), s[0]);
  for (int k = 1; k < ndim; ++k) sq = add_rn(sq, axis_term(static_cast<double>(idx[k]), s[k]));
  return distance_from_sq(sq);
}

// Squared distance carried by a word whose `carried` (1 or 2) lower axes are packed, in scipy's sum order.
template <typename Word>
FASTSEG_HD double carried_sq(Word w, int carried, const double* s) {
  double sq = axis_term(static_cast<double>(low_offset(w)), s[0]);
  if (carried == 2) sq = add_rn(sq, axis_term(static_cast<double>(high_offset(w)), s[1]));
  return sq;
}

// Writes a distance of the last pass: into the word buffer itself for uint32 words (it is the float32 output),
// into the separate output otherwise. The bit copy keeps every access to the buffer of one type.
template <typename Word>
FASTSEG_HD void store_distance(Word* words, float* out, int64_t i, float v) {
  if constexpr (sizeof(Word) == sizeof(float)) {
    words[i] = float_to_bits(v);
  } else {
    out[i] = v;
  }
}

// The envelope's stack: parabola j has its apex at local coordinate x[j] (voxel lo + x[j] of the line), height
// term h[j] = f + w x^2 and the packed offsets word[j] of its voxel. Entry j lives at index j * stride, so
// the stacks of the threads of a CUDA launch interleave and their accesses coalesce.
template <typename Word>
struct Stack {
  int32_t* x;
  double* h;
  Word* word;
  int64_t stride;
};

// One pass along a line of n voxels. For every voxel p with f(p) > 0 whose line holds a finite word, calls
// emit(p, q, word_q, p - q) with q the voxel minimising w (p - q)^2 + f(q), f(q) = sq(word_q); for every
// voxel with f(p) = 0 (word 0, its own minimiser at distance 0) calls zero(p); voxels whose line holds no
// finite word are left alone. load(i) reads the word of voxel i. emit may overwrite voxel p in place: a run
// [l, r] reads [l-1, r+1] before writing [l, r], and later runs start reading at r+1.
//
// The intersection of parabolas u < t, (h_t - h_u) / (2 w (x_t - x_u)), is compared by cross-multiplication
// (all denominators are positive), so the pass needs no division; heights use coordinates local to the run
// to keep the products small (exact integers with integer spacing).
template <typename Word, typename Load, typename Sq, typename Emit, typename Zero>
FASTSEG_HD void envelope_line(int64_t n, double w, const Load& load, const Sq& sq, const Stack<Word>& st,
                              const Emit& emit, const Zero& zero) {
  const int64_t S = st.stride;
  int64_t p = 0;
  while (p < n) {
    if (load(p) == 0) {
      zero(p);
      ++p;
      continue;
    }
    int64_t r = p;
    while (r + 1 < n && load(r + 1) != 0) ++r;
    const int64_t lo = p > 0 ? p - 1 : p;
    const int64_t hi = r + 1 < n ? r + 1 : r;
    int64_t k = -1;  // top of the stack
    for (int64_t q = lo; q <= hi; ++q) {
      const Word wq = load(q);
      if (is_inf(wq)) continue;
      const double xq = static_cast<double>(q - lo);
      const double hq = sq(wq) + w * xq * xq;
      // F&H: drop the top parabola while the new one overtakes it before the top overtook the one below.
      while (k >= 1) {
        const double xt = st.x[k * S], ht = st.h[k * S];
        const double xu = st.x[(k - 1) * S], hu = st.h[(k - 1) * S];
        if ((hq - ht) * (xt - xu) <= (ht - hu) * (xq - xt)) {
          --k;
        } else {
          break;
        }
      }
      ++k;
      st.x[k * S] = static_cast<int32_t>(q - lo);
      st.h[k * S] = hq;
      st.word[k * S] = wq;
    }
    if (k >= 0) {
      int64_t j = 0;
      double xj = st.x[0], hj = st.h[0];
      for (int64_t o = p; o <= r; ++o) {
        const double xo = static_cast<double>(o - lo);
        // Parabola j+1 is below j at xo iff h_{j+1} - h_j < 2 w xo (x_{j+1} - x_j).
        while (j < k) {
          const double xn = st.x[(j + 1) * S], hn = st.h[(j + 1) * S];
          if (hn - hj < 2.0 * w * xo * (xn - xj)) {
            ++j;
            xj = xn;
            hj = hn;
          } else {
            break;
          }
        }
        const int64_t q = lo + static_cast<int64_t>(xj);
        emit(o, q, st.word[j * S], o - q);
      }
    }
    p = r + 1;
  }
}

}  // namespace edt
}  // namespace fastseg
