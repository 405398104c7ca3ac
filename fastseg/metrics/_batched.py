"""Every (sample, class) of a batch at once: the surface metrics in a number of device operations that does not
grow with the number of classes — what the GPU needs, where a Python loop over (sample, class) pays a few
dozen kernel launches and host synchronisations per organ.

The pairs' crops (each class's box of pred ∪ target, grown by one voxel, as in fastseg.metrics._surfaces) are
grouped into buckets of similar shape; a bucket is one (P, *D) stack of windows, D the elementwise largest
crop. A window starts where its crop starts and runs on past it, but a class has no voxel outside its box, so
the extra voxels are background and the surfaces, their points and the distances between them are those of the
crop: one gather, one surface extraction, one batched exact EDT (per-window spacing) and row-wise reductions
per bucket give every metric of every pair in it. Buckets cap the padding at twice the crops' total volume,
and their size at 2^26 voxels unless a single crop is larger.

Reductions run on (P, n) rows of surface distances padded with +inf: sorted rows give MONAI's quantile (the
same float32 rank, truncation and lerp as torch.quantile) and surface-distance's area-weighted percentile.
Sums and surface Dice counts are taken in other orders than the per-pair path, so ASSD and area sums can
differ from it in the last bits (float64 accumulation here); every other value is the same.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from fastseg.metrics import _masks, _surfaces, _surfels
from fastseg.ops import edt as _edt_ops

__all__ = ["evaluate_batched"]

_MAX_PADDING = 2.0  # a bucket's volume may reach this multiple of its crops' total volume
# and at most this many voxels unless one crop is larger (the EDT of a bucket holds 8 bytes per voxel, the
# masks and surfaces a few more): a bad prediction scattered over the whole volume gets a bucket of its own.
_MAX_BUCKET_VOXELS = 1 << 26


class _Pair:
    __slots__ = ("index", "b", "k", "lo", "shape", "has_p", "has_t")

    def __init__(self, index, b, k, box, has_p, has_t):
        self.index, self.b, self.k, self.has_p, self.has_t = index, b, k, has_p, has_t
        self.lo = [f - 1 for f in box[0]]
        self.shape = [l - f + 3 for f, l in zip(*box)]


def _volume(shape) -> int:
    return math.prod(shape)


def _buckets(pairs: List[_Pair]) -> List[Tuple[List[int], List[_Pair]]]:
    """Best-fit grouping, largest crops first: a pair joins the bucket whose volume grows least by it, if the
    bucket's volume stays within _MAX_PADDING times its crops' total and _MAX_BUCKET_VOXELS; otherwise it
    opens a bucket."""
    buckets = []  # [shape, members, total crop volume]
    for pair in sorted(pairs, key=lambda p: _volume(p.shape), reverse=True):
        best, best_volume = None, None
        for bucket in buckets:
            shape, members, total = bucket
            grown = [max(a, b) for a, b in zip(shape, pair.shape)]
            volume = _volume(grown) * (len(members) + 1)
            fits = volume <= _MAX_PADDING * (total + _volume(pair.shape)) and volume <= _MAX_BUCKET_VOXELS
            if fits and (best is None or volume < best_volume):
                best, best_volume = (bucket, grown), volume
        if best is None:
            buckets.append([list(pair.shape), [pair], _volume(pair.shape)])
        else:
            bucket, grown = best
            bucket[0], bucket[2] = grown, bucket[2] + _volume(pair.shape)
            bucket[1].append(pair)
    return [(shape, members) for shape, members, _ in buckets]


def _gather_windows(source, members: List[_Pair], shape: List[int], device) -> torch.Tensor:
    """(P, *shape) bool windows of each member's class, starting at its crop's corner, zeros off the image."""
    nd = len(shape)
    b = torch.tensor([m.b for m in members], device=device)
    lo = torch.tensor([m.lo for m in members], device=device)
    index, valid = [b.view(-1, *([1] * nd))], None
    for axis, n in enumerate(shape):
        view = [-1] + [1] * nd
        view[1 + axis] = n
        i = (lo[:, axis:axis + 1] + torch.arange(n, device=device)).view(view)
        ok = (i >= 0) & (i < source.spatial[axis])
        valid = ok if valid is None else valid & ok
        index.append(i.clamp(0, source.spatial[axis] - 1))
    k = torch.tensor([m.k for m in members], device=device).view(-1, *([1] * nd))
    if isinstance(source, _masks.ChannelMasks):
        windows = source.data[(index[0], k + source.channels[0], *index[1:])]
    else:
        classes = torch.tensor(source.classes, device=device)[k]
        windows = source.data[tuple(index)] == classes
    return windows & valid


def _surfaces_of(windows: torch.Tensor, nd: int, kind: str, tables: Optional[torch.Tensor],
                 table_index: Optional[torch.Tensor]):
    """(points, areas): (P, *grid) bool surface points and, for surfels, the (P, *grid) float64 area grid."""
    if kind == _surfaces.VOXEL:
        return _surfaces.voxel_edges(windows, nd), None
    codes = _surfaces.surfel_codes(windows, nd)
    points = _surfaces.surfel_points(codes, nd)
    areas = tables[table_index.view(-1, *([1] * nd)), codes.long()]
    return points, areas


def _padded_rows(values: torch.Tensor, points: torch.Tensor, fill: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(P, n_max) rows of ``values`` at each window's points, in the windows' order, padded with ``fill``;
    and the (P,) point counts."""
    P = points.shape[0]
    flat = points.reshape(P, -1)
    counts = flat.sum(1)
    width = int(counts.max()) if P else 0
    rows = values.new_full((P, max(width, 1)), fill)
    row = torch.arange(P, device=points.device).view(-1, 1).expand_as(flat)[flat]
    start = torch.cumsum(counts, 0) - counts
    column = torch.arange(row.numel(), device=points.device) - start[row]
    rows[row, column] = values.reshape(P, -1)[flat]
    return rows, counts


def _monai_reduce(d: torch.Tensor, n: torch.Tensor, q: float, tau32: torch.Tensor) -> Dict:
    """One direction: d (P, w) float32 rows padded with +inf, n (P,) counts (all > 0)."""
    d, _ = torch.sort(d, 1)
    out = {"max": d.gather(1, (n - 1).view(-1, 1))[:, 0]}
    # torch.quantile's float32 rank, truncated below, as fastseg.metrics.surface._quantile
    rank = torch.tensor(q, dtype=torch.float32, device=d.device) * (n - 1).to(torch.float32)
    below, above = rank.to(torch.int64), torch.ceil(rank).to(torch.int64)
    v_below = d.gather(1, below.view(-1, 1))[:, 0]
    v_above = d.gather(1, above.view(-1, 1))[:, 0]
    out["quantile"] = torch.lerp(v_below, v_above, rank - below.to(torch.float32))
    finite = torch.where(torch.isinf(d), torch.zeros_like(d), d)
    out["sum"] = finite.double().sum(1)
    out["count"] = n.double()
    out["within"] = torch.searchsorted(d, tau32.expand(d.shape[0], -1).contiguous(), right=True).double()
    return out


def _deepmind_reduce(d: torch.Tensor, a: torch.Tensor, n: torch.Tensor, q: float, tau64: torch.Tensor) -> Dict:
    """One direction: d (P, w) float64 rows padded with +inf, a their areas (padded with 0), n counts > 0."""
    d, order = torch.sort(d, dim=1, stable=True)
    a = a.gather(1, order)
    cum = torch.cumsum(a, 1)
    total = a.sum(1)
    out = {"max": d.gather(1, (n - 1).view(-1, 1))[:, 0], "count": total}
    fraction = cum / total.view(-1, 1)
    index = torch.searchsorted(fraction, fraction.new_full((d.shape[0], 1), q)).clamp_max((n - 1).view(-1, 1))
    out["quantile"] = d.gather(1, index)[:, 0]
    out["sum"] = (torch.where(torch.isinf(d), torch.zeros_like(d), d) * a).sum(1)
    upto = torch.searchsorted(d, tau64.expand(d.shape[0], -1).contiguous(), right=True)
    padded = torch.cat([cum.new_zeros(d.shape[0], 1), cum], 1)
    out["within"] = padded.gather(1, upto)
    return out


def _bucket_values(psrc, tsrc, members, shape, spacing_rows, kind, q, taus, tables, device):
    """{key: (P,) or (P, T) float64} for the members of one bucket, in layout keys of fastseg.metrics.surface."""
    nd = len(shape)
    pw = _gather_windows(psrc, members, shape, device)
    tw = _gather_windows(tsrc, members, shape, device)
    P = len(members)
    table_index = None
    if tables is not None:
        table_index = torch.tensor([tables[1][tuple(spacing_rows[m.b])] for m in members], device=device)
    points_p, area_p = _surfaces_of(pw, nd, kind, tables[0] if tables else None, table_index)
    points_t, area_t = _surfaces_of(tw, nd, kind, tables[0] if tables else None, table_index)
    both = torch.tensor([m.has_p and m.has_t for m in members], device=device)
    T = taus[0].numel()
    values = {key: torch.full((P,), math.inf, dtype=torch.float64, device=device)
              for key in ("hd", "hd_percentile", "assd", "asd_pred_to_target", "asd_target_to_pred",
                          "hd_directed", "hd_percentile_directed")}
    values["nsd"] = torch.zeros(P, T, dtype=torch.float64, device=device)
    sel = both.nonzero()[:, 0]
    if sel.numel():
        sp, st = points_p[sel], points_t[sel]
        rows = [spacing_rows[members[i].b] for i in sel.tolist()]
        flat_spacing = [v for row in rows + rows for v in row]
        dist = _edt_ops.edt(torch.cat([~st, ~sp]), flat_spacing)  # to the target's surface, then the pred's
        m = sel.numel()
        if kind == _surfaces.VOXEL:
            dp, n_p = _padded_rows(dist[:m], sp, math.inf)
            dt, n_t = _padded_rows(dist[m:], st, math.inf)
            rp = _monai_reduce(dp, n_p, q, taus[0])
            rt = _monai_reduce(dt, n_t, q, taus[0])
        else:
            dp, n_p = _padded_rows(dist[:m].double(), sp, math.inf)
            dt, n_t = _padded_rows(dist[m:].double(), st, math.inf)
            ap, _ = _padded_rows(area_p[sel], sp, 0.0)
            at, _ = _padded_rows(area_t[sel], st, 0.0)
            rp = _deepmind_reduce(dp, ap, n_p, q, taus[1])
            rt = _deepmind_reduce(dt, at, n_t, q, taus[1])
        scatter = {
            "hd_directed": rp["max"].double(), "hd": torch.maximum(rp["max"], rt["max"]).double(),
            "asd_pred_to_target": rp["sum"] / rp["count"],
            "asd_target_to_pred": rt["sum"] / rt["count"],
            "assd": (rp["sum"] + rt["sum"]) / (rp["count"] + rt["count"]),
            "hd_percentile_directed": rp["quantile"].double(),
            "hd_percentile": torch.maximum(rp["quantile"], rt["quantile"]).double(),
        }
        for key, v in scatter.items():
            values[key][sel] = v
        values["nsd"][sel] = (rp["within"] + rt["within"]) / (rp["count"] + rt["count"]).view(-1, 1)
    overlap = (pw & tw).reshape(P, -1).sum(1).double()
    values["dice"] = 2.0 * overlap / (pw.reshape(P, -1).sum(1) + tw.reshape(P, -1).sum(1)).double()
    return values


def evaluate_batched(psrc, tsrc, boxes_p, boxes_t, spacing_rows: List[List[float]], kind: str, q: float,
                     taus, device) -> Dict[str, torch.Tensor]:
    """{key: (B * K,) or (B * K, T) float64} for every (sample, class), (sample, class) in row-major order;
    both masks empty gives nan everywhere, as the per-pair path."""
    B, K = len(boxes_p), len(boxes_p[0]) if boxes_p else 0
    T = taus[0].numel()
    keys = ("hd", "hd_percentile", "assd", "asd_pred_to_target", "asd_target_to_pred", "hd_directed",
            "hd_percentile_directed", "dice")
    out = {key: torch.full((B * K,), math.nan, dtype=torch.float64, device=device) for key in keys}
    out["nsd"] = torch.full((B * K, T), math.nan, dtype=torch.float64, device=device)
    pairs = []
    for b in range(B):
        for k in range(K):
            box = _masks.union_box(boxes_p[b][k], boxes_t[b][k])
            if box is not None:
                pairs.append(_Pair(b * K + k, b, k, box, boxes_p[b][k] is not None, boxes_t[b][k] is not None))
    tables = None
    if kind == _surfaces.SURFEL:
        distinct = list(dict.fromkeys(tuple(row) for row in spacing_rows))
        tables = (torch.stack([_surfels.measure_table(list(s), device=device) for s in distinct]),
                  {s: i for i, s in enumerate(distinct)})
    for shape, members in _buckets(pairs):
        values = _bucket_values(psrc, tsrc, members, shape, spacing_rows, kind, q, taus, tables, device)
        index = torch.tensor([m.index for m in members], device=device)
        for key, v in values.items():
            out[key][index] = v.to(torch.float64)
    return out
