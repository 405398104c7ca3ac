r"""Surface metrics — Hausdorff distance, its percentile, average surface distances, normalised surface Dice —
and the volumetric Dice, reproducing MONAI 1.6.1 or DeepMind's surface-distance 0.1 exactly.

Notation per (sample, class): :math:`S_P`, :math:`S_G` the surfaces of the prediction and the target,
:math:`d(x, S)` the distance (mm, with ``spacing``) from a surface point x to the nearest point of S,
:math:`D_{PG} = \{d(p, S_G) : p \in S_P\}` and :math:`D_{GP}` likewise.

**convention='monai'** (MONAI 1.6.1, ``monai.metrics``): surface points are voxels — the mask's voxels that a
binary erosion with the 6-connected cross removes (outside the image counts as background); each weighs 1.

* ``hd`` = max(max D_PG, max D_GP) (``compute_hausdorff_distance``).
* ``hd_percentile`` = max(Q(D_PG), Q(D_GP)) with Q the percentile of ``torch.quantile`` (linear
  interpolation between order statistics), as ``compute_hausdorff_distance(percentile=...)``. MONAI reads
  ``percentile=0`` as "no percentile" (the maximum); here 0 is the 0th percentile (the minimum).
* ``assd`` = (Σ D_PG + Σ D_GP) / (|S_P| + |S_G|), ``compute_average_surface_distance(symmetric=True)``;
  ``asd_pred_to_target`` = mean D_PG (MONAI's default ``symmetric=False``), ``asd_target_to_pred`` = mean D_GP.
* ``nsd`` = (#{D_PG ≤ τ} + #{D_GP ≤ τ}) / (|S_P| + |S_G|), ``compute_surface_dice`` with voxel counts.
  MONAI's ``use_subvoxels=True`` counts DeepMind's surfels instead: that is ``convention='deepmind'``'s nsd.

**convention='deepmind'** (``surface_distance.compute_surface_distances`` and the functions reading it):
surface points are surfels — the corners of the voxel grid whose 2×2×2 (2×2 in 2D) surrounding voxels are
neither all inside nor all outside; each weighs the area (length in 2D) of the marching-cubes surface through
its block, scaled by the spacing (fastseg.metrics._surfels derives the table).

* ``hd`` = max(max D_PG, max D_GP), which is ``compute_robust_hausdorff(d, 100)``.
* ``hd_percentile`` = ``compute_robust_hausdorff(d, percentile)``: per direction, distances sorted (ties by
  area), the first one whose cumulative area fraction reaches percentile / 100 (no interpolation); the larger
  of the two directions.
* ``asd_pred_to_target`` / ``asd_target_to_pred``: the area-weighted means Σ a d / Σ a, the two values of
  ``compute_average_surface_distance`` (which returns them as (target→pred, pred→target));
  ``assd`` = (Σ_P a d + Σ_G a d) / (Σ_P a + Σ_G a), the area-weighted symmetric mean (surface-distance has no
  such function: this is MONAI's pooled mean with areas as weights).
* ``nsd`` = (Σ_{P, d ≤ τ} a + Σ_{G, d ≤ τ} a) / (Σ_P a + Σ_G a), ``compute_surface_dice_at_tolerance``.

**Both conventions**: ``dice`` = 2 |P ∩ G| / (|P| + |G|), surface-distance's ``compute_dice_coefficient``
(MONAI's ``compute_dice(ignore_empty=False)`` but for both masks empty, where MONAI gives 1; with its default
``ignore_empty=True`` MONAI gives nan whenever the target is empty).

**Empty masks** (one policy for both conventions; values computed on the masks, never an exception):

* exactly one mask empty: every distance (``hd``, ``hd_percentile``, ``assd`` and both directed means) is
  ``inf``, ``nsd`` is 0 and ``dice`` is 0. MONAI returns the same except ``hd_percentile``, which it returns as
  nan (the quantile of a set of infinities, MONAI issue #9095): fastseg returns inf. surface-distance 0.1
  raises AttributeError on NumPy 2 (``np.Inf``); with ``np.Inf`` restored it returns the same values except
  the directed mean from the empty side, nan (0 / 0): fastseg returns inf.
* both masks empty: every metric is nan (the structure is absent: aggregations drop it), as MONAI. surface-
  distance returns nan for the means, nsd and dice, and (with ``np.Inf`` restored) inf for the Hausdorff
  distances: fastseg returns nan for those too.

Work: one pass over the inputs finds every (sample, class) bounding box; each class is then processed on the
crop of the union of its two boxes grown by one voxel, with one surface extraction and one exact EDT (fastseg's
kernel) per mask, read at the other mask's surface points only. On the CPU the classes are processed one by
one. CUDA tensors take fastseg.metrics._batched instead: the crops of all classes of the batch are stacked
into a few buckets of similar shape (7 for the 21 organs of a real scan), each bucket one gather, one surface
extraction, one EDT and row-wise reductions, so the number of kernel launches does not grow with the classes.
Both paths give the same values (tested on the CPU, where both run): ASSD and area sums may differ in the last
float32 bits, from other summation orders.

Precision: distances are the EDT's float32 values (scipy's float64 distance rounded once). MONAI returns
float32 distances too (bit-identical on the 147 real organs of the tests); surface-distance keeps float64, so
its distances differ by that one rounding (< 2e-6 mm there). A surface Dice can only differ where a distance
lies within that rounding of τ, and an area-weighted percentile only where a cumulative area fraction equals
percentile / 100 to the last bit. Outputs are float32.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from fastseg.metrics import _batched, _masks, _surfaces
from fastseg.metrics._spacing import spacing_rows

__all__ = [
    "surface_metrics",
    "dice_score",
    "hausdorff_distance",
    "average_surface_distance",
    "normalized_surface_dice",
    "METRIC_KEYS",
]

Array = Union[torch.Tensor, np.ndarray]
SpacingLike = Union[None, float, Sequence[float], Sequence[Sequence[float]], torch.Tensor, np.ndarray]

CONVENTIONS = ("monai", "deepmind")
METRIC_KEYS = ("hd", "hd_percentile", "assd", "asd_pred_to_target", "asd_target_to_pred", "nsd", "dice")
# Devices whose tensors take fastseg.metrics._batched (every (sample, class) in a fixed number of operations)
# instead of the loop over (sample, class), which is faster on the CPU, where an operation costs no launch.
BATCHED_DEVICE_TYPES = ("cuda",)
_DISTANCE_KEYS = ("hd", "hd_percentile", "assd", "asd_pred_to_target", "asd_target_to_pred",
                  "hd_directed", "hd_percentile_directed")


# ------------------------------------------------------------------------------------------- validation


def _fail(fn: str, name: str, expected: str, got) -> None:
    raise ValueError(f"fastseg.metrics.{fn}: {name} must be {expected}, got {got!r}")


def _describe(x: torch.Tensor) -> str:
    return f"{x.dtype} tensor of shape {tuple(x.shape)}"


def _as_tensor(fn: str, name: str, x: Array) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        if x.dtype == object or not (x.flags.writeable and all(s >= 0 for s in x.strides)):
            x = np.array(x)
        return torch.from_numpy(x)
    raise TypeError(f"fastseg.metrics.{fn}: {name} must be a torch.Tensor or a numpy.ndarray, got {type(x).__name__}")


def _binary_masks(fn: str, name: str, x: torch.Tensor) -> torch.Tensor:
    """bool or uint8 (checked later, for free, by the box search) as they are; other dtypes checked here."""
    if x.dtype in (torch.bool, torch.uint8):
        return x
    if x.dtype.is_complex:
        _fail(fn, name, "a real-valued binary mask", _describe(x))
    if x.numel() and not bool(((x == 0) | (x == 1)).all()):
        _fail(fn, name, "a binary mask (values 0 and 1 only; threshold probabilities first, e.g. pred > 0.5)",
              _describe(x))
    return x != 0


def _check_uint8_binary(fn: str, name: str, source) -> None:
    max_value = getattr(source, "max_value", None)
    if max_value is not None and int(max_value) > 1:
        _fail(fn, name, "a binary mask (values 0 and 1 only)", f"uint8 values up to {int(max_value)}")


def _prepare_inputs(fn: str, pred: Array, target: Array, num_classes: Optional[int], include_background: bool):
    """Mask sources for pred and target, the absolute class indices evaluated, batch size and spatial dims."""
    p, t = _as_tensor(fn, "pred", pred), _as_tensor(fn, "target", target)
    if p.device != t.device:
        _fail(fn, "target", f"on pred's device ({p.device})", str(t.device))
    if not isinstance(include_background, bool):
        _fail(fn, "include_background", "True or False", include_background)
    if num_classes is None:
        for name, x in (("pred", p), ("target", t)):
            if x.dim() not in (4, 5):
                _fail(fn, name, "a (B, C, *spatial) per-class mask with 2 or 3 spatial dims (or (B, *spatial) "
                      "labels with num_classes)", _describe(x))
        if p.shape != t.shape:
            _fail(fn, "target", f"of pred's shape {tuple(p.shape)}", tuple(t.shape))
        C = p.shape[1]
        first = 0 if include_background or C == 1 else 1  # MONAI keeps a single channel
        p, t = _binary_masks(fn, "pred", p), _binary_masks(fn, "target", t)
        classes = list(range(first, C))
        return _masks.ChannelMasks(p, first), _masks.ChannelMasks(t, first), classes, p.shape[0], p.dim() - 2
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        _fail(fn, "num_classes", "a positive int (or None for per-class masks)", num_classes)
    num_classes = int(num_classes)
    labels = []
    for name, x in (("pred", p), ("target", t)):
        if x.dtype.is_floating_point or x.dtype.is_complex:
            _fail(fn, name, "integer labels when num_classes is given", _describe(x))
        if x.dim() == 5 and x.shape[1] == 1:
            x = x[:, 0]
        if x.dim() not in (3, 4):
            _fail(fn, name, "(B, *spatial) labels with 2 or 3 spatial dims when num_classes is given", _describe(x))
        if x.dtype == torch.bool:
            x = x.view(torch.uint8)
        if x.numel():
            lo, hi = torch.aminmax(x)
            if int(lo) < 0 or int(hi) >= num_classes:
                _fail(fn, name, f"labels in [0, num_classes) = [0, {num_classes})",
                      f"labels from {int(lo)} to {int(hi)}")
        labels.append(x)
    p, t = labels
    if p.shape != t.shape:
        _fail(fn, "target", f"of pred's shape {tuple(p.shape)}", tuple(t.shape))
    first = 0 if include_background or num_classes == 1 else 1
    classes = list(range(first, num_classes))
    return (_masks.LabelMaps(p, num_classes, classes), _masks.LabelMaps(t, num_classes, classes), classes,
            p.shape[0], p.dim() - 1)


def _check_convention(fn: str, convention: str) -> None:
    if convention not in CONVENTIONS:
        _fail(fn, "convention", " or ".join(repr(c) for c in CONVENTIONS), convention)


def _check_percentile(fn: str, percentile) -> float:
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not 0 <= percentile <= 100:
        _fail(fn, "percentile", "a number in [0, 100]", percentile)
    return float(percentile)


def _tolerances(fn: str, tolerance) -> Tuple[List[float], bool]:
    """(taus, is_sequence): every tolerance a finite number >= 0 (mm)."""
    def ok(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

    if isinstance(tolerance, (torch.Tensor, np.ndarray)):
        tolerance = tolerance.tolist()
    if isinstance(tolerance, (list, tuple)):
        if not tolerance or not all(ok(v) for v in tolerance):
            _fail(fn, "tolerance", "a finite number >= 0 (mm) or a non-empty sequence of them", tolerance)
        return [float(v) for v in tolerance], True
    if not ok(tolerance):
        _fail(fn, "tolerance", "a finite number >= 0 (mm) or a non-empty sequence of them", tolerance)
    return [float(tolerance)], False


# ------------------------------------------------------------------------------------------- reductions


def _robust_percentile(d: torch.Tensor, area: torch.Tensor, q: float) -> torch.Tensor:
    """surface-distance's compute_robust_hausdorff for one direction: the first distance, in increasing
    order, whose cumulative area fraction reaches q. surface-distance breaks distance ties by area; the order
    inside a tie changes no distance, only the last bits of the running sum, so one sort by distance does."""
    d, order = torch.sort(d, stable=True)
    area = area[order]
    fraction = torch.cumsum(area, 0) / area.sum()
    index = torch.searchsorted(fraction, fraction.new_tensor([q])).clamp_max(d.numel() - 1)
    return d[index][0]


def _quantile(d: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(d, q) (linear interpolation), as MONAI calls it, from two selections instead of a sort:
    the same float32 rank, weight and lerp as ATen's quantile, so the same bits."""
    n = d.numel()
    rank = torch.tensor(q, dtype=d.dtype) * (n - 1)
    below = int(rank)  # ATen truncates the rank to an integer index
    above = int(torch.ceil(rank))
    v_below = torch.kthvalue(d, below + 1).values
    v_above = v_below if above == below else torch.kthvalue(d, above + 1).values
    return torch.lerp(v_below, v_above, (rank - below).to(d.device))


def _monai_values(pair: _surfaces.SurfacePair, q: float, taus, wanted) -> Dict[str, torch.Tensor]:
    d_p, d_t = pair.d_pred, pair.d_target
    out = {}
    if "hd" in wanted or "hd_directed" in wanted:
        out["hd_directed"] = d_p.max()
        out["hd"] = torch.maximum(out["hd_directed"], d_t.max())
    if "hd_percentile" in wanted or "hd_percentile_directed" in wanted:
        out["hd_percentile_directed"] = _quantile(d_p, q)
        out["hd_percentile"] = torch.maximum(out["hd_percentile_directed"], _quantile(d_t, q))
    if "assd" in wanted:
        out["assd"] = torch.cat([d_p, d_t]).mean()
    if "asd_pred_to_target" in wanted:
        out["asd_pred_to_target"] = d_p.mean()
    if "asd_target_to_pred" in wanted:
        out["asd_target_to_pred"] = d_t.mean()
    if "nsd" in wanted:
        taus32 = taus[0]  # MONAI compares float32 distances with the threshold cast to float32
        within = (d_p.unsqueeze(1) <= taus32).sum(0) + (d_t.unsqueeze(1) <= taus32).sum(0)
        out["nsd"] = within / (d_p.numel() + d_t.numel())
    return out


def _deepmind_values(pair: _surfaces.SurfacePair, q: float, taus, wanted) -> Dict[str, torch.Tensor]:
    d_p, d_t = pair.d_pred.double(), pair.d_target.double()
    a_p, a_t = pair.area_pred, pair.area_target
    out = {}
    if "hd" in wanted or "hd_directed" in wanted:
        out["hd_directed"] = d_p.max()
        out["hd"] = torch.maximum(out["hd_directed"], d_t.max())
    if "hd_percentile" in wanted or "hd_percentile_directed" in wanted:
        out["hd_percentile_directed"] = _robust_percentile(d_p, a_p, q)
        out["hd_percentile"] = torch.maximum(out["hd_percentile_directed"], _robust_percentile(d_t, a_t, q))
    sum_p, sum_t = a_p.sum(), a_t.sum()
    if "assd" in wanted or "asd_pred_to_target" in wanted or "asd_target_to_pred" in wanted:
        moment_p, moment_t = (d_p * a_p).sum(), (d_t * a_t).sum()
        out["asd_pred_to_target"] = moment_p / sum_p
        out["asd_target_to_pred"] = moment_t / sum_t
        out["assd"] = (moment_p + moment_t) / (sum_p + sum_t)
    if "nsd" in wanted:
        taus64 = taus[1]  # surface-distance compares in float64
        within = (a_p.unsqueeze(1) * (d_p.unsqueeze(1) <= taus64)).sum(0)
        within = within + (a_t.unsqueeze(1) * (d_t.unsqueeze(1) <= taus64)).sum(0)
        out["nsd"] = within / (sum_p + sum_t)
    return out


def _dice(pair: _surfaces.SurfacePair) -> torch.Tensor:
    total = (pair.pred_voxels + pair.target_voxels).double()
    return 2.0 * pair.overlap_voxels.double() / total


def _pair_row(pair, convention, q, taus, wanted, layout, device) -> torch.Tensor:
    """The (M,) float64 row of one (sample, class) in ``layout`` order (nsd expands to one entry per tau);
    taus: the tolerances as float32 and float64 tensors."""
    T = taus[0].numel()
    if pair is None:
        return torch.full((sum(T if k == "nsd" else 1 for k in layout),), math.nan, dtype=torch.float64,
                          device=device)
    one_empty = pair.d_pred.numel() == 0 or pair.d_target.numel() == 0
    if one_empty:
        values = {k: torch.tensor(math.inf, dtype=torch.float64, device=device) for k in _DISTANCE_KEYS}
        values["nsd"] = torch.zeros(T, dtype=torch.float64, device=device)
    else:
        reduce = _monai_values if convention == "monai" else _deepmind_values
        values = reduce(pair, q, taus, wanted)
    if "dice" in wanted:
        values["dice"] = _dice(pair)
    return torch.cat([values[k].reshape(-1).to(torch.float64) for k in layout])


def _evaluate(fn, pred, target, *, spacing, convention, num_classes, include_background, percentile, taus,
              wanted) -> Dict[str, torch.Tensor]:
    """{key: (B, K) or (B, K, T) float32} for the wanted keys (nsd has T tolerances)."""
    _check_convention(fn, convention)
    q = _check_percentile(fn, percentile) / 100.0
    psrc, tsrc, classes, B, nd = _prepare_inputs(fn, pred, target, num_classes, include_background)
    rows = spacing_rows(f"fastseg.metrics.{fn}", spacing, B, nd)
    device = psrc.data.device
    batched = device.type in BATCHED_DEVICE_TYPES
    find_boxes = _masks.find_boxes_by_projection if batched else _masks.find_boxes
    boxes_p = find_boxes(psrc)
    _check_uint8_binary(fn, "pred", psrc)
    boxes_t = find_boxes(tsrc)
    _check_uint8_binary(fn, "target", tsrc)
    kind = _surfaces.VOXEL if convention == "monai" else _surfaces.SURFEL
    tau_t = (torch.tensor(taus, dtype=torch.float32, device=device),
             torch.tensor(taus, dtype=torch.float64, device=device))
    layout = [k for k in (*METRIC_KEYS, "hd_directed", "hd_percentile_directed") if k in wanted]
    K, T = len(classes), len(taus)
    width = sum(T if k == "nsd" else 1 for k in layout)
    if batched:
        values = _batched.evaluate_batched(psrc, tsrc, boxes_p, boxes_t, rows, kind, q, tau_t, device)
        columns = [values[k].reshape(B * K, -1) for k in layout]
        table = torch.cat(columns, 1) if columns else torch.zeros(B * K, 0, dtype=torch.float64, device=device)
    else:
        row_list = [None] * (B * K)
        for b, k, pair in _surfaces.iter_pairs(psrc, tsrc, boxes_p, boxes_t, rows, kind):
            row_list[b * K + k] = _pair_row(pair, convention, q, tau_t, wanted, layout, device)
        table = torch.stack(row_list) if row_list else torch.zeros(0, width, dtype=torch.float64, device=device)
    table = table.to(torch.float32).reshape(B, K, width)
    out, col = {}, 0
    for key in layout:
        n = T if key == "nsd" else 1
        out[key] = table[..., col:col + n] if key == "nsd" else table[..., col]
        col += n
    return out


# ------------------------------------------------------------------------------------------- public API


def surface_metrics(
    pred: Array,
    target: Array,
    spacing: SpacingLike = None,
    percentile: float = 95,
    tolerance: Union[float, Sequence[float]] = 2.0,
    convention: str = "monai",
    num_classes: Optional[int] = None,
    include_background: bool = False,
) -> Dict[str, torch.Tensor]:
    r"""Every surface metric and the Dice of every (sample, class) from one surface extraction and one
    distance computation per (sample, class). Definitions, conventions and the empty-mask policy: see the
    module docstring (``help(fastseg.metrics.surface)``).

    Args:
        pred, target: torch tensors (CPU or CUDA, same device) or numpy arrays, either
            per-class masks ``(B, C, *spatial)`` — bool, or uint8 / integer / float with values 0 and 1;
            channels may overlap (Lens inside Orbit) — or, with ``num_classes``, integer label maps
            ``(B, *spatial)`` (``(B, 1, D, H, W)`` accepted) with labels in [0, num_classes). 2 or 3 spatial dims.
        spacing: voxel size in mm along each spatial axis, in array order: None (1 mm), a number, one value per
            axis, or a ``(B, ndim)`` array with one row per sample.
        percentile: in [0, 100], for ``'hd_percentile'`` (95: HD95).
        tolerance: surface Dice tolerance τ in mm, or a sequence of them (``'nsd'`` then has a trailing
            dimension of that length).
        convention: ``'monai'`` (voxel surfaces, MONAI 1.6.1) or ``'deepmind'`` (surfels weighted by area,
            surface-distance 0.1).
        num_classes: number of labels of label-map inputs; None for per-class masks.
        include_background: keep class / channel 0. When False it is dropped (as MONAI, which keeps a single
            channel).

    Returns:
        dict of float32 tensors on the inputs' device, each ``(B, K)`` with K the classes evaluated
        (``'nsd'``: ``(B, K, T)`` for a sequence of T tolerances): ``'hd'``, ``'hd_percentile'``, ``'assd'``,
        ``'asd_pred_to_target'``, ``'asd_target_to_pred'`` (mm), ``'nsd'`` and ``'dice'`` (in [0, 1]).

    Example:
        >>> pred = torch.zeros(1, 2, 32, 32, 32, dtype=torch.bool); pred[0, 1, 8:20, 8:20, 8:20] = True
        >>> target = torch.zeros_like(pred); target[0, 1, 9:21, 8:20, 8:20] = True
        >>> m = surface_metrics(pred, target, spacing=(2.5, 1.0, 1.0), tolerance=[1.0, 2.0])
        >>> m["hd"], m["nsd"].shape
        (tensor([[2.5000]]), torch.Size([1, 1, 2]))
    """
    fn = "surface_metrics"
    taus, is_seq = _tolerances(fn, tolerance)
    out = _evaluate(fn, pred, target, spacing=spacing, convention=convention, num_classes=num_classes,
                    include_background=include_background, percentile=percentile, taus=taus,
                    wanted=set(METRIC_KEYS))
    if not is_seq:
        out["nsd"] = out["nsd"][..., 0]
    return {k: out[k] for k in METRIC_KEYS}


def dice_score(
    pred: Array, target: Array, num_classes: Optional[int] = None, include_background: bool = False
) -> torch.Tensor:
    """Volumetric Dice 2 |P ∩ G| / (|P| + |G|) per (sample, class), (B, K) float32; nan where both masks are
    empty (surface-distance's compute_dice_coefficient; MONAI's DiceMetric with ignore_empty). Inputs as
    :func:`surface_metrics`. Computed from voxel counts, without any surface."""
    fn = "dice_score"
    psrc, tsrc, classes, B, nd = _prepare_inputs(fn, pred, target, num_classes, include_background)
    if isinstance(psrc, _masks.ChannelMasks):
        first = classes[0] if classes else 0
        for name, src in (("pred", psrc), ("target", tsrc)):
            data = src.data[:, first:].view(torch.uint8)
            if data.numel():
                src.max_value = data.amax()
                _check_uint8_binary(fn, name, src)
        p = psrc.data[:, first:].reshape(B, len(classes), -1)
        t = tsrc.data[:, first:].reshape(B, len(classes), -1)
        inter = (p & t).sum(-1)
        total = p.sum(-1) + t.sum(-1)
    else:
        L = psrc.num_classes
        rows = []
        for b in range(B):
            pairs = psrc.data[b].reshape(-1).to(torch.int64) * L + tsrc.data[b].reshape(-1).to(torch.int64)
            rows.append(torch.bincount(pairs, minlength=L * L).view(L, L))
        confusion = torch.stack(rows) if rows else torch.zeros(0, L, L, dtype=torch.int64)
        inter = confusion.diagonal(dim1=1, dim2=2)[:, classes]
        total = confusion.sum(2)[:, classes] + confusion.sum(1)[:, classes]
    return (2.0 * inter.double() / total.double()).to(torch.float32)


def hausdorff_distance(
    pred: Array,
    target: Array,
    spacing: SpacingLike = None,
    percentile: Optional[float] = None,
    directed: bool = False,
    convention: str = "monai",
    num_classes: Optional[int] = None,
    include_background: bool = False,
) -> torch.Tensor:
    """Hausdorff distance (``percentile=None``) or its percentile (e.g. 95 for HD95) per (sample, class),
    (B, K) float32 in mm, as ``surface_metrics``' ``'hd'`` / ``'hd_percentile'``. ``directed=True``: from the
    prediction's surface to the target's only (MONAI's ``directed``). Arguments as :func:`surface_metrics`."""
    fn = "hausdorff_distance"
    if not isinstance(directed, bool):
        _fail(fn, "directed", "True or False", directed)
    key = "hd" if percentile is None else "hd_percentile"
    if directed:
        key += "_directed"
    out = _evaluate(fn, pred, target, spacing=spacing, convention=convention, num_classes=num_classes,
                    include_background=include_background, percentile=100 if percentile is None else percentile,
                    taus=[0.0], wanted={key})
    return out[key]


def average_surface_distance(
    pred: Array,
    target: Array,
    spacing: SpacingLike = None,
    symmetric: bool = True,
    convention: str = "monai",
    num_classes: Optional[int] = None,
    include_background: bool = False,
) -> torch.Tensor:
    """Average symmetric surface distance (``symmetric=True``, ``surface_metrics``' ``'assd'``) or the mean
    distance from the prediction's surface to the target's (``'asd_pred_to_target'``), (B, K) float32 in mm.
    Arguments as :func:`surface_metrics`."""
    fn = "average_surface_distance"
    if not isinstance(symmetric, bool):
        _fail(fn, "symmetric", "True or False", symmetric)
    key = "assd" if symmetric else "asd_pred_to_target"
    out = _evaluate(fn, pred, target, spacing=spacing, convention=convention, num_classes=num_classes,
                    include_background=include_background, percentile=100, taus=[0.0], wanted={key})
    return out[key]


def normalized_surface_dice(
    pred: Array,
    target: Array,
    tolerance: Union[float, Sequence[float]],
    spacing: SpacingLike = None,
    convention: str = "monai",
    num_classes: Optional[int] = None,
    include_background: bool = False,
) -> torch.Tensor:
    """Normalised surface Dice at ``tolerance`` mm per (sample, class), (B, K) float32 — (B, K, T) for a
    sequence of T tolerances — as ``surface_metrics``' ``'nsd'``. Arguments as :func:`surface_metrics`."""
    fn = "normalized_surface_dice"
    taus, is_seq = _tolerances(fn, tolerance)
    out = _evaluate(fn, pred, target, spacing=spacing, convention=convention, num_classes=num_classes,
                    include_background=include_background, percentile=100, taus=taus, wanted={"nsd"})
    return out["nsd"] if is_seq else out["nsd"][..., 0]
