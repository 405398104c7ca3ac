#!/usr/bin/env python3
"""Measure the real head-and-neck organ masks that calibrate the procedural phantom (fastseg/data/phantom.py).

    python benchmarks/phantom_calibration.py [--annotator oncologist] [--json calibration.json]

Reads (never writes) the 7 scans of ``$FASTSEG_DATA/validation/<annotator>/<scan>/segmentations/<Organ>.nrrd``
(default FASTSEG_DATA: ../shared/data/tcia-han-oar). Every position is in mm, LPS world coordinates (x to the
patient's left, y to the back, z up), relative to the centroid of that scan's Brain mask, which is the
phantom's origin. Prints, as medians over the scans:

1. per organ: voxel count, physical volume (mm^3), centroid, and the semi-axes of the ellipsoid with the same
   second moments (sqrt(5 * eigenvalue of the covariance)). For a Lt/Rt pair the Rt masks are mirrored
   (x -> -x) and pooled with the Lt ones (14 samples), which gives the phantom's one symmetric model; the
   pooled median covariance (mm^2) is printed too, for the oriented ellipsoids;
2. the floor of the brain (lowest brain z per 10 mm (x, y) column): the skull base the ellipsoid is cut by;
3. the spinal canal and cord per 10 mm slab: centroid (x, y), cross-section area, standard deviations;
4. the lungs per 10 mm below the apex: apex height, centroid, area (a lung is cut by each scan's bottom, so
   only its top is seen) and the least-squares ellipsoid cap (pi a b (2d/c - d^2/c^2)) fitted to the areas;
5. the mandible per 7.5 mm slab: area and the extents of the chin and of one (mirrored) half;
6. the optic nerves as segments: end points at the 2nd / 98th percentile along the main axis, radius from
   volume / length.
Submandibular glands are absent on TCGA-CV-5977: medians use the scans that have the organ.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("FASTSEG_DATA", HERE.parent / ".." / "shared" / "data" / "tcia-han-oar")) / "validation"
PAIRED = ("Cochlea", "Lacrimal", "Lens", "Lung", "Optic-Nerve", "Orbit", "Parotid", "Submandibular")


def read_points(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """World (LPS, mm) coordinates of the voxels of one mask (N, 3) and its spacing (3,)."""
    import nrrd

    array, header = nrrd.read(str(path), index_order="F")
    directions = np.asarray(header["space directions"], dtype=float)
    origin = np.asarray(header["space origin"], dtype=float)
    index = np.argwhere(array > 0).astype(float)
    # columns of `space directions` rows: row i is the step of array axis i
    return index @ directions + origin, np.linalg.norm(directions, axis=1)


def load_scan(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{organ: (points relative to the brain centroid, spacing)} for one scan."""
    scan = {p.stem: read_points(p) for p in sorted(folder.glob("*.nrrd"))}
    centre = scan["Brain"][0].mean(axis=0)
    return {organ: (points - centre, spacing) for organ, (points, spacing) in scan.items()}


def mirrored(organ: str, points: np.ndarray) -> tuple[str, np.ndarray]:
    """Pool key and points: a right-side organ is mirrored onto the left."""
    if organ.endswith("-Rt"):
        return organ[:-3] + "-Lt", points * np.array([-1.0, 1.0, 1.0])
    return organ, points


def organ_stats(points: np.ndarray, spacing: np.ndarray) -> dict:
    """Count, volume, centroid, covariance and moment-equivalent semi-axes of one mask."""
    cov = np.cov(points.T)
    eigen = np.linalg.eigvalsh(cov)[::-1]
    return {
        "voxels": len(points),
        "volume": len(points) * float(np.prod(spacing)),
        "centroid": points.mean(axis=0),
        "cov": cov,
        "semi_axes": np.sqrt(5.0 * np.maximum(eigen, 0.0)),
    }


def brain_floor(scans: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median over scans of the lowest brain z per 10 mm (x, y) column (NaN where fewer than 4 scans)."""
    xs, ys = np.arange(-70, 71, 10), np.arange(-90, 81, 10)
    maps = []
    for scan in scans:
        p = scan["Brain"][0]
        ix, iy = np.round((p[:, 0] - xs[0]) / 10).astype(int), np.round((p[:, 1] - ys[0]) / 10).astype(int)
        keep = (ix >= 0) & (ix < len(xs)) & (iy >= 0) & (iy < len(ys))
        floor = np.full((len(xs), len(ys)), np.inf)
        np.minimum.at(floor, (ix[keep], iy[keep]), p[keep, 2])
        maps.append(np.where(np.isinf(floor), np.nan, floor))
    maps = np.array(maps)
    enough = np.sum(~np.isnan(maps), axis=0) >= 4
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(maps, axis=0)
    return xs, ys, np.where(enough, median, np.nan)


def slab_profile(points: np.ndarray, spacing: np.ndarray, z: float, half: float) -> tuple | None:
    """(centroid x, centroid y, area mm^2 per slice, sd x, sd y) of the voxels with |z' - z| < half; the
    standard deviations are within each slice (around that slice's centroid), averaged over the slices, so a
    tube crossing the slab obliquely does not look wider than it is."""
    sel = np.abs(points[:, 2] - z) < half
    if not sel.any():
        return None
    q = points[sel]
    levels = np.unique(np.round(q[:, 2], 2))
    sd = []
    for level in levels:
        s = q[np.abs(q[:, 2] - level) < 0.01]
        sd.append((s[:, 0].std(), s[:, 1].std()))
    sd = np.mean(sd, axis=0)
    area = sel.sum() * spacing[0] * spacing[1] / len(levels)
    return q[:, 0].mean(), q[:, 1].mean(), area, sd[0], sd[1]


def median_rows(rows: list[list]) -> np.ndarray:
    """Column-wise median of rows with None entries dropped."""
    rows = [r for r in rows if r is not None]
    return np.median(np.array(rows, dtype=float), axis=0) if rows else np.full(5, np.nan)


def tube_profile(scans: list[dict], organ: str) -> list[tuple]:
    """Per 10 mm slab from the top of `organ` downwards: z, number of scans, median (x, y, area, sd x, sd y)."""
    top = np.median([s[organ][0][:, 2].max() for s in scans])
    out = []
    for z in np.arange(np.floor(top / 10) * 10, -420.0, -10.0):
        rows = [slab_profile(*s[organ], z, 5.0) for s in scans]
        present = [r for r in rows if r is not None]
        if len(present) >= 4:
            out.append((z, len(present), *median_rows(present)))
    return out


def lung_profile(scans: list[dict]) -> tuple[float, list[tuple], tuple[float, float]]:
    """Apex z (median), per-depth medians (depth, n, x, y, area, sd x, sd y) and the fitted (a*b, c) cap."""
    apexes, per_depth = [], {}
    for scan in scans:
        for organ in ("Lung-Lt", "Lung-Rt"):
            key, p = mirrored(organ, scan[organ][0])
            apex = p[:, 2].max()
            apexes.append(apex)
            for depth in range(0, 130, 10):
                per_depth.setdefault(depth, []).append(slab_profile(p, scan[organ][1], apex - depth - 1.25, 1.3))
    rows = []
    for depth, values in sorted(per_depth.items()):
        present = [v for v in values if v is not None]
        # the scan bottom cuts some lungs: a cut slab would bias the area down
        if len(present) >= 8:
            rows.append((depth, len(present), *median_rows(present)))
    d = np.array([r[0] + 1.25 for r in rows])
    area = np.array([r[4] for r in rows])
    best = None
    for c in np.arange(80.0, 400.0, 1.0):
        shape = np.pi * (2 * d / c - (d / c) ** 2)
        ab = float(shape @ area / (shape @ shape))
        err = float(np.sum((ab * shape - area) ** 2))
        if best is None or err < best[0]:
            best = (err, ab, c)
    return float(np.median(apexes)), rows, (best[1], best[2])


def mandible_profile(scans: list[dict]) -> list[tuple]:
    """Per 7.5 mm slab from the bottom: z, n, area, chin y range, half (x > 15 mm, mirrored) x and y ranges."""
    bottom = np.median([s["Mandible"][0][:, 2].min() for s in scans])
    top = np.median([s["Mandible"][0][:, 2].max() for s in scans])
    out = []
    for z in np.arange(bottom + 2.5, top, 7.5):
        rows = []
        for scan in scans:
            p, spacing = scan["Mandible"]
            sel = np.abs(p[:, 2] - z) < 1.3
            if not sel.any():
                continue
            q = p[sel]
            side = np.abs(q[:, 0]) > 15
            chin = np.abs(q[:, 0]) < 8
            nan2 = (np.nan, np.nan)
            slices = len(np.unique(np.round(q[:, 2], 2)))
            rows.append((
                sel.sum() * spacing[0] * spacing[1] / slices,
                *((q[chin, 1].min(), q[chin, 1].max()) if chin.any() else nan2),
                *((np.abs(q[side, 0]).min(), np.abs(q[side, 0]).max()) if side.any() else nan2),
                *((q[side, 1].min(), q[side, 1].max()) if side.any() else nan2),
            ))
        if len(rows) >= 4:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out.append((z, len(rows), *np.nanmedian(np.array(rows, dtype=float), axis=0)))
    return out


def segment_fit(points: np.ndarray, volume: float) -> tuple[np.ndarray, np.ndarray, float]:
    """End points (2nd / 98th percentile along the main axis) and radius (volume / pi length) of a thin tube."""
    centre = points.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov(points.T))
    axis = vectors[:, -1]
    if axis[1] > 0:  # orient from the eye backwards (anterior = -y) for a stable sign
        axis = -axis
    t = (points - centre) @ axis
    lo, hi = np.percentile(t, [2, 98])
    length = hi - lo
    return centre + hi * axis, centre + lo * axis, float(np.sqrt(volume / (np.pi * max(length, 1e-6))))


def fmt(v, digits=1) -> str:
    return "[" + ", ".join(f"{x:.{digits}f}" for x in np.atleast_1d(v)) + "]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotator", default="oncologist")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    root = DATA / args.annotator
    if not root.is_dir():
        print(f"phantom_calibration: no data at {root} (set FASTSEG_DATA)", file=sys.stderr)
        return 1
    start = time.perf_counter()
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    scans = [load_scan(root / name / "segmentations") for name in names]
    print(f"# phantom calibration: {len(scans)} scans ({args.annotator}) read in {time.perf_counter() - start:.0f} s")
    report: dict = {"scans": names, "organs": {}, "pooled": {}}

    # 1. per organ and pooled Lt + mirrored Rt
    per_organ: dict[str, list] = {}
    pooled: dict[str, list] = {}
    for scan in scans:
        for organ, (points, spacing) in scan.items():
            if len(points) < 2:
                continue
            per_organ.setdefault(organ, []).append(organ_stats(points, spacing))
            key, p = mirrored(organ, points)
            pooled.setdefault(key, []).append(organ_stats(p, spacing))
    print("\n## 1. Organs (median over scans; centroid relative to the brain centroid, LPS mm)\n")
    print("| organ | n | voxels | volume mm^3 | centroid x, y, z | moment semi-axes |")
    print("|---|---|---|---|---|---|")
    for organ, stats in sorted(per_organ.items()):
        row = {
            "n": len(stats),
            "voxels": float(np.median([s["voxels"] for s in stats])),
            "volume": float(np.median([s["volume"] for s in stats])),
            "centroid": np.median([s["centroid"] for s in stats], axis=0).tolist(),
            "semi_axes": np.median([s["semi_axes"] for s in stats], axis=0).tolist(),
        }
        report["organs"][organ] = row
        print(f"| {organ} | {row['n']} | {row['voxels']:.0f} | {row['volume']:.0f} | {fmt(row['centroid'])} "
              f"| {fmt(row['semi_axes'])} |")
    print("\n## 1b. Pooled model (Lt + mirrored Rt for pairs): volume, centroid, covariance xx yy zz xy xz yz\n")
    for key, stats in sorted(pooled.items()):
        cov = np.median([s["cov"] for s in stats], axis=0)
        row = {
            "n": len(stats),
            "volume": float(np.median([s["volume"] for s in stats])),
            "centroid": np.median([s["centroid"] for s in stats], axis=0).tolist(),
            "cov": [cov[0, 0], cov[1, 1], cov[2, 2], cov[0, 1], cov[0, 2], cov[1, 2]],
        }
        report["pooled"][key] = row
        print(f"{key:18s} n={row['n']:2d} volume={row['volume']:9.0f} centroid={fmt(row['centroid'])} "
              f"cov={fmt(row['cov'], 2)}")

    # 2. brain floor
    xs, ys, floor = brain_floor(scans)
    report["brain_floor"] = {"x": xs.tolist(), "y": ys.tolist(),
                             "z": [[None if np.isnan(v) else round(float(v), 1) for v in r] for r in floor]}
    print("\n## 2. Brain floor: lowest brain z per 10 mm column (rows x, columns y)\n")
    print("x\\y " + " ".join(f"{y:5.0f}" for y in ys))
    for x, r in zip(xs, floor):
        print(f"{x:4.0f} " + " ".join("    ." if np.isnan(v) else f"{v:5.0f}" for v in r))

    # 3. spinal canal / cord
    for organ in ("Spinal-Canal", "Spinal-Cord"):
        prof = tube_profile(scans, organ)
        report[organ] = prof
        print(f"\n## 3. {organ} per 10 mm slab: z, n, x, y, area mm^2, sd x, sd y\n")
        for r in prof:
            print(f"{r[0]:7.0f} {r[1]:2d} " + " ".join(f"{v:7.1f}" for v in r[2:]))

    # 4. lungs
    apex, rows, (ab, c) = lung_profile(scans)
    report["lung"] = {"apex": apex, "rows": rows, "cap_ab": ab, "cap_c": c}
    print(f"\n## 4. Lungs (Lt + mirrored Rt): apex z {apex:.1f}; cap fit a*b = {ab:.0f} mm^2, c = {c:.0f} mm\n")
    print("depth, n, x, y, area mm^2, sd x, sd y")
    for r in rows:
        print(f"{r[0]:5.0f} {r[1]:2d} " + " ".join(f"{v:7.1f}" for v in r[2:]))

    # 5. mandible
    prof = mandible_profile(scans)
    report["mandible"] = prof
    print("\n## 5. Mandible per 7.5 mm slab: z, n, area, chin y min..max, half |x| min..max, half y min..max\n")
    for r in prof:
        print(f"{r[0]:7.1f} {r[1]:2d} " + " ".join(f"{v:7.1f}" for v in r[2:]))

    # 6. optic nerves
    ends = []
    for scan in scans:
        for organ in ("Optic-Nerve-Lt", "Optic-Nerve-Rt"):
            _, p = mirrored(organ, scan[organ][0])
            front, back, radius = segment_fit(p, len(p) * float(np.prod(scan[organ][1])))
            ends.append((*front, *back, radius))
    ends = np.median(np.array(ends), axis=0)
    report["optic_nerve"] = {"front": ends[:3].tolist(), "back": ends[3:6].tolist(), "radius": float(ends[6])}
    print(f"\n## 6. Optic nerve (Lt + mirrored Rt): front {fmt(ends[:3])} back {fmt(ends[3:6])} "
          f"radius {ends[6]:.2f} mm")

    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=float))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
