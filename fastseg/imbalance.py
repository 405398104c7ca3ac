"""Exact class-imbalance analysis of patch-based training, and patch-size recommendation.

Tappeiner, Welk & Schubert ("Tackling the class imbalance problem of deep learning-based head and neck organ
segmentation", IJCARS 2022, https://doi.org/10.1007/s11548-022-02649-5) choose nnU-Net's training patch
size by a class-imbalance measure: they draw many patches with the training sampler and take the spread
(standard deviation) of the per-batch label ratios. This module computes the ingredients of such a measure
*exactly* — as expectations over every patch position the sampler of :mod:`fastseg.data.sampling` can
draw, not from a few thousand draws — and from them a score, for a grid of patch sizes and
foreground-oversampling ratios.

Sampler (the "Patch sampling semantics" of fastseg, implemented by
:class:`fastseg.data.sampling.PatchSampler`): a case is padded to at least the patch size (label 0 around
it, centred); a patch is the box ``[lo, lo + P)``. With probability ``1 - o`` it is a *random* patch, ``lo``
uniform over all valid positions; with probability ``o`` (``oversample_foreground``) a *foreground* patch:
a class ``c`` uniform among the foreground classes present in the case (not 0, not the ignore label), a
voxel ``v`` uniform among the voxels of ``c``, ``lo = clip(v - P // 2, 0, S' - P)``. A case without
foreground always gives a random patch. Every sample picks its case uniformly.

Per class ``c``, patch size ``P`` and ratio ``o`` the report holds

* ``fraction[c] = f_c = E[n_c] / |P|``: the expected share of the patch's voxels that belong to class
  ``c`` (``n_c`` = voxels of class ``c`` in the patch, padding counts as background, ignored voxels count
  for no class, so the shares add up to one minus the expected ignored share), and
* ``presence[c] = p_c = Pr[n_c > 0]``: the probability that a sampled patch contains class ``c``.

Both are linear in the sampling distribution, so they are mixtures ``(1 - o) * random + o * foreground``
of the two modes, averaged over the cases.

Imbalance score
---------------
With ``S`` the classes that occur in the data set (background always included), ``K = |S|``, ``F = S`` minus
the background and ``B`` the batch size::

    score = sqrt( mean_{c in S} ln(K * f_c) ** 2  +  mean_{c in F} (1 - p_c) / (B * p_c) )

Why this form. The paper's measure is the spread of the per-batch label ratios ``r_c`` (share of class
``c`` in a batch) around their mean; a perfectly balanced batch has every ``r_c = 1 / K``. Two things make
the ratios of a batch deviate from balance, and the score adds one term for each:

1. *Between classes*: the expected shares ``f_c = E[r_c]`` differ. The term is the mean squared
   **log**-deviation of ``f_c`` from ``1 / K``. The log scale is the point: organ volumes span four orders of
   magnitude (head and neck: brain 6e5 voxels, cochlea 20), and on a linear scale (the paper's standard
   deviation) the background share alone decides the value, while a class 1000 times under-represented
   counts no more than one 10 times under-represented. In log units both directions and all organ sizes
   weigh alike (the term is zero exactly when every class has the share ``1 / K``).
2. *Between batches*: ``r_c`` fluctuates from batch to batch, above all because small classes are absent
   from most patches. The term is the mean over the foreground classes of the squared coefficient of
   variation of ``r_c`` over batches of ``B`` independent patches, ``Var(r_c) / E[r_c]^2``, evaluated for a
   class whose share is the same in every patch that contains it: then ``Var(r_c) / E[r_c]^2 =
   (1 - p_c) / (B p_c)``. It is what presence-sensitive losses (Dice, the paper's class adaptive Dice) feel:
   a class absent from a batch gets no overlap gradient. The background, present in all but patches lying
   wholly inside organs, is left out of this term.

The paper's squared spread splits the same way, ``E[(r_c - 1/K)^2] = (f_c - 1/K)^2 + Var(r_c)``; the score
measures both parts relative to each class's own scale (log ratio to balance, coefficient of variation), so
that it is dimensionless and not decided by the background alone. Lower is better; 0 means every batch is
perfectly balanced. The two terms pull in opposite directions: foreground oversampling with small patches
raises the share of every organ (term 1 falls as the patch shrinks), while small patches miss most organs
most of the time (term 2 rises). On the head-and-neck masks with nnU-Net's 1/3 oversampling the share term
wins and the score favours small patches (so would the paper's linear spread, whose background part falls
with the background share); without oversampling it favours large ones. The score measures imbalance, not context:
keep the candidates to sizes that give the network enough of it.

Algorithm
---------
Everything is separable over the axes and restricted to bounding boxes, and whatever does not depend on
the patch size is computed once per case:

* Along each axis, the patch positions whose window meets a class's bounding box fall into at most
  ``min(w + P - 1, 2w - 1)`` *runs* inside which the window clipped to the box is the same (``w`` the box
  extent), so the count ``n_c(lo)`` is constant on each product of runs. Counts on that grid come from
  separable cumulative sums of the cropped class mask. The random mode weights a cell by its number of
  positions; the foreground mode by its probability, the sum of ``W(v) = 1 / (K_case * N_c')`` over the
  voxels ``v`` (of any class ``c'``) whose centred patch starts there — the inverse of ``clip`` maps a run to
  an interval of voxels, so this is a box count from each class's summed-volume table.
* For a large class the grid is larger than the class's box, and it is cheaper to go the other way: the
  expected random count is the mask contracted with the per-axis coverage counts; presence under random
  patches is the mask OR-dilated by the patch, bit-packed along the last axis (one bit per position) and
  dilated along the others with sparse tables, so it costs an area rather than a volume; the foreground mode
  visits the voxels of each nearby class, grouped into runs that see the same clipped window (counts), and
  ANDs their columns with the dilation bits (presence). A patch centred on a voxel always contains it.
* The background's presence is one minus the probability that the patch lies wholly inside the non-
  background voxels (a bit-packed erosion, skipped when no column has a long enough run); its share is what
  the classes and the ignore label leave.

Each class takes whichever of the two ways a cost model (fitted on the head-and-neck masks) predicts to be
cheaper; both are exact. What does not depend on the patch size (crops, cumulative sums, summed-volume
tables) is computed once per case, and the cases are independent (``num_workers`` processes).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

__all__ = ["analyze_imbalance", "ImbalanceReport", "Recommendation", "imbalance_score",
           "estimate_training_memory"]

_WHERE = "analyze_imbalance"


def _fail(where: str, name: str, expected: str, got) -> None:
    raise ValueError(f"{where}: {name}: expected {expected}, got {got!r}")


def _describe(a) -> str:
    a = np.asarray(a)
    return f"{a.dtype} array of shape {tuple(a.shape)}"


# --------------------------------------------------------------------------------------------- geometry


class _Axis:
    """One axis of the sampler's geometry for a case of ``size`` voxels and a patch of ``patch`` voxels.

    Coordinates ``u``/``v`` are voxel indices of the unpadded case; ``lo`` are patch positions (padded)."""

    __slots__ = ("size", "patch", "pad", "last", "half", "positions")

    def __init__(self, size: int, patch: int):
        padded = max(size, patch)
        self.size, self.patch = size, patch
        self.pad = (padded - size) // 2
        self.last = padded - patch
        self.half = patch // 2
        self.positions = self.last + 1

    def coverage(self, u: np.ndarray) -> np.ndarray:
        """Number of positions whose window contains voxel ``u``."""
        p = u + self.pad
        return np.minimum(p, self.last) - np.maximum(0, p - self.patch + 1) + 1

    def start(self, v: np.ndarray) -> np.ndarray:
        """Position of a foreground patch centred on voxel ``v``."""
        return np.minimum(np.maximum(v + (self.pad - self.half), 0), self.last)

    def sources(self, l: np.ndarray, h: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Voxels ``v`` with ``start(v)`` in ``[l, h]``: the half-open range ``[vl, vh)`` (``start`` is
        monotone, so the preimage of an interval is an interval; the clipped ends absorb the border)."""
        shift = self.half - self.pad
        vl = np.where(l > 0, np.minimum(np.maximum(l + shift, 0), self.size), 0)
        vh = np.where(h < self.last, np.minimum(np.maximum(h + shift + 1, 0), self.size), self.size)
        return vl, np.maximum(vh, vl)

    def window(self, lo: np.ndarray, begin: int, extent: int) -> Tuple[np.ndarray, np.ndarray]:
        """The window of positions ``lo`` in the coordinates of a box ``[begin, begin + extent)``, clipped."""
        first = lo - (self.pad + begin)
        return (np.minimum(np.maximum(first, 0), extent),
                np.minimum(np.maximum(first + self.patch, 0), extent))

    def reach(self, begin: int, extent: int) -> Tuple[int, int]:
        """Positions whose window meets ``[begin, begin + extent)``: ``[A, Z]`` (never empty)."""
        return (max(0, begin + self.pad - self.patch + 1), min(self.last, begin + extent - 1 + self.pad))


class _Blocks:
    """Runs of the positions along one axis that meet a box, inside which the box's clipped window is the
    same (so is any count of voxels of the box): at most ``min(w + P - 1, 2w - 1)`` of them.

    Attributes:
        first, last: position range of each run (inclusive).
        start, stop: its window in box coordinates.
        vl, vh: the voxels that send a foreground patch into the run, ``[vl, vh)``; consecutive runs own
            consecutive voxel ranges (``vh[j] == vl[j + 1]``).
    """

    __slots__ = ("first", "last", "start", "stop", "vl", "vh", "bounds")

    def __init__(self, ax: _Axis, begin: int, extent: int):
        a, z = ax.reach(begin, extent)
        lo = np.arange(a, z + 1)
        i0, i1 = ax.window(lo, begin, extent)
        cut = np.flatnonzero((i0[1:] != i0[:-1]) | (i1[1:] != i1[:-1])) + 1
        head = np.concatenate(([0], cut))
        self.first, self.last = lo[head], lo[np.concatenate((cut, [len(lo)])) - 1]
        self.start, self.stop = i0[head], i1[head]
        self.vl, self.vh = ax.sources(self.first, self.last)
        self.bounds = np.concatenate((self.vl, self.vh[-1:]))

    @classmethod
    def single(cls, ax: _Axis, positions: np.ndarray) -> "_Blocks":
        """One run per position (no window: for probability masses only)."""
        out = cls.__new__(cls)
        out.first = out.last = positions
        out.start = out.stop = None
        out.vl, out.vh = ax.sources(positions, positions)
        out.bounds = np.concatenate((out.vl, out.vh[-1:]))
        return out

    def __len__(self) -> int:
        return len(self.first)

    def overlap(self, begin: int, extent: int) -> Tuple[int, int]:
        """Runs ``[j0, j1)`` whose voxel ranges meet ``[begin, begin + extent)``."""
        return (int(np.searchsorted(self.vh, begin, side="right")), int(np.searchsorted(self.vl, begin + extent)))


# ------------------------------------------------------------------------------------ separable kernels


def _count_dtype(size: int):
    return np.int32 if size < 2 ** 31 else np.int64


def _prefix(x: np.ndarray, axis: int, dtype) -> np.ndarray:
    """Cumulative sum of ``x`` along ``axis`` with a leading zero (``out[k] = x[:k].sum()``)."""
    shape = list(x.shape)
    shape[axis] += 1
    out = np.empty(shape, dtype)
    dst = np.moveaxis(out, axis, 0)
    dst[0] = 0
    if axis == x.ndim - 1 or x.size < 65536:
        np.cumsum(x, axis=axis, dtype=dtype, out=np.moveaxis(dst[1:], 0, axis))
        return out
    # numpy's cumsum along an outer axis runs its inner loop across the strided axis; adding whole
    # slabs one after the other is several times faster on large arrays
    src = np.moveaxis(x, axis, 0)
    for k in range(src.shape[0]):
        np.add(dst[k], src[k], out=dst[k + 1], dtype=dtype)
    return out


def _window_sums(mask: np.ndarray, windows: Dict[int, Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Counts of ``mask`` over a product of windows: along each axis ``a`` in ``windows`` the entry ``j``
    covers ``[start[j], stop[j])``; the other axes are kept. Separable cumulative sums."""
    dtype = _count_dtype(mask.size)
    out = mask
    # shrinking axes first keeps the intermediate arrays small
    for a in sorted(windows, key=lambda a: len(windows[a][0]) / max(mask.shape[a], 1)):
        start, stop = windows[a]
        table = _prefix(out, a, dtype)
        out = np.take(table, stop, axis=a)
        out -= np.take(table, start, axis=a)
    return out


def _window_reduce(x: np.ndarray, axis: int, start: np.ndarray, stop: np.ndarray, op) -> np.ndarray:
    """``op``-reduction (bitwise OR / AND) of ``x`` over the windows ``[start[j], stop[j])`` along ``axis``.

    A sparse table (levels of power-of-two windows) answers every window with two overlapping lookups,
    so the cost is ``n log n`` along the axis whatever the window lengths."""
    length = stop - start
    level = np.floor(np.log2(length)).astype(np.int64)
    tables = [x]
    for k in range(1, int(level.max()) + 1):
        prev, h = tables[-1], 1 << (k - 1)
        n = prev.shape[axis] - h
        lead = [slice(None)] * x.ndim
        lead[axis] = slice(0, n)
        tail = list(lead)
        tail[axis] = slice(h, h + n)
        tables.append(op(prev[tuple(lead)], prev[tuple(tail)]))
    shape = list(x.shape)
    shape[axis] = len(start)
    out = np.empty(shape, x.dtype)
    view = np.moveaxis(out, axis, 0)
    for k in np.unique(level):
        sel = np.flatnonzero(level == k)
        t = tables[k]
        part = op(np.take(t, start[sel], axis=axis), np.take(t, stop[sel] - (1 << int(k)), axis=axis))
        view[sel] = np.moveaxis(part, axis, 0)
    return out


def _prefix_table(values: np.ndarray, dtype) -> np.ndarray:
    """Summed-volume table with a zero border: ``T[i] = sum(values[:i0, :i1, ...])``."""
    table = values
    for a in range(values.ndim):
        table = _prefix(table, a, dtype)
    return table


def _interval_counts(table: np.ndarray, bounds: Sequence[np.ndarray]) -> np.ndarray:
    """Sums over the product of consecutive intervals ``[bounds_a[j], bounds_a[j + 1])`` from a summed-volume
    table: one gather of the boundary grid, then a difference along each axis."""
    grid = table[np.ix_(*bounds)]
    for a in range(grid.ndim):
        head = (slice(None),) * a
        grid = grid[head + (slice(1, None),)] - grid[head + (slice(None, -1),)]
    return grid


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """``sum(a * b)`` in float64 without BLAS: OpenBLAS wakes its thread pool even for small products, which
    costs milliseconds per call on a busy machine (einsum's own loop does not)."""
    return float(np.einsum("i,i->", a.ravel(), b.ravel(), dtype=np.float64))


def _weighted_sum(values: np.ndarray, vectors: Sequence[np.ndarray]) -> float:
    """``sum(values * outer(vectors))`` without forming the outer product (nor calling BLAS)."""
    out = values
    for v in reversed(vectors):
        out = np.einsum("...i,i->...", out, v, dtype=np.float64)
    return float(out)


def _contract(mask: np.ndarray, vectors: Sequence[np.ndarray]) -> float:
    """``sum(mask * outer(vectors))`` for a 0/1 mask and integer vectors, exactly (integer arithmetic)."""
    out = np.einsum("...i,i->...", mask.view(np.uint8), vectors[-1].astype(np.int64), dtype=np.int64)
    return _weighted_sum(out.astype(np.float64), [v.astype(np.float64) for v in vectors[:-1]])


# ------------------------------------------------------------------------------------------ one case


class _Region:
    """A 0/1 mask cropped to its bounding box (``begin`` in case coordinates) and the patch-size independent
    tables built from it on first use: cumulative sums along the last axis and the summed-volume table."""

    def __init__(self, begin: Tuple[int, ...], mask: np.ndarray):
        self.begin = tuple(int(b) for b in begin)
        self.mask = np.ascontiguousarray(mask)
        self.extent = self.mask.shape
        self.size = int(self.mask.size)
        self._tail: Optional[np.ndarray] = None
        self._table: Optional[np.ndarray] = None

    @property
    def tail(self) -> np.ndarray:
        """``tail[..., k] = mask[..., :k].sum(-1)``."""
        if self._tail is None:
            self._tail = _prefix(self.mask, self.mask.ndim - 1, _count_dtype(self.size))
        return self._tail

    @property
    def table(self) -> np.ndarray:
        """Summed-volume table of the mask (exact integers)."""
        if self._table is None:
            self._table = _prefix_table(self.mask, _count_dtype(self.size))
        return self._table

    def window_sums(self, windows: Sequence[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Counts of the mask over the product of windows ``[start_a[j], stop_a[j])`` (crop coordinates)."""
        last = len(windows) - 1
        start, stop = windows[last]
        out = np.take(self.tail, stop, axis=last)
        out -= np.take(self.tail, start, axis=last)
        return _window_sums(out, {a: windows[a] for a in range(last)}) if last else out


@dataclass
class _CaseStats:
    """Expected counts and presence per class code of one case for one patch size, both modes."""

    random_count: Dict[int, float] = field(default_factory=dict)
    random_present: Dict[int, float] = field(default_factory=dict)
    fg_count: Dict[int, float] = field(default_factory=dict)
    fg_present: Dict[int, float] = field(default_factory=dict)


class _Case:
    """The patch-size independent tables of one label map, and the exact statistics per patch size."""

    # per-element costs (seconds) of the two ways to treat a class, fitted on the head-and-neck masks
    _BLOCK_COST = (8e-9, 13e-9, 1e-3)  # per block-grid cell, per cell of a source's sub-grid, fixed
    _SOURCE_COST = (15e-9, 15e-9, 7.5e-9, 2.5e-3)  # per box voxel, per own-reach voxel, per other's, fixed

    def __init__(self, label: np.ndarray, num_classes: int, ignore_label: Optional[int]):
        self.shape = label.shape
        ndim = label.ndim
        self.regions: Dict[int, _Region] = {}
        self.counts: Dict[int, int] = {}
        self.nonbg: Optional[_Region] = None
        self.foreground: List[int] = []
        self.weights = np.zeros(num_classes + 1)
        nonbg = label != 0
        spans = []
        for a in range(ndim):
            hit = np.flatnonzero(nonbg.any(axis=tuple(b for b in range(ndim) if b != a)))
            if not hit.size:
                return
            spans.append((int(hit[0]), int(hit[-1]) + 1))
        box = tuple(slice(b, e) for b, e in spans)
        crop = np.ascontiguousarray(label[box])
        self.nonbg = _Region(tuple(b for b, _ in spans), nonbg[box])
        self.longest_run = self._longest_runs(self.nonbg.mask)
        # code num_classes stands for the ignore label, so per-slice bincounts need no special case
        codes = crop.astype(np.uint8 if num_classes < 255 else np.int64)
        if ignore_label is not None:
            codes[crop == ignore_label] = num_classes
        ncode = num_classes + 1
        first = np.full((ndim, ncode), -1, np.int64)
        last = np.full((ndim, ncode), -1, np.int64)
        total = np.zeros(ncode, np.int64)
        for a in range(ndim):
            hits = np.zeros((crop.shape[a], ncode), bool)
            for i in range(crop.shape[a]):
                hist = np.bincount(np.take(codes, i, axis=a).ravel(), minlength=ncode)
                hits[i] = hist > 0
                if a == 0:
                    total += hist
            for c in np.flatnonzero(hits.any(axis=0)):
                rows = np.flatnonzero(hits[:, c])
                first[a, c], last[a, c] = rows[0], rows[-1]
        for code in np.flatnonzero(total[1:]) + 1:
            code = int(code)
            sub = tuple(slice(int(first[a, code]), int(last[a, code]) + 1) for a in range(ndim))
            self.regions[code] = _Region(tuple(spans[a][0] + int(first[a, code]) for a in range(ndim)),
                                         codes[sub] == code)
            self.counts[code] = int(total[code])
        self.foreground = [c for c in self.regions if c != num_classes]
        # W(v) = Pr(foreground patch centred on v) = 1 / (classes present * voxels of v's class)
        for c in self.foreground:
            self.weights[c] = 1.0 / (len(self.foreground) * self.counts[c])

    @staticmethod
    def _longest_runs(mask: np.ndarray) -> np.ndarray:
        """Per column (all axes but the last), the longest run of True along the last axis."""
        run = np.zeros(mask.shape[:-1], np.int32)
        best = np.zeros_like(run)
        for k in range(mask.shape[-1]):
            run += 1
            run *= mask[..., k]
            np.maximum(best, run, out=best)
        return best

    # ---------------------------------------------------------------------------------- per patch size

    def analyze(self, patch: Sequence[int]) -> Tuple[_CaseStats, float, float]:
        """Exact statistics of every class present for one patch size.

        Returns:
            (stats keyed by class code, background presence under random patches, under foreground patches).
        """
        axes = [_Axis(s, p) for s, p in zip(self.shape, patch)]
        stats = _CaseStats()
        for code, region in self.regions.items():
            self._target(code, region, axes, stats)
        full_random, full_fg = self._inside_nonbg(axes)
        return stats, 1.0 - full_random, 1.0 - full_fg

    def _target(self, code: int, region: _Region, axes: List[_Axis], stats: _CaseStats) -> None:
        """Counts and presence of one class (the target) in both modes, by the cheaper of two exact ways."""
        blocks = [_Blocks(ax, b, w) for ax, b, w in zip(axes, region.begin, region.extent)]
        # per source class: the runs of each axis its voxels reach (block path), the box of its voxels
        # whose patches can meet the target (source path)
        near: Dict[int, List[Tuple[int, int]]] = {}
        for s in self.foreground:
            src = self.regions[s]
            runs = [bl.overlap(b, w) for bl, b, w in zip(blocks, src.begin, src.extent)]
            if all(j1 > j0 for j0, j1 in runs):
                near[s] = runs
        grid = math.prod(len(bl) for bl in blocks)
        sub = sum(math.prod(j1 - j0 for j0, j1 in runs) for runs in near.values())
        block_cost = self._BLOCK_COST[0] * grid + self._BLOCK_COST[1] * sub + self._BLOCK_COST[2]
        reach = {s: self._reach(self.regions[s], blocks, runs) for s, runs in near.items()}
        own, mine, other, fixed = self._SOURCE_COST
        source_cost = own * region.size + fixed + sum(
            (mine if s == code else other) * math.prod(hi - lo for lo, hi in box) for s, box in reach.items())
        if block_cost <= source_cost:
            self._by_blocks(code, region, axes, blocks, near, stats)
        else:
            self._by_sources(code, region, axes, blocks, reach, stats)

    @staticmethod
    def _reach(source: _Region, blocks: List[_Blocks], runs) -> List[Tuple[int, int]]:
        """The box of ``source`` voxels whose foreground patch can meet the target (``[lo, hi)`` per axis)."""
        return [(max(b, int(bl.vl[j0])), min(b + w, int(bl.vh[j1 - 1])))
                for bl, (j0, j1), b, w in zip(blocks, runs, source.begin, source.extent)]

    def _by_blocks(self, code: int, region: _Region, axes: List[_Axis], blocks: List[_Blocks], near,
                   stats: _CaseStats) -> None:
        """Counts on the grid of position runs, weighted by positions (random) and probability (foreground)."""
        positions = math.prod(ax.positions for ax in axes)
        counts = region.window_sums([(bl.start, bl.stop) for bl in blocks])
        present = counts > 0
        mult = [(bl.last - bl.first + 1).astype(np.float64) for bl in blocks]
        stats.random_count[code] = _weighted_sum(counts, mult) / positions
        stats.random_present[code] = _weighted_sum(present, mult) / positions
        if not self.foreground:
            stats.fg_count[code] = stats.random_count[code]
            stats.fg_present[code] = stats.random_present[code]
            return
        mass = self._foreground_mass(blocks, near)
        stats.fg_count[code] = _dot(mass, counts)
        stats.fg_present[code] = _dot(mass, present)

    def _foreground_mass(self, blocks: Sequence[_Blocks], near) -> np.ndarray:
        """Foreground-mode probability of each product of runs: per source class, its voxels in the box of
        voxels that send the patch there (exact counts from its summed-volume table), times its weight."""
        mass = np.zeros(tuple(len(bl) for bl in blocks))
        for s, runs in near.items():
            src = self.regions[s]
            bounds = [np.minimum(np.maximum(bl.bounds[j0:j1 + 1] - b, 0), w)
                      for bl, (j0, j1), b, w in zip(blocks, runs, src.begin, src.extent)]
            mass[tuple(slice(j0, j1) for j0, j1 in runs)] += self.weights[s] * _interval_counts(src.table, bounds)
        return mass

    def _by_sources(self, code: int, region: _Region, axes: List[_Axis], blocks: List[_Blocks], reach,
                    stats: _CaseStats) -> None:
        """Large classes: random count by contraction with the coverage, random presence by bit dilation,
        foreground statistics source class by source class."""
        positions = math.prod(ax.positions for ax in axes)
        cover = [ax.coverage(np.arange(b, b + w)) for ax, b, w in zip(axes, region.begin, region.extent)]
        stats.random_count[code] = _contract(region.mask, cover) / positions
        bits, first = self._dilation_bits(region, axes, blocks)
        per_cell = np.bitwise_count(bits).sum(axis=-1, dtype=np.int64).astype(np.float64)
        mult = [(bl.last - bl.first + 1).astype(np.float64) for bl in blocks[:-1]]
        stats.random_present[code] = _weighted_sum(per_cell, mult) / positions
        if not self.foreground:
            stats.fg_count[code] = stats.random_count[code]
            stats.fg_present[code] = stats.random_present[code]
            return
        total = present = 0.0
        for s, box in reach.items():
            source = self.regions[s]
            total += self.weights[s] * self._pair_count(region, source, axes, box)
            # a patch centred on a voxel always contains it
            hits = self.counts[s] if s == code else self._pair_presence(source, axes, blocks, box, bits, first)
            present += self.weights[s] * hits
        stats.fg_count[code], stats.fg_present[code] = total, present

    @staticmethod
    def _dilation_bits(region: _Region, axes: List[_Axis], blocks: List[_Blocks]) -> Tuple[np.ndarray, int]:
        """Presence of ``region`` in the patch at every position that can meet it: the mask OR-dilated by
        the patch, one bit per position along the last axis (packed, from position ``first``), the other
        axes on their run grids (sparse-table OR over each run's window).

        Returns:
            (uint8 array (runs_0, ..., bytes), first position of the last axis).
        """
        last = region.mask.ndim - 1
        ax = axes[last]
        a, z = ax.reach(region.begin[last], region.extent[last])
        start, stop = ax.window(np.arange(a, z + 1), region.begin[last], region.extent[last])
        counts = np.take(region.tail, stop, axis=last)
        counts -= np.take(region.tail, start, axis=last)
        bits = np.packbits(counts > 0, axis=last)
        for d in range(last):
            bits = _window_reduce(bits, d, blocks[d].start, blocks[d].stop, np.bitwise_or)
        return bits, a

    @staticmethod
    def _pair_count(target: _Region, source: _Region, axes: List[_Axis], box) -> float:
        """Sum over the ``source`` voxels ``v`` of the target's count in the patch centred on ``v``; voxels
        are grouped into runs that give the same window on the target's box."""
        crop, cuts, windows = [], [], []
        for ax, (lo, hi), sb, tb, tw in zip(axes, box, source.begin, target.begin, target.extent):
            crop.append(slice(lo - sb, hi - sb))
            start, stop = ax.window(ax.start(np.arange(lo, hi)), tb, tw)
            cut = np.concatenate(([0], np.flatnonzero((start[1:] != start[:-1]) | (stop[1:] != stop[:-1])) + 1))
            cuts.append(cut)
            windows.append((start[cut], stop[cut]))
        voxels = source.mask[tuple(crop)]
        counts = voxels.view(np.uint8)
        for d in sorted(range(len(cuts)), key=lambda d: len(cuts[d]) / voxels.shape[d]):
            if len(cuts[d]) < counts.shape[d]:
                counts = np.add.reduceat(counts, cuts[d], axis=d, dtype=_count_dtype(voxels.size))
        return _dot(counts, target.window_sums(windows))

    @staticmethod
    def _pair_presence(source: _Region, axes: List[_Axis], blocks: List[_Blocks], box, bits: np.ndarray,
                       first: int) -> int:
        """Number of ``source`` voxels whose centred patch contains the target, from the target's dilation
        bits: per source column, AND of its voxels' positions (as bits) with the target's column, popcount.
        Along the last axis ``start`` is one-to-one except at the two clipped ends, which are counted."""
        last = len(axes) - 1
        cols = tuple(slice(lo - b, hi - b) for (lo, hi), b in zip(box[:last], source.begin[:last]))
        rows = [np.searchsorted(blocks[d].first, axes[d].start(np.arange(*box[d])), side="right") - 1
                for d in range(last)]
        target = bits[np.ix_(*rows)] if rows else bits
        ax, (lo, hi), b = axes[last], box[last], source.begin[last]
        pos = ax.start(np.arange(lo, hi))
        # voxels [lo, i0) sit at position 0, [i1, hi) at the last position, [i0, i1) one position each
        i0 = lo + int(np.searchsorted(pos, 1))
        i1 = max(i0, lo + int(np.searchsorted(pos, ax.last)))
        hits = 0
        if i1 > i0:
            offset = int(pos[i0 - lo]) - first
            shift = offset % 8
            column = np.zeros(tuple(s.stop - s.start for s in cols) + (shift + i1 - i0,), bool)
            column[..., shift:] = source.mask[cols + (slice(i0 - b, i1 - b),)]
            packed = np.packbits(column, axis=-1)
            byte = offset // 8
            hits += int(np.bitwise_count(packed & target[..., byte:byte + packed.shape[-1]]).sum(dtype=np.int64))
        tail = source.tail[cols]
        for v0, v1, p in ((lo, i0, 0), (i1, hi, ax.last)):
            if v1 > v0:
                k = p - first
                bit = (target[..., k // 8] >> (7 - k % 8)) & 1
                count = tail[..., v1 - b] - tail[..., v0 - b]
                hits += int((count.astype(np.int64) * bit).sum())
        return hits

    def _inside_nonbg(self, axes: List[_Axis]) -> Tuple[float, float]:
        """Probability (random, foreground mode) that the patch holds no background voxel at all: the
        non-background mask AND-eroded by the patch, bit-packed like :meth:`_dilation_bits`.

        A patch inside the non-background voxels needs columns whose longest run along the last axis covers
        the patch, a whole in-plane window of them; that test (on a 2D array) settles most patch sizes and
        confines the exact erosion to the columns that pass it."""
        region = self.nonbg
        if region is None:
            return 0.0, 0.0
        last = region.mask.ndim - 1
        box = [(0, w) for w in region.extent]
        if last:
            tall = self.longest_run >= axes[last].patch
            wins = {d: (np.arange(0, max(0, tall.shape[d] - axes[d].patch + 1)),
                        np.arange(axes[d].patch, tall.shape[d] + 1)) for d in range(last)}
            if any(len(w[0]) == 0 for w in wins.values()):
                return 0.0, 0.0
            fits = _window_sums(tall, wins) == math.prod(ax.patch for ax in axes[:last])
            if not fits.any():
                return 0.0, 0.0
            for d in range(last):
                hit = np.flatnonzero(fits.any(axis=tuple(e for e in range(last) if e != d)))
                box[d] = (int(hit[0]), int(hit[-1]) + axes[d].patch)
        elif self.longest_run < axes[0].patch:
            return 0.0, 0.0
        begin = [b + lo for b, (lo, _) in zip(region.begin, box)]
        mask = region.mask[tuple(slice(lo, hi) for lo, hi in box)]
        ranges = []
        for ax, b, (lo, hi) in zip(axes, begin, box):
            a, z = max(0, b + ax.pad), min(ax.last, b + (hi - lo) + ax.pad - ax.patch)
            if z < a:
                return 0.0, 0.0  # the patch never fits inside the box (it would reach into the padding)
            ranges.append(np.arange(a, z + 1))
        wins = [ax.window(r, b, hi - lo) for ax, r, b, (lo, hi) in zip(axes, ranges, begin, box)]
        full = _window_sums(mask, {last: wins[last]}) == axes[last].patch
        if not full.any():
            return 0.0, 0.0
        bits = np.packbits(full, axis=last)
        for d in range(last):
            bits = _window_reduce(bits, d, wins[d][0], wins[d][1], np.bitwise_and)
        positions = math.prod(ax.positions for ax in axes)
        inside = float(np.bitwise_count(bits).sum(dtype=np.int64))
        if inside == 0 or not self.foreground:
            return inside / positions, inside / positions
        full = np.unpackbits(bits, axis=last, count=len(ranges[last])).astype(bool)
        hit = [np.flatnonzero(full.any(axis=tuple(e for e in range(full.ndim) if e != d))) for d in range(full.ndim)]
        sub = tuple(slice(int(h[0]), int(h[-1]) + 1) for h in hit)
        picked = [_Blocks.single(ax, r[s]) for ax, r, s in zip(axes, ranges, sub)]
        near = {}
        for s in self.foreground:
            src = self.regions[s]
            runs = [bl.overlap(b, w) for bl, b, w in zip(picked, src.begin, src.extent)]
            if all(j1 > j0 for j0, j1 in runs):
                near[s] = runs
        return inside / positions, _dot(self._foreground_mass(picked, near), full[sub])


# ------------------------------------------------------------------------------------------- the score


def imbalance_score(fraction: np.ndarray, presence: np.ndarray, scored: np.ndarray, batch_size: int = 2
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The module's imbalance score from expected shares and presence probabilities (see the module doc).

    Args:
        fraction: (..., C) expected voxel share ``f_c`` per class.
        presence: (..., C) probability ``p_c`` that a patch contains class ``c``.
        scored: (C,) bool, the classes that occur in the data set (index 0, the background, is always scored
            in the share term and never in the presence term).
        batch_size: patches per batch ``B``.

    Returns:
        (score, share term, presence term), each of shape ``fraction.shape[:-1]``; ``score = sqrt(share +
        presence)``. Classes with ``f_c = 0`` or ``p_c = 0`` make the score infinite.
    """
    fraction = np.asarray(fraction, np.float64)
    presence = np.asarray(presence, np.float64)
    scored = np.asarray(scored, bool).copy()
    scored[0] = True
    fg = scored.copy()
    fg[0] = False
    k = int(scored.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.mean(np.log(k * fraction[..., scored]) ** 2, axis=-1)
        if fg.any():
            p = presence[..., fg]
            absent = np.mean(np.where(p > 0, (1.0 - p) / (batch_size * p), np.inf), axis=-1)
        else:
            absent = np.zeros_like(share)
    return np.sqrt(share + absent), share, absent


# ---------------------------------------------------------------------------------------------- memory


def estimate_training_memory(model: nn.Module, patch_size: Sequence[int], batch_size: int = 2,
                             in_channels: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Estimated peak memory (bytes) of a training step of ``model`` with Adam on ``(batch_size, in_channels,
    *patch_size)`` inputs, derived from the network itself.

    The forward pass runs on the ``meta`` device (no data, no arithmetic; a copy of the module whose
    parameters are meta tensors, so the model itself is untouched) under
    :func:`torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd keeps for the
    backward pass. With ``P`` the parameter bytes, ``S`` the saved activations (each storage once: views and
    in-place results share one; parameters not included), ``O`` the outputs autograd does not already keep
    (logits of every deep-supervision level) and ``L`` the largest saved storage, the estimate is the larger
    of the two peaks of a step after the first:

    * start of the backward pass: ``3 P + S + O + 2 L`` (parameters and Adam's two moments persist between
      steps; gradients of the parameters appear while the activations are being freed; the gradient flowing
      into the largest activation and the one flowing out of it are the transient),
    * Adam's update: ``5 P`` (parameters, gradients, two moments and about one parameter-sized temporary of
      torch's multi-tensor implementation).

    Measured against torch's CPU memory profiler on nnU-Net-like U-Nets it is within about 20 % (see
    ``tests/test_imbalance.py``). Not included: the CUDA context and cuDNN workspaces (a few hundred MB,
    framework dependent), the loss's own buffers and the caching allocator's fragmentation. Mixed precision
    is modelled only roughly, by ``dtype`` (it then applies to the parameters as well).

    Args:
        model: any module taking ``(B, in_channels, *patch_size)`` tensors.
        patch_size: spatial input size.
        batch_size: samples per step.
        in_channels: input channels.
        dtype: dtype of the parameters and activations.

    Returns:
        bytes, an int.

    Example:
        >>> from fastseg.models import UNet
        >>> net = UNet.from_patch_size(1, 4, (64, 64, 32), (1.0, 1.0, 2.5))
        >>> estimate_training_memory(net, (64, 64, 32)) > 0
        True
    """
    where = "estimate_training_memory"
    if not isinstance(model, nn.Module):
        _fail(where, "model", "a torch.nn.Module", type(model).__name__)
    size = _positive_ints(where, "patch_size", patch_size)
    for name, value in (("batch_size", batch_size), ("in_channels", in_channels)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            _fail(where, name, "a positive integer", value)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        _fail(where, "dtype", "a floating-point torch.dtype", dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    # the memo makes deepcopy use meta stand-ins instead of copying (possibly large) parameter data
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty(p.shape, device="meta", dtype=dtype), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty(b.shape, device="meta", dtype=dtype if b.is_floating_point() else b.dtype)
    meta = copy.deepcopy(model, memo)
    meta.train()
    param_bytes = sum(p.numel() for p in meta.parameters() if p.requires_grad) * itemsize
    params = {p.untyped_storage()._cdata for p in meta.parameters()}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in params:
            saved[key] = max(saved.get(key, 0), storage.nbytes())
        return t

    x = torch.empty((batch_size, in_channels, *size), device="meta", dtype=dtype)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = meta(x)
    except Exception as exc:
        raise ValueError(f"{where}: model: its forward pass failed on a meta tensor of shape {tuple(x.shape)} "
                         f"({type(exc).__name__}: {exc})") from exc
    outputs = {}
    for o in _flatten(out):
        if isinstance(o, torch.Tensor) and o.untyped_storage()._cdata not in saved:
            outputs[o.untyped_storage()._cdata] = o.untyped_storage().nbytes()
    activations = sum(saved.values()) + sum(outputs.values()) + 2 * max(saved.values(), default=0)
    return int(max(3 * param_bytes + activations, 5 * param_bytes))


def _flatten(obj):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flatten(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flatten(o)
    else:
        yield obj


# ---------------------------------------------------------------------------------------------- report


def _positive_ints(where: str, name: str, value, ndim: Optional[int] = None) -> Tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
        ok = len(out) > 0 and all(not isinstance(v, bool) and o == v and o >= 1 for o, v in zip(out, value))
    except (TypeError, ValueError):
        ok = False
    if not ok or (ndim is not None and len(out) != ndim):
        n = f"{ndim} " if ndim is not None else ""
        _fail(where, name, f"{n}positive integers (one per spatial axis)", value)
    return out


def _format_size(size: Sequence[int]) -> str:
    return "x".join(str(s) for s in size)


@dataclass(frozen=True)
class Recommendation:
    """The patch size :meth:`ImbalanceReport.best` recommends.

    Attributes:
        patch_size: the recommended patch size.
        oversample_foreground: the foreground-oversampling ratio it was scored with.
        score: its imbalance score.
        memory_bytes: its estimated training memory, None without a budget.
        memory_budget_bytes: the budget, None without one.
    """

    patch_size: Tuple[int, ...]
    oversample_foreground: float
    score: float
    memory_bytes: Optional[int] = None
    memory_budget_bytes: Optional[int] = None


@dataclass
class ImbalanceReport:
    """Result of :func:`analyze_imbalance`.

    Attributes:
        patch_sizes: the candidate patch sizes (``n_patch``).
        oversample_foreground: the foreground-oversampling ratios (``n_over``).
        class_names: ``C`` names, index = label value.
        presence: (n_patch, n_over, C) probability that a sampled patch contains each class.
        fraction: (n_patch, n_over, C) expected share of the patch's voxels of each class.
        score: (n_patch, n_over) imbalance score (lower is better, see the module doc).
        share_term, presence_term: (n_patch, n_over) the two terms under the score's square root.
        presence_random, presence_foreground, fraction_random, fraction_foreground: (n_patch, C) the pure
            random and pure foreground modes (every ratio is a mixture of them).
        scored: (C,) bool, classes that occur in the data (background always True).
        batch_size: ``B`` of the score and of the default memory estimate.
        spacing: voxel spacing per axis (mm) or None.
        num_cases: number of label maps analysed.
        ignore_label: the label value that belongs to no class, or None.
        seconds: wall time of the analysis.
        memory_bytes: patch size -> estimated training memory, filled by :meth:`best`.
    """

    patch_sizes: List[Tuple[int, ...]]
    oversample_foreground: Tuple[float, ...]
    class_names: List[str]
    presence: np.ndarray
    fraction: np.ndarray
    score: np.ndarray
    share_term: np.ndarray
    presence_term: np.ndarray
    presence_random: np.ndarray
    presence_foreground: np.ndarray
    fraction_random: np.ndarray
    fraction_foreground: np.ndarray
    scored: np.ndarray
    batch_size: int
    spacing: Optional[Tuple[float, ...]]
    num_cases: int
    ignore_label: Optional[int]
    seconds: float
    memory_bytes: Dict[Tuple[int, ...], int] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------- recommendation

    def _default_memory_fn(self) -> Callable[[Tuple[int, ...]], int]:
        try:
            from fastseg.models import UNet
        except ImportError as exc:  # pragma: no cover - the models package ships with fastseg
            raise ValueError("ImbalanceReport.best: memory_fn: expected a callable patch_size -> bytes (the "
                             f"reference UNet could not be imported: {exc})") from exc
        spacing = self.spacing or (1.0,) * len(self.patch_sizes[0])
        classes = len(self.class_names)

        def memory(patch: Tuple[int, ...]) -> int:
            net = UNet.from_patch_size(1, classes, patch, spacing)
            # the network only accepts multiples of its divisor: that is the size it would train on
            return estimate_training_memory(net, net.padded_patch_size(patch), batch_size=self.batch_size)

        return memory

    def best(self, memory_budget_gb: Optional[float] = None,
             memory_fn: Optional[Callable[[Tuple[int, ...]], int]] = None, *,
             oversample_foreground: Optional[float] = None) -> Recommendation:
        """The patch size (and oversampling ratio) with the lowest score whose training fits the budget.

        Args:
            memory_budget_gb: GPU memory budget in GiB (2**30 bytes); None: no memory constraint.
            memory_fn: patch size -> estimated bytes of one training step. Default (with a budget): the
                reference :class:`fastseg.models.UNet` planned for the patch size and ``spacing`` (1 mm when
                the report has none), one input channel, ``batch_size`` patches, measured by
                :func:`estimate_training_memory`.
            oversample_foreground: restrict the choice to this ratio (one of the analysed ones); default: all.

        Returns:
            :class:`Recommendation`.

        Raises:
            ValueError: no candidate fits the budget (the message gives the smallest estimate), or bad arguments.
        """
        where = "ImbalanceReport.best"
        budget = None
        if memory_budget_gb is not None:
            if isinstance(memory_budget_gb, bool) or not isinstance(memory_budget_gb, numbers.Real) \
                    or not memory_budget_gb > 0 or not math.isfinite(memory_budget_gb):
                _fail(where, "memory_budget_gb", "a positive number of GiB or None", memory_budget_gb)
            budget = int(memory_budget_gb * 2 ** 30)
        if memory_fn is not None and not callable(memory_fn):
            _fail(where, "memory_fn", "a callable patch_size -> bytes or None", memory_fn)
        columns = list(range(len(self.oversample_foreground)))
        if oversample_foreground is not None:
            matches = [j for j, o in enumerate(self.oversample_foreground)
                       if math.isclose(o, float(oversample_foreground), abs_tol=1e-12)]
            if not matches:
                _fail(where, "oversample_foreground", f"one of the analysed ratios {self.oversample_foreground}",
                      oversample_foreground)
            columns = matches
        fits = list(range(len(self.patch_sizes)))
        if budget is not None:
            fn = memory_fn or self._default_memory_fn()
            for i, patch in enumerate(self.patch_sizes):
                if patch not in self.memory_bytes or memory_fn is not None:
                    value = fn(patch)
                    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
                        _fail(where, "memory_fn", "a callable returning a non-negative number of bytes",
                              f"{value!r} for patch size {patch}")
                    self.memory_bytes[patch] = int(value)
            fits = [i for i, p in enumerate(self.patch_sizes) if self.memory_bytes[p] <= budget]
            if not fits:
                i = min(range(len(self.patch_sizes)), key=lambda i: self.memory_bytes[self.patch_sizes[i]])
                need = self.memory_bytes[self.patch_sizes[i]]
                raise ValueError(f"{where}: memory_budget_gb: no candidate patch size fits "
                                 f"{memory_budget_gb} GiB; the smallest estimate is {need / 2 ** 30:.2f} GiB "
                                 f"for {_format_size(self.patch_sizes[i])}")
        i, j = min(((i, j) for i in fits for j in columns), key=lambda ij: (self.score[ij], ij))
        patch = self.patch_sizes[i]
        return Recommendation(patch_size=patch, oversample_foreground=self.oversample_foreground[j],
                              score=float(self.score[i, j]),
                              memory_bytes=self.memory_bytes.get(patch) if budget is not None else None,
                              memory_budget_bytes=budget)

    # ------------------------------------------------------------------------------------------ output

    def table(self, per_class: bool = True) -> str:
        """Markdown: one row per (patch size, ratio) with the score, its two terms and the least present
        class; with ``per_class`` a second table of ``presence % / expected share`` for every class."""
        mm = self.spacing is not None
        head = ["patch", *(["mm"] if mm else []), "oversample", "score", "share term", "presence term",
                "least present class", *(["memory GiB"] if self.memory_bytes else [])]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        fg = self.scored.copy()
        fg[0] = False
        for i, patch in enumerate(self.patch_sizes):
            for j, o in enumerate(self.oversample_foreground):
                row = [_format_size(patch)]
                if mm:
                    row.append("x".join(f"{p * s:.0f}" for p, s in zip(patch, self.spacing)))
                row += [f"{o:.3g}", f"{self.score[i, j]:.3f}", f"{self.share_term[i, j]:.2f}",
                        f"{self.presence_term[i, j]:.2f}"]
                if fg.any():
                    k = int(np.flatnonzero(fg)[np.argmin(self.presence[i, j, fg])])
                    row.append(f"{self.class_names[k]} ({100 * self.presence[i, j, k]:.1f} %)")
                else:
                    row.append("-")
                if self.memory_bytes:
                    m = self.memory_bytes.get(patch)
                    row.append("-" if m is None else f"{m / 2 ** 30:.2f}")
                lines.append("| " + " | ".join(row) + " |")
        if not per_class:
            return "\n".join(lines) + "\n"
        lines += ["", "Per class: presence % / expected voxel share", ""]
        names = [n for n, s in zip(self.class_names, self.scored) if s]
        keep = np.flatnonzero(self.scored)
        lines.append("| patch | oversample | " + " | ".join(names) + " |")
        lines.append("|" + "---|" * (len(names) + 2))
        for i, patch in enumerate(self.patch_sizes):
            for j, o in enumerate(self.oversample_foreground):
                cells = [f"{100 * self.presence[i, j, k]:.1f} / {self.fraction[i, j, k]:.2e}" for k in keep]
                lines.append(f"| {_format_size(patch)} | {o:.3g} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        """Plain-Python (JSON-ready) form of the report."""
        return {
            "patch_sizes": [list(p) for p in self.patch_sizes],
            "oversample_foreground": list(self.oversample_foreground),
            "class_names": list(self.class_names),
            "scored": self.scored.tolist(),
            "batch_size": self.batch_size,
            "spacing": None if self.spacing is None else list(self.spacing),
            "num_cases": self.num_cases,
            "ignore_label": self.ignore_label,
            "seconds": self.seconds,
            "score": self.score.tolist(),
            "share_term": self.share_term.tolist(),
            "presence_term": self.presence_term.tolist(),
            "presence": self.presence.tolist(),
            "fraction": self.fraction.tolist(),
            "presence_random": self.presence_random.tolist(),
            "presence_foreground": self.presence_foreground.tolist(),
            "fraction_random": self.fraction_random.tolist(),
            "fraction_foreground": self.fraction_foreground.tolist(),
            "memory_bytes": {_format_size(p): m for p, m in self.memory_bytes.items()},
        }

    def to_json(self, path) -> Path:
        """Write :meth:`to_dict` as JSON, atomically (temp file in the same folder, then rename)."""
        from fastseg._atomic import write_text

        # inf (a class never present) is not JSON: write null
        text = json.dumps(_json_safe(self.to_dict()), indent=1)
        return write_text(path, text + "\n")

    def plot(self, path, *, oversample_foreground: Optional[Sequence[float]] = None) -> Path:
        """PNG (or any matplotlib format, from the suffix) of the score against the patch size, one line per
        ratio, and of each class's presence against the patch size, one panel per ratio. Written atomically.

        Args:
            path: output file.
            oversample_foreground: the ratios to draw presence panels for (default: all analysed).
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        from fastseg._atomic import save_figure

        where = "ImbalanceReport.plot"
        ratios = list(self.oversample_foreground) if oversample_foreground is None else list(oversample_foreground)
        columns = []
        for r in ratios:
            hit = [j for j, o in enumerate(self.oversample_foreground) if math.isclose(o, float(r), abs_tol=1e-12)]
            if not hit:
                _fail(where, "oversample_foreground", f"ratios among {self.oversample_foreground}", r)
            columns.append(hit[0])
        order = sorted(range(len(self.patch_sizes)), key=lambda i: (math.prod(self.patch_sizes[i]),
                                                                     self.patch_sizes[i]))
        x = np.arange(len(order))
        labels = [_format_size(self.patch_sizes[i]) for i in order]
        size = (max(7.0, 0.45 * len(order) + 4), 3.2 * (1 + len(columns)))
        fig, axes = plt.subplots(1 + len(columns), 1, figsize=size, squeeze=False)
        ax = axes[0, 0]
        for j, o in enumerate(self.oversample_foreground):
            ax.plot(x, self.score[order, j], marker="o", label=f"oversample {o:.3g}")
        ax.set_ylabel("imbalance score (lower is better)")
        ax.set_title(f"{self.num_cases} cases, batch size {self.batch_size}")
        ax.legend(fontsize="small")
        keep = np.flatnonzero(self.scored)
        cmap = plt.get_cmap("tab20")
        for row, j in enumerate(columns, start=1):
            ax = axes[row, 0]
            for n, k in enumerate(keep):
                # 20 colours, then the same colours dashed
                ax.plot(x, 100 * self.presence[order, j, k], marker=".", color=cmap(n % 20),
                        linestyle=("-", "--", ":")[(n // 20) % 3], label=self.class_names[k])
            ax.set_ylabel("presence in a patch (%)")
            ax.set_title(f"oversample_foreground = {self.oversample_foreground[j]:.3g}")
            ax.set_ylim(0, 102)
            if row == 1:
                ax.legend(fontsize="x-small", ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        for row in range(axes.shape[0]):
            axes[row, 0].set_xticks(x)
            axes[row, 0].set_xticklabels(labels, rotation=45, ha="right", fontsize="small")
            axes[row, 0].grid(alpha=0.3)
        fig.tight_layout()
        try:
            return save_figure(fig, path, dpi=110)
        finally:
            plt.close(fig)


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, list):
        return [_json_safe(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------- driver


def _check_label_map(i: int, label, ndim: Optional[int], num_classes: Optional[int],
                     ignore_label: Optional[int]) -> np.ndarray:
    name = f"label_maps[{i}]"
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    label = np.asarray(label)
    if label.dtype == bool:
        label = label.view(np.uint8)
    if not np.issubdtype(label.dtype, np.integer) or label.ndim == 0 or label.size == 0:
        _fail(_WHERE, name, "a non-empty integer label map", _describe(label))
    if ndim is not None and label.ndim != ndim:
        _fail(_WHERE, name, f"{ndim} spatial axes like label_maps[0]", _describe(label))
    valid = label if ignore_label is None else label[label != ignore_label]
    if valid.size:
        lo, hi = int(valid.min()), int(valid.max())
        if lo < 0:
            _fail(_WHERE, name, "label values >= 0 (or the ignore_label)", f"minimum {lo}")
        if num_classes is not None and hi >= num_classes:
            _fail(_WHERE, name, f"label values < num_classes={num_classes} (or the ignore_label)",
                  f"maximum {hi}")
    return label


def _check_ratios(value) -> Tuple[float, ...]:
    ratios = (value,) if isinstance(value, numbers.Real) else value
    try:
        out = tuple(float(r) for r in ratios)
        ok = len(out) > 0 and all(not isinstance(r, bool) and 0.0 <= o <= 1.0 for o, r in zip(out, ratios))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        _fail(_WHERE, "oversample_foreground", "a probability in [0, 1] or a non-empty sequence of them", value)
    return out


def _analyze_case(label: np.ndarray, sizes: Sequence[Tuple[int, ...]], num_classes: int,
                  ignore_label: Optional[int]) -> Tuple[np.ndarray, List[int]]:
    """One case, every patch size: (4, n_patch, C) expected count and presence under random patches, then
    under foreground patches; and the classes present."""
    case = _Case(label, num_classes, ignore_label)
    out = np.zeros((4, len(sizes), num_classes))
    for k, patch in enumerate(sizes):
        stats, bg_random, bg_fg = case.analyze(patch)
        volume = float(math.prod(patch))
        # the background is what the classes and the ignore label leave of the patch
        out[0, k, 0] = volume - sum(stats.random_count.values())
        out[2, k, 0] = volume - sum(stats.fg_count.values())
        out[1, k, 0], out[3, k, 0] = bg_random, bg_fg
        for code in stats.random_count:
            if code < num_classes:
                out[:, k, code] = (stats.random_count[code], stats.random_present[code],
                                   stats.fg_count[code], stats.fg_present[code])
    return out, [c for c in case.regions if c < num_classes]


def analyze_imbalance(label_maps: Sequence[np.ndarray], patch_sizes: Sequence[Sequence[int]], *,
                      oversample_foreground: Union[float, Sequence[float]] = (0.0, 1 / 3),
                      num_classes: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                      spacing: Optional[Sequence[float]] = None, ignore_label: Optional[int] = None,
                      batch_size: int = 2, num_workers: int = 0) -> ImbalanceReport:
    """Exact per-class presence probability and expected voxel share of sampled training patches, and the
    imbalance score, for every candidate patch size and foreground-oversampling ratio (see the module doc).

    Args:
        label_maps: one integer label map per case (2D or 3D, all with the same number of axes; shapes may
            differ). Read once, in order, so a lazy sequence that loads on access works.
        patch_sizes: candidate patch sizes, each one positive int per axis (e.g. ``[(128, 128, 64)]``).
        oversample_foreground: ratio(s) of foreground patches (nnU-Net: 1/3).
        num_classes: number of classes C (background included); default: largest label + 1.
        class_names: C names (index = label value); default "background", "1", "2", ...
        spacing: voxel spacing per axis in mm, for the table and the default memory model of
            :meth:`ImbalanceReport.best`.
        ignore_label: a label value that counts for no class and is never a foreground class (not 0).
        batch_size: patches per batch, for the score's presence term and the memory estimate.
        num_workers: analyse the cases in this many processes (0: in this process). Cases are independent,
            so the time divides by about the number of cores; the result is the same.

    Returns:
        :class:`ImbalanceReport`.

    Example:
        >>> lab = np.zeros((40, 40, 20), np.uint8); lab[10:20, 10:20, 5:10] = 1; lab[30:32, 5:7, 2:4] = 2
        >>> rep = analyze_imbalance([lab], [(16, 16, 8), (32, 32, 16)], oversample_foreground=(0, 1 / 3))
        >>> rep.presence.shape, rep.best().patch_size in rep.patch_sizes
        ((2, 2, 3), True)
    """
    t0 = time.perf_counter()
    if isinstance(label_maps, (np.ndarray, torch.Tensor)) or not isinstance(label_maps, Sequence) \
            or len(label_maps) == 0:
        _fail(_WHERE, "label_maps", "a non-empty sequence of label maps (one array per case)",
              _describe(label_maps) if isinstance(label_maps, (np.ndarray, torch.Tensor)) else label_maps)
    if ignore_label is not None:
        if isinstance(ignore_label, bool) or not isinstance(ignore_label, numbers.Integral) or ignore_label == 0:
            _fail(_WHERE, "ignore_label", "an integer other than 0 (the background) or None", ignore_label)
        ignore_label = int(ignore_label)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            _fail(_WHERE, "num_classes", "a positive integer or None", num_classes)
        num_classes = int(num_classes)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        _fail(_WHERE, "batch_size", "a positive integer", batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral) or num_workers < 0:
        _fail(_WHERE, "num_workers", "an integer >= 0", num_workers)
    ratios = _check_ratios(oversample_foreground)
    if isinstance(patch_sizes, (str, bytes)) or not isinstance(patch_sizes, Sequence) or len(patch_sizes) == 0:
        _fail(_WHERE, "patch_sizes", "a non-empty sequence of patch sizes, e.g. [(128, 128, 64)]", patch_sizes)
    if all(isinstance(p, numbers.Integral) for p in patch_sizes):
        _fail(_WHERE, "patch_sizes", f"a sequence of patch sizes; for one size write [{tuple(patch_sizes)}]",
              patch_sizes)

    first = _check_label_map(0, label_maps[0], None, num_classes, ignore_label)
    ndim = first.ndim
    sizes = [_positive_ints(_WHERE, f"patch_sizes[{i}]", p, ndim) for i, p in enumerate(patch_sizes)]
    if spacing is not None:
        try:
            spacing = tuple(float(s) for s in spacing)
            ok = len(spacing) == ndim and all(math.isfinite(s) and s > 0 for s in spacing)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            _fail(_WHERE, "spacing", f"{ndim} positive finite numbers (mm per axis) or None", spacing)

    # the class count must be known before the first case is analysed; without num_classes that means one
    # cheap pass over the maxima (label maps are then read twice)
    if num_classes is None:
        top = 0
        for i in range(len(label_maps)):
            lab = first if i == 0 else _check_label_map(i, label_maps[i], ndim, None, ignore_label)
            valid = lab if ignore_label is None else lab[lab != ignore_label]
            top = max(top, int(valid.max()) if valid.size else 0)
        num_classes = top + 1
    if class_names is None:
        class_names = ["background"] + [str(c) for c in range(1, num_classes)]
    else:
        if isinstance(class_names, str) or len(class_names) != num_classes:
            _fail(_WHERE, "class_names", f"{num_classes} names (num_classes, background included)", class_names)
        class_names = [str(n) for n in class_names]

    n_cases = len(label_maps)
    sums = np.zeros((4, len(sizes), num_classes))
    seen = np.zeros(num_classes, bool)
    seen[0] = True

    def load(i: int) -> np.ndarray:
        return first if i == 0 else _check_label_map(i, label_maps[i], ndim, num_classes, ignore_label)

    def add(result) -> None:
        stats, present = result
        sums[...] += stats
        seen[present] = True

    if num_workers == 0 or n_cases == 1:
        for i in range(n_cases):
            add(_analyze_case(load(i), sizes, num_classes, ignore_label))
    else:
        from concurrent.futures import ProcessPoolExecutor

        # cases go out one at a time, at most 2 per worker in flight, so a lazy label_maps sequence is
        # never held in memory as a whole; results come back in order, so the sums do not depend on timing
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            pending = []
            for i in range(n_cases):
                pending.append(pool.submit(_analyze_case, load(i), sizes, num_classes, ignore_label))
                while len(pending) > 2 * num_workers:
                    add(pending.pop(0).result())
            for job in pending:
                add(job.result())
    count_r, present_r, count_f, present_f = sums

    volumes = np.array([float(math.prod(p)) for p in sizes])[:, None]
    frac_r = count_r / n_cases / volumes
    frac_f = count_f / n_cases / volumes
    pres_r = present_r / n_cases
    pres_f = present_f / n_cases
    o = np.asarray(ratios)[None, :, None]
    fraction = (1 - o) * frac_r[:, None, :] + o * frac_f[:, None, :]
    presence = (1 - o) * pres_r[:, None, :] + o * pres_f[:, None, :]
    score, share, absent = imbalance_score(fraction, presence, seen, batch_size)
    return ImbalanceReport(
        patch_sizes=sizes, oversample_foreground=ratios, class_names=list(class_names), presence=presence,
        fraction=fraction, score=score, share_term=share, presence_term=absent, presence_random=pres_r,
        presence_foreground=pres_f, fraction_random=frac_r, fraction_foreground=frac_f, scored=seen,
        batch_size=int(batch_size), spacing=spacing, num_cases=n_cases, ignore_label=ignore_label,
        seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------- trainer glue
def candidate_patch_sizes(shapes: Sequence[Sequence[int]], *, fractions=(0.5, 0.625, 0.75, 0.875, 1.0),
                          multiple: Sequence[int] = None) -> List[Tuple[int, ...]]:
    """Patch sizes for ``--patch-size auto``: fractions of the median case shape, rounded to ``multiple``
    (default 16 per axis, 8 along a short last axis).

    The imbalance score measures class balance, not anatomical context, and it is lowest for the smallest
    patches when foreground is oversampled; so the candidates start at half the case extent, where the network
    still sees each organ's surroundings. Pass explicit sizes to ``analyze_imbalance`` to search elsewhere.
    """
    median = np.median(np.asarray([list(s) for s in shapes], dtype=np.float64), axis=0)
    if multiple is None:
        multiple = [8 if n < 64 else 16 for n in median]
    out = []
    for f in fractions:
        size = tuple(int(max(m, round(n * f / m) * m)) for n, m in zip(median, multiple))
        if size not in out:
            out.append(size)
    return out


def recommend_patch_size(label_maps: Sequence[np.ndarray], *, spacing: Sequence[float], num_classes: int,
                         oversample_foreground: float, memory_budget_gb: float, batch_size: int = 2,
                         base_features: int = 32, max_features: int = 320) -> List[int]:
    """The trainer's ``patch_size: auto``: the lowest-score candidate (:func:`candidate_patch_sizes`) whose
    estimated training memory with the configured reference U-Net fits ``memory_budget_gb``."""
    from fastseg.models import UNet

    def memory(patch):
        net = UNet.from_patch_size(1, num_classes, patch, spacing, base_features=base_features,
                                   max_features=max_features)
        return estimate_training_memory(net, net.padded_patch_size(patch), batch_size=batch_size)

    report = analyze_imbalance(label_maps, candidate_patch_sizes([m.shape for m in label_maps]),
                               oversample_foreground=(float(oversample_foreground),), num_classes=num_classes,
                               spacing=spacing, batch_size=batch_size)
    return list(report.best(memory_budget_gb, memory).patch_size)
