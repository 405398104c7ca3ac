"""Image files: NIfTI (``.nii``, ``.nii.gz``, via nibabel) and NRRD (``.nrrd``, via pynrrd), read into one
:class:`Image` type whose geometry is in LPS world coordinates (the ITK / DICOM / NRRD convention).

Geometry: voxel index ``i`` (array order, as nibabel and pynrrd with ``index_order='F'`` return it) lies at
the LPS point ``origin + direction @ (spacing * i)`` (mm). NIfTI stores the same map as a RAS affine (x to the
patient's right-to-left axis reversed, y reversed): a point (x, y, z) in LPS is (-x, -y, z) in RAS, so reading
and writing flip the sign of the first two world rows. NRRD files in another anatomical ``space`` (RAS, LAS)
are converted the same way.

Every write is atomic: the file is written under a temporary name in the destination folder (same suffix, so
the writer picks the same format) and then renamed over the destination, so a reader never sees a partial
file and a failed write leaves nothing behind (:func:`atomic_output`).
"""
from __future__ import annotations

import os

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from fastseg._atomic import atomic_path as atomic_output

__all__ = [
    "Image",
    "ImageFormatError",
    "read_image",
    "write_image",
    "atomic_output",
    "image_suffix",
    "case_name",
    "IMAGE_SUFFIXES",
]

PathLike = Union[str, os.PathLike]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
_SUFFIX_TEXT = ".nii, .nii.gz or .nrrd"

# Sign flips taking a point in an anatomical NRRD space to LPS (ITK's NrrdImageIO does the same).
_TO_LPS = {
    "left-posterior-superior": (1.0, 1.0, 1.0),
    "lps": (1.0, 1.0, 1.0),
    "right-anterior-superior": (-1.0, -1.0, 1.0),
    "ras": (-1.0, -1.0, 1.0),
    "left-anterior-superior": (1.0, -1.0, 1.0),
    "las": (1.0, -1.0, 1.0),
}
# Spaces without an anatomical meaning: their coordinates are taken as they are (as LPS).
_AS_IS_SPACES = ("scanner-xyz", "3d-right-handed", "3d-left-handed")
_RAS_FLIP = np.array([-1.0, -1.0, 1.0])
_UNIT_TOLERANCE = 1e-3


class ImageFormatError(ValueError):
    """A file that exists but cannot be read as an image: corrupt, truncated, or with an unsupported layout."""


# ------------------------------------------------------------------------------------------- the image


def _fail(fn: str, name: str, expected: str, got) -> None:
    raise ValueError(f"{fn}: {name}: expected {expected}, got {got!r}")


def _float_tuple(fn: str, name: str, values, n: int, positive: bool) -> Tuple[float, ...]:
    kind = "finite numbers > 0" if positive else "finite numbers"
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        _fail(fn, name, f"{n} {kind}", values)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)) or (positive and not np.all(arr > 0)):
        _fail(fn, name, f"{n} {kind} (one per spatial axis)", values)
    return tuple(float(v) for v in arr)


@dataclass(eq=False)  # arrays: == would be ambiguous
class Image:
    """An array with its world geometry.

    Attributes:
        array: the voxels in the file's index order (x, y[, z]); optionally with a leading channel axis
            ``(C, *spatial)`` (per-organ masks), which shares the geometry of the spatial part.
        spacing: voxel size in mm per spatial axis, in array order. Default: 1 mm.
        origin: LPS position (mm) of the centre of voxel 0. Default: 0.
        direction: ``(ndim, ndim)`` matrix whose column ``a`` is the LPS unit vector of array axis ``a``.
            Default: identity.

    ``ndim`` is the number of spatial axes (2 or 3): ``len(spacing)``, or ``array.ndim`` when no spacing is
    given.
    """

    array: np.ndarray
    spacing: Optional[Sequence[float]] = None
    origin: Optional[Sequence[float]] = None
    direction: Optional[np.ndarray] = field(default=None, repr=False)

    def __post_init__(self):
        fn = "Image"
        if not isinstance(self.array, np.ndarray):
            raise TypeError(f"{fn}: array: expected a numpy.ndarray, got {type(self.array).__name__}")
        if self.spacing is None:
            nd = self.array.ndim
        else:
            nd = int(np.size(self.spacing))
        if nd not in (2, 3):
            _fail(fn, "spacing", "2 or 3 spatial axes", self.spacing if self.spacing is not None
                  else f"array of shape {self.array.shape}")
        if self.array.ndim not in (nd, nd + 1):
            _fail(fn, "array", f"{nd} spatial axes, optionally after one channel axis", f"shape {self.array.shape}")
        self.spacing = (1.0,) * nd if self.spacing is None else _float_tuple(fn, "spacing", self.spacing, nd, True)
        self.origin = (0.0,) * nd if self.origin is None else _float_tuple(fn, "origin", self.origin, nd, False)
        if self.direction is None:
            self.direction = np.eye(nd)
        else:
            d = np.array(self.direction, dtype=np.float64)
            if d.shape != (nd, nd) or not np.all(np.isfinite(d)):
                _fail(fn, "direction", f"a finite ({nd}, {nd}) matrix", self.direction)
            norms = np.linalg.norm(d, axis=0)
            if not np.allclose(norms, 1.0, atol=_UNIT_TOLERANCE):
                _fail(fn, "direction", "unit columns (the spacing goes into `spacing`)",
                      f"columns of length {norms.round(6).tolist()}")
            if abs(np.linalg.det(d)) < 1e-6:
                _fail(fn, "direction", "an invertible matrix", d.tolist())
            self.direction = d

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return len(self.spacing)

    @property
    def shape(self) -> Tuple[int, ...]:
        """The spatial shape (the channel axis, if any, left out)."""
        return tuple(self.array.shape[-self.ndim:])

    @property
    def affine(self) -> np.ndarray:
        """``(ndim + 1, ndim + 1)`` index-to-LPS matrix: ``direction @ diag(spacing)`` and ``origin``."""
        m = np.eye(self.ndim + 1)
        m[:-1, :-1] = self.direction * np.asarray(self.spacing)
        m[:-1, -1] = self.origin
        return m

    def with_array(self, array: np.ndarray) -> "Image":
        """A new Image holding ``array`` with this image's spacing, origin and direction."""
        return Image(array, self.spacing, self.origin, self.direction.copy())


# ------------------------------------------------------------------------------------------- paths


def image_suffix(path: PathLike) -> Optional[str]:
    """``'.nii.gz'``, ``'.nii'`` or ``'.nrrd'`` from the file name (case-insensitive), else None."""
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def case_name(path: PathLike) -> Optional[str]:
    """The file name without its image suffix (``'case01'`` of ``case01.nii.gz``), None for a non-image."""
    suffix = image_suffix(path)
    name = Path(path).name
    return None if suffix is None else name[: len(name) - len(suffix)]


def _checked_suffix(fn: str, path: Path) -> str:
    suffix = image_suffix(path)
    if suffix is None:
        _fail(fn, "path", f"a {_SUFFIX_TEXT} file", str(path))
    return suffix


def _native(array: np.ndarray) -> np.ndarray:
    """Native byte order (big-endian files give '>i2' arrays). The memory layout is kept: both libraries
    return Fortran-ordered arrays, and a C-order copy would cost a slow transpose (1 s for a 512 x 512 x 160
    mask)."""
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="), order="K")
    return array


def _geometry_from_matrix(path: Path, m: np.ndarray, origin: np.ndarray, nd: int):
    """(spacing, origin, direction) of ``nd`` spatial axes from the 3 x nd LPS matrix whose columns are the
    axes' world steps. A 2D image keeps the x-y part; its plane must then be parallel to x-y."""
    steps = m[:, :nd]
    spacing = np.linalg.norm(steps, axis=0)
    if not np.all(np.isfinite(spacing)) or not np.all(spacing > 0):
        raise ImageFormatError(f"cannot read {str(path)!r}: degenerate voxel axes (spacing {spacing.tolist()})")
    direction = steps / spacing
    if nd == 2:
        if np.any(np.abs(direction[2]) > _UNIT_TOLERANCE):
            raise ImageFormatError(f"cannot read {str(path)!r}: a 2D image whose plane is not parallel to the "
                                   f"x-y plane is not supported (axis directions {direction.T.tolist()})")
        direction = direction[:2]
        origin = origin[:2]
    if abs(np.linalg.det(direction)) < 1e-6:
        raise ImageFormatError(f"cannot read {str(path)!r}: the axis directions are degenerate "
                               f"({direction.T.tolist()})")
    return tuple(spacing.tolist()), tuple(np.asarray(origin, dtype=np.float64).tolist()), direction


def _squeeze_trailing(array: np.ndarray) -> np.ndarray:
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def _check_spatial_ndim(path: Path, array: np.ndarray) -> None:
    if array.ndim not in (2, 3):
        raise ImageFormatError(f"cannot read {str(path)!r}: expected a 2D or 3D image, got an array of shape "
                               f"{array.shape}")


def _read_nifti(path: Path) -> Image:
    import nibabel as nib

    try:
        img = nib.load(str(path), mmap=False)
        array = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # nibabel raises ImageFileError, EOFError, zlib.error, OSError, ValueError ...
        raise ImageFormatError(f"cannot read {str(path)!r} as NIfTI: {type(err).__name__}: {err}") from err
    array = _squeeze_trailing(array)
    _check_spatial_ndim(path, array)
    lps = affine[:3] * _RAS_FLIP[:, None]
    spacing, origin, direction = _geometry_from_matrix(path, lps[:, :3], lps[:, 3], array.ndim)
    return Image(_native(array), spacing, origin, direction)


def _nrrd_space_signs(path: Path, header) -> np.ndarray:
    space = str(header.get("space", "")).strip().lower()
    if not space or space in _AS_IS_SPACES:
        return np.ones(3)
    if space not in _TO_LPS:
        raise ImageFormatError(f"cannot read {str(path)!r}: NRRD space {header.get('space')!r} is not supported "
                               f"(expected one of {sorted(_TO_LPS)} or {list(_AS_IS_SPACES)})")
    return np.array(_TO_LPS[space])


def _read_nrrd(path: Path) -> Image:
    import nrrd

    try:
        array, header = nrrd.read(str(path), index_order="F")
    except Exception as err:  # pynrrd raises NRRDError, ValueError, EOFError, zlib.error, OSError ...
        raise ImageFormatError(f"cannot read {str(path)!r} as NRRD: {type(err).__name__}: {err}") from err
    _check_spatial_ndim(path, array)
    nd = array.ndim
    signs = _nrrd_space_signs(path, header)
    if "space directions" in header:
        rows = np.asarray(header["space directions"], dtype=np.float64)
        if rows.ndim != 2 or rows.shape[0] != nd or not np.all(np.isfinite(rows)):
            raise ImageFormatError(f"cannot read {str(path)!r}: every axis must be spatial (space directions "
                                   f"{rows.tolist()})")
        space_dim = rows.shape[1]
        m = np.zeros((3, nd))
        m[:space_dim] = rows.T  # pynrrd: one row per array axis
        origin = np.zeros(3)
        if "space origin" in header:
            origin[:space_dim] = np.asarray(header["space origin"], dtype=np.float64)[:space_dim]
        m *= signs[:, None]
        origin *= signs
    else:
        spacings = np.asarray(header.get("spacings", [1.0] * nd), dtype=np.float64)
        spacings = np.where(np.isfinite(spacings) & (spacings > 0), spacings, 1.0)
        m = np.zeros((3, nd))
        m[:nd, :nd] = np.diag(spacings)
        origin = np.zeros(3)
    spacing, origin, direction = _geometry_from_matrix(path, m, origin, nd)
    return Image(_native(array), spacing, origin, direction)


def read_image(path: PathLike) -> Image:
    """Read a NIfTI (``.nii``, ``.nii.gz``) or NRRD (``.nrrd``) file.

    Args:
        path: the file; the format is chosen by its suffix.

    Returns:
        :class:`Image` with the file's dtype (NIfTI scaling, if the header sets any, is applied by nibabel),
        the array in index order (as the libraries return it: Fortran-ordered in memory) and the geometry
        in LPS.

    Raises:
        FileNotFoundError: no such file. ValueError: unknown suffix or a folder.
        ImageFormatError (a ValueError): corrupt or truncated file, unsupported layout (not 2D or 3D, a
        non-spatial axis, a 2D plane not parallel to x-y).
    """
    fn = "read_image"
    path = Path(path)
    suffix = _checked_suffix(fn, path)
    if not path.exists():
        raise FileNotFoundError(f"{fn}: path: no such file: {str(path)!r}")
    if not path.is_file():
        _fail(fn, "path", f"a {_SUFFIX_TEXT} file", f"{str(path)} (not a file)")
    return _read_nrrd(path) if suffix == ".nrrd" else _read_nifti(path)


# ------------------------------------------------------------------------------------------- writing


def _writable_array(fn: str, image: Image) -> np.ndarray:
    if not isinstance(image, Image):
        raise TypeError(f"{fn}: image: expected a fastseg.data.Image, got {type(image).__name__}")
    array = image.array
    if array.ndim != image.ndim:
        _fail(fn, "image", f"a {image.ndim}D array without a channel axis", f"array of shape {array.shape}")
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype.kind not in "iuf":
        _fail(fn, "image", "an integer or floating-point array", f"dtype {array.dtype}")
    return array


def _lps_matrix_3d(image: Image) -> Tuple[np.ndarray, np.ndarray]:
    """(3 x 3 index-step matrix, 3-origin) in LPS, a 2D image embedded in the z = 0 plane with 1 mm z."""
    m = np.eye(3)
    nd = image.ndim
    m[:nd, :nd] = image.direction * np.asarray(image.spacing)
    origin = np.zeros(3)
    origin[:nd] = image.origin
    return m, origin


def _write_nifti(tmp: Path, array: np.ndarray, image: Image) -> None:
    import nibabel as nib

    m, origin = _lps_matrix_3d(image)
    ras = np.eye(4)
    ras[:3, :3] = m * _RAS_FLIP[:, None]
    ras[:3, 3] = origin * _RAS_FLIP
    img = nib.Nifti1Image(array, ras, dtype=array.dtype)
    # code 1 (scanner) in both forms, so readers preferring either one find the same geometry
    img.set_sform(ras, code=1)
    img.set_qform(ras, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(tmp))


def _write_nrrd(tmp: Path, array: np.ndarray, image: Image, compress: bool) -> None:
    import nrrd

    m, origin = _lps_matrix_3d(image)
    nd = image.ndim
    header = {
        "space": "left-posterior-superior",
        "space directions": m[:, :nd].T,  # pynrrd: one row per array axis
        "space origin": origin,
        "kinds": ["domain"] * nd,
        "encoding": "gzip" if compress else "raw",
    }
    nrrd.write(str(tmp), np.asarray(array), header, index_order="F")


def write_image(path: PathLike, image: Image, *, compress: bool = True) -> Path:
    """Write ``image`` as NIfTI (``.nii``, ``.nii.gz``) or NRRD (``.nrrd``), atomically.

    Args:
        path: destination; the suffix chooses the format. Missing folders are created.
        image: a 2D or 3D :class:`Image` without a channel axis. bool arrays are written as uint8; other
            integer and float dtypes are kept.
        compress: NRRD only: gzip encoding (True) or raw. NIfTI compression follows the suffix (.nii.gz).

    Returns:
        ``path`` as a Path.

    The geometry is written in LPS for NRRD (``space: left-posterior-superior``) and as the equivalent RAS
    affine (sform and qform, code 1) for NIfTI; a 2D image lies in the z = 0 plane.
    """
    fn = "write_image"
    path = Path(path)
    suffix = _checked_suffix(fn, path)
    if not isinstance(compress, bool):
        _fail(fn, "compress", "True or False", compress)
    array = _writable_array(fn, image)
    if path.is_dir():
        _fail(fn, "path", f"a {_SUFFIX_TEXT} file path", f"{str(path)} (a folder)")
    with atomic_output(path) as tmp:
        if suffix == ".nrrd":
            _write_nrrd(tmp, array, image, compress)
        else:
            _write_nifti(tmp, array, image)
    return path

