#!/usr/bin/env python3
"""The comparison of Tappeiner, Welk & Schubert ("Tackling the class imbalance problem of deep learning-based
head and neck organ segmentation", IJCARS 2022, https://doi.org/10.1007/s11548-022-02649-5), rebuilt from
fastseg's pieces: nnU-Net's default patch vs the patch that minimises the class-imbalance score, crossed with
Dice + CE vs class adaptive Dice + CE, over fixed seeds, on two datasets:

* ``real``: CT-like images rendered (fastseg.data.phantom.render_image) around the oncologist label maps of
  the 7 shared scans (../shared/data/tcia-han-oar, or $FASTSEG_DATA), at a coarse working spacing;
* ``synthetic``: the procedural phantom (fastseg.data.phantom.write_phantom_dataset), fixed seed.

    python experiments/paper_comparison.py --profile smoke|cpu|gpu [--work-dir DIR] [--datasets real synthetic]
        [--seeds 0 1 2] [--iterations N] [--organs Lens-Lt Lens-Rt ...] [--spacing 2 2 3] [--threads N]
        [--report-only] [--out docs/comparison.md]

Every arm (dataset x patch x loss x seed) trains, predicts the test cases with probabilities, evaluates
per-organ Dice / HD95 / NSD and the confidence analysis, and stores ``result.json`` under the work dir; a
rerun skips finished arms (and resumes an interrupted training from its checkpoint); ``--report-only``
rebuilds the Markdown report from those files. Design and choices: experiments/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("FASTSEG_DATA", REPO.parent / "shared" / "data" / "tcia-han-oar"))

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from fastseg import _atomic  # noqa: E402
from fastseg.data.dataset import DatasetSpec, write_dataset_description  # noqa: E402
from fastseg.data.io import Image, read_image, write_image  # noqa: E402
from fastseg.data.phantom import ORGANS, PRIORITY, render_image, write_phantom_dataset  # noqa: E402

DATASETS = ("real", "synthetic")
PATCHES = ("default", "optimised")
LOSSES = {"dice_ce": "keep", "class_adaptive": "ignore"}  # -> TrainConfig.absent_classes
LOSS_NAMES = {"dice_ce": "DiceCE", "class_adaptive": "class adaptive DiceCE"}
ARMS = [(p, l) for p in PATCHES for l in LOSSES]

# 2 test scans, one per source collection (Head-Neck Cetuximab 0522c*, TCGA-HNSC TCGA-CV-*), both holding all
# 21 organs (TCGA-CV-5977 has no submandibular glands); 0522c0727a/b are two scans of one patient and stay
# together in training, so no patient is on both sides.
REAL_TEST = ("0522c0014", "TCGA-CV-5978")
REAL_MARGIN_MM = 20.0   # kept around the organs: the renderer's skin lies ~15 mm outside the brain
REAL_FOV_Z_MM = 330.0   # the phantom's default height (top ~2 cm above the vertex, ~4 cm into the lungs)
RENDER_SEED = 1000      # the image of scan i (sorted names) is rendered with seed RENDER_SEED + i
SYNTHETIC_SEED = 0
# organ volume: small < 1 cm^3 <= medium < 50 cm^3 <= large. Both limits lie in wide gaps of the 21 organs'
# volumes in these datasets (optic nerve 0.7 vs submandibular 7 cm^3; spinal canal ~32 vs mandible ~65 cm^3), so
# no bilateral pair is split; the lungs, cut by the 330 mm field of view to 65-105 cm^3, join brain and mandible.
SIZE_LIMITS_MM3 = (1e3, 5e4)
SIZE_GROUPS = ("small", "medium", "large")
TOLERANCE_MM = 2.0      # surface Dice (NSD) tolerance
CONFIDENCE_KEYS = ("ece", "mce", "tp_confidence", "fp_confidence", "fn_confidence")

# The CPU profile trains what the CPU demo trains (fastseg/training/demo.py: 2x2x3 mm, 8-64 features, lr 1e-2
# without augmentation, foreground oversampling 0.67, 750 iterations; it learned 13 of the 21 organs), under
# the memory its 96x64x24 patch needs (0.19 GiB). The earlier profile (3 mm, 400 iterations, 1/3 oversampling)
# learned almost nothing but the brain in any arm (docs/comparison.md of 2026-12-07). sw_overlap 0.25 on the
# CPU: it cut the measured prediction time by a third; nnU-Net's 0.5 on the GPU.
_CPU = dict(spacing=[2.0, 2.0, 3.0], batch_size=2, lr=1e-2, augment=False, base_features=8, max_features=64,
            num_workers=0, device="cpu", memory_budget_gb=0.2, sw_overlap=0.25, synthetic_train=10,
            synthetic_test=4, oversample_foreground=0.67)
PROFILES: Dict[str, Dict[str, Any]] = {
    # pipeline check: the cpu profile's data, patches and network, 1 seed, 20 iterations
    "smoke": {**_CPU, "seeds": [0], "iterations": 20},
    "cpu": {**_CPU, "seeds": [0, 1, 2], "iterations": 750},
    # not run here: a CUDA machine, finer spacing, nnU-Net-sized network and budget
    "gpu": dict(spacing=[1.5, 1.5, 3.0], batch_size=2, lr=3e-3, augment=True, base_features=32,
                max_features=320, num_workers=4, device="cuda", memory_budget_gb=8.0, sw_overlap=0.5,
                synthetic_train=20, synthetic_test=8, seeds=[0, 1, 2], iterations=2000,
                oversample_foreground=1 / 3),
}
# nnU-Net's rule scales the median shape down until the training fits; these steps let it reach the CPU budget
SCALED_FRACTIONS = tuple(k / 16 for k in range(4, 17))


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"paper_comparison: {name}: expected {expected}, got {got!r}")


def _write_json(path: Path, data) -> Path:
    return _atomic.write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


def _read_json(path: Path):
    return json.loads(Path(path).read_text())


def _number(value) -> Union[float, str, None]:
    """JSON-safe float: nan -> None (undefined); inf stays distinguishable as the string 'inf'."""
    value = float(value)
    if math.isnan(value):
        return None
    return value if math.isfinite(value) else "inf"


def _value(cell) -> float:
    """Inverse of :func:`_number`."""
    if cell is None:
        return math.nan
    return math.inf if cell == "inf" else float(cell)


def _spacing_tag(spacing: Sequence[float]) -> str:
    return "x".join(f"{s:g}" for s in spacing) + "mm"


def _organs_tag(organs: Sequence[str]) -> str:
    if list(organs) == list(ORGANS):
        return "all"
    return f"{len(organs)}organs-{zlib.crc32(','.join(organs).encode()):08x}"


# ---------------------------------------------------------------------------------------------- datasets
def _crop_real(label: Image) -> Image:
    """The organs' bounding box + REAL_MARGIN_MM in x and y; in z the REAL_FOV_Z_MM below the organs' top +
    margin (the 0522c0727 scans reach 1 m down the body; the phantom's field of view cuts the lungs alike)."""
    from scipy import ndimage

    box = ndimage.find_objects((label.array > 0).astype(np.uint8))[0]
    sp = np.asarray(label.spacing)
    margin = np.ceil(REAL_MARGIN_MM / sp).astype(int)
    lo = [max(0, b.start - m) for b, m in zip(box, margin)]
    hi = [min(n, b.stop + m) for b, m, n in zip(box, margin, label.shape)]
    lo[2] = max(lo[2], hi[2] - int(round(REAL_FOV_Z_MM / sp[2])))  # z points up (LPS, identity direction)
    origin = np.asarray(label.origin) + label.direction @ (np.asarray(lo) * sp)
    crop = label.array[tuple(slice(a, b) for a, b in zip(lo, hi))]
    return Image(np.ascontiguousarray(crop), label.spacing, tuple(origin), label.direction)


def _to_spacing(label: Image, spacing: Sequence[float]) -> Image:
    """Label map resampled (fastseg's partial-volume label resampling: every organ survives) to ``spacing``;
    the grid's outer edges stay where they were."""
    from fastseg.data.preprocess import resample

    array = resample(label.array, label.spacing, spacing, is_label=True)
    old, new = np.asarray(label.spacing), np.asarray(spacing, dtype=np.float64)
    origin = np.asarray(label.origin) + label.direction @ ((new - old) / 2)
    return Image(array, tuple(new), tuple(origin), label.direction)


def _write_case(root: Path, case: str, label: Image, render_seed: int) -> None:
    hu = render_image(label.array, label.spacing, seed=render_seed, organs=ORGANS)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    write_image(root / "images" / f"{case}.nii.gz", label.with_array(hu))
    write_image(root / "labels" / f"{case}.nii.gz", label)


def build_real(root: Path, spacing: Sequence[float]) -> Path:
    """The 7 oncologist label maps (masks merged by fastseg's priority, small over large), cropped, resampled
    to ``spacing``, with rendered images; description written last (its presence means the set is complete)."""
    folder = DATA / "validation" / "oncologist"
    if not folder.is_dir():
        raise FileNotFoundError(f"paper_comparison: no real masks at {folder} (set FASTSEG_DATA)")
    scans = sorted(p.name for p in folder.iterdir() if p.is_dir())
    missing = [s for s in REAL_TEST if s not in scans]
    if missing:
        _fail("REAL_TEST", f"scans of {folder}", missing)
    source = DatasetSpec.from_dict({"organs": list(ORGANS), "priority": list(PRIORITY), "cases": scans,
                                    "masks": "validation/oncologist/{case}/segmentations/{organ}.nrrd"}, root=DATA)
    for i, scan in enumerate(scans):
        label = _to_spacing(_crop_real(source.load_label(scan)), spacing)
        _write_case(root, scan, label, RENDER_SEED + i)
        print(f"[data] real {scan}: label map {label.shape} at {_spacing_tag(spacing)}", flush=True)
    train = [s for s in scans if s not in REAL_TEST]
    description = root / "dataset.json"
    write_dataset_description(description, name="tcia-han-oar-rendered", modality="CT", organs=list(ORGANS),
                              image="images/{case}.nii.gz", label="labels/{case}.nii.gz",
                              priority=list(PRIORITY), splits={"train": train, "test": list(REAL_TEST)})
    return description


def select_organs(description: Path, organs: Sequence[str], root: Path) -> Path:
    """A copy of the dataset whose label maps hold only ``organs`` (value = position + 1); the others become
    background. The full description itself when ``organs`` is all of them."""
    spec = DatasetSpec.load(description)
    if list(organs) == list(spec.organs):
        return description
    lut = np.zeros(max(spec.label_values.values()) + 1, np.uint8)
    for k, organ in enumerate(organs):
        lut[spec.label_values[organ]] = k + 1
    for case in spec.cases():
        label = spec.load_label(case)
        write_image(root / "labels" / f"{case}.nii.gz", label.with_array(lut[label.array]))
    out = root / "dataset.json"
    write_dataset_description(out, name=f"{spec.name}-{len(organs)}-organs", modality="CT", organs=list(organs),
                              image=os.path.relpath(spec.root / spec.image_pattern, root),
                              label="labels/{case}.nii.gz",
                              priority=[o for o in PRIORITY if o in organs],
                              splits={k: spec.cases(k) for k in ("train", "test")})
    return out


def _median_voxels(description: Path) -> Dict[str, float]:
    """Per organ, the median voxel count over the cases that contain it (all splits)."""
    spec = DatasetSpec.load(description)
    counts: Dict[str, List[int]] = {o: [] for o in spec.organs}
    for case in spec.cases():
        label = spec.load_label(case).array
        found = np.bincount(label.ravel(), minlength=max(spec.label_values.values()) + 1)
        for organ, value in spec.label_values.items():
            if found[value]:
                counts[organ].append(int(found[value]))
    return {o: float(np.median(c)) if c else None for o, c in counts.items()}


def prepare_dataset(name: str, work: Path, settings: Dict[str, Any], organs: Sequence[str]) -> Dict[str, Any]:
    """Builds (or finds) the dataset and returns its info (description path, splits, organ sizes, timing)."""
    spacing = settings["spacing"]
    tag = _spacing_tag(spacing)
    if name == "synthetic":
        tag += f"-{settings['synthetic_train']}+{settings['synthetic_test']}"
    base = work / "data" / f"{name}-{tag}"
    info_path = base / f"info-{_organs_tag(organs)}.json"
    if info_path.is_file():
        return _read_json(info_path)
    t0 = time.perf_counter()
    full = base / "full" / "dataset.json"
    if not full.is_file():
        if name == "real":
            build_real(full.parent, spacing)
        else:
            print(f"[data] synthetic: {settings['synthetic_train']} + {settings['synthetic_test']} phantoms, seed "
                  f"{SYNTHETIC_SEED}, {tag}", flush=True)
            write_phantom_dataset(full.parent, n_train=settings["synthetic_train"],
                                  n_test=settings["synthetic_test"], seed=SYNTHETIC_SEED, spacing=spacing)
    description = select_organs(full, organs, base / _organs_tag(organs))
    spec = DatasetSpec.load(description)
    info = {
        "dataset": name,
        "description": str(description),
        "spacing": list(spacing),
        "organs": list(organs),
        "splits": {k: spec.cases(k) for k in ("train", "test")},
        "median_voxels": _median_voxels(description),
        "shapes": {c: list(read_image(spec.image_path(c)).shape) for c in spec.cases()},
        "prep_seconds": time.perf_counter() - t0,
    }
    _write_json(info_path, info)
    return info


def size_limits_voxels(spacing: Sequence[float]) -> List[float]:
    return [t / float(np.prod(spacing)) for t in SIZE_LIMITS_MM3]


def size_group(voxels: Optional[float], limits: Sequence[float]) -> str:
    if voxels is None or not math.isfinite(voxels):
        return "absent"
    return SIZE_GROUPS[sum(voxels >= t for t in limits)]


# ---------------------------------------------------------------------------------------------- patches
def base_config(info: Dict[str, Any], settings: Dict[str, Any], **changes):
    """Every setting shared by the arms of one dataset (the arms differ only in patch, loss and seed)."""
    from fastseg.training import TrainConfig

    values = dict(dataset=info["description"], target_spacing=list(info["spacing"]), val_cases=0,
                  iterations=settings["iterations"], batch_size=settings["batch_size"], lr=settings["lr"],
                  augment=settings["augment"], oversample_foreground=settings["oversample_foreground"],
                  base_features=settings["base_features"], max_features=settings["max_features"],
                  num_workers=settings["num_workers"], device=settings["device"], sw_overlap=settings["sw_overlap"],
                  memory_budget_gb=settings["memory_budget_gb"], deterministic=True, val_every=0,
                  checkpoint_every=max(1, settings["iterations"] // 4))
    values.update(changes)
    return TrainConfig(**values)


def plan_patches(info: Dict[str, Any], settings: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """default: nnU-Net's rule, the largest patch of the median shape's aspect whose training fits the memory
    budget; optimised: fastseg's recommend_patch_size (the trainer's ``patch_size: auto``), the best-balanced of
    the shapes that use the same budget. Both from the preprocessed training label maps the trainer prepares."""
    if path.is_file():
        return _read_json(path)
    from fastseg.imbalance import analyze_imbalance, auto_patch_sizes, candidate_patch_sizes, unet_memory_fn
    from fastseg.models import trained_patch_size
    from fastseg.training import Trainer

    t0 = time.perf_counter()
    cfg = base_config(info, settings)
    trainer = Trainer(cfg, progress=False)
    trainer.prepare_data()  # the plan's patch (the config default) is not used: only the prepared labels are
    labels = [c.label for c in trainer.train_cases]
    shapes = [lab.shape for lab in labels]
    spacing = trainer.plan["target_spacing"]
    num_classes = len(info["organs"]) + 1
    gib = settings["memory_budget_gb"]
    memory = unet_memory_fn(spacing, num_classes, batch_size=cfg.batch_size, base_features=cfg.base_features,
                            max_features=cfg.max_features)
    scaled = [trained_patch_size(c, spacing, base_features=cfg.base_features, max_features=cfg.max_features)
              for c in candidate_patch_sizes(shapes, fractions=SCALED_FRACTIONS)]
    fits = [c for c in scaled if memory(c) <= gib * 2 ** 30]
    if not fits:
        _fail("memory_budget_gb", "a budget that fits the median shape scaled to a quarter", gib)
    default = max(fits, key=lambda c: (int(np.prod(c)), c))
    candidates = auto_patch_sizes(shapes, spacing=spacing, num_classes=num_classes, memory_budget_gb=gib,
                                  batch_size=cfg.batch_size, base_features=cfg.base_features,
                                  max_features=cfg.max_features, memory_fn=memory)
    n_auto = len(candidates)
    if default not in candidates:
        candidates.append(default)
    report = analyze_imbalance(labels, candidates, oversample_foreground=(cfg.oversample_foreground,),
                               num_classes=num_classes, class_names=["background", *info["organs"]],
                               spacing=spacing, batch_size=cfg.batch_size)
    # recommend_patch_size's choice (ImbalanceReport.best: lowest score, first on a tie; every auto candidate
    # fits the budget), read off this report so the table shows what it chose among.
    optimised = candidates[min(range(n_auto), key=lambda i: (report.score[i, 0], i))]
    rows = []
    for i, c in enumerate(candidates):
        presence = report.presence[i, 0]
        organ, partner, seen = report.least_seen_partner(i)
        rows.append({"patch": list(c), "memory_gib": memory(c) / 2 ** 30,
                     "least_seen_partner": None if organ is None else [report.class_names[organ],
                                                                       report.class_names[partner], seen],
                     "score": float(report.score[i, 0]), "share_term": float(report.share_term[i, 0]),
                     "presence_term": float(report.presence_term[i, 0]),
                     "presence": {n: float(p) for n, p in zip(report.class_names, presence)},
                     "coverage": {n: float(v) for n, v in zip(report.class_names[1:], report.coverage[i, 1:])
                                  if math.isfinite(v)}})
    plan = {"default": list(default), "optimised": list(optimised), "candidates": rows,
            "median_shape": np.median([lab.shape for lab in labels], 0).tolist(),
            "oversample_foreground": cfg.oversample_foreground, "memory_budget_gb": settings["memory_budget_gb"],
            "seconds": time.perf_counter() - t0}
    for name, patch in (("default", default), ("optimised", optimised)):
        row = rows[candidates.index(patch)]
        print(f"[plan] {info['dataset']}: {name} patch {_size(patch)}: imbalance score {row['score']:.3f}, "
              f"estimated training memory {row['memory_gib']:.3f} GiB (budget {settings['memory_budget_gb']:g})",
              flush=True)
    _write_json(path, plan)
    return plan


# ---------------------------------------------------------------------------------------------- one arm
def _machine(device: str) -> Dict[str, Any]:
    import torch

    name = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]
        name = models[0] if models else name
    if device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    return {"device": device, "name": name, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average": os.getloadavg()[0]}


def _organ_results(summary: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {organ: {"n": s["n"], "n_inf": s["n_inf"], "n_absent": s["n_absent"], "dice": _number(s["dice_mean"]),
                    "hd95": _number(s["hd95_mean"]), "nsd": _number(s["nsd_mean"])}
            for organ, s in summary.items()}


def _confidence_results(summary: Dict[str, Any], organs: Sequence[str]) -> Dict[str, Any]:
    per_organ = {organ: {k: _number(summary[k][c + 1]) for k in (*CONFIDENCE_KEYS, "tp", "fp", "fn")}
                 for c, organ in enumerate(organs)}
    return {"organs": per_organ, "classwise_ece": _number(summary["classwise_ece"]),
            "top_label_ece": _number(summary["top_label_ece"]), "top_label_mce": _number(summary["top_label_mce"])}


def run_arm(info: Dict[str, Any], plan: Dict[str, Any], settings: Dict[str, Any], patch: str, loss: str,
            seed: int, folder: Path) -> Dict[str, Any]:
    """Train (resuming from a checkpoint), predict the test split with probabilities, evaluate, analyse the
    confidence; the result JSON is written last, so its presence marks the arm finished."""
    from fastseg.evaluation import confidence_folders, evaluate_folders
    from fastseg.training import Predictor, Trainer

    t0 = time.perf_counter()
    cfg = base_config(info, settings, output_dir=str(folder / "model"), patch_size=list(plan[patch]),
                      absent_classes=LOSSES[loss], seed=seed)
    resumed = (folder / "model" / "checkpoint.pt").is_file()
    trainer = Trainer(cfg, progress=False)
    fit = trainer.fit()
    rows = [h for h in trainer.history if "loss" in h]
    t1 = time.perf_counter()
    spec = DatasetSpec.load(info["description"])
    preds = folder / "predictions"
    Predictor(fit["checkpoint"], device=settings["device"], overlap=settings["sw_overlap"]).predict_files(
        [spec.image_path(c) for c in spec.cases("test")], preds, save_probabilities=True, progress=False)
    t2 = time.perf_counter()
    evaluation = evaluate_folders(preds, info["description"], split="test", tolerance=TOLERANCE_MM,
                                  out_dir=folder / "evaluation")
    _, confidence = confidence_folders(preds, info["description"], split="test", out_dir=folder / "confidence",
                                       size_thresholds=size_limits_voxels(info["spacing"]))
    t3 = time.perf_counter()
    seconds = [h["seconds"] for h in rows]
    train = float(np.sum(seconds))
    result = {
        "dataset": info["dataset"], "patch": patch, "loss": loss, "seed": seed,
        "absent_classes": cfg.absent_classes, "patch_size": trainer.plan["patch_size"],
        "iterations": trainer.iteration, "final_loss": rows[-1]["loss"] if rows else None,
        # per_iteration: median, the first 2 (warm-up) left out; setup: data loading, planning, checkpoints
        # (unknown for a resumed training, whose iterations ran in several sessions)
        "seconds": {"train": train, "per_iteration": float(np.median(seconds[2:] or seconds)),
                    "setup": None if resumed else max(0.0, (t1 - t0) - train),
                    "predict": t2 - t1, "evaluate": t3 - t2},
        "organs": _organ_results(evaluation.summary),
        "confidence": _confidence_results(confidence, info["organs"]),
        "machine": _machine(settings["device"]),
    }
    _write_json(folder / "result.json", result)
    return result


# ---------------------------------------------------------------------------------------------- statistics
def t_interval(values: Sequence[float]) -> Tuple[float, float, int]:
    """(mean, half width of the 95 % t-interval, n) over the finite values; half width nan for n < 2."""
    v = np.array([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    if v.size == 1:
        return float(v[0]), math.nan, 1
    half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(half), int(v.size)


def fmt_ci(values: Sequence[float], digits: int) -> str:
    """'mean [low, high]' over the finite values (one per seed); 'mean (n=1)' with a single one; '–' with none;
    '(k/n seeds)' appended when only k of the n seeds define the value."""
    mean, half, n = t_interval(values)
    if n == 0:
        return "–"
    text = _fixed(mean, digits)
    if n == 1:
        text += " (n=1)"
    else:
        text += f" [{_fixed(mean - half, digits)}, {_fixed(mean + half, digits)}]"
    if n < len(values):
        text += f" ({n}/{len(values)} seeds)"
    return text


def _fixed(x: float, digits: int) -> str:
    return f"{round(x, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.000"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _nanmean(values: Sequence[float]) -> float:
    v = [x for x in values if math.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


# ---------------------------------------------------------------------------------------------- report
class Results:
    """The finished arms of one run folder and what the report needs from them."""

    def __init__(self, run_dir: Path, datasets: Sequence[str], seeds: Sequence[int]):
        self.run_dir = run_dir
        self.settings = _read_json(run_dir / "settings.json")
        self.datasets = [d for d in datasets if (run_dir / d / "dataset-info.json").is_file()]
        self.seeds = list(seeds)
        self.info = {d: _read_json(run_dir / d / "dataset-info.json") for d in self.datasets}
        self.plan = {d: _read_json(run_dir / d / "patches.json") for d in self.datasets}
        self.arms: Dict[Tuple[str, str, str, int], Dict[str, Any]] = {}
        self.missing: List[str] = []
        for d in self.datasets:
            for seed in self.seeds:
                for patch, loss in ARMS:
                    path = arm_folder(run_dir, d, patch, loss, seed) / "result.json"
                    if path.is_file():
                        self.arms[d, patch, loss, seed] = _read_json(path)
                    else:
                        self.missing.append(f"{d}/{patch}-{loss}/seed{seed}")

    def organs_by_size(self, d: str) -> List[str]:
        med = self.info[d]["median_voxels"]
        return sorted(self.info[d]["organs"], key=lambda o: (math.inf if med[o] is None else med[o], o))

    def group(self, d: str, organ: str) -> str:
        return size_group(self.info[d]["median_voxels"][organ], size_limits_voxels(self.info[d]["spacing"]))

    def per_seed(self, d: str, patch: str, loss: str, organ: str, key: str) -> List[float]:
        """One value per seed (nan where the arm is missing or the value undefined)."""
        out = []
        for seed in self.seeds:
            arm = self.arms.get((d, patch, loss, seed))
            out.append(math.nan if arm is None else _value(arm["organs"][organ][key]))
        return out

    def group_per_seed(self, d: str, patch: str, loss: str, group: str, key: str) -> List[float]:
        """Per seed, the mean over the group's organs of their (finite) per-organ values."""
        organs = [o for o in self.info[d]["organs"] if group in ("all", self.group(d, o))]
        columns = [self.per_seed(d, patch, loss, o, key) for o in organs]
        return [_nanmean([c[i] for c in columns]) for i in range(len(self.seeds))]

    def confidence_per_seed(self, d: str, patch: str, loss: str, group: str, key: str) -> List[float]:
        """Per seed: with a size group, the mean over its organs of their value of ``key``; with group "" the
        arm-level value (classwise_ece, top_label_ece, top_label_mce)."""
        organs = [o for o in self.info[d]["organs"] if self.group(d, o) == group]
        out = []
        for seed in self.seeds:
            arm = self.arms.get((d, patch, loss, seed))
            if arm is None:
                out.append(math.nan)
            elif group:
                out.append(_nanmean([_value(arm["confidence"]["organs"][o][key]) for o in organs]))
            else:
                out.append(_value(arm["confidence"][key]))
        return out

    def paired_group(self, d: str, a: Tuple[str, str], b: Tuple[str, str], group: str, key: str) -> List[float]:
        """Per seed, the mean over the group's organs of arm a's value minus arm b's, over the organs where both
        are defined (so an organ one arm misses everywhere does not shift the other arm's HD95 mean)."""
        organs = [o for o in self.info[d]["organs"] if group in ("all", self.group(d, o))]
        pairs = [(self.per_seed(d, *a, o, key), self.per_seed(d, *b, o, key)) for o in organs]
        return [_nanmean([x[i] - y[i] for x, y in pairs]) for i in range(len(self.seeds))]

    def empty_count(self, d: str, patch: str, loss: str, organs: Sequence[str]) -> Tuple[int, int]:
        """(cases with exactly one of prediction and ground truth empty, cases with the organ in either)."""
        k = n = 0
        for seed in self.seeds:
            arm = self.arms.get((d, patch, loss, seed))
            if arm is not None:
                k += sum(arm["organs"][o]["n_inf"] for o in organs)
                n += sum(arm["organs"][o]["n"] for o in organs)
        return k, n


def arm_folder(run_dir: Path, dataset: str, patch: str, loss: str, seed: int) -> Path:
    return run_dir / dataset / f"{patch}-{loss}" / f"seed{seed}"


def _arm_title(patch: str, loss: str) -> str:
    return f"{patch} patch · {LOSS_NAMES[loss]}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[Sequence[str]] = None) -> str:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _size(patch: Sequence[int]) -> str:
    return "×".join(str(int(p)) for p in patch)


def _patch_section(r: Results, d: str) -> str:
    plan, info = r.plan[d], r.info[d]
    small = [o for o in info["organs"] if r.group(d, o) == "small"]
    rows = []
    for c in plan["candidates"]:
        role = [name for name in PATCHES if list(plan[name]) == list(c["patch"])]
        mm = "×".join(f"{p * s:.0f}" for p, s in zip(c["patch"], info["spacing"]))
        least = min(small, key=lambda o: c["presence"][o]) if small else None
        coverage = c.get("coverage")  # plans written before the coverage existed lack it
        covered = min(coverage, key=coverage.get) if coverage else None
        organ, partner, seen = c["least_seen_partner"] or (None, None, None)
        rows.append([_size(c["patch"]), mm, f"{c['memory_gib']:.3f}",
                     f"{c['score']:.3f}", f"{c['share_term']:.2f}", f"{c['presence_term']:.2f}",
                     f"{least} {100 * c['presence'][least]:.1f} %" if least else "–",
                     f"{covered} {100 * coverage[covered]:.0f} %" if covered else "–",
                     f"{partner} for {organ} {100 * seen:.0f} %" if organ else "–", ", ".join(role) or ""])
    return (f"Candidates: fastseg.imbalance.auto_patch_sizes of the median preprocessed training shape "
            f"{_size(np.round(plan['median_shape']))} (every aspect on a grid of eighths of it whose training "
            f"memory uses 85–100 % of the budget, {plan['memory_budget_gb']:g} GiB, at the size the U-Net trains "
            "on), plus the default; memory: "
            f"estimate_training_memory of the planned U-Net, batch {r.settings['batch_size']}; score: "
            f"analyze_imbalance at foreground oversampling {plan['oversample_foreground']:.3g}, lower is more "
            "balanced; partner in view: the least probability over the left / right pairs that a patch drawn for "
            "one side shows the other.\n\n"
            + _table(["patch (vox)", "mm", "memory GiB", "imbalance score", "share term", "presence term",
                      "least present small organ", "least covered organ", "partner in view", "arm"], rows,
                     ["---"] * 2 + ["---:"] * 4 + ["---"] * 4))


def _setup_section(r: Results, profile: str) -> str:
    s = r.settings
    lines = ["## Setup", ""]
    for d in r.datasets:
        info = r.info[d]
        split = info["splits"]
        kind = (f"CT-like images rendered (render_image, seed {RENDER_SEED} + scan index) around the oncologist "
                f"label maps of the 7 shared scans; masks merged small over large (fastseg's priority), cropped to "
                f"the organs' box + {REAL_MARGIN_MM:g} mm in x/y and the top {REAL_FOV_Z_MM:g} mm in z, "
                "resampled with fastseg's partial-volume label resampling" if d == "real" else
                f"write_phantom_dataset(seed={SYNTHETIC_SEED}), field of view 250×250×330 mm")
        lines.append(f"- **{d}**: {kind}; spacing {_spacing_tag(info['spacing'])}; train {len(split['train'])} "
                     f"({', '.join(split['train'])}), test {len(split['test'])} ({', '.join(split['test'])}); "
                     f"{len(info['organs'])} organs.")
    lines += [
        f"- Training (identical for every arm): reference U-Net {s['base_features']}–{s['max_features']} features, "
        f"deep supervision, AdamW lr {s['lr']:g} with poly decay, batch {s['batch_size']}, {s['iterations']} "
        f"iterations, foreground oversampling {r.plan[r.datasets[0]]['oversample_foreground']:.3g}, augmentation "
        f"{'on' if s.get('augment', True) else 'off'}, no validation split, deterministic algorithms, seeds "
        f"{', '.join(map(str, r.seeds))} (the seed fixes the initialisation and the patch stream; data and test "
        "cases are the same for every seed); test cases "
        f"predicted by Gaussian-weighted sliding window, overlap {s['sw_overlap']:g}, no mirroring.",
        "- Losses: DiceCE = fastseg.DiceCELoss(absent_classes='keep') (standard soft Dice + CE); class adaptive "
        "DiceCE = absent_classes='ignore' (the Dice mean runs over the classes present in each sample's target, "
        "Tappeiner et al. 2022); background excluded from the Dice term, CE over all classes.",
        "- Patches: *default* = nnU-Net's rule, the largest patch of the median shape's aspect (scaled in "
        "sixteenths) whose estimated training memory fits the budget; *optimised* = "
        "fastseg.imbalance.recommend_patch_size (what `patch_size: auto` trains with), the lowest imbalance score "
        "among the shapes of any aspect that use 85–100 % of the same budget.",
        f"- Size groups by the organ's volume: small < {SIZE_LIMITS_MM3[0] / 1e3:g} cm³ ≤ medium < "
        f"{SIZE_LIMITS_MM3[1] / 1e3:g} cm³ ≤ large, i.e. in voxels of the working spacing the thresholds "
        + "; ".join(f"{d}: {' / '.join(f'{v:.0f}' for v in size_limits_voxels(r.info[d]['spacing']))}"
                    for d in r.datasets) + " (organ size = median voxel count over the cases that contain it).",
    ]
    machines = {"{device}: {name}, {cpus} CPUs, torch {torch} with {torch_threads} thread(s)".format(**a["machine"])
                for a in r.arms.values()}
    loads = [a["machine"]["load_average"] for a in r.arms.values()]
    lines.append(f"- Machine: {'; '.join(sorted(machines))}; 1-min load average at the end of the arms "
                 f"{min(loads):.1f}–{max(loads):.1f}." if loads else "- Machine: no finished arm.")
    lines.append(f"- Compute time: {_compute_minutes(r):.1f} min summed over data preparation, patch planning "
                 f"and the {len(r.arms)} finished arms; wall time of the invocations that produced them: "
                 f"{_wall_minutes(r):.1f} min.")
    if r.missing:
        lines.append(f"- **Missing arms** ({len(r.missing)}): {', '.join(r.missing)}.")
    for d in r.datasets:
        lines += ["", f"### Patches, {d}", "", _patch_section(r, d)]
    return "\n".join(lines) + "\n"


def _compute_minutes(r: Results) -> float:
    total = sum(r.info[d]["prep_seconds"] + r.plan[d]["seconds"] for d in r.datasets)
    for arm in r.arms.values():
        sec = arm["seconds"]
        total += sec["train"] + (sec["setup"] or 0.0) + sec["predict"] + sec["evaluate"]
    return total / 60


def _wall_minutes(r: Results) -> float:
    path = r.run_dir / "invocations.json"
    return sum(i["seconds"] for i in _read_json(path)) / 60 if path.is_file() else math.nan


def _organ_table(r: Results, d: str, key: str, digits: int) -> str:
    rows = []
    for organ in r.organs_by_size(d):
        med = r.info[d]["median_voxels"][organ]
        row = [organ, "–" if med is None else f"{med:.0f}", r.group(d, organ)]
        for patch, loss in ARMS:
            cell = fmt_ci(r.per_seed(d, patch, loss, organ, key), digits)
            if key == "hd95":
                k, n = r.empty_count(d, patch, loss, [organ])
                cell += f" · {k}/{n} one empty" if k else ""
            row.append(cell)
        rows.append(row)
    return _table(["organ", "median voxels", "group", *[_arm_title(p, l) for p, l in ARMS]], rows,
                  ["---", "---:", "---"] + ["---:"] * len(ARMS))


def _group_table(r: Results, d: str) -> str:
    rows = []
    for group in (*SIZE_GROUPS, "all"):
        organs = [o for o in r.info[d]["organs"] if group in ("all", r.group(d, o))]
        if not organs:
            continue
        for patch, loss in ARMS:
            k, n = r.empty_count(d, patch, loss, organs)
            rows.append([f"{group} ({len(organs)})", _arm_title(patch, loss),
                         fmt_ci(r.group_per_seed(d, patch, loss, group, "dice"), 3),
                         fmt_ci(r.group_per_seed(d, patch, loss, group, "nsd"), 3),
                         fmt_ci(r.group_per_seed(d, patch, loss, group, "hd95"), 1),
                         f"{k}/{n}" if n else "–"])
    return _table(["group (organs)", "arm", "Dice", f"NSD@{TOLERANCE_MM:g} mm", "HD95 mm (finite only)",
                   "one empty / cases"], rows, ["---", "---"] + ["---:"] * 4)


COMPARISONS = [  # (title, (patch, loss) minuend, (patch, loss) subtrahend)
    ("class adaptive − DiceCE, default patch", ("default", "class_adaptive"), ("default", "dice_ce")),
    ("class adaptive − DiceCE, optimised patch", ("optimised", "class_adaptive"), ("optimised", "dice_ce")),
    ("optimised − default, DiceCE", ("optimised", "dice_ce"), ("default", "dice_ce")),
    ("optimised − default, class adaptive", ("optimised", "class_adaptive"), ("default", "class_adaptive")),
]


def _paired(a: Sequence[float], b: Sequence[float]) -> List[float]:
    return [x - y for x, y in zip(a, b)]


def _difference_tables(r: Results, d: str) -> str:
    rows = []
    for organ in r.organs_by_size(d):
        row = [organ, r.group(d, organ)]
        for _, (pa, la), (pb, lb) in COMPARISONS:
            row.append(fmt_ci(_paired(r.per_seed(d, pa, la, organ, "dice"), r.per_seed(d, pb, lb, organ, "dice")), 3))
        rows.append(row)
    organ_table = _table(["organ", "group", *[c[0] for c in COMPARISONS]], rows, ["---", "---"] + ["---:"] * 4)
    rows = []
    for group in (*SIZE_GROUPS, "all"):
        if group != "all" and not any(r.group(d, o) == group for o in r.info[d]["organs"]):
            continue
        for key, digits in (("dice", 3), ("hd95", 1)):
            row = [group, "Dice" if key == "dice" else "HD95 mm"]
            for _, (pa, la), (pb, lb) in COMPARISONS:
                row.append(fmt_ci(r.paired_group(d, (pa, la), (pb, lb), group, key), digits))
            rows.append(row)
    group_table = _table(["group", "metric", *[c[0] for c in COMPARISONS]], rows, ["---", "---"] + ["---:"] * 4)
    return ("Dice per organ, paired by seed (same seed = same initialisation and, for the two losses, the same "
            "patch stream):\n\n" + organ_table + "\nPer size group (per seed, the mean over the group's organs of "
            "the per-organ differences where both arms define the metric):\n\n" + group_table)


def _confidence_table(r: Results, d: str) -> str:
    rows = []
    for patch, loss in ARMS:
        for group in SIZE_GROUPS:
            if not any(r.group(d, o) == group for o in r.info[d]["organs"]):
                continue
            rows.append([_arm_title(patch, loss), group] +
                        [fmt_ci(r.confidence_per_seed(d, patch, loss, group, k), 3) for k in CONFIDENCE_KEYS])
        rows.append([_arm_title(patch, loss), "all classes"] +
                    [fmt_ci(r.confidence_per_seed(d, patch, loss, "", "classwise_ece"), 3), "", "", "", ""])
        rows.append([_arm_title(patch, loss), "top label"] +
                    [fmt_ci(r.confidence_per_seed(d, patch, loss, "", "top_label_ece"), 3),
                     fmt_ci(r.confidence_per_seed(d, patch, loss, "", "top_label_mce"), 3), "", "", ""])
    return _table(["arm", "group", "ECE", "MCE", "mean p on TP", "mean p on FP", "mean p on FN"], rows,
                  ["---", "---"] + ["---:"] * 5)


def _cost_section(r: Results, profile: str) -> str:
    rows = []
    for d in r.datasets:
        for patch, loss in ARMS:
            arms = [r.arms[k] for k in r.arms if k[:3] == (d, patch, loss)]
            if not arms:
                continue
            sec = lambda key: _nanmean([a["seconds"][key] if a["seconds"][key] is not None else math.nan
                                        for a in arms])  # noqa: E731
            rows.append([d, _arm_title(patch, loss), _size(arms[0]["patch_size"]), f"{sec('per_iteration'):.3f}",
                         f"{sec('setup'):.1f}", f"{sec('predict'):.1f}", f"{sec('evaluate'):.1f}"])
    lines = ["## Cost", "", "Measured per arm (means over seeds):", "",
             _table(["dataset", "arm", "trained patch", "s / iteration (median)", "setup s", "predict s",
                     "evaluate + confidence s"], rows, ["---", "---", "---"] + ["---:"] * 4)]
    for target in PROFILES:
        estimate = estimate_minutes(r, PROFILES[target])
        if estimate is not None:
            t = PROFILES[target]
            lines.append(f"- Profile **{target}** ({t['iterations']} iterations × {_count(len(t['seeds']), 'seed')} × "
                         f"{len(ARMS)} arms × {len(r.datasets)} datasets), estimated from these measurements: "
                         f"{estimate[0]:.0f} min, plus {estimate[1]:.1f} min of data preparation and patch "
                         "planning when the work dir does not hold them yet.")
    return "\n".join(lines) + "\n"


_COMPARABLE = ("spacing", "batch_size", "base_features", "max_features", "memory_budget_gb", "device",
               "synthetic_train", "synthetic_test", "num_workers", "oversample_foreground")


def estimate_minutes(r: Results, target: Dict[str, Any]) -> Optional[Tuple[float, float]]:
    """(arms, data + planning) minutes of ``target`` from the measured per-iteration and per-arm costs, when it
    trains the same patches and network on the same data as the measured run (else None)."""
    if any(r.settings[k] != target[k] for k in _COMPARABLE) or not r.arms:
        return None
    total = 0.0
    for d in r.datasets:
        for patch, loss in ARMS:
            arms = [a for k, a in r.arms.items() if k[:3] == (d, patch, loss)]
            if not arms:
                return None
            fixed = _nanmean([(a["seconds"]["setup"] if a["seconds"]["setup"] is not None else math.nan)
                              + a["seconds"]["predict"] + a["seconds"]["evaluate"] for a in arms])
            per_it = _nanmean([a["seconds"]["per_iteration"] for a in arms])
            total += len(target["seeds"]) * (fixed + target["iterations"] * per_it)
    prep = sum(r.info[d]["prep_seconds"] + r.plan[d]["seconds"] for d in r.datasets)
    return total / 60, prep / 60


def build_report(r: Results, profile: str) -> str:
    s = r.settings
    parts = ["# Class imbalance in head-and-neck segmentation: default vs optimised patch × DiceCE vs class "
             "adaptive DiceCE", "",
             "A reproduction of the comparison of Tappeiner, Welk & Schubert (IJCARS 2022, "
             "doi:10.1007/s11548-022-02649-5) with fastseg, generated by `experiments/paper_comparison.py "
             f"--profile {profile}` (see experiments/README.md). Do not edit by hand.", ""]
    if profile == "smoke":
        parts += [f"> **SMOKE RUN — a pipeline check, not a result.** {_count(len(r.seeds), 'seed')}, {s['iterations']} "
                  "iterations: the networks are untrained, the numbers below only show that every stage runs and "
                  "what the report looks like. Run `--profile cpu` or `--profile gpu` for the comparison.", ""]
    parts.append(_setup_section(r, profile))
    for d in r.datasets:
        parts += [f"## Results, {d}", "",
                  f"### Dice per organ (test split; mean [95 % CI] over {_count(len(r.seeds), 'seed')})", "",
                  _organ_table(r, d, "dice", 3), "",
                  "### HD95 per organ (mm; mean over the test cases where both masks are non-empty, then over "
                  "seeds)", "", _organ_table(r, d, "hd95", 1), "",
                  "### Size groups", "", _group_table(r, d), "",
                  "### Paired differences", "", _difference_tables(r, d), "",
                  "### Confidence analysis (test split, fastseg.evaluation.confidence_folders, 15 bins; per-organ "
                  "values averaged over the group's organs, then over seeds)", "", _confidence_table(r, d), ""]
    parts.append(_cost_section(r, profile))
    parts += ["## How the numbers are computed", "",
              "- Per arm and seed, fastseg.evaluation.evaluate_folders gives per organ the mean over the test cases "
              "of Dice, NSD and HD95 (MONAI conventions, the working spacing's mm). The tables show the mean over "
              "seeds and the 95 % t-interval mean ± t(0.975, n−1) · s / √n, s the sample standard deviation "
              "(ddof 1) of the n per-seed values; n = 1 gives no interval. The interval reflects training "
              "randomness only (initialisation and patch stream); the test cases are fixed.",
              "- Empty masks (fastseg's evaluation policy): a case where exactly one of prediction and ground truth "
              "is empty (a missed or a hallucinated organ) enters Dice and NSD as 0 and has an infinite HD95, "
              "which is left out of the HD95 mean and counted in 'one empty' (k of n cases summed over seeds); a "
              "case where both are empty is left out entirely. An organ HD95 with every case empty is undefined "
              "for that seed, so its interval runs over fewer seeds (shown as 'k/n seeds'). Read HD95 together "
              "with the 'one empty' count: an arm that misses an organ everywhere has no HD95 for it, not a good "
              "one.",
              "- Size groups average the per-organ values of the group's organs per seed (skipping undefined "
              "ones), then form the interval over seeds. Paired differences subtract the per-seed values of two "
              "arms with the same seed before forming the interval; per group, the per-organ differences are "
              "averaged over the organs where both arms define the metric (HD95: both predict the organ).",
              "- Confidence: ECE / MCE per organ (class-wise, 15 equal-width bins, the organ's probability "
              "against its one-vs-rest truth over every test voxel), mean probability of the organ on its true "
              "positives, false positives and false negatives (argmax prediction), averaged over the size group's "
              "organs; 'all classes' is the class-wise ECE averaged over the organs, 'top label' the ECE / MCE of "
              "the winning class's probability. Per-organ tables: `<work dir>/runs/<profile>/<dataset>/<arm>/"
              "seed<k>/confidence/confidence.md`.", ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- main
def _settings(args) -> Dict[str, Any]:
    settings = dict(PROFILES[args.profile])
    for key in ("seeds", "iterations", "spacing", "device"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    if settings["iterations"] < 1:
        _fail("--iterations", "a positive number", settings["iterations"])
    if any(s < 0 for s in settings["seeds"]):
        _fail("--seeds", "non-negative integers", settings["seeds"])
    if any(not s > 0 for s in settings["spacing"]):
        _fail("--spacing", "3 positive numbers (mm)", settings["spacing"])
    return settings


def _organs(names: Sequence[str]) -> List[str]:
    unknown = [n for n in names if n not in ORGANS]
    if unknown or not names:
        _fail("--organs", f"names from {', '.join(ORGANS)}", list(names))
    return [o for o in ORGANS if o in names]  # label values in the datasets' order


def _work_dir(path: Path) -> Path:
    path = path.resolve()
    if path == REPO or REPO in path.parents:
        _fail("--work-dir", f"a folder outside the repository {REPO}", str(path))
    return path


def _check_run_dir(run_dir: Path, settings: Dict[str, Any], organs: Sequence[str]) -> None:
    """One run folder holds one configuration: seeds may be added, anything else needs another work dir."""
    fingerprint = {**{k: v for k, v in settings.items() if k != "seeds"}, "organs": list(organs)}
    path = run_dir / "settings.json"
    if path.is_file():
        stored = _read_json(path)
        changed = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        if changed:
            _fail("settings", f"those of the existing run in {run_dir} (or another --work-dir)",
                  {k: fingerprint.get(k) for k in changed})
    else:
        _write_json(path, fingerprint)


def _found_seeds(run_dir: Path, datasets: Sequence[str]) -> List[int]:
    seeds = {int(p.parent.name[4:]) for d in datasets for p in (run_dir / d).glob("*/seed*/result.json")}
    return sorted(seeds)


def run(args) -> Path:
    settings = _settings(args)
    organs = _organs(args.organs)
    work = _work_dir(args.work_dir)
    run_dir = work / "runs" / args.profile
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_run_dir(run_dir, settings, organs)
    start, t0, done = time.time(), time.perf_counter(), 0
    for d in args.datasets:
        info = prepare_dataset(d, work, settings, organs)
        _write_json(run_dir / d / "dataset-info.json", info)
        plan = plan_patches(info, settings, run_dir / d / "patches.json")
        for seed in settings["seeds"]:  # seed-major: an interrupted run leaves whole seeds behind
            for patch, loss in ARMS:
                if patch not in args.patches:
                    continue
                folder = arm_folder(run_dir, d, patch, loss, seed)
                if (folder / "result.json").is_file():
                    continue
                print(f"[arm] {d} {patch} patch {_size(plan[patch])}, {loss}, seed {seed}", flush=True)
                result = run_arm(info, plan, settings, patch, loss, seed, folder)
                done += 1
                sec = result["seconds"]
                print(f"[arm]   {sec['train']:.0f} s training ({sec['per_iteration']:.3f} s/it), predict "
                      f"{sec['predict']:.0f} s, evaluate {sec['evaluate']:.0f} s; mean Dice "
                      f"{_nanmean([_value(o['dice']) for o in result['organs'].values()]):.3f}", flush=True)
    log = run_dir / "invocations.json"
    history = _read_json(log) if log.is_file() else []
    history.append({"start": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
                    "seconds": time.perf_counter() - t0, "arms_run": done, "datasets": list(args.datasets)})
    _write_json(log, history)
    return report(run_dir, args.datasets, settings["seeds"], args.profile, args.out)


def report(run_dir: Path, datasets: Sequence[str], seeds: Sequence[int], profile: str, out: Path) -> Path:
    results = Results(run_dir, datasets, seeds)
    if not results.arms:
        _fail("--work-dir", f"finished arms under {run_dir}", "none")
    _atomic.write_text(out, build_report(results, profile))
    print(f"[report] {out} ({len(results.arms)} arms, {len(results.missing)} missing)", flush=True)
    return out


def main(argv=None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="smoke")
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "fastseg-paper-comparison",
                    help="datasets, models, predictions and result JSONs (outside the repository)")
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    ap.add_argument("--seeds", nargs="+", type=int, help="training seeds (default: the profile's)")
    ap.add_argument("--patches", nargs="+", choices=PATCHES, default=list(PATCHES),
                    help="train only these patch arms (two processes can share a run: one per patch)")
    ap.add_argument("--iterations", type=int, help="training iterations per arm (default: the profile's)")
    ap.add_argument("--organs", nargs="+", default=list(ORGANS), help="organ subset (default: all 21)")
    ap.add_argument("--spacing", nargs=3, type=float, help="working spacing x y z in mm (default: the profile's)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: the profile's")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from the stored results")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "comparison.md")
    args = ap.parse_args(argv)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            _fail("--threads", "a positive number", args.threads)
        torch.set_num_threads(args.threads)
    if args.report_only:
        run_dir = _work_dir(args.work_dir) / "runs" / args.profile
        if not (run_dir / "settings.json").is_file():
            _fail("--work-dir", f"a finished run of profile {args.profile} ({run_dir}/settings.json)", "none")
        report(run_dir, args.datasets, args.seeds or _found_seeds(run_dir, args.datasets), args.profile, args.out)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
