#!/usr/bin/env python3
"""Exact Euclidean distance transform on a real CT-sized mask: fastseg vs scipy.ndimage vs seung-lab `edt`.

    python benchmarks/bench_edt.py [--scan 0522c0014] [--organ Brain] [--threads 2] [--repeat 5]
                                   [--scipy-repeat 3] [--out benchmarks/results]

One organ mask of one scan (512 x 512 x ~156 voxels, read with pynrrd as a C-contiguous (z, y, x) array with
its real spacing), two workloads:
  inside   EDT of the organ mask: distances inside the organ to its border (sparse: ~1 % of the voxels);
  outside  EDT of the complement: the distance of every other voxel to the organ (dense: what surface
           metrics and distance maps need).
Each method runs once as warm-up, then is timed `--repeat` times (median and min reported): fastseg on
`--threads` torch threads, seung-lab edt with parallel=`--threads`, scipy (single-threaded by design).
Each result is also compared with scipy's rounded to float32: the fraction of voxels equal and the largest
difference.
Writes <out>/edt-cpu.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("FASTSEG_DATA", HERE.parent / ".." / "shared" / "data" / "tcia-han-oar")) / "validation" / "oncologist"


def load_mask(scan: str, organ: str):
    import nrrd

    path = DATA / scan / "segmentations" / f"{organ}.nrrd"
    data, header = nrrd.read(str(path), index_order="C")  # (z, y, x)
    spacing = tuple(float(abs(v)) for v in np.diag(np.asarray(header["space directions"], float))[::-1])
    return np.ascontiguousarray(data != 0), spacing


def methods(threads: int):
    import fastseg

    out = {"fastseg": lambda m, sp: fastseg.distance_transform_edt(m, sp)}
    try:
        import edt as seung

        out["seung-lab edt"] = lambda m, sp: seung.edt(m, anisotropy=sp, parallel=threads)
    except ImportError:
        print("seung-lab edt not installed (pip install edt): skipped", file=sys.stderr)
    from scipy import ndimage

    out["scipy.ndimage"] = lambda m, sp: ndimage.distance_transform_edt(m, sampling=sp)
    return out


def timed(fn, mask, spacing, repeat):
    result = fn(mask, spacing)  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(mask, spacing)
        times.append(time.perf_counter() - t0)
    return result, times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", default="0522c0014")
    ap.add_argument("--organ", default="Brain")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scipy-repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    mask, spacing = load_mask(args.scan, args.organ)
    import fastseg

    info = fastseg.build_info()
    if not info["extension"]:
        print(f"warning: fastseg runs its pure-PyTorch reference ({info['reason']})", file=sys.stderr)
    rows = []
    for case, m in (("inside", mask), ("outside", ~mask)):
        results = {}
        for name, fn in methods(args.threads).items():
            repeat = args.scipy_repeat if name == "scipy.ndimage" else args.repeat
            res, times = timed(fn, m, spacing, repeat)
            results[name] = (np.asarray(res), times)
            print(f"{case:8s} {name:14s} median {statistics.median(times):.3f} s", file=sys.stderr)
        ref = results["scipy.ndimage"][0].astype(np.float32)
        t_scipy = statistics.median(results["scipy.ndimage"][1])
        for name, (res, times) in results.items():
            med = statistics.median(times)
            exact = float(np.mean(res.astype(np.float32) == ref))
            maxdiff = float(np.abs(res.astype(np.float32) - ref).max())
            rows.append((case, name, med, min(times), t_scipy / med, exact, maxdiff, len(times)))

    nz = int(mask.sum())
    load = os.getloadavg()
    header = [
        f"# Exact EDT on CPU: {args.organ} of scan {args.scan}",
        "",
        f"- mask {tuple(mask.shape)} (z, y, x), spacing {tuple(round(s, 4) for s in spacing)} mm, "
        f"{nz} foreground voxels ({100 * nz / mask.size:.2f} %); "
        "inside = EDT of the mask, outside = EDT of its complement",
        f"- {args.threads} threads for fastseg (torch.set_num_threads) and seung-lab edt (parallel); scipy is "
        "single-threaded",
        f"- {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end of the run (a shared machine: absolute times "
        "are noisy, ratios measured in the same run)",
        f"- torch {torch.__version__}, fastseg extension {info['extension']}, numpy {np.__version__}, "
        f"{_dt.datetime.now().isoformat(timespec='seconds')}",
        "",
        "| workload | method | median (s) | min (s) | speed-up vs scipy | == float32(scipy) | max abs diff (mm) | runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines = [
        f"| {c} | {n} | {med:.3f} | {mn:.3f} | {sp:.1f}x | {100 * ex:.2f} % | {md:.2e} | {k} |"
        for c, n, med, mn, sp, ex, md, k in rows
    ]
    text = "\n".join(header + lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "edt-cpu.md").write_text(text)


if __name__ == "__main__":
    main()
