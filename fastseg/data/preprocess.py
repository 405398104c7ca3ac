"""Preprocessing of one case: crop to the body, CT windowing / normalisation, resampling to a target spacing,
and the inverse steps that put a prediction back on the original grid.

Arrays are in the file's index order (x, y, z), channel first where there are channels, as in
``fastseg.data.io.Image``. The pipeline follows nnU-Net's (Isensee et al., Nature Methods 2021): crop first
(cheaper), normalise, then resample; a prediction is resampled back to the cropped shape and pasted into a
background volume of the original shape.

Grid convention for every resampling here: the volume's outer edges stay aligned ("grid mode", as
``scipy.ndimage.zoom(grid_mode=True)`` and skimage's ``resize``), so output voxel ``o`` of ``m`` along an axis
of ``n`` input voxels is centred on input coordinate ``(o + 0.5) * n / m - 0.5``. The physical extent is
kept; the effective output spacing is ``n * spacing / m``, which differs from the requested spacing by less
than half an output voxel over the whole extent. With this convention ``resample_to_shape`` to the input
shape is the exact inverse mapping of ``resample``.

Label maps: per-label partial-volume interpolation + argmax, with a guarantee that no label present in the
input vanishes (see :func:`resample_to_shape`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import scipy.ndimage as ndi
import scipy.sparse as sparse

__all__ = [
    "Preprocessed",
    "RestoreInfo",
    "body_bbox",
    "ct_intensity_properties",
    "normalize_ct",
    "preprocess_case",
    "resample",
    "resample_to_shape",
    "restore_label",
    "restore_probabilities",
    "restore_probabilities_box",
]

# Ties between interpolated label fractions are decided with this slack so that float rounding never
# flips them: a foreground label wins a tie with the background (as nnU-Net's ``>= 0.5``, which favours the
# minority at boundaries that an integer factor splits in halves), a smaller label a tie with a larger one.
_TIE = 1e-6


def _fail(fn: str, name: str, expected: str, got) -> None:
    raise ValueError(f"{fn}: {name}: expected {expected}, got {got!r}")


def _array_desc(a: np.ndarray) -> str:
    return f"{a.dtype} array of shape {tuple(a.shape)}"


def _positive_floats(fn: str, name: str, value, ndim: int) -> tuple[float, ...]:
    """A spacing: one positive finite number per axis (a scalar is broadcast)."""
    try:
        values = np.broadcast_to(np.asarray(value, dtype=np.float64), (ndim,))
    except (TypeError, ValueError):
        _fail(fn, name, f"{ndim} positive finite numbers", value)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        _fail(fn, name, f"{ndim} positive finite numbers", value)
    return tuple(float(v) for v in values)


def _shape_tuple(fn: str, name: str, value, ndim: Optional[int] = None) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in value)
        ok = all(s >= 1 and s == v for s, v in zip(shape, value))
    except (TypeError, ValueError):
        ok = False
    if not ok or (ndim is not None and len(shape) != ndim):
        what = f"{ndim} positive integers" if ndim is not None else "a tuple of positive integers"
        _fail(fn, name, what, value)
    return shape


def _round_half_up(x: float) -> int:
    # Python's round() is round-half-even; shapes use the usual rounding so 2.5 -> 3 as in the brief's formula.
    return int(math.floor(x + 0.5))


# ----------------------------------------------------------------------------------------------------------
# Resampling
# ----------------------------------------------------------------------------------------------------------

def _axis_weights(n: int, m: int) -> sparse.csr_matrix:
    """(m, n) interpolation matrix of one axis; every row sums to one.

    Upsampling (m > n): linear interpolation at the grid-mode centres, clamped at the edges.
    Downsampling (m < n): area (box) weights, i.e. the fraction of output voxel ``o``'s interval
    ``[o * n/m, (o + 1) * n/m)`` covered by each input voxel. Plain point sampling would skip input voxels
    entirely once n/m > 2, which is how small organs disappear; area weights see every input voxel.
    """
    if m == n:
        return sparse.identity(n, dtype=np.float64, format="csr")
    rows, cols, vals = [], [], []
    if m > n:
        x = np.clip((np.arange(m) + 0.5) * (n / m) - 0.5, 0.0, n - 1.0)
        i0 = np.floor(x).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        w1 = x - i0
        rows = np.concatenate([np.arange(m), np.arange(m)])
        cols = np.concatenate([i0, i1])
        vals = np.concatenate([1.0 - w1, w1])
    else:
        r = n / m
        for o in range(m):
            a, b = o * r, (o + 1) * r
            for i in range(int(math.floor(a)), min(n, int(math.ceil(b)))):
                overlap = min(b, i + 1.0) - max(a, float(i))
                if overlap > 0:
                    rows.append(o)
                    cols.append(i)
                    vals.append(overlap / r)
    # coo -> csr sums the duplicate (o, i) pairs that clamping creates at the edges.
    return sparse.coo_matrix((vals, (rows, cols)), shape=(m, n)).tocsr()


def _is_identity(mat: sparse.csr_matrix) -> bool:
    n = mat.shape[0]
    return (mat.shape[1] == n and mat.nnz == n and np.array_equal(mat.indices, np.arange(n))
            and np.array_equal(mat.indptr, np.arange(n + 1)) and bool(np.all(mat.data == 1.0)))


def _apply_separable(array: np.ndarray, mats: Sequence[sparse.csr_matrix]) -> np.ndarray:
    """Apply one (m, n) matrix per axis; identity axes are skipped."""
    out = np.asarray(array, dtype=np.float64)
    for axis, mat in enumerate(mats):
        if _is_identity(mat):
            continue
        moved = np.moveaxis(out, axis, 0)
        rest = moved.shape[1:]
        flat = mat @ moved.reshape(moved.shape[0], -1)
        out = np.moveaxis(np.asarray(flat).reshape((mat.shape[0],) + rest), 0, axis)
    return np.ascontiguousarray(out)


def _support_rows(mat: sparse.csr_matrix, start: int, stop: int) -> tuple[int, int]:
    """Output rows that receive weight from input columns [start, stop) (contiguous: weights are banded)."""
    touched = np.flatnonzero(np.asarray(mat[:, start:stop].sum(axis=1)).ravel() > 0)
    return int(touched[0]), int(touched[-1]) + 1


def _resample_label_map(label: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per-label partial-volume interpolation + argmax, keeping every input label present.

    Each label's indicator is interpolated with :func:`_axis_weights` inside the label's bounding box only
    (so cost scales with organ size, not volume size); the background fraction is one minus the summed
    foreground fractions, since the weights of every output voxel sum to one.
    """
    if label.shape == shape:
        return label.copy()
    mats = [_axis_weights(n, m) for n, m in zip(label.shape, shape)]
    out = np.zeros(shape, dtype=label.dtype)
    best = np.zeros(shape, dtype=np.float32)
    total = np.zeros(shape, dtype=np.float32)
    peaks = {}  # label -> (flat index in out, fraction) of its largest fraction, for the survival step
    boxes = ndi.find_objects(label)
    for value, box in enumerate(boxes, start=1):
        if box is None:
            continue
        region, sub_mats = [], []
        for axis, sl in enumerate(box):
            r0, r1 = _support_rows(mats[axis], sl.start, sl.stop)
            region.append(slice(r0, r1))
            sub_mats.append(mats[axis][r0:r1, sl.start:sl.stop])
        region = tuple(region)
        fraction = _apply_separable(label[box] == value, sub_mats).astype(np.float32)
        wins = fraction > best[region] + _TIE
        best[region][wins] = fraction[wins]
        out[region][wins] = value
        total[region] += fraction
        local = np.unravel_index(int(np.argmax(fraction)), fraction.shape)
        peaks[value] = (tuple(r.start + i for r, i in zip(region, local)), float(fraction[local]))
    out[best < (1.0 - total) - _TIE] = 0
    # A label thinner than an output voxel can lose every argmax; give it the voxel where it has its
    # largest fraction rather than drop the organ (cochlea-sized structures at a coarse spacing).
    missing = set(peaks) - set(np.unique(out).tolist())
    for value in sorted(missing, key=lambda v: peaks[v][1]):
        out[peaks[value][0]] = value
    return out


def _split_channels(fn: str, array: np.ndarray, ndim: int) -> tuple[np.ndarray, bool]:
    """View ``array`` as (C, *spatial); the flag says whether it had a channel axis."""
    if array.ndim == ndim:
        return array[None], False
    if array.ndim == ndim + 1:
        return array, True
    _fail(fn, "array", f"a {ndim}-D spatial array or a (C, *spatial) stack", _array_desc(array))


def _check_label_dtype(fn: str, label: np.ndarray) -> np.ndarray:
    if label.dtype == np.bool_:
        return label.view(np.uint8)
    if not np.issubdtype(label.dtype, np.integer):
        _fail(fn, "array", "an integer or bool label array (is_label=True)", _array_desc(label))
    if label.size and label.min() < 0:
        _fail(fn, "array", "non-negative label values", f"minimum {label.min()}")
    return label


def resample_to_shape(array: np.ndarray, shape: Sequence[int], *, is_label: bool = False,
                      order: int = 3) -> np.ndarray:
    """Resample an image or label array to a given spatial shape (grid mode: the outer edges stay aligned).

    Args:
        array: (*spatial) or (C, *spatial) array; channels are resampled independently.
        shape: the new spatial shape, one entry per spatial axis.
        is_label: a label map (integer) or a (C, *spatial) stack of binary masks. Labels are resampled by
            per-label partial-volume interpolation (linear when upsampling, area fractions when
            downsampling) and argmax over labels; foreground wins a tie with background. Unlike nearest neighbour, which
            samples one point per output voxel and drops any structure between the points, this sees every
            input voxel, keeps boundaries at the 50 % iso-surface, and is guaranteed to keep every label that
            is present in the input (a label that would lose every argmax keeps its best voxel), so a
            1-voxel organ survives downsampling. At the same shape it is the identity.
        order: spline order for images (scipy.ndimage): 0 nearest, 1 linear, 3 cubic; ignored for labels.

    Returns:
        The resampled array: labels keep their dtype, images come back as float32 (float64 stays float64).
    """
    fn = "resample_to_shape"
    array = np.asarray(array)
    shape = _shape_tuple(fn, "shape", shape)
    if order not in range(6):
        _fail(fn, "order", "a spline order in 0..5", order)
    channels, had_channels = _split_channels(fn, array, len(shape))
    if is_label:
        dtype = array.dtype
        channels = _check_label_dtype(fn, channels)
        out = np.stack([_resample_label_map(c, shape) for c in channels])
        if dtype == np.bool_:
            out = out.astype(np.bool_)
    else:
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            _fail(fn, "array", "a numeric image array", _array_desc(array))
        dtype = np.float64 if array.dtype == np.float64 else np.float32
        channels = channels.astype(dtype, copy=False)
        out = np.stack([_resample_image(c, shape, order) for c in channels])
    return out if had_channels else out[0]


def _resample_image(image: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    if image.shape == shape:
        return image.copy()
    zoom = [m / n for m, n in zip(shape, image.shape)]
    # mode='nearest' extends the edge values, so cubic splines do not ring towards a zero outside.
    out = ndi.zoom(image, zoom, order=order, mode="nearest", grid_mode=True)
    if out.shape != shape:  # zoom rounds n * (m / n); guard against a float surprise
        raise RuntimeError(f"resample_to_shape: internal error, zoom gave {out.shape} instead of {shape}")
    return out


def resample(array: np.ndarray, spacing: Sequence[float], new_spacing: Sequence[float], *,
             is_label: bool = False, order: int = 3) -> np.ndarray:
    """Resample an image or label array from ``spacing`` to ``new_spacing``.

    Args:
        array: (*spatial) or (C, *spatial) array, spatial axes in the order of ``spacing``.
        spacing: current voxel size per spatial axis (mm).
        new_spacing: target voxel size per spatial axis (mm); a scalar means isotropic.
        is_label: label map / binary stack (see :func:`resample_to_shape` for the label scheme).
        order: spline order for images.

    Returns:
        Array of spatial shape ``round(shape * spacing / new_spacing)`` (half up, at least 1).

    Example:
        >>> resample(np.zeros((10, 10, 4)), (1, 1, 2.5), (2, 2, 2)).shape
        (5, 5, 5)
    """
    fn = "resample"
    array = np.asarray(array)
    nd = len(np.atleast_1d(spacing))
    if array.ndim not in (nd, nd + 1):
        _fail(fn, "array", f"a {nd}-D spatial array or a (C, *spatial) stack to match spacing {spacing}",
              _array_desc(array))
    spacing = _positive_floats(fn, "spacing", spacing, nd)
    new_spacing = _positive_floats(fn, "new_spacing", new_spacing, nd)
    spatial = array.shape[array.ndim - nd:]
    shape = tuple(max(1, _round_half_up(n * s / t)) for n, s, t in zip(spatial, spacing, new_spacing))
    return resample_to_shape(array, shape, is_label=is_label, order=order)


def _resample_fractions(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(C, *S) float -> (C, *shape) float32 with the label weights (linear up, area down); sums are kept."""
    mats = [_axis_weights(n, m) for n, m in zip(array.shape[1:], shape)]
    return np.stack([_apply_separable(c, mats).astype(np.float32) for c in array])


# ----------------------------------------------------------------------------------------------------------
# Intensities
# ----------------------------------------------------------------------------------------------------------

def _check_window(fn: str, window) -> Optional[tuple[float, float]]:
    if window is None:
        return None
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        _fail(fn, "window", "a (low, high) pair of numbers or None", window)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        _fail(fn, "window", "finite numbers with low < high", window)
    return lo, hi


def normalize_ct(array: np.ndarray, window: Optional[Sequence[float]] = (-1000.0, 1000.0),
                 mean: Optional[float] = None, std: Optional[float] = None) -> np.ndarray:
    """Clip a CT image to an HU window, then normalise it.

    Two schemes:
      * fixed window (default, ``mean`` and ``std`` None): clip to ``window`` and map it linearly onto
        [-1, 1] — dataset-independent, what the bundled phantom trainer uses;
      * nnU-Net's CT scheme (``mean`` and ``std`` given): clip to ``window`` (nnU-Net uses the 0.5 / 99.5
        percentiles of the foreground intensities, see :func:`ct_intensity_properties`), then
        ``(x - mean) / std`` with the foreground mean and std of the training set.
    With ``window=None`` nothing is clipped; without ``mean``/``std`` that becomes a per-image z-score
    (nnU-Net's scheme for non-CT images).

    Args:
        array: image of any shape (HU for CT).
        window: (low, high) clip range, or None.
        mean, std: both or neither; std must be positive.

    Returns:
        float32 array of the same shape.
    """
    fn = "normalize_ct"
    array = np.asarray(array)
    if not (np.issubdtype(array.dtype, np.number) and not np.iscomplexobj(array)):
        _fail(fn, "array", "a real numeric image array", _array_desc(array))
    window = _check_window(fn, window)
    if (mean is None) != (std is None):
        _fail(fn, "mean/std", "both given or both None", (mean, std))
    if std is not None and not (math.isfinite(float(std)) and float(std) > 0):
        _fail(fn, "std", "a positive finite number", std)
    if mean is not None and not math.isfinite(float(mean)):
        _fail(fn, "mean", "a finite number", mean)
    x = array.astype(np.float32)  # always a copy: the caller's array is never modified
    if window is not None:
        np.clip(x, window[0], window[1], out=x)
    if mean is not None:
        x -= np.float32(mean)
        x /= np.float32(std)
    elif window is not None:
        lo, hi = window
        x -= np.float32(lo)
        x *= np.float32(2.0 / (hi - lo))
        x -= np.float32(1.0)
    else:
        x -= np.float32(x.mean(dtype=np.float64))
        x /= np.float32(max(float(x.std(dtype=np.float64)), 1e-8))
    return x


def ct_intensity_properties(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], *,
                            percentiles: tuple[float, float] = (0.5, 99.5), samples_per_case: int = 10000,
                            seed: int = 0) -> dict:
    """nnU-Net's CT normalisation parameters from training cases: foreground intensity percentiles, mean, std.

    As nnU-Net's dataset fingerprint, a fixed number of foreground voxels (label != 0) is drawn from each
    case so that every case weighs the same.

    Args:
        images: CT arrays (HU).
        labels: label maps (or (C, *S) stacks) of the same spatial shapes.
        percentiles: the clip window, in percent.
        samples_per_case: voxels drawn per case (all of them when a case has fewer).
        seed: seed of the draw.

    Returns:
        ``{"window": (low, high), "mean": float, "std": float}``, ready for ``normalize_ct(x, **props)``.
    """
    fn = "ct_intensity_properties"
    if len(images) != len(labels) or len(images) == 0:
        _fail(fn, "images/labels", "two non-empty sequences of the same length", (len(images), len(labels)))
    rng = np.random.default_rng(seed)
    values = []
    for k, (image, label) in enumerate(zip(images, labels)):
        image, label = np.asarray(image), np.asarray(label)
        fg = label.any(axis=0) if label.ndim == image.ndim + 1 else label != 0
        if fg.shape != image.shape:
            _fail(fn, f"labels[{k}]", f"spatial shape {image.shape}", label.shape)
        v = image[fg]
        if v.size > samples_per_case:
            v = rng.choice(v, samples_per_case, replace=False)
        values.append(v.astype(np.float64))
    values = np.concatenate(values)
    if values.size == 0:
        _fail(fn, "labels", "at least one foreground voxel", "none")
    lo, hi = np.percentile(values, percentiles)
    return {"window": (float(lo), float(hi)), "mean": float(values.mean()), "std": float(max(values.std(), 1e-8))}


# ----------------------------------------------------------------------------------------------------------
# Cropping
# ----------------------------------------------------------------------------------------------------------

def _margins(fn: str, margin, ndim: int) -> tuple[int, ...]:
    values = np.broadcast_to(np.asarray(margin), (ndim,)) if np.ndim(margin) <= 1 else None
    if values is None or not all(float(v) == int(v) and int(v) >= 0 for v in values):
        _fail(fn, "margin", f"a non-negative integer or {ndim} of them", margin)
    return tuple(int(v) for v in values)


def body_bbox(ct: np.ndarray, threshold: float = -500.0, margin: Union[int, Sequence[int]] = 2, *,
              min_fraction: float = 0.1) -> tuple[slice, ...]:
    """Bounding box of the body in a CT image.

    Voxels above ``threshold`` HU (air is about -1000, fat about -100) are grouped into connected
    components; components with at least ``min_fraction`` of the largest one's voxels are kept, so noise
    specks and small debris are ignored while large separate parts (an arm next to the torso) stay in.

    Args:
        ct: spatial CT array (HU).
        threshold: body / air threshold in HU.
        margin: voxels added on every side (per axis or one for all), clipped to the image.
        min_fraction: components smaller than this fraction of the largest are dropped.

    Returns:
        One slice per axis; the whole image when nothing exceeds the threshold.
    """
    fn = "body_bbox"
    ct = np.asarray(ct)
    if ct.ndim == 0 or not np.issubdtype(ct.dtype, np.number):
        _fail(fn, "ct", "a numeric spatial array", _array_desc(ct))
    margin = _margins(fn, margin, ct.ndim)
    components, count = ndi.label(ct > threshold)
    if count == 0:
        return tuple(slice(0, n) for n in ct.shape)
    sizes = np.bincount(components.ravel())[1:]
    keep = np.flatnonzero(sizes >= min_fraction * sizes.max())
    boxes = ndi.find_objects(components)
    lo = np.min([[s.start for s in boxes[k]] for k in keep], axis=0)
    hi = np.max([[s.stop for s in boxes[k]] for k in keep], axis=0)
    return tuple(slice(max(0, int(a) - m), min(n, int(b) + m)) for a, b, m, n in zip(lo, hi, margin, ct.shape))


def _foreground_bbox(label: np.ndarray, ndim: int) -> Optional[tuple[slice, ...]]:
    fg = label.any(axis=0) if label.ndim == ndim + 1 else label != 0
    box = ndi.find_objects(fg.astype(np.uint8))
    return box[0] if box else None


# ----------------------------------------------------------------------------------------------------------
# The trainer / predictor pair
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RestoreInfo:
    """What :func:`restore_label` / :func:`restore_probabilities` need to undo :func:`preprocess_case`.

    Attributes:
        original_shape: spatial shape of the input image.
        original_spacing: its spacing (mm).
        bbox: ((start, stop), ...) per axis: the crop, in original voxel indices.
        cropped_shape: spatial shape after the crop.
        shape: spatial shape after resampling (the shape the network sees).
        spacing: the spacing after resampling (the target spacing, or the original one).
    """

    original_shape: tuple[int, ...]
    original_spacing: tuple[float, ...]
    bbox: tuple[tuple[int, int], ...]
    cropped_shape: tuple[int, ...]
    shape: tuple[int, ...]
    spacing: tuple[float, ...]

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.bbox)

    def to_dict(self) -> dict:
        """JSON-friendly form (lists)."""
        return {k: [list(v) for v in getattr(self, k)] if k == "bbox" else list(getattr(self, k))
                for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> "RestoreInfo":
        return cls(original_shape=tuple(int(v) for v in d["original_shape"]),
                   original_spacing=tuple(float(v) for v in d["original_spacing"]),
                   bbox=tuple((int(a), int(b)) for a, b in d["bbox"]),
                   cropped_shape=tuple(int(v) for v in d["cropped_shape"]),
                   shape=tuple(int(v) for v in d["shape"]),
                   spacing=tuple(float(v) for v in d["spacing"]))


@dataclass
class Preprocessed:
    """A preprocessed case.

    Attributes:
        image: (C, *S) float32 (C = 1 for a plain CT).
        label: (*S) label map (uint8, or int16 / int32 when values need it), a (K, *S) uint8 multi-label
            stack, or None.
        spacing: spacing of ``image`` (mm).
        info: how to undo it (:class:`RestoreInfo`).
    """

    image: np.ndarray
    label: Optional[np.ndarray]
    spacing: tuple[float, ...]
    info: RestoreInfo


def _unwrap(value, spacing):
    """Accept a fastseg.data.io.Image (or anything with .array and .spacing) as well as a bare array."""
    if hasattr(value, "array") and hasattr(value, "spacing"):
        return np.asarray(value.array), (spacing if spacing is not None else value.spacing)
    return (None if value is None else np.asarray(value)), spacing


def _compact_label_dtype(label: np.ndarray, stack: bool) -> np.ndarray:
    if stack:
        return (label != 0).astype(np.uint8)
    top = int(label.max()) if label.size else 0
    dtype = np.uint8 if top < 2 ** 8 else np.int16 if top < 2 ** 15 else np.int32
    return label.astype(dtype, copy=False)


def preprocess_case(image, spacing=None, label=None, *, target_spacing: Optional[Sequence[float]] = None,
                    window: Optional[Sequence[float]] = (-1000.0, 1000.0), mean: Optional[float] = None,
                    std: Optional[float] = None, crop: bool = True, body_threshold: float = -500.0,
                    margin: Union[int, Sequence[int]] = 2, order: int = 3) -> Preprocessed:
    """Crop to the body, normalise and resample one case (used identically by the trainer and predictor).

    Args:
        image: (*S) CT array (HU) or (C, *S) multi-channel array, or a ``fastseg.data.io.Image``.
        spacing: voxel size per spatial axis (mm); optional when ``image`` is an Image.
        label: None, a (*S) label map, or a (K, *S) stack of binary masks (multi-label / sigmoid training);
            an Image is accepted too.
        target_spacing: resample to this spacing; None keeps the original.
        window, mean, std: see :func:`normalize_ct` (applied per channel).
        crop: crop to :func:`body_bbox` of the first channel; when a label is given, the crop is widened
            to contain all its foreground, so no annotation is ever cut away.
        body_threshold, margin: passed to :func:`body_bbox`.
        order: spline order for the image resampling.

    Returns:
        :class:`Preprocessed`; undo with :func:`restore_label` / :func:`restore_probabilities`.
    """
    fn = "preprocess_case"
    image, spacing = _unwrap(image, spacing)
    label, _ = _unwrap(label, None)
    if image is None or spacing is None:
        _fail(fn, "spacing", "a spacing (or an Image that carries one)", spacing)
    nd = len(np.atleast_1d(spacing))
    spacing = _positive_floats(fn, "spacing", spacing, nd)
    if image.ndim not in (nd, nd + 1):
        _fail(fn, "image", f"a {nd}-D array or a (C, *spatial) stack to match spacing {spacing}",
              _array_desc(image))
    channels = image if image.ndim == nd + 1 else image[None]
    shape = channels.shape[1:]
    stack = False
    if label is not None:
        if label.ndim == nd + 1:
            stack = True
        if label.ndim not in (nd, nd + 1) or label.shape[label.ndim - nd:] != shape:
            _fail(fn, "label", f"a label map of shape {shape} or a (K, {', '.join(map(str, shape))}) stack",
                  _array_desc(label))
        label = _check_label_dtype(fn, label)
    new_spacing = spacing if target_spacing is None else _positive_floats(fn, "target_spacing", target_spacing, nd)

    box = tuple(slice(0, n) for n in shape)
    if crop:
        box = body_bbox(channels[0], body_threshold, margin)
        if label is not None:
            fg = _foreground_bbox(label, nd)
            if fg is not None:
                box = tuple(slice(min(b.start, f.start), max(b.stop, f.stop)) for b, f in zip(box, fg))
    cropped = channels[(slice(None),) + box]
    cropped_shape = cropped.shape[1:]

    normed = np.stack([normalize_ct(c, window, mean, std) for c in cropped])
    if new_spacing != spacing:
        normed = resample(normed, spacing, new_spacing, order=order)
    out_label = None
    if label is not None:
        cut = label[(slice(None),) * (label.ndim - nd) + box]
        if new_spacing != spacing:
            cut = resample(cut, spacing, new_spacing, is_label=True)
        out_label = _compact_label_dtype(cut, stack)
    info = RestoreInfo(original_shape=tuple(shape), original_spacing=spacing,
                       bbox=tuple((s.start, s.stop) for s in box), cropped_shape=tuple(cropped_shape),
                       shape=tuple(normed.shape[1:]), spacing=new_spacing)
    return Preprocessed(image=np.ascontiguousarray(normed, dtype=np.float32), label=out_label,
                        spacing=new_spacing, info=info)


def _info(fn: str, info) -> RestoreInfo:
    info = getattr(info, "info", info)
    if not isinstance(info, RestoreInfo):
        _fail(fn, "info", "a RestoreInfo or Preprocessed", type(info).__name__)
    return info


def restore_label(pred_label: np.ndarray, info) -> np.ndarray:
    """Put a label map predicted on the preprocessed grid back onto the original image grid.

    Resamples to the cropped shape with the label scheme of :func:`resample_to_shape` (the identity when
    no resampling happened) and pastes it into a background (0) volume of the original shape.

    Args:
        pred_label: (*S) label map or (K, *S) binary stack on the preprocessed grid (``info.shape``).
        info: :class:`RestoreInfo` (or the :class:`Preprocessed` it came with).

    Returns:
        Array of the original spatial shape (with the leading K for a stack), same dtype as ``pred_label``.
    """
    fn = "restore_label"
    info = _info(fn, info)
    pred = np.asarray(pred_label)
    nd = len(info.shape)
    if pred.ndim not in (nd, nd + 1) or pred.shape[pred.ndim - nd:] != info.shape:
        _fail(fn, "pred_label", f"spatial shape {info.shape} (the preprocessed shape)", _array_desc(pred))
    lead = pred.shape[:pred.ndim - nd]
    resized = resample_to_shape(pred, info.cropped_shape, is_label=True)
    out = np.zeros(lead + info.original_shape, dtype=pred.dtype)
    out[(slice(None),) * len(lead) + info.slices] = resized
    return out


def _probs_and_info(fn: str, probs, info) -> tuple[np.ndarray, RestoreInfo]:
    info = _info(fn, info)
    probs = np.asarray(probs)
    if probs.ndim != len(info.shape) + 1 or probs.shape[1:] != info.shape or not np.issubdtype(probs.dtype, np.floating):
        _fail(fn, "probs", f"a float (K, {', '.join(map(str, info.shape))}) array", _array_desc(probs))
    return probs, info


def restore_probabilities(probs: np.ndarray, info) -> np.ndarray:
    """Put (K, *S) class probabilities back onto the original grid; outside the crop background = 1.

    Resampling is linear when upsampling and area-averaging when downsampling; both keep per-voxel sums,
    so softmax outputs still sum to one. Channel 0 is the background.

    Args:
        probs: (K, *S) probabilities on the preprocessed grid.
        info: :class:`RestoreInfo` or :class:`Preprocessed`.

    Returns:
        (K, *original_shape) float32.
    """
    probs, info = _probs_and_info("restore_probabilities", probs, info)
    resized = _resample_fractions(probs, info.cropped_shape)
    out = np.zeros((probs.shape[0],) + info.original_shape, dtype=np.float32)
    out[0] = 1.0
    out[(slice(None),) + info.slices] = resized
    return out


def restore_probabilities_box(probs: np.ndarray, info, threshold: float = 1.0 / 255, *, background: bool = True
                              ) -> tuple[np.ndarray, tuple[int, ...]]:
    """:func:`restore_probabilities` restricted to the box where some organ is likely.

    A 22-class 512x512x160 volume costs 3.7 GB in float32, almost all of it background ~1. This restores only
    the original-grid voxels that receive weight from preprocessed voxels where an organ channel (1..K-1, or
    every channel when ``background`` is False, as for sigmoid outputs) reaches ``threshold``; every restored
    voxel has exactly the value :func:`restore_probabilities` gives it. Outside the box every organ
    probability is below ``threshold`` (an average of values below it).

    Returns:
        (probs in the box (K, *box) float32, the box's lower corner in original voxel indices). With no
        foreground anywhere the box is empty (zero-size axes) at the origin.
    """
    probs, info = _probs_and_info("restore_probabilities_box", probs, info)
    nd = len(info.shape)
    organs = probs[1:] if background else probs
    likely = organs.max(0) >= threshold if len(organs) else np.zeros(info.shape, bool)
    box = _foreground_bbox(likely, nd)
    if box is None:
        return np.zeros((probs.shape[0],) + (0,) * nd, np.float32), (0,) * nd
    mats, rows, cols = [], [], []
    for axis, sl in enumerate(box):
        mat = _axis_weights(info.shape[axis], info.cropped_shape[axis])
        r0, r1 = _support_rows(mat, sl.start, sl.stop)
        used = mat[r0:r1].indices  # every input column those output rows read (the weights are banded)
        c0, c1 = int(used.min()), int(used.max()) + 1
        mats.append(mat[r0:r1, c0:c1])
        rows.append(r0)
        cols.append(slice(c0, c1))
    part = np.stack([_apply_separable(c, mats).astype(np.float32) for c in probs[(slice(None),) + tuple(cols)]])
    lower = tuple(int(r + b0) for r, (b0, _) in zip(rows, info.bbox))
    return part, lower
