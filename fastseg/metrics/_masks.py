"""Where each structure is: per-(sample, class) bounding boxes and zero-padded crops, without full-volume work
per class.

A class's box is found in two steps: one pass over the whole input gives, for every (sample, class), which
slices along axis 0 hold it (a max over each slice's contiguous bytes, at memory bandwidth); then only the
slab of slices between its first and last one is read to find the extent along the other axes. The crops
every metric is computed on are copies of the box grown by a margin and padded with zeros beyond the image.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

Box = Tuple[Tuple[int, ...], Tuple[int, ...]]  # (first, last) voxel index per axis, inclusive

__all__ = ["Box", "ChannelMasks", "LabelMaps", "find_boxes", "find_boxes_by_projection", "union_box", "crop"]


class ChannelMasks:
    """(B, C, *spatial) binary masks, bool or uint8 with values 0 / 1; channels from ``first_channel`` on are
    evaluated (a view: dropping the background channel copies nothing)."""

    def __init__(self, masks: torch.Tensor, first_channel: int):
        self.data = masks if masks.dtype == torch.bool else masks.view(torch.bool)
        self.channels = list(range(first_channel, masks.shape[1]))
        self.batch = masks.shape[0]
        self.spatial = tuple(masks.shape[2:])

    def _evaluated(self) -> torch.Tensor:
        """(B, K, *spatial) uint8 view of the evaluated channels."""
        return self.data.view(torch.uint8)[:, self.channels[0] if self.channels else self.data.shape[1]:]

    def axis0_presence(self) -> torch.Tensor:
        """(B, K, S0) bool: whether slice i along axis 0 holds the k-th evaluated channel."""
        x = self._evaluated()
        B, K = x.shape[:2]
        maxima = x.reshape(B, K, self.spatial[0], -1).amax(-1)
        # Free binary check for uint8 masks: a value above 1 shows up in its slice's maximum.
        self.max_value = maxima.amax() if maxima.numel() else maxima.new_zeros(())
        return maxima > 0

    def plane(self) -> torch.Tensor:
        """(B, K, S1, ...) bool: the projection of each evaluated channel along axis 0."""
        return self._evaluated().amax(2) > 0

    def slab(self, b: int, k: int, first: int, last: int) -> torch.Tensor:
        return self.data[b, self.channels[k], first:last + 1]

    def region(self, b: int, k: int, index: Tuple[slice, ...]) -> torch.Tensor:
        return self.data[(b, self.channels[k]) + index]


class LabelMaps:
    """(B, *spatial) integer label maps; ``classes`` are the label values evaluated (each one a binary mask)."""

    def __init__(self, labels: torch.Tensor, num_classes: int, classes: Sequence[int]):
        self.data = labels
        self.num_classes = num_classes
        self.classes = list(classes)
        self.batch = labels.shape[0]
        self.spatial = tuple(labels.shape[1:])

    def axis0_presence(self) -> torch.Tensor:
        """(B, K, S0) bool, from one histogram of (slice, label) pairs per sample."""
        S0, L = self.spatial[0], self.num_classes
        rows = []
        for b in range(self.batch):
            slice_index = torch.arange(S0, device=self.data.device).view(-1, *([1] * (len(self.spatial) - 1)))
            pairs = (self.data[b].to(torch.int64) + slice_index * L).reshape(-1)
            counts = torch.bincount(pairs, minlength=S0 * L).view(S0, L)
            rows.append(counts[:, self.classes].t() > 0)
        return torch.stack(rows) if rows else torch.zeros(0, len(self.classes), S0, dtype=torch.bool)

    def plane(self) -> torch.Tensor:
        """(B, K, S1, ...) bool, from one histogram of (sample, position across axis 0, label) triples."""
        B, L = self.batch, self.num_classes
        plane = self.spatial[1:]
        M = math.prod(plane)
        index = torch.int32 if B * M * L < 2 ** 31 else torch.int64  # half the bytes of a 512x512x160 map
        position = torch.arange(B * M, device=self.data.device, dtype=index).view(B, 1, *plane) * L
        counts = torch.bincount((self.data.to(index) + position).reshape(-1), minlength=B * M * L)
        return counts.view(B, M, L)[:, :, self.classes].transpose(1, 2).reshape(B, -1, *plane) > 0

    def slab(self, b: int, k: int, first: int, last: int) -> torch.Tensor:
        return self.data[b, first:last + 1] == self.classes[k]

    def region(self, b: int, k: int, index: Tuple[slice, ...]) -> torch.Tensor:
        return self.data[(b,) + index] == self.classes[k]


def _first_last(presence: torch.Tensor) -> Tuple[int, int]:
    hit = presence.nonzero()
    return int(hit[0]), int(hit[-1])


def find_boxes(source) -> List[List[Optional[Box]]]:
    """[b][k] bounding box of the k-th evaluated class of sample b, or None where it is empty."""
    if 0 in source.spatial:
        K = len(getattr(source, "channels", getattr(source, "classes", [])))
        return [[None] * K for _ in range(source.batch)]
    pres0 = source.axis0_presence()
    B, K, S0 = pres0.shape
    any0 = pres0.any(-1)
    first0 = pres0.to(torch.uint8).argmax(-1)
    last0 = S0 - 1 - pres0.flip(-1).to(torch.uint8).argmax(-1)
    any0, first0, last0 = any0.tolist(), first0.tolist(), last0.tolist()
    boxes: List[List[Optional[Box]]] = [[None] * K for _ in range(B)]
    nd = len(source.spatial)
    for b in range(B):
        for k in range(K):
            if not any0[b][k]:
                continue
            lo, hi = [first0[b][k]], [last0[b][k]]
            if nd > 1:
                # A max over the slab's leading axis reads it contiguously; the rest is one (S1, ..) plane.
                plane = source.slab(b, k, lo[0], hi[0]).view(torch.uint8).amax(0)
                for axis in range(nd - 1):
                    others = tuple(a for a in range(nd - 1) if a != axis)
                    presence = plane.amax(others) if others else plane
                    f, l = _first_last(presence)
                    lo.append(f)
                    hi.append(l)
            boxes[b][k] = (tuple(lo), tuple(hi))
    return boxes


def find_boxes_by_projection(source) -> List[List[Optional[Box]]]:
    """find_boxes from two projections of the whole input (along axis 0, and across it), so a fixed number of
    device operations and host synchronisations whatever the number of classes (find_boxes reads less, but
    class by class)."""
    K = len(getattr(source, "channels", getattr(source, "classes", [])))
    if 0 in source.spatial or K == 0:
        return [[None] * K for _ in range(source.batch)]
    presence = [source.axis0_presence()]
    if len(source.spatial) > 1:
        plane = source.plane()
        for axis in range(1, len(source.spatial)):
            others = tuple(2 + a for a in range(len(source.spatial) - 1) if a != axis - 1)
            presence.append(plane.amax(others) if others else plane)
    firsts, lasts = [], []
    for pres, n in zip(presence, source.spatial):
        pres = pres.to(torch.uint8)
        firsts.append(pres.argmax(-1))
        lasts.append(n - 1 - pres.flip(-1).argmax(-1))
    present = presence[0].any(-1).tolist()
    firsts, lasts = torch.stack(firsts, -1).tolist(), torch.stack(lasts, -1).tolist()
    return [[(tuple(firsts[b][k]), tuple(lasts[b][k])) if present[b][k] else None for k in range(K)]
            for b in range(source.batch)]


def union_box(a: Optional[Box], b: Optional[Box]) -> Optional[Box]:
    if a is None:
        return b
    if b is None:
        return a
    return (tuple(map(min, a[0], b[0])), tuple(map(max, a[1], b[1])))


def crop(source, b: int, k: int, box: Box, margin: int) -> torch.Tensor:
    """bool crop of the box grown by ``margin`` on every side, zeros where it leaves the image (as MONAI's
    CropForeground with allow_smaller=False and DeepMind's zero-padded crop)."""
    lo = [f - margin for f in box[0]]
    hi = [l + margin + 1 for l in box[1]]
    shape = [h - l for l, h in zip(lo, hi)]
    out = torch.zeros(shape, dtype=torch.bool, device=source.data.device)
    src = tuple(slice(max(l, 0), min(h, n)) for l, h, n in zip(lo, hi, source.spatial))
    dst = tuple(slice(s.start - l, s.stop - l) for s, l in zip(src, lo))
    out[dst] = source.region(b, k, src)
    return out
