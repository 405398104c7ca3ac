"""The procedural head-and-neck phantom (fastseg.data.phantom): determinism, organ sizes against the real
masks (the counts quoted in the shared data's README, and the 7-scan medians when the data is present),
symmetry, nesting and priority (against fastseg.data.dataset.masks_to_label_map), spacing invariance,
image contrast, rendering real label maps, writing a dataset, argument errors.

Real data: ../shared/data/tcia-han-oar (or $FASTSEG_DATA); those tests skip without it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from fastseg.data.dataset import DatasetSpec, masks_to_label_map
from fastseg.data.io import read_image
from fastseg.data.phantom import ORGANS, PRIORITY, generate_case, generate_masks, render_image, write_phantom_dataset

DATA = Path(os.environ.get("FASTSEG_DATA", Path(__file__).resolve().parents[2] / "shared/data/tcia-han-oar"))
ONCOLOGIST = DATA / "validation" / "oncologist"
needs_data = pytest.mark.skipif(not ONCOLOGIST.is_dir(), reason=f"no shared data at {DATA}")

# Voxel counts measured on scan 0522c0014 (oncologist, 1.01 x 1.01 x 2.5 mm, 512 x 512 x 159), quoted in
# the shared data's README.
README_COUNTS = {
    "Brain": 578505, "Lung-Lt": 239885, "Mandible": 26891, "Spinal-Canal": 22089, "Brainstem": 11504,
    "Parotid-Rt": 7349, "Orbit-Lt": 2828, "Submandibular-Lt": 2500, "Lacrimal-Lt": 336, "Optic-Nerve-Lt": 278,
    "Lens-Lt": 62, "Cochlea-Lt": 24,
}
FULL = dict(spacing=(1.0, 1.0, 2.5), shape=(512, 512, 160))   # the real scans' grid (400 mm high)
COARSE = dict(spacing=(2.0, 2.0, 3.0))                          # the main job's grid, default field of view
LABEL_VALUES = {name: i + 1 for i, name in enumerate(ORGANS)}
PAIRS = sorted({name[:-3] for name in ORGANS if name.endswith("-Lt")})


@pytest.fixture(scope="module")
def full_masks():
    """Masks of seeds 0-2 on the real scans' grid."""
    return {seed: generate_masks(seed, **FULL) for seed in range(3)}


@pytest.fixture(scope="module")
def fine_masks():
    """Masks of seeds 0-2 at 1 x 1 x 2.5 mm in the default field of view (250 x 250 x 330 mm)."""
    return {seed: generate_masks(seed, spacing=(1.0, 1.0, 2.5)) for seed in range(3)}


@pytest.fixture(scope="module")
def coarse_cases():
    return {seed: generate_case(seed, **COARSE) for seed in range(2)}


def centroid_mm(mask, spacing):
    return np.argwhere(mask).mean(axis=0) * np.asarray(spacing)


# ------------------------------------------------------------------------------------------- constants


def test_organs_and_priority():
    assert len(ORGANS) == 21 and len(set(ORGANS)) == 21
    assert sorted(PRIORITY) == sorted(ORGANS)
    for small, large in (("Lens-Lt", "Orbit-Lt"), ("Lens-Rt", "Orbit-Rt"), ("Spinal-Cord", "Spinal-Canal"),
                         ("Cochlea-Lt", "Brain"), ("Optic-Nerve-Lt", "Orbit-Lt")):
        assert PRIORITY.index(small) < PRIORITY.index(large)
    if ONCOLOGIST.is_dir():
        for scan in ONCOLOGIST.iterdir():
            names = {p.name[: -len(".nrrd")] for p in (scan / "segmentations").glob("*.nrrd")}
            assert names == set(ORGANS), scan.name


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_case_other_seed_other_case(coarse_cases):
    image, label = coarse_cases[0]
    again_image, again_label = generate_case(0, **COARSE)
    np.testing.assert_array_equal(image.array, again_image.array)
    np.testing.assert_array_equal(label.array, again_label.array)
    assert image.spacing == again_image.spacing and image.origin == again_image.origin
    other_image, other_label = coarse_cases[1]
    assert not np.array_equal(label.array, other_label.array)
    assert not np.array_equal(image.array, other_image.array)
    masks = generate_masks(0, **COARSE)
    assert all(np.array_equal(masks[name], again_masks) for name, again_masks in generate_masks(0, **COARSE).items())


def test_case_geometry_and_types(coarse_cases):
    image, label = coarse_cases[0]
    assert image.array.dtype == np.float32 and label.array.dtype == np.uint8
    assert image.array.shape == label.array.shape == (125, 125, 110)   # 250 x 250 x 330 mm at 2 x 2 x 3
    assert np.isfinite(image.array).all()
    np.testing.assert_array_equal(image.direction, np.eye(3))
    assert image.spacing == label.spacing == (2.0, 2.0, 3.0)
    # centred in x and y; the top slice's upper face 85 mm above the brain's (model) centroid
    assert image.origin[0] == pytest.approx(-125.0 + 1.0) and image.origin[1] == pytest.approx(-125.0 + 1.0)
    assert image.origin[2] + 109 * 3.0 + 1.5 == pytest.approx(85.0)
    assert int(label.array.max()) <= len(ORGANS)
    # air in the corners, a body in the middle
    assert image.array[:3, :3].mean() < -900
    assert np.count_nonzero(image.array > -500) > 0.1 * image.array.size
    shaped, _ = generate_case(0, spacing=(2.0, 2.0, 3.0), shape=(64, 48, 40))
    assert shaped.array.shape == (64, 48, 40)


def test_every_organ_present_and_fov_decides_the_lungs(coarse_cases):
    for _, label in coarse_cases.values():
        present = set(np.unique(label.array)) - {0}
        assert present == set(LABEL_VALUES.values())
    # 200 mm from 2 cm above the vertex ends at the jaw: no lungs (documented)
    short = generate_masks(0, spacing=(2.0, 2.0, 3.0), field_of_view=(250.0, 250.0, 200.0))
    assert not short["Lung-Lt"].any() and not short["Lung-Rt"].any() and short["Brain"].any()


# ------------------------------------------------------------------------------------------- sizes


def test_voxel_counts_match_the_readme_scan(full_masks):
    """At 1 x 1 x 2.5 mm on a 400 mm high grid (the README scan's extent), the phantom's typical count
    (median over 3 seeds) is within a factor 1.5 of the real one, every seed within a factor 2."""
    for organ, real in README_COUNTS.items():
        counts = [int(masks[organ].sum()) for masks in full_masks.values()]
        typical = float(np.median(counts))
        assert 1 / 1.5 <= typical / real <= 1.5, (organ, counts, real)
        for count in counts:
            assert 1 / 2 <= count / real <= 2, (organ, counts, real)
    for masks in full_masks.values():
        assert all(masks[name].any() for name in ORGANS)


def _count_from(path: Path, first_slice) -> int:
    """Nonzero voxels of an NRRD mask in the slices from `first_slice` on (a function of the z spacing and
    the sizes). The shared masks are gzip-encoded uint8 in x-fastest order, so the slab is the tail of the
    stream: decoded in chunks, without holding the whole array (the big scans have 437 slices)."""
    import zlib

    import nrrd

    with open(path, "rb") as fh:
        header = nrrd.read_header(fh)
        nx, ny, _ = (int(v) for v in header["sizes"])
        start = first_slice(float(np.linalg.norm(header["space directions"][2]))) * nx * ny
        byte_mask = str(header.get("type")) in ("uchar", "unsigned char", "uint8", "uint8_t", "char", "int8")
        if header.get("encoding") not in ("gzip", "gz") or not byte_mask:
            array, _ = nrrd.read(str(path), index_order="F")
            return int(np.count_nonzero(array.reshape(-1, order="F")[start:]))
        inflate = zlib.decompressobj(47)   # gzip or zlib header
        seen = count = 0
        while chunk := fh.read(1 << 20):
            data = np.frombuffer(inflate.decompress(chunk), np.uint8)
            skip = min(max(start - seen, 0), data.size)
            count += int(np.count_nonzero(data[skip:]))
            seen += data.size
        return count


def _real_counts_above(z_rel: float):
    """Per organ, the voxel counts over the 7 oncologist scans of the voxels at most `z_rel` mm below the
    scan's brain centroid (lungs and spine are cut by each scan's bottom; this compares like with like).
    Two files at a time: zlib releases the GIL."""
    import nrrd
    from concurrent.futures import ThreadPoolExecutor

    counts = {name: [] for name in ORGANS}
    with ThreadPoolExecutor(2) as pool:
        for scan in sorted(ONCOLOGIST.iterdir()):
            brain, _ = nrrd.read(str(scan / "segmentations" / "Brain.nrrd"), index_order="F")
            z_brain = np.argwhere(brain > 0)[:, 2].mean()

            def first_slice(z_spacing, z_brain=z_brain):
                return max(0, int(np.ceil(z_brain + z_rel / z_spacing)))

            paths = [scan / "segmentations" / f"{name}.nrrd" for name in ORGANS]
            for name, n in zip(ORGANS, pool.map(lambda p: _count_from(p, first_slice), paths)):
                counts[name].append(n)
    return counts


@pytest.mark.slow
@needs_data
def test_voxel_counts_within_factor_two_of_the_real_medians(full_masks):
    pytest.importorskip("nrrd")
    real = _real_counts_above(-310.0)
    for masks in full_masks.values():
        z_brain = centroid_mm(masks["Brain"], FULL["spacing"])[2]
        lowest = int(np.ceil((z_brain - 310.0) / FULL["spacing"][2]))
        for name in ORGANS:
            present = [c for c in real[name] if c > 0]   # TCGA-CV-5977 has no submandibular outlines
            median = float(np.median(present))
            count = int(np.count_nonzero(masks[name][:, :, max(lowest, 0):]))
            assert 0.5 <= count / median <= 2.0, (name, count, median)


def test_physical_volume_does_not_depend_on_the_spacing(fine_masks):
    fine = fine_masks[2]
    coarse = generate_masks(2, spacing=(2.0, 2.0, 3.0))
    for name in ORGANS:
        v_fine, v_coarse = fine[name].sum() * 2.5, coarse[name].sum() * 12.0
        assert v_fine > 0 and v_coarse > 0, name
        # sampling a solid at voxel centres: the error is a surface effect, large for the few-voxel organs
        tolerance = 0.12 if v_fine > 5000 else 0.4 if v_fine > 500 else 0.7
        assert abs(v_coarse / v_fine - 1) <= tolerance, (name, v_fine, v_coarse)
    assert coarse["Brain"].shape == (125, 125, 110) and fine["Brain"].shape == (250, 250, 132)


def test_left_and_right_roughly_symmetric(fine_masks):
    spacing = (1.0, 1.0, 2.5)
    for masks in fine_masks.values():
        centre = centroid_mm(masks["Brain"], spacing)
        for pair in PAIRS:
            left, right = masks[f"{pair}-Lt"], masks[f"{pair}-Rt"]
            ratio = left.sum() / right.sum()
            # the field of view shows only the lungs' tops, whose volume grows fast with the apex height; a
            # cochlea has some 25 voxels over 2 or 3 slices (the real pairs differ by up to 1.7 times)
            limit = 2.0 if pair in ("Lung", "Cochlea") else 1.5
            assert 1 / limit <= ratio <= limit, (pair, left.sum(), right.sum())
            cl, cr = centroid_mm(left, spacing) - centre, centroid_mm(right, spacing) - centre
            assert cl[0] > 5 and cr[0] < -5, pair   # LPS: the left organ at +x
            # mirror images up to the head's pose (a 3 degree turn moves the eyes 4 mm sideways) and, for a
            # lung's top, the depth shown (its centroid moves outwards with it)
            tolerance = 20.0 if pair == "Lung" else 12.0
            assert abs(cl[0] + cr[0]) / 2 < tolerance, (pair, cl, cr)
            np.testing.assert_allclose(cl[1:], cr[1:], atol=tolerance, err_msg=pair)


# ------------------------------------------------------------------------------------------- overlaps


def test_nesting_and_priority(coarse_cases):
    masks = generate_masks(0, **COARSE)
    for inner, outer in (("Lens-Lt", "Orbit-Lt"), ("Lens-Rt", "Orbit-Rt"), ("Spinal-Cord", "Spinal-Canal")):
        assert masks[inner].any() and not (masks[inner] & ~masks[outer]).any(), inner
    nested = {("Lens-Lt", "Orbit-Lt"), ("Lens-Rt", "Orbit-Rt"), ("Spinal-Cord", "Spinal-Canal")}
    for i, a in enumerate(ORGANS):
        for b in ORGANS[i + 1:]:
            if (a, b) not in nested and (b, a) not in nested:
                assert not (masks[a] & masks[b]).any(), (a, b)
    # the case's label map is the dataset module's priority painting of the masks
    expected = masks_to_label_map(masks, LABEL_VALUES, list(PRIORITY))
    np.testing.assert_array_equal(coarse_cases[0][1].array, expected)


def test_anatomy_follows_the_real_layout(fine_masks):
    """Relative positions (mm, LPS, from the brain centroid): eyes in front, lungs low, spine behind."""
    spacing = (1.0, 1.0, 2.5)
    masks = fine_masks[0]
    c = {name: centroid_mm(masks[name], spacing) - centroid_mm(masks["Brain"], spacing) for name in ORGANS}
    assert c["Lens-Lt"][1] < c["Orbit-Lt"][1] < c["Optic-Nerve-Lt"][1] < c["Brainstem"][1]
    assert c["Lung-Lt"][2] < c["Submandibular-Lt"][2] < c["Mandible"][2] < c["Parotid-Lt"][2] < c["Cochlea-Lt"][2]
    assert c["Spinal-Canal"][1] > c["Mandible"][1] + 40
    assert c["Brain"][2] > c["Orbit-Lt"][2] > c["Parotid-Lt"][2]


# ------------------------------------------------------------------------------------------- image


def test_every_organ_contrasts_with_its_surroundings(coarse_cases):
    """Mean HU of each organ against what surrounds it, the median over its 2-voxel shell (dilation minus
    the organ; the median, so that a few voxels of a neighbouring bone do not decide), at the main job's
    spacing: a difference of at least 15 HU (about the noise sigma), so each organ can be learned."""
    for image, label in coarse_cases.values():
        a, lab = image.array, label.array
        mean = {}
        for name, value in LABEL_VALUES.items():
            organ = lab == value
            shell = ndimage.binary_dilation(organ, iterations=2) & ~organ
            mean[name] = a[organ].mean()
            assert abs(mean[name] - np.median(a[shell])) >= 15.0, (name, mean[name], np.median(a[shell]))
        assert mean["Lens-Lt"] > mean["Orbit-Lt"] + 40
        assert mean["Parotid-Lt"] < mean["Submandibular-Lt"] - 30
        assert mean["Mandible"] > 500 and mean["Lung-Lt"] < -600
        assert mean["Spinal-Cord"] > mean["Spinal-Canal"]


@needs_data
def test_render_image_on_a_real_label_map():
    names = ("Brain", "Brainstem", "Orbit-Lt", "Lens-Lt", "Mandible", "Parotid-Rt", "Spinal-Canal", "Spinal-Cord")
    folder = ONCOLOGIST / "0522c0014" / "segmentations"
    masks, spacing = {}, None
    for name in names:
        image = read_image(folder / f"{name}.nrrd")
        masks[name] = image.array[106:406, 106:406] > 0  # the head and neck: 300 x 300 mm in the middle
        spacing = image.spacing
    label = masks_to_label_map(masks, LABEL_VALUES, list(PRIORITY))
    rendered = render_image(label, spacing, seed=3)
    assert rendered.shape == label.shape and rendered.dtype == np.float32
    assert np.isfinite(rendered).all()
    mean = {name: rendered[label == LABEL_VALUES[name]].mean() for name in names}
    assert mean["Lens-Lt"] > mean["Orbit-Lt"] + 40 and mean["Mandible"] > 500
    assert rendered[label == 0].min() < -900   # air around the body
    # masks in, same image as their label map in
    np.testing.assert_array_equal(render_image(masks, spacing, seed=3), rendered)


def test_render_image_is_deterministic_and_seeded(coarse_cases):
    _, label = coarse_cases[0]
    a = render_image(label.array, label.spacing, seed=11)
    np.testing.assert_array_equal(a, render_image(label, label.spacing, seed=11))
    assert not np.array_equal(a, render_image(label.array, label.spacing, seed=12))
    # an organ the phantom does not know gets a soft-tissue value of its own
    toy = np.zeros((20, 20, 10), np.uint8)
    toy[5:15, 5:15, 3:7] = 1
    img = render_image(toy, (2.0, 2.0, 3.0), seed=0, organs=["Thyroid"])
    assert img.shape == toy.shape and np.isfinite(img).all()


# ------------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("file_format", ["nii.gz", "nrrd"])
def test_write_phantom_dataset(tmp_path, file_format):
    kw = dict(spacing=(4.0, 4.0, 6.0), field_of_view=(200.0, 200.0, 330.0))
    path = write_phantom_dataset(tmp_path / "ph", n_train=2, n_test=1, seed=7, file_format=file_format, **kw)
    assert path == tmp_path / "ph" / "dataset.json"
    description = json.loads(path.read_text())
    assert description["organs"] == list(ORGANS) and description["priority"] == list(PRIORITY)
    assert description["splits"] == {"train": ["phantom_000", "phantom_001"], "test": ["phantom_002"]}
    spec = DatasetSpec.load(path)
    assert spec.organs == list(ORGANS) and spec.cases("test") == ["phantom_002"]
    case = spec.load_case("phantom_001")
    image = read_image(tmp_path / "ph" / "images" / f"phantom_001.{file_format}")
    label = read_image(tmp_path / "ph" / "labels" / f"phantom_001.{file_format}")
    np.testing.assert_array_equal(case.label.array, label.array)
    assert image.array.dtype == np.int16 and label.array.dtype == np.uint8
    np.testing.assert_allclose(image.spacing, kw["spacing"])
    # the files hold the generator's case (image rounded to int16 HU), geometry included
    seed = int(np.random.SeedSequence([7, 1]).generate_state(1)[0] & 0x7FFFFFFF)
    expected_image, expected_label = generate_case(seed, **kw)
    np.testing.assert_array_equal(label.array, expected_label.array)
    np.testing.assert_array_equal(image.array, np.clip(np.rint(expected_image.array), -1024, 3071).astype(np.int16))
    np.testing.assert_allclose(image.origin, expected_image.origin, atol=1e-4)
    leftovers = [p.name for p in (tmp_path / "ph").rglob("*") if "tmp" in p.name]
    assert not leftovers


def test_write_phantom_dataset_checks_before_writing(tmp_path):
    root = tmp_path / "nothing"
    with pytest.raises(ValueError, match=r"write_phantom_dataset: file_format: expected one of"):
        write_phantom_dataset(root, n_train=1, n_test=0, file_format="png")
    with pytest.raises(ValueError, match=r"write_phantom_dataset: n_train \+ n_test: expected at least one"):
        write_phantom_dataset(root, n_train=0, n_test=0)
    with pytest.raises(ValueError, match=r"write_phantom_dataset: n_test: expected a non-negative integer"):
        write_phantom_dataset(root, n_train=1, n_test=-1)
    with pytest.raises(ValueError, match=r"write_phantom_dataset: spacing"):
        write_phantom_dataset(root, n_train=1, n_test=0, spacing=(1.0, 0.0, 1.0))
    assert not root.exists()


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=-1), r"generate_case: seed: expected a non-negative integer, got -1"),
    (dict(seed=1.5), r"generate_case: seed: expected a non-negative integer"),
    (dict(seed=True), r"generate_case: seed: expected a non-negative integer"),
    (dict(seed=0, spacing=(1.0, 1.0)), r"generate_case: spacing: expected 3 positive finite numbers"),
    (dict(seed=0, spacing=(1.0, -1.0, 2.0)), r"generate_case: spacing: expected 3 positive"),
    (dict(seed=0, shape=(10, 10, 0)), r"generate_case: shape: expected 3 positive integers"),
    (dict(seed=0, shape=(10, 10, 2.5)), r"generate_case: shape: expected 3 positive integers"),
    (dict(seed=0, field_of_view=(250.0, float("nan"), 200.0)), r"generate_case: field_of_view: expected 3"),
])
def test_generate_case_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_case(**kwargs)


def test_render_image_argument_errors():
    label = np.zeros((8, 8, 4), np.uint8)
    with pytest.raises(ValueError, match=r"render_image: label_or_masks: expected an integer label map"):
        render_image(label.astype(np.float32), (1.0, 1.0, 1.0), seed=0)
    with pytest.raises(ValueError, match=r"render_image: label_or_masks: expected a 3D label map"):
        render_image(label[0], (1.0, 1.0, 1.0), seed=0)
    with pytest.raises(ValueError, match=r"render_image: label_or_masks: expected label values 0..21"):
        render_image(label + 22, (1.0, 1.0, 1.0), seed=0)
    with pytest.raises(ValueError, match=r"render_image: label_or_masks: expected organ names from"):
        render_image({"Liver": label > 0}, (1.0, 1.0, 1.0), seed=0)
    with pytest.raises(ValueError, match=r"render_image: spacing: expected 3 positive"):
        render_image(label, (1.0, 1.0), seed=0)
    with pytest.raises(ValueError, match=r"render_image: seed: expected a non-negative integer"):
        render_image(label, (1.0, 1.0, 1.0), seed=-3)
    with pytest.raises(ValueError, match=r"render_image: organs: expected distinct"):
        render_image(label, (1.0, 1.0, 1.0), seed=0, organs=["A", "A"])
