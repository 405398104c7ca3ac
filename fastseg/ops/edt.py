"""fastseg::edt: schema in csrc/fastseg.cpp, kernels in csrc/edt/, fake kernel here.

The op has no autograd formula: its only tensor input is an integer mask, so its output never requires grad
(torch.library.opcheck skips the autograd-registration test for such ops).
"""
from __future__ import annotations

from typing import Sequence

import torch

from fastseg import _extension, _reference


def _use_op(mask: torch.Tensor) -> bool:
    if not _extension.available():
        return False
    return mask.device.type == "cpu" or (mask.is_cuda and _extension.cuda_available())


def edt(mask: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """(B, *spatial) float32 exact Euclidean distance of every nonzero voxel to the nearest zero voxel.

    mask is (B, *spatial) uint8 or bool with 1 to 3 spatial dims; spacing holds one value per spatial axis or
    B rows of them (flattened). Runs the compiled kernel, or fastseg._reference without it (or for a device it
    was not built for).
    """
    if _use_op(mask):
        return torch.ops.fastseg.edt(mask, list(spacing))
    return _reference.distance_transform_edt(mask, spacing)


if _extension.available():

    @torch.library.register_fake("fastseg::edt")
    def _edt_fake(mask, spacing):
        torch._check(
            2 <= mask.dim() <= 4,
            lambda: f"fastseg::edt: mask must be (B, *spatial) with 1 to 3 spatial dims, got {tuple(mask.shape)}",
        )
        torch._check(
            mask.dtype in (torch.uint8, torch.bool),
            lambda: f"fastseg::edt: mask must be uint8 or bool, got {mask.dtype}",
        )
        nd = mask.dim() - 1
        torch._check(
            len(spacing) == nd or len(spacing) == mask.shape[0] * nd,
            lambda: f"fastseg::edt: spacing must hold {nd} or B * {nd} values, got {len(spacing)}",
        )
        return mask.new_empty(mask.shape, dtype=torch.float32)
