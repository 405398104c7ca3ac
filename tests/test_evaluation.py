"""evaluate_folders on small synthetic label maps written to disk, against per-organ values computed directly
with fastseg.metrics.surface_metrics (on the in-memory arrays, as per-class masks) and a numpy Dice; the
summary against numpy statistics; the output files; the errors (missing predictions, geometry, labels)."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from fastseg.data import Image, masks_to_label_map, write_dataset_description, write_image
from fastseg.evaluation import evaluate_folders
from fastseg.metrics import surface_metrics

ORGANS = ["Brain", "Parotid-Lt", "Lens-Lt"]
SHAPE = (20, 18, 12)
SPACING = (1.0, 0.8, 2.5)
OUTPUTS = {"per_case.csv", "summary.csv", "summary.md", "results.json", "boxplots.png"}


def ball(center, radius, shape=SHAPE, spacing=SPACING):
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c * s) ** 2 for g, c, s in zip(grid, center, spacing)) <= radius ** 2


def make_case(rng, *, drop_pred=None, drop_both=None):
    """GT and prediction label maps; the prediction's organs are shifted / resized versions of the GT's."""
    gt = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    centres = {"Brain": (7, 9, 6), "Parotid-Lt": (15, 6, 5), "Lens-Lt": (15, 13, 8)}
    radii = {"Brain": 6.0, "Parotid-Lt": 3.5, "Lens-Lt": 2.0}
    for k, organ in enumerate(ORGANS, start=1):
        if organ == drop_both:
            continue
        c = np.array(centres[organ])
        gt[ball(c, radii[organ])] = k
        if organ != drop_pred:
            pred[ball(c + rng.integers(-1, 2, 3), radii[organ] * rng.uniform(0.8, 1.2))] = k
    return gt, pred


@pytest.fixture
def folders(tmp_path):
    """3 cases: c0 complete, c1 with Lens-Lt missing from the prediction, c2 without Parotid-Lt at all."""
    rng = np.random.default_rng(0)
    cases = {"c0": make_case(rng), "c1": make_case(rng, drop_pred="Lens-Lt"),
             "c2": make_case(rng, drop_both="Parotid-Lt")}
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    suffixes = {"c0": ".nii.gz", "c1": ".nrrd", "c2": ".nii"}
    geometry = dict(spacing=SPACING, origin=(3.0, -2.0, 1.0))
    for case, (gt, pred) in cases.items():
        write_image(tmp_path / "gt" / f"{case}{suffixes[case]}", Image(gt, **geometry))
        write_image(tmp_path / "pred" / f"{case}.nrrd", Image(pred, **geometry))
    return tmp_path, cases


def expected_rows(cases, organs=ORGANS, values=None, tolerance=2.0, percentile=95):
    """Per (case, organ): surface_metrics on one-hot channel masks of the in-memory arrays (not the label-map
    path evaluate_folders takes), and Dice from numpy."""
    values = values or {o: i + 1 for i, o in enumerate(organs)}
    rows = {}
    for case, (gt, pred) in cases.items():
        g = np.stack([gt == values[o] for o in organs])[None]
        p = np.stack([pred == values[o] for o in organs])[None]
        m = surface_metrics(torch.from_numpy(p), torch.from_numpy(g), spacing=SPACING, percentile=percentile,
                            tolerance=tolerance, include_background=True)
        for k, organ in enumerate(organs):
            inter, total = np.logical_and(p[0, k], g[0, k]).sum(), p[0, k].sum() + g[0, k].sum()
            rows[case, organ] = {
                "dice": 2 * inter / total if total else math.nan,
                "hd95": float(m["hd_percentile"][0, k]),
                "assd": float(m["assd"][0, k]),
                "nsd": float(m["nsd"][0, k]),
                "gt_voxels": int(g[0, k].sum()),
                "pred_voxels": int(p[0, k].sum()),
            }
    return rows


def close(a, b):
    if math.isnan(b):
        return math.isnan(a)
    if math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


def check_rows(result_rows, expected):
    assert len(result_rows) == len(expected)
    for row in result_rows:
        want = expected[row["case"], row["organ"]]
        for key, value in want.items():
            assert close(float(row[key]), value), (row["case"], row["organ"], key, row[key], value)


def test_per_case_values_and_summary(folders):
    root, cases = folders
    result = evaluate_folders(root / "pred", root / "gt", organs=ORGANS, out_dir=root / "out")
    expected = expected_rows(cases)
    check_rows(result.per_case, expected)
    # the empty-mask cases are what the fixture built
    assert math.isinf(expected["c1", "Lens-Lt"]["hd95"]) and expected["c1", "Lens-Lt"]["dice"] == 0
    assert math.isnan(expected["c2", "Parotid-Lt"]["dice"])
    for organ in ORGANS:
        s = result.summary[organ]
        mine = [expected[c, organ] for c in cases]
        present = [r for r in mine if not math.isnan(r["dice"])]
        assert s["n"] == len(present) and s["n_absent"] == len(mine) - len(present)
        assert s["n_inf"] == sum(math.isinf(r["hd95"]) for r in present)
        for key in ("dice", "hd95", "assd", "nsd"):
            vals = np.array([r[key] for r in present if math.isfinite(r[key])])
            for stat, fn in (("mean", np.mean), ("median", np.median), ("std", np.std)):
                assert close(s[f"{key}_{stat}"], float(fn(vals))), (organ, key, stat)
    assert result.summary["Lens-Lt"]["n_inf"] == 1 and result.summary["Parotid-Lt"]["n_absent"] == 1


def test_output_files_parse(folders):
    root, cases = folders
    result = evaluate_folders(root / "pred", root / "gt", organs=ORGANS, out_dir=root / "out")
    out = root / "out"
    assert {p.name for p in out.iterdir()} == OUTPUTS  # and no temp file left
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", "organ", "dice", "hd95", "assd", "nsd", "gt_voxels", "pred_voxels"]
    check_rows(rows, expected_rows(cases))
    with open(out / "summary.csv") as f:
        summary = {r["organ"]: r for r in csv.DictReader(f)}
    assert list(summary) == ORGANS
    for organ in ORGANS:
        for key, value in result.summary[organ].items():
            assert close(float(summary[organ][key]), float(value))

    def strict(token):
        raise ValueError(f"non-standard JSON constant {token}")

    data = json.loads((out / "results.json").read_text(), parse_constant=strict)
    assert data["organs"] == {o: i + 1 for i, o in enumerate(ORGANS)}
    assert data["settings"]["tolerance"] == 2.0 and data["settings"]["convention"] == "monai"
    lens_c1 = next(r for r in data["per_case"] if r["case"] == "c1" and r["organ"] == "Lens-Lt")
    assert lens_c1["hd95"] is None and lens_c1["dice"] == 0.0  # inf -> null
    md = (out / "summary.md").read_text()
    assert result.markdown() in md
    png = (out / "boxplots.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(out / "boxplots.png")).ndim == 3


def test_markdown_table(folders):
    root, _ = folders
    result = evaluate_folders(root / "pred", root / "gt", organs=ORGANS, tolerance=1.5)
    lines = result.markdown().strip().splitlines()
    assert "Dice mean ± std" in lines[0] and "HD95 (mm) mean / median" in lines[0]
    assert "ASSD" in lines[0] and "NSD@1.5 mm" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ORGANS
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    s = result.summary["Brain"]
    assert f"{s['dice_mean']:.3f} ± {s['dice_std']:.3f}" in lines[2]


def test_options_reach_the_metrics(folders):
    root, cases = folders
    result = evaluate_folders(root / "pred", root / "gt", organs=ORGANS, tolerance=1.0, percentile=90,
                              convention="deepmind")
    assert "hd90" in result.per_case[0] and "hd95" not in result.per_case[0]
    for row in result.per_case:
        gt, pred = cases[row["case"]]
        k = ORGANS.index(row["organ"]) + 1
        m = surface_metrics(torch.from_numpy((pred == k)[None, None]), torch.from_numpy((gt == k)[None, None]),
                            spacing=SPACING, percentile=90, tolerance=1.0, convention="deepmind",
                            include_background=True)
        assert close(row["hd90"], float(m["hd_percentile"][0, 0]))
        assert close(row["nsd"], float(m["nsd"][0, 0]))


def test_organ_mapping_and_dataset_json(folders):
    root, cases = folders
    # label values other than 1..K: relabel the files, evaluate through a mapping
    values = {"Brain": 5, "Parotid-Lt": 2, "Lens-Lt": 9}
    lut = np.array([0, 5, 2, 9], np.uint8)
    for sub in ("gt2", "pred2"):
        (root / sub).mkdir()
    relabelled = {c: (lut[g], lut[p]) for c, (g, p) in cases.items()}
    for case, (gt, pred) in relabelled.items():
        write_image(root / "gt2" / f"{case}.nii.gz", Image(gt, spacing=SPACING))
        write_image(root / "pred2" / f"{case}.nii.gz", Image(pred, spacing=SPACING))
    result = evaluate_folders(root / "pred2", root / "gt2", organs=values)
    check_rows(result.per_case, expected_rows(relabelled, values=values))
    # the organs from a dataset.json in gt_dir
    with pytest.raises(ValueError, match="organs: expected organ names"):
        evaluate_folders(root / "pred2", root / "gt2")
    write_dataset_description(root / "gt2" / "dataset.json", organs=values, label="{case}.nii.gz")
    again = evaluate_folders(root / "pred2", root / "gt2")
    assert again.organs == values
    check_rows(again.per_case, expected_rows(relabelled, values=values))
    # a subset of the organs: the others count as background
    sub = evaluate_folders(root / "pred2", root / "gt2", organs={"Lens-Lt": 9})
    assert [r["organ"] for r in sub.per_case] == ["Lens-Lt"] * 3
    check_rows(sub.per_case, {k: v for k, v in expected_rows(relabelled, values=values).items()
                              if k[1] == "Lens-Lt"})


def test_ground_truth_from_a_dataset_description(tmp_path):
    """GT from per-organ masks through the description's priority (Lens over Orbit)."""
    orbit = ball((6, 6, 4), 4.0, shape=(12, 12, 8), spacing=(1.0, 1.0, 2.0))
    lens = ball((5, 6, 4), 1.5, shape=(12, 12, 8), spacing=(1.0, 1.0, 2.0))
    for case, (o, l) in {"a": (orbit, lens), "b": (np.roll(orbit, 1, 0), np.roll(lens, 1, 0))}.items():
        (tmp_path / "m" / case).mkdir(parents=True)
        write_image(tmp_path / "m" / case / "Orbit.nrrd", Image(o.astype(np.uint8), spacing=(1.0, 1.0, 2.0)))
        write_image(tmp_path / "m" / case / "Lens.nrrd", Image(l.astype(np.uint8), spacing=(1.0, 1.0, 2.0)))
    spec = write_dataset_description(tmp_path / "d.yaml", organs=["Orbit", "Lens"], masks="m/{case}/{organ}.nrrd",
                                     splits={"train": ["a"], "test": ["b"]})
    (tmp_path / "pred").mkdir()
    gt_b = masks_to_label_map({"Orbit": np.roll(orbit, 1, 0), "Lens": np.roll(lens, 1, 0)}, spec.label_values)
    pred_b = np.where(gt_b == 2, 1, gt_b).astype(np.uint8)  # the Lens predicted as Orbit
    write_image(tmp_path / "pred" / "b.nii.gz", Image(pred_b, spacing=(1.0, 1.0, 2.0)))
    result = evaluate_folders(tmp_path / "pred", tmp_path / "d.yaml", split="test")
    rows = {r["organ"]: r for r in result.per_case}
    assert rows["Lens"]["gt_voxels"] == lens.sum() and rows["Lens"]["pred_voxels"] == 0
    assert rows["Lens"]["dice"] == 0 and math.isinf(rows["Lens"]["hd95"])
    assert rows["Orbit"]["gt_voxels"] == orbit.sum() - lens.sum()
    with pytest.raises(ValueError, match=r"no prediction for 1 of 2 ground-truth case\(s\).*\['a'\]"):
        evaluate_folders(tmp_path / "pred", tmp_path / "d.yaml")
    only_lens = evaluate_folders(tmp_path / "pred", tmp_path / "d.yaml", split="test", organs=["Lens"])
    assert [r["organ"] for r in only_lens.per_case] == ["Lens"]
    with pytest.raises(ValueError, match="unknown organ 'Eye'; the organs of .* are: Orbit, Lens"):
        evaluate_folders(tmp_path / "pred", tmp_path / "d.yaml", split="test", organs=["Eye"])
    with pytest.raises(ValueError, match="has label value 1 but 2"):
        evaluate_folders(tmp_path / "pred", tmp_path / "d.yaml", split="test", organs={"Lens": 1})


# ------------------------------------------------------------------------------------------- errors


def test_missing_predictions_are_listed_and_nothing_is_written(folders):
    root, _ = folders
    (root / "pred" / "c1.nrrd").unlink()
    (root / "pred" / "c2.nrrd").unlink()
    with pytest.raises(ValueError, match=r"no prediction for 2 of 3 ground-truth case\(s\) in '.*pred': "
                                         r"\['c1', 'c2'\]"):
        evaluate_folders(root / "pred", root / "gt", organs=ORGANS, out_dir=root / "out")
    assert not (root / "out").exists()


def test_geometry_mismatch_names_both_files(folders):
    root, cases = folders
    write_image(root / "pred" / "c1.nrrd", Image(cases["c1"][1], spacing=(1.0, 0.8, 3.0)))
    with pytest.raises(ValueError, match=r"case 'c1': prediction '.*c1.nrrd' vs ground truth '.*c1.nrrd': "
                                         r"spacings differ"):
        evaluate_folders(root / "pred", root / "gt", organs=ORGANS, out_dir=root / "out")
    write_image(root / "pred" / "c1.nrrd", Image(cases["c1"][1][:, :, :10], spacing=SPACING))
    with pytest.raises(ValueError, match=r"shapes differ: \(20, 18, 10\) vs \(20, 18, 12\)"):
        evaluate_folders(root / "pred", root / "gt", organs=ORGANS, out_dir=root / "out")
    assert not (root / "out").exists()


def test_bad_labels_and_arguments(folders):
    root, cases = folders
    write_image(root / "pred" / "c0.nrrd", Image(cases["c0"][1] * 2, spacing=SPACING))
    with pytest.raises(ValueError, match=r"prediction '.*c0.nrrd': label values \[4, 6\] are not organs'"):
        evaluate_folders(root / "pred", root / "gt", organs=ORGANS)
    with pytest.raises(FileNotFoundError, match="pred_dir: no such folder"):
        evaluate_folders(root / "nope", root / "gt", organs=ORGANS)
    with pytest.raises(FileNotFoundError, match="gt_dir"):
        evaluate_folders(root / "pred", root / "nope", organs=ORGANS)
    with pytest.raises(ValueError, match="duplicate organ"):
        evaluate_folders(root / "pred", root / "gt", organs=["Brain", "Brain"])
    with pytest.raises(ValueError, match="tolerance: expected a finite number >= 0"):
        evaluate_folders(root / "pred", root / "gt", organs=ORGANS, tolerance=-1)
    with pytest.raises(ValueError, match="convention: expected 'monai' or 'deepmind'"):
        evaluate_folders(root / "pred", root / "gt", organs=ORGANS, convention="itk")
    with pytest.raises(ValueError, match="percentile"):
        evaluate_folders(root / "pred", root / "gt", organs=ORGANS, percentile=101)
    (root / "gt" / "c0.nii").write_bytes(b"")
    with pytest.raises(ValueError, match="two files for case 'c0'"):
        evaluate_folders(root / "pred", root / "gt", organs=ORGANS)
