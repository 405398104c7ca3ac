"""The two-stage cascade: the organ split, stage two's crops (training and prediction), the chained prediction,
the two-stage file, resume, the CLI and its errors."""
import json
import math
import warnings

import numpy as np
import pytest
import torch

from fastseg.cli import main
from fastseg.data.dataset import DatasetSpec, write_dataset_description
from fastseg.data.io import Image, read_image, write_image
from fastseg.data.preprocess import preprocess_case
from fastseg.training import Predictor, TrainConfig, Trainer
from fastseg.training.cascade import (CascadePredictor, CascadeTrainer, cascade_crop, load_predictor,
                                      measure_volumes, split_organs)
from fastseg.training.checkpoint import load_checkpoint
from fastseg.training.trainer import load_dataset, prepare_cases

ORGANS = ["Ball", "CubeA", "CubeB"]
SPACING = (2.0, 2.0, 3.0)
SHAPE = (24, 24, 16)


def _synthetic_case(seed: int):
    """A large ball and two small cubes (0.2 ml each, on one side of it) of distinct intensities."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).astype(np.float32)
    centre = np.array([12, 12, 8]) + rng.integers(-2, 3, 3)
    label = np.zeros(SHAPE, np.uint8)
    label[np.linalg.norm((grid - centre) * [1, 1, 1.5], axis=-1) < 6] = 1
    for value, corner in ((2, rng.integers(1, 4, 3)), (3, [1, 9, 1] + rng.integers(0, 3, 3))):
        label[corner[0]:corner[0] + 3, corner[1]:corner[1] + 3, corner[2]:corner[2] + 2] = value
    image = np.full(SHAPE, -100.0, np.float32)
    for value, hu in ((1, 300.0), (2, 900.0), (3, 600.0)):
        image[label == value] = hu
    image += rng.normal(0, 20, SHAPE).astype(np.float32)
    return image, label


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade_data")
    names = [f"case{i}" for i in range(5)]
    for i, name in enumerate(names):
        image, label = _synthetic_case(i)
        write_image(root / "images" / f"{name}.nii.gz", Image(image, spacing=SPACING))
        write_image(root / "labels" / f"{name}.nii.gz", Image(label, spacing=SPACING))
    write_dataset_description(root / "dataset.json", organs=ORGANS, name="synthetic", image="images/{case}.nii.gz",
                              label="labels/{case}.nii.gz", splits={"train": names[:4], "test": names[4:]})
    return root / "dataset.json"


def _settings(dataset, out, **changes):
    base = dict(dataset=str(dataset), output_dir=str(out), iterations=3, batch_size=2, patch_size=[16, 16, 8],
                base_features=4, max_features=16, val_every=0, checkpoint_every=0, num_workers=0, val_cases=1,
                device="cpu", cascade=True, cascade_max_volume_ml=1.0, cascade_margin_mm=4.0)
    base.update(changes)
    return base


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A tiny cascade trained through `fastseg train CONFIG --cascade` (the config file says cascade: false)."""
    out = tmp_path_factory.mktemp("cascade_run")
    config = out / "config.json"
    config.write_text(json.dumps(_settings(dataset, out / "run", cascade=False)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained stage one may find no small organ: the fallback warns
        code = main(["train", str(config), "--cascade"])
    assert code == 0
    return out / "run", TrainConfig.load(config).replace(cascade=True)


# --------------------------------------------------------------------------------------------------------
def test_split_organs_by_volume_and_override():
    volumes = {"Brain": 1400.0, "Lens": 0.2, "Cochlea": math.nan, "Orbit": 8.0, "Parotid": 25.0}
    assert split_organs(volumes, 10.0) == (["Brain", "Cochlea", "Parotid"], ["Lens", "Orbit"])
    assert split_organs(volumes, 1.0) == (["Brain", "Cochlea", "Orbit", "Parotid"], ["Lens"])
    # the override wins over the volumes and keeps the organ order; every organ may be small
    assert split_organs(volumes, 1.0, ["Parotid", "Cochlea"]) == (["Brain", "Lens", "Orbit"],
                                                                 ["Cochlea", "Parotid"])
    assert split_organs(volumes, 1.0, list(volumes)) == ([], list(volumes))
    with pytest.raises(ValueError, match=r"cascade_small_organs\): expected organs of the dataset \['Brain', 'Lens', "
                                         r"'Cochlea', 'Orbit', 'Parotid'\], got unknown \['Eye'\]"):
        split_organs(volumes, 1.0, ["Lens", "Eye"])
    with pytest.raises(ValueError, match=r"got 0.1 ml \(the smallest is Lens with 0.2 ml\); raise it"):
        split_organs(volumes, 0.1)


def test_measure_volumes_is_the_median_over_cases_with_the_organ(dataset):
    spec, train, _ = load_dataset(TrainConfig(**_settings(dataset, "unused")))
    volumes = measure_volumes(train, spec.label_values)
    voxel_ml = np.prod(SPACING) / 1000
    for organ, value in spec.label_values.items():
        counts = [int((c.label.array == value).sum()) for c in train]
        assert volumes[organ] == pytest.approx(np.median([n for n in counts if n]) * voxel_ml)
    assert volumes["CubeA"] == pytest.approx(18 * voxel_ml)


# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """Three phantom cases at 4 x 4 x 5 mm, preprocessed at that spacing and at 8 x 8 x 10 mm."""
    from fastseg.data.phantom import write_phantom_dataset

    path = write_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_train=3, n_test=0, spacing=(4.0, 4.0, 5.0))
    config = TrainConfig(dataset=str(path), val_cases=0, cascade=True)
    spec, train, _ = load_dataset(config)
    large, small = split_organs(measure_volumes(train, spec.label_values), config.cascade_max_volume_ml)
    fine = prepare_cases(train, [4.0, 4.0, 5.0], config.window)
    coarse = prepare_cases(train, [8.0, 8.0, 10.0], config.window)
    return config, spec, small, fine, coarse


def _one_hot(label: np.ndarray, organs, label_values) -> np.ndarray:
    """(K, *S) probabilities of a label map: channel k + 1 = organ k."""
    probs = np.zeros((len(organs) + 1,) + label.shape, np.float32)
    probs[0] = 1.0
    for k, organ in enumerate(organs):
        inside = label == label_values[organ]
        probs[k + 1][inside] = 1.0
        probs[0][inside] = 0.0
    return probs


class _FixedStageOne:
    """Stands in for stage one's Trainer: returns given probabilities as logits."""

    def __init__(self, probs):
        self.probs = probs

    def predict_logits(self, image):
        return torch.log(torch.from_numpy(self.probs).clamp_min(1e-6))


def test_training_crops_contain_every_small_organ(phantom, tmp_path):
    config, spec, small, fine, coarse = phantom
    assert {"Lens-Lt", "Cochlea-Rt", "Optic-Nerve-Lt", "Submandibular-Rt"} <= set(small)
    assert "Brain" not in small and "Parotid-Lt" not in small
    organs = spec.organs
    channels = [organs.index(o) + 1 for o in small]
    trainer = CascadeTrainer(config.replace(output_dir=str(tmp_path)), progress=False)
    cropped_somewhere = False
    for c, f in zip(coarse, fine):
        # stage one found only the left lens: the training crop must still hold every small organ
        only_lens = np.where(c.label == spec.label_values["Lens-Lt"], c.label, 0)
        for probs in (_one_hot(only_lens, organs, spec.label_values), _one_hot(c.label, organs, spec.label_values)):
            log = []
            case = trainer._crop_case(_FixedStageOne(probs), c, f, spec.label_values, small, channels,
                                      [4.0, 4.0, 5.0], "train", log)
            assert case.image.shape[0] == 1 + len(small)
            assert case.image.shape[1:] == case.label.shape
            for j, organ in enumerate(small):
                assert (case.label == j + 1).sum() == (f.label == spec.label_values[organ]).sum(), organ
            assert set(np.unique(case.label)) <= set(range(len(small) + 1))
            cropped_somewhere |= case.label.size < f.label.size
            assert log[0]["found"]
    assert cropped_somewhere  # the crop is smaller than the volume, so containment is not trivial
    # stage one found no small organ: the whole volume, with a warning
    c, f = coarse[0], fine[0]
    nothing = _one_hot(np.where(np.isin(c.label, [spec.label_values[o] for o in small]), 0, c.label), organs,
                       spec.label_values)
    with pytest.warns(UserWarning, match="stage one predicts no small organ in val case 'phantom_000'; stage two "
                                         "uses its whole body-cropped volume"):
        case = trainer._crop_case(_FixedStageOne(nothing), c, f, spec.label_values, small, channels,
                                  [4.0, 4.0, 5.0], "val", [])
    assert case.label.shape == f.label.shape


def test_prediction_crop_contains_small_organs_that_stage_one_found(phantom):
    config, spec, small, fine, coarse = phantom
    channels = [spec.organs.index(o) + 1 for o in small]
    values = [spec.label_values[o] for o in small]
    for c, f in zip(coarse, fine):
        probs = _one_hot(c.label, spec.organs, spec.label_values)
        box, found = cascade_crop(probs, channels, f.label.shape, [4.0, 4.0, 5.0], 10.0)
        assert found
        inside = np.zeros(f.label.shape, bool)
        inside[box] = True
        truth = np.isin(f.label, values)
        assert truth.sum() > 0 and not (truth & ~inside).any()
        assert inside.sum() < inside.size
        # the margin grows the box by ceil(10 mm / spacing) voxels on every side that is not clipped
        tight, _ = cascade_crop(probs, channels, f.label.shape, [4.0, 4.0, 5.0], 0.0)
        for b, t, n, pad in zip(box, tight, f.label.shape, (3, 3, 2)):
            assert b.start == max(0, t.start - pad) and b.stop == min(n, t.stop + pad)


def test_stage_two_augmentation_leaves_the_guidance_channels_alone():
    """Brightness, gamma and noise change the CT channel only; flips move every channel alike."""
    from fastseg.data.augment import Augmenter

    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(size=(8, 8, 8)), rng.random((8, 8, 8)), rng.random((8, 8, 8))]).astype(np.float32)
    still = Augmenter(intensity_channels=1, p_flip=0.0, p_rotation=0.0, p_scale=0.0, p_intensity=1.0, p_gamma=1.0,
                      p_noise=1.0)
    out, _ = still(image, None, np.random.default_rng(1))
    assert not np.allclose(out[0], image[0])
    np.testing.assert_array_equal(out[1:], image[1:])
    flip = Augmenter(intensity_channels=1, flip_axes=(0,), p_flip=1.0, p_rotation=0.0, p_scale=0.0,
                     p_intensity=0.0, p_gamma=0.0, p_noise=0.0)
    out, _ = flip(image, None, np.random.default_rng(1))
    np.testing.assert_array_equal(out, image[:, ::-1])
    # stage two's trainer augments like `still`: CT channel only
    trainer = Trainer(TrainConfig(patch_size=[8, 8, 8]), progress=False)
    trainer.use_cases([], [], [4.0, 4.0, 5.0], organs=["CubeA", "CubeB"], label_values={"CubeA": 1, "CubeB": 2},
                      in_channels=3)
    assert trainer._augmenter().intensity_channels is None
    trainer.plan = {**trainer.plan, "cascade_guidance": ["CubeA", "CubeB"]}
    assert trainer._augmenter().intensity_channels == 1


# --------------------------------------------------------------------------------------------------------
def test_final_file_holds_both_stages(trained):
    run, _ = trained
    for name in ("stage1/model_final.pt", "stage2/model_final.pt", "model_final.pt", "cascade.json"):
        assert (run / name).is_file(), name
    state = torch.load(run / "model_final.pt", weights_only=True)
    assert state["plan"]["organs"] == ORGANS and state["plan"]["in_channels"] == 1
    cascade = state["cascade"]
    assert cascade["small_organs"] == ["CubeA", "CubeB"] and cascade["large_organs"] == ["Ball"]
    assert cascade["plan"]["organs"] == ["CubeA", "CubeB"] and cascade["plan"]["in_channels"] == 3
    assert state["plan"]["target_spacing"] == [4.0, 4.0, 6.0]  # twice the target spacing
    assert cascade["plan"]["target_spacing"] == list(SPACING)
    for stage, key in ((load_checkpoint(run / "stage1" / "model_final.pt"), state),
                       (load_checkpoint(run / "stage2" / "model_final.pt"), cascade)):
        assert stage["iteration"] == 3
        for k, v in stage["model"].items():
            assert torch.equal(v, key["model"][k]), k
    assert isinstance(load_predictor(run / "model_final.pt", device="cpu"), CascadePredictor)
    assert type(load_predictor(run / "stage1" / "model_final.pt", device="cpu")) is Predictor
    with pytest.raises(ValueError, match="got stage two of a cascade .* use .*model_final.pt"):
        load_predictor(run / "stage2" / "model_final.pt", device="cpu")
    with pytest.raises(ValueError, match="CascadePredictor: checkpoint: expected a cascade's model_final.pt"):
        CascadePredictor(run / "stage1" / "model_final.pt", device="cpu")


def test_prediction_chains_both_stages(trained):
    run, _ = trained
    predictor = load_predictor(run / "model_final.pt", device="cpu")
    calls = {"stage1": [], "stage2": []}
    predictor.model.register_forward_hook(lambda m, inp, out: calls["stage1"].append(inp[0].shape[1]))
    predictor.stage2_model.register_forward_hook(lambda m, inp, out: calls["stage2"].append(inp[0].shape[1]))
    image, _ = _synthetic_case(9)
    theta = np.deg2rad(15)
    direction = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    src = Image(image, spacing=SPACING, origin=(-5.0, 3.0, 20.0), direction=direction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        label, probs = predictor.predict(src, return_probabilities=True)
    assert calls["stage1"] and set(calls["stage1"]) == {1}  # the CT alone
    assert calls["stage2"] and set(calls["stage2"]) == {3}  # the CT and stage one's two small-organ channels
    assert label.array.shape == SHAPE
    np.testing.assert_allclose(label.spacing, SPACING)
    np.testing.assert_allclose(label.origin, src.origin)
    np.testing.assert_allclose(label.direction, direction)
    full = probs.full()
    assert full.shape == (4,) + SHAPE
    np.testing.assert_allclose(full.sum(0), 1.0, atol=1e-5)
    assert set(np.unique(label.array)) <= {0, 1, 2, 3}


def test_cascade_replaces_small_organs_inside_the_crop(trained, dataset):
    """Stage one's probabilities injected from the ground truth, stage two forced to say CubeA: CubeA fills
    exactly the crop, which holds every true small organ; CubeB appears nowhere; the ball is stage one's."""
    run, _ = trained
    predictor = load_predictor(run / "model_final.pt", device="cpu")
    spec = DatasetSpec.load(dataset)
    image = read_image(dataset.parent / "images" / "case4.nii.gz")
    truth = read_image(dataset.parent / "labels" / "case4.nii.gz").array
    coarse_truth = preprocess_case(image, label=truth, target_spacing=predictor.plan["target_spacing"]).label
    predictor.stage_one_probabilities = lambda x: _one_hot(coarse_truth, ORGANS, spec.label_values)
    seen = []

    def cube_a_everywhere(inputs):
        seen.append(inputs.shape)
        probs = np.zeros((3,) + inputs.shape[1:], np.float32)
        probs[1] = 1.0
        return probs

    predictor.stage_two_probabilities = cube_a_everywhere
    label = predictor.predict(image).array
    crop = label == 2
    assert seen and crop.any()
    lo = np.argwhere(crop).min(0)
    hi = np.argwhere(crop).max(0) + 1
    assert crop[tuple(slice(a, b) for a, b in zip(lo, hi))].all()  # a box
    assert crop.sum() < crop.size
    assert not ((truth >= 2) & ~crop).any()  # every true small organ inside the crop
    assert not (label == 3).any()
    ball = (label == 1) & ~crop
    assert ball.sum() > 0.8 * ((truth == 1) & ~crop).sum()

    # stage one finds no small organ: stage two sees the whole body crop, with a warning
    predictor.stage_one_probabilities = lambda x: _one_hot(np.where(coarse_truth == 1, 1, 0), ORGANS,
                                                           spec.label_values)
    with pytest.warns(UserWarning, match="stage one predicts no small organ"):
        predictor.predict(image)
    assert seen[-1][1:] == preprocess_case(image, target_spacing=SPACING).image.shape[1:]


def test_resume_continues_each_stage_from_its_checkpoint(trained):
    run, config = trained
    before = load_checkpoint(run / "model_final.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CascadeTrainer(config, progress=False).fit()  # both stages done: nothing is trained again
        assert result["stage1"]["iteration"] == 3 and result["stage2"]["iteration"] == 3
        after = load_checkpoint(run / "model_final.pt")
        for k in before["model"]:
            assert torch.equal(before["model"][k], after["model"][k])
        for k in before["cascade"]["model"]:
            assert torch.equal(before["cascade"]["model"][k], after["cascade"]["model"][k])
        # more iterations: each stage continues from its own checkpoint
        result = CascadeTrainer(config.replace(iterations=4), progress=False).fit()
    assert result["stage1"]["iteration"] == 4 and result["stage2"]["iteration"] == 4
    assert [h["iteration"] for h in result["stage2"]["history"] if "loss" in h] == [1, 2, 3, 4]


def test_cli_predict_with_a_cascade(trained, dataset, tmp_path, capsys):
    run, _ = trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["predict", str(run / "model_final.pt"), str(dataset), "--split", "test", "-o",
                     str(tmp_path / "pred"), "--save-probabilities"]) == 0
    assert "wrote 1 label maps" in capsys.readouterr().out
    from fastseg.training.predictor import load_probability_file

    out = read_image(tmp_path / "pred" / "case4.nii.gz")
    assert out.array.shape == SHAPE
    saved = load_probability_file(tmp_path / "pred" / "case4_probs.npz")
    assert saved["organs"] == ORGANS and saved["probs"].shape == (4,) + SHAPE


# --------------------------------------------------------------------------------------------------------
def test_cascade_setting_errors(dataset, tmp_path, capsys):
    with pytest.raises(ValueError, match="cascade_margin_mm: expected a finite number >= 0, got -1"):
        TrainConfig(cascade_margin_mm=-1)
    with pytest.raises(ValueError, match=r"cascade_coarse_spacing: expected 2 or 3 positive numbers, got \[0, 2, 2\]"):
        TrainConfig(cascade_coarse_spacing=[0, 2, 2])
    with pytest.raises(ValueError, match="cascade_small_organs: expected a non-empty list of organ names"):
        TrainConfig(cascade_small_organs="CubeA")
    with pytest.raises(ValueError, match="cascade_max_volume_ml: expected a finite number > 0"):
        TrainConfig(cascade_max_volume_ml=0)
    with pytest.raises(ValueError, match="activation: expected 'softmax' with cascade: true"):
        TrainConfig(cascade=True, activation="sigmoid")
    with pytest.raises(ValueError, match="CascadeTrainer: config: expected cascade: true"):
        CascadeTrainer(TrainConfig(**_settings(dataset, tmp_path, cascade=False)))
    # errors that need the dataset come before stage one trains
    cases = [
        (dict(cascade_small_organs=["CubeA", "Lens"]),
         r"expected organs of the dataset \['Ball', 'CubeA', 'CubeB'\], got unknown \['Lens'\]"),
        (dict(cascade_max_volume_ml=0.01), r"the smallest is CubeA with 0.216 ml"),
        (dict(cascade_coarse_spacing=[1.0, 4.0, 6.0]), r"at least as coarse as the target spacing \[2.0, 2.0, 3.0\]"),
        (dict(cascade_coarse_spacing=[4.0, 4.0]), r"expected 3 values \(the data is 3D\), got \[4.0, 4.0\]"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            CascadeTrainer(TrainConfig(**_settings(dataset, tmp_path / "run", **changes)), progress=False).fit()
    assert not (tmp_path / "run").exists()
    base = ["train", "--cascade", "--dataset", str(dataset), "--output-dir", str(tmp_path / "cli"), "--device", "cpu"]
    assert main(base + ["--set", "cascade_small_organs=[Nope]"]) == 2
    assert "fastseg train: error: split_organs: override (cascade_small_organs): expected organs of the dataset " \
           "['Ball', 'CubeA', 'CubeB'], got unknown ['Nope']" in capsys.readouterr().err
    assert main(base + ["--set", "cascade_margin_mm=-5"]) == 2
    assert "fastseg train: error: TrainConfig: cascade_margin_mm: expected a finite number >= 0, got -5" \
        in capsys.readouterr().err
    assert main(base + ["--set", "activation=sigmoid"]) == 2
    assert "activation: expected 'softmax' with cascade: true" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()
