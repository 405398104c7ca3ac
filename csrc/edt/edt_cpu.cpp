// CPU kernel of the exact Euclidean distance transform: separable passes of Meijster et al. (2000) and
// Felzenszwalb & Huttenlocher (2012), "Distance Transforms of Sampled Functions" (per-line maths, exactness
// argument and run splitting in edt.h).
//
// Memory order. The mask is (B, n0, n1, n2) contiguous, n2 innermost. Axis 0 is the binary scan, done for a
// block of kScanColumns neighbouring columns at a time by sweeping whole rows forwards and back, so every
// access is contiguous and the block (n0 x kScanColumns words) stays in L2. Both envelope passes then work
// inside one (n1, n2) plane of one (b, i0): axis 1 on columns gathered kGatherColumns at a time into a
// transposed scratch (one cache line per row read), then axis 2 on the contiguous rows, while the plane is
// still in L2. Planes are spread over threads with at::parallel_for (within one plane when there are fewer
// planes than threads). With axes below 65535 voxels the 32-bit offset words live in the float32 output,
// which the last pass overwrites in place: no workspace beyond per-thread line scratch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "edt.h"
#include "edt_checks.h"

namespace fastseg {
namespace edt {
namespace {

constexpr int64_t kScanColumns = 1024;
constexpr int64_t kGatherColumns = 16;

template <typename Word>
struct Scratch {
  std::vector<int32_t> x;
  std::vector<double> h;
  std::vector<Word> word;
  std::vector<Word> cols;

  Scratch(int64_t line, int64_t cols_words)
      : x(static_cast<size_t>(line)), h(static_cast<size_t>(line)), word(static_cast<size_t>(line)),
        cols(static_cast<size_t>(cols_words)) {}

  Stack<Word> stack() { return Stack<Word>{x.data(), h.data(), word.data(), 1}; }
};

// Offset to the nearest zero of each axis-0 line, for the columns [j0, j1) of one batch element (n0, R).
template <typename Word>
void scan_axis0(const uint8_t* m, Word* wd, int64_t n0, int64_t R, int64_t j0, int64_t j1) {
  constexpr Word kInf = Packing<Word>::kInf;
  for (int64_t j = j0; j < j1; ++j) wd[j] = m[j] ? kInf : Word(0);
  for (int64_t i = 1; i < n0; ++i) {
    const uint8_t* mi = m + i * R;
    const Word* prev = wd + (i - 1) * R;
    Word* cur = wd + i * R;
    for (int64_t j = j0; j < j1; ++j) {
      const Word a = prev[j] + 1;  // kInf + 1 still fits in Word
      cur[j] = mi[j] ? (a < kInf ? a : kInf) : Word(0);
    }
  }
  for (int64_t i = n0 - 2; i >= 0; --i) {
    const Word* next = wd + (i + 1) * R;
    Word* cur = wd + i * R;
    for (int64_t j = j0; j < j1; ++j) {
      const Word a = next[j] + 1;
      cur[j] = a < cur[j] ? a : cur[j];
    }
  }
}

// Axis-1 pass over the column chunks [c0, c1) of one (n1, n2) plane: offsets (o0) -> (o0, o1).
template <typename Word>
void column_pass(Word* plane, int64_t n1, int64_t n2, int64_t c0, int64_t c1, const double* s,
                 Scratch<Word>& sc) {
  const double w = s[1] * s[1];
  const auto sq = [s](Word x) { return carried_sq(x, 1, s); };
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t w0 = c * kGatherColumns;
    const int64_t g = std::min(kGatherColumns, n2 - w0);
    Word* cols = sc.cols.data();
    bool any = false;
    for (int64_t r = 0; r < n1; ++r) {
      const Word* src = plane + r * n2 + w0;
      for (int64_t t = 0; t < g; ++t) {
        cols[t * n1 + r] = src[t];
        any |= src[t] != 0;
      }
    }
    if (!any) continue;  // all zero: already (0, 0)
    for (int64_t t = 0; t < g; ++t) {
      Word* col = cols + t * n1;
      envelope_line<Word>(
          n1, w, [col](int64_t i) { return col[i]; }, sq, sc.stack(),
          [col](int64_t p, int64_t, Word wq, int64_t d) {
            col[p] = low_offset(wq) | (static_cast<Word>(d < 0 ? -d : d) << Packing<Word>::kShift);
          },
          [](int64_t) {});  // already (0, 0)
    }
    for (int64_t r = 0; r < n1; ++r) {
      Word* dst = plane + r * n2 + w0;
      for (int64_t t = 0; t < g; ++t) dst[t] = cols[t * n1 + r];
    }
  }
}

// Last pass along the innermost axis of `n` voxels starting at flat index `base`; `carried` lower axes are
// packed in the words.
template <typename Word>
void final_line(Word* words, float* out, int64_t base, int64_t n, int carried, const double* s,
                Scratch<Word>& sc) {
  const double sl = s[carried];
  Word* row = words + base;
  float* orow = out + base;
  const auto sq = [s, carried](Word x) { return carried_sq(x, carried, s); };
  envelope_line<Word>(
      n, sl * sl, [row](int64_t i) { return row[i]; }, sq, sc.stack(),
      [=](int64_t p, int64_t, Word wq, int64_t d) {
        const double v = add_rn(carried_sq(wq, carried, s), axis_term(static_cast<double>(d < 0 ? -d : d), sl));
        store_distance(row, orow, p, distance_from_sq(v));
      },
      [=](int64_t p) {
        // A uint32 word 0 already reads as 0.0f; skipping the store keeps the cache line clean.
        if constexpr (sizeof(Word) != sizeof(float)) orow[p] = 0.0f;
      });
}

template <typename Word>
void run(const uint8_t* mask, Word* words, float* out, const Geometry& g, const std::vector<double>& spacing,
         const std::vector<char>& has_zero) {
  const int64_t n0 = g.dims[0], R = g.N / n0;
  const int nd = g.ndim;

  const int64_t scan_chunks = (R + kScanColumns - 1) / kScanColumns;
  at::parallel_for(0, g.B * scan_chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / scan_chunks, c = t % scan_chunks;
      if (!has_zero[b]) continue;
      scan_axis0(mask + b * g.N, words + b * g.N, n0, R, c * kScanColumns, std::min(R, (c + 1) * kScanColumns));
    }
  });

  if (nd == 1) {
    at::parallel_for(0, g.B * g.N, 1 << 14, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / g.N;
        if (!has_zero[b]) continue;
        store_distance(words, out, i, distance_from_sq(carried_sq(words[i], 1, &spacing[b * nd])));
      }
    });
  } else if (nd == 2) {
    const int64_t n1 = g.dims[1];
    at::parallel_for(0, g.B * n0, std::max<int64_t>(1, 4096 / n1), [&](int64_t r0, int64_t r1) {
      Scratch<Word> sc(n1, 0);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / n0;
        if (has_zero[b]) final_line(words, out, r * n1, n1, 1, &spacing[b * nd], sc);
      }
    });
  } else {
    const int64_t n1 = g.dims[1], n2 = g.dims[2], plane = n1 * n2;
    const int64_t chunks = (n2 + kGatherColumns - 1) / kGatherColumns;
    const int64_t line = std::max(n1, n2), cols = kGatherColumns * n1;
    const int64_t planes = g.B * n0;
    if (planes >= at::get_num_threads()) {
      at::parallel_for(0, planes, 1, [&](int64_t p0, int64_t p1) {
        Scratch<Word> sc(line, cols);
        for (int64_t pl = p0; pl < p1; ++pl) {
          const int64_t b = pl / n0;
          if (!has_zero[b]) continue;
          const double* s = &spacing[b * nd];
          column_pass(words + pl * plane, n1, n2, 0, chunks, s, sc);
          for (int64_t r = 0; r < n1; ++r) final_line(words, out, pl * plane + r * n2, n2, 2, s, sc);
        }
      });
    } else {
      for (int64_t pl = 0; pl < planes; ++pl) {
        const int64_t b = pl / n0;
        if (!has_zero[b]) continue;
        const double* s = &spacing[b * nd];
        at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
          Scratch<Word> sc(line, cols);
          column_pass(words + pl * plane, n1, n2, c0, c1, s, sc);
        });
        at::parallel_for(0, n1, std::max<int64_t>(1, 4096 / n2), [&](int64_t r0, int64_t r1) {
          Scratch<Word> sc(line, 0);
          for (int64_t r = r0; r < r1; ++r) final_line(words, out, pl * plane + r * n2, n2, 2, s, sc);
        });
      }
    }
  }

  for (int64_t b = 0; b < g.B; ++b) {
    if (has_zero[b]) continue;
    const double* s = &spacing[b * nd];
    at::parallel_for(0, g.N, 1 << 14, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        int64_t idx[kMaxDims] = {}, rest = i;  // initialised: gcc cannot see nd >= 1
        for (int k = nd - 1; k >= 0; --k) {
          idx[k] = rest % g.dims[k];
          rest /= g.dims[k];
        }
        out[b * g.N + i] = all_ones_distance(nd, idx, s);
      }
    });
  }
}

at::Tensor edt_cpu(const at::Tensor& mask_in, at::ArrayRef<double> spacing) {
  constexpr const char* op = "fastseg::edt";
  check_inputs(op, mask_in, spacing);
  TORCH_CHECK_VALUE(mask_in.device().is_cpu(), op, ": expected a CPU mask, got ", mask_in.device());
  const at::Tensor mask = as_readable_mask(mask_in).contiguous();
  at::Tensor out = at::empty(mask.sizes(), mask.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const Geometry g = geometry_of(mask);
  const std::vector<double> sp = spacing_per_batch(spacing, g);
  const uint8_t* m = mask.const_data_ptr<uint8_t>();
  float* o = out.mutable_data_ptr<float>();

  std::vector<char> has_zero(static_cast<size_t>(g.B));
  at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) has_zero[b] = std::memchr(m + b * g.N, 0, g.N) != nullptr;
  });

  if (fits_uint32_words(g)) {
    run<uint32_t>(m, reinterpret_cast<uint32_t*>(o), o, g, sp, has_zero);
  } else {
    at::Tensor ws = at::empty({g.B * g.N}, mask.options().dtype(at::kLong));
    run<uint64_t>(m, reinterpret_cast<uint64_t*>(ws.mutable_data_ptr<int64_t>()), o, g, sp, has_zero);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("edt", &edt_cpu);
}

}  // namespace edt
}  // namespace fastseg
