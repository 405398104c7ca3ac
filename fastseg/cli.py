"""The ``fastseg`` command: phantom, train, predict, evaluate, imbalance, confidence, demo (the main job).

Every subcommand reports bad input as one line ``fastseg <command>: error: <message>`` and exit status 2, with
no traceback and no partial output file (every writer is atomic).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

EXIT_USAGE = 2


def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in text.replace("x", ",").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 2,2,3, got {text!r}")


def _ints(text: str) -> List[int]:
    try:
        return [int(v) for v in text.replace("x", ",").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 96,96,48, got {text!r}")


# --------------------------------------------------------------------------------------------------------
def _add_phantom(sub) -> None:
    p = sub.add_parser("phantom", help="write a procedural head-and-neck CT phantom dataset")
    p.add_argument("output", type=Path, help="dataset folder to create")
    p.add_argument("--train", type=int, default=8, help="training cases (default 8)")
    p.add_argument("--test", type=int, default=4, help="test cases (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spacing", type=_floats, default=[2.0, 2.0, 3.0], help="mm per axis (default 2,2,3)")
    p.add_argument("--field-of-view", type=_floats, default=None, help="mm per axis (default: the generator's)")
    p.set_defaults(run=_run_phantom)


def _run_phantom(args) -> int:
    from fastseg.data.phantom import write_phantom_dataset

    kwargs = {"field_of_view": tuple(args.field_of_view)} if args.field_of_view else {}
    spec = write_phantom_dataset(args.output, n_train=args.train, n_test=args.test, seed=args.seed,
                                 spacing=tuple(args.spacing), **kwargs)
    print(f"wrote {args.train + args.test} phantom cases and {spec}")
    return 0


# --------------------------------------------------------------------------------------------------------
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the reference 3D U-Net (resumes from OUTPUT_DIR/checkpoint.pt)",
                       description="Settings come from CONFIG (YAML / JSON, see fastseg.training.TrainConfig), "
                                   "then the flags, then --set key=value pairs.")
    p.add_argument("config", nargs="?", type=Path, help="YAML or JSON file of TrainConfig settings")
    p.add_argument("--dataset", help="dataset description file")
    p.add_argument("--output-dir", help="run folder (checkpoints, logs, plots)")
    p.add_argument("--iterations", type=int)
    p.add_argument("--patch-size", help="e.g. 96,96,48 or 'auto' (class-imbalance recommendation)")
    p.add_argument("--absent-classes", choices=("keep", "ignore"),
                   help="'ignore' = class adaptive Dice (Tappeiner et al. 2022)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--cache-dir", help="folder of preprocessed cases, reused by later runs on the same data")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig setting")
    p.add_argument("--cascade", action="store_true", default=None,
                   help="two stages: every organ at a coarse spacing, then the small organs at full resolution in "
                        "crops around stage one's prediction (cascade_* settings)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.set_defaults(run=_run_train)


def _train_config(args):
    from fastseg.training.config import TrainConfig, parse_override

    values = TrainConfig.load(args.config).to_dict() if args.config else {}
    flags = {"dataset": args.dataset, "output_dir": args.output_dir, "iterations": args.iterations,
             "absent_classes": args.absent_classes, "device": args.device, "cascade": args.cascade,
             "cache_dir": args.cache_dir}
    if args.patch_size:
        flags["patch_size"] = "auto" if args.patch_size == "auto" else _ints(args.patch_size)
    values.update({k: v for k, v in flags.items() if v is not None})
    for item in args.set:
        key, value = parse_override(item)
        values[key] = value
    return TrainConfig.from_dict(values, source="fastseg train")


def _run_train(args) -> int:
    from fastseg.training.trainer import Trainer

    config = _train_config(args)
    if config.cascade:
        return _run_cascade(config, resume=not args.no_resume)
    result = Trainer(config, resume=not args.no_resume).fit()
    print(f"trained to iteration {result['iteration']}; model: {result['checkpoint']}")
    if result["val_dice"]:
        print(_dice_table(result["val_dice"]))
    return 0


def _run_cascade(config, *, resume: bool) -> int:
    from fastseg.training.cascade import CascadeTrainer

    result = CascadeTrainer(config, resume=resume).fit()
    print(f"trained the cascade; small organs (stage two): {', '.join(result['small_organs'])}; "
          f"model (both stages): {result['checkpoint']}")
    for stage, what in (("stage1", "stage one, every organ, coarse"), ("stage2", "stage two, small organs, crops")):
        if result[stage]["val_dice"]:
            print(f"\n{what}:\n{_dice_table(result[stage]['val_dice'])}")
    return 0


def _dice_table(dice) -> str:
    rows = ["| organ | validation Dice |", "|---|---:|"]
    rows += [f"| {k} | {v:.3f} |" for k, v in dice.items()]
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------------
def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="sliding-window prediction; writes label maps in the inputs' geometry")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("inputs", nargs="+", type=Path,
                   help="image files, folders of them, or a dataset description (with --split)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--split", default="test", help="split of a dataset description input (default test)")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--mirror", type=_ints, default=[], help="axes for mirroring test-time augmentation, e.g. 0")
    p.add_argument("--save-probabilities", action="store_true", help="also write <case>_probs.npz")
    p.add_argument("--keep-largest-component", nargs="*", metavar="ORGAN",
                   help="keep only the largest connected component of these organs (all when none are named)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(run=_run_predict)


def _image_files(inputs: Sequence[Path], split: str) -> List[Path]:
    from fastseg.data.io import image_suffix

    files: List[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if image_suffix(p))
            if not found:
                raise ValueError(f"inputs: folder '{path}' holds no .nii, .nii.gz or .nrrd image")
            files += found
        elif path.suffix in (".json", ".yaml", ".yml"):
            files += dataset_images(path, split)
        elif not path.exists():
            raise FileNotFoundError(f"inputs: expected existing image files or folders, got '{path}'")
        else:
            files.append(path)
    return files


def dataset_images(description: Path, split: str) -> List[Path]:
    """Image files of one split of a dataset description."""
    from fastseg.data.dataset import DatasetSpec

    spec = DatasetSpec.load(description)
    if not spec.image_pattern:
        raise ValueError(f"inputs: dataset {description} has no images")
    return [spec.image_path(case) for case in spec.cases(split)]


def _largest_component_organs(names: Optional[List[str]]):
    """--keep-largest-component: absent -> off, given without names -> every organ."""
    return False if names is None else (names or True)


def _run_predict(args) -> int:
    from fastseg.training.cascade import load_predictor

    files = _image_files(args.inputs, args.split)
    predictor = load_predictor(args.checkpoint, device=args.device, overlap=args.overlap, mirror_axes=args.mirror,
                               keep_largest_component=_largest_component_organs(args.keep_largest_component))
    written = predictor.predict_files(files, args.output, save_probabilities=args.save_probabilities)
    print(f"wrote {len(written)} label maps to {args.output}")
    return 0


# --------------------------------------------------------------------------------------------------------
def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice, HD95, ASSD and surface Dice per case and organ")
    p.add_argument("pred_dir", type=Path)
    p.add_argument("gt", type=Path, help="folder of ground-truth label maps, or a dataset description")
    p.add_argument("-o", "--output", type=Path, help="folder for per_case.csv, summary.{csv,md}, boxplots.png")
    p.add_argument("--organs", help="dataset description naming the organs (when GT is a folder without one)")
    p.add_argument("--tolerance", type=float, default=2.0, help="surface Dice tolerance in mm (default 2)")
    p.add_argument("--convention", choices=("monai", "deepmind"), default="monai")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from fastseg.evaluation import evaluate_folders

    organs = None
    if args.organs:
        from fastseg.data.dataset import DatasetSpec

        organs = DatasetSpec.load(args.organs)
    result = evaluate_folders(args.pred_dir, args.gt, organs=organs, out_dir=args.output,
                              tolerance=args.tolerance, convention=args.convention)
    print(result.markdown())
    return 0


# --------------------------------------------------------------------------------------------------------
def _add_imbalance(sub) -> None:
    p = sub.add_parser("imbalance", help="exact per-class presence / voxel fraction and imbalance score of "
                                         "candidate patch sizes; recommends one under a memory budget")
    p.add_argument("dataset", type=Path, help="dataset description")
    p.add_argument("--patch-sizes", type=_ints, nargs="+", help="candidates, e.g. 64,64,32 96,96,48 (default: "
                   "with --memory-budget every aspect that uses 85-100 %% of it, at the size the reference U-Net "
                   "trains on; else 1/2 to 1 of the median case shape)")
    p.add_argument("--oversample", type=float, nargs="+", default=[0.0, 1.0 / 3.0],
                   help="foreground-oversampling ratios (default 0 and 1/3)")
    p.add_argument("--memory-budget", type=float, help="GiB for one training step of the reference U-Net")
    p.add_argument("--min-fill", type=float, default=0.85, help="with --memory-budget and no --patch-sizes: "
                   "the least share of the budget a candidate uses (default 0.85)")
    p.add_argument("--min-coverage", type=float, help="recommend only patch sizes in which a patch drawn for "
                   "each organ shows at least this share of it (0-1)")
    p.add_argument("--spacing", type=_floats, help="resample the label maps to this spacing (mm) first")
    p.add_argument("--split", help="cases of this split (default: every case)")
    p.add_argument("--workers", type=int, default=0, help="processes analysing cases in parallel")
    p.add_argument("-o", "--output", type=Path, help="folder for imbalance.{md,json,png}")
    p.set_defaults(run=_run_imbalance)


def _run_imbalance(args) -> int:
    import numpy as np

    from fastseg._atomic import write_text
    from fastseg.data.dataset import DatasetSpec
    from fastseg.data.preprocess import resample
    from fastseg.imbalance import analyze_imbalance, auto_patch_sizes, candidate_patch_sizes

    spec = DatasetSpec.load(args.dataset)
    labels, spacings = [], []
    for case in spec.cases(args.split):
        label = spec.load_label(case)
        array = np.ascontiguousarray(label.array)
        if args.spacing:
            array = resample(array, label.spacing, args.spacing, is_label=True)
        labels.append(array)
        spacings.append(args.spacing or label.spacing)
    spacing = np.median(spacings, 0).tolist()
    shapes = [a.shape for a in labels]
    if args.patch_sizes:
        sizes = args.patch_sizes
    elif args.memory_budget is not None:
        sizes = auto_patch_sizes(shapes, spacing=spacing, num_classes=spec.num_classes,
                                 memory_budget_gb=args.memory_budget, min_fill=args.min_fill)
    else:
        sizes = candidate_patch_sizes(shapes)
    report = analyze_imbalance(labels, sizes, oversample_foreground=args.oversample, num_classes=spec.num_classes,
                               class_names=["background", *spec.organs], spacing=spacing, num_workers=args.workers)
    print(report.table())
    best = report.best(args.memory_budget, min_coverage=args.min_coverage)
    print(f"\nrecommended patch size: {list(best.patch_size)} (oversampling {best.oversample_foreground:.3g}, "
          f"score {best.score:.3f}" + (f", ~{best.memory_bytes / 2**30:.2f} GiB" if best.memory_bytes else "") + ")")
    if args.output:
        write_text(args.output / "imbalance.md", report.table())
        report.to_json(args.output / "imbalance.json")
        report.plot(args.output / "imbalance.png")
    return 0


# --------------------------------------------------------------------------------------------------------
def _add_confidence(sub) -> None:
    p = sub.add_parser("confidence", help="per-class calibration (ECE, reliability, TP/FP/FN confidence) of "
                                          "saved probabilities against the ground truth")
    p.add_argument("pred_dir", type=Path, help="folder of <case>_probs.npz (fastseg predict --save-probabilities)")
    p.add_argument("gt", type=Path, help="folder of ground-truth label maps, or a dataset description")
    p.add_argument("-o", "--output", type=Path, help="folder for confidence.{md,json,png}")
    p.add_argument("--split", help="split of a dataset description (default: every case)")
    p.add_argument("--num-bins", type=int, default=15)
    p.set_defaults(run=_run_confidence)


def _run_confidence(args) -> int:
    from fastseg.evaluation import confidence_folders

    analysis, summary = confidence_folders(args.pred_dir, args.gt, out_dir=args.output, num_bins=args.num_bins,
                                           split=args.split)
    print(analysis.table(summary))
    return 0


# --------------------------------------------------------------------------------------------------------
def _add_demo(sub) -> None:
    from fastseg.training.demo import CPU_SETTINGS, CUDA_SETTINGS

    p = sub.add_parser("demo", help="the main job: phantom data -> train -> predict -> evaluate, prints the table")
    p.add_argument("--output", type=Path, default=Path("runs/demo"))
    p.add_argument("--iterations", type=int, help=f"default: {CPU_SETTINGS['iterations']} on CPU, "
                                                  f"{CUDA_SETTINGS['iterations']} on CUDA")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--absent-classes", choices=("keep", "ignore"), default="ignore")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from fastseg.training.demo import run_demo

    run_demo(args.output, iterations=args.iterations, device=args.device, absent_classes=args.absent_classes,
             seed=args.seed)
    return 0


# --------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_phantom, _add_train, _add_predict, _add_evaluate, _add_imbalance, _add_confidence,
                _add_demo):
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"fastseg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        from fastseg.training.trainer import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            print(f"fastseg {args.command}: {exc}", file=sys.stderr)
            return 128 + int(exc.signum)
        raise


if __name__ == "__main__":
    sys.exit(main())
