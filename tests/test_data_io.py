"""NIfTI / NRRD reading and writing: arrays, dtypes and LPS geometry survive round trips, checked against
nibabel's affine and pynrrd's header read independently; corrupt, missing and unsupported files give clear
errors; failed writes leave nothing behind."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from fastseg.data import Image, ImageFormatError, atomic_output, case_name, read_image, write_image

RAS = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS: the first two world axes change sign


def rotation(nd: int, seed: int, proper: bool = True) -> np.ndarray:
    """A random orthonormal matrix (det +1, or -1 when not proper)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(nd, nd)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) > 0) != proper:
        q[:, 0] = -q[:, 0]
    return q


def sample_image(nd: int, dtype, seed: int = 0, proper: bool = True) -> Image:
    rng = np.random.default_rng(seed)
    shape = (7, 6, 5)[:nd]
    if np.dtype(dtype).kind == "f":
        array = rng.normal(size=shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape, endpoint=True).astype(dtype)
    spacing = (0.7, 1.3, 2.5)[:nd]
    origin = (-100.5, 20.25, 33.0)[:nd]
    return Image(array, spacing, origin, rotation(nd, seed + 1, proper))


def lps_points(image: Image, index: np.ndarray) -> np.ndarray:
    """World LPS position of each row of ``index`` from the Image's own fields (the definition)."""
    return np.asarray(image.origin) + (image.direction @ (np.asarray(image.spacing) * index).T).T


def some_indices(shape, n=6, seed=3):
    return np.random.default_rng(seed).integers(0, shape, size=(n, len(shape))).astype(np.float64)


def assert_same_geometry(a: Image, b: Image, atol=1e-4):
    assert a.ndim == b.ndim
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=1e-6)
    np.testing.assert_allclose(a.origin, b.origin, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-6)


# ------------------------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.int32])
@pytest.mark.parametrize("proper", [True, False])
def test_nifti_round_trip_3d(tmp_path, suffix, dtype, proper):
    image = sample_image(3, dtype, proper=proper)
    path = write_image(tmp_path / f"img{suffix}", image)
    back = read_image(path)
    assert back.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.array, image.array)
    assert_same_geometry(back, image)
    # independently: nibabel's RAS affine maps an index to the LPS point of the definition, y and x negated
    nii = nib.load(str(path))
    idx = some_indices(image.shape)
    np.testing.assert_allclose(nib.affines.apply_affine(nii.affine, idx), lps_points(image, idx) * RAS, atol=1e-4)
    assert nii.header.get_data_dtype() == np.dtype(dtype)
    assert nii.header.get_xyzt_units()[0] == "mm"
    # qform and sform agree, for readers preferring either
    np.testing.assert_allclose(nii.header.get_qform(), nii.header.get_sform(), atol=1e-4)


def test_nifti_round_trip_2d(tmp_path):
    image = sample_image(2, np.int16)
    back = read_image(write_image(tmp_path / "slice.nii.gz", image))
    assert back.ndim == 2 and back.array.shape == image.array.shape
    np.testing.assert_array_equal(back.array, image.array)
    assert_same_geometry(back, image)
    aff = nib.load(str(tmp_path / "slice.nii.gz")).affine
    idx = some_indices(image.shape)
    world = nib.affines.apply_affine(aff, np.c_[idx, np.zeros(len(idx))])
    np.testing.assert_allclose(world[:, :2], lps_points(image, idx) * RAS[:2], atol=1e-4)
    np.testing.assert_allclose(world[:, 2], 0.0, atol=1e-6)


def test_reads_nifti_written_by_nibabel(tmp_path):
    """Geometry of a file fastseg did not write: every index maps to the same point as nibabel says."""
    rot = rotation(3, 7)
    ras_affine = np.eye(4)
    ras_affine[:3, :3] = rot * np.array([0.9, 1.1, 3.0])
    ras_affine[:3, 3] = [12.0, -40.0, 7.5]
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(data, ras_affine), str(tmp_path / "x.nii.gz"))
    img = read_image(tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(img.array, data)
    np.testing.assert_allclose(img.spacing, [0.9, 1.1, 3.0], rtol=1e-6)
    idx = some_indices(data.shape)
    np.testing.assert_allclose(lps_points(img, idx), nib.affines.apply_affine(ras_affine, idx) * RAS, atol=1e-4)


def test_nifti_trailing_singleton_axis_is_dropped(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((3, 4, 5, 1), np.uint8), np.eye(4)), str(tmp_path / "x.nii"))
    assert read_image(tmp_path / "x.nii").array.shape == (3, 4, 5)


def test_big_endian_nifti_reads_in_native_order(tmp_path):
    data = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_data_dtype(">i2")
    nib.save(img, str(tmp_path / "be.nii"))
    back = read_image(tmp_path / "be.nii")
    assert back.array.dtype == np.dtype("int16") and back.array.dtype.isnative
    np.testing.assert_array_equal(back.array, data)


# ------------------------------------------------------------------------------------------- NRRD


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
@pytest.mark.parametrize("compress", [True, False])
def test_nrrd_round_trip_3d(tmp_path, dtype, compress):
    image = sample_image(3, dtype, seed=5)
    path = write_image(tmp_path / "img.nrrd", image, compress=compress)
    back = read_image(path)
    assert back.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.array, image.array)
    assert_same_geometry(back, image, atol=1e-9)
    header = nrrd.read_header(str(path))
    assert header["space"] == "left-posterior-superior"
    assert header["encoding"] == ("gzip" if compress else "raw")
    # pynrrd: one row of 'space directions' per array axis
    np.testing.assert_allclose(header["space directions"], (image.direction * np.asarray(image.spacing)).T)
    np.testing.assert_allclose(header["space origin"], image.origin)
    data, _ = nrrd.read(str(path), index_order="F")
    np.testing.assert_array_equal(data, image.array)


def test_nrrd_round_trip_2d(tmp_path):
    image = sample_image(2, np.float32, seed=9)
    path = write_image(tmp_path / "slice.nrrd", image)
    back = read_image(path)
    np.testing.assert_array_equal(back.array, image.array)
    assert_same_geometry(back, image, atol=1e-9)
    header = nrrd.read_header(str(path))
    assert header["dimension"] == 2 and header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(np.asarray(header["space directions"])[:, :2],
                               (image.direction * np.asarray(image.spacing)).T)


@pytest.mark.parametrize("space,signs", [("right-anterior-superior", (-1, -1, 1)), ("RAS", (-1, -1, 1)),
                                         ("left-anterior-superior", (1, -1, 1)), ("left-posterior-superior",
                                                                                  (1, 1, 1))])
def test_nrrd_other_spaces_convert_to_lps(tmp_path, space, signs):
    steps = rotation(3, 11) * np.array([0.8, 0.9, 2.0])  # columns: world step of each axis, in `space`
    origin = np.array([5.0, -6.0, 7.0])
    data = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    header = {"space": space, "space directions": steps.T, "space origin": origin, "kinds": ["domain"] * 3}
    nrrd.write(str(tmp_path / "x.nrrd"), data, header, index_order="F")
    img = read_image(tmp_path / "x.nrrd")
    np.testing.assert_array_equal(img.array, data)
    idx = some_indices(data.shape)
    in_space = origin + (steps @ idx.T).T
    np.testing.assert_allclose(lps_points(img, idx), in_space * np.asarray(signs), atol=1e-9)


def test_nrrd_without_space_uses_spacings(tmp_path):
    nrrd.write(str(tmp_path / "x.nrrd"), np.zeros((3, 4, 5), np.int16), {"spacings": [0.5, 0.6, 3.0]},
               index_order="F")
    img = read_image(tmp_path / "x.nrrd")
    assert img.spacing == (0.5, 0.6, 3.0) and img.origin == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(img.direction, np.eye(3))


def test_nifti_to_nrrd_to_nifti_keeps_geometry(tmp_path):
    image = sample_image(3, np.int16, seed=21, proper=False)
    write_image(tmp_path / "a.nii.gz", image)
    write_image(tmp_path / "b.nrrd", read_image(tmp_path / "a.nii.gz"))
    write_image(tmp_path / "c.nii.gz", read_image(tmp_path / "b.nrrd"))
    a, c = nib.load(str(tmp_path / "a.nii.gz")), nib.load(str(tmp_path / "c.nii.gz"))
    np.testing.assert_allclose(c.affine, a.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(c.dataobj), image.array)
    # the NRRD header and nibabel's affine describe one voxel-to-world map
    header = nrrd.read_header(str(tmp_path / "b.nrrd"))
    idx = some_indices(image.shape)
    lps_nrrd = np.asarray(header["space origin"]) + idx @ np.asarray(header["space directions"])
    np.testing.assert_allclose(lps_nrrd, nib.affines.apply_affine(a.affine, idx) * RAS, atol=1e-4)


def test_bool_is_written_as_uint8(tmp_path):
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, 1:3] = True
    for suffix in (".nii.gz", ".nrrd"):
        back = read_image(write_image(tmp_path / f"m{suffix}", Image(mask)))
        assert back.array.dtype == np.uint8
        np.testing.assert_array_equal(back.array, mask)


# ------------------------------------------------------------------------------------------- Image


def test_image_defaults_with_array_and_channels():
    img = Image(np.zeros((4, 5, 6), np.float32), spacing=(1, 2, 3), origin=(4, 5, 6))
    assert img.ndim == 3 and img.shape == (4, 5, 6)
    np.testing.assert_array_equal(img.direction, np.eye(3))
    stack = img.with_array(np.zeros((2, 4, 5, 6), np.uint8))
    assert stack.ndim == 3 and stack.shape == (4, 5, 6) and stack.spacing == (1.0, 2.0, 3.0)
    assert stack.origin == img.origin and stack.direction is not img.direction
    np.testing.assert_allclose(img.affine[:3, 3], [4, 5, 6])
    assert Image(np.zeros((3, 4))).ndim == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(array=np.zeros(5)), "2 or 3 spatial axes"),
    (dict(array=np.zeros((2,) * 5)), "2 or 3 spatial axes"),
    (dict(array=np.zeros((2, 2, 2, 2, 2)), spacing=(1, 1, 1)), "array: expected 3 spatial axes"),
    (dict(array=np.zeros((2, 2, 2)), spacing=(1, 0, 1)), "spacing: expected 3 finite numbers > 0"),
    (dict(array=np.zeros((2, 2, 2)), origin=(1, 2)), "origin"),
    (dict(array=np.zeros((2, 2, 2)), direction=np.eye(3) * 2), "unit columns"),
    (dict(array=np.zeros((2, 2, 2)), direction=np.eye(2)), r"finite \(3, 3\) matrix"),
])
def test_image_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Image(**kwargs)


def test_write_refuses_channel_stack_and_object_arrays(tmp_path):
    with pytest.raises(ValueError, match="without a channel axis"):
        write_image(tmp_path / "x.nii.gz", Image(np.zeros((2, 3, 4, 5)), spacing=(1, 1, 1)))
    with pytest.raises(ValueError, match="integer or floating-point"):
        write_image(tmp_path / "x.nrrd", Image(np.zeros((3, 4, 5), dtype=complex)))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- errors


def test_case_name_strips_the_image_suffix():
    assert case_name("data/case01.nii.gz") == "case01"
    assert case_name(Path("a.b.nii")) == "a.b"
    assert case_name("X.NRRD") == "X"
    assert case_name("notes.txt") is None and case_name(".nii.gz") is None


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file.*nothere.nii.gz"):
        read_image(tmp_path / "nothere.nii.gz")
    with pytest.raises(ValueError, match=r"read_image: path: expected a .nii, .nii.gz or .nrrd file.*x.png"):
        read_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match="write_image: path: expected"):
        write_image(tmp_path / "x.mha", Image(np.zeros((2, 2, 2))))
    (tmp_path / "d.nii").mkdir()
    with pytest.raises(ValueError, match="not a file"):
        read_image(tmp_path / "d.nii")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_truncated_file_is_an_image_format_error(tmp_path, suffix):
    path = write_image(tmp_path / f"img{suffix}", sample_image(3, np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageFormatError, match=f"cannot read '.*img{suffix.replace('.', '[.]')}'"):
        read_image(path)


@pytest.mark.parametrize("name,content", [
    ("garbage.nrrd", b"this is not an nrrd file\n\x00\x01\x02"),
    ("garbage.nii", b"\x00" * 10),
    ("garbage.nii.gz", b"not gzip at all"),
    ("badgz.nii.gz", gzip.compress(b"\x00" * 100)),
])
def test_garbage_file_is_an_image_format_error(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageFormatError, match=name.replace(".", "[.]")) as info:
        read_image(tmp_path / name)
    assert isinstance(info.value, ValueError)


def test_unsupported_ndim_file(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 4, 5), np.float32), np.eye(4)), str(tmp_path / "t.nii.gz"))
    with pytest.raises(ImageFormatError, match=r"expected a 2D or 3D image.*\(2, 3, 4, 5\)"):
        read_image(tmp_path / "t.nii.gz")
    nrrd.write(str(tmp_path / "v.nrrd"), np.zeros((2, 3, 4), np.float32),
               {"space": "left-posterior-superior", "kinds": ["vector", "domain", "domain"],
                "space directions": np.array([[np.nan] * 2, [1.0, 0.0], [0.0, 1.0]])}, index_order="F")
    with pytest.raises(ImageFormatError, match="every axis must be spatial"):
        read_image(tmp_path / "v.nrrd")


# ------------------------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("suffix,module,attr", [(".nii.gz", nib, "save"), (".nrrd", nrrd, "write")])
def test_failing_write_leaves_nothing(tmp_path, monkeypatch, suffix, module, attr):
    real = getattr(module, attr)
    seen = []

    def partial_then_fail(*args, **kwargs):
        filename = next(a for a in args if isinstance(a, (str, Path)))  # nib.save(img, f), nrrd.write(f, ...)
        seen.append(Path(filename))
        assert Path(filename).parent == tmp_path and str(filename).endswith(suffix)
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(module, attr, partial_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_image(tmp_path / f"out{suffix}", sample_image(3, np.uint8))
    assert seen and list(tmp_path.iterdir()) == []
    # an existing file is left untouched by a failed overwrite
    monkeypatch.setattr(module, attr, real)
    write_image(tmp_path / f"out{suffix}", sample_image(3, np.uint8))
    before = (tmp_path / f"out{suffix}").read_bytes()
    monkeypatch.setattr(module, attr, partial_then_fail)
    with pytest.raises(OSError):
        write_image(tmp_path / f"out{suffix}", sample_image(3, np.uint8, seed=4))
    assert (tmp_path / f"out{suffix}").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [f"out{suffix}"]


def test_atomic_output(tmp_path):
    with atomic_output(tmp_path / "a.csv") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".csv") and tmp != tmp_path / "a.csv"
        tmp.write_text("x\n")
    assert (tmp_path / "a.csv").read_text() == "x\n"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "b.csv") as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]
    with atomic_output(tmp_path / "new" / "c.csv") as tmp:  # missing folders are created
        tmp.write_text("y")
    assert (tmp_path / "new" / "c.csv").read_text() == "y"
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        with atomic_output(tmp_path / "a.csv" / "d.csv"):
            pass
