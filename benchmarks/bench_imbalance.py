#!/usr/bin/env python3
"""Exact patch-sampling imbalance analysis (fastseg.imbalance) on the real head-and-neck masks.

    python benchmarks/bench_imbalance.py [--inplane 64 128 192 256] [--z 16 48 80] [--oversample 0 0.3333]
                                         [--cases 7] [--workers 0] [--memory-budget 10] [--out benchmarks/results]

Data: the 7 oncologist scans of ../shared/data/tcia-han-oar (or $FASTSEG_DATA), 21 organs each, read through
fastseg.data.dataset (priority: small organs over large where masks overlap), arrays in the files' (x, y, z)
order, so patch sizes are (in-plane, in-plane, z). ``--cases N`` with N > 7 cycles through the scans (the
issue's "20 cases of 512 x 512 x 160"); the analysis treats them as N cases.

Reports the time of the analysis alone (reading the masks is timed separately), per case and patch size, the
table of scores and presence, and — with ``--memory-budget`` GiB — the recommended patch size for the
reference U-Net (memory estimated from the network). Writes files only with ``--out DIR``:
``imbalance-cpu.md`` (table, timings, environment), ``imbalance-cpu.json`` and ``imbalance-cpu.png``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
DATA = Path(os.environ.get("FASTSEG_DATA", HERE.parent / ".." / "shared" / "data" / "tcia-han-oar"))


def load_cases(limit: int):
    """(names, label maps, spacing, organ names) of the oncologist scans, label maps in (x, y, z) order."""
    from fastseg.data.dataset import DatasetSpec

    folder = DATA / "validation" / "oncologist"
    scans = sorted(p.name for p in folder.iterdir() if p.is_dir())
    organs = sorted(p.stem for p in (folder / scans[0] / "segmentations").glob("*.nrrd"))
    spec = DatasetSpec.from_dict({"organs": organs, "cases": scans,
                                  "masks": "validation/oncologist/{case}/segmentations/{organ}.nrrd"}, root=DATA)
    names, labels, spacing = [], [], None
    for scan in scans[:limit]:
        image = spec.load_label(scan)
        names.append(scan)
        labels.append(np.ascontiguousarray(image.array))
        spacing = spacing or tuple(float(s) for s in image.spacing)
    return names, labels, spacing, organs


def environment() -> str:
    import torch

    return (f"- {platform.machine()}, {os.cpu_count()} CPUs visible, Python {platform.python_version()}, "
            f"numpy {np.__version__}, torch {torch.__version__}\n"
            f"- load average at the end {os.getloadavg()[0]:.2f} (other processes share the CPUs)\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inplane", type=int, nargs="+", default=[64, 128, 192, 256])
    ap.add_argument("--z", type=int, nargs="+", default=[16, 48, 80])
    ap.add_argument("--oversample", type=float, nargs="+", default=[0.0, 1 / 3])
    ap.add_argument("--cases", type=int, default=7, help="number of cases (cycles through the 7 scans)")
    ap.add_argument("--workers", type=int, default=0, help="processes for the analysis (0: this one)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--memory-budget", type=float, default=None, help="GiB; recommend a patch size under it")
    ap.add_argument("--out", type=Path, default=None, help="write imbalance-cpu.{md,json,png} to this folder")
    args = ap.parse_args(argv)

    from fastseg.imbalance import analyze_imbalance

    if not (DATA / "validation" / "oncologist").is_dir():
        sys.exit(f"bench_imbalance: no data at {DATA} (set FASTSEG_DATA)")
    t = time.perf_counter()
    names, scans, spacing, organs = load_cases(min(args.cases, 7))
    read_s = time.perf_counter() - t
    labels = [scans[i % len(scans)] for i in range(args.cases)]
    shapes = sorted({lab.shape for lab in labels})
    patches = [(s, s, z) for s in args.inplane for z in args.z]
    print(f"{len(labels)} cases ({len(scans)} distinct scans, shapes {shapes}), spacing {spacing} mm, "
          f"{len(organs)} organs; read in {read_s:.1f} s")
    print(f"{len(patches)} patch sizes x oversampling {args.oversample}, workers {args.workers}")

    t = time.perf_counter()
    report = analyze_imbalance(labels, patches, oversample_foreground=args.oversample,
                               num_classes=len(organs) + 1, class_names=["background"] + organs,
                               spacing=spacing, batch_size=args.batch_size, num_workers=args.workers)
    seconds = time.perf_counter() - t
    per = seconds / (len(labels) * len(patches))
    timing = (f"analysis: {seconds:.2f} s for {len(labels)} cases x {len(patches)} patch sizes "
              f"({1e3 * per:.0f} ms per case and patch size; every oversampling ratio comes with it)")
    # the same statistics of one case from the pure-PyTorch fallback (fastseg._reference), as a yardstick
    import torch
    from fastseg import _extension
    from fastseg.ops.imbalance import reference_patch_stats

    t = time.perf_counter()
    reference_patch_stats(labels[0], patches, len(organs) + 1)
    ref_per = (time.perf_counter() - t) / len(patches)
    engine = "compiled fastseg::patch_stats" if _extension.available() else "pure-PyTorch reference"
    timing += (f"; {engine} on {torch.get_num_threads()} threads. The pure-PyTorch reference takes "
               f"{1e3 * ref_per:.0f} ms per case and patch size ({ref_per / per:.0f}x)")
    recommendation = ""
    if args.memory_budget is not None:
        t = time.perf_counter()
        rec = report.best(args.memory_budget)
        recommendation = (f"recommended under {args.memory_budget:g} GiB (reference U-Net, batch {args.batch_size}):"
                          f" {'x'.join(map(str, rec.patch_size))} with oversample_foreground "
                          f"{rec.oversample_foreground:.3g}, score {rec.score:.3f}, estimated "
                          f"{rec.memory_bytes / 2 ** 30:.2f} GiB (memory estimates {time.perf_counter() - t:.1f} s)")
    table = report.table()
    print(table)
    print(timing)
    if recommendation:
        print(recommendation)

    if args.out is not None:
        from fastseg._atomic import write_text

        stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        text = (f"# Exact patch-sampling imbalance analysis, CPU ({stamp})\n\n"
                f"`python benchmarks/bench_imbalance.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                f"Data: {len(labels)} cases from {len(scans)} oncologist scans of tcia-han-oar "
                f"({', '.join(names)}), {len(organs)} organs, label maps in (x, y, z) order, spacing {spacing} mm.\n\n"
                f"- {timing}\n- reading the masks: {read_s:.1f} s\n"
                + (f"- {recommendation}\n" if recommendation else "") + "\n" + environment() + "\n" + table)
        write_text(args.out / "imbalance-cpu.md", text)
        report.to_json(args.out / "imbalance-cpu.json")
        report.plot(args.out / "imbalance-cpu.png")
        print(f"wrote {args.out / 'imbalance-cpu.md'}, .json, .png")


if __name__ == "__main__":
    main()
