// Fused Dice + cross-entropy statistics: the per-voxel maths shared by the CPU and CUDA kernels, and the
// torch-free interface of the CUDA launchers.
//
// For each (sample b, class c) one pass over the logits x produces five sums over the voxels v whose
// mask m_v is 1 (m_v = 0 where the label equals ignore_index):
//   0  I = sum p g            1  P = sum p   (p^2 with squared_pred)      2  G = sum g   (g^2 likewise)
//   softmax:  3  A = sum g (-log p_c)        4  U = sum (-log p_c)
//   sigmoid:  3  A = sum g (-log s_c)        4  U = sum (1 - g) (-log (1 - s_c))
// where p is the softmax over classes, s the per-class sigmoid and g the target (one-hot of the label, or
// the given mask). Every loss (Dice, class-adaptive Dice, weighted / label-smoothed CE, BCE with
// pos_weight) is a function of these sums, assembled on (B, C) tensors in Python. The backward receives
// d loss / d stats and recomputes the activation, writing d loss / d x in one pass:
//   Dice:   dL/dp_c = m (gI_c g_c + gP_c * (squared ? 2 p_c : 1)) =: a_c
//   softmax CE: with h_c = m (gA_c g_c + gU_c),  sum_c h_c (-log p_c) has d/dx_k = p_k H - h_k, H = sum h
//   softmax: dx_k = p_k (a_k - sum_c p_c a_c + H) - h_k
//   sigmoid: dx_c = a_c s (1 - s) + m (gA_c g_c (s - 1) + gU_c (1 - g_c) s)
#pragma once

#include <cstdint>

#include "../common/fast_math.h"
#include "../common/labels.h"

namespace fastseg {
namespace dice_ce {

constexpr int kNumStats = 5;
enum Stat : int { kI = 0, kP = 1, kG = 2, kA = 3, kU = 4 };
enum Activation : int64_t { kSoftmax = 0, kSigmoid = 1 };

// Element strides of a (B, C, N) view; the spatial dims are collapsed into N by the caller.
struct Strides {
  int64_t b, c, n;
};

struct Problem {
  int64_t B, C, N;
  bool squared;
  bool has_ignore;
  int64_t ignore_index;
};

using ::fastseg::decode_label;

template <typename T>
FASTSEG_HD T pred_term(T p, bool squared) {
  return squared ? p * p : p;
}

// One voxel's contribution to the five sums of one class (returned by value so that loops summing them
// vectorise as reductions).
template <typename T>
struct Terms {
  T I, P, G, A, U;
};

// Softmax: p = probability, nlp = -log p.
template <typename T>
FASTSEG_HD Terms<T> softmax_terms(T p, T nlp, T g, T m, bool squared) {
  return {p * g * m, pred_term(p, squared) * m, pred_term(g, squared) * m, g * nlp * m, nlp * m};
}

// Stable sigmoid pieces: s = sigmoid(x), nls = -log s, nl1s = -log(1 - s).
template <typename T>
struct Sigmoid {
  T s, nls, nl1s;
};

template <typename T>
FASTSEG_HD Sigmoid<T> sigmoid_of(T x) {
  const T ax = x < T(0) ? -x : x;
  const T e = exp_nonpos(-ax);
  const T l = log_ge1(T(1) + e);
  const T inv = T(1) / (T(1) + e);
  return {x >= T(0) ? inv : e * inv, l + max_(-x, T(0)), l + max_(x, T(0))};
}

template <typename T>
FASTSEG_HD Terms<T> sigmoid_terms(const Sigmoid<T>& sg, T g, T m, bool squared) {
  return {sg.s * g * m, pred_term(sg.s, squared) * m, pred_term(g, squared) * m, g * sg.nls * m,
          (T(1) - g) * sg.nl1s * m};
}

// d loss / d p from the Dice sums.
template <typename T>
FASTSEG_HD T dice_dp(T p, T g, T m, T gI, T gP, bool squared) {
  return m * (gI * g + gP * (squared ? T(2) * p : T(1)));
}

// Weight of -log p_c in the softmax CE part.
template <typename T>
FASTSEG_HD T softmax_ce_h(T g, T m, T gA, T gU) {
  return m * (gA * g + gU);
}

// dx_k = p_k (a_k - sum_c p_c a_c + H) - h_k
template <typename T>
FASTSEG_HD T softmax_grad(T p, T a, T h, T pa_sum, T h_sum) {
  return p * (a - pa_sum + h_sum) - h;
}

template <typename T>
FASTSEG_HD T sigmoid_grad(T s, T g, T m, T gI, T gP, T gA, T gU, bool squared) {
  return dice_dp(s, g, m, gI, gP, squared) * s * (T(1) - s) +
         m * (gA * g * (s - T(1)) + gU * (T(1) - g) * s);
}

}  // namespace dice_ce
}  // namespace fastseg
