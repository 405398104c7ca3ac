"""Post-processing of predicted label maps.

Every head-and-neck organ at risk is one connected structure (the paired ones are separate labels), so any
second component of a predicted organ is a false positive; on a weak model those stray islands far from the
organ dominate HD95. nnU-Net (Isensee et al., Nature Methods 2021) therefore keeps only the largest component
per class when that improves validation Dice; here it is an explicit option of the predictor.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import scipy.ndimage as ndi

__all__ = ["keep_largest_component"]


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"keep_largest_component: {name}: expected {expected}, got {got!r}")


def _largest_only(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Bool mask of the largest connected component of ``mask`` (the first one on a tie)."""
    components, count = ndi.label(mask, structure)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def keep_largest_component(label: np.ndarray, labels: Optional[Iterable[int]] = None, *,
                           connectivity: Optional[int] = None) -> np.ndarray:
    """Removes every connected component of each organ but its largest (removed voxels become background 0).

    Args:
        label: (*S) integer label map.
        labels: label values to clean; None: every non-zero value.
        connectivity: neighbourhood as in ``scipy.ndimage.generate_binary_structure`` (1 = faces, ndim = faces,
            edges and corners); default ndim, so diagonal touching keeps a thin structure (an optic nerve,
            oblique to the grid) in one piece.

    Returns:
        A new label map of the same shape and dtype.
    """
    label = np.asarray(label)
    if not np.issubdtype(label.dtype, np.integer) or label.ndim == 0:
        _fail("label", "an integer label map", f"dtype {label.dtype}, shape {label.shape}")
    if label.size and label.min() < 0:
        _fail("label", "non-negative label values", f"minimum {label.min()}")
    connectivity = label.ndim if connectivity is None else connectivity
    if isinstance(connectivity, bool) or not isinstance(connectivity, int) or not 1 <= connectivity <= label.ndim:
        _fail("connectivity", f"an int in [1, {label.ndim}]", connectivity)
    structure = ndi.generate_binary_structure(label.ndim, connectivity)
    boxes = ndi.find_objects(label) if label.size else []  # one pass gives every value's bounding box
    if labels is None:
        values = [v for v, box in enumerate(boxes, start=1) if box is not None]
    else:
        values = list(labels)
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0]
        if bad:
            _fail("labels", "positive label values", bad)
    out = label.copy()
    for value in values:
        box = boxes[value - 1] if value <= len(boxes) else None
        if box is None:
            continue
        region = label[box] == value
        out[box][region & ~_largest_only(region, structure)] = 0
    return out
