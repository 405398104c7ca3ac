"""Patch sampling with foreground oversampling, the training Dataset and its DataLoader.

Implements exactly the "Patch sampling semantics" shared with ``fastseg.imbalance`` (which computes the
expectations of this sampler in closed form), for one case with label map L of spatial shape S and patch P:

1. Where S[a] < P[a] the case is padded to S'[a] = P[a], (P - S) // 2 before and the rest after
   (label 0, image with its per-channel minimum); elsewhere S' = S.
2. A patch is the box [lo, lo + P) with lo[a] in {0, ..., S'[a] - P[a]}.
3. Each patch is independently a foreground patch with probability ``oversample_foreground`` (nnU-Net's
   1/3 by default; nnU-Net instead forces the last round(B * p) slots of each batch — same expectation when
   B * p is an integer), else a random patch.
4. Random patch: lo uniform over all valid positions, independently per axis.
5. Foreground patch: a class c uniform among the foreground classes present in the case (label != 0 and
   != ignore_label; for a (K, *S) multi-label stack, the channels with any voxel set), a voxel v uniform
   among all voxels of class c, lo = clip(v - P // 2, 0, S' - P) (v in padded coordinates). A case
   without foreground gives a random patch.
6. Each sample picks its case uniformly.
7. Sample number i of the whole run draws everything from ``np.random.default_rng([seed, i])``, so the
   stream does not depend on the number of DataLoader workers and resuming at iteration t is exact.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["CaseLocations", "PatchDraw", "PatchSampler", "PatchDataset", "IterationSampler",
           "extract_patch", "make_loader"]


def _fail(fn: str, name: str, expected: str, got) -> None:
    raise ValueError(f"{fn}: {name}: expected {expected}, got {got!r}")


def _array_desc(a) -> str:
    return f"{a.dtype} array of shape {tuple(a.shape)}"


def _int_tuple(fn: str, name: str, value, *, minimum: int) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
        ok = len(out) > 0 and all(o == v and o >= minimum for o, v in zip(out, value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        _fail(fn, name, f"a non-empty sequence of integers >= {minimum}", value)
    return out


@dataclass(frozen=True)
class CaseLocations:
    """Everything the sampler needs about one case, computed once by :meth:`PatchSampler.locations`.

    Attributes:
        shape: spatial shape S of the case.
        patch_size: P.
        padded_shape: S' = max(S, P) per axis.
        pad_before: (S' - S) // 2 per axis.
        classes: (n,) int64 foreground class values present (label values; channel index + 1 for a stack).
        indices: per class, the C-order flat indices (into S) of all its voxels, ascending
            (int32 when S has fewer than 2**31 voxels).
    """

    shape: tuple[int, ...]
    patch_size: tuple[int, ...]
    padded_shape: tuple[int, ...]
    pad_before: tuple[int, ...]
    classes: np.ndarray
    indices: tuple[np.ndarray, ...]

    @property
    def num_voxels(self) -> np.ndarray:
        """Voxel count of each class in ``classes``."""
        return np.array([len(i) for i in self.indices], dtype=np.int64)


@dataclass(frozen=True)
class PatchDraw:
    """One draw: lower corner (padded coordinates), kind, and for foreground patches the class and voxel."""

    lo: np.ndarray
    is_foreground: bool
    class_value: Optional[int] = None
    voxel: Optional[np.ndarray] = None  # padded coordinates


class PatchSampler:
    """Lower corners of training patches, following the module's sampling semantics.

    Args:
        patch_size: P, one size per spatial axis.
        oversample_foreground: probability that a patch is a foreground patch (nnU-Net: 1/3).
        ignore_label: a label value that is never a foreground class (label maps only).

    Example:
        >>> sampler = PatchSampler((64, 64, 32))
        >>> loc = sampler.locations(label)                      # once per case
        >>> lo, is_fg = sampler.sample_lower_corner(loc, np.random.default_rng([0, 7]))
    """

    def __init__(self, patch_size: Sequence[int], oversample_foreground: float = 1 / 3,
                 ignore_label: Optional[int] = None):
        fn = "PatchSampler"
        self.patch_size = _int_tuple(fn, "patch_size", patch_size, minimum=1)
        p = float(oversample_foreground)
        if not 0.0 <= p <= 1.0:
            _fail(fn, "oversample_foreground", "a probability in [0, 1]", oversample_foreground)
        self.oversample_foreground = p
        if ignore_label is not None and int(ignore_label) != ignore_label:
            _fail(fn, "ignore_label", "an integer or None", ignore_label)
        self.ignore_label = None if ignore_label is None else int(ignore_label)

    def __repr__(self) -> str:
        return (f"PatchSampler(patch_size={self.patch_size}, oversample_foreground={self.oversample_foreground:g}, "
                f"ignore_label={self.ignore_label})")

    def locations(self, label: np.ndarray) -> CaseLocations:
        """Precompute padding and per-class voxel lists of one case.

        Args:
            label: (*S) integer label map, or (K, *S) multi-label stack (nonzero = inside), with as many
                spatial axes as ``patch_size``.

        Returns:
            :class:`CaseLocations`.
        """
        fn = "PatchSampler.locations"
        label = np.asarray(label)
        nd = len(self.patch_size)
        if label.ndim not in (nd, nd + 1) or not (np.issubdtype(label.dtype, np.integer) or label.dtype == bool):
            _fail(fn, "label", f"an integer label map with {nd} spatial axes or a (K, *spatial) stack",
                  _array_desc(label))
        shape = label.shape[label.ndim - nd:]
        index_dtype = np.int32 if np.prod(shape, dtype=np.float64) < 2 ** 31 else np.int64
        if label.ndim == nd + 1:
            classes, indices = [], []
            for k, channel in enumerate(label):
                flat = np.flatnonzero(channel)
                if flat.size:
                    classes.append(k + 1)
                    indices.append(flat.astype(index_dtype))
        else:
            classes, indices = self._label_map_indices(label.ravel(), index_dtype)
        padded = tuple(max(s, p) for s, p in zip(shape, self.patch_size))
        return CaseLocations(shape=tuple(shape), patch_size=self.patch_size, padded_shape=padded,
                             pad_before=tuple((q - s) // 2 for q, s in zip(padded, shape)),
                             classes=np.asarray(classes, dtype=np.int64), indices=tuple(indices))

    def _label_map_indices(self, flat: np.ndarray, index_dtype) -> tuple[list, list]:
        fg = flat != 0
        if self.ignore_label is not None:
            fg &= flat != self.ignore_label
        where = np.flatnonzero(fg)
        values = flat[where]
        # A stable sort keeps each class's voxel indices ascending.
        order = np.argsort(values, kind="stable")
        values, where = values[order], where[order]
        classes, starts = np.unique(values, return_index=True)
        bounds = list(starts) + [len(values)]
        indices = [where[a:b].astype(index_dtype) for a, b in zip(bounds[:-1], bounds[1:])]
        return [int(c) for c in classes], indices

    def _check(self, fn: str, locations: CaseLocations) -> None:
        if not isinstance(locations, CaseLocations) or locations.patch_size != self.patch_size:
            _fail(fn, "locations", f"CaseLocations computed for patch_size {self.patch_size}",
                  getattr(locations, "patch_size", type(locations).__name__))

    def sample(self, locations: CaseLocations, rng: np.random.Generator) -> PatchDraw:
        """Draw one patch (kind, lower corner, and for foreground patches the chosen class and voxel)."""
        self._check("PatchSampler.sample", locations)
        patch = np.asarray(self.patch_size)
        padded = np.asarray(locations.padded_shape)
        # The kind is always drawn first, so the stream layout does not depend on the case's content.
        wants_foreground = rng.random() < self.oversample_foreground
        if wants_foreground and len(locations.classes):
            k = int(rng.integers(len(locations.classes)))
            voxels = locations.indices[k]
            flat = int(voxels[rng.integers(len(voxels))])
            voxel = np.asarray(np.unravel_index(flat, locations.shape)) + np.asarray(locations.pad_before)
            lo = np.clip(voxel - patch // 2, 0, padded - patch)
            return PatchDraw(lo=lo.astype(np.int64), is_foreground=True,
                             class_value=int(locations.classes[k]), voxel=voxel.astype(np.int64))
        lo = rng.integers(0, padded - patch + 1)  # independent uniform per axis
        return PatchDraw(lo=np.asarray(lo, dtype=np.int64), is_foreground=False)

    def sample_lower_corner(self, locations: CaseLocations, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
        """Lower corner ``lo`` (padded coordinates) and whether it is a foreground patch.

        A foreground draw on a case without foreground is a random patch and reports False.
        """
        draw = self.sample(locations, rng)
        return draw.lo, draw.is_foreground


def _crop_filled(array: np.ndarray, lead: int, start: Sequence[int], size: Sequence[int],
                 fill) -> np.ndarray:
    """array[..., start:start+size] with the parts outside the array set to ``fill`` (per leading index)."""
    spatial = array.shape[lead:]
    out = np.empty(array.shape[:lead] + tuple(size), dtype=array.dtype)
    out[...] = fill
    src, dst = [], []
    for a, (s, n, q) in enumerate(zip(start, size, spatial)):
        lo, hi = max(s, 0), min(s + n, q)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(slice(None),) * lead + tuple(dst)] = array[(slice(None),) * lead + tuple(src)]
    return out


def extract_patch(image: Optional[np.ndarray], label: Optional[np.ndarray], lo: Sequence[int],
                  locations: CaseLocations, *, pad_value: Optional[np.ndarray] = None,
                  margin: Sequence[int] | int = 0) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Cut the patch [lo, lo + P) (padded coordinates) out of a case, padding as the semantics say.

    Args:
        image: (C, *S) array or None.
        label: (*S) label map, (K, *S) stack, or None.
        lo: lower corner in padded coordinates (from :meth:`PatchSampler.sample_lower_corner`).
        locations: the case's :class:`CaseLocations`.
        pad_value: (C,) image fill value; default the per-channel minimum of ``image`` (computed only when
            the patch reaches outside the case).
        margin: extra context on every side (for spatial augmentation, see ``Augmenter.context``); the
            returned arrays are P + 2 * margin wide, the patch at their centre. Beyond the padded case the
            same fill values are used.

    Returns:
        (image patch (C, *P') same dtype, label patch (*P') / (K, *P') same dtype), None where None was given.
    """
    fn = "extract_patch"
    nd = len(locations.shape)
    margin = np.broadcast_to(np.asarray(margin, dtype=np.int64), (nd,))
    lo = np.asarray(lo, dtype=np.int64)
    if lo.shape != (nd,):
        _fail(fn, "lo", f"{nd} integers", lo)
    start = lo - margin - np.asarray(locations.pad_before)
    size = np.asarray(locations.patch_size) + 2 * margin
    inside = bool(np.all(start >= 0) and np.all(start + size <= np.asarray(locations.shape)))
    image_patch = label_patch = None
    if image is not None:
        image = np.asarray(image)
        if image.ndim != nd + 1 or image.shape[1:] != locations.shape:
            _fail(fn, "image", f"a (C, {', '.join(map(str, locations.shape))}) array", _array_desc(image))
        if pad_value is None:
            pad_value = np.zeros(image.shape[0], image.dtype) if inside else \
                image.reshape(image.shape[0], -1).min(axis=1)
        fill = np.asarray(pad_value, dtype=image.dtype).reshape((-1,) + (1,) * nd)
        image_patch = _crop_filled(image, 1, start, size, fill)
    if label is not None:
        label = np.asarray(label)
        lead = label.ndim - nd
        if lead not in (0, 1) or label.shape[lead:] != locations.shape:
            _fail(fn, "label", f"spatial shape {locations.shape}", _array_desc(label))
        label_patch = _crop_filled(label, lead, start, size, 0)
    return image_patch, label_patch


class PatchDataset(Dataset):
    """Training patches drawn on the fly; item ``i`` is fully determined by ``(seed, i)``.

    Args:
        cases: sequence of (image (C, *S) float32, label (*S) label map or (K, *S) multi-label stack).
            A (*S) image is taken as one channel.
        patch_size: P per spatial axis.
        oversample_foreground: foreground patch probability (nnU-Net: 1/3).
        seed: run seed.
        augment: an ``Augmenter`` (or any callable ``(image, label, rng, out_shape=...) -> (image, label)``
            with a ``context(patch_size)`` method), or None.
        length: number of samples (e.g. iterations * batch_size); default: effectively unlimited.
        ignore_label: never a foreground class.

    Returns from ``dataset[i]``:
        (image (C, *P) float32 tensor, label (*P) int64 tensor — or (K, *P) uint8 for a multi-label stack).
    """

    def __init__(self, cases: Sequence[tuple[np.ndarray, np.ndarray]], patch_size: Sequence[int],
                 oversample_foreground: float = 1 / 3, seed: int = 0, augment=None,
                 length: Optional[int] = None, ignore_label: Optional[int] = None):
        fn = "PatchDataset"
        self.sampler = PatchSampler(patch_size, oversample_foreground, ignore_label)
        nd = len(self.sampler.patch_size)
        if len(cases) == 0:
            _fail(fn, "cases", "at least one (image, label) pair", cases)
        if int(seed) != seed or seed < 0:
            _fail(fn, "seed", "a non-negative integer", seed)
        self.seed = int(seed)
        if length is None:
            length = sys.maxsize
        if int(length) != length or length < 1:
            _fail(fn, "length", "a positive integer", length)
        self.length = int(length)
        self.augment = augment
        self.images, self.labels, self.locations, self.minima = [], [], [], []
        self.multilabel = None
        for k, (image, label) in enumerate(cases):
            image = np.asarray(image)
            image = image[None] if image.ndim == nd else image
            label = np.asarray(label)
            if image.ndim != nd + 1 or not np.issubdtype(image.dtype, np.floating):
                _fail(fn, f"cases[{k}] image", f"a float (C, *spatial) array with {nd} spatial axes",
                      _array_desc(image))
            if label.shape[label.ndim - nd:] != image.shape[1:] or label.ndim not in (nd, nd + 1):
                _fail(fn, f"cases[{k}] label", f"spatial shape {image.shape[1:]} to match its image",
                      _array_desc(label))
            stack = label.ndim == nd + 1
            if self.multilabel is not None and stack != self.multilabel:
                _fail(fn, f"cases[{k}] label", "the same kind (label map or stack) as cases[0]", _array_desc(label))
            self.multilabel = stack
            self.images.append(image.astype(np.float32, copy=False))
            self.labels.append(label)
            self.locations.append(self.sampler.locations(label))
            self.minima.append(image.reshape(image.shape[0], -1).min(axis=1).astype(np.float32))
        self.context = (tuple(int(m) for m in augment.context(self.sampler.patch_size))
                        if augment is not None and hasattr(augment, "context") else (0,) * nd)

    def __len__(self) -> int:
        return self.length

    def draw(self, index: int) -> tuple[int, PatchDraw, np.random.Generator]:
        """The case and patch of sample ``index``, and the generator positioned for augmentation."""
        rng = np.random.default_rng([self.seed, index])
        case = int(rng.integers(len(self.images)))
        return case, self.sampler.sample(self.locations[case], rng), rng

    def __getitem__(self, index: int):
        if int(index) != index or index < 0:
            raise IndexError(f"PatchDataset: index: expected a non-negative integer, got {index!r}")
        index = int(index)
        if index >= self.length:
            raise IndexError(f"PatchDataset: index: expected < {self.length}, got {index}")
        case, draw, rng = self.draw(index)
        image, label = extract_patch(self.images[case], self.labels[case], draw.lo, self.locations[case],
                                     pad_value=self.minima[case], margin=self.context)
        if self.augment is not None:
            image, label = self.augment(image, label, rng, out_shape=self.sampler.patch_size)
        image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        dtype = np.uint8 if self.multilabel else np.int64
        label = torch.from_numpy(np.ascontiguousarray(np.asarray(label) != 0 if self.multilabel else label,
                                                      dtype=dtype))
        return image, label


class IterationSampler(Sampler[int]):
    """Yields sample numbers of whole iterations from ``start_iteration`` on, in order.

    With ``num_replicas`` ranks of ``batch_size`` samples each, iteration t of rank r gets the global
    samples (t * num_replicas + r) * batch_size + b, b = 0 .. batch_size - 1 (with one rank:
    t * batch_size + b), so the union over ranks is the single-process stream of batch
    ``num_replicas * batch_size``. Only whole iterations fitting in ``length`` are yielded.
    """

    def __init__(self, length: int, batch_size: int, start_iteration: int = 0, rank: int = 0,
                 num_replicas: int = 1):
        self.batch_size, self.rank, self.num_replicas = batch_size, rank, num_replicas
        self.start_iteration = start_iteration
        self.num_iterations = max(0, length // (batch_size * num_replicas) - start_iteration)

    def __iter__(self) -> Iterator[int]:
        step = self.batch_size * self.num_replicas
        for t in range(self.start_iteration, self.start_iteration + self.num_iterations):
            first = t * step + self.rank * self.batch_size
            yield from range(first, first + self.batch_size)

    def __len__(self) -> int:
        return self.num_iterations * self.batch_size


def make_loader(dataset: PatchDataset, batch_size: int, *, start_iteration: int = 0, num_workers: int = 0,
                pin_memory: bool = False, persistent_workers: Optional[bool] = None,
                prefetch_factor: Optional[int] = None, rank: int = 0, num_replicas: int = 1) -> DataLoader:
    """DataLoader over ``dataset`` whose batch t is always samples t * batch_size ... (per rank, see
    :class:`IterationSampler`), starting at ``start_iteration``.

    All randomness comes from the sample number, so worker seeding and the number of workers do not
    matter, and resuming at iteration t yields exactly the batches t, t + 1, ... of an uninterrupted run.

    Args:
        dataset: a :class:`PatchDataset` (or any map-style dataset).
        batch_size: samples per batch (per rank).
        start_iteration: first iteration to yield.
        num_workers, pin_memory, prefetch_factor: as ``torch.utils.data.DataLoader``.
        persistent_workers: default True when there are workers.
        rank, num_replicas: this process's rank and the world size (DistributedDataParallel).

    Returns:
        A ``DataLoader`` yielding (images (B, C, *P), labels (B, *P)) batches.
    """
    fn = "make_loader"
    for name, value, low in (("batch_size", batch_size, 1), ("start_iteration", start_iteration, 0),
                             ("num_workers", num_workers, 0), ("num_replicas", num_replicas, 1),
                             ("rank", rank, 0)):
        if isinstance(value, bool) or int(value) != value or value < low:
            _fail(fn, name, f"an integer >= {low}", value)
    if rank >= num_replicas:
        _fail(fn, "rank", f"an integer < num_replicas ({num_replicas})", rank)
    sampler = IterationSampler(len(dataset), int(batch_size), int(start_iteration), int(rank), int(num_replicas))
    options = {}
    if num_workers > 0:
        options["persistent_workers"] = True if persistent_workers is None else bool(persistent_workers)
        if prefetch_factor is not None:
            options["prefetch_factor"] = int(prefetch_factor)
    return DataLoader(dataset, batch_size=int(batch_size), sampler=sampler, num_workers=int(num_workers),
                      pin_memory=pin_memory, drop_last=False, **options)
