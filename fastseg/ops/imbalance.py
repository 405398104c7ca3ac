"""fastseg::patch_stats: schema in csrc/fastseg.cpp, CPU kernel in csrc/imbalance/, fake kernel here.

The op has no CUDA kernel on purpose: it reads a data set's label maps, which live in host memory, and
its work is run-structured scans and bit operations that finish a 512 x 512 x 160 map in well under a
second on one core; a CUDA tensor is analysed on the host.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from fastseg import _extension, _reference

# [random count, random presence, foreground count, foreground presence, coverage]
NUM_STATS = 5


def _as_label_tensor(label) -> torch.Tensor:
    """A CPU tensor of a dtype the kernel reads; unsigned types wider than 8 bits are widened (exactly)."""
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu()
        if label.dtype not in (torch.uint16, torch.uint32, torch.uint64):
            return label
        label = label.numpy()
    label = np.asarray(label)
    if label.dtype == np.uint16:
        label = label.astype(np.int32)
    elif label.dtype == np.uint32:
        label = label.astype(np.int64)
    elif label.dtype == np.uint64:
        if label.size and int(label.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"fastseg::patch_stats: label values must lie below 2**63, got {int(label.max())}")
        label = label.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(label))


def _flat(patch_sizes: Sequence[Sequence[int]]) -> list:
    return [int(p) for size in patch_sizes for p in size]


def patch_stats(label, patch_sizes: Sequence[Sequence[int]], num_classes: int,
                ignore_label: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact patch-sampling statistics of one label map: ((K, 5, C) float64, (C,) int64 voxel counts,
    (K, C, C) float64 co-presence).

    label: (*spatial) integer labels (numpy array or tensor), 1 to 3 axes; patch_sizes: K sizes of one
    int per axis. The five statistics per class are the expected voxel count in a random patch, the
    probability that a random patch holds the class, the same two under foreground patches (the sampler of
    fastseg.data.sampling), and the class's coverage: the mean share of it inside a foreground patch centred
    on one of its voxels (0 for the background and absent classes). Co-presence [k, s, c]: the probability
    that a foreground patch drawn for class s holds class c (the contract is in csrc/fastseg.cpp).
    Runs the compiled kernel, or
    fastseg._reference without it.
    """
    if not _extension.available():
        return reference_patch_stats(label, patch_sizes, num_classes, ignore_label)
    return torch.ops.fastseg.patch_stats(_as_label_tensor(label), _flat(patch_sizes), num_classes, ignore_label)


def reference_patch_stats(label, patch_sizes: Sequence[Sequence[int]], num_classes: int,
                          ignore_label: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`patch_stats` on fastseg._reference whether or not the kernel is loaded (tests, benchmarks)."""
    return _reference.patch_stats(_as_label_tensor(label), _flat(patch_sizes), num_classes, ignore_label)


if _extension.available():

    @torch.library.register_fake("fastseg::patch_stats")
    def _patch_stats_fake(label, patch_sizes, num_classes, ignore_label):
        op = "fastseg::patch_stats"
        torch._check(1 <= label.dim() <= 3, lambda: f"{op}: label must have 1 to 3 axes, got {tuple(label.shape)}")
        torch._check(len(patch_sizes) > 0 and len(patch_sizes) % label.dim() == 0,
                     lambda: f"{op}: patch_sizes must hold K * {label.dim()} integers, got {patch_sizes}")
        K = len(patch_sizes) // label.dim()
        return (label.new_empty((K, NUM_STATS, num_classes), dtype=torch.float64),
                label.new_empty((num_classes,), dtype=torch.int64),
                label.new_empty((K, num_classes, num_classes), dtype=torch.float64))
