#!/usr/bin/env python3
"""The two-stage cascade on the synthetic phantom at 1x1x2.5 mm, on a CPU: does stage two learn small organs?

    python experiments/cascade_cpu.py OUT [--small-organs Lens-Lt Lens-Rt ...] [--iterations 750]

Writes 14 phantoms (10 train, 4 test, seed 0) at 1x1x2.5 mm into OUT/data, trains fastseg's cascade
(stage one: every organ at 2x2x5 mm; stage two: the small organs at 1x1x2.5 mm inside stage one's crop) with
the CPU demo's settings (fastseg.training.demo.CPU_SETTINGS) for both stages, predicts the test phantoms
(largest connected component per organ) and prints the per-organ table (also in OUT/evaluation). Each stage
resumes from its checkpoint, so a rerun continues. Results: README, "Cascade for small organs".
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--small-organs", nargs="+", default=None,
                        help="stage two's organs (default: those below cascade_max_volume_ml, 10 ml)")
    parser.add_argument("--iterations", type=int, default=None, help="per stage (default: the CPU demo's)")
    args = parser.parse_args(argv)

    from fastseg.cli import dataset_images
    from fastseg.data.phantom import write_phantom_dataset
    from fastseg.evaluation import evaluate_folders
    from fastseg.training import TrainConfig
    from fastseg.training.cascade import CascadeTrainer, load_predictor
    from fastseg.training.demo import CPU_SETTINGS

    t0 = time.perf_counter()
    description = args.out / "data" / "dataset.json"
    if not description.is_file():
        write_phantom_dataset(description.parent, n_train=10, n_test=4, seed=0, spacing=(1.0, 1.0, 2.5))
    settings = dict(CPU_SETTINGS)
    if args.iterations is not None:
        settings["iterations"] = args.iterations
    config = TrainConfig(dataset=str(description), output_dir=str(args.out / "model"), device="cpu",
                         absent_classes="ignore", seed=0, val_cases=2, cascade=True, target_spacing=[1.0, 1.0, 2.5],
                         cascade_small_organs=args.small_organs, **settings)
    result = CascadeTrainer(config).fit()
    predictor = load_predictor(result["checkpoint"], device="cpu", keep_largest_component=True)
    predictor.predict_files(dataset_images(description, "test"), args.out / "predictions")
    report = evaluate_folders(args.out / "predictions", description, out_dir=args.out / "evaluation",
                              tolerance=2.0, split="test")
    print(f"stage two: {result['small_organs']}; {time.perf_counter() - t0:.0f} s in all\n")
    print(report.markdown())


if __name__ == "__main__":
    main()
