// The fastseg operator library: every schema in one place, so the op surface is reviewable at a glance.
// Kernels register per device in csrc/<family>/*_cpu.cpp and *_cuda.cpp; fake kernels and autograd are
// registered from Python (fastseg/ops/).
#include <Python.h>
#include <torch/library.h>

#ifndef FASTSEG_TORCH_VERSION
#define FASTSEG_TORCH_VERSION "unknown"
#endif

extern "C" {
// `import fastseg._C` loads this shared library, which runs the TORCH_LIBRARY registrations below. The
// module only carries the build configuration, read by fastseg/_extension.py to refuse a stale build.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&def);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "torch_version", FASTSEG_TORCH_VERSION);
#ifdef FASTSEG_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
}

TORCH_LIBRARY(fastseg, m) {
  // Per-(sample, class) sums [I, P, G, A, U] of the fused Dice + CE (csrc/dice_ce/dice_ce.h).
  // logits (B, C, N) any strides; target (B, N) integer labels or (B, C, N) mask; activation 0 softmax,
  // 1 sigmoid. Returns (B, C, 5) float32 (float64 for float64 logits).
  m.def("dice_ce_stats(Tensor logits, Tensor target, int activation, int? ignore_index, bool squared_pred) -> Tensor");
  m.def(
      "dice_ce_stats_backward(Tensor grad_stats, Tensor logits, Tensor target, int activation, int? ignore_index, "
      "bool squared_pred) -> Tensor");
  // Exact Euclidean distance transform (csrc/edt/edt.h), scipy.ndimage.distance_transform_edt semantics:
  // mask (B, *spatial) uint8 or bool with 1 to 3 spatial dims, nonzero = foreground; spacing holds one value
  // per spatial axis, or B rows of them (row-major). Returns (B, *spatial) float32: the distance of every
  // nonzero voxel to the nearest zero voxel of its batch element (0 at zeros).
  m.def("edt(Tensor mask, float[] spacing) -> Tensor");
  // Calibration statistics of softmax probabilities (csrc/confidence/confidence.h), one pass over the voxels:
  // probs (B, C, *spatial) float16/bfloat16/float32/float64, any strides; target (B, *spatial) integer labels;
  // voxels labelled ignore_index count nowhere. Returns three float64 tensors: class-wise reliability bins
  // (C, num_bins, 3) [count, sum p_c, sum 1[target == c]], top-label bins (num_bins, 3) [count, sum max p,
  // sum 1[argmax == target]] and per-class confusion sums (C, 6) [TP, sum p_c on TP, FP, sum p_c on FP, FN,
  // sum p_c on FN]. Non-differentiable (fastseg/ops/confidence.py marks the outputs so).
  m.def("calibration_stats(Tensor probs, Tensor target, int num_bins, int? ignore_index) -> Tensor[]");
  // Exact patch-sampling statistics of one label map (csrc/imbalance/imbalance_cpu.cpp; the sampler of
  // fastseg.data.sampling): label (*spatial) integer labels, 1 to 3 axes; patch_sizes holds K patch sizes of
  // one value per axis, flattened; voxels equal to ignore_label count for no class. Returns (K, 5, C)
  // float64 [expected voxel count in a random patch, probability that a random patch holds the class, the
  // same two under foreground patches, coverage: the mean over the class's voxels v of the share of the
  // class inside the foreground patch centred on v (0 for the background and absent classes)] per class
  // (the background's counts are what the classes and ignored voxels leave), (C,) int64 voxel counts
  // of the classes, and (K, C, C) float64 co-presence: [k, s, c] the probability that a foreground patch drawn
  // for class s holds class c (rows of the background and absent classes 0). Non-differentiable; CPU only (the
  // input is a data set's label maps in host memory).
  m.def("patch_stats(Tensor label, int[] patch_sizes, int num_classes, int? ignore_label) -> (Tensor, Tensor, Tensor)");
}
