#!/usr/bin/env python3
"""Surface metrics of a whole real scan: fastseg vs MONAI 1.6.1 vs DeepMind's surface-distance (part (b) of
the metrics benchmarks; the EDT alone is benchmarks/bench_edt.py).

    python benchmarks/bench_metrics.py [--scan 0522c0014] [--threads 2] [--repeat 5] [--sd-repeat 3]
                                       [--monai-repeat 1] [--tolerance 2.0] [--device cpu] [--out benchmarks/results]

Workload: all 21 organs of one scan, radiographer as prediction and oncologist as target (masks read with
pynrrd as C-contiguous (z, y, x) arrays, spacing from the header). Every method computes, for every organ,
HD, HD95, the average surface distances, the surface Dice at ``--tolerance`` mm and (where the library has
it) the volumetric Dice, called the way a user of that library calls it:

  fastseg (monai)       fastseg.metrics.surface_metrics(pred, target, convention='monai'): one call, inputs
                        (1, 21, z, y, x) bool tensors (numpy memory, no copy)
  fastseg (deepmind)    the same with convention='deepmind'
  ..., no identical-mask shortcut   the same with the shortcut for identical masks (all distances 0, no
                        transform) switched off, as for a model's prediction: 7 of the 21 organs of 0522c0014
                        are identical between the two annotators
  fastseg compat        fastseg.compat.monai_metrics: compute_hausdorff_distance (max and percentile=95),
                        compute_average_surface_distance(symmetric=True), compute_surface_dice, on the same
                        (1, 21, ...) tensors, as MONAI users call MONAI
  MONAI 1.6.1           the same four monai.metrics calls, one organ at a time ((1, 1, z, y, x) bool tensors:
                        MONAI casts its inputs to float32, 21 organs at once would need 7 GB)
  surface-distance 0.1  per organ: compute_surface_distances, compute_robust_hausdorff (100 and 95),
                        compute_average_surface_distance, compute_surface_dice_at_tolerance,
                        compute_dice_coefficient, on numpy bool arrays

Each method runs once as warm-up (not for MONAI: one run takes about a minute), then ``--*repeat`` timed runs;
the table reports the median and the minimum. fastseg and MONAI run on ``--threads`` torch threads;
surface-distance and scipy are single-threaded. The agreement table gives the largest difference over the
organs between fastseg and the library whose convention it reproduces. Writes <out>/metrics-<device>.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
DATA = Path(os.environ.get("FASTSEG_DATA", HERE.parent / ".." / "shared" / "data" / "tcia-han-oar")) / "validation"
KEYS = ("hd", "hd95", "assd", "asd_pred_to_target", "asd_target_to_pred", "nsd", "dice")


def load_scan(scan: str):
    """(organs, pred (1, O, z, y, x) bool, target likewise, spacing (z, y, x) in mm)."""
    import nrrd

    organs = sorted(p.stem for p in (DATA / "oncologist" / scan / "segmentations").glob("*.nrrd"))
    stacks, spacing = [], None
    for annotator in ("radiographer", "oncologist"):
        masks = []
        for organ in organs:
            data, header = nrrd.read(str(DATA / annotator / scan / "segmentations" / f"{organ}.nrrd"),
                                     index_order="C")
            masks.append(data != 0)
            spacing = tuple(float(abs(v)) for v in np.diag(np.asarray(header["space directions"], float))[::-1])
        stacks.append(np.stack(masks)[None])
    return organs, stacks[0], stacks[1], spacing


# ------------------------------------------------------------------------------------------- methods
# Each returns {key: (O,) float64 array} for the O organs.


def run_fastseg(pred, target, spacing, tol, convention, device):
    from fastseg.metrics.surface import surface_metrics

    p, t = torch.from_numpy(pred), torch.from_numpy(target)
    if device != "cpu":
        p, t = p.to(device), t.to(device)
    out = surface_metrics(p, t, spacing=spacing, percentile=95, tolerance=tol, convention=convention,
                          include_background=True)
    if device != "cpu":
        torch.cuda.synchronize()
    res = {k.replace("hd_percentile", "hd95"): v[0].double().cpu().numpy() for k, v in out.items()}
    return res


def _monai_style(lib, pred, target, spacing, tol, organs_at_once: bool):
    """The four MONAI calls, on all organs at once or one organ at a time."""
    kw = dict(include_background=True, spacing=list(spacing))
    groups = [slice(None)] if organs_at_once else [slice(i, i + 1) for i in range(pred.shape[1])]
    res = {k: [] for k in ("hd", "hd95", "assd", "nsd")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g in groups:
            p, t = torch.from_numpy(pred[:, g]), torch.from_numpy(target[:, g])
            n = p.shape[1]
            res["hd"].append(lib.compute_hausdorff_distance(p, t, **kw)[0])
            res["hd95"].append(lib.compute_hausdorff_distance(p, t, percentile=95, **kw)[0])
            res["assd"].append(lib.compute_average_surface_distance(p, t, symmetric=True, **kw)[0])
            res["nsd"].append(lib.compute_surface_dice(p, t, [tol] * n, **kw)[0])
    return {k: torch.cat(v).double().numpy() for k, v in res.items()}


def run_fastseg_no_shortcut(pred, target, spacing, tol, convention, device):
    """run_fastseg with the identical-mask shortcut off: every organ gets its distance transforms, as it would
    for a model's prediction (7 of the 21 organs of 0522c0014 are identical between the two annotators)."""
    from fastseg.metrics import _surfaces

    saved = _surfaces._identical
    _surfaces._identical = lambda a, b: False
    try:
        return run_fastseg(pred, target, spacing, tol, convention, device)
    finally:
        _surfaces._identical = saved


def run_compat(pred, target, spacing, tol, device):
    from fastseg.compat import monai_metrics

    return _monai_style(monai_metrics, pred, target, spacing, tol, organs_at_once=True)


def run_monai(pred, target, spacing, tol, device):
    import monai.metrics

    return _monai_style(monai.metrics, pred, target, spacing, tol, organs_at_once=False)


def run_surface_distance(pred, target, spacing, tol, device):
    if not hasattr(np, "Inf"):  # surface-distance 0.1 on NumPy 2
        np.Inf = np.inf
    import surface_distance as sd

    res = {k: [] for k in KEYS}
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        for i in range(pred.shape[1]):
            p, g = pred[0, i], target[0, i]
            d = sd.compute_surface_distances(g, p, spacing)
            to_pred, to_target = sd.compute_average_surface_distance(d)
            a_g, a_p = d["surfel_areas_gt"], d["surfel_areas_pred"]
            res["hd"].append(sd.compute_robust_hausdorff(d, 100))
            res["hd95"].append(sd.compute_robust_hausdorff(d, 95))
            res["asd_pred_to_target"].append(to_target)
            res["asd_target_to_pred"].append(to_pred)
            res["assd"].append(((d["distances_gt_to_pred"] * a_g).sum() + (d["distances_pred_to_gt"] * a_p).sum())
                               / (a_g.sum() + a_p.sum()))
            res["nsd"].append(sd.compute_surface_dice_at_tolerance(d, tol))
            res["dice"].append(sd.compute_dice_coefficient(g, p))
    return {k: np.asarray(v, float) for k, v in res.items()}


def timed(fn, repeat: int, warmup: bool):
    result = fn() if warmup else None
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, times


def max_diff(a: dict, b: dict) -> dict:
    out = {}
    for k in a:
        if k in b:
            x, y = np.asarray(a[k], float), np.asarray(b[k], float)
            same_special = (np.isnan(x) & np.isnan(y)) | (np.isinf(x) & (x == y))
            d = np.where(same_special, 0.0, np.abs(x - y))
            out[k] = float(np.nanmax(np.where(np.isnan(d), np.inf, d))) if d.size else 0.0
    return out


def environment(threads: int, device: str) -> list:
    import fastseg

    lines = [f"- {platform.machine()}, {os.cpu_count()} CPUs visible, torch threads {threads} for fastseg and MONAI; "
             "surface-distance and scipy single-threaded"]
    if hasattr(os, "getloadavg"):
        la = os.getloadavg()
        lines.append(f"- load average {la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f} at the end of the run (a shared machine: "
                     "absolute times are noisy; ratios are measured in the same run)")
    versions = [f"torch {torch.__version__}", f"fastseg extension {fastseg.build_info()['extension']}",
                f"numpy {np.__version__}"]
    for name in ("monai", "surface_distance", "scipy"):
        try:
            mod = __import__(name)
            versions.append(f"{name} {getattr(mod, '__version__', '0.1' if name == 'surface_distance' else '?')}")
        except ImportError:
            pass
    lines.append("- " + ", ".join(versions) + f", {_dt.datetime.now().isoformat(timespec='seconds')}")
    if device != "cpu":
        lines.append(f"- device {torch.cuda.get_device_name()}")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", default="0522c0014")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of each fastseg method")
    ap.add_argument("--sd-repeat", type=int, default=3, help="timed runs of surface-distance")
    ap.add_argument("--monai-repeat", type=int, default=1, help="timed runs of MONAI (0 skips it)")
    ap.add_argument("--tolerance", type=float, default=2.0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fastseg methods only)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"loading {args.scan} ...", file=sys.stderr)
    organs, pred, target, spacing = load_scan(args.scan)
    tol, dev = args.tolerance, args.device
    plan = [
        ("fastseg (monai)", lambda: run_fastseg(pred, target, spacing, tol, "monai", dev), args.repeat, True),
        ("fastseg (deepmind)", lambda: run_fastseg(pred, target, spacing, tol, "deepmind", dev), args.repeat, True),
        ("fastseg (monai), no identical-mask shortcut",
         lambda: run_fastseg_no_shortcut(pred, target, spacing, tol, "monai", dev), args.repeat, True),
        ("fastseg (deepmind), no identical-mask shortcut",
         lambda: run_fastseg_no_shortcut(pred, target, spacing, tol, "deepmind", dev), args.repeat, True),
        ("fastseg compat (MONAI API)", lambda: run_compat(pred, target, spacing, tol, dev), args.repeat, True),
        ("surface-distance 0.1", lambda: run_surface_distance(pred, target, spacing, tol, dev), args.sd_repeat, True),
    ]
    if args.monai_repeat > 0:
        plan.append(("MONAI 1.6.1", lambda: run_monai(pred, target, spacing, tol, dev), args.monai_repeat, False))
    results, times = {}, {}
    for name, fn, repeat, warmup in plan:
        print(f"{name} ...", file=sys.stderr)
        try:
            results[name], times[name] = timed(fn, repeat, warmup)
        except ImportError as exc:
            print(f"{name}: not installed ({exc}), skipped", file=sys.stderr)
        else:
            print(f"  median {statistics.median(times[name]):.3f} s", file=sys.stderr)

    sd_t = statistics.median(times["surface-distance 0.1"]) if "surface-distance 0.1" in times else None
    mo_t = statistics.median(times["MONAI 1.6.1"]) if "MONAI 1.6.1" in times else None
    lines = [f"# Surface metrics of a whole scan on {dev.upper()}: {args.scan}, {len(organs)} organs", ""]
    lines.append(f"- masks {tuple(pred.shape[2:])} (z, y, x) per organ, spacing {tuple(round(s, 4) for s in spacing)} "
                 f"mm; radiographer = prediction, oncologist = target; HD, HD95, ASSD (+ both directed means), "
                 f"surface Dice at {tol} mm, Dice")
    lines += environment(args.threads, dev)
    lines += ["", "| method | median (s) | min (s) | speed-up vs surface-distance | speed-up vs MONAI | runs |",
              "|---|---|---|---|---|---|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        vs_sd = f"{sd_t / med:.1f}x" if sd_t else "-"
        vs_mo = f"{mo_t / med:.1f}x" if mo_t else "-"
        lines.append(f"| {name} | {med:.3f} | {min(ts):.3f} | {vs_sd} | {vs_mo} | {len(ts)} |")
    lines += ["", "Largest difference over the organs (distances in mm, ratios absolute):", "",
              "| fastseg | reference | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    pairs = [("fastseg (deepmind)", "surface-distance 0.1"), ("fastseg (monai)", "MONAI 1.6.1"),
             ("fastseg compat (MONAI API)", "MONAI 1.6.1")]
    for ours, ref in pairs:
        if ours in results and ref in results:
            diff = max_diff(results[ours], results[ref])
            cells = [f"{diff[k]:.1e}" if k in diff else "-" for k in KEYS]
            lines.append(f"| {ours} | {ref} | " + " | ".join(cells) + " |")
    brainstem = organs.index("Brainstem") if "Brainstem" in organs else None
    if brainstem is not None:
        lines += ["", "Brainstem: " + "; ".join(
            f"{name}: HD95 {res['hd95'][brainstem]:.3f} mm, NSD {res['nsd'][brainstem]:.3f}"
            for name, res in results.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"metrics-{dev.split(':')[0]}.md"
    path.write_text(text)
    print(f"written {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
