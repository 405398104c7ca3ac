"""Exact imbalance analysis (fastseg.imbalance) against a brute-force count over every patch position and
every foreground-voxel choice of small 2D and 3D label maps (padding, ignore label, absent classes, cases
without foreground, several shapes) on the compiled op and on its reference, the op against the
reference on larger maps (dtypes, threads, opcheck), oversampling mixtures, the score formula,
the patch-size recommendation under a memory budget, the memory estimate (analytic count and torch's CPU
memory profiler), a Monte-Carlo cross-check with fastseg.data.sampling.PatchSampler, the outputs, and
argument errors.

Real data (slow): ../shared/data/tcia-han-oar, a few organs of one scan; skipped without it or pynrrd.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fastseg.imbalance as imb
import fastseg.ops.imbalance
from fastseg import _extension
from fastseg.ops.imbalance import reference_patch_stats
from fastseg.imbalance import ImbalanceReport, analyze_imbalance, estimate_training_memory

TOL = 1e-12
DATA = Path(os.environ.get("FASTSEG_DATA", Path(__file__).resolve().parents[2] / "shared/data/tcia-han-oar"))


# ------------------------------------------------------------------------------------------- oracle


def brute_force_case(label, patch, num_classes, ignore_label=None):
    """Expected counts and presence of each class under random and under foreground patches, by listing
    every position and every (class, voxel) choice of the sampler, written straight from the contract."""
    label = np.asarray(label)
    patch = tuple(patch)
    padded = tuple(max(s, p) for s, p in zip(label.shape, patch))
    before = tuple((q - s) // 2 for q, s in zip(padded, label.shape))
    canvas = np.zeros(padded, label.dtype)
    canvas[tuple(slice(b, b + s) for b, s in zip(before, label.shape))] = label

    def content(lo):
        box = canvas[tuple(slice(l, l + p) for l, p in zip(lo, patch))].ravel()
        if ignore_label is not None:
            box = box[box != ignore_label]
        return np.bincount(box, minlength=num_classes)[:num_classes].astype(float)

    table = {lo: content(lo) for lo in itertools.product(*[range(q - p + 1) for q, p in zip(padded, patch)])}
    rand_count = sum(table.values()) / len(table)
    rand_present = sum((t > 0).astype(float) for t in table.values()) / len(table)
    classes = [c for c in np.unique(label) if c != 0 and c != ignore_label]
    if not classes:
        return rand_count, rand_present, rand_count, rand_present
    fg_count, fg_present = np.zeros(num_classes), np.zeros(num_classes)
    for c in classes:
        voxels = np.argwhere(canvas == c)
        for v in voxels:
            lo = tuple(int(min(max(x - p // 2, 0), q - p)) for x, p, q in zip(v, patch, padded))
            weight = 1.0 / (len(classes) * len(voxels))
            fg_count += weight * table[lo]
            fg_present += weight * (table[lo] > 0)
    return rand_count, rand_present, fg_count, fg_present


def centred_patches(labels, patch, num_classes, ignore_label=None):
    """Per case and foreground class c: (c, the patch content at every voxel of c), from the contract (the
    case padded with background to the patch, centred; the patch centred on the voxel, clipped)."""
    patch = tuple(patch)
    for label in labels:
        label = np.asarray(label)
        padded = tuple(max(s, p) for s, p in zip(label.shape, patch))
        before = tuple((q - s) // 2 for q, s in zip(padded, label.shape))
        canvas = np.zeros(padded, label.dtype)
        canvas[tuple(slice(b, b + s) for b, s in zip(before, label.shape))] = label
        for c in range(1, num_classes):
            if c == ignore_label or not (canvas == c).any():
                continue
            boxes = []
            for v in np.argwhere(canvas == c):
                lo = [int(min(max(x - p // 2, 0), q - p)) for x, p, q in zip(v, patch, padded)]
                boxes.append(canvas[tuple(slice(l, l + p) for l, p in zip(lo, patch))])
            yield c, boxes


def brute_force_coverage(labels, patch, num_classes, ignore_label=None):
    """Organ coverage from the contract: per class, the mean over its voxels of the share of its voxels in
    the foreground patch drawn at that voxel, averaged over the cases containing the class; nan elsewhere."""
    per_class = [[] for _ in range(num_classes)]
    for c, boxes in centred_patches(labels, patch, num_classes, ignore_label):
        per_class[c].append(np.mean([(box == c).sum() / len(boxes) for box in boxes]))
    return np.array([np.mean(v) if v else np.nan for v in per_class])


def brute_force_co_presence(labels, patch, num_classes, ignore_label=None):
    """[s, c]: the probability that the foreground patch drawn at a uniform voxel of class s holds class c
    (background: a 0 voxel, padding included), averaged over the cases containing s; nan rows elsewhere."""
    per_class = [[] for _ in range(num_classes)]
    for c, boxes in centred_patches(labels, patch, num_classes, ignore_label):
        per_class[c].append(np.mean([[(box == d).any() for d in range(num_classes)] for box in boxes], axis=0))
    return np.array([np.mean(v, axis=0) if v else np.full(num_classes, np.nan) for v in per_class])


def brute_force(labels, patch, num_classes, ignore_label=None):
    """Data-set averages: (fraction random, presence random, fraction foreground, presence foreground)."""
    per_case = [brute_force_case(l, patch, num_classes, ignore_label) for l in labels]
    volume = math.prod(patch)
    fr, pr, ff, pf = (np.mean([c[k] for c in per_case], axis=0) for k in range(4))
    return fr / volume, pr, ff / volume, pf


def score_formula(fraction, presence, scored, batch_size):
    """The module docstring's score, written out."""
    s = list(np.flatnonzero(scored))
    if 0 not in s:
        s = [0] + s
    k = len(s)
    fg = [c for c in s if c != 0]
    share = sum(math.log(k * fraction[c]) ** 2 for c in s) / k
    absent = sum((1 - presence[c]) / (batch_size * presence[c]) for c in fg) / len(fg) if fg else 0.0
    return math.sqrt(share + absent)


# ------------------------------------------------------------------------------------------- data


def blobs(rng, shape, classes, density=0.5, ignore_label=None):
    """A label map of random boxes (overlapping, painted in order) plus scattered single voxels."""
    label = np.zeros(shape, np.int64)
    for c in list(classes) + ([ignore_label] if ignore_label is not None else []):
        for _ in range(int(rng.integers(1, 3))):
            lo = [int(rng.integers(0, s)) for s in shape]
            size = [int(rng.integers(1, max(2, s // 2 + 1))) for s in shape]
            label[tuple(slice(a, a + b) for a, b in zip(lo, size))] = c
    speckle = rng.random(shape) < 0.05 * density
    label[speckle] = rng.choice(list(classes), size=int(speckle.sum()))
    return label


@pytest.fixture(params=["op", "reference"])
def impl(request, monkeypatch):
    """Run the analysis on the compiled fastseg::patch_stats or on its pure-PyTorch reference."""
    if request.param == "op":
        if not _extension.available():
            pytest.skip(f"compiled extension not loaded: {_extension.unavailable_reason()}")
    else:
        monkeypatch.setattr(imb, "patch_stats", reference_patch_stats)
    return request.param


def check_against_oracle(labels, patches, num_classes, ignore_label=None, ratios=(0.0, 1 / 3, 1.0)):
    report = analyze_imbalance(labels, patches, oversample_foreground=ratios, num_classes=num_classes,
                               ignore_label=ignore_label)
    for k, patch in enumerate(patches):
        fr, pr, ff, pf = brute_force(labels, patch, num_classes, ignore_label)
        np.testing.assert_allclose(report.fraction_random[k], fr, rtol=0, atol=TOL)
        np.testing.assert_allclose(report.presence_random[k], pr, rtol=0, atol=TOL)
        np.testing.assert_allclose(report.fraction_foreground[k], ff, rtol=0, atol=TOL)
        np.testing.assert_allclose(report.presence_foreground[k], pf, rtol=0, atol=TOL)
        np.testing.assert_allclose(report.coverage[k], brute_force_coverage(labels, patch, num_classes, ignore_label),
                                   rtol=0, atol=TOL)
        np.testing.assert_allclose(report.co_presence[k],
                                   brute_force_co_presence(labels, patch, num_classes, ignore_label), rtol=0, atol=TOL)
        for j, o in enumerate(ratios):
            np.testing.assert_allclose(report.fraction[k, j], (1 - o) * fr + o * ff, rtol=0, atol=TOL)
            np.testing.assert_allclose(report.presence[k, j], (1 - o) * pr + o * pf, rtol=0, atol=TOL)
    return report


# ------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("ndim", [2, 3])
def test_random_maps_match_brute_force(ndim, impl):
    rng = np.random.default_rng(10 + ndim)
    for trial in range(12):
        num_classes = int(rng.integers(2, 5))
        labels = []
        for _ in range(int(rng.integers(1, 4))):
            shape = tuple(int(s) for s in rng.integers(1, 9 if ndim == 3 else 14, size=ndim))
            labels.append(blobs(rng, shape, range(1, num_classes)))
        patches = [tuple(int(p) for p in rng.integers(1, 10, size=ndim)) for _ in range(2)]
        check_against_oracle(labels, patches, num_classes)


def test_padding_ignore_absent_and_empty_cases(impl):
    # case 0 smaller than the patch on two axes (padded), case 1 without foreground, case 2 with the ignore
    # label and a class (3) that no other case has; class 4 occurs nowhere
    rng = np.random.default_rng(3)
    a = blobs(rng, (3, 5, 4), [1, 2])
    b = np.zeros((9, 6, 7), np.int64)
    c = blobs(rng, (8, 7, 10), [1, 3], ignore_label=9)
    b[0, 0, 0] = 9  # only ignored voxels: still no foreground
    report = check_against_oracle([a, b, c], [(6, 4, 5), (9, 7, 11), (1, 1, 1)], num_classes=5, ignore_label=9)
    assert not report.scored[4] and report.scored[3]
    assert np.all(report.presence[..., 4] == 0) and np.all(report.fraction[..., 4] == 0)
    # shares of the classes and of the ignored voxels add up to one
    ignored = 1 - report.fraction.sum(-1)
    assert np.all(ignored > 0)


def test_long_last_axis_bit_packing(impl):
    # positions along the last axis are bit-packed: runs across byte boundaries, clipped ends with several
    # voxels, a patch longer than the case
    rng = np.random.default_rng(5)
    labels = [blobs(rng, (4, 5, 41), [1, 2, 3]), blobs(rng, (3, 6, 23), [2, 3])]
    check_against_oracle(labels, [(2, 3, 9), (3, 2, 30), (4, 4, 1), (2, 2, 47)], num_classes=4)
    labels2d = [blobs(rng, (5, 70), [1, 2]), blobs(rng, (6, 33), [1])]
    check_against_oracle(labels2d, [(2, 17), (3, 40)], num_classes=3)


def test_patch_inside_organs_leaves_out_background(impl):
    # organs larger than the patch: some patches hold no background, so its presence is below one
    label = np.zeros((10, 9, 8), np.int64)
    label[1:8, 1:8, 1:7] = 1
    label[4:9, 2:6, 3:8] = 2
    report = check_against_oracle([label], [(3, 3, 2), (8, 8, 5)], num_classes=3)
    assert report.presence_random[0, 0] < 1 and report.presence_foreground[0, 0] < 1
    assert report.presence_random[1, 0] == 1


def test_one_dimensional_maps(impl):
    rng = np.random.default_rng(8)
    labels = [blobs(rng, (n,), [1, 2]) for n in (5, 17, 30)]
    check_against_oracle(labels, [(4,), (20,), (1,)], num_classes=3)


def test_score_follows_its_definition():
    rng = np.random.default_rng(11)
    labels = [blobs(rng, (7, 8, 6), [1, 2, 3]), blobs(rng, (6, 6, 9), [1, 3])]
    patches = [(3, 3, 3), (5, 4, 6)]
    report = analyze_imbalance(labels, patches, oversample_foreground=(0.0, 0.25), num_classes=5, batch_size=3)
    for k, patch in enumerate(patches):
        fr, pr, ff, pf = brute_force(labels, patch, 5)
        for j, o in enumerate((0.0, 0.25)):
            expected = score_formula((1 - o) * fr + o * ff, (1 - o) * pr + o * pf, [True] * 4 + [False], 3)
            assert report.score[k, j] == pytest.approx(expected, rel=1e-12)
            assert report.score[k, j] ** 2 == pytest.approx(report.share_term[k, j] + report.presence_term[k, j])


# ------------------------------------------------------------------------------------------- the op

needs_op = pytest.mark.skipif(not _extension.available(), reason="compiled extension not loaded")


def larger_maps(rng):
    """Maps too large for the brute force: long rows (several 64-bit words), organs larger than patches."""
    yield blobs(rng, (12, 30, 150), range(1, 6)), 6, None
    yield blobs(rng, (25, 40, 33), range(1, 4), ignore_label=7), 4, 7
    yield blobs(rng, (70, 130), range(1, 5)), 5, None
    yield blobs(rng, (15, 18, 66), [1, 3], ignore_label=2), 4, 2  # an ignore label inside the class range
    solid = np.ones((9, 20, 70), np.int64)
    solid[2:5, 3:15, 10:60] = 2
    yield solid, 3, None


@needs_op
def test_op_matches_reference_on_larger_maps():
    rng = np.random.default_rng(21)
    for label, C, ignore in larger_maps(rng):
        nd = label.ndim
        sizes = [tuple(int(p) for p in rng.integers(1, 2 * max(label.shape), size=nd)) for _ in range(3)]
        sizes += [(1,) * nd, tuple(label.shape), tuple(s + 65 for s in label.shape)]
        got, got_counts, got_joint = fastseg.ops.imbalance.patch_stats(label, sizes, C, ignore)
        want, want_counts, want_joint = reference_patch_stats(label, sizes, C, ignore)
        assert torch.equal(got_counts, want_counts)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(got_joint.numpy(), want_joint.numpy(), rtol=1e-12, atol=1e-12)


@needs_op
def test_op_accepts_every_label_dtype():
    rng = np.random.default_rng(22)
    label = blobs(rng, (7, 9, 80), [1, 2])
    sizes = [(3, 4, 20), (8, 8, 100)]
    want = fastseg.ops.imbalance.patch_stats(label, sizes, 3)
    for dtype in (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.uint64):
        got = fastseg.ops.imbalance.patch_stats(label.astype(dtype), sizes, 3)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), dtype
    for dtype in (torch.uint16, torch.uint32, torch.uint64):
        got = fastseg.ops.imbalance.patch_stats(torch.from_numpy(label).to(dtype), sizes, 3)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), dtype
    mask = label > 0
    got = fastseg.ops.imbalance.patch_stats(torch.from_numpy(mask), sizes, 2)
    ref = reference_patch_stats(mask.astype(np.int64), sizes, 2)
    np.testing.assert_allclose(got[0].numpy(), ref[0].numpy(), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(got[2].numpy(), ref[2].numpy(), rtol=1e-12, atol=1e-12)


@needs_op
def test_op_does_not_depend_on_the_thread_count():
    rng = np.random.default_rng(23)
    label = blobs(rng, (20, 40, 90), range(1, 8))
    sizes = [(8, 16, 32), (16, 32, 64), (4, 4, 4), (20, 40, 90)]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(fastseg.ops.imbalance.patch_stats(label, sizes, 8))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@needs_op
def test_op_errors_and_opcheck():
    label = torch.zeros((4, 5, 6), dtype=torch.uint8)
    label[1, 2, 3] = 3
    op = torch.ops.fastseg.patch_stats
    with pytest.raises(ValueError, match=r"label values must lie in \[0, num_classes=3\)"):
        op(label, [2, 2, 2], 3, None)
    op(label, [2, 2, 2], 3, 3)  # the same value as ignore_label is fine
    with pytest.raises(ValueError, match="1 to 3 spatial axes"):
        op(label[None, None], [2, 2, 2, 2, 2], 4, None)
    with pytest.raises(ValueError, match="patch_sizes must hold K \\* 3"):
        op(label, [2, 2], 4, None)
    with pytest.raises(ValueError, match="patch sizes must be >= 1"):
        op(label, [2, 0, 2], 4, None)
    with pytest.raises(ValueError, match="must hold integers"):
        op(label.float(), [2, 2, 2], 4, None)
    with pytest.raises(ValueError, match="ignore_label must not be 0"):
        op(label, [2, 2, 2], 4, 0)
    torch.library.opcheck(op, (label.long(), [2, 3, 4, 5, 5, 7], 4, None))
    torch.library.opcheck(op, (label, [3, 3, 3], 3, 3))


def test_workers_give_the_same_result():
    rng = np.random.default_rng(12)
    labels = [blobs(rng, (9, 8, 7), [1, 2]) for _ in range(3)]
    serial = analyze_imbalance(labels, [(4, 4, 4)], num_classes=3)
    parallel = analyze_imbalance(labels, [(4, 4, 4)], num_classes=3, num_workers=2)
    np.testing.assert_array_equal(serial.presence, parallel.presence)
    np.testing.assert_array_equal(serial.fraction, parallel.fraction)


def test_matches_the_sampler_monte_carlo():
    sampling = pytest.importorskip("fastseg.data.sampling")
    rng = np.random.default_rng(13)
    labels = [blobs(rng, (14, 12, 9), [1, 2, 3]), blobs(rng, (10, 16, 7), [2, 3]), np.zeros((6, 6, 6), np.int64)]
    patch, ratio, draws = (6, 5, 4), 1 / 3, 12000
    report = analyze_imbalance(labels, [patch], oversample_foreground=ratio, num_classes=4)
    sampler = sampling.PatchSampler(patch, oversample_foreground=ratio)
    locations = [sampler.locations(l) for l in labels]
    padded = []
    for l, loc in zip(labels, locations):
        canvas = np.zeros(loc.padded_shape, l.dtype)
        canvas[tuple(slice(b, b + s) for b, s in zip(loc.pad_before, l.shape))] = l
        padded.append(canvas)
    hits = np.zeros(4)
    for i in range(draws):
        draw_rng = np.random.default_rng([2024, i])
        case = int(draw_rng.integers(len(labels)))
        lo, _ = sampler.sample_lower_corner(locations[case], draw_rng)
        box = padded[case][tuple(slice(a, a + p) for a, p in zip(lo, patch))]
        hits += np.bincount(box.ravel(), minlength=4) > 0
    exact = report.presence[0, 0]
    sigma = np.sqrt(exact * (1 - exact) / draws)
    assert np.all(np.abs(hits / draws - exact) <= 4.5 * sigma + 1e-12), (hits / draws, exact)


# ------------------------------------------------------------------------------------------- recommendation


def small_report(**kwargs) -> ImbalanceReport:
    rng = np.random.default_rng(21)
    labels = [blobs(rng, (24, 20, 12), [1, 2, 3]), blobs(rng, (20, 22, 10), [1, 2, 3])]
    patches = [(4, 4, 4), (8, 8, 4), (16, 16, 8), (24, 24, 12)]
    return analyze_imbalance(labels, patches, num_classes=4, spacing=(1.0, 1.0, 2.0), **kwargs)


def test_best_respects_the_memory_budget():
    report = small_report()
    memory = lambda patch: 1000 * math.prod(patch)  # noqa: E731 - bytes per voxel of a toy network
    unconstrained = report.best()
    assert unconstrained.memory_bytes is None
    assert unconstrained.score == pytest.approx(np.nanmin(report.score))
    for budget_voxels in (64, 256, 2048, 10 ** 6):
        budget_gb = 1000 * budget_voxels / 2 ** 30
        rec = report.best(budget_gb, memory)
        fits = [i for i, p in enumerate(report.patch_sizes) if math.prod(p) <= budget_voxels]
        assert rec.patch_size in [report.patch_sizes[i] for i in fits]
        assert rec.memory_bytes == memory(rec.patch_size) <= rec.memory_budget_bytes
        assert rec.score == pytest.approx(report.score[fits].min())
    only = report.best(1, memory, oversample_foreground=0.0)
    assert only.oversample_foreground == 0.0
    with pytest.raises(ValueError, match=r"memory_budget_gb: no candidate patch size fits .* smallest estimate"):
        report.best(1e-9, memory)


def test_partner_in_view_follows_the_patch_width():
    # two "orbits" 24 voxels apart along axis 0 and a midline organ: a patch narrower than their distance
    # never shows both sides, one wider than twice it always does
    label = np.zeros((48, 20, 10), np.int64)
    label[10:14, 8:12, 4:6] = 1   # Orbit-Lt
    label[34:38, 8:12, 4:6] = 2   # Orbit-Rt
    label[20:28, 2:6, 2:8] = 3    # Brain
    names = ["background", "Orbit-Lt", "Orbit-Rt", "Brain"]
    patches = [(16, 8, 4), (64, 20, 10)]
    report = analyze_imbalance([label], patches, num_classes=4, class_names=names)
    assert report.co_presence[0, 1, 2] == 0 and report.co_presence[0, 2, 1] == 0
    assert report.co_presence[1, 1, 2] == 1 and report.co_presence[1, 2, 1] == 1
    assert np.isnan(report.co_presence[:, 0]).all() and np.all(report.co_presence[:, 1:, 0] == 1)
    organ, partner, p = report.least_seen_partner(0)
    assert {organ, partner} == {1, 2} and p == 0
    assert report.least_seen_partner(1)[2] == 1
    table = report.table(per_class=False)
    assert "partner in view" in table and "(0.0 %)" in table and "(100.0 %)" in table
    assert json.loads(json.dumps(report.to_dict()))["co_presence"][0][1][2] == 0
    plain = analyze_imbalance([label], patches, num_classes=4)  # no side names: no pairs, no column
    assert plain.least_seen_partner(0)[0] is None and "partner in view" not in plain.table(per_class=False)


def test_min_coverage_keeps_the_organs_in_view():
    # a 20x20x10 organ and a 2-voxel one: oversampling makes the smallest patch the most balanced, but its
    # patches show a fraction of the large organ
    label = np.zeros((40, 40, 20), np.int64)
    label[10:30, 10:30, 5:15] = 1
    label[2, 2, 1:3] = 2
    patches = [(8, 8, 4), (16, 16, 8), (32, 32, 16)]
    report = analyze_imbalance([label], patches, oversample_foreground=1 / 3, num_classes=3)
    assert np.isnan(report.coverage[:, 0]).all() and np.all(report.coverage[:, 2] == 1)
    assert np.all(np.diff(report.coverage[:, 1]) > 0) and report.coverage[2, 1] == 1
    assert report.least_covered(0) == (1, report.coverage[0, 1])
    assert report.best().patch_size == (8, 8, 4)
    for need in (0.2, 0.5, 0.99):
        allowed = [i for i in range(3) if report.coverage[i, 1] >= need]
        expected = min(allowed, key=lambda i: report.score[i, 0])
        assert report.best(min_coverage=need).patch_size == patches[expected]
    small = analyze_imbalance([label], patches[:2], oversample_foreground=1 / 3, num_classes=3)
    with pytest.raises(ValueError, match=r"best: min_coverage: no candidate patch size shows every organ 1 of "
                                         r"itself; the best is 16x16x8, whose least covered organ 1 gets 0\.[0-9]+"):
        small.best(min_coverage=1.0)
    for bad in (0, 1.5, True, "half"):
        with pytest.raises(ValueError, match=r"best: min_coverage: expected a share in \(0, 1\] or None"):
            report.best(min_coverage=bad)


def test_best_defaults_to_the_reference_unet():
    pytest.importorskip("fastseg.models")
    from fastseg.models import UNet

    report = small_report()
    rec = report.best(memory_budget_gb=64)
    net = UNet.from_patch_size(1, 4, rec.patch_size, (1.0, 1.0, 2.0))
    assert rec.memory_bytes == estimate_training_memory(net, net.padded_patch_size(rec.patch_size))
    assert rec.memory_bytes <= rec.memory_budget_bytes
    assert set(report.memory_bytes) == set(report.patch_sizes)
    assert "memory GiB" in report.table()


def _aspect_memory(patch):
    """A toy estimate that, like real network plans, is not affine in the voxel count (+-10 % with the aspect)."""
    return int(1000 * math.prod(patch) * (1 + 0.1 * math.sin(patch[0] / 7 + patch[2] / 5)))


def _grid(shapes, steps=8, multiple=8):
    """budget_patch_sizes' grid, from its docstring: k / steps of the median extent, k = 2..steps, rounded."""
    median = np.median(np.asarray(shapes, np.float64), axis=0)
    return list(itertools.product(*[sorted({max(multiple, int(round(n * k / steps / multiple)) * multiple)
                                            for k in range(2, steps + 1)}) for n in median]))


@pytest.mark.parametrize("fill", [0.5, 0.85, 1.0])
def test_budget_patch_sizes_are_the_grid_shapes_that_use_the_budget(fill):
    shapes = [(120, 100, 60), (130, 96, 64), (126, 104, 56)]
    grid = _grid(shapes)
    budget = 0.3 * _aspect_memory(max(grid, key=math.prod))
    got = imb.budget_patch_sizes(shapes, _aspect_memory, budget / 2 ** 30, min_fill=fill)
    assert got == sorted(got, key=lambda s: (math.prod(s), s))
    assert all(p % 8 == 0 for s in got for p in s)
    band = {s for s in grid if fill * budget <= _aspect_memory(s) <= budget}
    if fill < 1:
        assert set(got) == band and len(band) > 1
    else:  # nothing costs the budget exactly: the shape that comes closest
        assert not band and got == [max((s for s in grid if _aspect_memory(s) <= budget), key=_aspect_memory)]
    if fill == 0.5:  # many aspects of about the same cost, not one shape scaled
        assert len({tuple(np.round(np.divide(s, s[0]), 3)) for s in got}) > 5


def test_budget_patch_sizes_with_more_budget_than_the_case_needs():
    shapes = [(64, 64, 32)]
    whole = _aspect_memory((64, 64, 32))
    got = imb.budget_patch_sizes(shapes, _aspect_memory, 100 * whole / 2 ** 30)
    assert (64, 64, 32) in got and all(_aspect_memory(s) >= 0.85 * whole for s in got)


def test_budget_patch_sizes_of_large_cases_under_a_small_budget():
    """Where a quarter of the median case does not fit, the grid of the halved extent (once more, if need be)."""
    shapes = [(256, 224, 128)]
    quarter = _grid(shapes)[0]
    budget = 0.3 * _aspect_memory(quarter)
    got = imb.budget_patch_sizes(shapes, _aspect_memory, budget / 2 ** 30)
    halved = [s for s in _grid([(128, 112, 64)]) if 0.85 * budget <= _aspect_memory(s) <= budget]
    assert got and set(got) == set(halved) and all(math.prod(s) < math.prod(quarter) for s in got)


def test_budget_patch_sizes_errors():
    shapes = [(64, 64, 32)]
    with pytest.raises(ValueError, match=r"budget_patch_sizes: memory_budget_gb: no patch size fits 1e-09 GiB; "
                                         r"the smallest estimate is .* for 8x8x8"):
        imb.budget_patch_sizes(shapes, _aspect_memory, 1e-9)
    for kwargs, message in (({"min_fill": 0}, r"min_fill: expected a share in \(0, 1\]"),
                            ({"min_fill": 1.5}, r"min_fill: expected a share in \(0, 1\]"),
                            ({"steps": 2}, r"steps: expected an integer >= 4"),
                            ({"multiple": 0}, r"multiple: expected an integer >= 1")):
        with pytest.raises(ValueError, match="budget_patch_sizes: " + message):
            imb.budget_patch_sizes(shapes, _aspect_memory, 1.0, **kwargs)
    with pytest.raises(ValueError, match=r"memory_budget_gb: expected a positive number of GiB, got -1"):
        imb.budget_patch_sizes(shapes, _aspect_memory, -1)
    with pytest.raises(ValueError, match=r"memory_fn: expected a callable"):
        imb.budget_patch_sizes(shapes, 3, 1.0)


def test_unet_memory_fn_is_the_reference_estimate():
    from fastseg.models import UNet

    fn = imb.unet_memory_fn((1.0, 1.0, 2.0), 4, base_features=4, max_features=16)
    net = UNet.from_patch_size(1, 4, (20, 16, 8), (1.0, 1.0, 2.0), base_features=4, max_features=16)
    assert fn([20, 16, 8]) == estimate_training_memory(net, net.padded_patch_size((20, 16, 8)))


def test_auto_patch_sizes_are_the_budget_shapes_at_the_size_the_network_trains_on():
    from fastseg.models import trained_patch_size

    spacing, shapes, net = (1.0, 1.0, 2.0), [(100, 90, 44), (110, 84, 40)], {"base_features": 4, "max_features": 16}
    memory = imb.unet_memory_fn(spacing, 4, **net)
    budget = 0.3 * memory((104, 88, 40))
    calls = []
    got = imb.auto_patch_sizes(shapes, spacing=spacing, num_classes=4, memory_budget_gb=budget / 2 ** 30,
                               memory_fn=lambda p: calls.append(p) or memory(p), **net)
    raw = imb.budget_patch_sizes(shapes, memory, budget / 2 ** 30)
    trained = [trained_patch_size(s, spacing, **net) for s in raw]
    assert calls and trained != raw  # the given estimate is used; some grid shapes train larger
    assert got == list(dict.fromkeys(trained)) and len(set(got)) == len(got)
    assert all(trained_patch_size(s, spacing, **net) == s and memory(s) <= budget for s in got)
    assert got == imb.auto_patch_sizes(shapes, spacing=spacing, num_classes=4, memory_budget_gb=budget / 2 ** 30,
                                       **net)


# ------------------------------------------------------------------------------------------- memory


def test_memory_estimate_counts_a_tiny_net_exactly():
    # conv (saves its input) -> ReLU (saves its output) -> 1x1 conv (saves the same ReLU output); the
    # logits are saved by nothing. P = parameter bytes, V = voxels
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv3d(4, 2, 1))
    batch, voxels, params = 2, 8 * 8 * 8, (4 * 27 + 2 * 4 + 2) * 4
    saved, outputs, largest = 4 * batch * voxels * (1 + 4), 4 * batch * voxels * 2, 4 * batch * voxels * 4
    expected = max(3 * params + saved + outputs + 2 * largest, 5 * params)
    assert estimate_training_memory(net, (8, 8, 8), batch_size=batch) == expected
    # a network whose parameters dominate: Adam's update is the peak
    fat = nn.Sequential(nn.Conv3d(1, 512, 3, padding=1), nn.Conv3d(512, 512, 3, padding=1))
    fat_params = sum(p.numel() for p in fat.parameters()) * 4
    assert estimate_training_memory(fat, (2, 2, 2), batch_size=1) == 5 * fat_params
    # the model itself is untouched (no copy of its data, still on the CPU)
    assert next(net.parameters()).device.type == "cpu"


def _measured_peak(net: nn.Module, shape) -> int:
    """Peak tensor memory of the second Adam step on the CPU, from torch's memory profiler."""
    timeline = pytest.importorskip("torch.profiler._memory_profiler").MemoryProfileTimeline
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(shape)
    y = torch.randint(0, 2, (shape[0],) + tuple(shape[2:]))

    def step():
        out = net(x)
        outs = out if isinstance(out, list) else [out]
        loss = sum(nn.functional.cross_entropy(o, nn.functional.interpolate(
            y[:, None].float(), size=o.shape[2:]).long()[:, 0]) for o in outs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = timeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(np.asarray(sizes).sum(axis=1).max())


@pytest.mark.slow
@pytest.mark.parametrize("features,shape", [((16, 32, 64, 128), (2, 1, 48, 48, 32)),   # activations dominate
                                            ((32, 64, 128, 256), (1, 1, 16, 16, 16))])  # parameters dominate
def test_memory_estimate_against_a_measured_cpu_step(features, shape):
    from fastseg.models import UNet

    torch.manual_seed(0)
    net = UNet(1, 2, features=features)
    estimate = estimate_training_memory(net, shape[2:], batch_size=shape[0])
    measured = _measured_peak(net, shape)
    assert 0.8 <= estimate / measured <= 1.25, (estimate, measured)


# ------------------------------------------------------------------------------------------- outputs


def test_table_json_and_plot(tmp_path):
    report = small_report(class_names=["background", "a", "b", "c"])
    text = report.table()
    # summary rows and per-class rows, one per (patch size, ratio)
    assert text.count("\n| 4x4x4 |") == 4 and "least present class" in text and "| background | a | b | c |" in text
    assert "4x4x8" in text  # patch in mm with the spacing
    out = report.to_json(tmp_path / "imbalance.json")
    data = json.loads(out.read_text())
    assert data["patch_sizes"][1] == [8, 8, 4] and data["class_names"][1] == "a"
    np.testing.assert_allclose(data["presence"], report.presence)
    assert data["coverage"][0][0] is None  # the background has no coverage: nan, written as null
    np.testing.assert_allclose(np.array(data["coverage"], float)[:, 1:], report.coverage[:, 1:])
    assert "least covered organ" in text
    png = report.plot(tmp_path / "imbalance.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imbalance.json", "imbalance.png"]


def test_json_write_is_atomic(tmp_path, monkeypatch):
    report = small_report()
    target = tmp_path / "r.json"
    target.write_text("old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", boom)
    with pytest.raises(OSError, match="disk full"):
        report.to_json(target)
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ------------------------------------------------------------------------------------------- errors


def test_argument_errors():
    lab = np.zeros((6, 6, 6), np.int64)
    lab[2:4, 2:4, 2:4] = 1
    ok = dict(num_classes=2)
    cases = [
        (dict(label_maps=[lab], patch_sizes=[(4, 0, 4)]), r"patch_sizes\[0\]: expected 3 positive integers"),
        (dict(label_maps=[lab], patch_sizes=[(4, 4)]), r"patch_sizes\[0\]: expected 3 positive integers"),
        (dict(label_maps=[lab], patch_sizes=[(4, 4, 4.5)]), r"patch_sizes\[0\]: expected 3 positive integers"),
        (dict(label_maps=[lab], patch_sizes=[(4, 4, -1)]), r"patch_sizes\[0\]"),
        (dict(label_maps=[lab], patch_sizes=(4, 4, 4)), r"patch_sizes: .*for one size write \[\(4, 4, 4\)\]"),
        (dict(label_maps=[lab], patch_sizes=[]), r"patch_sizes: expected a non-empty sequence"),
        (dict(label_maps=[], patch_sizes=[(4, 4, 4)]), r"label_maps: expected a non-empty sequence"),
        (dict(label_maps=lab, patch_sizes=[(4, 4, 4)]), r"label_maps: expected a non-empty sequence"),
        (dict(label_maps=[lab.astype(float)], patch_sizes=[(4, 4, 4)]),
         r"label_maps\[0\]: expected a non-empty integer"),
        (dict(label_maps=[lab, lab[0]], patch_sizes=[(4, 4, 4)]), r"label_maps\[1\]: expected 3 spatial axes"),
        (dict(label_maps=[lab + 1], patch_sizes=[(4, 4, 4)], num_classes=2),
         r"label_maps\[0\]: expected label values < num_classes=2"),
        (dict(label_maps=[lab - 1], patch_sizes=[(4, 4, 4)]), r"label_maps\[0\]: expected label values >= 0"),
        (dict(label_maps=[lab], patch_sizes=[(4, 4, 4)], oversample_foreground=1.5),
         r"oversample_foreground: expected a probability"),
        (dict(label_maps=[lab], patch_sizes=[(4, 4, 4)], ignore_label=0),
         r"ignore_label: expected an integer other than 0"),
        (dict(label_maps=[lab], patch_sizes=[(4, 4, 4)], class_names=["bg"], **ok), r"class_names: expected 2 names"),
        (dict(label_maps=[lab], patch_sizes=[(4, 4, 4)], spacing=(1.0, 1.0)), r"spacing: expected 3 positive finite"),
        (dict(label_maps=[lab], patch_sizes=[(4, 4, 4)], batch_size=0), r"batch_size: expected a positive integer"),
        (dict(label_maps=[lab], patch_sizes=[(4, 4, 4)], num_workers=-1), r"num_workers: expected an integer >= 0"),
        (dict(label_maps=[lab], patch_sizes=[(4, 4, 4)], num_classes=0), r"num_classes: expected a positive integer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match="analyze_imbalance: " + message):
            analyze_imbalance(**kwargs)
    # labels equal to the ignore label are allowed whatever their value
    analyze_imbalance([np.where(lab == 1, 255, lab)], [(4, 4, 4)], num_classes=1, ignore_label=255)
    report = analyze_imbalance([lab], [(4, 4, 4)])
    with pytest.raises(ValueError, match=r"best: memory_budget_gb: expected a positive number"):
        report.best(-1)
    with pytest.raises(ValueError, match=r"best: memory_fn: expected a callable"):
        report.best(1, memory_fn=3)
    with pytest.raises(ValueError, match=r"best: oversample_foreground: expected one of the analysed ratios"):
        report.best(oversample_foreground=0.5)
    with pytest.raises(ValueError, match=r"estimate_training_memory: model: expected a torch.nn.Module"):
        estimate_training_memory("unet", (4, 4, 4))
    with pytest.raises(ValueError, match=r"estimate_training_memory: patch_size: expected positive integers"):
        estimate_training_memory(nn.Conv3d(1, 1, 1), (4, 0, 4))
    with pytest.raises(ValueError, match=r"estimate_training_memory: model: its forward pass failed"):
        estimate_training_memory(nn.Conv2d(1, 1, 1), (4, 4, 4))


# ------------------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_masks_op_matches_reference():
    nrrd = pytest.importorskip("nrrd")
    if not _extension.available():
        pytest.skip(f"compiled extension not loaded: {_extension.unavailable_reason()}")
    folder = DATA / "validation" / "oncologist" / "0522c0014" / "segmentations"
    if not folder.is_dir():
        pytest.skip(f"no data at {folder}")
    organs = ["Brainstem", "Lens-Lt", "Optic-Nerve-Lt", "Parotid-Lt", "Spinal-Cord"]
    label = None
    for value, organ in enumerate(organs, start=1):
        mask, _ = nrrd.read(str(folder / f"{organ}.nrrd"), index_order="C")
        label = np.zeros(mask.shape, np.uint8) if label is None else label
        label[(mask != 0) & (label == 0)] = value
    patches = [(48, 96, 96), (16, 64, 64)]
    a = analyze_imbalance([label], patches, num_classes=len(organs) + 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imb, "patch_stats", reference_patch_stats)
        b = analyze_imbalance([label], patches, num_classes=len(organs) + 1)
    for name in ("presence_random", "presence_foreground", "fraction_random", "fraction_foreground"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-15)
    # the lens is always present in a patch centred on it, and rarely in a random one
    assert a.presence_foreground[0, 2] > a.presence_random[0, 2] > 0
