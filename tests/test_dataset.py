"""Dataset descriptions: loading (JSON, YAML), every validation error, case lists, label maps from overlapping
masks by priority (checked against a per-voxel brute force), multi-label stacks, geometry checks; and one case
of the real head-and-neck masks (../shared/data/tcia-han-oar, skipped when absent)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nrrd
import numpy as np
import pytest

from fastseg.data import (
    DatasetSpec,
    Image,
    check_geometry,
    label_map_to_masks,
    masks_to_label_map,
    read_image,
    write_dataset_description,
    write_image,
)

DATA = Path(os.environ.get("FASTSEG_DATA", Path(__file__).resolve().parents[2] / "shared/data/tcia-han-oar"))
TCIA_ORGANS = [
    "Brain", "Brainstem", "Cochlea-Lt", "Cochlea-Rt", "Lacrimal-Lt", "Lacrimal-Rt", "Lens-Lt", "Lens-Rt",
    "Lung-Lt", "Lung-Rt", "Mandible", "Optic-Nerve-Lt", "Optic-Nerve-Rt", "Orbit-Lt", "Orbit-Rt", "Parotid-Lt",
    "Parotid-Rt", "Spinal-Canal", "Spinal-Cord", "Submandibular-Lt", "Submandibular-Rt",
]

SHAPE = (12, 10, 8)
SPACING = (1.0, 1.2, 2.5)
ORGANS = ["Orbit-Lt", "Lens-Lt", "Spinal-Canal", "Spinal-Cord"]


def box(lo, hi, shape=SHAPE):
    m = np.zeros(shape, np.uint8)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return m


def case_masks(shift=0):
    """Lens inside Orbit, Spinal-Cord inside Spinal-Canal (as in real anatomy)."""
    return {
        "Orbit-Lt": box((1 + shift, 1, 1), (6 + shift, 6, 5)),
        "Lens-Lt": box((2 + shift, 2, 2), (4 + shift, 4, 3)),
        "Spinal-Canal": box((7, 2, 0), (11, 7, 8)),
        "Spinal-Cord": box((8, 3, 0), (10, 5, 8)),
    }


@pytest.fixture
def dataset(tmp_path):
    """Two cases with images (NIfTI) and per-organ masks (NRRD), no description yet."""
    rng = np.random.default_rng(0)
    for i, case in enumerate(["c01", "c02"]):
        geometry = dict(spacing=SPACING, origin=(-10.0, 5.0, 3.0 + i))
        (tmp_path / "images").mkdir(exist_ok=True)
        write_image(tmp_path / "images" / f"{case}.nii.gz",
                    Image(rng.normal(size=SHAPE).astype(np.float32), **geometry))
        folder = tmp_path / "masks" / case
        folder.mkdir(parents=True)
        for organ, m in case_masks(shift=i).items():
            write_image(folder / f"{organ}.nrrd", Image(m, **geometry))
    return tmp_path


def spec_dict(**changes):
    d = {"name": "toy", "modality": "CT", "organs": list(ORGANS), "image": "images/{case}.nii.gz",
         "masks": "masks/{case}/{organ}.nrrd"}
    d.update(changes)
    return {k: v for k, v in d.items() if v is not None}


def write_json(folder: Path, data, name="dataset.json") -> Path:
    (folder / name).write_text(json.dumps(data))
    return folder / name


# ------------------------------------------------------------------------------------------- loading


def test_json_and_yaml_load_the_same(dataset):
    yaml_text = """
name: toy
modality: CT
organs: [Orbit-Lt, Lens-Lt, Spinal-Canal, Spinal-Cord]
image: images/{case}.nii.gz
masks: masks/{case}/{organ}.nrrd
priority: [Spinal-Cord]
splits: {train: [c01], test: [c02]}
"""
    (dataset / "d.yaml").write_text(yaml_text)
    a = DatasetSpec.load(dataset / "d.yaml")
    b = DatasetSpec.load(write_json(dataset, spec_dict(priority=["Spinal-Cord"],
                                                       splits={"train": ["c01"], "test": ["c02"]})))
    for spec in (a, b):
        assert spec.name == "toy" and spec.modality == "CT"
        assert spec.organs == ORGANS
        assert spec.label_values == {o: i + 1 for i, o in enumerate(ORGANS)}
        assert spec.num_classes == 5
        assert spec.priority == ["Spinal-Cord"]
        assert spec.cases() == ["c01", "c02"] and spec.cases("test") == ["c02"]
    assert a.to_dict() == b.to_dict()


def test_organ_mapping_and_discovered_cases(dataset):
    spec = DatasetSpec.load(write_json(dataset, spec_dict(organs={"Orbit-Lt": 3, "Lens-Lt": 7,
                                                                  "Spinal-Canal": 1, "Spinal-Cord": 300})))
    assert spec.label_values == {"Orbit-Lt": 3, "Lens-Lt": 7, "Spinal-Canal": 1, "Spinal-Cord": 300}
    assert spec.cases() == ["c01", "c02"]  # globbed from the image pattern
    case = spec.load_case("c01")
    assert case.label.array.dtype == np.int16  # a label value >= 256
    assert set(np.unique(case.label.array)) == {0, 1, 3, 7, 300}
    # discovery from the masks pattern when there is no image
    spec = DatasetSpec.load(write_json(dataset, spec_dict(image=None)))
    assert spec.cases() == ["c01", "c02"] and spec.load_case("c02").image is None


def test_explicit_cases_and_split_errors(dataset):
    spec = DatasetSpec.load(write_json(dataset, spec_dict(cases=["c02"])))
    assert spec.cases() == ["c02"]
    with pytest.raises(ValueError, match="no splits"):
        spec.cases("train")
    with pytest.raises(ValueError, match="unknown case 'c01'; the cases are: c02"):
        spec.load_case("c01")
    spec = DatasetSpec.load(write_json(dataset, spec_dict(splits={"train": ["c01"]})))
    with pytest.raises(ValueError, match="unknown split 'val'; the splits are: train"):
        spec.cases("val")
    empty = DatasetSpec.load(write_json(dataset, spec_dict(image="nothing/{case}.nii.gz")))
    with pytest.raises(ValueError, match="no case found"):
        empty.cases()


INVALID = [
    (dict(colour="red"), r"unknown key\(s\) \['colour'\]; the known keys are"),
    (dict(label="labels/{case}.nii.gz"), "exactly one of 'label'.*got 'both'"),
    (dict(masks=None), "exactly one of 'label'.*got 'neither'"),
    (dict(organs=["Brain", "Lens", "Brain"]), "duplicate organ 'Brain'"),
    (dict(organs=[]), "at least one organ"),
    (dict(organs="Brain"), "a list of organ names or a mapping"),
    (dict(organs=["Brain", ""]), "non-empty strings"),
    (dict(organs={"Brain": 0}), r"organs\['Brain'\]: expected a label value"),
    (dict(organs={"Brain": -2}), "expected a label value"),
    (dict(organs={"Brain": 1.5}), "expected a label value"),
    (dict(organs={"Brain": True}), "expected a label value"),
    (dict(organs={"Brain": "1"}), "expected a label value"),
    (dict(organs={"Brain": 40000}), "expected a label value"),
    (dict(organs={"Brain": 2, "Lens": 2}), "label value 2 given to both 'Brain' and 'Lens'"),
    (dict(priority=["Lens-Lt", "Eye"]), r"priority: unknown organ name\(s\) \['Eye'\]; the known organs are: "
                                        "Orbit-Lt, Lens-Lt, Spinal-Canal, Spinal-Cord"),
    (dict(priority=["Lens-Lt", "Lens-Lt"]), "priority: duplicate organ"),
    (dict(priority="Lens-Lt"), "priority: expected a list of organ names"),
    (dict(cases=["c01"], splits={"test": ["c01", "c09"]}), r"splits\['test'\]: unknown case\(s\) \['c09'\]"),
    (dict(splits={"test": ["c01", "c01"]}), "duplicate case"),
    (dict(splits=["c01"]), "splits: expected a mapping"),
    (dict(cases=[1, 2]), "quote names"),
    (dict(cases=["a/b"]), "without '/'"),
    (dict(image="images/x.nii.gz"), r"image: expected a path pattern containing \{case\}"),
    (dict(masks="masks/{case}.nrrd"), r"masks: expected a path pattern containing \{case\} and \{organ\}"),
    (dict(image="images/{Case}.nii.gz"), r"image: expected placeholders \{case\} only"),
    (dict(image="images/{case:03d}.nii.gz"), "placeholders"),
    (dict(image="images/{case.nii.gz"), "path pattern"),
    (dict(image=3), "image: expected a path pattern string"),
    (dict(name=["x"]), "name: expected a string"),
]


@pytest.mark.parametrize("changes,match", INVALID)
def test_validation_errors(dataset, changes, match):
    path = write_json(dataset, spec_dict(**changes))
    with pytest.raises(ValueError, match=match) as info:
        DatasetSpec.load(path)
    assert "dataset description" in str(info.value) and "dataset.json" in str(info.value)


def test_missing_organs_and_bad_files(dataset):
    with pytest.raises(ValueError, match="organs: missing"):
        DatasetSpec.load(write_json(dataset, {k: v for k, v in spec_dict().items() if k != "organs"}))
    with pytest.raises(ValueError, match="top level: expected a mapping"):
        DatasetSpec.load(write_json(dataset, ["organs"]))
    (dataset / "bad.yaml").write_text("organs: [a, b\nimage: x")
    with pytest.raises(ValueError, match="bad.yaml.*not valid YAML"):
        DatasetSpec.load(dataset / "bad.yaml")
    (dataset / "bad.json").write_text("{organs: }")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        DatasetSpec.load(dataset / "bad.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        DatasetSpec.load(dataset / "none.yaml")
    with pytest.raises(ValueError, match="expected a .json, .yaml or .yml"):
        DatasetSpec.load(dataset / "images" / "c01.nii.gz")


def test_duplicate_mapping_keys_are_refused(dataset):
    """PyYAML and json keep the last of two equal keys silently, which would drop an organ."""
    (dataset / "d.yaml").write_text("organs: {Brain: 1, Lens: 2, Brain: 3}\nlabel: l/{case}.nii.gz\n")
    with pytest.raises(ValueError, match="duplicate key 'Brain'"):
        DatasetSpec.load(dataset / "d.yaml")
    (dataset / "d.json").write_text('{"organs": {"Brain": 1, "Brain": 2}, "label": "l/{case}.nii"}')
    with pytest.raises(ValueError, match="duplicate key 'Brain'"):
        DatasetSpec.load(dataset / "d.json")


def test_save_round_trip_from_another_folder(dataset, tmp_path_factory):
    spec = DatasetSpec.load(write_json(dataset, spec_dict(priority=["Lens-Lt"], splits={"a": ["c01", "c02"]})))
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    for name in ("copy.yaml", "copy.json"):
        spec.save(elsewhere / name)
        again = DatasetSpec.load(elsewhere / name)
        assert again.label_values == spec.label_values and again.splits == spec.splits
        assert again.priority == spec.priority
        np.testing.assert_array_equal(again.load_case("c01").label.array, spec.load_case("c01").label.array)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["copy.json", "copy.yaml"]  # no temp files left


def test_write_dataset_description(dataset):
    spec = write_dataset_description(dataset / "written.yaml", organs=ORGANS, masks="masks/{case}/{organ}.nrrd")
    assert DatasetSpec.load(dataset / "written.yaml").to_dict() == spec.to_dict()
    with pytest.raises(ValueError, match="unknown key"):
        write_dataset_description(dataset / "w.yaml", organs=ORGANS, label="l/{case}.nrrd", colour=1)
    assert not (dataset / "w.yaml").exists()


# ------------------------------------------------------------------------------------------- label maps


def brute_force_label_map(masks, label_values, priority):
    """Per voxel: among the organs containing it, the one first in (priority list, then voxel count, then
    organ order)."""
    priority = [p for p in (priority or []) if p in masks]
    order = list(label_values)

    def key(organ):
        if organ in priority:
            return (0, priority.index(organ), 0)
        return (1, int(np.count_nonzero(masks[organ])), order.index(organ))

    shape = next(iter(masks.values())).shape
    out = np.zeros(shape, np.int64)
    for idx in np.ndindex(*shape):
        inside = [o for o in masks if masks[o][idx]]
        if inside:
            out[idx] = label_values[min(inside, key=key)]
    return out


def test_small_organ_wins_overlap_without_priority():
    masks = case_masks()
    values = {o: i + 1 for i, o in enumerate(ORGANS)}
    lm = masks_to_label_map(masks, values)
    assert lm.dtype == np.uint8
    assert np.all(lm[masks["Lens-Lt"] == 1] == values["Lens-Lt"])  # Lens over Orbit
    assert np.all(lm[masks["Spinal-Cord"] == 1] == values["Spinal-Cord"])  # Spinal-Cord over Spinal-Canal
    assert np.count_nonzero(lm == values["Orbit-Lt"]) == masks["Orbit-Lt"].sum() - masks["Lens-Lt"].sum()
    np.testing.assert_array_equal(lm, brute_force_label_map(masks, values, None))


@pytest.mark.parametrize("seed", range(4))
def test_label_map_matches_brute_force_on_random_overlaps(seed):
    rng = np.random.default_rng(seed)
    shape = (9, 8, 7)
    organs = [f"o{i}" for i in range(6)]
    values = {o: int(v) for o, v in zip(organs, rng.permutation(np.arange(1, 40))[:6])}
    masks = {o: rng.random(shape) < rng.uniform(0.05, 0.5) for o in organs[:5]}  # o5 has no mask
    masks["o1"] = masks["o0"].copy()  # a tie in voxel count: organ order decides
    priority = list(rng.permutation(organs)[:3])
    for prio in (None, priority):
        np.testing.assert_array_equal(masks_to_label_map(masks, values, prio),
                                      brute_force_label_map(masks, values, prio))


def test_priority_overrides_size():
    masks = case_masks()
    values = {o: i + 1 for i, o in enumerate(ORGANS)}
    lm = masks_to_label_map(masks, values, priority=["Orbit-Lt"])
    assert not np.any(lm == values["Lens-Lt"])  # Orbit listed first now covers the Lens


def test_label_map_errors():
    values = {"Orbit-Lt": 1, "Lens-Lt": 2}
    with pytest.raises(ValueError, match=r"unknown organ name\(s\) \['Eye'\]; the known organs are: Orbit-Lt, "
                                         "Lens-Lt"):
        masks_to_label_map({"Eye": np.ones((2, 2))}, values)
    with pytest.raises(ValueError, match=r"priority: unknown organ name\(s\) \['Eye'\]"):
        masks_to_label_map({"Lens-Lt": np.ones((2, 2))}, values, priority=["Eye"])
    with pytest.raises(ValueError, match=r"masks\['Lens-Lt'\]: expected the shape of the first mask"):
        masks_to_label_map({"Orbit-Lt": np.ones((2, 2)), "Lens-Lt": np.ones((2, 3))}, values)
    with pytest.raises(ValueError, match="non-empty mapping"):
        masks_to_label_map({}, values)


def test_label_map_to_masks():
    rng = np.random.default_rng(1)
    values = {"a": 4, "b": 1, "c": 9}
    label = rng.choice([0, 1, 4, 9], size=(6, 5, 4)).astype(np.int16)
    out = label_map_to_masks(label, values)
    assert out.shape == (3, 6, 5, 4) and out.dtype == np.uint8
    for c, v in enumerate(values.values()):
        np.testing.assert_array_equal(out[c], (label == v).astype(np.uint8))
    np.testing.assert_array_equal(label_map_to_masks(np.asfortranarray(label), values), out)
    with pytest.raises(ValueError, match=r"label values \[5\] are not organs' label values"):
        label_map_to_masks(np.array([[0, 5]]), values)


# ------------------------------------------------------------------------------------------- load_case


def test_load_case_label_map_and_multilabel(dataset):
    spec = DatasetSpec.load(write_json(dataset, spec_dict()))
    case = spec.load_case("c02")
    assert case.name == "c02" and case.image.array.dtype == np.float32
    assert spec.image_path("c02") == dataset / "images" / "c02.nii.gz" and spec.image_pattern == spec.image
    masks = {o: nrrd.read(str(dataset / "masks" / "c02" / f"{o}.nrrd"), index_order="F")[0] for o in ORGANS}
    np.testing.assert_array_equal(case.label.array, brute_force_label_map(masks, spec.label_values, None))
    assert case.label.spacing == SPACING and case.label.origin == (-10.0, 5.0, 4.0)
    multi = spec.load_case("c02", multilabel=True)
    assert multi.label.array.shape == (4,) + SHAPE and multi.label.array.dtype == np.uint8
    assert multi.label.shape == SHAPE and multi.label.ndim == 3
    for c, organ in enumerate(ORGANS):
        np.testing.assert_array_equal(multi.label.array[c], masks[organ])
    np.testing.assert_array_equal(spec.load_label("c02").array, case.label.array)
    np.testing.assert_array_equal(spec.load_label("c02", multilabel=True).array, multi.label.array)
    with pytest.raises(ValueError, match="multilabel: expected True or False"):
        spec.load_case("c02", multilabel="yes")


def test_load_case_from_label_maps(dataset):
    (dataset / "labels").mkdir()
    values = {o: i + 1 for i, o in enumerate(ORGANS)}
    lm = masks_to_label_map(case_masks(), values)
    write_image(dataset / "labels" / "c01.nii.gz", Image(lm, spacing=SPACING))
    spec = DatasetSpec.load(write_json(dataset, spec_dict(masks=None, label="labels/{case}.nii.gz",
                                                          cases=["c01"])))
    case = spec.load_case("c01")
    np.testing.assert_array_equal(case.label.array, lm)
    assert case.label.array.dtype == np.uint8
    stack = spec.load_case("c01", multilabel=True).label.array
    np.testing.assert_array_equal(stack, label_map_to_masks(lm, values))
    # a value that is no organ's label
    write_image(dataset / "labels" / "c01.nii.gz", Image(lm * 2, spacing=SPACING))
    with pytest.raises(ValueError, match=r"c01.nii.gz.*label values \[6, 8\] are not organs' label values"):
        spec.load_case("c01")


def test_load_case_geometry_mismatches(dataset):
    spec = DatasetSpec.load(write_json(dataset, spec_dict()))
    folder = dataset / "masks" / "c01"
    good = read_image(folder / "Lens-Lt.nrrd")
    write_image(folder / "Lens-Lt.nrrd", Image(np.zeros((12, 10, 9), np.uint8), spacing=SPACING))
    with pytest.raises(ValueError, match=r"mask '.*Lens-Lt.nrrd' vs mask '.*Orbit-Lt.nrrd': shapes differ: "
                                         r"\(12, 10, 9\) vs \(12, 10, 8\)"):
        spec.load_case("c01")
    write_image(folder / "Lens-Lt.nrrd", good.with_array(good.array))
    write_image(folder / "Lens-Lt.nrrd", Image(good.array, spacing=(1.0, 1.2, 2.6)))
    with pytest.raises(ValueError, match=r"Lens-Lt.nrrd.*spacings differ.*\(1.0, 1.2, 2.6\) mm vs "
                                         r"\(1.0, 1.2, 2.5\) mm"):
        spec.load_case("c01")
    write_image(folder / "Lens-Lt.nrrd", good)
    write_image(dataset / "images" / "c01.nii.gz", Image(np.zeros((12, 10, 7), np.float32), spacing=SPACING))
    with pytest.raises(ValueError, match=r"label '.*Orbit-Lt.nrrd' vs image '.*c01.nii.gz': shapes differ"):
        spec.load_case("c01")


def test_load_case_bad_masks(dataset):
    spec = DatasetSpec.load(write_json(dataset, spec_dict()))
    os.remove(dataset / "masks" / "c01" / "Spinal-Cord.nrrd")
    with pytest.raises(FileNotFoundError, match="missing mask file.*Spinal-Cord.nrrd"):
        spec.load_case("c01")
    write_image(dataset / "masks" / "c01" / "Spinal-Cord.nrrd", Image(box((0, 0, 0), (2, 2, 2)) * 3,
                                                                      spacing=SPACING))
    spec.load_case("c01")  # 0 / 3 is a binary mask
    two = box((0, 0, 0), (2, 2, 2)) + box((0, 0, 0), (1, 1, 1))
    write_image(dataset / "masks" / "c01" / "Spinal-Cord.nrrd", Image(two, spacing=SPACING))
    with pytest.raises(ValueError, match="Spinal-Cord.nrrd.*expected a binary mask"):
        spec.load_case("c01")


def test_check_geometry_tolerance():
    ref = Image(np.zeros((4, 5, 6)), spacing=(1.0, 1.0, 2.5))
    check_geometry(ref, Image(np.zeros((4, 5, 6)), spacing=(1.0005, 1.0, 2.5)), what="a vs b")
    with pytest.raises(ValueError, match=r"^a vs b: spacings differ"):
        check_geometry(ref, Image(np.zeros((4, 5, 6)), spacing=(1.002, 1.0, 2.5)), what="a vs b")
    with pytest.raises(ValueError, match=r"^a vs b: shapes differ: \(4, 5\) vs \(4, 5, 6\)"):
        check_geometry(ref, Image(np.zeros((4, 5))), what="a vs b")
    # channel axes are not spatial
    check_geometry(ref, ref.with_array(np.zeros((3, 4, 5, 6))), what="stack")


# ------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (DATA / "validation" / "oncologist").is_dir(), reason=f"no data at {DATA}")
def test_real_case_lens_over_orbit(tmp_path):
    spec = write_dataset_description(
        tmp_path / "tcia.yaml", name="tcia-han-oar", organs=TCIA_ORGANS,
        masks=str(DATA / "validation" / "oncologist" / "{case}" / "segmentations" / "{organ}.nrrd"))
    assert len(spec.cases()) >= 1 and "0522c0014" in spec.cases()
    case = spec.load_case("0522c0014")
    lm = case.label.array
    assert case.image is None and len(spec.organs) == 21
    assert lm.dtype == np.uint8 and lm.shape[:2] == (512, 512)
    folder = DATA / "validation" / "oncologist" / "0522c0014" / "segmentations"
    header = nrrd.read_header(str(folder / "Brain.nrrd"))
    np.testing.assert_allclose(case.label.spacing, np.abs(np.diag(header["space directions"])))
    present = set(np.flatnonzero(np.bincount(lm.ravel(order="K"), minlength=22)).tolist())
    assert present == set(range(22))  # every organ keeps voxels
    v = spec.label_values
    for small, large in (("Lens-Lt", "Orbit-Lt"), ("Lens-Rt", "Orbit-Rt"), ("Spinal-Cord", "Spinal-Canal")):
        s = nrrd.read(str(folder / f"{small}.nrrd"), index_order="F")[0].astype(bool)
        big = nrrd.read(str(folder / f"{large}.nrrd"), index_order="F")[0].astype(bool)
        assert np.any(s & big)  # they do overlap
        assert np.all(lm[s] == v[small])  # and the small organ keeps all of its voxels
        assert np.all(lm[big & ~s] != 0)
