"""fastseg.distance_transform_edt against scipy.ndimage.distance_transform_edt.

Every comparison is exact: the float32 result must equal scipy's float64 result rounded to float32, element
for element (the kernels evaluate scipy's float64 expression from integer offsets, see csrc/edt/edt.h).
"""
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import fastseg
from fastseg import _extension, _reference
from fastseg.ops import edt as edt_ops

ndimage = pytest.importorskip("scipy.ndimage")

needs_ext = pytest.mark.skipif(not _extension.available(), reason="compiled extension not loaded")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _extension.cuda_available()), reason="needs a CUDA device and kernels"
)

DATA = Path(os.environ.get("FASTSEG_DATA", Path(__file__).resolve().parents[2] / "shared/data/tcia-han-oar")) / "validation"


def scipy_edt(mask, spacing=None):
    return ndimage.distance_transform_edt(np.asarray(mask), sampling=spacing).astype(np.float32)


def make_mask(shape, density, seed=0):
    """bool mask (True = foreground) with about `density` zeros; "point": a single zero voxel."""
    rng = np.random.default_rng(seed)
    if density == "point":
        m = np.ones(shape, dtype=bool)
        m[tuple(int(rng.integers(0, n)) for n in shape)] = False
        return m
    return rng.random(shape) >= density


def assert_exact(out, ref):
    out = out.cpu().numpy() if isinstance(out, torch.Tensor) else out
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)


DENSITIES = ("point", 0.001, 0.05, 0.3, 0.95)
SPACINGS = {2: (None, (2.5, 0.98), (0.3, 1.01)), 3: (None, (2.5, 1.01, 0.98), (1.0, 1.0, 3.0))}
SHAPES = {2: ((1, 33), (2, 17), (33, 17), (64, 57)), 3: ((1, 2, 33), (17, 2, 1), (17, 33, 12), (31, 40, 37))}

GRID = [(nd, shape, dens, sp) for nd in (2, 3) for shape in SHAPES[nd] for dens in DENSITIES for sp in SPACINGS[nd]]


@pytest.mark.parametrize("nd,shape,density,spacing", GRID)
def test_matches_scipy_exactly(nd, shape, density, spacing):
    m = make_mask(shape, density, seed=len(GRID) + sum(shape))
    assert_exact(fastseg.distance_transform_edt(torch.from_numpy(m), spacing), scipy_edt(m, spacing))


@pytest.mark.parametrize("spacing", (None, 0.7, (1.01,)))
@pytest.mark.parametrize("shape,density", [((1,), 0.5), ((2,), "point"), ((33,), 0.1), ((1000,), "point")])
def test_1d(shape, density, spacing):
    m = make_mask(shape, density, seed=shape[0])
    assert_exact(fastseg.distance_transform_edt(torch.from_numpy(m), spacing), scipy_edt(m, spacing))


def test_large_lines_and_far_zeros():
    # long envelopes (one zero in a big image), and the uint64-word path (an axis of more than 65534 voxels)
    for shape, sp in (((257, 263), (1.0, 1.0)), ((257, 263), (0.7, 1.3)), ((9, 70001), (1.5, 0.5)),
                      ((70001,), None)):
        m = make_mask(shape, "point", seed=3)
        assert_exact(fastseg.distance_transform_edt(torch.from_numpy(m), sp), scipy_edt(m, sp))
    m = make_mask((2, 70001), 0.0002, seed=4)
    assert_exact(fastseg.distance_transform_edt(torch.from_numpy(m)), scipy_edt(m))


@pytest.mark.parametrize("shape", ((7,), (5, 9), (3, 4, 6), (1, 1, 1)))
@pytest.mark.parametrize("fill", (0, 1))
def test_all_zero_and_all_one_masks(shape, fill):
    # all-one: scipy has no zero voxel to measure to and returns distances to a virtual zero at index -1 on
    # axis 0 (its feature transform's initial value); we reproduce that exactly.
    m = np.full(shape, fill, dtype=np.uint8)
    for sp in (None, tuple(1.0 + 0.5 * k for k in range(len(shape)))):
        assert_exact(fastseg.distance_transform_edt(torch.from_numpy(m), sp), scipy_edt(m, sp))
        assert_exact(fastseg.distance_transform_edt(m, sp), scipy_edt(m, sp))


def test_non_contiguous_inputs():
    m = make_mask((20, 31, 26), 0.05, seed=5)
    t = torch.from_numpy(m)
    for view in (t.permute(2, 0, 1), t[::2, :, 1::3], t.transpose(0, 1)):
        ref = scipy_edt(view.numpy(), (2.5, 1.01, 0.98))
        assert_exact(fastseg.distance_transform_edt(view, (2.5, 1.01, 0.98)), ref)
    arr = m[:, ::-1, ::2]  # negative strides: numpy input
    assert_exact(fastseg.distance_transform_edt(arr, (1.0, 2.0, 3.0)), scipy_edt(arr, (1.0, 2.0, 3.0)))


def test_batched_with_shared_and_per_sample_spacing():
    masks = np.stack([make_mask((9, 14, 11), d, seed=i) for i, d in enumerate(("point", 0.02, 0.5))])
    masks[1] = True  # a sample with no zero voxel
    masks = np.concatenate([masks, np.zeros((1, 9, 14, 11), dtype=bool)])  # and one all zero
    spacing = np.array([[2.5, 1.01, 0.98], [1.0, 1.0, 1.0], [0.5, 2.0, 1.5], [3.0, 3.0, 3.0]])
    t = torch.from_numpy(masks)
    out = fastseg.distance_transform_edt(t)  # ndim 4 is a batch of 3D images by default
    assert_exact(out, np.stack([scipy_edt(m) for m in masks]))
    out = fastseg.distance_transform_edt(t, (2.5, 1.01, 0.98))
    assert_exact(out, np.stack([scipy_edt(m, (2.5, 1.01, 0.98)) for m in masks]))
    for sp in (spacing, torch.from_numpy(spacing), spacing.tolist()):
        out = fastseg.distance_transform_edt(t, sp)
        assert_exact(out, np.stack([scipy_edt(m, s) for m, s in zip(masks, spacing)]))
    # a batch of 2D images, and of 1D lines, needs batched=True
    m2 = masks[:, 4]
    out = fastseg.distance_transform_edt(torch.from_numpy(m2), spacing[:, :2], batched=True)
    assert_exact(out, np.stack([scipy_edt(m, s) for m, s in zip(m2, spacing[:, :2])]))
    m1 = masks[:, 4, 3]
    out = fastseg.distance_transform_edt(m1, spacing[:, :1], batched=True)
    assert_exact(out, np.stack([scipy_edt(m, s) for m, s in zip(m1, spacing[:, :1])]))


def test_numpy_and_integer_inputs():
    m = make_mask((13, 17, 9), 0.1, seed=6)
    ref = scipy_edt(m, (2.0, 1.0, 0.5))
    for arr in (m, m.astype(np.uint8), m.astype(np.int64) * -3, m.astype(np.uint16) * 7):
        out = fastseg.distance_transform_edt(arr, sampling=(2.0, 1.0, 0.5))
        assert isinstance(out, np.ndarray)
        assert_exact(out, ref)
    t = torch.from_numpy(m)
    for tt in (t.to(torch.uint8), t.to(torch.int32) * 5, t.to(torch.int64) - 2 * t.to(torch.int64)):
        out = fastseg.distance_transform_edt(tt, (2.0, 1.0, 0.5))
        assert isinstance(out, torch.Tensor) and not out.requires_grad
        assert_exact(out, ref)
    assert fastseg.distance_transform_edt(np.zeros((0, 4), bool)).shape == (0, 4)
    assert fastseg.distance_transform_edt(torch.zeros(2, 0, 3, 4, dtype=torch.bool)).shape == (2, 0, 3, 4)


@pytest.mark.parametrize("nd", (1, 2, 3))
def test_reference_matches_scipy_exactly(nd):
    shapes = {1: ((1,), (40,)), 2: ((1, 17), (33, 20)), 3: ((2, 17, 1), (12, 19, 15))}[nd]
    spacings = {1: (None, (0.7,)), 2: (None, (2.5, 0.98)), 3: (None, (2.5, 1.01, 0.98))}[nd]
    for shape, density, sp in itertools.product(shapes, DENSITIES + (0.0, 1.0), spacings):
        m = make_mask(shape, density, seed=sum(shape))
        out = _reference.distance_transform_edt(torch.from_numpy(m)[None], [1.0] * nd if sp is None else sp)
        assert_exact(out[0], scipy_edt(m, sp))


def test_public_function_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(edt_ops, "_use_op", lambda mask: False)
    masks = np.stack([make_mask((10, 12, 9), "point", seed=1), make_mask((10, 12, 9), 0.2, seed=2)])
    spacing = np.array([[2.5, 1.01, 0.98], [1.0, 2.0, 0.5]])
    out = fastseg.distance_transform_edt(masks, spacing)
    assert_exact(out, np.stack([scipy_edt(m, s) for m, s in zip(masks, spacing)]))


@needs_ext
def test_reference_and_kernel_agree_on_larger_input():
    m = make_mask((20, 40, 32), 0.005, seed=7)
    t = torch.from_numpy(m)[None]
    sp = [2.5, 1.01, 0.98]
    torch.testing.assert_close(torch.ops.fastseg.edt(t, sp), _reference.distance_transform_edt(t, sp),
                               rtol=0, atol=0)


@needs_ext
def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    samples = [
        (torch.rand(2, 9, 11, generator=gen) > 0.2, [1.0, 2.5]),
        ((torch.rand(2, 5, 6, 7, generator=gen) > 0.1).to(torch.uint8), [2.5, 1.01, 0.98]),
        ((torch.rand(2, 5, 6, 7, generator=gen) > 0.1).to(torch.uint8), [2.5, 1.0, 1.0, 1.0, 0.5, 2.0]),
        (torch.rand(3, 17, generator=gen) > 0.5, [0.5]),
    ]
    for mask, spacing in samples:
        torch.library.opcheck(torch.ops.fastseg.edt.default, (mask, spacing))


@needs_ext
def test_op_rejects_bad_arguments():
    m = torch.ones(2, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="spacing must hold 2 values"):
        torch.ops.fastseg.edt(m, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="finite and > 0"):
        torch.ops.fastseg.edt(m, [1.0, 0.0])
    with pytest.raises(ValueError, match="uint8 or bool"):
        torch.ops.fastseg.edt(m.float(), [1.0, 1.0])
    with pytest.raises(ValueError, match="1 to 3 spatial dims"):
        torch.ops.fastseg.edt(torch.ones(1, 2, 2, 2, 2, dtype=torch.uint8), [1.0] * 4)


@pytest.mark.parametrize(
    "mask,kwargs,match",
    [
        (torch.rand(4, 4), {}, r"mask must be bool or integer .* got torch.float32"),
        (np.ones((4, 4), np.float64), {}, r"mask must be bool or integer .* got numpy float64"),
        (torch.ones(2, 2, 2, 2, 2, dtype=torch.bool), {}, r"1 to 3 spatial dims .* got ndim 5"),
        (torch.ones(2, 2, 2, 2, dtype=torch.bool), {"batched": False}, r"batched=False.* got ndim 4"),
        (torch.ones(5, dtype=torch.bool), {"batched": True}, r"batched=True.* got ndim 1"),
        (torch.ones(4, 4, dtype=torch.bool), {"spacing": (1.0, 1.0, 1.0)}, r"2 numbers .*\(shape \(3,\) given\)"),
        (torch.ones(4, 4, dtype=torch.bool), {"spacing": (1.0, -2.0)}, r"finite and > 0 along every axis, got \(1.0, -2.0\)"),
        (torch.ones(4, 4, dtype=torch.bool), {"spacing": float("nan")}, r"finite and > 0"),
        (torch.ones(4, 4, dtype=torch.bool), {"spacing": [[1.0, 1.0]] * 4}, r"one per spatial axis.*\(shape \(4, 2\) given\)"),
        (torch.ones(3, 4, 4, dtype=torch.bool), {"spacing": [[1.0, 1.0]] * 2, "batched": True},
         r"\(B, 2\) = \(3, 2\)"),
        (torch.ones(4, 4, dtype=torch.bool), {"spacing": 1.0, "sampling": 1.0}, r"not both"),
        (torch.ones(4, 4, dtype=torch.bool), {"batched": "yes"}, r"batched must be True, False or None"),
        (torch.ones(4, 4, dtype=torch.bool), {"spacing": "wide"}, r"spacing must be None, a number"),
    ],
)
def test_argument_errors(mask, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastseg.distance_transform_edt(mask, **kwargs)


def test_mask_type_error():
    with pytest.raises(TypeError, match="torch.Tensor or a numpy.ndarray, got list"):
        fastseg.distance_transform_edt([[0, 1]])


@needs_cuda
def test_cuda_matches_cpu():
    cases = [((33, 17), "point", (2.5, 0.98)), ((64, 57), 0.05, None), ((17, 33, 12), 0.3, (2.5, 1.01, 0.98)),
             ((31, 40, 37), "point", (1.0, 1.0, 3.0)), ((1000,), 0.01, (0.7,)), ((9, 70001), "point", None),
             ((5, 6, 7), 0.0, None), ((5, 6, 7), 1.0, (2.0, 1.0, 0.5))]
    for shape, density, sp in cases:
        m = torch.from_numpy(make_mask(shape, density, seed=11))
        cpu = fastseg.distance_transform_edt(m, sp)
        gpu = fastseg.distance_transform_edt(m.cuda(), sp)
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)
    masks = torch.from_numpy(np.stack([make_mask((9, 14, 11), d, seed=i) for i, d in enumerate(("point", 1.0, 0.5))]))
    spacing = torch.tensor([[2.5, 1.01, 0.98], [1.0, 1.0, 1.0], [0.5, 2.0, 1.5]])
    torch.testing.assert_close(fastseg.distance_transform_edt(masks.cuda(), spacing).cpu(),
                               fastseg.distance_transform_edt(masks, spacing), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.fastseg.edt.default, (masks.cuda(), [2.5, 1.01, 0.98]))


def _real_mask(organ):
    nrrd = pytest.importorskip("nrrd", reason="pynrrd not installed (scripts/install.sh --test installs it)")
    path = DATA / "oncologist" / "0522c0014" / "segmentations" / f"{organ}.nrrd"
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    data, header = nrrd.read(str(path), index_order="C")  # (z, y, x)
    spacing = tuple(float(abs(v)) for v in np.diag(np.asarray(header["space directions"], float))[::-1])
    return data != 0, spacing


def test_real_brainstem_mask():
    mask, spacing = _real_mask("Brainstem")
    # scipy on the whole 159 x 512 x 512 volume takes ~10 s; compare on a generous crop around the organ
    # (inside and outside distances), and the kernel against the exact reference on the whole volume.
    idx = np.nonzero(mask)
    box = tuple(slice(max(int(i.min()) - pad, 0), int(i.max()) + pad + 1) for i, pad in zip(idx, (4, 25, 25)))
    crop = mask[box]
    assert 0 < crop.sum() < crop.size
    assert_exact(fastseg.distance_transform_edt(crop, spacing), scipy_edt(crop, spacing))
    assert_exact(fastseg.distance_transform_edt(~crop, spacing), scipy_edt(~crop, spacing))
    full = torch.from_numpy(mask)
    out = fastseg.distance_transform_edt(full, spacing)
    ref = _reference.distance_transform_edt(full[None], list(spacing))[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert float(out.max()) > 5.0
