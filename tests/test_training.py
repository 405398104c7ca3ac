"""The reference trainer and predictor: smoke training, exact kill-and-resume, signals, DDP, geometry of the
written predictions, config errors."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastseg.data.dataset import write_dataset_description
from fastseg.data.io import Image, read_image, write_image
from fastseg.training import Predictor, TrainConfig, Trainer, TrainingInterrupted, load_checkpoint
from gloo import run_on_ranks

ORGANS = ["Ball", "Cube"]
SHAPE = (24, 24, 16)


def _synthetic_case(seed: int):
    """A CT-like image with a large ball and a small cube of distinct intensity; a label map."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).astype(np.float32)
    centre = np.array([12, 12, 8]) + rng.integers(-2, 3, 3)
    label = np.zeros(SHAPE, np.uint8)
    label[np.linalg.norm((grid - centre) * [1, 1, 1.5], axis=-1) < 7] = 1
    c = rng.integers(3, 6, 3)
    label[c[0]:c[0] + 3, c[1]:c[1] + 3, c[2]:c[2] + 2] = 2
    image = np.full(SHAPE, -100.0, np.float32)
    image[label == 1] = 300.0
    image[label == 2] = 900.0
    image += rng.normal(0, 20, SHAPE).astype(np.float32)
    return image, label


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    names = [f"case{i}" for i in range(5)]
    for i, name in enumerate(names):
        image, label = _synthetic_case(i)
        write_image(root / "images" / f"{name}.nii.gz", Image(image, spacing=(2.0, 2.0, 3.0)))
        write_image(root / "labels" / f"{name}.nii.gz", Image(label, spacing=(2.0, 2.0, 3.0)))
    write_dataset_description(root / "dataset.json", organs=ORGANS, name="synthetic", image="images/{case}.nii.gz",
                              label="labels/{case}.nii.gz", splits={"train": names[:4], "test": names[4:]})
    return root / "dataset.json"


def _config(dataset, out, **changes):
    base = dict(dataset=str(dataset), output_dir=str(out), iterations=6, batch_size=2, patch_size=[16, 16, 8],
                base_features=4, max_features=16, val_every=0, checkpoint_every=0, num_workers=0,
                val_cases=1, device="cpu", deterministic=True, lr=1e-2)
    base.update(changes)
    return TrainConfig(**base)


def _fixed_batch_loss(trainer: Trainer, n: int = 8) -> float:
    """Loss of the current model on the first n training samples (eval mode: no dropout / stats noise)."""
    from fastseg.data.sampling import PatchDataset

    ds = PatchDataset([(c.image, c.label) for c in trainer.train_cases], trainer.plan["patch_size"], seed=123)
    image = torch.stack([ds[i][0] for i in range(n)])
    label = torch.stack([ds[i][1] for i in range(n)])
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.loss_fn.loss(trainer.model(image), label))


def test_training_reduces_loss(dataset, tmp_path):
    trainer = Trainer(_config(dataset, tmp_path, iterations=30, augment=False, val_every=15), progress=False)
    trainer.prepare_data()
    trainer.build()
    before = _fixed_batch_loss(trainer)
    trainer = Trainer(_config(dataset, tmp_path, iterations=30, augment=False, val_every=15), progress=False)
    result = trainer.fit()
    after = _fixed_batch_loss(trainer)
    assert after < 0.8 * before, (before, after)
    # logs, curves and both checkpoints are written; validation ran twice
    for name in ("log.csv", "log.json", "curves.png", "checkpoint.pt", "model_final.pt", "config.json"):
        assert (tmp_path / name).is_file(), name
    assert [h["iteration"] for h in result["history"] if "val_dice" in h] == [15, 30]
    assert set(result["val_dice"]) == set(ORGANS)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def _weights(path):
    return load_checkpoint(path)["model"]


def test_kill_and_resume_is_exact(dataset, tmp_path):
    full = Trainer(_config(dataset, tmp_path / "full", num_workers=0), progress=False)
    full.fit()

    interrupted = Trainer(_config(dataset, tmp_path / "resumed"), progress=False)
    step = interrupted._step

    def step_then_signal(image, label):
        loss = step(image, label)
        if interrupted.iteration == 2:  # the 3rd step is running: its checkpoint will say iteration 3
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    interrupted._step = step_then_signal
    with pytest.raises(TrainingInterrupted) as info:
        interrupted.fit()
    assert info.value.signum == signal.SIGTERM
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["iteration"] == 3

    # a new process would build a new Trainer: resume it, with loader workers this time
    Trainer(_config(dataset, tmp_path / "resumed", num_workers=2), progress=False).fit()
    a, b = _weights(tmp_path / "full" / "model_final.pt"), _weights(tmp_path / "resumed" / "model_final.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    opt_a = load_checkpoint(tmp_path / "full" / "model_final.pt")["optimizer"]["state"]
    opt_b = load_checkpoint(tmp_path / "resumed" / "model_final.pt")["optimizer"]["state"]
    for k in opt_a:
        assert torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"])


def test_sigint_from_outside_writes_checkpoint(dataset, tmp_path):
    """A real SIGINT to `fastseg train`: exit status 130, a readable checkpoint, no temp files."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastseg", "train", "--dataset", str(dataset), "--output-dir", str(out),
           "--iterations", "100000", "--device", "cpu", "--set", "patch_size=[16,16,8]", "--set", "base_features=4",
           "--set", "max_features=16", "--set", "num_workers=0", "--set", "val_every=0",
           "--set", "checkpoint_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        # wait until training runs (config.json is written right before the first iteration)
        for _ in range(600):
            if (out / "config.json").exists() or proc.poll() is not None:
                break
            import time

            time.sleep(0.1)
        import time

        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["iteration"] >= 1
    assert "resume from" in err
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _ddp_rank(rank, dataset, out):
    trainer = Trainer(_config(dataset, out, iterations=3, batch_dice=True, num_workers=0), progress=False)
    trainer.fit()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    torch.save(flat, Path(out) / f"params-rank{rank}.pt")


def test_ddp_gloo_two_processes(dataset, tmp_path):
    run_on_ranks(_ddp_rank, 2, tmp_path, str(dataset), str(tmp_path))
    p0 = torch.load(tmp_path / "params-rank0.pt")
    p1 = torch.load(tmp_path / "params-rank1.pt")
    assert torch.equal(p0, p1)  # DDP keeps the replicas identical
    state = load_checkpoint(tmp_path / "model_final.pt")
    assert state["iteration"] == 3
    # and they differ from the initial weights: training happened
    torch.manual_seed(0)
    from fastseg.training.trainer import build_model

    init = torch.cat([p.detach().flatten() for p in build_model(state["plan"]).parameters()])
    assert not torch.equal(init, p0)


def test_predictor_keeps_input_geometry(dataset, tmp_path):
    Trainer(_config(dataset, tmp_path / "m", iterations=2), progress=False).fit()
    image, _ = _synthetic_case(7)
    theta = np.deg2rad(20)
    direction = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    src = Image(image, spacing=(2.0, 2.0, 3.0), origin=(-10.0, 5.0, 30.0), direction=direction)
    write_image(tmp_path / "in" / "x.nrrd", src)
    predictor = Predictor(tmp_path / "m" / "model_final.pt", device="cpu")
    (written,) = predictor.predict_files([tmp_path / "in" / "x.nrrd"], tmp_path / "pred", save_probabilities=True,
                                        progress=False)
    out = read_image(written)
    assert written.name == "x.nrrd"
    assert out.array.shape == image.shape
    np.testing.assert_allclose(out.spacing, src.spacing)
    np.testing.assert_allclose(out.origin, src.origin)
    np.testing.assert_allclose(out.direction, direction, atol=1e-6)
    assert set(np.unique(out.array)) <= {0, 1, 2}
    from fastseg.training.predictor import load_probability_file

    probs = load_probability_file(tmp_path / "pred" / "x_probs.npz")["probs"]
    assert probs.shape == (3,) + image.shape
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=2e-2)  # float16 storage


def test_predictor_keep_largest_component(dataset, tmp_path):
    """Post-processing leaves one component per organ and only removes voxels; probabilities are untouched."""
    import scipy.ndimage as ndi

    from fastseg.postprocess import keep_largest_component

    Trainer(_config(dataset, tmp_path / "m", iterations=2), progress=False).fit()
    image = Image(_synthetic_case(8)[0], spacing=(2.0, 2.0, 3.0))  # the training spacing: no resampling
    plain = Predictor(tmp_path / "m" / "model_final.pt", device="cpu")
    label, probs = plain.predict(image, return_probabilities=True)
    cleaned, cleaned_probs = Predictor(tmp_path / "m" / "model_final.pt", device="cpu",
                                       keep_largest_component=True).predict(image, return_probabilities=True)
    np.testing.assert_array_equal(cleaned.array, keep_largest_component(label.array))
    np.testing.assert_array_equal(cleaned_probs.full(), probs.full())
    for value in (1, 2):
        assert ndi.label(cleaned.array == value, np.ones((3, 3, 3)))[1] <= 1
    only_cube = Predictor(tmp_path / "m" / "model_final.pt", device="cpu", keep_largest_component=["Cube"])
    np.testing.assert_array_equal(only_cube.predict(image).array, keep_largest_component(label.array, [2]))
    with pytest.raises(ValueError, match=r"keep_largest_component: expected organs of the model \(\['Ball', "
                                         r"'Cube'\]\), got unknown \['Lens'\]"):
        Predictor(tmp_path / "m" / "model_final.pt", device="cpu", keep_largest_component=["Lens"])
    from fastseg.cli import main

    model = str(tmp_path / "m" / "model_final.pt")
    assert main(["predict", model, str(dataset), "--keep-largest-component", "Lens", "-o", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "p").exists()
    assert main(["predict", model, str(dataset), "--keep-largest-component", "-o", str(tmp_path / "p")]) == 0
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == ["case4.nii.gz"]


def test_label_values_with_gaps_and_sigmoid_training(tmp_path):
    """A label map whose organ values are 3 and 7 trains (the loss sees classes 1..2) and predicts 3 / 7 back;
    a sigmoid model predicts the same values and stores organ-only probabilities (no background channel)."""
    root = tmp_path / "gaps"
    names = [f"case{i}" for i in range(4)]
    for i, name in enumerate(names):
        image, label = _synthetic_case(i)
        label = np.array([0, 3, 7], np.uint8)[label]
        write_image(root / "images" / f"{name}.nii.gz", Image(image, spacing=(2.0, 2.0, 3.0)))
        write_image(root / "labels" / f"{name}.nii.gz", Image(label, spacing=(2.0, 2.0, 3.0)))
    description = root / "dataset.json"
    write_dataset_description(description, organs={"Ball": 3, "Cube": 7}, image="images/{case}.nii.gz",
                              label="labels/{case}.nii.gz", splits={"train": names[:3], "test": names[3:]})
    for activation in ("softmax", "sigmoid"):
        out = tmp_path / activation
        trainer = Trainer(_config(description, out, iterations=30, activation=activation), progress=False)
        trainer.fit()
        if activation == "softmax":
            assert set(np.unique(trainer.train_cases[0].label)) == {0, 1, 2}
        image = Image(_synthetic_case(3)[0], spacing=(2.0, 2.0, 3.0))
        label, probs = Predictor(out / "model_final.pt", device="cpu").predict(image, return_probabilities=True)
        assert set(np.unique(label.array)) <= {0, 3, 7} and (label.array > 0).any()
        assert probs.background == (activation == "softmax") and probs.probs.shape[0] == 2 + probs.background


def test_lateral_pairs_in_the_plan_and_mirrored_prediction():
    """Names with a side token become swap pairs on the lateral axis; test-time mirroring of that axis swaps the
    pair's channels back, so a model that tells left from right by position keeps doing so under TTA."""
    from fastseg.training.trainer import predict_logits

    trainer = Trainer(TrainConfig(patch_size=[8, 6, 4], base_features=4, max_features=8), progress=False)
    trainer.use_cases([], [], [1.0, 1.0, 2.5], organs=["Brain", "Lens-Lt", "Lens-Rt"],
                      label_values={"Brain": 1, "Lens-Lt": 2, "Lens-Rt": 3}, lateral=0)
    assert trainer.plan["lateral"] == {"axis": 0, "pairs": [[2, 3]]}
    none = Trainer(TrainConfig(patch_size=[8, 6, 4], lateral_pairs="none"), progress=False)
    none.use_cases([], [], [1.0, 1.0, 2.5], organs=["Lens-Lt", "Lens-Rt"], label_values={"Lens-Lt": 1, "Lens-Rt": 2},
                   lateral=0)
    assert none.plan["lateral"] is None
    with pytest.raises(ValueError, match=r"lateral_pairs: expected organs of the dataset .* got unknown \['Eye'\]"):
        Trainer(TrainConfig(patch_size=[8, 6, 4], lateral_pairs=[["Eye", "Lens-Rt"]]), progress=False).use_cases(
            [], [], [1.0, 1.0, 2.5], organs=["Lens-Lt", "Lens-Rt"], label_values={"Lens-Lt": 1, "Lens-Rt": 2},
            lateral=0)

    class BySide(torch.nn.Module):
        """Logits: Lens-Lt on the low half of axis 0, Lens-Rt on the high half (one window = the volume)."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            low = (torch.arange(x.shape[2]) < x.shape[2] // 2).float().view(1, -1, 1, 1).expand(x.shape[0], -1,
                                                                                                 *x.shape[3:])
            return torch.stack([torch.zeros_like(low), -5 + 0 * low, 5 * (2 * low - 1), -5 * (2 * low - 1)], 1)

    plan = {**trainer.plan, "patch_size": [8, 6, 4]}
    image = np.zeros((1, 8, 6, 4), np.float32)
    plain = predict_logits(BySide(), image, plan, device=torch.device("cpu"))
    mirrored = predict_logits(BySide(), image, plan, mirror_axes=(0,), device=torch.device("cpu"))
    torch.testing.assert_close(mirrored, plain)
    unswapped = predict_logits(BySide(), image, {**plan, "lateral": None}, mirror_axes=(0,),
                               device=torch.device("cpu"))
    assert unswapped[2:].abs().max() < 1e-5  # plain mirroring blends left and right into a tie


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="iterations: expected an int >= 1, got 0"):
        TrainConfig(iterations=0)
    with pytest.raises(ValueError, match="absent_classes: expected one of 'keep', 'ignore', got 'drop'"):
        TrainConfig(absent_classes="drop")
    with pytest.raises(ValueError, match=r"patch_size: expected a list of 2 or 3 positive ints or 'auto'"):
        TrainConfig(patch_size="big")
    with pytest.raises(ValueError, match=r"min_coverage: expected a share in \(0, 1\] or null"):
        TrainConfig(min_coverage=1.5)
    with pytest.raises(ValueError, match=r"lateral_pairs: expected 'auto', 'none' or a list of \[left, right\]"):
        TrainConfig(lateral_pairs=[["Lens-Lt"]])
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    bad = tmp_path / "c.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(ValueError, match="could not parse"):
        TrainConfig.load(bad)
    with pytest.raises(ValueError, match="config: expected an existing"):
        TrainConfig.load(tmp_path / "missing.yaml")


def test_mismatched_resume_is_refused(dataset, tmp_path):
    Trainer(_config(dataset, tmp_path, iterations=1), progress=False).fit()
    with pytest.raises(ValueError, match="another plan"):
        Trainer(_config(dataset, tmp_path, iterations=2, patch_size=[8, 8, 8]), progress=False).fit()


def test_confidence_command_on_predicted_probabilities(dataset, tmp_path, capsys):
    """predict --save-probabilities then `fastseg confidence`: its counts equal the op on the same arrays."""
    from fastseg.cli import main
    from fastseg.confidence import calibration_stats
    from fastseg.training.predictor import load_probability_file

    Trainer(_config(dataset, tmp_path / "m", iterations=2), progress=False).fit()
    assert main(["predict", str(tmp_path / "m" / "model_final.pt"), str(dataset), "--split", "test", "-o",
                 str(tmp_path / "pred"), "--save-probabilities"]) == 0
    assert main(["confidence", str(tmp_path / "pred"), str(dataset), "--split", "test", "-o",
                 str(tmp_path / "conf"), "--num-bins", "10"]) == 0
    assert "ECE" in capsys.readouterr().out
    for name in ("confidence.md", "confidence.json", "confidence.png"):
        assert (tmp_path / "conf" / name).is_file()
    probs = torch.from_numpy(load_probability_file(tmp_path / "pred" / "case4_probs.npz")["probs"])
    gt = torch.from_numpy(read_image(dataset.parent / "labels" / "case4.nii.gz").array.astype(np.int64))
    stats = calibration_stats(probs[None], gt[None], num_bins=10)
    import json

    from fastseg.confidence import expected_calibration_error

    saved = json.loads((tmp_path / "conf" / "confidence.json").read_text())
    assert saved["cases"] == 1 and saved["tp"] == stats.confusion[:, 0].tolist()
    assert saved["top_label_ece"] == pytest.approx(float(expected_calibration_error(stats.top_label)), abs=1e-12)


def test_patch_size_auto_uses_the_imbalance_recommendation(dataset, tmp_path):
    from fastseg.imbalance import analyze_imbalance, auto_patch_sizes, recommend_patch_size, unet_memory_fn

    probe = Trainer(_config(dataset, tmp_path / "probe"), progress=False)
    probe.prepare_data()
    labels = [c.label for c in probe.train_cases]
    spacing = probe.plan["target_spacing"]
    memory = unet_memory_fn(spacing, 3, base_features=4, max_features=16)
    median = tuple(int(n) for n in np.median([lab.shape for lab in labels], 0))
    budget = 0.4 * memory(median) / 2 ** 30  # less than half of what the whole case takes: a real choice

    trainer = Trainer(_config(dataset, tmp_path / "auto", patch_size="auto", memory_budget_gb=budget), progress=False)
    trainer.prepare_data()
    expected = recommend_patch_size(labels, spacing=spacing, num_classes=3, oversample_foreground=1 / 3,
                                    memory_budget_gb=budget, base_features=4, max_features=16)
    candidates = auto_patch_sizes([lab.shape for lab in labels], spacing=spacing, num_classes=3,
                                  memory_budget_gb=budget, base_features=4, max_features=16)
    report = analyze_imbalance(labels, candidates, num_classes=3, spacing=spacing)
    assert len(candidates) > 1 and tuple(expected) == candidates[int(np.argmin(report.score[:, 1]))]
    # the plan trains on exactly the recommended size (already a multiple of the network's divisor)
    assert tuple(trainer.plan["patch_size"]) == tuple(expected)
    # min_coverage reaches the recommendation: demand the best coverage any candidate achieves
    least = np.nanmin(report.coverage[:, 1:], axis=1)
    covered = [i for i in range(len(candidates)) if least[i] >= least.max()]
    assert least[candidates.index(tuple(expected))] < least.max()
    strict = Trainer(_config(dataset, tmp_path / "strict", patch_size="auto", memory_budget_gb=budget,
                             min_coverage=float(least.max())), progress=False)
    strict.prepare_data()
    best = candidates[min(covered, key=lambda i: report.score[i, 1])]
    assert tuple(strict.plan["patch_size"]) == best and tuple(expected) != best


def test_imbalance_command(dataset, tmp_path, capsys):
    from fastseg.cli import main

    assert main(["imbalance", str(dataset), "--patch-sizes", "16,16,8", "24,24,16", "--oversample", "0", "0.5",
                 "-o", str(tmp_path / "imb")]) == 0
    out = capsys.readouterr().out
    assert "recommended patch size" in out and "Cube" in out
    for name in ("imbalance.md", "imbalance.json", "imbalance.png"):
        assert (tmp_path / "imb" / name).is_file()
    # with a budget and no sizes: every aspect that uses the budget (the reference U-Net's estimate)
    assert main(["imbalance", str(dataset), "--memory-budget", "0.04", "--oversample", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "recommended patch size" in out and "GiB" in out
    assert "| 16x24x16 |" in out and "| 24x16x16 |" in out and "| 24x24x16 |" not in out
    assert main(["imbalance", str(dataset), "--memory-budget", "0.04", "--min-fill", "0.5"]) == 0
    assert "| 24x24x8 |" in capsys.readouterr().out
    assert main(["imbalance", str(dataset), "--memory-budget", "0.04", "--min-fill", "0"]) == 2
    assert "min_fill: expected a share in (0, 1]" in capsys.readouterr().err
    assert main(["imbalance", str(dataset), "--patch-sizes", "16,16,8", "--min-coverage", "2"]) == 2
    assert "min_coverage: expected a share" in capsys.readouterr().err
    assert main(["imbalance", str(dataset), "--patch-sizes", "0,16,8"]) == 2
    assert "patch" in capsys.readouterr().err


def test_paper_comparison_plan_optimises_as_patch_size_auto(dataset, tmp_path):
    """experiments/paper_comparison.py reads its optimised patch off its own candidate table; it must be the
    patch the trainer's ``patch_size: auto`` trains with, and its default nnU-Net's rule under the same budget."""
    import importlib.util

    from fastseg.imbalance import recommend_patch_size, unet_memory_fn

    path = Path(__file__).resolve().parents[1] / "experiments" / "paper_comparison.py"
    spec = importlib.util.spec_from_file_location("paper_comparison", path)
    pc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pc)
    spacing = [2.0, 2.0, 3.0]
    memory = unet_memory_fn(spacing, 3, base_features=4, max_features=16)
    budget = 0.4 * memory(SHAPE) / 2 ** 30
    settings = {**pc.PROFILES["smoke"], "base_features": 4, "max_features": 16, "memory_budget_gb": budget,
                "num_workers": 0, "device": "cpu", "spacing": spacing}
    info = {"dataset": "synthetic", "description": str(dataset), "spacing": spacing, "organs": ORGANS}
    plan = pc.plan_patches(info, settings, tmp_path / "patches.json")
    assert pc.plan_patches(info, settings, tmp_path / "patches.json") == plan  # stored, read back

    trainer = Trainer(pc.base_config(info, settings, output_dir=str(tmp_path / "probe")), progress=False)
    trainer.prepare_data()
    labels = [c.label for c in trainer.train_cases]
    assert plan["optimised"] == recommend_patch_size(
        labels, spacing=spacing, num_classes=3, oversample_foreground=settings["oversample_foreground"],
        memory_budget_gb=budget, batch_size=settings["batch_size"], base_features=4, max_features=16)
    rows = {tuple(r["patch"]): r for r in plan["candidates"]}
    assert len(rows) > 2 and all(r["memory_gib"] <= budget for r in rows.values())
    # default, nnU-Net's rule: the largest of the median shape scaled (at the trained sizes) that fits
    from fastseg.imbalance import candidate_patch_sizes
    from fastseg.models import trained_patch_size

    scaled = [trained_patch_size(c, spacing, base_features=4, max_features=16)
              for c in candidate_patch_sizes([lab.shape for lab in labels], fractions=pc.SCALED_FRACTIONS)]
    default = tuple(plan["default"])
    assert default in scaled and default in rows and memory(default) <= budget * 2 ** 30
    assert all(memory(s) > budget * 2 ** 30 for s in scaled if np.prod(s) > np.prod(default))
