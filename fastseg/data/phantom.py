"""Procedural head-and-neck CT phantom: the embedded default dataset (nothing to download).

The phantom lives in a physical world in mm, LPS coordinates (x to the patient's left, y to the back, z up),
whose origin is the centroid of the brain. Each organ is a simple solid — an ellipsoid, a tube along a curve,
a stack of ellipses lofted along z (spinal canal and cord, lungs), a U-shaped bent plate (mandible) — whose
volume, position and second moments were measured on the 7 oncologist-outlined scans of
../shared/data/tcia-han-oar (the table below). A seed draws one case: patient size and pose, and per organ a
position jitter of a few mm, a volume factor of about +-12 %, small rotations and a smooth wobble of the
surface. The solids are then sampled at the centres of the voxels of any grid (``spacing``, ``shape`` /
``field_of_view``), each organ only inside its bounding box, so a coarse grid gives fewer voxels of the same
anatomy.

CT-like images come from :func:`render_image`, which works from a label map alone (the phantom's, or a real
one such as the shared masks): Hounsfield units per tissue, a body outline (head ellipsoid and lofted
face / neck / thorax sections placed relative to the organs), skull around the brain, vertebrae around the
spinal canal, petrous bone around the cochleae, orbital fat and walls, sinuses and airway, then a Gaussian
partial-volume blur (half a voxel) and Gaussian noise, everything drawn from the seed.

The field of view is centred on the head in x and y; its top is 85 mm above the brain centroid (about 2 cm
above the vertex, as in the real scans), so its height decides how far down it reaches: 200 mm ends at the
lower jaw (no lungs, submandibular glands cut), the default 330 mm reaches 4 cm into the lungs and holds all
21 organs, 400 mm (512 x 512 x 160 at 1 x 1 x 2.5 mm) matches the real scans.

Example:
    >>> image, label = generate_case(0, spacing=(2.0, 2.0, 3.0))
    >>> image.array.shape, label.array.dtype
    ((125, 125, 110), dtype('uint8'))
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from fastseg.data.io import Image, write_image
from fastseg.metrics import distance_transform_edt

__all__ = [
    "ORGANS",
    "PRIORITY",
    "generate_case",
    "generate_masks",
    "render_image",
    "write_phantom_dataset",
]

ORGANS: Tuple[str, ...] = (
    "Brain", "Brainstem", "Cochlea-Lt", "Cochlea-Rt", "Lacrimal-Lt", "Lacrimal-Rt", "Lens-Lt", "Lens-Rt",
    "Lung-Lt", "Lung-Rt", "Mandible", "Optic-Nerve-Lt", "Optic-Nerve-Rt", "Orbit-Lt", "Orbit-Rt",
    "Parotid-Lt", "Parotid-Rt", "Spinal-Canal", "Spinal-Cord", "Submandibular-Lt", "Submandibular-Rt",
)
"""The 21 organs of the shared TCIA head-and-neck masks; label value = position + 1."""

PRIORITY: Tuple[str, ...] = (
    "Cochlea-Lt", "Cochlea-Rt", "Lens-Lt", "Lens-Rt", "Lacrimal-Lt", "Lacrimal-Rt", "Optic-Nerve-Lt",
    "Optic-Nerve-Rt", "Submandibular-Lt", "Submandibular-Rt", "Orbit-Lt", "Orbit-Rt", "Spinal-Cord",
    "Parotid-Lt", "Parotid-Rt", "Brainstem", "Spinal-Canal", "Mandible", "Lung-Lt", "Lung-Rt", "Brain",
)
"""Where masks overlap, the earlier organ wins: small over large (median real volumes), so Lens beats Orbit
and Spinal-Cord beats Spinal-Canal."""

# Organs that contain another one in the real outlines (the only overlaps there): their masks keep it.
_CONTAINS = {"Orbit-Lt": "Lens-Lt", "Orbit-Rt": "Lens-Rt", "Spinal-Canal": "Spinal-Cord"}

_TOP_MM = 85.0                # top of the field of view above the brain centroid (real scans: 82-93 mm)
_DEFAULT_SPACING = (1.0, 1.0, 2.5)
_DEFAULT_FOV = (250.0, 250.0, 330.0)

# ------------------------------------------------------------------------------------------- calibration
# Measured by benchmarks/phantom_calibration.py (2026-11-26) on the 7 oncologist scans of
# ../shared/data/tcia-han-oar: medians over the scans, positions in mm relative to each scan's brain centroid
# (LPS), a right-side organ mirrored (x -> -x) and pooled with the left one (14 samples), so the phantom has
# one symmetric model per pair, written for the left side.
#
# Ellipsoidal organs: (volume mm^3, centroid x y z, covariance xx yy zz xy xz yz in mm^2). The solid is the
# ellipsoid with the covariance's principal axes and aspect (semi-axes proportional to sqrt(eigenvalue)),
# scaled to the median volume.
_ELLIPSOIDS = {
    "Brainstem": (28746.0, (0.0, -5.0, -39.4), (59.81, 48.82, 214.54, 1.65, -6.56, -21.56)),
    "Cochlea": (59.0, (34.9, -13.6, -45.2), (1.33, 0.85, 2.43, 0.28, 0.21, -0.08)),
    "Lacrimal": (643.0, (46.0, -80.3, -17.2), (4.50, 8.17, 22.59, -0.30, -6.38, -1.64)),
    "Lens": (205.0, (33.5, -92.9, -19.1), (3.71, 1.13, 5.83, 0.09, 0.09, -0.05)),
    "Orbit": (8136.0, (33.2, -85.5, -18.9), (30.53, 28.97, 34.34, 0.78, -0.03, -0.02)),
    "Parotid": (25278.0, (57.7, -25.5, -86.7), (52.51, 81.57, 157.87, -4.37, 16.63, -16.40)),
    "Submandibular": (7592.0, (31.3, -45.0, -128.5), (22.79, 30.70, 91.28, 10.72, 9.49, 6.01)),
}
# Brain: median volume 1 475 332 mm^3, lowest / highest point -73 / +63 mm, x +-66, y -90..+79. Modelled as
# an ellipsoid cut from below by the skull base, whose height per 10 mm column was measured (section 2 of the
# script): anterior fossa -17 (midline) to -5 (over the orbits) for y < -56, middle fossa -44 laterally and
# -20 at the midline (sella) for -56 < y < -7, posterior fossa -70 behind; the ellipsoid below was then
# fitted to the volume and centroid.
_BRAIN_CENTRE = (0.0, -4.0, -7.0)
_BRAIN_SEMI_AXES = (68.3, 86.1, 70.3)
_BRAIN_FLOOR = {"y_anterior": -56.0, "y_posterior": -7.0, "width": 3.0, "anterior_mid": -17.0,
                "anterior_side": -5.0, "middle_mid": -20.0, "middle_side": -44.0, "posterior": -70.0}
# Spinal canal and cord per 10 mm slab (section 3): z, centroid y, cross-section area (mm^2), in-slice
# standard deviations x and y. The measured x drift (0-6 mm, patient rotation) is left out (x = 0). Below
# -280 mm fewer than 7 scans reach: the phantom continues the last slope of y for 60 mm, then straight down.
_CANAL_ROWS = (
    (-80, 3.6, 460.9, 7.0, 5.2), (-90, 0.1, 451.9, 7.8, 4.9), (-100, 0.7, 374.6, 6.9, 4.4),
    (-110, -1.2, 309.8, 6.5, 3.8), (-120, -0.9, 263.3, 6.1, 3.6), (-130, -1.7, 237.4, 6.2, 3.5),
    (-140, -1.0, 267.2, 6.2, 3.7), (-150, 2.7, 240.0, 5.9, 3.4), (-160, 6.3, 260.2, 6.3, 3.6),
    (-170, 10.1, 247.0, 6.3, 3.5), (-180, 16.6, 253.0, 5.9, 3.7), (-190, 21.7, 283.5, 5.7, 4.3),
    (-200, 27.4, 251.6, 5.2, 4.1), (-210, 33.1, 239.6, 4.5, 4.0), (-220, 37.7, 231.7, 4.6, 4.1),
    (-230, 42.8, 190.3, 4.4, 3.9), (-240, 45.9, 216.5, 4.6, 3.9), (-250, 49.3, 183.8, 3.8, 3.8),
    (-260, 51.7, 224.6, 4.7, 3.6), (-270, 53.3, 170.2, 3.8, 3.8), (-280, 54.9, 213.1, 4.5, 3.8),
)
_CORD_ROWS = (
    (-80, 2.5, 119.4, 3.4, 2.8), (-90, 1.0, 104.6, 3.2, 2.6), (-100, 0.3, 104.6, 3.2, 2.6),
    (-110, -0.1, 95.1, 3.0, 2.5), (-120, -0.3, 88.9, 3.0, 2.4), (-130, -0.5, 84.2, 3.0, 2.4),
    (-140, -0.0, 83.4, 3.0, 2.3), (-150, 3.5, 79.4, 2.8, 2.2), (-160, 7.0, 76.3, 2.9, 2.2),
    (-170, 11.5, 75.3, 2.9, 2.1), (-180, 15.9, 80.8, 2.9, 2.2), (-190, 21.6, 71.5, 2.5, 2.3),
    (-200, 27.2, 82.0, 2.8, 2.3), (-210, 32.8, 78.0, 2.5, 2.3), (-220, 37.5, 72.2, 2.5, 2.3),
    (-230, 42.8, 81.2, 2.6, 2.5), (-240, 45.8, 81.6, 2.6, 2.4), (-250, 49.2, 71.8, 2.4, 2.4),
    (-260, 51.6, 80.6, 2.7, 2.4), (-270, 53.3, 76.3, 2.5, 2.4), (-280, 54.9, 82.5, 2.7, 2.4),
)
_CANAL_TOP = -77.0   # median top of the canal
# The parotid ellipsoid reaches into the ramus, which the gland wraps around in reality; the mandible is
# carved out of it, so it starts 10 % larger to keep the median volume.
_PAROTID_EXTRA = (0.88 * 1.1, 1.13 * 1.1)
# Lungs per 10 mm below the apex (section 4; the scans' bottoms cut the lungs, so only the top 12 cm are
# measured): depth, centroid x, centroid y, area (mm^2), in-slice sd x. Deeper, the area follows the
# least-squares ellipsoid cap pi * a*b * (2d/c - (d/c)^2) (a*b = 4243 mm^2, c = 172 mm) to its widest.
_LUNG_APEX = -213.3
_LUNG_ROWS = (
    (1.25, 41.6, 16.7, 362.4, 5.3), (11.25, 44.3, 20.4, 1686.6, 12.5), (21.25, 48.9, 21.3, 3001.1, 16.0),
    (31.25, 52.4, 22.0, 4176.1, 18.6), (41.25, 56.8, 21.1, 5369.4, 19.7), (51.25, 60.9, 18.3, 6767.7, 20.2),
    (61.25, 62.5, 14.7, 7698.8, 21.5), (71.25, 62.8, 9.8, 8951.2, 23.3), (81.25, 62.5, 7.0, 9900.1, 24.4),
    (91.25, 64.1, 5.5, 10567.4, 25.1), (101.25, 63.8, 5.8, 11205.0, 25.4), (111.25, 65.7, 5.0, 11373.3, 25.7),
    (121.25, 67.8, 3.9, 12108.6, 25.7),
)
_LUNG_CAP = (4243.0, 172.0)
# Optic nerve (section 6): end points at the 2nd / 98th percentile along the main axis; median volume 693 mm^3
# (the tube radius follows from it, about 2.4 mm).
_OPTIC_NERVE = ((29.8, -73.6, -19.8), (12.4, -41.5, -22.8), 693.0)
# Mandible (section 5; median volume 68 579 mm^3, centroid (0.5, -71.4, -105.9)): a U-shaped plate (the body:
# centre line y = y_chin + k x^2 up to the angle at |x| = 46 mm, 11 mm thick at the chin and 6 mm at the
# angle, lower border rising from -140 at the chin to -119 at the angle, upper border -106) and, per side, an
# oblique vertical plate (the ramus, 5.6 mm thick, from (37, -66) to (49, -32) in x, y at its foot, -108,
# moving outwards by 0.2 and backwards by 0.25 mm per mm upwards) up to the coronoid process (-58, front
# 35 %) and the condyle (-50, back 40 %), the sigmoid notch between them at -72. These were adjusted until
# the phantom's area, mean y and mean |x| per 7.5 mm slab followed the measured profile (volume within 2 %).
_MANDIBLE = {"y_chin": -99.0, "k": 0.0284, "x_angle": 46.0, "half_thickness_chin": 5.5,
             "half_thickness_angle": 3.0, "z_low_chin": -140.0, "z_low_angle": -119.0, "z_high": -106.0,
             "ramus_front": (37.0, -66.0), "ramus_back": (49.0, -32.0), "ramus_half_thickness": 2.8,
             "ramus_bottom": -108.0, "coronoid_top": -58.0, "notch": -72.0, "condyle_top": -50.0,
             "flare": 0.2, "lean": 0.25, "volume": 68579.0}

# Anatomy that the masks do not outline, for the image only (from anatomy texts, not measured: the shared
# data has no CT): body cross-sections per level relative to the brain centroid (z, centre y, semi-axes x
# and y, mm), the head ellipsoid, face bones and air spaces.
_BODY_ROWS = (
    (95.0, -5.0, 30.0, 40.0), (60.0, -5.0, 45.0, 55.0), (0.0, -8.0, 70.0, 90.0), (-20.0, -10.0, 78.0, 98.0),
    (-50.0, -15.0, 76.0, 100.0), (-80.0, -18.0, 76.0, 95.0), (-110.0, -20.0, 72.0, 95.0),
    (-135.0, -20.0, 64.0, 90.0), (-150.0, -5.0, 60.0, 72.0), (-175.0, 5.0, 58.0, 62.0),
    (-200.0, 10.0, 70.0, 68.0), (-215.0, 15.0, 120.0, 85.0), (-240.0, 15.0, 165.0, 100.0),
    (-280.0, 15.0, 175.0, 110.0), (-2000.0, 15.0, 175.0, 110.0),
)
_HEAD = ((0.0, -5.0, -6.0), (84.0, 100.0, 88.0))
_FACE = (  # (tissue, centre, semi-axes): later entries paint over earlier ones
    ("bone", (0.0, -72.0, -68.0), (34.0, 24.0, 16.0)),          # maxilla
    ("air", (24.0, -68.0, -55.0), (11.0, 14.0, 14.0)),          # maxillary sinuses
    ("air", (-24.0, -68.0, -55.0), (11.0, 14.0, 14.0)),
    ("air", (0.0, -82.0, -45.0), (7.0, 16.0, 22.0)),            # nasal cavity
)
_VENTRICLES = (((11.0, -8.0, 12.0), (6.0, 26.0, 9.0)), ((-11.0, -8.0, 12.0), (6.0, 26.0, 9.0)),
               ((0.0, -5.0, -5.0), (2.5, 10.0, 8.0)))

# Hounsfield units: tissues and organs (by name without the side). Each case shifts every value by up to
# +-6 HU; the organs keep a contrast of 25 HU or more to what surrounds them (the brainstem is made denser
# than the brain, which real CT barely shows, so that it can be told from both brain and CSF).
_TISSUE_HU = {"air": -1000.0, "fat": -95.0, "soft": 45.0, "muscle": 55.0, "csf": 6.0, "skull": 1250.0, "bone": 750.0,
              "cancellous": 260.0, "disc": 85.0, "petrous": 1600.0, "orbit_wall": 900.0,
              "cortex": 1350.0, "marrow": 380.0}
_ORGAN_HU = {"Brain": 30.0, "Brainstem": 55.0, "Cochlea": 5.0, "Lacrimal": 55.0, "Lens": 125.0,
             "Lung": -850.0, "Mandible": 1350.0, "Optic-Nerve": 38.0, "Orbit": 12.0, "Parotid": -25.0,
             "Spinal-Canal": 6.0, "Spinal-Cord": 38.0, "Submandibular": 50.0}
# Tissue around an organ (mm, or 3 voxels where that is more): the cisterns around the brainstem, fat around the
# eye and the optic nerve (orbital fat reaches back to the orbital apex), the lacrimal and submandibular
# glands, the chewing muscles around the parotid.
_HALOS = {"Brainstem": ("csf", 2.5), "Optic-Nerve": ("fat", 2.5), "Orbit": ("fat", 2.0), "Lacrimal": ("fat", 4.0),
          "Submandibular": ("fat", 4.0), "Parotid": ("muscle", 4.0)}
# Organs whose position relative to the brain centroid locates the body in a label map (lungs and the spine
# are cut by the field of view, so their centroids move with it).
_COMPACT = ("Brain", "Brainstem", "Cochlea", "Lacrimal", "Lens", "Orbit", "Parotid", "Submandibular",
            "Mandible", "Optic-Nerve")
_MODEL_CENTROIDS = {name: c for name, (_, c, _) in _ELLIPSOIDS.items()}
_MODEL_CENTROIDS.update({"Brain": (0.0, 0.0, 0.0), "Mandible": (0.5, -71.4, -105.9),
                         "Optic-Nerve": (22.6, -61.2, -21.9)})

_MIRROR = np.diag([-1.0, 1.0, 1.0])
Coords = Tuple[np.ndarray, np.ndarray, np.ndarray]


# ------------------------------------------------------------------------------------------- argument checks


def _fail(where: str, name: str, expected: str, got) -> None:
    raise ValueError(f"{where}: {name}: expected {expected}, got {got!r}")


def _check_seed(where: str, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        _fail(where, "seed", "a non-negative integer", seed)
    return int(seed)


def _check_triple(where: str, name: str, values, *, integer: bool = False) -> Tuple:
    kind = "3 positive integers" if integer else "3 positive finite numbers"
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        _fail(where, name, kind + " (x, y, z)", values)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)) or not np.all(arr > 0):
        _fail(where, name, kind + " (x, y, z)", values)
    if integer:
        if not np.all(arr == np.round(arr)):
            _fail(where, name, kind + " (x, y, z)", values)
        return tuple(int(v) for v in arr)
    return tuple(float(v) for v in arr)


def _grid(where: str, spacing, shape, field_of_view) -> Tuple[Tuple[int, ...], Tuple[float, ...], np.ndarray]:
    """(shape, spacing, origin) of the field of view: centred on the head in x and y, top at _TOP_MM."""
    spacing = _check_triple(where, "spacing", spacing)
    if shape is None:
        fov = _check_triple(where, "field_of_view", field_of_view)
        shape = tuple(max(1, int(round(f / s))) for f, s in zip(fov, spacing))
    else:
        shape = _check_triple(where, "shape", shape, integer=True)
    extent = np.asarray(shape) * np.asarray(spacing)
    origin = np.array([-extent[0] / 2 + spacing[0] / 2, -extent[1] / 2 + spacing[1] / 2,
                       _TOP_MM - extent[2] + spacing[2] / 2])
    return shape, spacing, origin


# ------------------------------------------------------------------------------------------- solids


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about x, then y, then z (angles in degrees)."""
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Ellipsoid:
    """Points u = A^-1 (p - centre) with |u| <= 1 + wobble(u / |u|); A's columns are the semi-axis vectors.
    The wobble is a sum of a few low-frequency cosines over directions: a smooth bumpy surface."""

    def __init__(self, centre, axes, wobble=None):
        self.centre = np.asarray(centre, dtype=np.float64)
        self.axes = np.asarray(axes, dtype=np.float64)
        self.wobble = wobble  # (omega (K, 3), phase (K,), amplitude (K,)) or None

    @classmethod
    def from_moments(cls, volume: float, centroid, cov6) -> "_Ellipsoid":
        xx, yy, zz, xy, xz, yz = cov6
        cov = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
        eigen, vectors = np.linalg.eigh(cov)
        semi = np.sqrt(5.0 * np.maximum(eigen, 1e-6))  # a uniform ellipsoid has variance semi^2 / 5
        semi *= (volume / (4.0 / 3.0 * math.pi * np.prod(semi))) ** (1.0 / 3.0)
        return cls(centroid, vectors * semi)

    def mirrored(self) -> "_Ellipsoid":
        return _Ellipsoid(_MIRROR @ self.centre, _MIRROR @ self.axes, self.wobble)

    def jittered(self, rotation, scales, shift, wobble) -> "_Ellipsoid":
        return _Ellipsoid(self.centre + shift, rotation @ self.axes * np.asarray(scales), wobble)

    def _inflated_axes(self, inflate: float) -> np.ndarray:
        lengths = np.linalg.norm(self.axes, axis=0)
        return self.axes * (np.maximum(lengths + inflate, 1e-3) / lengths)

    def bounds(self, inflate: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
        axes = self._inflated_axes(inflate)
        bump = 1.0 + (float(np.sum(self.wobble[2])) if self.wobble is not None else 0.0)
        half = np.linalg.norm(axes, axis=1) * bump
        return self.centre - half, self.centre + half

    def inside(self, p: Coords, inflate: float = 0.0) -> np.ndarray:
        inv = np.linalg.inv(self._inflated_axes(inflate)).astype(np.float32)
        d = [p[i] - np.float32(self.centre[i]) for i in range(3)]
        u = [inv[i, 0] * d[0] + inv[i, 1] * d[1] + inv[i, 2] * d[2] for i in range(3)]
        r2 = u[0] * u[0] + u[1] * u[1] + u[2] * u[2]
        if self.wobble is None:
            return r2 <= 1.0
        omega, phase, amp = self.wobble
        reach = float(np.sum(amp))
        out = r2 <= (1.0 - reach) ** 2
        # the wobble only matters in the shell where the surface can be: evaluate it there only
        shell = ~out & (r2 <= (1.0 + reach) ** 2)
        us = [c[shell] for c in u]
        r = np.sqrt(r2[shell]) + np.float32(1e-6)
        limit = np.ones_like(r)
        for k in range(len(amp)):
            arg = (omega[k, 0] * us[0] + omega[k, 1] * us[1] + omega[k, 2] * us[2]) / r + np.float32(phase[k])
            limit += np.float32(amp[k]) * np.cos(arg)
        out[shell] = r <= limit
        return out


class _Loft:
    """A stack of ellipses along z: centre (cx, cy) and semi-axes (a, b) interpolated linearly in z."""

    def __init__(self, z, cx, cy, a, b):
        order = np.argsort(z)
        self.z, self.cx, self.cy, self.a, self.b = (np.asarray(v, dtype=np.float64)[order] for v in (z, cx, cy, a, b))

    def mirrored(self) -> "_Loft":
        return _Loft(self.z, -self.cx, self.cy, self.a, self.b)

    def bounds(self, inflate: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
        lo = [np.min(self.cx - self.a) - inflate, np.min(self.cy - self.b) - inflate, self.z[0]]
        hi = [np.max(self.cx + self.a) + inflate, np.max(self.cy + self.b) + inflate, self.z[-1]]
        return np.array(lo), np.array(hi)

    def inside(self, p: Coords, inflate: float = 0.0) -> np.ndarray:
        z = p[2]
        flat = z.reshape(-1)
        cx, cy, a, b = (np.interp(flat, self.z, v).astype(np.float32).reshape(z.shape)
                        for v in (self.cx, self.cy, self.a + inflate, self.b + inflate))
        a = np.maximum(a, 1e-3)
        b = np.maximum(b, 1e-3)
        r2 = ((p[0] - cx) / a) ** 2 + ((p[1] - cy) / b) ** 2
        return (r2 <= 1.0) & (z >= self.z[0]) & (z <= self.z[-1])


def _segment_distance2(px, py, pz, a: np.ndarray, b: np.ndarray):
    """Squared distance from points to segment a-b, and the position t in [0, 1] of the nearest point."""
    d = b - a
    dd = float(d @ d) or 1e-12
    t = ((px - a[0]) * d[0] + (py - a[1]) * d[1] + (pz - a[2]) * d[2]) / np.float32(dd)
    t = np.clip(t, 0.0, 1.0)
    ex, ey, ez = px - (a[0] + t * d[0]), py - (a[1] + t * d[1]), pz - (a[2] + t * d[2])
    return ex * ex + ey * ey + ez * ez, t


class _Tube:
    """Points within a radius of a polyline: a curved tube with round ends whose radius changes linearly
    from point to point."""

    def __init__(self, points, radii):
        self.points = np.asarray(points, dtype=np.float64)
        self.radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(self.points),)).copy()

    def mirrored(self) -> "_Tube":
        return _Tube(self.points @ _MIRROR, self.radii)

    def bounds(self, inflate: float = 0.0):
        r = float(self.radii.max()) + inflate
        return self.points.min(axis=0) - r, self.points.max(axis=0) + r

    def inside(self, p: Coords, inflate: float = 0.0) -> np.ndarray:
        out = None
        for i in range(len(self.points) - 1):
            a, b = self.points[i].astype(np.float32), self.points[i + 1].astype(np.float32)
            d2, t = _segment_distance2(p[0], p[1], p[2], a, b)
            r = np.float32(self.radii[i] + inflate) + t * np.float32(self.radii[i + 1] - self.radii[i])
            hit = d2 <= r * r
            out = hit if out is None else out | hit
        return out


class _Mandible:
    """The U-shaped body plate and the two rami (see _MANDIBLE); symmetric in x."""

    def __init__(self, params: Mapping[str, float], scale: float = 1.0):
        self.p = dict(params)
        xs = np.linspace(0.0, self.p["x_angle"], 17)
        # the body's centre line in the (|x|, y) half plane, as a polyline
        self.curve = np.stack([xs, self.p["y_chin"] + self.p["k"] * xs ** 2, np.zeros_like(xs)], axis=1)
        self.thickness_scale = scale

    def bounds(self, inflate: float = 0.0):
        m = self.p
        reach = m["ramus_back"][0] + m["flare"] * (m["condyle_top"] - m["ramus_bottom"]) + 8.0 + inflate
        lo = np.array([-reach, m["y_chin"] - m["half_thickness_chin"] * 1.5 - inflate, m["z_low_chin"] - 8 - inflate])
        lean = m["lean"] * (m["condyle_top"] - m["ramus_bottom"])
        hi = np.array([reach, m["ramus_back"][1] + lean + 8.0 + inflate, m["condyle_top"] + 4.0 + inflate])
        return lo, hi

    def inside(self, p: Coords, inflate: float = 0.0) -> np.ndarray:
        m = self.p
        out = np.zeros(p[0].shape, dtype=bool)
        ax, y, z = np.abs(p[0]), p[1], p[2]
        pad = 8.0 + inflate
        # body: only points near the U (z between its borders, y between chin and angle) are tested
        y_angle = m["y_chin"] + m["k"] * m["x_angle"] ** 2
        near = ((z >= m["z_low_chin"] - pad) & (z <= m["z_high"] + pad) & (ax <= m["x_angle"] + pad)
                & (y >= m["y_chin"] - pad) & (y <= y_angle + pad))
        if near.any():
            out[near] = self._body(ax[near], y[near], z[near], inflate)
        # rami
        lean = m["lean"] * (m["condyle_top"] - m["ramus_bottom"])
        near = ((z >= m["ramus_bottom"] - pad) & (z <= m["condyle_top"] + pad) & (ax >= m["ramus_front"][0] - pad)
                & (y >= m["ramus_front"][1] - pad) & (y <= m["ramus_back"][1] + lean + pad))
        if near.any():
            out[near] |= self._ramus(ax[near], y[near], z[near], inflate)
        return out

    def _body(self, ax, y, z, inflate):
        """Rounded band around the U curve: distance in the x-y plane to the curve, and beyond the lower /
        upper border in z."""
        m = self.p
        zero = np.zeros_like(ax)
        best, u_best = None, None
        n = len(self.curve) - 1
        for i, (a, b) in enumerate(zip(self.curve[:-1], self.curve[1:])):
            d2, t = _segment_distance2(ax, y, zero, a.astype(np.float32), b.astype(np.float32))
            u = (i + t) / n
            if best is None:
                best, u_best = d2, u
            else:
                closer = d2 < best
                best = np.where(closer, d2, best)
                u_best = np.where(closer, u, u_best)
        z_low = m["z_low_chin"] + (m["z_low_angle"] - m["z_low_chin"]) * u_best ** 2.5
        dz = np.maximum(np.maximum(z_low - z, z - m["z_high"]), 0.0)
        half = (m["half_thickness_chin"] + (m["half_thickness_angle"] - m["half_thickness_chin"]) * u_best)
        half = half * self.thickness_scale + inflate
        return best + dz * dz <= half * half

    def _ramus(self, ax, y, z, inflate):
        """Oblique plate per side, moving out and back upwards, notched between coronoid and condyle."""
        m = self.p
        zero = np.zeros_like(ax)
        front = np.array([m["ramus_front"][0], m["ramus_front"][1], 0.0], dtype=np.float32)
        back = np.array([m["ramus_back"][0], m["ramus_back"][1], 0.0], dtype=np.float32)
        rise = np.maximum(z - m["ramus_bottom"], 0.0)
        d2, t = _segment_distance2(ax - np.float32(m["flare"]) * rise, y - np.float32(m["lean"]) * rise, zero,
                                   front, back)
        top = np.where(t < 0.35, m["coronoid_top"], np.where(t > 0.6, m["condyle_top"], m["notch"]))
        dz = np.maximum(np.maximum(m["ramus_bottom"] - z, z - top), 0.0)
        r = m["ramus_half_thickness"] * self.thickness_scale + inflate
        return d2 + dz * dz <= r * r


class _Brain:
    """An ellipsoid above the skull base (see _BRAIN_FLOOR)."""

    def __init__(self, ellipsoid: _Ellipsoid, floor: Mapping[str, float]):
        self.ellipsoid = ellipsoid
        self.floor = dict(floor)

    def bounds(self, inflate: float = 0.0):
        return self.ellipsoid.bounds(inflate)

    def floor_z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        f = self.floor
        ax = np.abs(x)

        def step(v):
            return 1.0 / (1.0 + np.exp(-v))

        s1 = step((y - f["y_anterior"]) / f["width"])
        s2 = step((y - f["y_posterior"]) / f["width"])
        anterior = f["anterior_mid"] + (f["anterior_side"] - f["anterior_mid"]) * step((ax - 14.0) / 4.0)
        middle = f["middle_mid"] + (f["middle_side"] - f["middle_mid"]) * step((ax - 11.0) / 2.0)
        return anterior * (1 - s1) + s1 * (middle * (1 - s2) + f["posterior"] * s2)

    def inside(self, p: Coords, inflate: float = 0.0) -> np.ndarray:
        out = self.ellipsoid.inside(p, inflate)
        # the floor is below -5 mm everywhere: only points lower than that need it
        levels = ("anterior_mid", "anterior_side", "middle_mid", "middle_side", "posterior")
        low = out & (p[2] < max(self.floor[k] for k in levels) + 1.0)
        out[low] = p[2][low] >= self.floor_z(p[0][low], p[1][low]) - inflate
        return out


class _Placed:
    """A solid moved by a small affine jitter: point p is inside iff matrix @ (p - centre) + pivot is inside
    the solid (pivot: the solid's point that lands at centre)."""

    def __init__(self, solid, matrix: np.ndarray, pivot: np.ndarray, centre: np.ndarray):
        self.solid, self.matrix, self.pivot, self.centre = solid, matrix, np.asarray(pivot), np.asarray(centre)

    def bounds(self, inflate: float = 0.0):
        lo, hi = self.solid.bounds(inflate)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        moved = (corners - self.pivot) @ np.linalg.inv(self.matrix).T + self.centre
        return moved.min(axis=0), moved.max(axis=0)

    def inside(self, p: Coords, inflate: float = 0.0) -> np.ndarray:
        m = self.matrix.astype(np.float32)
        d = [p[i] - np.float32(self.centre[i]) for i in range(3)]
        q = tuple(m[i, 0] * d[0] + m[i, 1] * d[1] + m[i, 2] * d[2] + np.float32(self.pivot[i]) for i in range(3))
        return self.solid.inside(q, inflate)


@dataclass
class _Organ:
    name: str
    solid: object
    keepouts: Tuple = ()          # (solid, margin mm): removed from this organ
    within: Optional[object] = None  # solid the organ is clipped to


@dataclass
class _Anatomy:
    organs: List[_Organ]
    scale: float
    rotation: np.ndarray
    shift: np.ndarray


# ------------------------------------------------------------------------------------------- one case's anatomy


def _wobble(rng: np.random.Generator, amplitude: float, terms: int = 3):
    directions = rng.normal(size=(terms, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    omega = directions * rng.uniform(1.5, 3.0, size=(terms, 1))
    return omega, rng.uniform(0, 2 * math.pi, terms), rng.uniform(0.3, 1.0, terms) * amplitude / terms


def _jitter(rng: np.random.Generator, *, shift_mm: float, degrees: float, volume=(0.88, 1.13), aspect=0.04):
    """Rotation, per-axis scale (volume factor in `volume`, aspect within +-`aspect`) and shift of one organ."""
    rotation = _rotation(rng.uniform(-degrees, degrees, 3))
    scales = rng.uniform(volume[0], volume[1]) ** (1.0 / 3.0) * (1.0 + rng.uniform(-aspect, aspect, 3))
    shift = np.clip(rng.normal(0.0, shift_mm, 3), -2 * shift_mm, 2 * shift_mm)
    return rotation, scales, shift


def _jittered_ellipsoid(rng, base: _Ellipsoid, *, shift_mm=1.5, degrees=6.0, wobble=0.06,
                        volume=(0.88, 1.13)) -> _Ellipsoid:
    rotation, scales, shift = _jitter(rng, shift_mm=shift_mm, degrees=degrees, volume=volume)
    return base.jittered(rotation, scales, shift, _wobble(rng, wobble))


def _tube_profile(rows, rng: np.random.Generator, top: float, bottom: float, *, slope_mm: float = 60.0) -> _Loft:
    """Loft of the spinal canal / cord from (z, y, area, sd x, sd y) rows, continued below the last row
    (y with the last slope for `slope_mm`, then straight), with a smooth random wave of +-4 % in size."""
    rows = np.asarray(rows, dtype=np.float64)
    z, y, area, sdx, sdy = rows.T
    slope = (y[-1] - y[-5]) / (z[-1] - z[-5])
    extra_z = np.arange(z[-1] - 10.0, bottom - 10.0, -10.0)
    extra_y = y[-1] + slope * np.maximum(extra_z, z[-1] - slope_mm) - slope * z[-1]
    z = np.concatenate([[top], z, extra_z])
    y = np.concatenate([[y[0]], y, extra_y])
    area = np.concatenate([[area[0]], area, np.full(len(extra_z), np.median(area[-6:]))])
    aspect = np.concatenate([[sdx[0] / sdy[0]], sdx / sdy, np.full(len(extra_z), np.median(sdx[-6:] / sdy[-6:]))])
    wave = 1.0 + 0.04 * np.sin(2 * math.pi * z / rng.uniform(60, 120) + rng.uniform(0, 2 * math.pi))
    a = np.sqrt(area / math.pi * aspect) * wave
    b = np.sqrt(area / math.pi / aspect) * wave
    return _Loft(z, np.zeros_like(z), y, a, b)


def _lung_profile(rng: np.random.Generator) -> _Loft:
    """Left lung: the measured rows, then the fitted ellipsoid cap down to its widest, then straight."""
    rows = np.asarray(_LUNG_ROWS, dtype=np.float64)
    depth, cx, cy, area, sdx = rows.T
    ab, c = _LUNG_CAP
    deep = np.arange(depth[-1] + 10.0, c + 1.0, 10.0)
    deep_area = np.maximum(math.pi * ab * (2 * deep / c - (deep / c) ** 2), area[-1])
    depth = np.concatenate([[0.0], depth, deep, [600.0]])
    area = np.concatenate([[0.0], area, deep_area, [deep_area[-1]]])
    cx = np.concatenate([[cx[0]], cx, np.full(len(deep) + 1, cx[-1])])
    cy = np.concatenate([[cy[0]], cy, np.full(len(deep) + 1, cy[-1])])
    # semi-axis x from the in-slice sd (uniform ellipse: sd = a / 2); y from the area
    a = np.concatenate([[0.5], 2.0 * sdx, np.full(len(deep) + 1, 2.0 * sdx[-1])])
    b = np.where(area > 0, area / (math.pi * np.maximum(a, 1e-3)), 0.5)
    wave = 1.0 + 0.03 * np.sin(2 * math.pi * depth / rng.uniform(50, 90) + rng.uniform(0, 2 * math.pi))
    return _Loft(_LUNG_APEX - depth, cx, cy, a * wave, b * wave)


def _optic_nerve(rng: np.random.Generator) -> _Tube:
    """Left optic nerve: a gently bent tube from the back of the eye to the chiasm, half as thick again at
    the eye as at the chiasm (the sheath is wider in the orbit; this also puts the centroid where it was
    measured, 3-4 mm in front of the middle of the segment), radius from the median volume +-12 %."""
    front, back = (np.asarray(v, dtype=np.float64) for v in _OPTIC_NERVE[:2])
    front = front + np.clip(rng.normal(0, 1.0, 3), -2, 2)
    back = back + np.clip(rng.normal(0, 1.0, 3), -2, 2)
    side = np.cross(back - front, [0.0, 0.0, 1.0])
    side /= np.linalg.norm(side)
    mid = (front + back) / 2 + side * rng.uniform(-2.0, 2.0) + np.array([0, 0, rng.uniform(-1.0, 1.0)])
    t = np.linspace(0.0, 1.0, 9)[:, None]
    points = (1 - t) ** 2 * front + 2 * (1 - t) * t * mid + t ** 2 * back
    shape = 1.5 - 0.5 * t[:, 0]  # radius profile, scaled below
    lengths = np.linalg.norm(np.diff(points, axis=0), axis=1)
    # volume of the unit profile: truncated cones plus the two half-sphere ends
    cones = float(np.sum(math.pi * lengths * (shape[:-1] ** 2 + shape[:-1] * shape[1:] + shape[1:] ** 2) / 3))
    caps = 2.0 / 3.0 * math.pi * float(shape[0] ** 3 + shape[-1] ** 3)
    target = _OPTIC_NERVE[2] * rng.uniform(0.88, 1.13)
    scale = 2.0
    for _ in range(40):  # fixed point of target = cones s^2 + caps s^3
        scale = math.sqrt(max(target - caps * scale ** 3, 1.0) / cones)
    return _Tube(points, shape * scale)


def _petrous(cochlea_centre: np.ndarray, side: float) -> _Ellipsoid:
    """Petrous ridge of the temporal bone around a cochlea: long axis from the mastoid (back, outside) to the
    apex (front, inside), 48 x 18 x 20 mm."""
    direction = np.array([-0.75 * side, -0.66, 0.0])
    direction /= np.linalg.norm(direction)
    across = np.array([-direction[1], direction[0], 0.0])
    axes = np.stack([direction * 24.0, across * 9.0, np.array([0.0, 0.0, 10.0])], axis=1)
    return _Ellipsoid(cochlea_centre + np.array([2.0 * side, 1.0, -1.0]), axes)


def _sample_anatomy(seed: int) -> _Anatomy:
    """Draw one case's solids (model coordinates) and its pose. Independent of the grid, so every spacing
    and field of view shows the same anatomy."""
    rng = np.random.default_rng([seed, 0])
    scale = rng.uniform(0.96, 1.04)
    # pitch (nodding) varies most between patients; roll swings the neck sideways, so it stays small
    rotation = _rotation(rng.uniform(-1.0, 1.0, 3) * np.array([4.0, 1.5, 3.0]))
    shift = rng.uniform(-4.0, 4.0, 3)
    base = {name: _Ellipsoid.from_moments(*values) for name, values in _ELLIPSOIDS.items()}
    organs: List[_Organ] = []
    solids: Dict[str, object] = {}

    brainstem = _jittered_ellipsoid(rng, base["Brainstem"], degrees=4.0, wobble=0.04)
    solids["Brainstem"] = brainstem
    for side, suffix in ((1.0, "Lt"), (-1.0, "Rt")):
        mirror = (lambda e: e) if side > 0 else (lambda e: e.mirrored())
        orbit_base, lens_base = mirror(base["Orbit"]), mirror(base["Lens"])
        rotation_o, scales_o, shift_o = _jitter(rng, shift_mm=1.5, degrees=5.0, volume=(0.9, 1.1))
        orbit = orbit_base.jittered(rotation_o, scales_o, shift_o, _wobble(rng, 0.03))
        # the lens rides on its eye: same rotation and shift, plus a little of its own
        offset = rotation_o @ (lens_base.centre - orbit_base.centre)
        rotation_l, scales_l, shift_l = _jitter(rng, shift_mm=0.3, degrees=5.0, volume=(0.9, 1.1))
        lens = _Ellipsoid(orbit.centre + offset + shift_l, rotation_o @ rotation_l @ lens_base.axes * scales_l)
        solids[f"Orbit-{suffix}"], solids[f"Lens-{suffix}"] = orbit, lens
        solids[f"Lacrimal-{suffix}"] = _jittered_ellipsoid(rng, mirror(base["Lacrimal"]), degrees=6.0)
        solids[f"Cochlea-{suffix}"] = _jittered_ellipsoid(rng, mirror(base["Cochlea"]), shift_mm=1.0,
                                                          degrees=10.0, wobble=0.0)
        solids[f"Petrous-{suffix}"] = _petrous(solids[f"Cochlea-{suffix}"].centre, side)
        nerve = _optic_nerve(rng)
        solids[f"Optic-Nerve-{suffix}"] = nerve if side > 0 else nerve.mirrored()
        solids[f"Parotid-{suffix}"] = _jittered_ellipsoid(rng, mirror(base["Parotid"]), shift_mm=2.0,
                                                          volume=_PAROTID_EXTRA)
        solids[f"Submandibular-{suffix}"] = _jittered_ellipsoid(rng, mirror(base["Submandibular"]), shift_mm=2.0)

    rotation_m, scales_m, shift_m = _jitter(rng, shift_mm=1.5, degrees=3.0, volume=(0.9, 1.1))
    mandible_centre = np.array(_MODEL_CENTROIDS["Mandible"])
    solids["Mandible"] = _Placed(_Mandible(_MANDIBLE), np.diag(1.0 / scales_m) @ rotation_m.T,
                                 mandible_centre, mandible_centre + shift_m)

    # canal and cord share their path; the cord gets its own small size change
    canal_shift = np.array([rng.normal(0, 1.0), rng.normal(0, 1.5), rng.normal(0, 2.0)])
    canal_scale = rng.uniform(0.94, 1.06, 2)   # cross-section only: the length is the field of view's
    canal = _tube_profile(_CANAL_ROWS, rng, _CANAL_TOP, bottom=-700.0)
    cord = _tube_profile(_CORD_ROWS, rng, _CANAL_TOP, bottom=-700.0)
    pivot = np.array([0.0, 0.0, _CANAL_TOP])
    cord_scale = canal_scale * rng.uniform(0.95, 1.05)
    solids["Spinal-Canal"] = _Placed(canal, np.diag([1 / canal_scale[0], 1 / canal_scale[1], 1.0]), pivot,
                                     pivot + canal_shift)
    solids["Spinal-Cord"] = _Placed(cord, np.diag([1 / cord_scale[0], 1 / cord_scale[1], 1.0]), pivot,
                                    pivot + canal_shift)

    for side, suffix in ((1.0, "Lt"), (-1.0, "Rt")):
        lung = _lung_profile(rng)
        lung = lung if side > 0 else lung.mirrored()
        apex = np.array([_LUNG_ROWS[0][1] * side, _LUNG_ROWS[0][2], _LUNG_APEX])
        s = rng.uniform(0.94, 1.06, 3)
        lung_shift = np.array([rng.normal(0, 2.0), rng.normal(0, 3.0), rng.normal(0, 4.0)])
        solids[f"Lung-{suffix}"] = _Placed(lung, np.diag(1.0 / s) @ _rotation(rng.uniform(-2, 2, 3)).T, apex,
                                           apex + lung_shift)

    brain_rotation, brain_scales, brain_shift = _jitter(rng, shift_mm=1.0, degrees=2.0, volume=(0.92, 1.08),
                                                        aspect=0.03)
    ellipsoid = _Ellipsoid(_BRAIN_CENTRE, np.diag(_BRAIN_SEMI_AXES)).jittered(
        brain_rotation, brain_scales, brain_shift, _wobble(rng, 0.03))
    solids["Brain"] = _Brain(ellipsoid, _BRAIN_FLOOR)

    keepouts = {
        "Brain": tuple((solids[name], margin) for name, margin in (
            ("Brainstem", 2.5), ("Orbit-Lt", 3.0), ("Orbit-Rt", 3.0), ("Optic-Nerve-Lt", 2.5),
            ("Optic-Nerve-Rt", 2.5), ("Petrous-Lt", 1.5), ("Petrous-Rt", 1.5), ("Lacrimal-Lt", 2.0),
            ("Lacrimal-Rt", 2.0))),
        "Parotid-Lt": ((solids["Mandible"], 1.0),), "Parotid-Rt": ((solids["Mandible"], 1.0),),
        "Submandibular-Lt": ((solids["Mandible"], 1.0),), "Submandibular-Rt": ((solids["Mandible"], 1.0),),
    }
    within = {"Lens-Lt": solids["Orbit-Lt"], "Lens-Rt": solids["Orbit-Rt"], "Spinal-Cord": solids["Spinal-Canal"]}
    for name in ORGANS:
        organs.append(_Organ(name, solids[name], keepouts.get(name, ()), within.get(name)))
    return _Anatomy(organs, float(scale), rotation, shift)


# ------------------------------------------------------------------------------------------- rasterising


@dataclass
class _Piece:
    """One organ on the grid: its index box and the mask inside it."""

    box: Tuple[slice, slice, slice]
    mask: np.ndarray


def _world_box(anatomy: _Anatomy, lo: np.ndarray, hi: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    world = anatomy.scale * corners @ anatomy.rotation.T + anatomy.shift
    return world.min(axis=0), world.max(axis=0)


def _index_box(lo_w, hi_w, shape, spacing, origin) -> Optional[Tuple[slice, slice, slice]]:
    start = np.ceil((lo_w - origin) / spacing - 1e-6).astype(int)
    stop = np.floor((hi_w - origin) / spacing + 1e-6).astype(int) + 1
    start, stop = np.maximum(start, 0), np.minimum(stop, shape)
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def _model_coords(anatomy: _Anatomy, box, spacing, origin) -> Coords:
    """Model coordinates (float32) of the voxel centres in `box`: p = R^T (w - shift) / scale."""
    axes = [((origin[i] + spacing[i] * np.arange(box[i].start, box[i].stop)) - anatomy.shift[i]) / anatomy.scale
            for i in range(3)]
    rt = anatomy.rotation.T
    xs = [a.astype(np.float32) for a in axes]
    shape3 = [(-1, 1, 1), (1, -1, 1), (1, 1, -1)]
    out = []
    for i in range(3):
        total = None
        for j in range(3):
            term = np.float32(rt[i, j]) * xs[j].reshape(shape3[j])
            total = term if total is None else total + term
        out.append(np.broadcast_to(total, tuple(b.stop - b.start for b in box)))
    return tuple(np.ascontiguousarray(c) for c in out)


def _sub_box(outer, inner):
    """Slices of `inner` (an index box) relative to `outer`, or None where they do not meet."""
    rel = []
    for o, i in zip(outer, inner):
        a, b = max(o.start, i.start), min(o.stop, i.stop)
        if b <= a:
            return None
        rel.append(slice(a - o.start, b - o.start))
    return tuple(rel)


def _rasterize(anatomy: _Anatomy, shape, spacing, origin) -> Dict[str, _Piece]:
    """Each organ's mask inside its bounding box (organs outside the field of view are left out)."""
    spacing_a, origin_a = np.asarray(spacing), np.asarray(origin)
    pieces: Dict[str, _Piece] = {}
    for organ in anatomy.organs:
        box = _index_box(*_world_box(anatomy, *organ.solid.bounds()), shape, spacing_a, origin_a)
        if box is None:
            continue
        p = _model_coords(anatomy, box, spacing_a, origin_a)
        mask = organ.solid.inside(p)
        for solid, margin in organ.keepouts:
            other = _index_box(*_world_box(anatomy, *solid.bounds(margin)), shape, spacing_a, origin_a)
            rel = _sub_box(box, other) if other is not None else None
            if rel is not None:
                mask[rel] &= ~solid.inside(tuple(c[rel] for c in p), margin)
        if organ.within is not None:
            mask &= organ.within.inside(p, -0.3)
        if mask.any():
            pieces[organ.name] = _Piece(box, mask)
    return pieces


def _paint_label(pieces: Mapping[str, _Piece], shape) -> np.ndarray:
    """Label map (uint8, value = ORGANS index + 1), PRIORITY deciding overlaps."""
    label = np.zeros(shape, dtype=np.uint8)
    for name in reversed(PRIORITY):  # the winner paints last
        piece = pieces.get(name)
        if piece is not None:
            label[piece.box][piece.mask] = ORGANS.index(name) + 1
    return label


def _masks_from(pieces: Mapping[str, _Piece], label: np.ndarray) -> Dict[str, np.ndarray]:
    """Per-organ masks that agree with the label map, the containers (Orbit, Spinal-Canal) keeping what they
    hold: the overlaps the real outlines have, and no others."""
    masks = {}
    for name in ORGANS:
        mask = np.zeros(label.shape, dtype=bool)
        piece = pieces.get(name)
        if piece is not None:
            own = label[piece.box] == ORGANS.index(name) + 1
            if name in _CONTAINS:
                own |= label[piece.box] == ORGANS.index(_CONTAINS[name]) + 1
            mask[piece.box] = piece.mask & own
        masks[name] = mask
    return masks


# ------------------------------------------------------------------------------------------- public: anatomy


def generate_masks(seed: int, *, spacing: Sequence[float] = _DEFAULT_SPACING,
                   shape: Optional[Sequence[int]] = None,
                   field_of_view: Sequence[float] = _DEFAULT_FOV) -> Dict[str, np.ndarray]:
    """Per-organ masks of phantom case ``seed``.

    Args:
        seed: non-negative integer; the same seed gives the same anatomy at every spacing and field of view.
        spacing: voxel size (x, y, z) in mm.
        shape: grid size (x, y, z); when given it sets the field of view (shape * spacing).
        field_of_view: extent (x, y, z) in mm when ``shape`` is None (the shape is field_of_view / spacing,
            rounded). Centred on the head in x and y, top 85 mm above the brain centroid.

    Returns:
        ``{organ: bool array of the grid's shape}`` for every organ of :data:`ORGANS` (all False where the
        organ is outside the field of view). As in the real outlines, Lens-Lt/Rt lie inside Orbit-Lt/Rt and
        Spinal-Cord inside Spinal-Canal; no other masks overlap.
    """
    where = "generate_masks"
    seed = _check_seed(where, seed)
    shape, spacing, origin = _grid(where, spacing, shape, field_of_view)
    pieces = _rasterize(_sample_anatomy(seed), shape, spacing, origin)
    return _masks_from(pieces, _paint_label(pieces, shape))


def generate_case(seed: int, *, spacing: Sequence[float] = _DEFAULT_SPACING,
                  shape: Optional[Sequence[int]] = None,
                  field_of_view: Sequence[float] = _DEFAULT_FOV) -> Tuple[Image, Image]:
    """One phantom case: CT-like image and label map.

    Args:
        seed, spacing, shape, field_of_view: as :func:`generate_masks`.

    Returns:
        ``(image, label)``: :class:`~fastseg.data.io.Image` pairs with the same geometry (identity direction,
        LPS origin of voxel 0). image: float32 Hounsfield units. label: uint8, 0 background, organ
        ``ORGANS[k]`` = k + 1, overlaps resolved by :data:`PRIORITY` (the lenses and the spinal cord win).

    Example:
        >>> image, label = generate_case(3, spacing=(2.0, 2.0, 3.0), shape=(128, 128, 64))
    """
    where = "generate_case"
    seed = _check_seed(where, seed)
    shape, spacing, origin = _grid(where, spacing, shape, field_of_view)
    label = _paint_label(_rasterize(_sample_anatomy(seed), shape, spacing, origin), shape)
    image = render_image(label, spacing, seed=seed)
    return Image(image, spacing, tuple(origin.tolist())), Image(label, spacing, tuple(origin.tolist()))


# ------------------------------------------------------------------------------------------- rendering


def _base_name(organ: str) -> str:
    return organ[:-3] if organ.endswith(("-Lt", "-Rt")) else organ


def _organ_hu(organ: str) -> float:
    """HU of an organ; an organ the phantom does not know gets a soft-tissue value of its own (from its name,
    so it is the same in every case)."""
    base = _base_name(organ)
    if base in _ORGAN_HU:
        return _ORGAN_HU[base]
    return 45.0 + float(zlib.crc32(base.encode()) % 81) - 40.0


def _as_label_map(where: str, label_or_masks, organs) -> Tuple[np.ndarray, Dict[str, int]]:
    if isinstance(organs, str) or not isinstance(organs, Sequence) or not organs:
        _fail(where, "organs", "a non-empty sequence of organ names", organs)
    if len(set(organs)) != len(organs) or not all(isinstance(o, str) and o for o in organs):
        _fail(where, "organs", "distinct non-empty organ names", organs)
    values = {name: i + 1 for i, name in enumerate(organs)}
    if isinstance(label_or_masks, Mapping):
        from fastseg.data.dataset import masks_to_label_map

        if not label_or_masks:
            _fail(where, "label_or_masks", "a label map or a non-empty mapping organ -> mask", label_or_masks)
        unknown = [k for k in label_or_masks if k not in values]
        if unknown:
            _fail(where, "label_or_masks", f"organ names from `organs` ({', '.join(organs)})", unknown)
        for name, m in label_or_masks.items():
            if np.ndim(m) != 3:
                _fail(where, f"label_or_masks[{name!r}]", "a 3D mask (x, y, z)", f"shape {np.shape(m)}")
        priority = [name for name in PRIORITY if name in label_or_masks]
        return masks_to_label_map(label_or_masks, values, priority), values
    label = label_or_masks.array if isinstance(label_or_masks, Image) else label_or_masks
    if not isinstance(label, np.ndarray) or label.ndim != 3:
        _fail(where, "label_or_masks", "a 3D label map (x, y, z) or a mapping organ -> 3D mask",
              f"shape {np.shape(label)}" if isinstance(label, np.ndarray) else type(label_or_masks).__name__)
    if label.dtype == np.bool_ or label.dtype.kind not in "iu":
        _fail(where, "label_or_masks", "an integer label map", f"dtype {label.dtype}")
    if label.size and (label.min() < 0 or label.max() > len(organs)):
        _fail(where, "label_or_masks", f"label values 0..{len(organs)} (one per organ in `organs`)",
              f"values {int(label.min())}..{int(label.max())}")
    return label, values


def _centroid_mm(label: np.ndarray, box, value: int, spacing) -> Tuple[np.ndarray, int]:
    mask = label[box] == value
    count = int(np.count_nonzero(mask))
    if count == 0:
        return np.zeros(3), 0
    idx = [np.arange(b.start, b.stop, dtype=np.float64) for b in box]
    c = [float((mask.sum(axis=tuple(j for j in range(3) if j != i)) * idx[i]).sum()) / count for i in range(3)]
    return np.asarray(c) * np.asarray(spacing), count


def _anchor(label, values, boxes, spacing) -> np.ndarray:
    """Where the brain centroid of the phantom model lies in this label map (mm, array frame): the median
    over the compact organs present of (centroid - model centroid). Lungs and spine are cut by the field of
    view and left out; with none of the compact organs, the head is taken to be centred in x, y and 85 mm
    below the top."""
    estimates = []
    for name, value in values.items():
        base = _base_name(name)
        if base not in _COMPACT or boxes.get(name) is None:
            continue
        centroid, count = _centroid_mm(label, boxes[name], value, spacing)
        if count == 0:
            continue
        model = np.array(_MODEL_CENTROIDS[base])
        if name.endswith("-Rt"):
            model = _MIRROR @ model
        estimates.append(centroid - model)
    if estimates:
        return np.median(np.array(estimates), axis=0)
    extent = np.asarray(label.shape) * np.asarray(spacing)
    return np.array([extent[0] / 2, extent[1] / 2, extent[2] - _TOP_MM])


def _ellipsoid_box(centre, semi, shape, spacing, margin=0.0):
    lo = (np.asarray(centre) - np.asarray(semi) - margin) / np.asarray(spacing)
    hi = (np.asarray(centre) + np.asarray(semi) + margin) / np.asarray(spacing)
    return _index_box(lo, hi, np.asarray(shape), np.ones(3), np.zeros(3))


def _axis_mm(box, spacing):
    return [(np.arange(b.start, b.stop, dtype=np.float32) * np.float32(s)).reshape(sh)
            for b, s, sh in zip(box, spacing, ((-1, 1, 1), (1, -1, 1), (1, 1, -1)))]


def _ellipsoid_region(centre, semi, shape, spacing):
    """(box, mask) of an axis-aligned ellipsoid (mm, array frame), or None outside the grid."""
    box = _ellipsoid_box(centre, semi, shape, spacing)
    if box is None:
        return None
    x, y, z = _axis_mm(box, spacing)
    r2 = ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2
    return box, r2 <= 1.0


def _paint_ellipsoid(image, label, centre, semi, value, spacing, on_label: int):
    """Paint an axis-aligned ellipsoid (mm, array frame) where the label map has the value `on_label`."""
    region = _ellipsoid_region(centre, semi, image.shape, spacing)
    if region is not None:
        box, mask = region
        image[box][mask & (label[box] == on_label)] = value


def _grow_box(box, margin_mm, spacing, shape):
    return tuple(slice(max(0, b.start - int(math.ceil(margin_mm / s))), min(n, b.stop + int(math.ceil(margin_mm / s))))
                 for b, s, n in zip(box, spacing, shape))


def _distance_outside(label, box, values, margin, spacing):
    """(grown box, distance in mm to the organs with label in `values` inside it)."""
    grown = _grow_box(box, margin, spacing, label.shape)
    inside = np.isin(label[grown], values)
    return grown, distance_transform_edt(~inside, sampling=spacing)


def _body(image, label, anchor, spacing, hu, brain_distance):
    """Paint the body: fat skin layer and soft tissue inside the head ellipsoid and the lofted sections,
    each section widened where needed so every organ lies 8 mm or more inside it."""
    nx, ny, nz = label.shape
    z_rel = np.arange(nz) * spacing[2] - anchor[2]
    rows = np.array(_BODY_ROWS)[::-1]
    cy = np.interp(z_rel, rows[:, 0], rows[:, 1]) + anchor[1]
    a = np.interp(z_rel, rows[:, 0], rows[:, 2])
    b = np.interp(z_rel, rows[:, 0], rows[:, 3])
    # widen: the largest normalised radius of an organ voxel per slice
    # every other voxel in x and y is plenty for the 8 mm margin, and 4 times faster
    fx, fy, fz = np.nonzero(label[::2, ::2])
    fx, fy = fx * 2, fy * 2
    if fx.size:
        r = np.sqrt(((fx * spacing[0] - anchor[0]) / a[fz]) ** 2 + ((fy * spacing[1] - cy[fz]) / b[fz]) ** 2)
        reach = np.zeros(nz)
        np.maximum.at(reach, fz, r)
        grow = np.maximum(1.0, reach + 8.0 / np.minimum(a, b))
        a, b = a * grow, b * grow
    x = (np.arange(nx, dtype=np.float32) * np.float32(spacing[0]) - np.float32(anchor[0]))[:, None]
    y = (np.arange(ny, dtype=np.float32) * np.float32(spacing[1]))[None, :]
    hc, hs = np.array(_HEAD[0]) + anchor, np.array(_HEAD[1])
    for k in range(nz):
        rx, ry = x / np.float32(a[k]), (y - np.float32(cy[k])) / np.float32(b[k])
        r2 = rx * rx + ry * ry
        inner = (x / np.float32(a[k] - 6.0)) ** 2 + ((y - np.float32(cy[k])) / np.float32(b[k] - 6.0)) ** 2
        zk = k * spacing[2]
        dz2 = ((zk - hc[2]) / hs[2]) ** 2
        if dz2 < 1.0:
            hr2 = (x / np.float32(hs[0])) ** 2 + ((y - np.float32(hc[1])) / np.float32(hs[1])) ** 2 + dz2
            h_inner = ((x / np.float32(hs[0] - 4.0)) ** 2 + ((y - np.float32(hc[1])) / np.float32(hs[1] - 4.0)) ** 2
                       + ((zk - hc[2]) / (hs[2] - 4.0)) ** 2)
            body_k, inner_k = (r2 <= 1.0) | (hr2 <= 1.0), (inner <= 1.0) | (h_inner <= 1.0)
        else:
            body_k, inner_k = r2 <= 1.0, inner <= 1.0
        sl = image[:, :, k]
        sl[body_k] = hu["fat"]
        sl[inner_k & body_k] = hu["soft"]
    if brain_distance is not None:
        box, distance = brain_distance
        scalp = (distance <= 14.0) & (image[box] == hu["air"])
        image[box][scalp] = hu["soft"]


def _per_slice_tube(label, box, values, spacing):
    """Per slice of `box` holding the tube: (k, cx, cy, a, b) in mm, from counts and in-slice moments."""
    mask = np.isin(label[box], values)
    count = mask.sum(axis=(0, 1)).astype(np.float64)
    xs = np.arange(box[0].start, box[0].stop) * spacing[0]
    ys = np.arange(box[1].start, box[1].stop) * spacing[1]
    sx, sy = mask.sum(axis=1), mask.sum(axis=0)  # (nx, nz), (ny, nz)
    ok = count > 0
    c = np.maximum(count, 1)
    mx, my = (xs @ sx) / c, (ys @ sy) / c
    vx = np.maximum((xs ** 2 @ sx) / c - mx ** 2, 0)
    vy = np.maximum((ys ** 2 @ sy) / c - my ** 2, 0)
    ks = np.arange(box[2].start, box[2].stop)
    return ks[ok], mx[ok], my[ok], 2 * np.sqrt(vx[ok]) + 0.5, 2 * np.sqrt(vy[ok]) + 0.5


def _spine(image, label, box, values, spacing, anchor, hu):
    """Vertebrae around the spinal canal (epidural fat, arch, spinous process, body with cortex and discs)
    and the airway in front of them, slice by slice, inside a window around the canal."""
    ks, cx, cy, a, b = _per_slice_tube(label, box, values, spacing)
    if ks.size == 0:
        return
    # the window reaches 40 mm sideways, 80 mm forwards (vertebral body and airway), 45 mm backwards
    window = _index_box(np.array([cx.min() - 40.0, cy.min() - 80.0, 0.0]) / spacing,
                        np.array([cx.max() + 40.0, cy.max() + 45.0, 0.0]) / spacing,
                        np.array(label.shape), np.ones(3), np.zeros(3))
    if window is None:
        return
    wx, wy = window[0], window[1]
    # epidural fat between canal and bone, 3 voxels wide so that the canal stands out at any spacing (its
    # 2-voxel neighbourhood, blurred by half a voxel, sees fat only)
    fat = max(2.0, 3.0 * max(spacing[0], spacing[1]))
    x = np.arange(wx.start, wx.stop, dtype=np.float32)[:, None] * np.float32(spacing[0])
    y = np.arange(wy.start, wy.stop, dtype=np.float32)[None, :] * np.float32(spacing[1])
    for k, mx, my, ea, eb in zip(ks, cx, cy, a, b):
        z_rel = k * spacing[2] - anchor[2]
        sl = image[wx, wy, k]
        dx, dy = x - np.float32(mx), y - np.float32(my)
        arch = (dx / (ea + fat + 4.0)) ** 2 + (dy / (eb + fat + 4.0)) ** 2 <= 1.0
        spinous = (np.abs(dx) <= 3.0) & (dy >= eb + fat + 1.0) & (dy <= eb + fat + 28.0)
        rx, ry = (18.0, 14.0) if z_rel < -200.0 else (15.0, 11.0)   # thoracic bodies are larger
        by = my - eb - fat - 2.0 - ry
        sl[arch | spinous] = hu["bone"]
        sl[(dx / (ea + fat)) ** 2 + (dy / (eb + fat)) ** 2 <= 1.0] = hu["fat"]
        body = (dx / rx) ** 2 + ((y - np.float32(by)) / ry) ** 2 <= 1.0
        if ((z_rel + 1000.0) % 18.0) < 5.0:   # an intervertebral disc every 18 mm
            sl[body] = hu["disc"]
        else:
            sl[body] = hu["bone"]
            sl[(dx / (rx - 2.0)) ** 2 + ((y - np.float32(by)) / (ry - 2.0)) ** 2 <= 1.0] = hu["cancellous"]
        if z_rel < -70.0:
            ra, rb = (15.0, 9.0) if z_rel > -140.0 else (9.0, 7.0)   # pharynx, then trachea
            ay = by - ry - 6.0 - rb
            airway = (dx / ra) ** 2 + ((y - np.float32(ay)) / rb) ** 2 <= 1.0
            sl[airway & (sl != hu["air"])] = hu["air"]
    # the foramen magnum: above the canal's top, CSF (not skull) up to the brainstem
    top = int(np.argmax(ks))
    for k in range(ks[top] + 1, min(label.shape[2], ks[top] + 1 + int(math.ceil(15.0 / spacing[2])))):
        sl = image[wx, wy, k]
        hole = ((x - np.float32(cx[top])) / (a[top] + 1.0)) ** 2 + ((y - np.float32(cy[top])) / (b[top] + 1.0)) ** 2
        sl[(hole <= 1.0) & (label[wx, wy, k] == 0)] = hu["csf"]


def _halo(image, label, box, value, margin, tissue, spacing):
    """Paint `tissue` on the background within `margin` mm or 3 voxels (along each axis) of an organ: 3
    voxels, so that after the half-voxel blur the organ's 2-voxel neighbourhood is that tissue alone."""
    grown = _grow_box(box, max(margin, 3.0 * max(spacing)), spacing, label.shape)
    outside = label[grown] != value
    near = distance_transform_edt(outside, sampling=spacing) <= margin
    near |= distance_transform_edt(outside) <= 3.0
    image[grown][near & (label[grown] == 0)] = tissue


def _tissue_values(rng: np.random.Generator, organs: Sequence[str]) -> Tuple[Dict[str, float], Dict[str, float]]:
    tissue = {k: v + (rng.uniform(-6, 6) if k != "air" else 0.0) for k, v in _TISSUE_HU.items()}
    organ = {name: _organ_hu(name) + rng.uniform(-6, 6) for name in organs}
    return tissue, organ


def render_image(label_or_masks, spacing: Sequence[float], *, seed: int,
                 organs: Sequence[str] = ORGANS) -> np.ndarray:
    """A CT-like image (Hounsfield units) for an organ label map: the phantom's or a real one.

    Args:
        label_or_masks: a label map ``(x, y, z)`` (integer array or :class:`~fastseg.data.io.Image`, organ
            ``organs[k]`` = k + 1, 0 background) or a mapping organ name -> 3D mask (overlaps resolved by
            :data:`PRIORITY`, then smaller first). Axes in LPS order with identity direction (x to the
            patient's left, y to the back, z up), as the shared masks and :func:`generate_case` have them.
        spacing: voxel size (x, y, z) in mm.
        seed: non-negative integer for the tissue values, textures and noise.
        organs: the organ names of the label values. Organs the phantom does not know get a soft-tissue
            value of their own.

    Returns:
        float32 array of the label map's shape. Every organ voxel gets its organ's value (lens denser than
        the eye, cochlea a fluid cavity in dense petrous bone, parotid fattier than muscle, ...); around them
        the body outline, skull, vertebrae, orbital fat and walls, sinuses and airway are synthesised relative
        to the organs found; then a Gaussian blur of half a voxel (partial volume) and Gaussian noise of
        10-18 HU.
    """
    where = "render_image"
    seed = _check_seed(where, seed)
    spacing = _check_triple(where, "spacing", spacing)
    label, values = _as_label_map(where, label_or_masks, organs)
    rng = np.random.default_rng([seed, 1])
    hu, organ_hu = _tissue_values(rng, list(values))
    noise_sigma = rng.uniform(10.0, 18.0)
    found = ndimage.find_objects(label, max_label=len(organs)) if label.size else []
    boxes = {name: (found[v - 1] if v - 1 < len(found) else None) for name, v in values.items()}
    present = {name: box for name, box in boxes.items() if box is not None}
    anchor = _anchor(label, values, present, spacing)
    image = np.full(label.shape, hu["air"], dtype=np.float32)
    if not label.size:
        return image

    brain_distance = None
    if "Brain" in present:
        inner = [values["Brain"]] + ([values["Brainstem"]] if "Brainstem" in present else [])
        brain_distance = _distance_outside(label, present["Brain"], inner, 15.0, spacing)
    _body(image, label, anchor, spacing, hu, brain_distance)

    if brain_distance is not None:
        box, distance = brain_distance
        free = label[box] == 0
        image[box][(distance > 0) & (distance <= 1.5) & free] = hu["csf"]
        image[box][(distance > 1.5) & (distance <= 8.5) & free] = hu["skull"]
    for tissue, centre, semi in _FACE:
        _paint_ellipsoid(image, label, np.array(centre) + anchor, semi, hu[tissue], spacing, 0)
    for suffix, side in (("Lt", 1.0), ("Rt", -1.0)):
        orbit = f"Orbit-{suffix}"
        if orbit in present:
            c, _ = _centroid_mm(label, present[orbit], values[orbit], spacing)
            cone = c + np.array([-3.0 * side, 12.0, 0.0])
            region = _ellipsoid_region(cone, (19.0, 25.0, 18.0), label.shape, spacing)
            if region is not None:
                box, wall = region
                y = _axis_mm(box, spacing)[1]
                image[box][wall & (y > c[1] - 2.0) & (label[box] == 0)] = hu["orbit_wall"]
            _paint_ellipsoid(image, label, cone, (16.0, 22.0, 15.0), hu["fat"], spacing, 0)
        cochlea = f"Cochlea-{suffix}"
        if cochlea in present:
            c, _ = _centroid_mm(label, present[cochlea], values[cochlea], spacing)
            petrous = _petrous(c, 1.0 if c[0] >= anchor[0] else -1.0)
            box = _ellipsoid_box(petrous.centre, np.linalg.norm(petrous.axes, axis=1), label.shape, spacing)
            if box is not None:
                p = tuple(np.ascontiguousarray(np.broadcast_to(v, tuple(s.stop - s.start for s in box)))
                          for v in _axis_mm(box, spacing))
                image[box][petrous.inside(p) & (label[box] == 0)] = hu["petrous"]
    canal = [values[n] for n in ("Spinal-Canal", "Spinal-Cord") if n in present]
    if canal:
        boxes_c = [present[n] for n in ("Spinal-Canal", "Spinal-Cord") if n in present]
        box = tuple(slice(min(b[i].start for b in boxes_c), max(b[i].stop for b in boxes_c)) for i in range(3))
        _spine(image, label, box, canal, spacing, anchor, hu)

    # what surrounds the small organs, painted over the bones so that each organ stands out against one
    # tissue (CSF cistern, orbital / neck fat, chewing muscle), wide enough at any spacing
    for name, box in present.items():
        tissue, margin = _HALOS.get(_base_name(name), (None, 0.0))
        if tissue is not None:
            _halo(image, label, box, values[name], margin, hu[tissue], spacing)

    # the organs themselves, then their inner structure
    for name, box in present.items():
        image[box][label[box] == values[name]] = organ_hu[name]
    if "Brain" in present:
        for centre, semi in _VENTRICLES:
            _paint_ellipsoid(image, label, np.array(centre) + anchor, semi, hu["csf"], spacing, values["Brain"])
    if "Mandible" in present:
        box = _grow_box(present["Mandible"], 3.0, spacing, label.shape)
        bone = label[box] == values["Mandible"]
        depth = distance_transform_edt(bone, sampling=spacing)
        image[box][bone & (depth > 2.5)] = hu["marrow"]
        image[box][bone & (depth <= 2.5)] = hu["cortex"]
    for name in ("Lung-Lt", "Lung-Rt"):
        if name in present:
            box = present[name]
            lung = label[box] == values[name]
            field = ndimage.gaussian_filter(rng.standard_normal(lung.shape).astype(np.float32),
                                            sigma=[3.0 / s for s in spacing])
            field /= max(float(field.std()), 1e-6)
            texture = 35.0 * field + np.where(field > 1.9, 250.0, 0.0)  # vessels: the brightest few percent
            image[box][lung] += texture[lung].astype(np.float32)

    # sigma 0.5 voxel: taps beyond one voxel weigh < 3e-4, so a 3-tap kernel (truncate 2) is the same blur
    ndimage.gaussian_filter(image, sigma=0.5, truncate=2.0, output=image)
    # noise a few slices at a time: no second full-size array
    step = max(1, (1 << 22) // max(1, image.shape[0] * image.shape[1]))
    for k in range(0, image.shape[2], step):
        chunk = image[:, :, k:k + step]
        chunk += rng.standard_normal(chunk.shape, dtype=np.float32) * np.float32(noise_sigma)
    return image


# ------------------------------------------------------------------------------------------- datasets


def _case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


def write_phantom_dataset(root: Union[str, os.PathLike], *, n_train: int, n_test: int, seed: int = 0,
                          spacing: Sequence[float] = (2.0, 2.0, 3.0),
                          field_of_view: Sequence[float] = _DEFAULT_FOV,
                          file_format: str = "nii.gz") -> Path:
    """Write a phantom dataset: ``images/<case>``, ``labels/<case>`` and the description ``dataset.json``.

    Args:
        root: folder (created if needed).
        n_train, n_test: number of cases in the train and test splits (``phantom_000``, ``phantom_001``, ...
            train first); at least one case in all.
        seed: dataset seed; case i is phantom case ``SeedSequence([seed, i])``.
        spacing: voxel size (x, y, z) in mm (default 2 x 2 x 3 mm, the main job's).
        field_of_view: extent (x, y, z) in mm (see :func:`generate_masks`).
        file_format: ``'nii.gz'``, ``'nii'`` or ``'nrrd'``.

    Returns:
        the path of ``dataset.json`` (organs :data:`ORGANS`, priority :data:`PRIORITY`, splits train / test),
        written last, so it exists only once every case is on disk. Images are stored as int16 HU, labels as
        uint8; every file is written atomically.
    """
    where = "write_phantom_dataset"
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            _fail(where, name, "a non-negative integer", value)
    if n_train + n_test < 1:
        _fail(where, "n_train + n_test", "at least one case", n_train + n_test)
    seed = _check_seed(where, seed)
    formats = ("nii.gz", "nii", "nrrd")
    if file_format not in formats:
        _fail(where, "file_format", f"one of {formats}", file_format)
    _grid(where, spacing, None, field_of_view)  # argument checks before anything is written
    from fastseg.data.dataset import write_dataset_description

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    names = [f"phantom_{i:03d}" for i in range(n_train + n_test)]
    for i, case in enumerate(names):
        image, label = generate_case(_case_seed(seed, i), spacing=spacing, field_of_view=field_of_view)
        hu = np.clip(np.rint(image.array), -1024, 3071).astype(np.int16)
        write_image(root / "images" / f"{case}.{file_format}", image.with_array(hu))
        write_image(root / "labels" / f"{case}.{file_format}", label)
    return_path = root / "dataset.json"
    write_dataset_description(
        return_path, name="phantom-hn", modality="CT", organs=list(ORGANS),
        image=f"images/{{case}}.{file_format}", label=f"labels/{{case}}.{file_format}",
        priority=list(PRIORITY), splits={"train": names[:n_train], "test": names[n_train:]})
    return return_path
