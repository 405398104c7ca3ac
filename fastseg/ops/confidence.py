"""fastseg::calibration_stats: schema in csrc/fastseg.cpp, kernels in csrc/confidence/, fake kernel here.

The outputs are counts and sums of probabilities used as statistics (reliability diagrams, calibration
errors), not a training objective: the op is non-differentiable. Its autograd registration marks the outputs
so, which keeps them from requiring grad when probs does (and lets torch.library.opcheck see an autograd
kernel); no gradient ever flows back to probs.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastseg import _extension, _reference

NUM_BIN_STATS = 3  # [count, sum of probabilities, sum of hits]
NUM_CONFUSION_STATS = 6  # [TP, sum p on TP, FP, sum p on FP, FN, sum p on FN]
MAX_BINS = 1 << 24  # csrc/confidence/confidence.h kMaxBins


def _use_op(probs: torch.Tensor) -> bool:
    if not _extension.available():
        return False
    return probs.device.type == "cpu" or (probs.is_cuda and _extension.cuda_available())


def calibration_stats(
    probs: torch.Tensor, target: torch.Tensor, num_bins: int, ignore_index: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class-wise bins (C, num_bins, 3), top-label bins (num_bins, 3), confusion sums (C, 6)), float64.

    probs (B, C, *spatial) float16/bfloat16/float32/float64, target (B, *spatial) integer labels (bool,
    uint8, int8, int16, int32, int64); see csrc/confidence/confidence.h for the definitions. Runs the
    compiled kernel, or fastseg._reference without it (or for a device it was not built for).
    """
    if _use_op(probs):
        if probs.is_cuda and not torch.compiler.is_compiling():
            # The CUDA kernel cannot raise; a sync here keeps bad labels from being silently ignored.
            _reference.check_labels(target, probs.shape[1], ignore_index, "fastseg.calibration_stats")
        cls, top, conf = torch.ops.fastseg.calibration_stats(probs, target, num_bins, ignore_index)
        return cls, top, conf
    return _reference.calibration_stats(probs, target, num_bins, ignore_index)


def _check_shapes(probs, target, num_bins):
    op = "fastseg::calibration_stats"
    torch._check(probs.dim() >= 2, lambda: f"{op}: probs must be (B, C, *spatial), got {tuple(probs.shape)}")
    torch._check(probs.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                 lambda: f"{op}: probs must be float16, bfloat16, float32 or float64, got {probs.dtype}")
    torch._check(1 <= num_bins <= MAX_BINS, lambda: f"{op}: num_bins must be in [1, {MAX_BINS}], got {num_bins}")
    torch._check(not target.dtype.is_floating_point and not target.is_complex(),
                 lambda: f"{op}: target must hold integer class labels, got {target.dtype}")
    expected = (probs.shape[0], *probs.shape[2:])
    torch._check(target.dim() == len(expected),
                 lambda: f"{op}: target must be (B, *spatial) = {expected}, got {tuple(target.shape)}")
    for got, want in zip(target.shape, expected):
        torch._check(got == want, lambda: f"{op}: target must be (B, *spatial) = {expected}, got {tuple(target.shape)}")


if _extension.available():

    @torch.library.register_fake("fastseg::calibration_stats")
    def _calibration_stats_fake(probs, target, num_bins, ignore_index):
        _check_shapes(probs, target, num_bins)
        C = probs.shape[1]
        return [
            probs.new_empty((C, num_bins, NUM_BIN_STATS), dtype=torch.float64),
            probs.new_empty((num_bins, NUM_BIN_STATS), dtype=torch.float64),
            probs.new_empty((C, NUM_CONFUSION_STATS), dtype=torch.float64),
        ]

    def _setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output)

    def _backward(ctx, *grads):
        return None, None, None, None

    torch.library.register_autograd("fastseg::calibration_stats", _backward, setup_context=_setup_context)
