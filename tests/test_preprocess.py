"""Preprocessing: resampling (against scipy and block-count oracles), CT normalisation, body crop, and the
preprocess_case / restore_label / restore_probabilities round trip."""
import numpy as np
import pytest
import scipy.ndimage as ndi

from fastseg.data.preprocess import (
    Preprocessed,
    RestoreInfo,
    body_bbox,
    ct_intensity_properties,
    normalize_ct,
    preprocess_case,
    resample,
    resample_to_shape,
    restore_label,
    restore_probabilities,
    restore_probabilities_box,
)


def _blobs(shape, seed, classes=3, radius=(3, 6)):
    """Label map of a few overlapping balls (later ones on top)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    label = np.zeros(shape, np.uint8)
    for c in range(1, classes + 1):
        centre = rng.uniform(0, shape)
        r = rng.uniform(*radius)
        label[sum((g - c0) ** 2 for g, c0 in zip(grids, centre)) < r * r] = c
    return label


def _phantom_ct(shape=(40, 36, 16), seed=0):
    """An ellipsoid 'body' (soft tissue, noise) in air, organs inside, a noise speck outside."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    centre = np.array(shape) / 2 + 0.3
    radii = np.array(shape) * np.array([0.3, 0.35, 0.3])
    body = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) < 1
    ct = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, shape)
    ct[1, 1, 1] = 300.0                        # isolated bright speck (noise / debris)
    label = np.zeros(shape, np.uint8)
    label[12:26, 10:24, 4:12] = 1
    label[24, 20, 8] = 2                       # one-voxel organ
    label[(grids[0] - 20) ** 2 + (grids[1] - 12) ** 2 < 9] = 3
    label[~body] = 0
    return ct.astype(np.float32), label, body


# ------------------------------------------------------------------------------------------------------
# resample
# ------------------------------------------------------------------------------------------------------

def test_resample_shape_and_round_trip_shape():
    a = np.zeros((10, 11, 4), np.float32)
    out = resample(a, (1.0, 1.0, 2.5), (2.0, 2.0, 2.0))
    assert out.shape == (5, 6, 5)  # 11 * 1/2 = 5.5 -> 6 (half up), 4 * 2.5 / 2 = 5
    assert out.dtype == np.float32
    # spacing alone cannot undo the rounding (6 * 2 = 12 != 11): restoring goes through resample_to_shape
    assert resample(out, (2.0, 2.0, 2.0), (1.0, 1.0, 2.5)).shape == (10, 12, 4)
    assert resample_to_shape(out, a.shape).shape == a.shape
    lab = resample(np.zeros((10, 11, 4), np.uint8), (1, 1, 2.5), 2.0, is_label=True)
    assert lab.shape == (5, 6, 5) and lab.dtype == np.uint8
    assert resample(np.zeros((3, 10, 11, 4), np.float32), (1, 1, 2.5), (2, 2, 2)).shape == (3, 5, 6, 5)
    assert resample(np.zeros((7, 3)), (1, 1), (100, 100)).shape == (1, 1)


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("shape,new_shape", [((9, 7, 5), (13, 4, 11)), ((12, 10), (7, 23))])
def test_resample_image_matches_map_coordinates(order, shape, new_shape):
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    out = resample_to_shape(image, new_shape, order=order)
    # oracle: grid mode, output voxel o centred on input coordinate (o + 0.5) * n / m - 0.5
    coords = np.meshgrid(*[(np.arange(m) + 0.5) * n / m - 0.5 for n, m in zip(shape, new_shape)], indexing="ij")
    expected = ndi.map_coordinates(image.astype(np.float64), coords, order=order, mode="nearest")
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_same_spacing_is_the_identity():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 8, 9, 5)).astype(np.float32)
    label = _blobs((8, 9, 5), 1)
    np.testing.assert_array_equal(resample(image, (1, 1, 3), (1, 1, 3)), image)
    np.testing.assert_array_equal(resample(label, (1, 1, 3), (1, 1, 3), is_label=True), label)
    # axes at the same size are untouched while another changes: a map constant along z stays its slice
    flat = np.repeat(label[:, :, 2:3], 5, axis=2)
    out = resample_to_shape(flat, (8, 9, 12), is_label=True)
    for k in range(12):
        np.testing.assert_array_equal(out[:, :, k], label[:, :, 2])
    img = resample_to_shape(np.repeat(image[:, :, :, 1:2], 5, axis=3), (8, 9, 7), order=3)
    np.testing.assert_allclose(img, np.repeat(image[:, :, :, 1:2], 7, axis=3), atol=1e-5)


def _tie_rule_winner(fractions):
    """Winner among (background, label 1, label 2, ...) fractions: the maximum (within 1e-6), ties going
    to the smaller foreground label, and to the background only when no foreground label ties with it."""
    order = np.concatenate([fractions[1:], fractions[:1]])   # preference: 1, 2, ..., background
    best = order.max(axis=0)
    index = np.argmax(order >= best - 1e-6, axis=0)
    return np.where(index == len(fractions) - 1, 0, index + 1)


def test_label_downsampling_by_two_is_the_block_majority():
    label = _blobs((16, 12, 10), seed=3, classes=3, radius=(3, 5))
    out = resample_to_shape(label, (8, 6, 5), is_label=True)
    # oracle: each output voxel is a 2x2x2 block; fractions = label counts / 8
    blocks = label.reshape(8, 2, 6, 2, 5, 2)
    fractions = np.stack([(blocks == c).mean(axis=(1, 3, 5)) for c in range(4)])
    expected = _tie_rule_winner(fractions)
    assert set(np.unique(expected)) == {0, 1, 2, 3}  # no survival fix-up needed in this case
    np.testing.assert_array_equal(out, expected)


def test_label_upsampling_matches_per_label_linear_interpolation():
    label = _blobs((7, 9, 5), seed=4, classes=3, radius=(1.5, 3))
    new_shape = (12, 17, 9)
    out = resample_to_shape(label, new_shape, is_label=True)
    zoom = [m / n for m, n in zip(new_shape, label.shape)]
    fractions = np.stack([ndi.zoom((label == c).astype(np.float64), zoom, order=1, grid_mode=True,
                                   mode="nearest") for c in range(4)])
    np.testing.assert_array_equal(out, _tie_rule_winner(fractions))


@pytest.mark.parametrize("factor_spacing", [2.0, 3.0, 2.7, 4.0])
@pytest.mark.parametrize("position", [(5, 6, 4), (0, 0, 0), (10, 12, 7)])
def test_one_voxel_organ_survives_downsampling(factor_spacing, position):
    label = np.zeros((11, 13, 8), np.uint8)
    label[2:9, 2:11, 1:7] = 1                       # a large organ around it
    label[position] = 7
    out = resample(label, (1.0, 1.0, 1.0), factor_spacing, is_label=True)
    assert 7 in out and 1 in out
    # nearest neighbour can drop it (documented reason for the scheme):
    nearest = ndi.zoom(label, [m / n for m, n in zip(out.shape, label.shape)], order=0, grid_mode=True,
                       mode="nearest")
    if factor_spacing == 4.0 and position == (5, 6, 4):
        assert 7 not in nearest


def test_label_stack_resamples_each_channel():
    stack = np.stack([_blobs((10, 9, 6), s, classes=1) for s in (5, 6)]).astype(bool)
    out = resample_to_shape(stack, (5, 14, 6), is_label=True)
    assert out.dtype == bool and out.shape == (2, 5, 14, 6)
    for c in range(2):
        np.testing.assert_array_equal(out[c], resample_to_shape(stack[c].astype(np.uint8), (5, 14, 6), is_label=True))


def test_resample_errors():
    with pytest.raises(ValueError, match="resample: spacing"):
        resample(np.zeros((4, 4)), (1.0, -1.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="resample: new_spacing"):
        resample(np.zeros((4, 4)), (1.0, 1.0), (1.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="resample: array"):
        resample(np.zeros((4, 4, 4, 4, 4)), (1.0, 1.0), (2.0, 2.0))
    with pytest.raises(ValueError, match="resample_to_shape: array"):
        resample_to_shape(np.zeros((4, 4), np.float32), (2, 2), is_label=True)
    with pytest.raises(ValueError, match="resample_to_shape: shape"):
        resample_to_shape(np.zeros((4, 4)), (2, 0))


# ------------------------------------------------------------------------------------------------------
# intensities and crop
# ------------------------------------------------------------------------------------------------------

def test_normalize_ct():
    hu = np.array([-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0])
    np.testing.assert_allclose(normalize_ct(hu), [-1, -1, 0, 0.5, 1, 1], atol=1e-7)
    out = normalize_ct(hu, (-100, 300), mean=50.0, std=25.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (np.clip(hu, -100, 300) - 50) / 25, rtol=1e-6)
    z = normalize_ct(hu, None)
    np.testing.assert_allclose(z, (hu - hu.mean()) / hu.std(), rtol=1e-5)
    hu_int = hu.astype(np.int16)
    normalize_ct(hu_int)
    assert hu_int[0] == -2000  # input untouched
    with pytest.raises(ValueError, match="normalize_ct: window"):
        normalize_ct(hu, (100, -100))
    with pytest.raises(ValueError, match="normalize_ct: mean/std"):
        normalize_ct(hu, mean=1.0)
    with pytest.raises(ValueError, match="normalize_ct: std"):
        normalize_ct(hu, mean=1.0, std=0.0)


def test_ct_intensity_properties_match_numpy_on_all_foreground():
    ct, label, _ = _phantom_ct()
    props = ct_intensity_properties([ct, ct + 10], [label, label], samples_per_case=10 ** 9)
    fg = np.concatenate([ct[label > 0], ct[label > 0] + 10]).astype(np.float64)
    np.testing.assert_allclose(props["window"], np.percentile(fg, [0.5, 99.5]))
    np.testing.assert_allclose([props["mean"], props["std"]], [fg.mean(), fg.std()], rtol=1e-9)
    normalize_ct(ct, **props)


def test_body_bbox_ignores_noise_and_adds_margin():
    ct, _, body = _phantom_ct()
    lo = [int(np.flatnonzero(body.any(axis=tuple(b for b in range(3) if b != a)))[0]) for a in range(3)]
    hi = [int(np.flatnonzero(body.any(axis=tuple(b for b in range(3) if b != a)))[-1]) + 1 for a in range(3)]
    box = body_bbox(ct, margin=0)
    assert [(s.start, s.stop) for s in box] == list(zip(lo, hi))
    box = body_bbox(ct, margin=(2, 0, 30))
    assert [(s.start, s.stop) for s in box] == [(lo[0] - 2, hi[0] + 2), (lo[1], hi[1]), (0, ct.shape[2])]
    assert body_bbox(np.full((5, 6), -1000.0)) == (slice(0, 5), slice(0, 6))
    with pytest.raises(ValueError, match="body_bbox: margin"):
        body_bbox(ct, margin=-1)


# ------------------------------------------------------------------------------------------------------
# preprocess_case / restore
# ------------------------------------------------------------------------------------------------------

def test_restore_label_reproduces_the_original_exactly():
    ct, label, _ = _phantom_ct()
    spacing = (1.0, 1.2, 2.5)
    for target in (None, spacing):
        pre = preprocess_case(ct, spacing, label, target_spacing=target)
        assert isinstance(pre, Preprocessed)
        assert pre.image.shape == (1,) + pre.label.shape and pre.image.dtype == np.float32
        assert pre.label.dtype == np.uint8 and pre.spacing == spacing
        assert np.prod(pre.info.cropped_shape) < np.prod(ct.shape)  # the crop did something
        box = pre.info.slices
        np.testing.assert_array_equal(pre.image[0], normalize_ct(ct[box]))
        np.testing.assert_array_equal(pre.label, label[box])
        np.testing.assert_array_equal(restore_label(pre.label, pre.info), label)
        np.testing.assert_array_equal(restore_label(pre.label.astype(np.int64), pre), label)


def test_preprocess_with_resampling_and_restore():
    ct, label, _ = _phantom_ct()
    spacing, target = (1.0, 1.0, 2.5), (2.0, 2.0, 2.0)
    pre = preprocess_case(ct, spacing, label, target_spacing=target)
    info = pre.info
    assert info.shape == pre.image.shape[1:] == pre.label.shape
    assert info.shape == tuple(int(np.floor(n * s / t + 0.5)) for n, s, t in zip(info.cropped_shape, spacing, target))
    assert set(np.unique(pre.label)) == {0, 1, 2, 3}  # the one-voxel organ 2 is still there
    restored = restore_label(pre.label, info)
    assert restored.shape == ct.shape
    big = label == 1
    dice = 2 * np.sum(big & (restored == 1)) / (big.sum() + (restored == 1).sum())
    assert dice > 0.85
    # probabilities: one-hot on the preprocessed grid -> original grid
    probs = np.stack([(pre.label == c) for c in range(4)]).astype(np.float32)
    back = restore_probabilities(probs, info)
    assert back.shape == (4,) + ct.shape and back.dtype == np.float32
    np.testing.assert_allclose(back.sum(axis=0), 1.0, atol=1e-5)
    outside = np.ones(ct.shape, bool)
    outside[info.slices] = False
    assert np.all(back[0][outside] == 1.0) and np.all(back[1:][:, outside] == 0.0)
    assert RestoreInfo.from_dict(info.to_dict()) == info


def test_restore_probabilities_without_resampling_is_a_paste():
    ct, label, _ = _phantom_ct()
    pre = preprocess_case(ct, (1, 1, 1), label)
    probs = np.stack([(pre.label == c) for c in range(4)]).astype(np.float32)
    back = restore_probabilities(probs, pre)
    np.testing.assert_array_equal(np.argmax(back, axis=0), label)


@pytest.mark.parametrize("target", [(2.0, 2.0, 2.0), (0.5, 0.7, 1.0), (1.0, 1.0, 2.0)])
def test_restore_probabilities_box_equals_the_full_restore_inside_its_box(target):
    """Down-, up- and no resampling: the box holds exactly the full restore's values, and outside it every
    organ probability is below the threshold."""
    ct, label, _ = _phantom_ct()
    pre = preprocess_case(ct, (1.0, 1.0, 2.0), label, target_spacing=target)
    rng = np.random.default_rng(0)
    organ = np.stack([(pre.label == c) * rng.uniform(0.2, 1.0, pre.label.shape) for c in range(1, 4)])
    organ += rng.uniform(0, 1e-3, organ.shape)  # everywhere a little mass, below the threshold
    probs = np.concatenate([1 - organ.sum(0, keepdims=True), organ]).astype(np.float32) / 1.0
    full = restore_probabilities(probs, pre.info)
    part, lower = restore_probabilities_box(probs, pre.info, threshold=0.01)
    box = (slice(None),) + tuple(slice(a, a + n) for a, n in zip(lower, part.shape[1:]))
    np.testing.assert_allclose(part, full[box], rtol=0, atol=1e-6)
    outside = np.ones(ct.shape, bool)
    outside[box[1:]] = False
    assert full[1:][:, outside].max(initial=0) < 0.01
    assert part.size < full.size  # the box is smaller than the volume
    np.testing.assert_array_equal(np.argmax(full, 0)[box[1:]], np.argmax(part, 0))


def test_restore_probabilities_box_without_organs_is_empty():
    ct, label, _ = _phantom_ct()
    pre = preprocess_case(ct, (1.0, 1.0, 2.0), label)
    probs = np.zeros((3,) + pre.info.shape, np.float32)
    probs[0] = 1
    part, lower = restore_probabilities_box(probs, pre.info)
    assert part.shape == (3, 0, 0, 0) and lower == (0, 0, 0)
    sig, _ = restore_probabilities_box(probs, pre.info, background=False)  # channel 0 counts as an organ now
    assert sig.shape[1:] == pre.info.cropped_shape


def test_crop_keeps_labels_outside_the_body_and_accepts_images():
    from fastseg.data.io import Image

    ct, label, body = _phantom_ct()
    label[0, 30, 15] = 3  # an annotation outside the body must not be cropped away
    pre = preprocess_case(Image(ct, (1.0, 1.0, 2.0)), label=Image(label, (1.0, 1.0, 2.0)))
    assert pre.spacing == (1.0, 1.0, 2.0)
    np.testing.assert_array_equal(restore_label(pre.label, pre.info), label)
    full = preprocess_case(ct, (1, 1, 2), label, crop=False)
    assert full.info.cropped_shape == ct.shape


def test_multilabel_stack_round_trip():
    ct, label, _ = _phantom_ct()
    stack = np.stack([label == 1, label > 0, label == 2])
    pre = preprocess_case(ct, (1, 1, 2), stack)
    assert pre.label.dtype == np.uint8 and pre.label.shape[0] == 3
    np.testing.assert_array_equal(restore_label(pre.label, pre.info), stack.astype(np.uint8))
    coarse = preprocess_case(ct, (1, 1, 2), stack, target_spacing=(2, 2, 2))
    assert coarse.label.shape == (3,) + coarse.image.shape[1:]
    assert coarse.label[2].any()  # the one-voxel organ survives in its channel


def test_preprocess_errors():
    ct, label, _ = _phantom_ct()
    with pytest.raises(ValueError, match="preprocess_case: label"):
        preprocess_case(ct, (1, 1, 1), label[:-1])
    with pytest.raises(ValueError, match="preprocess_case: spacing"):
        preprocess_case(ct, None)
    with pytest.raises(ValueError, match="preprocess_case: target_spacing"):
        preprocess_case(ct, (1, 1, 1), target_spacing=(1, 0, 1))
    pre = preprocess_case(ct, (1, 1, 1), label)
    with pytest.raises(ValueError, match="restore_label: pred_label"):
        restore_label(pre.label[:-1], pre.info)
    with pytest.raises(ValueError, match="restore_probabilities: probs"):
        restore_probabilities(pre.label, pre.info)
    with pytest.raises(ValueError, match="restore_probabilities_box: probs"):
        restore_probabilities_box(pre.label, pre.info)
    with pytest.raises(ValueError, match="restore_label: info"):
        restore_label(pre.label, {"shape": 1})
