"""Surface metrics against MONAI 1.6.1 and DeepMind's surface-distance 0.1 (the libraries whose conventions
fastseg reproduces), on synthetic shapes and on real head-and-neck masks; the MONAI drop-in functions; the
stateful metric, also under 2 gloo processes; argument errors.

Real data: ../shared/data/tcia-han-oar (radiographer = prediction, oncologist = target). By default 2 scans;
FASTSEG_FULL_DATA=1 runs every scan. Skipped without the data or pynrrd.
"""
from __future__ import annotations

import itertools
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fastseg.compat import monai_metrics as cmm
from fastseg.metrics import (
    SurfaceMetric,
    _surfels,
    average_surface_distance,
    dice_score,
    hausdorff_distance,
    normalized_surface_dice,
    surface_metrics,
)
from fastseg.metrics import surface as _surface_module
from fastseg.metrics.surface import METRIC_KEYS, _quantile
from gloo import run_on_ranks

if not hasattr(np, "Inf"):  # surface-distance 0.1 uses np.Inf, which NumPy 2 removed
    np.Inf = np.inf

sd = pytest.importorskip("surface_distance", reason="pip install --no-deps surface-distance==0.1")
mm = pytest.importorskip("monai.metrics")

DISTANCE_KEYS = ("hd", "hd_percentile", "assd", "asd_pred_to_target", "asd_target_to_pred")
RATIO_KEYS = ("nsd", "dice")
DIST_TOL, RATIO_TOL = 1e-4, 1e-5  # mm, and for ratios: the bar
DATA = Path(os.environ.get("FASTSEG_DATA", Path(__file__).resolve().parents[2] / "shared/data/tcia-han-oar")) / "validation"
SP3, SP2 = (2.5, 1.01, 0.98), (0.7, 1.3)


@pytest.fixture(params=["per_pair", "batched"])
def metric_path(request, monkeypatch):
    """Both evaluation paths on the CPU: the loop over (sample, class) the CPU uses, and the batched one that
    CUDA tensors take (fastseg.metrics._batched), so the GPU's logic is tested on every machine."""
    devices = ("cuda", "cpu") if request.param == "batched" else ("cuda",)
    monkeypatch.setattr(_surface_module, "BATCHED_DEVICE_TYPES", devices)
    return request.param


# ------------------------------------------------------------------------------------------- shapes


def ball(shape, center, radius, spacing=None):
    spacing = spacing or (1.0,) * len(shape)
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center, spacing)) <= radius ** 2


def box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def voxel(shape, at):
    m = np.zeros(shape, bool)
    m[tuple(at)] = True
    return m


def blobs(shape, n, seed):
    rng = np.random.default_rng(seed)
    m = np.zeros(shape, bool)
    for _ in range(n):
        m |= ball(shape, [rng.uniform(0, s) for s in shape], rng.uniform(1.0, 4.0))
    return m


S3, S2 = (18, 22, 20), (30, 26)
CASES3 = {
    "spheres": (ball(S3, (8, 11, 9), 6.3), ball(S3, (9, 10, 10), 5.6)),
    "cubes": (box(S3, (3, 4, 5), (12, 15, 14)), box(S3, (4, 4, 3), (14, 13, 15))),
    "identical": (ball(S3, (8, 11, 9), 5.2), ball(S3, (8, 11, 9), 5.2)),
    "single_voxels": (voxel(S3, (3, 4, 5)), voxel(S3, (9, 15, 2))),
    "voxel_in_cube": (voxel(S3, (6, 7, 8)), box(S3, (4, 5, 6), (9, 10, 11))),
    "touching_border": (box(S3, (0, 0, 0), (7, 22, 6)), ball(S3, (0, 21, 0), 7.5)),
    "whole_image": (np.ones(S3, bool), box(S3, (0, 1, 0), (18, 22, 19))),
    "blobs": (blobs(S3, 4, 1), blobs(S3, 3, 2)),
    "empty_pred": (np.zeros(S3, bool), ball(S3, (8, 11, 9), 4.0)),
    "empty_target": (box(S3, (3, 4, 5), (8, 9, 10)), np.zeros(S3, bool)),
    "both_empty": (np.zeros(S3, bool), np.zeros(S3, bool)),
}
CASES2 = {
    "disks": (ball(S2, (14, 12), 8.2), ball(S2, (15, 13), 7.1)),
    "squares": (box(S2, (3, 4), (20, 15)), box(S2, (5, 2), (22, 18))),
    "single_pixels": (voxel(S2, (3, 4)), voxel(S2, (20, 1))),
    "touching_border": (box(S2, (0, 0), (10, 26)), ball(S2, (29, 0), 12.0)),
    "blobs": (blobs(S2, 5, 3), blobs(S2, 5, 4)),
    "empty_pred": (np.zeros(S2, bool), box(S2, (3, 4), (9, 9))),
    "both_empty": (np.zeros(S2, bool), np.zeros(S2, bool)),
}


# ------------------------------------------------------------------------------------------- references


def deepmind_reference(pred, target, spacing, percentile, taus):
    """surface-distance's values under fastseg's documented empty-mask policy (see fastseg.metrics.surface)."""
    nan = math.nan
    if not pred.any() and not target.any():
        return dict.fromkeys(METRIC_KEYS, nan) | {"nsd": [nan] * len(taus)}
    with np.errstate(invalid="ignore", divide="ignore"):
        d = sd.compute_surface_distances(target, pred, spacing)
        to_pred, to_target = sd.compute_average_surface_distance(d)
        a_g, a_p = d["surfel_areas_gt"], d["surfel_areas_pred"]
        assd = ((d["distances_gt_to_pred"] * a_g).sum() + (d["distances_pred_to_gt"] * a_p).sum()) / (
            a_g.sum() + a_p.sum())
        out = dict(hd=sd.compute_robust_hausdorff(d, 100), hd_percentile=sd.compute_robust_hausdorff(d, percentile),
                   assd=assd, asd_pred_to_target=to_target, asd_target_to_pred=to_pred,
                   nsd=[sd.compute_surface_dice_at_tolerance(d, t) for t in taus],
                   dice=sd.compute_dice_coefficient(target, pred))
    if not pred.any() or not target.any():  # surface-distance: nan for the directed mean of the empty side
        out.update(dict.fromkeys(DISTANCE_KEYS, math.inf))
    return out


def monai_reference(pred, target, spacing, percentile, taus):
    """MONAI's values (one (1, 1, ...) call per function) under fastseg's empty-mask policy."""
    p = torch.from_numpy(pred)[None, None].float()
    g = torch.from_numpy(target)[None, None].float()
    kw = dict(include_background=True, spacing=list(spacing))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = dict(
            hd=mm.compute_hausdorff_distance(p, g, **kw).item(),
            hd_percentile=mm.compute_hausdorff_distance(p, g, percentile=percentile, **kw).item(),
            assd=mm.compute_average_surface_distance(p, g, symmetric=True, **kw).item(),
            asd_pred_to_target=mm.compute_average_surface_distance(p, g, **kw).item(),
            asd_target_to_pred=mm.compute_average_surface_distance(g, p, **kw).item(),
            nsd=[mm.compute_surface_dice(p, g, [t], **kw).item() for t in taus],
            # ignore_empty=False: 0 when only one mask is empty (ignore_empty=True gives nan for an empty target)
            dice=mm.compute_dice(p, g, include_background=True, ignore_empty=False).item(),
        )
    if not pred.any() and not target.any():  # MONAI's Dice is 1 there (ignore_empty=False): fastseg nan
        out["dice"] = math.nan
    if pred.any() != target.any():  # MONAI #9095: the percentile of infinite distances is nan
        assert math.isnan(out["hd_percentile"])
        out["hd_percentile"] = math.inf
    return out


REFERENCES = {"monai": monai_reference, "deepmind": deepmind_reference}


def assert_metrics_close(ours: dict, ref: dict, what=""):
    """ours: {key: float or list}; ref likewise. Distances within 1e-4 mm, ratios within 1e-5, inf / nan equal."""
    for key in METRIC_KEYS:
        a = np.atleast_1d(np.asarray(ours[key], dtype=np.float64))
        b = np.atleast_1d(np.asarray(ref[key], dtype=np.float64))
        tol = DIST_TOL if key in DISTANCE_KEYS else RATIO_TOL
        np.testing.assert_allclose(a, b, rtol=0, atol=tol, equal_nan=True, err_msg=f"{what} {key}")


def run_one(pred, target, spacing, convention, percentile=95, taus=(1.0, 2.0)):
    out = surface_metrics(torch.from_numpy(pred)[None, None], torch.from_numpy(target)[None, None],
                          spacing=spacing, percentile=percentile, tolerance=list(taus), convention=convention,
                          include_background=True)
    return {k: v[0, 0].tolist() for k, v in out.items()}


# ------------------------------------------------------------------------------------------- surfels


@pytest.mark.parametrize("nd", [2, 3])
def test_surfel_table_matches_surface_distance(nd):
    """fastseg derives the neighbour-code table itself (fastseg.metrics._surfels); it must be the package's."""
    from surface_distance import lookup_tables

    reference = {3: lookup_tables.create_table_neighbour_code_to_surface_area,
                 2: lookup_tables.create_table_neighbour_code_to_contour_length}[nd]
    rng = np.random.default_rng(nd)
    for spacing in [(1.0,) * nd] + [tuple(rng.uniform(0.2, 4.0, nd)) for _ in range(12)]:
        np.testing.assert_allclose(_surfels.measure_table(spacing).numpy(), reference(spacing), rtol=1e-13, atol=0)


def test_surfel_codes_match_monai_encoding():
    """The corner-grid codes equal MONAI's conv3d with its encoding kernel (surface-distance's correlate)."""
    from monai.metrics.utils import ENCODING_KERNEL
    from fastseg.metrics._surfaces import surfel_codes

    for nd in (2, 3):
        m = torch.from_numpy(blobs((9, 8, 7)[:nd], 3, nd))
        kernel = torch.tensor(ENCODING_KERNEL[nd], dtype=torch.float32)[None, None]
        conv = torch.nn.functional.conv3d if nd == 3 else torch.nn.functional.conv2d
        expected = conv(m[None, None].float(), kernel)[0, 0].to(torch.uint8)
        torch.testing.assert_close(surfel_codes(m), expected, rtol=0, atol=0)


def test_selection_quantile_is_torch_quantile_bit_for_bit():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 20, 101, 1000):
        d = torch.from_numpy(rng.gamma(2.0, 3.0, n).astype(np.float32))
        for q in (0.0, 0.05, 0.5, 0.95, 0.999, 1.0, 1 / 3):
            assert torch.equal(_quantile(d, q), torch.quantile(d, q)), (n, q)


# ------------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("convention", ["monai", "deepmind"])
@pytest.mark.parametrize("spacing", [None, "aniso"])
@pytest.mark.parametrize("case", sorted(CASES3))
def test_3d_shapes_match_reference(case, spacing, convention, metric_path):
    pred, target = CASES3[case]
    sp = SP3 if spacing == "aniso" else (1.0, 1.0, 1.0)
    ours = run_one(pred, target, sp, convention)
    assert_metrics_close(ours, REFERENCES[convention](pred, target, sp, 95, (1.0, 2.0)), f"{case} {convention}")


@pytest.mark.parametrize("convention", ["monai", "deepmind"])
@pytest.mark.parametrize("case", sorted(CASES2))
def test_2d_shapes_match_reference(case, convention, metric_path):
    pred, target = CASES2[case]
    ours = run_one(pred, target, SP2, convention, percentile=90, taus=(0.5, 1.5, 3.0))
    ref = REFERENCES[convention](pred, target, SP2, 90, (0.5, 1.5, 3.0))
    assert_metrics_close(ours, ref, f"{case} {convention}")


@pytest.mark.parametrize("convention", ["monai", "deepmind"])
def test_empty_mask_policy(convention, metric_path):
    """Exactly one empty: distances inf, nsd 0, dice 0. Both empty: everything nan. Both conventions."""
    full = ball(S3, (8, 11, 9), 4.0)
    empty = np.zeros(S3, bool)
    for pred, target in ((empty, full), (full, empty)):
        m = run_one(pred, target, SP3, convention, taus=(2.0,))
        assert all(m[k] == math.inf for k in DISTANCE_KEYS), m
        assert m["nsd"] == [0.0] and m["dice"] == 0.0
    m = run_one(empty, empty, SP3, convention, taus=(2.0,))
    assert all(math.isnan(v) for k, v in m.items() if k != "nsd") and math.isnan(m["nsd"][0])


def test_empty_mask_deviations_from_the_libraries_are_the_documented_ones():
    """Where fastseg's empty-mask values differ from MONAI's and surface-distance's, they differ as documented."""
    full, empty = ball(S3, (8, 11, 9), 4.0), np.zeros(S3, bool)
    p, g = torch.from_numpy(empty)[None, None].float(), torch.from_numpy(full)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(mm.compute_hausdorff_distance(p, g, include_background=True, percentile=95).item())
        assert math.isnan(mm.compute_hausdorff_distance(p, p, include_background=True).item())
    with np.errstate(invalid="ignore", divide="ignore"):
        d = sd.compute_surface_distances(full, empty, SP3)  # target full, prediction empty
        assert math.isnan(sd.compute_average_surface_distance(d)[1])  # pred -> target over no surfel
        assert sd.compute_robust_hausdorff(sd.compute_surface_distances(empty, empty, SP3), 95) == math.inf


def batch_case(seed=0, B=3, C=4, shape=(16, 18, 14)):
    """(B, C, *shape) uint8 masks with overlapping channels and a few empty ones, and a (B, 3) spacing."""
    rng = np.random.default_rng(seed)
    p = np.zeros((B, C) + shape, np.uint8)
    t = np.zeros_like(p)
    for b in range(B):
        for c in range(C):
            if (b, c) != (0, 2):
                t[b, c] = blobs(shape, 2, seed * 100 + b * 10 + c)
                if (b, c) != (1, 3):
                    p[b, c] = blobs(shape, 2, seed * 100 + b * 10 + c + 5) | (t[b, c] & (rng.random(shape) < 0.7))
    p[2, 1] = t[2, 1]
    spacing = rng.uniform(0.5, 2.5, (B, 3))
    return p, t, spacing


@pytest.mark.parametrize("convention", ["monai", "deepmind"])
def test_batch_with_per_sample_spacing_matches_case_by_case(convention, metric_path):
    p, t, spacing = batch_case()
    out = surface_metrics(p, t, spacing=spacing, tolerance=[1.0, 3.0], convention=convention, include_background=True)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in out.values())
    assert out["hd"].shape == (3, 4) and out["nsd"].shape == (3, 4, 2)
    for b in range(3):
        for c in range(4):
            ref = REFERENCES[convention](p[b, c].astype(bool), t[b, c].astype(bool), tuple(spacing[b]), 95, (1.0, 3.0))
            assert_metrics_close({k: v[b, c].tolist() for k, v in out.items()}, ref, f"b{b} c{c}")


def test_input_forms_agree(metric_path):
    """bool / uint8 / float masks, numpy / torch, label maps with num_classes, include_background, scalar
    tolerance: the same numbers."""
    rng = np.random.default_rng(5)
    labels = np.zeros((2, 15, 17, 13), np.int64)
    for b in range(2):
        for c in (1, 2, 3):
            labels[b][blobs(labels.shape[1:], 2, 10 * b + c)] = c
    labels[1][labels[1] == 2] = 0  # class 2 absent from one target
    pred_labels = labels.copy()
    pred_labels[rng.random(labels.shape) < 0.05] = 1
    onehot = lambda x: np.stack([x == c for c in range(4)], 1)
    ref = surface_metrics(onehot(pred_labels), onehot(labels), spacing=SP3)
    assert ref["hd"].shape == (2, 3)  # background dropped
    variants = [
        surface_metrics(torch.from_numpy(pred_labels), torch.from_numpy(labels), spacing=SP3, num_classes=4),
        surface_metrics(torch.from_numpy(pred_labels)[:, None], torch.from_numpy(labels)[:, None], spacing=SP3,
                        num_classes=4),
        surface_metrics(torch.from_numpy(onehot(pred_labels)).to(torch.uint8), onehot(labels).astype(np.float32),
                        spacing=list(SP3)),
        {k: v[:, 1:] for k, v in surface_metrics(onehot(pred_labels), onehot(labels), spacing=torch.tensor(SP3),
                                                   include_background=True).items()},
    ]
    for v in variants:
        for k in METRIC_KEYS:
            torch.testing.assert_close(v[k], ref[k], equal_nan=True, rtol=0, atol=0)
    bg = surface_metrics(torch.from_numpy(pred_labels), torch.from_numpy(labels), spacing=SP3, num_classes=4,
                         include_background=True)
    assert bg["dice"].shape == (2, 4)


def test_single_metric_functions_equal_surface_metrics(metric_path):
    p, t, spacing = batch_case(seed=3)
    for conv in ("monai", "deepmind"):
        full = surface_metrics(p, t, spacing=spacing, percentile=90, tolerance=1.5, convention=conv)
        kw = dict(spacing=spacing, convention=conv)
        pairs = [
            (hausdorff_distance(p, t, **kw), full["hd"]),
            (hausdorff_distance(p, t, percentile=90, **kw), full["hd_percentile"]),
            (average_surface_distance(p, t, **kw), full["assd"]),
            (average_surface_distance(p, t, symmetric=False, **kw), full["asd_pred_to_target"]),
            (normalized_surface_dice(p, t, 1.5, **kw), full["nsd"]),
            (dice_score(p, t), full["dice"]),
        ]
        for got, want in pairs:
            torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=1e-6)


def test_directed_hausdorff_matches_monai():
    p, t, spacing = batch_case(seed=4)
    for perc in (None, 80):
        ours = hausdorff_distance(p, t, spacing=spacing, percentile=perc, directed=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = mm.compute_hausdorff_distance(torch.from_numpy(p).float(), torch.from_numpy(t).float(),
                                                percentile=perc, directed=True, spacing=list(map(list, spacing)))
        ref = torch.where(ref.isnan() & torch.from_numpy(t[:, 1:].any((2, 3, 4)) & ~p[:, 1:].any((2, 3, 4))),
                          torch.tensor(math.inf), ref)  # MONAI #9095, see the empty-mask policy
        torch.testing.assert_close(ours, ref, equal_nan=True, rtol=0, atol=DIST_TOL)


def test_dice_score_label_maps(metric_path):
    p = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
    t = torch.tensor([[[0, 1, 0], [2, 0, 0]]])
    torch.testing.assert_close(dice_score(p, t, num_classes=4),
                               torch.tensor([[2 / 3, 2 / 3, math.nan]]), equal_nan=True)


# ------------------------------------------------------------------------------------------- errors


def _masks(shape=(1, 2, 6, 7, 5)):
    m = torch.zeros(shape, dtype=torch.bool)
    m[..., 2:4, 2:5, 1:3] = True
    return m


@pytest.mark.parametrize("call,match", [
    (lambda m: surface_metrics(m, m[:, :, :5]),
     r"target must be of pred's shape \(1, 2, 6, 7, 5\), got \(1, 2, 5, 7, 5\)"),
    (lambda m: surface_metrics(m.to(torch.uint8) * 2, m), r"pred must be a binary mask .*got 'uint8 values up to 2'"),
    (lambda m: surface_metrics(m, m.float() * 0.5), r"target must be a binary mask .*got 'torch.float32 tensor"),
    (lambda m: surface_metrics(m, m, spacing=(1.0, 2.0)),
     r"spacing must be None, a number or 3 numbers .*\(shape \(2,\) given\), got \(1.0, 2.0\)"),
    (lambda m: surface_metrics(m, m, spacing=(1.0, 0.0, 2.0)),
     r"spacing must be finite and > 0 .*got \(1.0, 0.0, 2.0\)"),
    (lambda m: surface_metrics(m, m, spacing=-1.0), r"spacing must be finite and > 0 .*got -1.0"),
    (lambda m: surface_metrics(m, m, spacing=np.ones((2, 3))), r"spacing must be .*\(B, 3\) = \(1, 3\)"),
    (lambda m: surface_metrics(m, m, convention="medpy"), r"convention must be 'monai' or 'deepmind', got 'medpy'"),
    (lambda m: surface_metrics(m, m, percentile=101), r"percentile must be a number in \[0, 100\], got 101"),
    (lambda m: surface_metrics(m, m, tolerance=-1), r"tolerance must be a finite number >= 0 .*got -1"),
    (lambda m: surface_metrics(m[:, 0].to(torch.int64), m[:, 0].to(torch.int64) * 3, num_classes=3),
     r"target must be labels in \[0, num_classes\) = \[0, 3\), got 'labels from 0 to 3'"),
    (lambda m: surface_metrics(m[:, 0].float(), m[:, 0].float(), num_classes=2), r"pred must be integer labels"),
    (lambda m: surface_metrics(m[0, 0], m[0, 0]),
     r"pred must be a \(B, C, \*spatial\) per-class mask with 2 or 3 spatial dims"),
    (lambda m: surface_metrics(m, m, num_classes=0), r"num_classes must be a positive int"),
    (lambda m: hausdorff_distance(m, m, directed="yes"), r"directed must be True or False, got 'yes'"),
    (lambda m: cmm.compute_hausdorff_distance(m, m, distance_metric="cosine"),
     r"distance_metric cosine is not implemented"),
    (lambda m: cmm.compute_surface_dice(m, m, [1.0], distance_metric="l3"), r"distance_metric l3 is not implemented"),
    (lambda m: cmm.compute_average_surface_distance(m, m, spacing=[1.0, -2.0, 1.0]),
     r"spacing must hold 3 finite values > 0"),
    (lambda m: SurfaceMetric(convention="x"), r"SurfaceMetric: convention must be"),
])
def test_argument_errors(call, match, metric_path):
    with pytest.raises(ValueError, match=match):
        call(_masks())


def test_type_error():
    with pytest.raises(TypeError, match="pred must be a torch.Tensor or a numpy.ndarray, got list"):
        surface_metrics([[0]], np.zeros((1, 1, 2, 2)))


# ------------------------------------------------------------------------------------------- MONAI drop-in


def _monai_grid_inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    B, C = 2, 4
    y = np.zeros((B, C) + shape, np.float32)
    p = np.zeros_like(y)
    for b in range(B):
        for c in range(C):
            if (b, c) != (0, 2):
                y[b, c] = blobs(shape, 2, seed + 10 * b + c)
            if (b, c) not in ((1, 3), (0, 2)):
                p[b, c] = blobs(shape, 2, seed + 10 * b + c + 100)
    p[1, 1] = y[1, 1] * (rng.random(shape) < 0.9)
    return torch.from_numpy(p), torch.from_numpy(y)


def _call_with_warnings(fn, *args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [str(w.message) for w in caught if str(w.message).startswith("the ")]


COMPAT_GRID = [
    ("compute_hausdorff_distance", {}),
    ("compute_hausdorff_distance", dict(percentile=95)),
    ("compute_hausdorff_distance", dict(percentile=95, directed=True)),
    ("compute_hausdorff_distance", dict(percentile=0)),
    ("compute_hausdorff_distance", dict(distance_metric="chessboard")),
    ("compute_hausdorff_distance", dict(distance_metric="taxicab", percentile=50)),
    ("compute_hausdorff_distance", dict(spacing="per_batch", percentile=90)),
    ("compute_hausdorff_distance", dict(include_background=True, spacing=2.0)),
    ("compute_hausdorff_distance", dict(ignore_index=1)),
    ("compute_average_surface_distance", {}),
    ("compute_average_surface_distance", dict(symmetric=True, spacing="axes")),
    ("compute_average_surface_distance", dict(distance_metric="taxicab", include_background=True)),
    ("compute_surface_dice", dict(class_thresholds=[1, 2, 0.5])),
    ("compute_surface_dice", dict(class_thresholds=[1, 2, 0.5], use_subvoxels=True, spacing="axes")),
    ("compute_surface_dice",
     dict(class_thresholds=[1, 2, 0.5, 3], include_background=True, distance_metric="chessboard")),
    ("compute_surface_dice", dict(class_thresholds=[1, 2, 1], ignore_index=2)),
]


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("name,kwargs", COMPAT_GRID)
def test_compat_matches_monai(name, kwargs, nd):
    p, y = _monai_grid_inputs((13, 15, 11)[:nd] if nd == 3 else (21, 18), seed=nd)
    kw = dict(kwargs)
    if kw.get("spacing") == "axes":
        kw["spacing"] = [0.5, 2.0, 1.3][:nd]
    elif kw.get("spacing") == "per_batch":
        kw["spacing"] = [[0.5, 2.0, 1.3][:nd], [1.0, 1.1, 2.0][:nd]]
    ref, ref_warnings = _call_with_warnings(getattr(mm, name), p, y, **kw)
    out, out_warnings = _call_with_warnings(getattr(cmm, name), p, y, **kw)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=0, atol=1e-5)
    assert out_warnings == ref_warnings


def test_compat_numpy_inputs_and_errors():
    p, y = _monai_grid_inputs((9, 10, 8))
    ref = mm.compute_hausdorff_distance(p.numpy(), y.numpy())
    torch.testing.assert_close(cmm.compute_hausdorff_distance(p.numpy(), y.numpy()), ref, equal_nan=True)
    for fn in (mm.compute_hausdorff_distance, cmm.compute_hausdorff_distance):
        with pytest.raises(ValueError, match="y_pred and y should have same shapes"):
            fn(p, y[:, :, :5])
        with pytest.raises(ValueError, match="the outer sequence should have same length as batch size"):
            fn(p, y, spacing=[[1, 1, 1]])
    for fn in (mm.compute_surface_dice, cmm.compute_surface_dice):
        with pytest.raises(ValueError, match=r"number of classes \(3\) does not match number of class thresholds"):
            fn(p, y, [1.0])
        with pytest.raises(ValueError, match="All class thresholds need to be >= 0."):
            fn(p, y, [1.0, -1.0, 2.0])


def test_monai_metric_classes_work_with_the_drop_ins_patched_in(monkeypatch):
    import monai.metrics.hausdorff_distance as hd_mod
    import monai.metrics.surface_dice as nsd_mod
    import monai.metrics.surface_distance as asd_mod

    p, y = _monai_grid_inputs((12, 13, 10), seed=7)
    metrics = lambda: [
        mm.HausdorffDistanceMetric(percentile=95, reduction="mean_batch"),
        mm.SurfaceDistanceMetric(symmetric=True, reduction="mean"),
        mm.SurfaceDiceMetric(class_thresholds=[1.0, 2.0, 1.5], reduction="mean_batch", get_not_nans=True),
    ]

    def run_all():
        results = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for metric in metrics():
                metric(p[:1], y[:1], spacing=[1.2, 0.8, 2.0])
                metric(p[1:], y[1:], spacing=[1.2, 0.8, 2.0])
                results.append(metric.aggregate())
        return results

    expected = run_all()
    monkeypatch.setattr(hd_mod, "compute_hausdorff_distance", cmm.compute_hausdorff_distance)
    monkeypatch.setattr(asd_mod, "compute_average_surface_distance", cmm.compute_average_surface_distance)
    monkeypatch.setattr(nsd_mod, "compute_surface_dice", cmm.compute_surface_dice)
    got = run_all()
    for a, b in zip(got, expected):
        for x, z in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(x, z, equal_nan=True, rtol=0, atol=1e-5)


def test_compat_is_exported_from_fastseg_compat_monai():
    from fastseg.compat import monai as monai_compat

    for name in cmm.__all__:
        assert getattr(monai_compat, name) is getattr(cmm, name) and name in monai_compat.__all__


# ------------------------------------------------------------------------------------------- stateful


def test_surface_metric_accumulates_and_aggregates():
    p, t, spacing = batch_case(seed=8)
    metric = SurfaceMetric(spacing=None, tolerance=[1.0, 2.0], convention="deepmind", include_background=True)
    for b in range(3):
        metric.update(p[b:b + 1], t[b:b + 1], spacing=spacing[b])
    per_case = metric.per_case()
    direct = surface_metrics(p, t, spacing=spacing, tolerance=[1.0, 2.0], convention="deepmind",
                             include_background=True)
    for k in METRIC_KEYS:
        torch.testing.assert_close(per_case[k], direct[k].double(), equal_nan=True)
    summary = metric.compute()
    hd = direct["hd"].double().numpy()  # (0, 2) is empty in both: nan; (1, 3) only in the target: inf
    assert summary["hd"]["nan_count"].tolist() == [0, 0, 1, 0] and summary["hd"]["inf_count"].tolist() == [0, 0, 0, 1]
    assert summary["hd"]["count"].tolist() == [3, 3, 2, 3]
    np.testing.assert_allclose(summary["hd"]["mean"][:3].numpy(), np.nanmean(hd[:, :3], 0))
    np.testing.assert_allclose(summary["hd"]["median"][:3].numpy(), np.nanmedian(hd[:, :3], 0))
    np.testing.assert_allclose(summary["hd"]["std"][:3].numpy(), np.nanstd(hd[:, :3], 0))
    assert summary["hd"]["mean"][3] == math.inf and summary["hd"]["std"][3] == math.inf
    assert summary["hd"]["median"][3] == np.median(hd[:, 3])
    assert summary["nsd"]["mean"].shape == (4, 2)
    capped = SurfaceMetric(include_background=True, inf_value=100.0)
    capped.update(p, t, spacing=spacing)
    assert capped.compute()["hd"]["mean"][3] == pytest.approx(np.mean(np.where(np.isinf(hd[:, 3]), 100.0,
                                                                              capped.per_case()["hd"][:, 3].numpy())))
    metric.reset()
    assert metric.per_case()["hd"].numel() == 0


def _distributed_worker(rank, out_dir):
    p, t, spacing = batch_case(seed=9, B=4)
    metric = SurfaceMetric(include_background=True, tolerance=[1.0, 2.0])
    for b in range(2 * rank, 2 * rank + 2):  # rank 0: cases 0, 1; rank 1: cases 2, 3
        metric.update(p[b:b + 1], t[b:b + 1], spacing=spacing[b])
    torch.save({"summary": metric.compute(), "per_case": metric.per_case()}, os.path.join(out_dir, f"r{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_surface_metric_synchronises_across_gloo_ranks(tmp_path):
    run_on_ranks(_distributed_worker, 2, tmp_path, str(tmp_path))
    p, t, spacing = batch_case(seed=9, B=4)
    single = SurfaceMetric(include_background=True, tolerance=[1.0, 2.0])
    single.update(p, t, spacing=spacing)
    want_cases, want = single.per_case(), single.compute()
    for rank in range(2):
        got = torch.load(tmp_path / f"r{rank}.pt")
        for k in METRIC_KEYS:
            torch.testing.assert_close(got["per_case"][k], want_cases[k], equal_nan=True)
            for stat, value in want[k].items():
                torch.testing.assert_close(got["summary"][k][stat], value, equal_nan=True)


# ------------------------------------------------------------------------------------------- batched path


def _count_edt_calls(monkeypatch):
    from fastseg.metrics import _batched, _surfaces

    calls = []
    for module in (_batched, _surfaces):
        real = module._edt_ops.edt
        monkeypatch.setattr(module, "_edt_ops", type("Ops", (), {"edt": staticmethod(
            lambda mask, spacing, real=real: calls.append(tuple(mask.shape)) or real(mask, spacing))}))
    return calls


@pytest.mark.parametrize("convention", ["monai", "deepmind"])
def test_batched_path_runs_one_transform_for_all_classes_of_a_batch(convention, monkeypatch):
    """12 classes of one size in 2 samples: the batched path runs one EDT over all 24 pairs' windows (the
    per-pair path runs 24), and its numbers are the per-pair path's."""
    shape, centers = (40, 44, 36), [(x, y, z) for x in (8, 20, 32) for y in (8, 22, 36) for z in (9, 26)][:12]
    labels = np.zeros((2,) + shape, np.int64)
    for b in range(2):
        for c, center in enumerate(centers, start=1):
            labels[b][ball(shape, np.add(center, b * 0.4), 3.2 + 0.3 * (c % 3))] = c
    pred = np.where(np.random.default_rng(3).random(labels.shape) < 0.1, 0, labels)
    calls = _count_edt_calls(monkeypatch)
    kw = dict(num_classes=13, spacing=SP3, tolerance=[1.0, 2.0], convention=convention)
    monkeypatch.setattr(_surface_module, "BATCHED_DEVICE_TYPES", ("cuda",))
    per_pair = surface_metrics(pred, labels, **kw)
    assert len(calls) == 24
    calls.clear()
    monkeypatch.setattr(_surface_module, "BATCHED_DEVICE_TYPES", ("cuda", "cpu"))
    batched = surface_metrics(pred, labels, **kw)
    assert len(calls) == 1 and calls[0][0] == 48, calls
    for k in METRIC_KEYS:
        torch.testing.assert_close(batched[k], per_pair[k], rtol=1e-6, atol=0, equal_nan=True)


def test_buckets_bound_the_padding():
    from fastseg.metrics._batched import _MAX_BUCKET_VOXELS, _MAX_PADDING, _Pair, _buckets

    rng = np.random.default_rng(0)
    pairs = []
    for i in range(60):
        lo = rng.integers(0, 50, 3)
        hi = lo + rng.integers(0, 10, 3) * rng.integers(1, 8, 3)
        pairs.append(_Pair(i, 0, i, (tuple(lo), tuple(hi)), True, True))
    buckets = _buckets(pairs)
    assert sorted(p.index for _, members in buckets for p in members) == list(range(60))
    for shape, members in buckets:
        assert all(all(s >= n for s, n in zip(shape, p.shape)) for p in members)
        assert math.prod(shape) * len(members) <= _MAX_PADDING * sum(math.prod(p.shape) for p in members)
        assert len(members) == 1 or math.prod(shape) * len(members) <= _MAX_BUCKET_VOXELS
    # whole-volume crops (a prediction scattered everywhere) each get their own bucket
    big = [_Pair(i, 0, i, ((0, 0, 0), (511, 511, 159)), True, True) for i in range(3)]
    assert [len(members) for _, members in _buckets(big)] == [1, 1, 1]


# ------------------------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("convention", ["monai", "deepmind"])
def test_cuda_matches_cpu(convention):
    p, t, spacing = batch_case(seed=11)
    cpu = surface_metrics(p, t, spacing=spacing, tolerance=[1.0, 2.0], convention=convention)
    gpu = surface_metrics(torch.from_numpy(p).cuda(), torch.from_numpy(t).cuda(), spacing=spacing,
                          tolerance=[1.0, 2.0], convention=convention)
    for k in METRIC_KEYS:
        assert gpu[k].is_cuda
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], equal_nan=True, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- real data


def _scans():
    if not DATA.is_dir():
        return []
    scans = sorted(p.name for p in (DATA / "oncologist").iterdir() if p.is_dir())
    return scans if os.environ.get("FASTSEG_FULL_DATA") == "1" else scans[:2]


def _load_scan(nrrd, scan):
    """(organs, pred (1, O, z, y, x) bool, target likewise, spacing (z, y, x)) for one scan."""
    organs = sorted(p.stem for p in (DATA / "oncologist" / scan / "segmentations").glob("*.nrrd"))
    stacks, spacing = [], None
    for annotator in ("radiographer", "oncologist"):
        masks = []
        for organ in organs:
            data, header = nrrd.read(str(DATA / annotator / scan / "segmentations" / f"{organ}.nrrd"), index_order="C")
            masks.append(data != 0)
            spacing = tuple(float(v) for v in np.abs(np.diag(header["space directions"]))[::-1])
        stacks.append(np.stack(masks)[None])
    return organs, stacks[0], stacks[1], spacing


def _crop_pair(p, g, margin=2):
    """Both masks cropped to their union's box plus a margin: MONAI's and surface-distance's results do not
    depend on it (they crop to that box themselves), and their references run much faster on it."""
    union = p | g
    if not union.any():
        return p[:1, :1, :1], g[:1, :1, :1]
    idx = []
    for axis in range(3):
        hit = np.nonzero(union.any(tuple(a for a in range(3) if a != axis)))[0]
        idx.append(slice(max(hit[0] - margin, 0), hit[-1] + margin + 1))
    return p[tuple(idx)], g[tuple(idx)]


@pytest.mark.slow
@pytest.mark.parametrize("scan", _scans() or ["(data absent)"])
def test_real_scan_matches_monai_and_surface_distance(scan, monkeypatch):
    nrrd = pytest.importorskip("nrrd", reason="pynrrd not installed (scripts/install.sh --test installs it)")
    if not DATA.is_dir():
        pytest.skip(f"{DATA} not found")
    organs, pred, target, spacing = _load_scan(nrrd, scan)
    taus = (1.0, 2.0)

    def ours_by(devices):
        monkeypatch.setattr(_surface_module, "BATCHED_DEVICE_TYPES", devices)
        return {conv: surface_metrics(pred, target, spacing=spacing, tolerance=list(taus), convention=conv,
                                      include_background=True) for conv in ("monai", "deepmind")}

    paths = {"per_pair": ours_by(("cuda",)), "batched": ours_by(("cuda", "cpu"))}
    p_t, g_t = torch.from_numpy(pred), torch.from_numpy(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(include_background=True, spacing=list(spacing))
        compat = dict(hd=cmm.compute_hausdorff_distance(p_t, g_t, **kw),
                      hd_percentile=cmm.compute_hausdorff_distance(p_t, g_t, percentile=95, **kw),
                      assd=cmm.compute_average_surface_distance(p_t, g_t, symmetric=True, **kw),
                      nsd=cmm.compute_surface_dice(p_t, g_t, [taus[1]] * len(organs), **kw),
                      nsd_subvoxels=cmm.compute_surface_dice(p_t, g_t, [taus[1]] * len(organs), use_subvoxels=True,
                                                             **kw))
    for i, organ in enumerate(organs):
        p, g = _crop_pair(pred[0, i], target[0, i])
        refs = {conv: reference(p, g, spacing, 95, taus) for conv, reference in REFERENCES.items()}
        for (path, ours), (conv, ref) in itertools.product(paths.items(), refs.items()):
            got = {k: v[0, i].tolist() for k, v in ours[conv].items()}
            assert_metrics_close(got, ref, f"{scan} {organ} {conv} {path}")
        # The drop-ins against the same MONAI values; MONAI's use_subvoxels is surface-distance's surface Dice.
        for key in ("hd", "hd_percentile", "assd"):
            want = refs["monai"][key]
            if key == "hd_percentile" and p.any() != g.any():
                want = math.nan  # the drop-in keeps MONAI's nan (#9095)
            assert compat[key][0, i].item() == pytest.approx(want, abs=DIST_TOL, nan_ok=True), organ
        assert compat["nsd"][0, i].item() == pytest.approx(refs["monai"]["nsd"][1], abs=RATIO_TOL, nan_ok=True), organ
        assert compat["nsd_subvoxels"][0, i].item() == pytest.approx(refs["deepmind"]["nsd"][1], abs=RATIO_TOL,
                                                                     nan_ok=True), organ
