"""`fastseg` command-line errors: one clear line, exit status 2, and no partial output left behind."""
import json

import numpy as np
import pytest

from fastseg.cli import main
from fastseg.data.dataset import write_dataset_description
from fastseg.data.io import Image, write_image


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _files(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def pair(tmp_path):
    """pred/ and gt/ folders with one matching label map each, plus the organ description."""
    label = np.zeros((12, 12, 6), np.uint8)
    label[3:8, 3:8, 1:4] = 1
    write_image(tmp_path / "gt" / "a.nii.gz", Image(label, spacing=(1.0, 1.0, 2.5)))
    write_image(tmp_path / "pred" / "a.nii.gz", Image(label, spacing=(1.0, 1.0, 2.5)))
    write_dataset_description(tmp_path / "gt" / "dataset.json", organs=["Brain"], label="{case}.nii.gz")
    return tmp_path


def test_evaluate_ok_then_corrupt_prediction(pair, capsys):
    code, err = _run(capsys, "evaluate", pair / "pred", pair / "gt", "-o", pair / "eval")
    assert code == 0, err
    assert (pair / "eval" / "summary.md").is_file()
    (pair / "pred" / "a.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    code, err = _run(capsys, "evaluate", pair / "pred", pair / "gt", "-o", pair / "eval2")
    assert code == 2
    assert err.startswith("fastseg evaluate: error:") and "a.nii.gz" in err
    assert _files(pair / "eval2") == []


def test_evaluate_spacing_mismatch(pair, capsys):
    label = np.zeros((12, 12, 6), np.uint8)
    write_image(pair / "pred" / "a.nii.gz", Image(label, spacing=(1.0, 1.0, 3.0)))
    code, err = _run(capsys, "evaluate", pair / "pred", pair / "gt", "-o", pair / "eval")
    assert code == 2 and "spacing" in err and "a.nii.gz" in err
    assert _files(pair / "eval") == []


def test_evaluate_missing_prediction_folder(pair, capsys):
    code, err = _run(capsys, "evaluate", pair / "nothing", pair / "gt")
    assert code == 2 and "nothing" in err


def test_evaluate_corrupt_nrrd(pair, capsys):
    (pair / "gt" / "a.nii.gz").unlink()
    (pair / "gt" / "a.nrrd").write_text("NRRD0004\ntype: garbage\n\n")
    (pair / "gt" / "dataset.json").unlink()
    write_dataset_description(pair / "gt" / "dataset.json", organs=["Brain"], label="{case}.nrrd")
    code, err = _run(capsys, "evaluate", pair / "pred", pair / "gt")
    assert code == 2 and "a.nrrd" in err


def test_unknown_organ_names(tmp_path, capsys):
    spec = tmp_path / "dataset.json"
    spec.write_text(json.dumps({"organs": ["Brain", "Lens-Lt"], "label": "{case}.nii.gz", "priority": ["Lens"]}))
    code, err = _run(capsys, "train", "--dataset", spec, "--output-dir", tmp_path / "run")
    assert code == 2 and "Lens" in err and "Lens-Lt" in err
    assert not (tmp_path / "run").exists()


def test_train_image_label_shape_mismatch(tmp_path, capsys):
    write_image(tmp_path / "images" / "a.nii.gz", Image(np.zeros((10, 10, 5), np.float32)))
    write_image(tmp_path / "labels" / "a.nii.gz", Image(np.zeros((10, 10, 6), np.uint8)))
    write_dataset_description(tmp_path / "dataset.json", organs=["Brain"], image="images/{case}.nii.gz",
                              label="labels/{case}.nii.gz")
    code, err = _run(capsys, "train", "--dataset", tmp_path / "dataset.json", "--output-dir", tmp_path / "run",
                     "--set", "val_cases=0")
    assert code == 2 and "shape" in err and "(10, 10, 5)" in err and "(10, 10, 6)" in err
    assert not (tmp_path / "run").exists()


def test_train_bad_settings(tmp_path, capsys):
    code, err = _run(capsys, "train", "--set", "lr=-1")
    assert code == 2 and "lr: expected a finite number > 0, got -1" in err
    code, err = _run(capsys, "train", "--set", "nonsense")
    assert code == 2 and "key=value" in err
    code, err = _run(capsys, "train", tmp_path / "missing.yaml")
    assert code == 2 and "missing.yaml" in err


def test_predict_errors(tmp_path, capsys):
    code, err = _run(capsys, "predict", tmp_path / "model.pt", tmp_path / "x.nii.gz", "-o", tmp_path / "out")
    assert code == 2 and "x.nii.gz" in err
    (tmp_path / "x.nii.gz").write_bytes(b"")
    code, err = _run(capsys, "predict", tmp_path / "model.pt", tmp_path / "x.nii.gz", "-o", tmp_path / "out")
    assert code == 2 and "model.pt" in err
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    code, err = _run(capsys, "predict", tmp_path / "model.pt", tmp_path / "x.nii.gz", "-o", tmp_path / "out")
    assert code == 2 and "could not read" in err and "model.pt" in err
    assert not (tmp_path / "out").exists()
