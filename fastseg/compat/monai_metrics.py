"""Drop-in replacements for MONAI 1.6.1's ``compute_hausdorff_distance``, ``compute_average_surface_distance``
and ``compute_surface_dice`` (``monai.metrics``), on fastseg's surface engine.

Same signatures, argument checks, error messages, warnings, output (B, C) float32 tensors and values as MONAI,
so MONAI's metric classes work unchanged with them patched in::

    import monai.metrics.hausdorff_distance as hd_module
    from fastseg.compat.monai_metrics import compute_hausdorff_distance
    hd_module.compute_hausdorff_distance = compute_hausdorff_distance   # HausdorffDistanceMetric now uses it

What MONAI computes, and so what these do (read from monai/metrics/{utils,hausdorff_distance,surface_distance,
surface_dice}.py):

* Masks: every channel is binarised as ``value == 1`` (after a cast to float32 in the Hausdorff and average
  distance functions, in the input dtype in compute_surface_dice); bool masks are used as they are.
  ``include_background=False`` drops channel 0 when there is more than one channel.
* Surfaces: the voxels removed by a binary erosion with the cross-shaped element (outside the image is
  background), or with ``use_subvoxels=True`` (surface Dice only) DeepMind's surfels with their areas
  (fastseg.metrics._surfels), in float32 as MONAI's table.
* Distances: 'euclidean' with ``spacing`` (MONAI: a KD-tree on CPU, cuCIM's EDT on CUDA; here fastseg's exact
  EDT on the crop, rounded to float32 as MONAI returns them); 'chessboard' and 'taxicab' ignore the spacing,
  as MONAI, and use scipy.ndimage.distance_transform_cdt like MONAI.
* Hausdorff: per direction the maximum, or ``torch.quantile(d, percentile / 100)`` (``percentile=0`` or None
  means the maximum); the larger direction unless ``directed`` (prediction to target only). The class equal
  to ``ignore_index`` is nan.
* Average surface distance: the mean of the prediction-to-target distances, or with ``symmetric`` of both
  directions pooled.
* Surface Dice: (#{d_PG <= t_c} + #{d_GP <= t_c}) / (|S_P| + |S_G|) with the class threshold t_c, or the same
  with surfel areas for ``use_subvoxels``. ``ignore_index`` masks the voxels of that label out of both inputs
  (MONAI's create_ignore_mask) before anything else.
* Empty masks, exactly as MONAI: a class empty in both gives nan. A class empty in one mask gives, in each
  direction, one infinite distance per surface voxel of the other mask: Hausdorff inf, its percentile nan
  (the interpolated quantile of infinities, MONAI issue #9095; fastseg.metrics.surface_metrics returns inf
  there), average distance inf, surface Dice 0. Both warn as MONAI does.

Deviations (documented, deliberate):

* ``distance_metric`` is checked before any computation (MONAI raises the same ValueError only once some
  class has both surfaces).
* ``spacing`` must be positive along every axis (ValueError): MONAI computes meaningless distances otherwise.
* Inputs with more than 3 spatial dimensions raise ValueError (MONAI's KD-tree path takes any dimension).
* compute_surface_dice accepts numpy arrays as the other two do (MONAI raises "y_pred and y must be PyTorch
  Tensor."), and a single number as ``spacing`` with ``use_subvoxels=True`` (MONAI raises TypeError).
* Distances equal MONAI's within one float32 rounding (EDT vs KD-tree arithmetic); a surface Dice can only
  differ when such a distance lies within that rounding of the class threshold.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import List, Optional, Union

import numpy as np
import torch

from fastseg.metrics import _masks, _surfaces
from fastseg.metrics.surface import _quantile

__all__ = ["compute_hausdorff_distance", "compute_average_surface_distance", "compute_surface_dice"]

_DISTANCE_METRICS = ("euclidean", "chessboard", "taxicab")

SpacingArg = Union[int, float, np.ndarray, Sequence, None]


# -------------------------------------------------------------------------------------------- inputs


def _to_tensor(x) -> torch.Tensor:
    """MONAI's convert_data_type(..., output_type=torch.Tensor) without the dtype cast (see the binarisers)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(np.asarray(x))


def _ignore_background(y_pred, y):
    """MONAI's ignore_background: each input loses its channel 0 if it has more than one channel."""
    y = y[:, 1:] if y.shape[1] > 1 else y
    y_pred = y_pred[:, 1:] if y_pred.shape[1] > 1 else y_pred
    return y_pred, y


def _binary_after_float_cast(x: torch.Tensor) -> torch.Tensor:
    """``x.float() == 1`` (compute_hausdorff_distance / compute_average_surface_distance cast to float32, then
    get_mask_edges takes value == 1) without materialising the float32 copy where the cast is exact."""
    if x.dtype == torch.bool:
        return x
    if x.dtype == torch.float64:
        return x.to(torch.float32) == 1
    return x == 1


def _binary(x: torch.Tensor) -> torch.Tensor:
    """get_mask_edges' binarisation in the input's own dtype (compute_surface_dice does not cast)."""
    return x if x.dtype == torch.bool else x == 1


def _create_ignore_mask(y: torch.Tensor, ignore_index: Optional[int]) -> Optional[torch.Tensor]:
    """MONAI's create_ignore_mask: label targets compare directly; one-hot targets mask the voxels of the
    ignored channel, or (an index outside the channels) the voxels where no channel is set."""
    if ignore_index is None:
        return None
    if y.shape[1] == 1:
        return (y != ignore_index).float()
    if 0 <= ignore_index < y.shape[1]:
        return 1.0 - y[:, ignore_index:ignore_index + 1]
    return (y.sum(dim=1, keepdim=True) > 0).float()


def _prepare_spacing(spacing: SpacingArg, batch_size: int, img_dim: int) -> list:
    """MONAI's prepare_spacing: one entry per sample (None, a number, or img_dim numbers), same errors."""
    if spacing is None or isinstance(spacing, (int, float)):
        return [spacing] * batch_size
    if not isinstance(spacing, (Sequence, np.ndarray)):
        raise ValueError(
            f"`spacing` should either be a number, a sequence of numbers or a sequence of sequences, got {spacing}."
        )
    first = spacing[0]
    if any(not isinstance(s, type(first)) for s in list(spacing)):
        raise ValueError(f"if `spacing` is a sequence, its elements should be of same type, got {spacing}.")
    if isinstance(first, (Sequence, np.ndarray)):
        if len(spacing) != batch_size:
            raise ValueError(
                "if `spacing` is a sequence of sequences, "
                f"the outer sequence should have same length as batch size ({batch_size}), got {spacing}."
            )
        if any(len(s) != img_dim for s in list(spacing)):
            raise ValueError(
                f"each element of `spacing` list should either have same length asimage dim ({img_dim}), got {spacing}."
            )
        if not all(isinstance(v, (int, float)) for s in list(spacing) for v in list(s)):
            raise ValueError(
                "if `spacing` is a sequence of sequences or 2D np.ndarray, "
                f"the elements should be integers or floats, got {spacing}."
            )
        return list(spacing)
    if isinstance(first, (int, float)):
        if len(spacing) != img_dim:
            raise ValueError(
                "if `spacing` is a sequence of numbers, "
                f"it should have same length as image dim ({img_dim}), got {spacing}."
            )
        return [spacing for _ in range(batch_size)]
    raise ValueError(f"`spacing` is a sequence of elements with unsupported type: {type(first)}")


def _spacing_row(entry, nd: int, metric: str) -> List[float]:
    """One sample's spacing as nd floats (units of 1 for the chamfer metrics, which ignore it as MONAI)."""
    if entry is None or metric != "euclidean":
        return [1.0] * nd
    values = [float(entry)] * nd if isinstance(entry, (int, float)) else [float(v) for v in entry]
    if len(values) != nd or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"fastseg.compat.monai_metrics: spacing must hold {nd} finite values > 0 per sample, "
                         f"got {entry!r}")
    return values


def _check_distance_metric(distance_metric: str) -> None:
    if distance_metric not in _DISTANCE_METRICS:
        raise ValueError(f"distance_metric {distance_metric} is not implemented.")


def _check_spatial_dims(y_pred: torch.Tensor) -> None:
    nd = y_pred.dim() - 2
    if not 1 <= nd <= 3:
        raise ValueError(
            "fastseg.compat.monai_metrics: y_pred must be (B, C, *spatial) with 1 to 3 spatial dims, got shape "
            f"{tuple(y_pred.shape)}"
        )


# -------------------------------------------------------------------------------------------- engine


class _Pair:
    """One (sample, class) the way MONAI's get_edge_surface_distance returns it: the distance tuple (pred to
    target, then target to pred), the points' areas (surfels) and which edge sets are empty."""

    def __init__(self, pair: Optional[_surfaces.SurfacePair], device):
        if pair is None:
            empty = torch.zeros(0, device=device)
            self.d_pred, self.d_target = empty, empty
            self.area_pred = self.area_target = empty
            self.pred_empty = self.target_empty = True
            self.finite = False
            return
        self.pred_empty, self.target_empty = pair.d_pred.numel() == 0, pair.d_target.numel() == 0
        self.area_pred, self.area_target = pair.area_pred, pair.area_target
        if self.pred_empty or self.target_empty:
            # MONAI's get_surface_distance: one +inf per edge point of the non-empty mask, in both directions.
            n = max(pair.d_pred.numel(), pair.d_target.numel())
            self.d_pred = self.d_target = torch.full((n,), math.inf, device=device)
        else:
            self.d_pred, self.d_target = pair.d_pred, pair.d_target
        self.finite = not (self.pred_empty or self.target_empty)


def _pairs(y_pred: torch.Tensor, y: torch.Tensor, spacing_list, distance_metric: str, use_subvoxels: bool):
    """Yields (b, c, _Pair) over every (sample, channel) of two bool (B, C, *spatial) masks."""
    nd = y_pred.dim() - 2
    if use_subvoxels and nd not in (2, 3):
        raise ValueError(f"fastseg.compat.monai_metrics: use_subvoxels needs 2 or 3 spatial dims, got {nd}")
    rows = [_spacing_row(s, nd, distance_metric) for s in spacing_list]
    src_p, src_t = _masks.ChannelMasks(y_pred, 0), _masks.ChannelMasks(y, 0)
    boxes_p, boxes_t = _masks.find_boxes(src_p), _masks.find_boxes(src_t)
    kind = _surfaces.SURFEL if use_subvoxels else _surfaces.VOXEL
    for b, c, pair in _surfaces.iter_pairs(src_p, src_t, boxes_p, boxes_t, rows, kind, distance_metric):
        yield b, c, _Pair(pair, y_pred.device)


def _warn_empty(p: _Pair, class_index: int, warn: bool) -> None:
    """get_edge_surface_distance's warnings, ground truth first."""
    if not warn:
        return
    name = class_index if class_index != -1 else "Unknown"
    if p.target_empty:
        warnings.warn(f"the ground truth of class {name} is all 0, this may result in nan/inf distance.",
                      stacklevel=4)
    if p.pred_empty:
        warnings.warn(f"the prediction of class {name} is all 0, this may result in nan/inf distance.",
                      stacklevel=4)


def _percentile_distance(d: torch.Tensor, percentile: Optional[float], finite: bool) -> torch.Tensor:
    """MONAI's _compute_percentile_hausdorff_distance."""
    if d.shape == (0,):
        return torch.tensor(np.nan, dtype=torch.float, device=d.device)
    if not percentile:
        return d.max()
    if 0 <= percentile <= 100:
        # fastseg's selection-based quantile is bit-identical to torch.quantile for finite distances; the
        # all-infinite case goes through torch.quantile itself to keep MONAI's nan.
        return _quantile(d, percentile / 100) if finite else torch.quantile(d, percentile / 100)
    raise ValueError(f"percentile should be a value between 0 and 100, get {percentile}.")


# -------------------------------------------------------------------------------------------- public


def compute_hausdorff_distance(
    y_pred: Union[np.ndarray, torch.Tensor],
    y: Union[np.ndarray, torch.Tensor],
    include_background: bool = False,
    distance_metric: str = "euclidean",
    percentile: Optional[float] = None,
    directed: bool = False,
    spacing: SpacingArg = None,
    ignore_index: Optional[int] = None,
) -> torch.Tensor:
    """MONAI 1.6.1 ``monai.metrics.compute_hausdorff_distance``: (B, C) float32 Hausdorff distance (or its
    ``percentile``) between binarised one-hot ``y_pred`` and ``y`` (B, C, *spatial). See the module docstring."""
    _check_distance_metric(distance_metric)
    class_offset = 0
    if not include_background:
        y_pred, y = _ignore_background(y_pred, y)
        class_offset = 1
    y_pred, y = _to_tensor(y_pred), _to_tensor(y)
    if y.shape != y_pred.shape:
        raise ValueError(f"y_pred and y should have same shapes, got {y_pred.shape} and {y.shape}.")
    _check_spatial_dims(y_pred)
    batch_size, n_class = y_pred.shape[:2]
    hd = torch.empty((batch_size, n_class), dtype=torch.float, device=y_pred.device)
    spacing_list = _prepare_spacing(spacing, batch_size, y_pred.dim() - 2)
    pred_b, y_b = _binary_after_float_cast(y_pred), _binary_after_float_cast(y)
    for b, c, p in _pairs(pred_b, y_b, spacing_list, distance_metric, use_subvoxels=False):
        absolute_c = c + class_offset
        if ignore_index is not None and absolute_c == ignore_index:
            hd[b, c] = torch.tensor(float("nan"), device=y_pred.device)
            continue
        _warn_empty(p, absolute_c, ignore_index is None or absolute_c != ignore_index)
        distances = (p.d_pred,) if directed else (p.d_pred, p.d_target)
        hd[b, c] = torch.max(torch.stack([_percentile_distance(d, percentile, p.finite) for d in distances]))
    return hd


def compute_average_surface_distance(
    y_pred: Union[np.ndarray, torch.Tensor],
    y: Union[np.ndarray, torch.Tensor],
    include_background: bool = False,
    symmetric: bool = False,
    distance_metric: str = "euclidean",
    spacing: SpacingArg = None,
    ignore_index: Optional[int] = None,
) -> torch.Tensor:
    """MONAI 1.6.1 ``monai.metrics.compute_average_surface_distance``: (B, C) float32 mean surface distance
    from ``y_pred`` to ``y``, or of both directions pooled with ``symmetric``. See the module docstring."""
    _check_distance_metric(distance_metric)
    if not include_background:
        y_pred, y = _ignore_background(y_pred, y)
    y_pred, y = _to_tensor(y_pred), _to_tensor(y)
    if y.shape != y_pred.shape:
        raise ValueError(f"y_pred and y should have same shapes, got {y_pred.shape} and {y.shape}.")
    _check_spatial_dims(y_pred)
    batch_size, n_class = y_pred.shape[:2]
    asd = torch.empty((batch_size, n_class), dtype=torch.float32, device=y_pred.device)
    spacing_list = _prepare_spacing(spacing, batch_size, y_pred.dim() - 2)
    class_offset = 0 if include_background else 1
    pred_b, y_b = _binary_after_float_cast(y_pred), _binary_after_float_cast(y)
    for b, c, p in _pairs(pred_b, y_b, spacing_list, distance_metric, use_subvoxels=False):
        absolute_c = c + class_offset
        # MONAI names the relative channel index in this function's warnings.
        _warn_empty(p, c, ignore_index is None or absolute_c != ignore_index)
        d = torch.cat((p.d_pred, p.d_target)) if symmetric else p.d_pred
        asd[b, c] = torch.tensor(float("nan"), device=asd.device) if d.numel() == 0 else d.mean()
    return asd


def compute_surface_dice(
    y_pred: Union[np.ndarray, torch.Tensor],
    y: Union[np.ndarray, torch.Tensor],
    class_thresholds: List[float],
    include_background: bool = False,
    distance_metric: str = "euclidean",
    spacing: SpacingArg = None,
    use_subvoxels: bool = False,
    ignore_index: Optional[int] = None,
) -> torch.Tensor:
    """MONAI 1.6.1 ``monai.metrics.compute_surface_dice``: (B, C) float32 normalised surface Dice with one
    threshold per class (mm with ``spacing``), voxel counts or ``use_subvoxels`` surfel areas. See the module
    docstring."""
    _check_distance_metric(distance_metric)
    y_pred, y = _to_tensor(y_pred), _to_tensor(y)
    mask = _create_ignore_mask(y, ignore_index)
    if mask is not None:
        y_pred, y = y_pred * mask, y * mask
    if not include_background:
        y_pred, y = _ignore_background(y_pred, y)
    if y_pred.dim() not in (4, 5) or y.dim() not in (4, 5):
        raise ValueError("y_pred and y should be one-hot encoded: [B,C,H,W] or [B,C,H,W,D].")
    if y_pred.shape != y.shape:
        raise ValueError(
            f"y_pred and y should have same shape, but instead, shapes are {y_pred.shape} (y_pred) and {y.shape} (y)."
        )
    batch_size, n_class = y_pred.shape[:2]
    if n_class != len(class_thresholds):
        raise ValueError(
            f"number of classes ({n_class}) does not match number of class thresholds ({len(class_thresholds)})."
        )
    if any(~np.isfinite(class_thresholds)):
        raise ValueError("All class thresholds need to be finite.")
    if any(np.array(class_thresholds) < 0):
        raise ValueError("All class thresholds need to be >= 0.")
    nsd = torch.empty((batch_size, n_class), device=y_pred.device, dtype=torch.float)
    spacing_list = _prepare_spacing(spacing, batch_size, y_pred.dim() - 2)
    class_offset = 0 if include_background else 1
    for b, c, p in _pairs(_binary(y_pred), _binary(y), spacing_list, distance_metric, use_subvoxels):
        absolute_c = c + class_offset
        _warn_empty(p, absolute_c, ignore_index is None or absolute_c != ignore_index)
        nsd[b, c] = _surface_dice(p, class_thresholds[c], use_subvoxels)
    return nsd


def _surface_dice(p: _Pair, threshold: float, use_subvoxels: bool) -> torch.Tensor:
    """compute_surface_dice's ratio for one (sample, class), nan when neither mask has a boundary."""
    if not use_subvoxels:
        complete = len(p.d_pred) + len(p.d_target)
        correct = torch.sum(p.d_pred <= threshold) + torch.sum(p.d_target <= threshold)
    else:
        # MONAI's area table is float32.
        area_p, area_t = p.area_pred.to(torch.float32), p.area_target.to(torch.float32)
        complete = area_t.sum() + area_p.sum()
        target_true = area_t[p.d_target <= threshold].sum() if len(area_t) > 0 else 0.0
        pred_true = area_p[p.d_pred <= threshold].sum() if len(area_p) > 0 else 0.0
        correct = target_true + pred_true
    if complete == 0:
        return torch.tensor(np.nan)
    return correct / complete
