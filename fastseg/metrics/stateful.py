"""SurfaceMetric: per-case, per-class surface metrics accumulated over a dataset, aggregated per class, and
synchronised across torch.distributed ranks."""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from fastseg.metrics import surface as _surface

__all__ = ["SurfaceMetric"]

_STATS = ("mean", "median", "std", "count", "nan_count", "inf_count")


def _sync_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _aggregate(values: np.ndarray, inf_value: Optional[float]) -> Dict[str, torch.Tensor]:
    """Per-class statistics over axis 0 (cases) of an (N, K[, T]) float64 array (see SurfaceMetric)."""
    nan, inf = np.isnan(values), np.isinf(values)
    x = np.where(inf, inf_value, values) if inf_value is not None else values
    valid = ~nan
    count = valid.sum(0)
    unbounded = (np.isinf(x) & valid).any(0)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan classes: nan, as documented
        kept = np.where(valid, x, np.nan)
        mean = np.where(unbounded, np.inf, np.nanmean(np.where(np.isinf(kept), np.nan, kept), axis=0))
        std = np.where(unbounded, np.inf, np.nanstd(np.where(np.isinf(kept), np.nan, kept), axis=0))
        median = np.nanmedian(kept, axis=0) if len(x) else np.full(x.shape[1:], np.nan)
    mean, std, median = (np.where(count > 0, v, np.nan) for v in (mean, std, median))
    out = {"mean": mean, "median": median, "std": std, "count": count, "nan_count": nan.sum(0),
           "inf_count": inf.sum(0)}
    return {k: torch.as_tensor(np.asarray(v), dtype=torch.int64 if k.endswith("count") else torch.float64)
            for k, v in out.items()}


class SurfaceMetric:
    r"""Accumulates :func:`fastseg.metrics.surface_metrics` over a dataset and summarises it per class.

    ``update(pred, target)`` computes every metric of a batch (same inputs and options as
    ``surface_metrics``) and stores the per-case, per-class values; ``compute()`` returns, for each metric,
    per-class statistics over all cases of all ranks; ``reset()`` forgets them. ``per_case()`` returns the
    stored (N, K) values themselves (``'nsd'``: (N, K, T) for a sequence of tolerances), cases in rank order.

    Statistics per class, over the cases (float64, shape (K,) or (K, T)):

    * ``nan`` values — a class absent from both masks of a case (see the empty-mask policy of
      ``fastseg.metrics.surface``) — are left out of every statistic and counted in ``'nan_count'``;
      ``'count'`` is the number of values used.
    * ``inf`` values — a class present in exactly one mask: distances are infinite — are counted in
      ``'inf_count'``. With ``inf_value=None`` (default) they are kept: the mean and the std are then inf and
      the median sorts them last. With a number (e.g. the image diagonal in mm, as some challenges do) they
      are replaced by it before the statistics.
    * ``'mean'``; ``'median'`` (the mean of the two middle values for an even count, as numpy);
      ``'std'`` the population standard deviation (ddof = 0, as numpy); all nan where ``'count'`` is 0.

    Under ``torch.distributed`` (any backend, ``sync=True``) ``compute`` and ``per_case`` gather the values
    of every rank first (``all_gather_object``: small, one row per case), so every rank gets the statistics of
    the whole dataset. Every rank must call them.

    Example:
        >>> metric = SurfaceMetric(spacing=(2.5, 1.0, 1.0), convention="deepmind", tolerance=[1.0, 2.0])
        >>> for pred, target in loader:                      # (B, C, D, H, W) masks
        ...     metric.update(pred, target)
        >>> summary = metric.compute()
        >>> summary["hd_percentile"]["median"]                 # (C - 1,) per-class median HD95
    """

    def __init__(
        self,
        spacing=None,
        percentile: float = 95,
        tolerance: Union[float, Sequence[float]] = 2.0,
        convention: str = "monai",
        num_classes: Optional[int] = None,
        include_background: bool = False,
        inf_value: Optional[float] = None,
        sync: bool = True,
    ) -> None:
        fn = "SurfaceMetric"
        _surface._check_convention(fn, convention)
        _surface._check_percentile(fn, percentile)
        _surface._tolerances(fn, tolerance)
        if inf_value is not None and (isinstance(inf_value, bool) or not isinstance(inf_value, numbers.Real)
                                      or math.isnan(inf_value)):
            _surface._fail(fn, "inf_value", "None or a number", inf_value)
        self.spacing = spacing
        self.percentile = percentile
        self.tolerance = tolerance
        self.convention = convention
        self.num_classes = num_classes
        self.include_background = include_background
        self.inf_value = inf_value
        self.sync = sync
        self.reset()

    def __repr__(self) -> str:
        return (f"SurfaceMetric(convention={self.convention!r}, percentile={self.percentile}, "
                f"tolerance={self.tolerance!r}, spacing={self.spacing!r}, num_classes={self.num_classes}, "
                f"include_background={self.include_background}, inf_value={self.inf_value}, "
                f"cases={sum(len(r) for r in self._values[_surface.METRIC_KEYS[0]])})")

    def reset(self) -> None:
        self._values: Dict[str, List[np.ndarray]] = {k: [] for k in _surface.METRIC_KEYS}

    def update(self, pred, target, spacing=None) -> Dict[str, torch.Tensor]:
        """Adds a batch; ``spacing`` overrides the constructor's for it. Returns the batch's values."""
        out = _surface.surface_metrics(
            pred, target, spacing=self.spacing if spacing is None else spacing, percentile=self.percentile,
            tolerance=self.tolerance, convention=self.convention, num_classes=self.num_classes,
            include_background=self.include_background,
        )
        for key, value in out.items():
            self._values[key].append(value.detach().to("cpu", torch.float64).numpy())
        return out

    def _gathered(self) -> Dict[str, np.ndarray]:
        local = {k: np.concatenate(v) if v else None for k, v in self._values.items()}
        if not (self.sync and _sync_active()):
            parts = [local]
        else:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
        merged = {}
        for key in _surface.METRIC_KEYS:
            arrays = [p[key] for p in parts if p[key] is not None]
            merged[key] = np.concatenate(arrays) if arrays else np.zeros((0, 0))
        return merged

    def per_case(self) -> Dict[str, torch.Tensor]:
        """{metric: (N, K) float64} over every case of every rank (rank 0's first)."""
        return {k: torch.from_numpy(v) for k, v in self._gathered().items()}

    def compute(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """{metric: {'mean', 'median', 'std', 'count', 'nan_count', 'inf_count'}}, each (K,) or (K, T)."""
        return {k: _aggregate(v, self.inf_value) for k, v in self._gathered().items()}
