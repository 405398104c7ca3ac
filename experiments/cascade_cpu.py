#!/usr/bin/env python3
"""The two-stage cascade against a single stage at 1x1x2.5 mm, on a CPU, over seeds.

    python experiments/cascade_cpu.py OUT [--dataset synthetic|real] [--arms cascade single] [--seeds 0 1 2]
        [--small-organs ...] [--iterations 750] [--threads N] [--report docs/cascade-synthetic.md]

Writes the dataset into OUT/data at 1x1x2.5 mm -- synthetic: 14 phantoms (10 train, 4 test, seed 0); real: CT-like
images rendered around the 7 oncologist label maps of ../shared/data/tcia-han-oar (5 train, 2 test), built as
experiments/paper_comparison.py builds them -- and trains, per seed, with the CPU demo's settings (fastseg.training.demo.CPU_SETTINGS: patch_size auto under 0.2 GiB, 8-64 features, class
adaptive DiceCE), no validation split:

- cascade: fastseg's cascade, stage one every organ at 2x2x5 mm, stage two the small organs at 1x1x2.5 mm inside
  stage one's crop, ``--iterations`` each;
- single: one U-Net on every organ at 1x1x2.5 mm for twice ``--iterations`` (the cascade's iteration count).

Both predict the test cases (largest connected component per organ) and are evaluated with fastseg's
metrics; ``OUT/<arm>/seed<k>/result.json`` marks an arm finished (a rerun skips it; an interrupted training
resumes from its checkpoint). The report (per-organ Dice and HD95, mean and 95 % t-interval over seeds, and
the paired cascade - single difference) goes to ``--report``; two processes (``--arms cascade`` and ``--arms
single``, ``--threads 1`` each) share one OUT (one OUT per dataset). Results: docs/cascade-*.md.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

import paper_comparison as pc  # the same folder: statistics, tables and the machine record

ARMS = ("cascade", "single")
DATASETS = {  # title, description
    "synthetic": ("synthetic phantom", "write_phantom_dataset(seed=0) at 1×1×2.5 mm, 10 training and 4 test "
                  "phantoms"),
    "real": ("phantom images rendered from the real masks", "CT-like images rendered (render_image) around the "
             "oncologist label maps of the 7 shared scans, cropped and resampled to 1×1×2.5 mm as in "
             "docs/comparison.md; train 5, test 2"),
}
SPACING = [1.0, 1.0, 2.5]
# The split of the README's first cascade run: every organ below 1 cm3 and the orbits around the lenses (the
# default split, under 10 ml, also takes the submandibular glands, and the crop then reaches from the orbits
# to the neck)
SMALL_ORGANS = ["Cochlea-Lt", "Cochlea-Rt", "Lacrimal-Lt", "Lacrimal-Rt", "Lens-Lt", "Lens-Rt",
                "Optic-Nerve-Lt", "Optic-Nerve-Rt", "Orbit-Lt", "Orbit-Rt"]


def _config(description: Path, folder: Path, arm: str, seed: int, iterations: int, small: Sequence[str],
            single_patch: Optional[List[int]] = None):
    from fastseg.training import TrainConfig
    from fastseg.training.demo import CPU_SETTINGS

    settings = {**CPU_SETTINGS, "iterations": iterations if arm == "cascade" else 2 * iterations,
                "val_every": 0, "checkpoint_every": 150}
    if arm == "cascade":
        extra = {"cascade": True, "cascade_small_organs": None if list(small) == ["auto"] else list(small)}
    else:
        extra = {"patch_size": single_patch} if single_patch else {}
    return TrainConfig(dataset=str(description), output_dir=str(folder / "model"), device="cpu",
                       absent_classes="ignore", seed=seed, val_cases=0, deterministic=True,
                       target_spacing=SPACING, **{**settings, **extra})


def _patches(checkpoint: Path) -> Dict[str, List[int]]:
    from fastseg.training import load_checkpoint

    state = load_checkpoint(checkpoint, map_location="cpu")
    if "cascade" in state:
        return {"stage1": list(state["plan"]["patch_size"]), "stage2": list(state["cascade"]["plan"]["patch_size"])}
    return {"single": list(state["plan"]["patch_size"])}


def run_arm(description: Path, folder: Path, arm: str, seed: int, iterations: int,
            small: Sequence[str], single_patch: Optional[List[int]] = None) -> Dict[str, Any]:
    from fastseg.cli import dataset_images
    from fastseg.evaluation import evaluate_folders
    from fastseg.training import Trainer
    from fastseg.training.cascade import CascadeTrainer, load_predictor

    t0 = time.perf_counter()
    config = _config(description, folder, arm, seed, iterations, small, single_patch)
    fit = (CascadeTrainer(config) if arm == "cascade" else Trainer(config)).fit()
    t1 = time.perf_counter()
    predictor = load_predictor(fit["checkpoint"], device="cpu", keep_largest_component=True)
    predictor.predict_files(dataset_images(description, "test"), folder / "predictions", progress=False)
    t2 = time.perf_counter()
    evaluation = evaluate_folders(folder / "predictions", description, out_dir=folder / "evaluation",
                                  tolerance=pc.TOLERANCE_MM, split="test")
    result = {"arm": arm, "seed": seed, "iterations": config.iterations * (2 if arm == "cascade" else 1),
              "small_organs": list(fit.get("small_organs", [])), "patch_sizes": _patches(Path(fit["checkpoint"])),
              "seconds": {"train": t1 - t0, "predict": t2 - t1, "evaluate": time.perf_counter() - t2},
              "organs": pc._organ_results(evaluation.summary), "machine": pc._machine("cpu")}
    pc._write_json(folder / "result.json", result)
    return result


# ------------------------------------------------------------------------------------------------ report
def _load(out: Path, seeds: Sequence[int]) -> Dict[str, Dict[int, Dict[str, Any]]]:
    found = {arm: {} for arm in ARMS}
    for arm in ARMS:
        for seed in seeds:
            path = out / arm / f"seed{seed}" / "result.json"
            if path.is_file():
                found[arm][seed] = json.loads(path.read_text())
    return found


def _values(results: Dict[int, Dict[str, Any]], seeds: Sequence[int], organ: str, key: str) -> List[float]:
    return [pc._value(results[s]["organs"][organ][key]) if s in results else math.nan for s in seeds]


def build_report(out: Path, dataset: str, seeds: Sequence[int], volumes: Dict[str, Optional[float]]) -> str:
    r = _load(out, seeds)
    done = [s for s in seeds if all(s in r[a] for a in ARMS)]
    if not done:
        raise SystemExit(f"cascade_cpu: no seed has finished both arms under {out}")
    first = r["cascade"][done[0]]
    small = first["small_organs"]
    volumes = {o: math.nan if v is None else v for o, v in volumes.items()}
    organs = sorted(first["organs"], key=lambda o: (volumes.get(o, math.inf), o))
    cascade, single = r["cascade"], r["single"]
    limits = pc.size_limits_voxels(SPACING)
    rows, group = [], {}
    for organ in organs:
        a, b = _values(cascade, done, organ, "dice"), _values(single, done, organ, "dice")
        ha, hb = _values(cascade, done, organ, "hd95"), _values(single, done, organ, "hd95")
        stage = "two" if organ in small else "one"
        rows.append([organ, f"{volumes.get(organ, math.nan):.0f}", stage, pc.fmt_ci(a, 3), pc.fmt_ci(b, 3),
                     pc.fmt_ci(pc._paired(a, b), 3), pc.fmt_ci(ha, 1), pc.fmt_ci(hb, 1)])
        for name in (f"stage {stage}", pc.size_group(volumes.get(organ), limits)):
            group.setdefault(name, ([], []))
            group[name][0].append(a)
            group[name][1].append(b)
    group_rows = []
    for name in ["stage two", "stage one", *[g for g in pc.SIZE_GROUPS if g in group]]:
        a, b = group[name]  # per seed, the mean over the group's organs
        ma, mb = np.mean(a, axis=0).tolist(), np.mean(b, axis=0).tolist()
        group_rows.append([f"{name} ({len(a)})", pc.fmt_ci(ma, 3), pc.fmt_ci(mb, 3),
                           pc.fmt_ci(pc._paired(ma, mb), 3)])
    minutes = {arm: [r[arm][s]["seconds"]["train"] / 60 for s in done] for arm in ARMS}
    predict = {arm: [r[arm][s]["seconds"]["predict"] for s in done] for arm in ARMS}
    machine = first["machine"]
    cases = max(v["n"] for v in first["organs"].values())
    lines = [
        f"# Cascade vs single stage for small organs ({DATASETS[dataset][0]}, 1×1×2.5 mm, CPU)", "",
        "Generated by `experiments/cascade_cpu.py` (see its docstring and experiments/README.md). Do not edit by "
        "hand.", "",
        "## Setup", "",
        f"- Data: {DATASETS[dataset][1]}; 21 organs.",
        f"- Training: the CPU demo's settings (patch_size auto under 0.2 GiB, U-Net 8–64 features, batch 2, "
        f"AdamW lr 0.01 poly, foreground oversampling 0.67, no augmentation), class adaptive DiceCE, no "
        f"validation split, deterministic algorithms, seeds {', '.join(map(str, done))}.",
        f"- cascade: stage one every organ at 2×2×5 mm, stage two {', '.join(small)} at 1×1×2.5 mm inside stage "
        f"one's crop (10 mm margin), {first['iterations'] // 2} iterations each; patches "
        f"{pc._size(first['patch_sizes']['stage1'])} / {pc._size(first['patch_sizes']['stage2'])}.",
        f"- single: one U-Net on every organ at 1×1×2.5 mm, {single[done[0]]['iterations']} iterations (the "
        f"cascade's total); patch {pc._size(single[done[0]]['patch_sizes']['single'])}.",
        "- Prediction: Gaussian sliding window, largest connected component per organ; metrics: "
        "fastseg.evaluation.evaluate_folders (Dice; HD95 over the test cases where both masks are non-empty).",
        f"- Machine: {machine['name']}, {machine['cpus']} CPUs, torch {machine['torch']} with "
        f"{machine['torch_threads']} thread(s). Training minutes per seed: cascade "
        f"{min(minutes['cascade']):.0f}–{max(minutes['cascade']):.0f}, single "
        f"{min(minutes['single']):.0f}–{max(minutes['single']):.0f}; prediction of the {cases} test cases: cascade "
        f"{np.median(predict['cascade']):.0f} s, single {np.median(predict['single']):.0f} s (medians).",
        "- Intervals: 95 % t-intervals over the seeds (training randomness only; the test cases are fixed).", "",
        "## Dice and HD95 per organ (test split; mean [95 % CI] over seeds)", "",
        pc._table(["organ", "median voxels", "stage", "Dice cascade", "Dice single", "Dice cascade − single "
                   "(paired)", "HD95 mm cascade", "HD95 mm single"], rows, ["---", "---:", "---"] + ["---:"] * 5),
        "", "## Per organ group (per seed, the mean Dice over the group's organs; by stage, and by volume: "
        f"small < 1 cm³ ≤ medium < 50 cm³ ≤ large, i.e. {limits[0]:.0f} / {limits[1]:.0f} voxels)", "",
        pc._table(["group", "cascade", "single", "cascade − single (paired)"], group_rows),
        ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="synthetic")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--small-organs", nargs="+", default=SMALL_ORGANS,
                        help="stage two's organs; 'auto': those below cascade_max_volume_ml (10 ml)")
    parser.add_argument("--iterations", type=int, default=750, help="per cascade stage (single: twice it)")
    parser.add_argument("--single-patch", type=int, nargs=3, help="the single arm's patch (default: auto; the "
                        "real scans at 1x1x2.5 mm need more than 0.2 GiB for any auto candidate)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--report", type=Path, help="write the report (markdown) here after the runs")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report")
    args = parser.parse_args(argv)

    import torch

    from fastseg._atomic import write_text
    from fastseg.data.phantom import write_phantom_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    description = args.out / "data" / "dataset.json"
    if not description.is_file():
        if args.dataset == "real":
            pc.build_real(description.parent, SPACING)
        else:
            write_phantom_dataset(description.parent, n_train=10, n_test=4, seed=0, spacing=SPACING)
    if not args.report_only:
        for seed in args.seeds:  # seed-major: an interrupted run leaves whole seeds behind
            for arm in args.arms:
                folder = args.out / arm / f"seed{seed}"
                if (folder / "result.json").is_file():
                    continue
                print(f"[arm] {arm}, seed {seed}", flush=True)
                result = run_arm(description, folder, arm, seed, args.iterations, args.small_organs,
                                 args.single_patch)
                dice = {o: v["dice"] for o, v in result["organs"].items() if o in result["small_organs"]}
                print(f"[arm]   {result['seconds']['train']:.0f} s training; stage-two organs' Dice {dice}",
                      flush=True)
    if args.report:
        text = build_report(args.out, args.dataset, args.seeds, pc._median_voxels(description))
        write_text(args.report, text)
        print(f"[report] {args.report}")


if __name__ == "__main__":
    main()
