"""The one parser of ``spacing`` for the distance transform and the surface metrics (scipy's ``sampling``)."""
from __future__ import annotations

import math
import numbers
from typing import List

import numpy as np
import torch


def spacing_rows(where: str, spacing, batch: int, ndim: int, *, per_sample: bool = True) -> List[List[float]]:
    """One list of ``ndim`` floats per sample, all finite and > 0.

    ``spacing``: None (all 1), a number, ``ndim`` numbers (array order), or with ``per_sample`` a
    (batch, ndim) array of one row per sample; torch tensors and numpy arrays are accepted too.
    """
    expected = f"None, a number or {ndim} numbers (one per spatial axis, in array order)"
    if per_sample:
        expected += f", or a (B, {ndim}) = ({batch}, {ndim}) array with one row per sample"

    def fail(what: str) -> None:
        raise ValueError(f"{where}: spacing must be {what}, got {spacing!r}")

    if spacing is None:
        return [[1.0] * ndim for _ in range(batch)]
    if isinstance(spacing, numbers.Real) and not isinstance(spacing, bool):
        rows = [[float(spacing)] * ndim for _ in range(batch)]
    else:
        try:
            if isinstance(spacing, torch.Tensor):
                arr = spacing.detach().to("cpu", torch.float64).numpy()
            else:
                arr = np.asarray(spacing, dtype=np.float64)
        except (TypeError, ValueError):
            fail(expected)
        if arr.shape == (ndim,):
            rows = [[float(v) for v in arr] for _ in range(batch)]
        elif per_sample and arr.shape == (batch, ndim):
            rows = [[float(v) for v in row] for row in arr]
        else:
            fail(f"{expected} (shape {tuple(arr.shape)} given)")
    if not all(math.isfinite(v) and v > 0 for row in rows for v in row):
        fail("finite and > 0 along every axis")
    return rows
