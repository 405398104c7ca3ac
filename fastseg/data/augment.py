"""Training-time augmentation of (image, label) patches, nnU-Net style.

Defaults and the order of the transforms follow nnU-Net v2's training transforms (Isensee et al., Nature
Methods 2021; ``nnUNetTrainer.get_training_transforms``): spatial transform (rotation, scaling) -> Gaussian
noise -> brightness / contrast -> gamma -> mirroring. Rotation is ±15° and, by default, only around the axis
with the coarsest spacing: for anisotropic CT (e.g. 1 × 1 × 2.5 mm) rotating a through-plane axis would
interpolate across thick slices, which nnU-Net avoids too (its "dummy 2D" augmentation for anisotropic data).
Spatial transforms use one affine map for image (spline ``order``, linear by default) and label (nearest),
so both stay aligned; intensity transforms touch the image only. Everything random comes from the
``numpy.random.Generator`` passed in, so a call is deterministic given its generator.

Mirroring the patient's left-right axis turns a left organ into a right one. Head-and-neck datasets label
most organs by side (Parotid-Lt / Parotid-Rt: 16 of the 21 shared organs), and nnU-Net's plain mirroring
then teaches the network that either label is right on either side, so it can learn neither. With
``swap_on_flip`` a flip of that axis also swaps the labels of each left / right pair, so the flipped patch is
a correctly labelled mirror-image patient; :func:`lateral_pairs` finds the pairs by name and
:func:`lateral_axis` the axis from the image's direction.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Optional, Sequence

import numpy as np
import scipy.ndimage as ndi
import torch

__all__ = ["Augmenter", "lateral_axis", "lateral_pairs", "swapped_channels"]

# a side token: a whole word of the name (delimited by start / end, '-', '_', ' ' or '.')
_SIDE = re.compile(r"(?<![A-Za-z0-9])(Lt|Rt|LT|RT|lt|rt|L|R|l|r|Left|Right|left|right|LEFT|RIGHT)(?![A-Za-z0-9])")
_OTHER_SIDE = {"Lt": "Rt", "LT": "RT", "lt": "rt", "L": "R", "l": "r", "Left": "Right", "left": "right",
               "LEFT": "RIGHT"}
_OTHER_SIDE.update({v: k for k, v in _OTHER_SIDE.items()})


def lateral_pairs(names: Sequence[str]) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, i < j, of names that differ only by a side token (Parotid-Lt / Parotid-Rt,
    Lens_L / Lens_R, Left Orbit / Right Orbit)."""
    index = {name: i for i, name in enumerate(names)}
    pairs = []
    for i, name in enumerate(names):
        mirrored = _SIDE.sub(lambda m: _OTHER_SIDE[m.group(0)], name)
        j = index.get(mirrored)
        if j is not None and j > i:
            pairs.append((i, j))
    return pairs


def lateral_axis(direction) -> int:
    """The array axis closest to the patient's left-right (LPS x) direction; ``direction``'s column ``a`` is
    the unit vector of array axis ``a`` (``fastseg.data.io.Image.direction``)."""
    return int(np.argmax(np.abs(np.asarray(direction, dtype=np.float64)[0])))


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"Augmenter: {name}: expected {expected}, got {got!r}")


def _probability(name: str, p) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        _fail(name, "a probability in [0, 1]", p)
    return p


def _interval(name: str, value, *, low: float = -math.inf, strict: bool = False) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        _fail(name, "a (low, high) pair of numbers", value)
    bad = a > b or not (math.isfinite(a) and math.isfinite(b)) or (a <= low if strict else a < low)
    if bad:
        bound = f" {'>' if strict else '>='} {low}" if low > -math.inf else ""
        _fail(name, f"finite numbers with low <= high{bound}", value)
    return a, b


def _rotation_matrix(ndim: int, plane: tuple[int, int], angle: float) -> np.ndarray:
    i, j = plane
    r = np.eye(ndim)
    c, s = math.cos(angle), math.sin(angle)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _planes(ndim: int, axes: Sequence[int]) -> list[tuple[int, int]]:
    """Rotation planes: in 2D the one plane; in 3D the plane orthogonal to each rotation axis."""
    if ndim == 2:
        return [(0, 1)]
    return [tuple(a for a in range(3) if a != axis) for axis in axes]


class Augmenter:
    """Random flips, rotation, scaling, noise, brightness/contrast and gamma for 2D and 3D patches.

    Args:
        flip_axes: spatial axes that may be mirrored (axes beyond the patch's dimension are ignored).
        p_flip: probability of mirroring, per axis (nnU-Net: 0.5).
        rotation: angle range in degrees (nnU-Net uses ±30° for isotropic 3D data; ±15° here).
        rotation_axes: 3D axes to rotate around, each with its own angle. Default: the axis of the coarsest
            ``spacing`` (every axis when isotropic), or the last axis when no spacing is given.
        p_rotation: probability of a rotation (nnU-Net: 0.2).
        scale: zoom factor range; > 1 enlarges the content (nnU-Net: 0.7 – 1.4).
        p_scale: probability of scaling (nnU-Net: 0.2).
        intensity_scale: multiplicative brightness range, per channel (nnU-Net: 0.75 – 1.25).
        intensity_shift: additive shift range (normalised units), per channel.
        p_intensity: probability of the brightness transform (nnU-Net: 0.15).
        gamma: gamma range (nnU-Net: 0.7 – 1.5), applied on the patch rescaled to [0, 1], mean and std kept.
        p_gamma: probability of the gamma transform (nnU-Net: 0.3).
        noise_std: range of the std of additive Gaussian noise (nnU-Net: 0 – 0.1).
        p_noise: probability of noise (nnU-Net: 0.1).
        spacing: voxel spacing of the patches; rotations are done in mm so anisotropic voxels do not shear.
        order: spline order for the image in spatial transforms (labels always use nearest).
        swap_on_flip: ``{axis: [(a, b), ...]}``: a flip of ``axis`` also exchanges label values a and b (in a
            (K, *P) stack, channels a - 1 and b - 1): the left / right organ pairs on the lateral axis.
        intensity_channels: brightness, gamma and noise touch only the first this many image channels (None:
            all). The cascade's stage two passes its CT channel only: its other channels are stage one's
            probabilities, which never take the values those transforms would make of them (nnU-Net also adds
            its previous-stage channels after the intensity transforms).

    Example:
        >>> aug = Augmenter(spacing=(1.0, 1.0, 2.5))
        >>> image, label = aug(image, label, np.random.default_rng(0))
    """

    def __init__(self, *, flip_axes: Sequence[int] = (0, 1, 2), p_flip: float = 0.5,
                 rotation: Sequence[float] = (-15.0, 15.0), rotation_axes: Optional[Sequence[int]] = None,
                 p_rotation: float = 0.2, scale: Sequence[float] = (0.85, 1.25), p_scale: float = 0.2,
                 intensity_scale: Sequence[float] = (0.75, 1.25), intensity_shift: Sequence[float] = (-0.1, 0.1),
                 p_intensity: float = 0.15, gamma: Sequence[float] = (0.7, 1.5), p_gamma: float = 0.3,
                 noise_std: Sequence[float] = (0.0, 0.1), p_noise: float = 0.1,
                 spacing: Optional[Sequence[float]] = None, order: int = 1,
                 swap_on_flip: Optional[Mapping[int, Sequence[Sequence[int]]]] = None,
                 intensity_channels: Optional[int] = None):
        if any(int(a) != a or a < 0 for a in flip_axes):
            _fail("flip_axes", "non-negative integer axes", flip_axes)
        self.flip_axes = tuple(int(a) for a in flip_axes)
        self.p_flip = _probability("p_flip", p_flip)
        self.rotation = _interval("rotation", rotation)
        self.p_rotation = _probability("p_rotation", p_rotation)
        self.scale = _interval("scale", scale, low=0.0, strict=True)
        self.p_scale = _probability("p_scale", p_scale)
        self.intensity_scale = _interval("intensity_scale", intensity_scale)
        self.intensity_shift = _interval("intensity_shift", intensity_shift)
        self.p_intensity = _probability("p_intensity", p_intensity)
        self.gamma = _interval("gamma", gamma, low=0.0, strict=True)
        self.p_gamma = _probability("p_gamma", p_gamma)
        self.noise_std = _interval("noise_std", noise_std, low=0.0)
        self.p_noise = _probability("p_noise", p_noise)
        if spacing is not None:
            spacing = tuple(float(s) for s in spacing)
            if not all(math.isfinite(s) and s > 0 for s in spacing):
                _fail("spacing", "positive finite numbers", spacing)
        self.spacing = spacing
        if rotation_axes is None:
            if spacing is None:
                rotation_axes = (2,)
            else:
                coarsest = max(spacing)
                rotation_axes = tuple(a for a, s in enumerate(spacing) if s >= coarsest * 0.99)
        if any(int(a) != a or not 0 <= a <= 2 for a in rotation_axes):
            _fail("rotation_axes", "axes in 0..2", rotation_axes)
        self.rotation_axes = tuple(int(a) for a in rotation_axes)
        if order not in range(6):
            _fail("order", "a spline order in 0..5", order)
        self.order = int(order)
        self.swap_on_flip = {int(axis): _value_permutation(pairs) for axis, pairs in (swap_on_flip or {}).items()}
        if intensity_channels is not None and (isinstance(intensity_channels, bool)
                                               or not isinstance(intensity_channels, int) or intensity_channels < 1):
            _fail("intensity_channels", "None or an int >= 1", intensity_channels)
        self.intensity_channels = intensity_channels

    def __repr__(self) -> str:
        keys = ("flip_axes", "p_flip", "rotation", "rotation_axes", "p_rotation", "scale", "p_scale",
                "intensity_scale", "intensity_shift", "p_intensity", "gamma", "p_gamma", "noise_std",
                "p_noise", "spacing", "order", "swap_on_flip", "intensity_channels")
        return "Augmenter(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in keys) + ")"

    @property
    def spatial(self) -> bool:
        """Whether rotation or scaling can happen (then extra context around the patch helps)."""
        return (self.p_rotation > 0 and self.rotation != (0.0, 0.0)) or (self.p_scale > 0 and self.scale != (1.0, 1.0))

    def _physical(self, ndim: int) -> np.ndarray:
        if self.spacing is None:
            return np.ones(ndim)
        if len(self.spacing) != ndim:
            _fail("spacing", f"{ndim} values for {ndim}-D patches", self.spacing)
        return np.asarray(self.spacing) / min(self.spacing)

    def context(self, patch_size: Sequence[int]) -> tuple[int, ...]:
        """Voxels of extra input needed on every side of a patch so that rotated / zoomed-out patches are
        filled with real image content rather than edge padding (nnU-Net samples such a larger patch too).
        """
        ndim = len(patch_size)
        if not self.spatial:
            return (0,) * ndim
        half = (np.asarray(patch_size, dtype=np.float64) - 1) / 2
        d = self._physical(ndim)
        bound = np.eye(ndim)
        if self.p_rotation > 0:
            angles = np.radians(np.linspace(self.rotation[0], self.rotation[1], 361))
            cos_max, sin_max = np.abs(np.cos(angles)).max(), np.abs(np.sin(angles)).max()
            # Entrywise |R1 R2 ...| <= |R1| |R2| ..., so this bounds every composed rotation.
            for plane in _planes(ndim, self.rotation_axes):
                r = np.eye(ndim)
                i, j = plane
                r[i, i] = r[j, j] = cos_max
                r[i, j] = r[j, i] = sin_max
                bound = bound @ r
        zoom_out = 1.0 / min(self.scale[0], 1.0) if self.p_scale > 0 else 1.0
        need = zoom_out * (np.diag(1 / d) @ bound.T @ np.diag(d)) @ half
        return tuple(int(max(0, math.ceil(n - h - 1e-9)) + 1) if n > h + 1e-9 else 0 for n, h in zip(need, half))

    def _spatial_matrix(self, ndim: int, rng: np.random.Generator) -> Optional[np.ndarray]:
        """Output -> input voxel offset matrix, or None when neither rotation nor scaling is drawn."""
        do_rotation = rng.random() < self.p_rotation
        do_scale = rng.random() < self.p_scale
        if not (do_rotation or do_scale):
            return None
        rot = np.eye(ndim)
        if do_rotation:
            for plane in _planes(ndim, self.rotation_axes):
                rot = rot @ _rotation_matrix(ndim, plane, math.radians(rng.uniform(*self.rotation)))
        zoom = rng.uniform(*self.scale) if do_scale else 1.0
        d = self._physical(ndim)
        # Rotate in mm (diag(d)), sample in voxels: in = D^-1 R^T D out / zoom.
        return np.diag(1 / d) @ rot.T @ np.diag(d) / zoom

    def __call__(self, image, label=None, rng: Optional[np.random.Generator] = None, *,
                 out_shape: Optional[Sequence[int]] = None):
        """Augment one patch.

        Args:
            image: (C, *P) numpy array or torch tensor (2D or 3D spatial).
            label: None, (*P) label map or (K, *P) multi-label stack (numpy or torch).
            rng: ``numpy.random.Generator``; the only source of randomness.
            out_shape: spatial output shape, centred in the input (for patches extracted with ``context``
                margins); default: the input's.

        Returns:
            (image float32, label same dtype) of spatial shape ``out_shape``, as numpy arrays, or tensors
            when tensors were given.
        """
        if not isinstance(rng, np.random.Generator):
            _fail("rng", "a numpy.random.Generator", type(rng).__name__)
        as_torch = isinstance(image, torch.Tensor)
        label_torch = isinstance(label, torch.Tensor)
        img = image.detach().cpu().numpy() if as_torch else np.asarray(image)
        lab = None if label is None else (label.detach().cpu().numpy() if label_torch else np.asarray(label))
        ndim = img.ndim - 1
        if ndim not in (2, 3):
            _fail("image", "a (C, *P) array with 2 or 3 spatial axes", tuple(img.shape))
        spatial = img.shape[1:]
        lab_lead = 0
        if lab is not None:
            lab_lead = lab.ndim - ndim
            if lab_lead not in (0, 1) or lab.shape[lab_lead:] != spatial:
                _fail("label", f"a label map or (K, *P) stack of spatial shape {spatial}", tuple(lab.shape))
        out_shape = spatial if out_shape is None else tuple(int(s) for s in out_shape)
        if len(out_shape) != ndim or any(o > s or o < 1 for o, s in zip(out_shape, spatial)):
            _fail("out_shape", f"{ndim} sizes between 1 and the input's {spatial}", out_shape)

        img, lab = self._spatial(img.astype(np.float32), lab, lab_lead, out_shape, rng)
        n = self.intensity_channels
        if n is None or n >= img.shape[0]:
            img = self._intensity(img, rng)
        else:
            img = np.concatenate([self._intensity(img[:n], rng), img[n:]])
        img, lab = self._flip(img, lab, lab_lead, rng)

        img = np.ascontiguousarray(img)
        lab = None if lab is None else np.ascontiguousarray(lab)
        if as_torch:
            img = torch.from_numpy(img)
        if label_torch:
            lab = torch.from_numpy(lab).to(label.dtype)
        return img, lab

    def _spatial(self, img, lab, lab_lead, out_shape, rng):
        ndim = img.ndim - 1
        spatial = img.shape[1:]
        start = np.array([(s - o) // 2 for s, o in zip(spatial, out_shape)])
        matrix = self._spatial_matrix(ndim, rng) if self.spatial else None
        if matrix is None:
            box = tuple(slice(a, a + o) for a, o in zip(start, out_shape))
            img = img[(slice(None),) + box]
            lab = None if lab is None else lab[(slice(None),) * lab_lead + box]
            return img, lab
        centre_out = (np.asarray(out_shape) - 1) / 2
        offset = start + centre_out - matrix @ centre_out

        def warp(a, order):
            # mode='nearest' clamps to the edge voxel where the transform reaches outside the input.
            return ndi.affine_transform(a, matrix, offset=offset, output_shape=tuple(out_shape), order=order,
                                        mode="nearest", prefilter=order > 1)

        img = np.stack([warp(c, self.order) for c in img])
        if lab is not None:
            lab = np.stack([warp(c, 0) for c in lab]) if lab_lead else warp(lab, 0)
        return img, lab

    def _intensity(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < self.p_noise:
            std = rng.uniform(*self.noise_std)
            img = img + rng.normal(0.0, std, size=img.shape).astype(np.float32)
        if rng.random() < self.p_intensity:
            a = rng.uniform(*self.intensity_scale, size=img.shape[0]).astype(np.float32)
            b = rng.uniform(*self.intensity_shift, size=img.shape[0]).astype(np.float32)
            img = img * a.reshape((-1,) + (1,) * (img.ndim - 1)) + b.reshape((-1,) + (1,) * (img.ndim - 1))
        if rng.random() < self.p_gamma:
            img = np.stack([self._gamma_channel(c, rng) for c in img])
        return img

    def _gamma_channel(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # As batchgenerators' augment_gamma: half the time a gamma below 1, else above, so both darkening
        # and brightening are equally likely whatever the range's asymmetry.
        low, high = self.gamma
        if rng.random() < 0.5 and low < 1:
            g = rng.uniform(low, min(high, 1.0))
        else:
            g = rng.uniform(max(low, 1.0), high) if high >= 1 else rng.uniform(low, high)
        mean, std = float(x.mean()), float(x.std())
        lo, hi = float(x.min()), float(x.max())
        span = hi - lo
        if span <= 0:
            return x
        y = np.power((x - lo) / span, g) * span + lo
        ystd = float(y.std())
        if ystd > 0:
            y = (y - float(y.mean())) / ystd * std + mean
        return y.astype(np.float32)

    def _flip(self, img, lab, lab_lead, rng):
        ndim = img.ndim - 1
        for axis in self.flip_axes:
            if axis >= ndim:
                continue
            if rng.random() < self.p_flip:
                img = np.flip(img, axis + 1)
                if lab is not None:
                    lab = np.flip(lab, axis + lab_lead)
                    if axis in self.swap_on_flip:
                        lab = _swap_sides(lab, self.swap_on_flip[axis], lab_lead)
        return img, lab


def _value_permutation(pairs: Sequence[Sequence[int]]) -> np.ndarray:
    """Lookup table that exchanges the two values of each pair and keeps every other value."""
    try:
        flat = [(int(a), int(b)) for a, b in pairs]
    except (TypeError, ValueError):
        _fail("swap_on_flip", "{axis: [(a, b), ...]} with label values a, b", pairs)
    values = [v for pair in flat for v in pair]
    if any(v < 1 for v in values) or len(set(values)) != len(values):
        _fail("swap_on_flip", "pairs of distinct positive label values, each value in one pair", pairs)
    lut = np.arange(max(values, default=0) + 1)
    for a, b in flat:
        lut[a], lut[b] = b, a
    return lut


def _channel_order(lut: np.ndarray, channels: int, background: bool) -> np.ndarray:
    shift = 0 if background else 1
    order = np.arange(channels)
    head = min(len(lut) - shift, channels)
    order[:head] = lut[shift:shift + head] - shift
    return order


def swapped_channels(pairs: Sequence[Sequence[int]], channels: int, *, background: bool = True) -> np.ndarray:
    """Channel order that exchanges the channels of each pair of label values: channel c holds label value c
    with a background channel (softmax outputs), c + 1 without (sigmoid outputs, multi-label stacks)."""
    return _channel_order(_value_permutation(pairs), channels, background)


def _swap_sides(lab: np.ndarray, lut: np.ndarray, lab_lead: int) -> np.ndarray:
    if lab_lead:  # a (K, *P) stack: channel c holds label value c + 1
        return lab[_channel_order(lut, lab.shape[0], background=False)]
    if lab.size and int(lab.max()) >= len(lut):
        lut = np.concatenate([lut, np.arange(len(lut), int(lab.max()) + 1)])
    return lut[lab].astype(lab.dtype, copy=False)
