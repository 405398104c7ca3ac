"""Exact Euclidean distance transform with the semantics of scipy.ndimage.distance_transform_edt."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from fastseg.metrics._spacing import spacing_rows
from fastseg.ops import edt as _edt_op

__all__ = ["distance_transform_edt"]

Array = Union[torch.Tensor, np.ndarray]
Spacing = Union[None, float, Sequence[float], torch.Tensor, np.ndarray]

_NAME = "fastseg.distance_transform_edt"


def distance_transform_edt(
    mask: Array,
    spacing: Spacing = None,
    *,
    batched: Optional[bool] = None,
    sampling: Spacing = None,
) -> Array:
    r"""Exact Euclidean distance of every nonzero voxel to the nearest zero voxel (0 at zero voxels).

    Same result as ``scipy.ndimage.distance_transform_edt(mask, sampling=spacing)`` rounded to float32, bit
    for bit, computed by separable lower envelopes of parabolas (Felzenszwalb & Huttenlocher 2012) in the
    compiled CPU / CUDA kernels, or by a pure-PyTorch fallback without them:

    .. math:: d(p) = \min_{z:\ \mathrm{mask}(z) = 0} \sqrt{\textstyle\sum_k ((p_k - z_k)\, s_k)^2}

    Args:
        mask: torch tensor (CPU or CUDA) or numpy array, bool or integer, nonzero = foreground. Unbatched
            ``(*spatial)`` or batched ``(B, *spatial)``, with 1 to 3 spatial dims (see ``batched``).
        spacing: voxel size along each spatial axis, in array order (scipy's ``sampling``): None (all 1), one
            float for every axis, a sequence of one value per spatial axis, or, for batched input, a
            ``(B, ndim)`` tensor / array with one row per sample (a CUDA tensor is read on the host: one sync).
        batched: whether axis 0 is a batch axis. None (default) decides by ``mask.ndim``: 1, 2 and 3 are an
            unbatched 1D, 2D and 3D image, 4 is a batch of 3D images. Pass True for a batch of 1D or 2D
            images ``(B, N)`` / ``(B, H, W)``, False to refuse 4D input.
        sampling: alias of ``spacing``, so calls written for scipy work unchanged.

    Returns:
        float32 distances of ``mask``'s shape: a tensor on ``mask``'s device, or a numpy array for numpy
        input (scipy returns float64). Not differentiable (the input is a mask).

    A sample without any zero voxel follows scipy's convention exactly: scipy's feature transform then keeps
    its initial feature (-1, 0, 0), so the result is ``sqrt(((i0 + 1) s0)^2 + (i1 s1)^2 + (i2 s2)^2)`` at
    voxel (i0, i1, i2), a distance to a virtual zero just before the first slice, not infinity.

    Example:
        >>> m = torch.ones(5, dtype=torch.bool)
        >>> m[0] = False
        >>> distance_transform_edt(m, spacing=0.5)
        tensor([0.0000, 0.5000, 1.0000, 1.5000, 2.0000])
    """
    if sampling is not None:
        if spacing is not None:
            raise ValueError(f"{_NAME}: pass spacing or its alias sampling, not both (got {spacing!r} and {sampling!r})")
        spacing = sampling
    if batched is not None and not isinstance(batched, bool):
        raise ValueError(f"{_NAME}: batched must be True, False or None, got {batched!r}")
    is_numpy = isinstance(mask, np.ndarray)
    if not is_numpy and not isinstance(mask, torch.Tensor):
        raise TypeError(f"{_NAME}: mask must be a torch.Tensor or a numpy.ndarray, got {type(mask).__name__}")

    ndim = mask.ndim
    if batched is None:
        if ndim not in (1, 2, 3, 4):
            raise ValueError(
                f"{_NAME}: mask must be (*spatial) with 1 to 3 spatial dims or a batch (B, D, H, W), got ndim "
                f"{ndim} (shape {tuple(mask.shape)})"
            )
        batched = ndim == 4
    elif batched and ndim not in (2, 3, 4):
        raise ValueError(
            f"{_NAME}: with batched=True, mask must be (B, *spatial) with 1 to 3 spatial dims, got ndim {ndim} "
            f"(shape {tuple(mask.shape)})"
        )
    elif not batched and ndim not in (1, 2, 3):
        raise ValueError(
            f"{_NAME}: with batched=False, mask must be (*spatial) with 1 to 3 spatial dims, got ndim {ndim} "
            f"(shape {tuple(mask.shape)})"
        )
    m = _as_uint8_tensor(mask)
    if not batched:
        m = m.unsqueeze(0)
    nd = m.dim() - 1
    rows = spacing_rows(_NAME, spacing, m.shape[0], nd, per_sample=batched)
    # the op takes nd values, or one row per sample
    values = rows[0] if all(r == rows[0] for r in rows) else [v for r in rows for v in r]

    out = _edt_op.edt(m, values)
    if not batched:
        out = out.squeeze(0)
    return out.numpy() if is_numpy else out


def _as_uint8_tensor(mask: Array) -> torch.Tensor:
    """The mask as a bool / uint8 tensor (integer masks: nonzero test); refuses floating and complex masks."""
    if isinstance(mask, np.ndarray):
        if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(
                f"{_NAME}: mask must be bool or integer (nonzero = foreground), got numpy {mask.dtype}; "
                "threshold it first, e.g. mask > 0.5"
            )
        arr = mask if mask.dtype in (np.bool_, np.uint8) else mask != 0
        if not (arr.flags.c_contiguous and arr.flags.writeable):
            arr = np.ascontiguousarray(arr).copy()
        return torch.from_numpy(arr)
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(
            f"{_NAME}: mask must be bool or integer (nonzero = foreground), got {mask.dtype}; "
            "threshold it first, e.g. mask > 0.5"
        )
    return mask if mask.dtype in (torch.bool, torch.uint8) else mask != 0
