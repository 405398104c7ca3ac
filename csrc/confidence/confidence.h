// Calibration statistics of softmax probabilities against integer labels (fastseg::calibration_stats): the
// per-voxel maths shared by the CPU and CUDA kernels. Torch-free, so plain nvcc compiles it.
//
// One pass over the voxels of probs (B, C, N) and labels (B, N). A voxel whose label equals ignore_index
// counts nowhere. For every other voxel, with p_c its probabilities clamped to [0, 1] (NaN read as 0),
// y its label and a = argmax_c p_c (the lowest index on ties, as torch.argmax):
//
//   class-wise bins  (C, K, 3): for every class c, in bin k(p_c):  [count, sum p_c, sum 1[y == c]]
//   top-label bins   (K, 3):    in bin k(p_a):                     [count, sum p_a, sum 1[a == y]]
//   confusion        (C, 6):    a == y:  class a  [TP count, sum p_a]
//                               a != y:  class a  [FP count, sum p_a],  class y  [FN count, sum p_y]
//
// These are the sufficient statistics of reliability diagrams and of the expected / maximum calibration
// error in their class-wise (Kull et al., "Beyond temperature scaling", NeurIPS 2019) and top-label (Guo et
// al., "On calibration of modern neural networks", ICML 2017) forms; fastseg/confidence.py derives them.
//
// Bins are K equal-width intervals: bin k holds k/K <= p < (k+1)/K, and p = 1 falls in bin K - 1. The bin is
// floor(p * K) with the product taken in double: for float32, float16 and bfloat16 inputs (24 mantissa bits
// at most) and K < 2^29 that product is exact, so a probability on or next to an edge lands in the bin the
// exact comparison gives, on every device. For float64 inputs the product is rounded once (as the
// pure-PyTorch reference rounds it).
#pragma once

#include <cstdint>

#include "../common/fast_math.h"
#include "../common/labels.h"

namespace fastseg {
namespace confidence {

constexpr int kBinStats = 3;
enum BinStat : int { kCount = 0, kSum = 1, kHits = 2 };
constexpr int kConfusionStats = 6;
enum ConfusionStat : int { kTP = 0, kTPSum = 1, kFP = 2, kFPSum = 3, kFN = 4, kFNSum = 5 };

// floor(p * K) must fit an int32 and stay exact in double (see above).
constexpr int64_t kMaxBins = int64_t{1} << 24;

// Element strides of a (B, C, N) view (the spatial dims collapsed into N by the caller); labels use b and n.
struct Strides {
  int64_t b, c, n;
};

struct Problem {
  int64_t B, C, N;
  int64_t K;  // num_bins
  bool has_ignore;
  int64_t ignore_index;
};

// Number of doubles of each output, and where each starts in one flat (classwise, top, confusion) array.
FASTSEG_HD int64_t classwise_size(const Problem& pb) {
  return pb.C * pb.K * kBinStats;
}
FASTSEG_HD int64_t top_size(const Problem& pb) {
  return pb.K * kBinStats;
}
FASTSEG_HD int64_t confusion_size(const Problem& pb) {
  return pb.C * kConfusionStats;
}
FASTSEG_HD int64_t total_size(const Problem& pb) {
  return classwise_size(pb) + top_size(pb) + confusion_size(pb);
}

using ::fastseg::decode_label;

// [0, 1], NaN -> 0 (every comparison with NaN is false), +inf -> 1, -inf -> 0.
template <typename T>
FASTSEG_HD T clamp_prob(T p) {
  return p > T(0) ? (p < T(1) ? p : T(1)) : T(0);
}

// Bin of a clamped probability. int32 (not int64) so that gcc vectorises the conversion.
template <typename T>
FASTSEG_HD int32_t bin_of(T p, int32_t K) {
  const int32_t k = static_cast<int32_t>(static_cast<double>(p) * static_cast<double>(K));
  return k < K ? k : K - 1;
}

// Running argmax over classes visited in increasing order: a later class wins only when strictly larger, so
// ties go to the lowest index. Start from best = -1 (below every clamped probability) and arg = 0.
template <typename T>
FASTSEG_HD void argmax_step(T p, int32_t c, T& best, int32_t& arg) {
  const bool larger = p > best;
  best = larger ? p : best;
  arg = larger ? c : arg;
}

// Offset in the (C, 6) confusion sums of the [count, sum] pair a voxel with prediction a and label y adds
// p_a to: TP of a when they agree, FP of a otherwise (the FN pair of y is y * 6 + kFN).
FASTSEG_HD int64_t predicted_slot(int32_t a, int32_t y) {
  return int64_t{a} * kConfusionStats + (a == y ? kTP : kFP);
}

FASTSEG_HD int64_t missed_slot(int32_t y) {
  return int64_t{y} * kConfusionStats + kFN;
}

}  // namespace confidence
}  // namespace fastseg
