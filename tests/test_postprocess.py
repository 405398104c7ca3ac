"""keep_largest_component against a whole-volume flood fill per organ."""
import numpy as np
import pytest
import scipy.ndimage as ndi

from fastseg.postprocess import keep_largest_component


def _brute_force(label, values, connectivity):
    """Each organ labelled over the whole volume (no boxes), all but the largest component set to 0."""
    out = label.copy()
    structure = ndi.generate_binary_structure(label.ndim, connectivity)
    for v in values:
        comp, n = ndi.label(label == v, structure)
        if n > 1:
            sizes = [(comp == i).sum() for i in range(1, n + 1)]
            out[(comp > 0) & (comp != 1 + int(np.argmax(sizes)))] = 0
    return out


@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_a_whole_volume_flood_fill(seed, connectivity):
    rng = np.random.default_rng(seed)
    label = np.zeros((20, 18, 12), np.uint8)
    for v in (1, 2, 5):  # blobs plus scattered islands per organ
        for _ in range(4):
            c = rng.integers(0, [18, 16, 10])
            s = rng.integers(1, 4, 3)
            label[c[0]:c[0] + s[0], c[1]:c[1] + s[1], c[2]:c[2] + s[2]] = v
        label[tuple(rng.integers(0, [[20], [18], [12]], (3, 6)))] = v
    values = sorted(set(np.unique(label).tolist()) - {0})
    expected = _brute_force(label, values, connectivity)
    got = keep_largest_component(label, connectivity=connectivity)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == label.dtype
    assert (got != label).any()  # the islands were really removed
    only_two = keep_largest_component(label, [2], connectivity=connectivity)
    np.testing.assert_array_equal(only_two, _brute_force(label, [2], connectivity))


def test_diagonal_contact_is_one_component_by_default():
    label = np.zeros((5, 5, 5), np.int16)
    for i in range(5):  # a thin oblique line: corners touch only
        label[i, i, i] = 3
    label[0, 4, 0] = 3
    np.testing.assert_array_equal(keep_largest_component(label)[label == 3].sum(), 3 * 5)
    assert (keep_largest_component(label, connectivity=1) == 3).sum() == 1


def test_errors():
    with pytest.raises(ValueError, match="keep_largest_component: label: expected an integer label map"):
        keep_largest_component(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="keep_largest_component: connectivity: expected an int in \\[1, 2\\]"):
        keep_largest_component(np.zeros((3, 3), np.uint8), connectivity=3)
    with pytest.raises(ValueError, match="keep_largest_component: labels: expected positive label values"):
        keep_largest_component(np.zeros((3, 3), np.uint8), [0])
