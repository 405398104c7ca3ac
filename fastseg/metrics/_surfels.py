"""Neighbour codes of 2×2(×2) voxel blocks and the area (3D) or length (2D) of the surface each one holds.

DeepMind's surface-distance (Nikolov et al. 2018, arXiv:1809.04430) places surface elements ("surfels") on the
corner grid of the voxel grid: the 2^nd voxels around a corner form a block whose binary pattern is encoded as
a neighbour code, and the block holds a piece of surface iff the code is neither 0 nor all ones. Its area comes
from a marching-cubes triangulation of that pattern. This module derives the triangulation itself:

1. Vertices: the midpoints of the block edges whose two voxels differ (marching cubes, Lorensen & Cline 1987).
2. Polygons: on each block face the cut edges are joined pairwise. A face with four cut edges (two diagonal
   inside voxels) is resolved by separating the inside voxels, where "inside" is the minority side of the
   block (the complement for more than half of the voxels set), so a code and its complement get one surface.
3. Triangles: a polygon of more than three vertices may be non-planar, and then its area depends on the
   diagonals chosen. Of all triangulations we take the one of largest area; this is the choice of the
   marching-cubes table surface-distance was built from (tests/test_surface_metrics.py checks the resulting
   table against the installed package's for random spacings).

Anisotropic spacing s scales a triangle with area vector n (half the cross product of two edges, in voxel
units) to the area vector (n0 s1 s2, n1 s0 s2, n2 s0 s1), so every triangle is kept and the table for a
spacing is the sum of the norms of the scaled area vectors. In 2D the pieces are segments with the length
sqrt((v0 s0)^2 + (v1 s1)^2).

Code bits follow surface-distance and MONAI: the voxel at offset o in the block (each o_k in {0, 1}) is bit
``2 ** (2**nd - 1 - sum_k o_k 2**(nd - 1 - k))``, i.e. the corner (0, 0, 0) is 128 and (1, 1, 1) is 1.
"""
from __future__ import annotations

import functools
import itertools
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

Corner = Tuple[int, ...]
Edge = Tuple[Corner, Corner]

__all__ = ["block_offsets", "code_bit", "piece_vectors", "measure_table"]


def block_offsets(nd: int) -> List[Corner]:
    """The 2^nd voxel offsets of a block, in the order of their code bits from the most significant."""
    return list(itertools.product((0, 1), repeat=nd))


def code_bit(offset: Corner) -> int:
    nd = len(offset)
    index = sum(o << (nd - 1 - k) for k, o in enumerate(offset))
    return 1 << ((1 << nd) - 1 - index)


def _inside(code: int, nd: int) -> set:
    return {o for o in block_offsets(nd) if code & code_bit(o)}


def _block_edges(nd: int) -> List[Edge]:
    corners = block_offsets(nd)
    return [(a, b) for a in corners for b in corners if a < b and sum(x != y for x, y in zip(a, b)) == 1]


def _faces(nd: int) -> List[Tuple[int, int]]:
    """Faces as (axis, value): the corners with corner[axis] == value. In 2D the block is its own face."""
    return [(axis, v) for axis in range(nd) for v in (0, 1)] if nd == 3 else [(-1, 0)]


def _on_face(edge: Edge, face: Tuple[int, int]) -> bool:
    axis, v = face
    return axis < 0 or (edge[0][axis] == v and edge[1][axis] == v)


def _face_links(cut: List[Edge], inside: set, face: Tuple[int, int]) -> List[Tuple[Edge, Edge]]:
    """The polygon sides lying on one face: pairs of cut edges joined there."""
    on_face = [e for e in cut if _on_face(e, face)]
    if len(on_face) == 2:
        return [(on_face[0], on_face[1])]
    if len(on_face) == 4:  # ambiguous face: cut off each inside voxel on its own
        links = []
        for corner in sorted(c for c in inside if face[0] < 0 or c[face[0]] == face[1]):
            a, b = [e for e in on_face if corner in e]
            links.append((a, b))
        return links
    return []


def _polygons(code: int, nd: int) -> List[List[np.ndarray]]:
    """Closed loops (3D) or open/closed chains (2D) of edge midpoints separating the inside voxels."""
    inside = _inside(code, nd)
    if len(inside) * 2 > (1 << nd):
        inside = set(block_offsets(nd)) - inside
    cut = [e for e in _block_edges(nd) if (e[0] in inside) != (e[1] in inside)]
    neighbours: Dict[Edge, List[Edge]] = {e: [] for e in cut}
    for face in _faces(nd):
        for a, b in _face_links(cut, inside, face):
            neighbours[a].append(b)
            neighbours[b].append(a)
    loops, seen = [], set()
    for start in cut:
        if start in seen:
            continue
        loop, prev, cur = [start], None, start
        seen.add(start)
        while True:
            options = [e for e in neighbours[cur] if e != prev]
            if not options or options[0] == start or options[0] in seen:
                break
            prev, cur = cur, options[0]
            loop.append(cur)
            seen.add(cur)
        loops.append([(np.array(a, float) + np.array(b, float)) / 2 for a, b in loop])
    return loops


def _triangulations(idx: Sequence[int]):
    """Every triangulation of the polygon with vertex indices idx (the edge idx[0]-idx[-1] closes it)."""
    if len(idx) < 3:
        yield []
        return
    first, last = idx[0], idx[-1]
    for k in range(1, len(idx) - 1):
        for left in _triangulations(idx[: k + 1]):
            for right in _triangulations(idx[k:]):
                yield left + right + [(first, idx[k], last)]


def _area_vectors(points: List[np.ndarray], triangles) -> List[np.ndarray]:
    return [np.cross(points[j] - points[i], points[k] - points[i]) / 2 for i, j, k in triangles]


def _largest_triangulation(points: List[np.ndarray]) -> List[np.ndarray]:
    best, best_area = [], -1.0
    for tri in _triangulations(list(range(len(points)))):
        vectors = _area_vectors(points, tri)
        area = sum(float(np.linalg.norm(v)) for v in vectors)
        if area > best_area + 1e-12:  # strict: ties keep the first, all ties have equal scaled areas
            best, best_area = vectors, area
    return best


@functools.lru_cache(maxsize=None)
def piece_vectors(nd: int) -> np.ndarray:
    """(2^(2^nd), P, nd) float64: per code, the area vectors of its triangles (3D) or the direction vectors
    of its segments (2D), in voxel units, zero-padded to P pieces."""
    if nd not in (2, 3):
        raise ValueError(f"surfels are defined for 2D and 3D, got {nd} spatial dims")
    per_code = []
    for code in range(1 << (1 << nd)):
        pieces = []
        for poly in _polygons(code, nd):
            if nd == 3:
                pieces += _largest_triangulation(poly)
            else:
                pieces += [poly[i + 1] - poly[i] for i in range(len(poly) - 1)]
        per_code.append(pieces)
    width = max(len(p) for p in per_code)
    out = np.zeros((len(per_code), width, nd))
    for code, pieces in enumerate(per_code):
        for i, v in enumerate(pieces):
            out[code, i] = v
    return out


def measure_table(spacing: Sequence[float], device=None) -> torch.Tensor:
    """float64 (2^(2^nd),) area (3D, mm²) or length (2D, mm) of the surface in each neighbour code's block."""
    s = np.asarray(spacing, dtype=np.float64)
    nd = s.shape[0]
    vectors = piece_vectors(nd)
    if nd == 3:
        scale = np.array([s[1] * s[2], s[0] * s[2], s[0] * s[1]])
    else:
        scale = s
    table = np.linalg.norm(vectors * scale, axis=-1).sum(-1)
    return torch.as_tensor(table, dtype=torch.float64, device=device)
