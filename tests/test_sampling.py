"""Patch sampling (against a brute-force evaluation of the shared sampling contract), the patch dataset and
its loader (determinism, resume), and augmentation."""
import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from fastseg.data.augment import Augmenter, lateral_axis, lateral_pairs
from fastseg.data.sampling import PatchDataset, PatchSampler, extract_patch, make_loader


# ------------------------------------------------------------------------------------------------------
# Oracle: the contract's distribution of lo, enumerated voxel by voxel
# ------------------------------------------------------------------------------------------------------

def exact_lo_distribution(label, patch, p, ignore_label=None):
    """{lo: probability} for one case, written straight from the contract (no code shared with fastseg)."""
    label = np.asarray(label)
    stack = label.ndim == len(patch) + 1
    shape = label.shape[1:] if stack else label.shape
    padded = [max(s, q) for s, q in zip(shape, patch)]
    before = [(q - s) // 2 for q, s in zip(padded, shape)]
    positions = list(itertools.product(*[range(q - k + 1) for q, k in zip(padded, patch)]))
    voxels_of = {}
    for v in itertools.product(*[range(s) for s in shape]):
        if stack:
            for c in range(label.shape[0]):
                if label[(c,) + v]:
                    voxels_of.setdefault(c, []).append(v)
        elif label[v] != 0 and label[v] != ignore_label:
            voxels_of.setdefault(int(label[v]), []).append(v)
    p_fg = p if voxels_of else 0.0
    dist = {pos: (1.0 - p_fg) / len(positions) for pos in positions}
    for voxels in voxels_of.values():
        for v in voxels:
            lo = tuple(min(max(v[a] + before[a] - patch[a] // 2, 0), padded[a] - patch[a]) for a in range(len(v)))
            dist[lo] += p_fg / len(voxels_of) / len(voxels)
    return dist


def assert_matches(counts, dist, n):
    """Chi-square goodness of fit on the cells the oracle allows; nothing outside them."""
    assert set(counts) <= {k for k, v in dist.items() if v > 0}, "a lower corner the contract never produces"
    keys = [k for k, v in dist.items() if v > 0]
    observed = np.array([counts.get(k, 0) for k in keys], dtype=np.float64)
    expected = np.array([dist[k] * n for k in keys])
    assert abs(observed.sum() - expected.sum()) < 1e-6 * n
    if len(keys) == 1:
        return
    p_value = stats.chisquare(observed, expected).pvalue
    assert p_value > 1e-4, f"chi-square p = {p_value:.2e}"


def sampled_counts(sampler, loc, n, seed):
    rng = np.random.default_rng(seed)
    counts, fg = {}, 0
    for _ in range(n):
        lo, is_fg = sampler.sample_lower_corner(loc, rng)
        counts[tuple(int(v) for v in lo)] = counts.get(tuple(int(v) for v in lo), 0) + 1
        fg += is_fg
    return counts, fg


def _label_2d():
    label = np.zeros((7, 9), np.int16)
    label[1:5, 2:8] = 1          # large class
    label[6, 0] = 2              # single voxel in a corner
    label[3, 8] = 5              # single voxel on an edge
    label[0, 0] = 9              # ignored in one test
    return label


@pytest.mark.parametrize("p", [0.0, 1 / 3, 1.0])
def test_lower_corner_distribution_2d(p):
    label = _label_2d()
    sampler = PatchSampler((4, 5), oversample_foreground=p)
    n = 12000
    counts, fg = sampled_counts(sampler, sampler.locations(label), n, seed=1)
    assert_matches(counts, exact_lo_distribution(label, (4, 5), p), n)
    # the kind is Bernoulli(p)
    assert stats.binomtest(fg, n, p).pvalue > 1e-4 if 0 < p < 1 else fg == n * p


def test_lower_corner_distribution_3d_with_padding_and_ignore_label():
    rng = np.random.default_rng(0)
    label = rng.choice([0, 0, 0, 1, 3, 4], size=(5, 6, 3)).astype(np.uint8)
    label[label == 3] = 0
    label[4, 5, 2] = 3
    patch = (3, 4, 6)  # last axis is padded: 3 -> 6, one voxel before
    sampler = PatchSampler(patch, oversample_foreground=0.5, ignore_label=4)
    loc = sampler.locations(label)
    assert loc.padded_shape == (5, 6, 6) and loc.pad_before == (0, 0, 1)
    assert loc.classes.tolist() == [1, 3]
    n = 15000
    counts, _ = sampled_counts(sampler, loc, n, seed=2)
    assert_matches(counts, exact_lo_distribution(label, patch, 0.5, ignore_label=4), n)


def test_lower_corner_distribution_multilabel_stack():
    stack = np.zeros((3, 6, 7), np.uint8)
    stack[0, 1:4, 1:6] = 1
    stack[1, 2:3, 2:3] = 1          # overlaps channel 0
    # channel 2 empty: not a class
    sampler = PatchSampler((3, 3), oversample_foreground=0.6)
    loc = sampler.locations(stack)
    assert loc.classes.tolist() == [1, 2]
    n = 10000
    counts, _ = sampled_counts(sampler, loc, n, seed=3)
    assert_matches(counts, exact_lo_distribution(stack, (3, 3), 0.6), n)


def test_no_foreground_gives_random_patches():
    label = np.zeros((6, 5), np.uint8)
    sampler = PatchSampler((3, 2), oversample_foreground=1.0)
    n = 4000
    counts, fg = sampled_counts(sampler, sampler.locations(label), n, seed=4)
    assert fg == 0
    assert_matches(counts, exact_lo_distribution(label, (3, 2), 1.0), n)


def test_locations_hold_every_voxel_of_every_class():
    rng = np.random.default_rng(5)
    label = rng.integers(0, 4, size=(6, 7, 5)).astype(np.uint16)
    loc = PatchSampler((2, 2, 2)).locations(label)
    for c, idx in zip(loc.classes, loc.indices):
        np.testing.assert_array_equal(idx, np.flatnonzero(label.ravel() == c))
        assert idx.dtype == np.int32
    assert loc.num_voxels.tolist() == [int((label == c).sum()) for c in (1, 2, 3)]


def test_dataset_stream_follows_the_contract_across_cases():
    """Case uniform, then the per-case distribution; drawn through default_rng([seed, i]) per sample."""
    a = _label_2d()
    b = np.zeros((3, 10), np.uint8)
    b[1, 7] = 2                      # padded on axis 0 (3 -> 4)
    cases = [(np.zeros((1,) + x.shape, np.float32), x) for x in (a, b)]
    ds = PatchDataset(cases, (4, 5), oversample_foreground=1 / 3, seed=11)
    n = 12000
    counts = {}
    for i in range(n):
        case, draw, _ = ds.draw(i)
        key = (case,) + tuple(int(v) for v in draw.lo)
        counts[key] = counts.get(key, 0) + 1
    dist = {}
    for k, x in enumerate((a, b)):
        for lo, q in exact_lo_distribution(x, (4, 5), 1 / 3).items():
            dist[(k,) + lo] = 0.5 * q
    assert_matches(counts, dist, n)


# ------------------------------------------------------------------------------------------------------
# Patches
# ------------------------------------------------------------------------------------------------------

def test_foreground_patch_contains_its_voxel():
    rng = np.random.default_rng(6)
    label = np.zeros((9, 4, 11), np.uint8)   # axis 1 is padded (4 -> 6)
    label[0, 0, 0] = 1
    label[8, 3, 10] = 2
    label[4, 1:3, 3:8] = 3
    image = rng.normal(size=(2,) + label.shape).astype(np.float32)
    sampler = PatchSampler((5, 6, 4), oversample_foreground=1.0)
    loc = sampler.locations(label)
    seen = set()
    for _ in range(300):
        draw = sampler.sample(loc, rng)
        assert draw.is_foreground
        rel = draw.voxel - draw.lo
        assert np.all(rel >= 0) and np.all(rel < np.array(sampler.patch_size))
        img_patch, lab_patch = extract_patch(image, label, draw.lo, loc)
        assert lab_patch[tuple(rel)] == draw.class_value
        orig = tuple(draw.voxel - np.array(loc.pad_before))
        assert label[orig] == draw.class_value
        np.testing.assert_array_equal(img_patch[(slice(None),) + tuple(rel)], image[(slice(None),) + orig])
        seen.add(draw.class_value)
    assert seen == {1, 2, 3}


def test_small_case_is_padded_and_centred():
    label = np.arange(12, dtype=np.uint8).reshape(3, 4) % 3
    image = np.stack([np.arange(12, dtype=np.float32).reshape(3, 4) + 10, -np.ones((3, 4), np.float32) * 5])
    image[1, 0, 0] = -7
    sampler = PatchSampler((7, 8))
    loc = sampler.locations(label)
    assert loc.padded_shape == (7, 8) and loc.pad_before == (2, 2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        lo, _ = sampler.sample_lower_corner(loc, rng)
        assert lo.tolist() == [0, 0]
    img, lab = extract_patch(image, label, lo, loc)
    assert img.shape == (2, 7, 8) and lab.shape == (7, 8)
    inner = (slice(2, 5), slice(2, 6))
    np.testing.assert_array_equal(lab[inner], label)
    np.testing.assert_array_equal(img[(slice(None),) + inner], image)
    outside = np.ones((7, 8), bool)
    outside[inner] = False
    assert np.all(lab[outside] == 0)
    assert np.all(img[0][outside] == 10) and np.all(img[1][outside] == -7)   # per-channel minimum


def test_extract_patch_with_margin_matches_numpy_pad():
    rng = np.random.default_rng(7)
    label = rng.integers(0, 3, size=(6, 3, 5)).astype(np.uint8)
    image = rng.normal(size=(2, 6, 3, 5)).astype(np.float32)
    sampler = PatchSampler((4, 5, 5))
    loc = sampler.locations(label)
    margin = (2, 1, 3)
    minima = image.reshape(2, -1).min(axis=1)
    # oracle: pad to S' as the contract says, then by the margin, with np.pad
    pads = [(b, q - s - b) for b, q, s in zip(loc.pad_before, loc.padded_shape, label.shape)]
    pads = [(a + m, b + m) for (a, b), m in zip(pads, margin)]
    big_label = np.pad(label, pads)
    big_image = np.stack([np.pad(c, pads, constant_values=v) for c, v in zip(image, minima)])
    for _ in range(30):
        lo, _ = sampler.sample_lower_corner(loc, rng)
        box = tuple(slice(int(a), int(a) + p + 2 * m) for a, p, m in zip(lo, sampler.patch_size, margin))
        img, lab = extract_patch(image, label, lo, loc, margin=margin)
        np.testing.assert_array_equal(lab, big_label[box])
        np.testing.assert_array_equal(img, big_image[(slice(None),) + box])


# ------------------------------------------------------------------------------------------------------
# Dataset and loader
# ------------------------------------------------------------------------------------------------------

def _cases(multilabel=False):
    rng = np.random.default_rng(8)
    cases = []
    for shape in [(20, 18, 9), (12, 25, 6)]:
        image = rng.normal(size=(1,) + shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[2:6, 3:9, 1:4] = 1
        label[shape[0] - 2, shape[1] - 3, 2] = 2
        if multilabel:
            label = np.stack([label == 1, label == 2, label > 0]).astype(np.uint8)
        cases.append((image, label))
    return cases


def _batches(loader, n):
    out = []
    for k, batch in enumerate(loader):
        if k == n:
            break
        out.append(batch)
    return out


def test_dataset_items_are_deterministic_and_typed():
    ds = PatchDataset(_cases(), (8, 8, 8), seed=3, augment=Augmenter(spacing=(1, 1, 2)), length=100)
    for i in (0, 1, 57):
        x1, y1 = ds[i]
        x2, y2 = ds[i]
        assert x1.shape == (1, 8, 8, 8) and x1.dtype == torch.float32
        assert y1.shape == (8, 8, 8) and y1.dtype == torch.int64
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(ds[0][0], ds[1][0])
    other = PatchDataset(_cases(), (8, 8, 8), seed=4, length=100)
    assert not torch.equal(ds[0][0], other[0][0])
    with pytest.raises(IndexError):
        ds[100]


def test_dataset_multilabel_stack():
    ds = PatchDataset(_cases(multilabel=True), (8, 8, 4), seed=3, augment=Augmenter(), length=10)
    x, y = ds[2]
    assert y.shape == (3, 8, 8, 4) and y.dtype == torch.uint8
    assert set(torch.unique(y).tolist()) <= {0, 1}


def test_loader_independent_of_workers_and_resumable():
    ds = PatchDataset(_cases(), (8, 8, 4), seed=5, augment=Augmenter(p_rotation=0.5, p_scale=0.5), length=40)
    ref = _batches(make_loader(ds, 4), 10)
    assert len(ref) == 10
    workers = _batches(make_loader(ds, 4, num_workers=2, persistent_workers=False), 10)
    resumed = _batches(make_loader(ds, 4, start_iteration=6), 10)
    assert len(resumed) == 4
    for a, b in zip(ref, workers):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(ref[6:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # batch t of an uninterrupted run holds samples t*B ... t*B + B - 1
    for b in range(4):
        x, y = ds[2 * 4 + b]
        assert torch.equal(ref[2][0][b], x) and torch.equal(ref[2][1][b], y)


def test_loader_ranks_split_the_single_process_stream():
    ds = PatchDataset(_cases(), (6, 6, 4), seed=6, length=48)
    single = _batches(make_loader(ds, 6), 8)
    ranks = [_batches(make_loader(ds, 3, rank=r, num_replicas=2, start_iteration=1), 8) for r in range(2)]
    for t in range(1, 8):
        for r in range(2):
            assert torch.equal(ranks[r][t - 1][0], single[t][0][3 * r:3 * r + 3])


def test_sampler_and_loader_errors():
    with pytest.raises(ValueError, match="PatchSampler: patch_size"):
        PatchSampler((0, 4))
    with pytest.raises(ValueError, match="PatchSampler: oversample_foreground"):
        PatchSampler((4, 4), oversample_foreground=1.5)
    with pytest.raises(ValueError, match="PatchSampler.locations: label"):
        PatchSampler((4, 4)).locations(np.zeros((3, 3, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="PatchSampler.locations: label"):
        PatchSampler((4, 4)).locations(np.zeros((3, 3), np.float32))
    loc = PatchSampler((4, 4)).locations(np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match="PatchSampler.sample: locations"):
        PatchSampler((3, 4)).sample(loc, np.random.default_rng(0))
    with pytest.raises(ValueError, match="extract_patch: image"):
        extract_patch(np.zeros((1, 4, 5), np.float32), None, (0, 0), loc)
    with pytest.raises(ValueError, match=r"PatchDataset: cases\[0\] label"):
        PatchDataset([(np.zeros((1, 5, 5), np.float32), np.zeros((5, 4), np.uint8))], (4, 4))
    ds = PatchDataset([(np.zeros((1, 5, 5), np.float32), np.zeros((5, 5), np.uint8))], (4, 4), length=8)
    with pytest.raises(ValueError, match="make_loader: batch_size"):
        make_loader(ds, 0)
    with pytest.raises(ValueError, match="make_loader: rank"):
        make_loader(ds, 2, rank=2, num_replicas=2)


# ------------------------------------------------------------------------------------------------------
# Augmentation
# ------------------------------------------------------------------------------------------------------

OFF = dict(p_flip=0.0, p_rotation=0.0, p_scale=0.0, p_intensity=0.0, p_gamma=0.0, p_noise=0.0)


def _blobs(shape, seed=0, classes=4):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    for c in range(1, classes + 1):
        centre = rng.integers(0, shape)
        grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
        dist = sum((g - c0) ** 2 for g, c0 in zip(grids, centre))
        label[dist < rng.integers(4, 30)] = c
    return label


@pytest.mark.parametrize("shape", [(12, 14, 9), (16, 13)])
def test_augmenter_identity_when_all_probabilities_are_zero(shape):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2,) + shape).astype(np.float32)
    label = _blobs(shape)
    aug = Augmenter(**OFF)
    out_img, out_lab = aug(image, label, np.random.default_rng(1))
    np.testing.assert_array_equal(out_img, image)
    np.testing.assert_array_equal(out_lab, label)
    t_img, t_lab = aug(torch.from_numpy(image), torch.from_numpy(label), np.random.default_rng(1))
    assert isinstance(t_img, torch.Tensor) and torch.equal(t_img, torch.from_numpy(image))
    assert t_lab.dtype == torch.uint8 and torch.equal(t_lab, torch.from_numpy(label))


def test_augmenter_is_deterministic_given_rng():
    shape = (12, 14, 9)
    image = np.random.default_rng(0).normal(size=(1,) + shape).astype(np.float32)
    label = _blobs(shape)
    aug = Augmenter(p_rotation=0.7, p_scale=0.7, p_intensity=0.7, p_gamma=0.7, p_noise=0.7, spacing=(1, 1, 2))
    runs = [aug(image, label, np.random.default_rng([3, k])) for k in (0, 0, 1)]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][0], runs[2][0])


@pytest.mark.parametrize("shape", [(15, 15, 7), (15, 17)])
def test_augmenter_keeps_labels_and_alignment(shape):
    label = _blobs(shape, seed=2)
    image = label[None].astype(np.float32)
    values = set(np.unique(label).tolist())
    spatial = dict(p_flip=0.5, p_rotation=1.0, p_scale=1.0, rotation=(-30, 30))
    exact = Augmenter(**{**OFF, **spatial}, order=0)
    linear = Augmenter(**{**OFF, **spatial}, order=1)
    agreement = []
    for k in range(10):
        img, lab = exact(image, label, np.random.default_rng(k))
        assert set(np.unique(lab).tolist()) <= values
        np.testing.assert_array_equal(img[0], lab)               # one grid for image and label
        # linear image vs nearest label on a binary map: they may differ only where the boundary passes
        mask = (label > 0).astype(np.uint8)
        img, lab = linear(mask[None].astype(np.float32), mask, np.random.default_rng(k))
        assert set(np.unique(lab).tolist()) <= {0, 1}
        agreement.append(np.mean((img[0] > 0.5) == lab))
    assert np.mean(agreement) > 0.97


def test_rotation_by_90_degrees_equals_rot90_and_flip_equals_numpy():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(1, 9, 9, 5)).astype(np.float32)
    label = _blobs((9, 9, 5), seed=4)
    aug = Augmenter(**{**OFF, "p_rotation": 1.0, "rotation": (90, 90)}, rotation_axes=(2,))
    img, lab = aug(image, label, rng)
    candidates = [np.rot90(label, k, axes=(0, 1)) for k in (1, 3)]
    k = [np.array_equal(lab, c) for c in candidates].index(True)
    np.testing.assert_allclose(img[0], np.rot90(image[0], (1, 3)[k], axes=(0, 1)), atol=1e-5)
    flip = Augmenter(**{**OFF, "p_flip": 1.0}, flip_axes=(1,))
    img, lab = flip(image, label, rng)
    np.testing.assert_array_equal(img, image[:, :, ::-1])
    np.testing.assert_array_equal(lab, label[:, ::-1])


def test_lateral_flip_swaps_left_and_right_labels():
    """A flip of the lateral axis mirrors the patient: the left organ becomes a right one, in a label map and in
    a multi-label stack; flips of other axes swap nothing."""
    label = np.zeros((8, 6, 4), np.uint8)
    label[1:3, 2:4, 1:3] = 2   # "Lens-Lt" on one side
    label[5:7, 2:4, 1:3] = 3   # "Lens-Rt" on the other
    label[3:5, 1:5, 0:4] = 1   # an unpaired organ in the middle
    image = label[None].astype(np.float32)
    swap = {0: [(2, 3)]}
    img, lab = Augmenter(**{**OFF, "p_flip": 1.0}, flip_axes=(0,), swap_on_flip=swap)(image, label,
                                                                                        np.random.default_rng(0))
    np.testing.assert_array_equal(img, image[:, ::-1])
    expected = np.array([0, 1, 3, 2], np.uint8)[label[::-1]]
    np.testing.assert_array_equal(lab, expected)
    stack = np.stack([label == v for v in (1, 2, 3)]).astype(np.uint8)
    _, lab_stack = Augmenter(**{**OFF, "p_flip": 1.0}, flip_axes=(0,), swap_on_flip=swap)(image, stack,
                                                                                           np.random.default_rng(0))
    np.testing.assert_array_equal(lab_stack, np.stack([expected == v for v in (1, 2, 3)]).astype(np.uint8))
    _, other = Augmenter(**{**OFF, "p_flip": 1.0}, flip_axes=(1,), swap_on_flip=swap)(image, label,
                                                                                        np.random.default_rng(0))
    np.testing.assert_array_equal(other, label[:, ::-1])
    with pytest.raises(ValueError, match="Augmenter: swap_on_flip: expected pairs of distinct positive"):
        Augmenter(swap_on_flip={0: [(2, 3), (3, 4)]})


def test_lateral_pairs_and_axis():
    names = ["Brain", "Parotid-Lt", "Parotid-Rt", "Lens_L", "Lens_R", "Left Orbit", "Right Orbit", "Lt", "Cord"]
    assert lateral_pairs(names) == [(1, 2), (3, 4), (5, 6)]
    assert lateral_pairs(["Lung-Lt", "Brainstem"]) == []  # a side without its partner
    assert lateral_axis(np.eye(3)) == 0
    assert lateral_axis([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]) == 2


def test_context_margin_keeps_the_transform_inside_the_input():
    patch = (16, 12, 8)
    aug = Augmenter(**{**OFF, "p_rotation": 1.0, "p_scale": 1.0}, rotation=(-15, 15), scale=(0.85, 1.25),
                    spacing=(1.0, 1.0, 2.5))
    margin = aug.context(patch)
    assert all(m > 0 for m in margin[:2])
    shape = tuple(p + 2 * m for p, m in zip(patch, margin))
    image = np.zeros((1,) + shape, np.float32)
    ring = np.ones(shape, bool)
    ring[tuple(slice(1, -1) for _ in shape)] = False
    image[0][ring] = 1000.0                # any sample reaching the outermost voxels shows up
    label = np.zeros(shape, np.uint8)
    for k in range(40):
        # extreme angles and the smallest zoom are the worst case
        img, _ = aug(image, label, np.random.default_rng(k), out_shape=patch)
        assert img.shape == (1,) + patch and img.max() == 0.0
    tight = Augmenter(**{**OFF, "p_rotation": 1.0, "p_scale": 1.0}, rotation=(15, 15), scale=(0.85, 0.85),
                      spacing=(1.0, 1.0, 2.5))
    img, _ = tight(image, label, np.random.default_rng(0), out_shape=patch)
    assert img.max() == 0.0
    assert Augmenter(**OFF).context(patch) == (0, 0, 0)


def test_out_shape_without_spatial_transform_is_a_centre_crop():
    image = np.random.default_rng(0).normal(size=(2, 10, 9, 8)).astype(np.float32)
    label = _blobs((10, 9, 8))
    img, lab = Augmenter(**OFF)(image, label, np.random.default_rng(0), out_shape=(6, 5, 8))
    np.testing.assert_array_equal(img, image[:, 2:8, 2:7, :])
    np.testing.assert_array_equal(lab, label[2:8, 2:7, :])


def test_intensity_transforms_touch_the_image_only():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 10, 9, 8)).astype(np.float32) * 2 + 1
    stack = np.stack([_blobs((10, 9, 8), seed=s) > 0 for s in (1, 2)]).astype(np.uint8)
    gamma = Augmenter(**{**OFF, "p_gamma": 1.0})
    img, lab = gamma(image, stack, np.random.default_rng(1))
    np.testing.assert_array_equal(lab, stack)
    assert not np.allclose(img, image)
    # gamma keeps each channel's mean and std (retain_stats, as nnU-Net)
    np.testing.assert_allclose(img.mean(axis=(1, 2, 3)), image.mean(axis=(1, 2, 3)), atol=1e-4)
    np.testing.assert_allclose(img.std(axis=(1, 2, 3)), image.std(axis=(1, 2, 3)), rtol=1e-4)
    affine = Augmenter(**{**OFF, "p_intensity": 1.0})
    img, _ = affine(image, stack, np.random.default_rng(2))
    for c in range(2):  # per channel x * a + b with a, b in range
        a, b = np.polyfit(image[c].ravel(), img[c].ravel(), 1)
        assert 0.75 <= a <= 1.25 and -0.1 <= b <= 0.1
    noisy, _ = Augmenter(**{**OFF, "p_noise": 1.0}, noise_std=(0.05, 0.05))(image, stack, np.random.default_rng(3))
    assert abs(float((noisy - image).std()) - 0.05) < 0.005


def test_augmenter_errors():
    with pytest.raises(ValueError, match="Augmenter: p_flip"):
        Augmenter(p_flip=2)
    with pytest.raises(ValueError, match="Augmenter: scale"):
        Augmenter(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="Augmenter: rotation"):
        Augmenter(rotation=(10, -10))
    with pytest.raises(ValueError, match="Augmenter: rng"):
        Augmenter()(np.zeros((1, 4, 4), np.float32), None, None)
    with pytest.raises(ValueError, match="Augmenter: label"):
        Augmenter()(np.zeros((1, 4, 4), np.float32), np.zeros((4, 5), np.uint8), np.random.default_rng(0))
