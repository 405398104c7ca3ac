"""Surfaces of the two masks of one (sample, class) crop and the distance of every surface point to the other
surface: the one computation every surface metric of every convention is reduced from.

Two kinds of surface, as the libraries whose numbers fastseg reproduces define them:

* ``"voxel"`` (MONAI's ``get_mask_edges`` without spacing, MedPy): the mask's voxels removed by a binary
  erosion with the 6-connected cross (4-connected in 2D), the image's outside counting as background.
* ``"surfel"`` (DeepMind's surface-distance, MONAI's ``use_subvoxels=True``): the corners of the voxel grid
  whose 2^nd surrounding voxels are neither all inside nor all outside, each weighted by the area (length in
  2D) of the marching-cubes surface through its block (fastseg.metrics._surfels).

Distances between the two point sets come from one exact EDT of the complement of each surface on the crop,
read at the other surface's points only. A crop holds every surface point of both masks, so the nearest point
found inside it is the nearest point overall: the crop changes nothing but the cost.
"""
from __future__ import annotations

import math
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from fastseg.metrics import _masks, _surfels
from fastseg.ops import edt as _edt_ops

__all__ = ["SurfacePair", "iter_pairs", "voxel_edges", "surfel_codes"]

VOXEL, SURFEL = "voxel", "surfel"
EUCLIDEAN, CHESSBOARD, TAXICAB = "euclidean", "chessboard", "taxicab"


class SurfacePair(NamedTuple):
    """One (sample, class): distances (float32, mm) from each surface point of one mask to the other mask's
    surface, the points' areas (float64, surfel surfaces only) and voxel counts for the volumetric Dice.

    A surface whose mask is empty has no points; the other surface's distances are then +inf.
    """

    d_pred: torch.Tensor
    d_target: torch.Tensor
    area_pred: Optional[torch.Tensor]
    area_target: Optional[torch.Tensor]
    pred_voxels: torch.Tensor
    target_voxels: torch.Tensor
    overlap_voxels: torch.Tensor


def _edt(mask: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """fastseg's exact EDT (scipy.ndimage semantics, float32) of a (B, *spatial) batch of masks."""
    return _edt_ops.edt(mask, [float(s) for s in spacing])


def voxel_edges(crop: torch.Tensor, nd: Optional[int] = None) -> torch.Tensor:
    """mask XOR binary_erosion(mask) with the cross-shaped structuring element (scipy's default, MONAI's
    ``get_mask_edges``) over the last ``nd`` axes (default: all; leading axes are a batch). The crop has a
    background margin, so only its interior can be eroded into."""
    lead = 0 if nd is None else crop.dim() - nd
    spatial = crop.shape[lead:]
    core = (slice(None),) * lead + tuple(slice(1, n - 1) for n in spatial)
    eroded = crop[core].clone()
    for axis in range(lead, crop.dim()):
        for shift in (0, 2):
            index = list(core)
            index[axis] = slice(shift, shift + crop.shape[axis] - 2)
            eroded &= crop[tuple(index)]
    edges = crop.clone()
    edges[core] &= ~eroded
    return edges


def surfel_codes(crop: torch.Tensor, nd: Optional[int] = None) -> torch.Tensor:
    """Neighbour code of every 2^nd block of the crop's last ``nd`` axes (default: all), on the corner grid
    (one smaller per axis), with the bit of each voxel of the block as in surface-distance and MONAI
    (fastseg.metrics._surfels.code_bit).

    Built one axis at a time from the last: pairing neighbours along an axis doubles the bits per point, and
    the lower offset's bits move up by the number of bits already there, which yields code_bit's order."""
    lead = 0 if nd is None else crop.dim() - nd
    codes = crop.to(torch.uint8)
    width = 1
    for axis in reversed(range(lead, crop.dim())):
        n = codes.shape[axis]
        codes = (codes.narrow(axis, 0, n - 1) << width) | codes.narrow(axis, 1, n - 1)
        width *= 2
    return codes


def surfel_points(codes: torch.Tensor, nd: int) -> torch.Tensor:
    """Blocks that hold surface: codes neither 0 nor all ones (0 wraps to 255 in uint8, so one test)."""
    full = (1 << (1 << nd)) - 1
    return (codes - 1) < (full - 1)


def _surface(crop: torch.Tensor, kind: str, table: Optional[torch.Tensor]):
    """(points, areas) of one mask's surface: a bool grid and, for surfels, the float64 area per point."""
    if kind == VOXEL:
        return voxel_edges(crop), None
    codes = surfel_codes(crop)
    points = surfel_points(codes, crop.dim())
    return points, table[codes[points].long()]


def _cdt(mask: torch.Tensor, metric: str) -> torch.Tensor:
    """Chamfer (chessboard / taxicab) distance transform, as MONAI computes those metrics (scipy, no spacing)."""
    from scipy.ndimage import distance_transform_cdt

    out = distance_transform_cdt(mask.cpu().numpy(), metric=metric)
    return torch.from_numpy(out).to(device=mask.device, dtype=torch.float32)


def _distances(points_p, points_t, spacing, metric) -> Tuple[torch.Tensor, torch.Tensor]:
    """Distance of each point of one surface to the nearest point of the other, both ways (both non-empty)."""
    if metric == EUCLIDEAN:
        to_surface = _edt(torch.stack([~points_t, ~points_p]), spacing)
        to_t, to_p = to_surface[0], to_surface[1]
    else:
        to_t, to_p = _cdt(~points_t, metric), _cdt(~points_p, metric)
    return to_t[points_p], to_p[points_t]


def _identical(pred_crop: torch.Tensor, target_crop: torch.Tensor) -> bool:
    """Identical masks have identical surfaces, so every distance is 0 and no transform is needed (common in
    inter-annotator comparisons, where small organs are often copied)."""
    return torch.equal(pred_crop, target_crop)


def surface_pair(pred_crop, target_crop, spacing, kind, metric, table, has_p, has_t) -> SurfacePair:
    """has_p / has_t: whether each mask is non-empty (known from the boxes already found)."""
    points_p, area_p = _surface(pred_crop, kind, table)
    points_t, area_t = _surface(target_crop, kind, table)
    if has_p and has_t and _identical(pred_crop, target_crop):
        d_p = torch.zeros(int(points_p.sum()), device=pred_crop.device)
        d_t = d_p.clone()
    elif has_p and has_t:
        d_p, d_t = _distances(points_p, points_t, spacing, metric)
    else:  # at most one surface: no distance exists, every point of the other one is infinitely far
        d_p = torch.full((int(points_p.sum()),), math.inf, device=pred_crop.device)
        d_t = torch.full((int(points_t.sum()),), math.inf, device=pred_crop.device)
    return SurfacePair(
        d_p, d_t, area_p, area_t, torch.count_nonzero(pred_crop), torch.count_nonzero(target_crop),
        torch.count_nonzero(pred_crop & target_crop),
    )


def iter_pairs(
    pred, target, boxes_p, boxes_t, spacing_rows: List[List[float]], kind: str = VOXEL, metric: str = EUCLIDEAN
) -> Iterator[Tuple[int, int, Optional[SurfacePair]]]:
    """(b, k, SurfacePair) for every sample b and evaluated class k of two mask sources (fastseg.metrics._masks)
    with their boxes (_masks.find_boxes), or (b, k, None) where both masks are empty. One crop, one pair of
    surfaces and one distance transform per (sample, class), on the crop of the union's bounding box grown by
    one voxel (MONAI's margin; DeepMind's zero padding of the box gives the same corner grid)."""
    tables = {}
    device = pred.data.device
    for b, (row_p, row_t) in enumerate(zip(boxes_p, boxes_t)):
        spacing = spacing_rows[b]
        table = None
        if kind == SURFEL:
            key = tuple(spacing)
            if key not in tables:
                tables[key] = _surfels.measure_table(spacing, device=device)
            table = tables[key]
        for k, (box_p, box_t) in enumerate(zip(row_p, row_t)):
            box = _masks.union_box(box_p, box_t)
            if box is None:
                yield b, k, None
                continue
            pc = _crop_or_zeros(pred, b, k, box, box_p is not None)
            tc = _crop_or_zeros(target, b, k, box, box_t is not None)
            yield b, k, surface_pair(pc, tc, spacing, kind, metric, table, box_p is not None, box_t is not None)


def _crop_or_zeros(source, b, k, box, present) -> torch.Tensor:
    if present:
        return _masks.crop(source, b, k, box, margin=1)
    shape = [h - l + 3 for l, h in zip(*box)]
    return torch.zeros(shape, dtype=torch.bool, device=source.data.device)
