"""Dataset descriptions (JSON or YAML): which cases, which organs with which label values, where the files are,
and how overlapping per-organ masks become one label map.

A description (relative paths resolve against the description file's folder)::

    name: phantom-hn
    modality: CT
    organs: [Brain, Brainstem, Parotid-Lt]   # label value = index + 1; or a mapping {Brain: 1, Brainstem: 2}
    image: images/{case}.nii.gz              # optional (mask-only datasets have no images)
    label: labels/{case}.nii.gz              # one label map per case ...
    masks: validation/oncologist/{case}/segmentations/{organ}.nrrd   # ... or one mask per organ
    priority: [Lens-Lt, Orbit-Lt]            # optional; earlier wins where masks overlap
    splits: {train: [case1, case2], test: [case3]}   # optional; else `cases: [...]`; else discovered

Overlapping masks (Lens inside Orbit, Spinal-Cord inside Spinal-Canal) become a label map by painting the
organs in priority order, each only where no earlier organ is: organs listed in ``priority`` first, in that
order, then the others from the smallest voxel count in that case to the largest (small over large, so the
small structure is not erased by the large one that contains it). ``multilabel=True`` keeps every mask instead,
as a ``(C, *spatial)`` 0/1 stack for sigmoid training.
"""
from __future__ import annotations

import glob
import json
import os
import re
import string
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from fastseg.data.io import Image, atomic_output, read_image

__all__ = [
    "DatasetSpec",
    "Case",
    "masks_to_label_map",
    "label_map_to_masks",
    "check_geometry",
    "normalize_organs",
    "write_dataset_description",
    "DESCRIPTION_SUFFIXES",
]

PathLike = Union[str, os.PathLike]
Organs = Union[Sequence[str], Mapping[str, int]]

DESCRIPTION_SUFFIXES = (".json", ".yaml", ".yml")
_KEYS = ("name", "modality", "organs", "image", "label", "masks", "priority", "splits", "cases")
_PATTERN_FIELDS = {"image": ("case",), "label": ("case",), "masks": ("case", "organ")}
_MAX_LABEL = np.iinfo(np.int16).max  # label maps are uint8 or int16
_SPACING_RTOL = 1e-3


def _fail(where: str, name: str, expected: str, got) -> None:
    raise ValueError(f"{where}: {name}: expected {expected}, got {got!r}")


def _known(names) -> str:
    return ", ".join(names)


def _check_known_organs(where: str, name: str, names, known: Sequence[str]) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{where}: {name}: unknown organ name(s) {unknown}; the known organs are: {_known(known)}")


def _label_dtype(label_values: Mapping[str, int]) -> np.dtype:
    return np.dtype(np.uint8) if max(label_values.values(), default=0) < 256 else np.dtype(np.int16)


# ------------------------------------------------------------------------------------------- organs


def normalize_organs(organs: Organs, *, where: str = "organs") -> Dict[str, int]:
    """Organ name -> label value, in the given order.

    Args:
        organs: a sequence of names (label value = position + 1) or a mapping name -> label value.
        where: prefix of the error messages.

    Returns:
        dict name -> label value (ints in [1, 32767], all distinct, names distinct and non-empty).
    """
    if isinstance(organs, Mapping):
        items = list(organs.items())
    elif isinstance(organs, (list, tuple)):
        items = [(name, i + 1) for i, name in enumerate(organs)]
    else:
        _fail(where, "organs", "a list of organ names or a mapping organ name -> label value", organs)
    if not items:
        _fail(where, "organs", "at least one organ", organs)
    out: Dict[str, int] = {}
    by_value: Dict[int, str] = {}
    for name, value in items:
        if not isinstance(name, str) or not name.strip():
            _fail(where, "organs", "non-empty strings as organ names", name)
        if name in out:
            raise ValueError(f"{where}: organs: duplicate organ {name!r}")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= _MAX_LABEL:
            _fail(where, f"organs[{name!r}]", f"a label value, an int in [1, {_MAX_LABEL}] (0 is background)", value)
        if int(value) in by_value:
            raise ValueError(f"{where}: organs: label value {int(value)} given to both {by_value[int(value)]!r} "
                             f"and {name!r}")
        out[name] = int(value)
        by_value[int(value)] = name
    return out


# ------------------------------------------------------------------------------------------- label maps


def _paint_order(counts: Mapping[str, int], label_values: Mapping[str, int],
                 priority: Optional[Sequence[str]]) -> List[str]:
    """Organs of ``counts`` from the one that wins overlaps to the one that loses them."""
    listed = [name for name in (priority or ()) if name in counts]
    rank = {name: i for i, name in enumerate(label_values)}
    rest = sorted((n for n in counts if n not in listed), key=lambda n: (counts[n], rank[n]))
    return listed + rest


def masks_to_label_map(
    masks: Mapping[str, np.ndarray],
    label_values: Mapping[str, int],
    priority: Optional[Sequence[str]] = None,
) -> np.ndarray:
    """One label map from per-organ binary masks that may overlap.

    Args:
        masks: organ name -> mask (bool, or numbers where nonzero is inside), all of one shape.
        label_values: organ name -> label value (e.g. ``DatasetSpec.label_values``); every key of ``masks``
            must be one of its organs.
        priority: organ names; where masks overlap, an organ listed earlier wins. Organs not listed come after
            the listed ones, the smaller (voxel count in ``masks``) before the larger.

    Returns:
        label map of the masks' shape, 0 = background: uint8 if every label value is < 256, else int16.

    Example:
        >>> orbit = np.zeros((8, 8, 8), bool); orbit[2:6, 2:6, 2:6] = True
        >>> lens = np.zeros_like(orbit); lens[3:5, 3:5, 3:5] = True
        >>> lm = masks_to_label_map({"Orbit-Lt": orbit, "Lens-Lt": lens}, {"Lens-Lt": 1, "Orbit-Lt": 2})
        >>> int(lm[4, 4, 4]), int(lm[2, 2, 2])
        (1, 2)
    """
    where = "masks_to_label_map"
    values = normalize_organs(dict(label_values), where=where)
    if not isinstance(masks, Mapping) or not masks:
        _fail(where, "masks", "a non-empty mapping organ name -> mask", masks)
    _check_known_organs(where, "masks", list(masks), list(values))
    if priority is not None:
        if isinstance(priority, str) or not isinstance(priority, Sequence):
            _fail(where, "priority", "a sequence of organ names", priority)
        _check_known_organs(where, "priority", priority, list(values))
    arrays = {name: np.asarray(m) for name, m in masks.items()}
    shape = next(iter(arrays.values())).shape
    for name, m in arrays.items():
        if m.shape != shape:
            _fail(where, f"masks[{name!r}]", f"the shape of the first mask {shape}", f"shape {m.shape}")
    inside = {name: m if m.dtype == np.bool_ else m != 0 for name, m in arrays.items()}
    counts = {name: int(np.count_nonzero(m)) for name, m in inside.items()}
    # the first mask's memory order: painting a Fortran-ordered mask into a C-ordered map is a slow transpose
    label = np.zeros_like(next(iter(inside.values())), dtype=_label_dtype(values))
    # painting from the lowest priority up lets each winner simply overwrite
    for name in reversed(_paint_order(counts, values, priority)):
        np.copyto(label, values[name], where=inside[name])
    return label


def label_map_to_masks(label: np.ndarray, label_values: Mapping[str, int]) -> np.ndarray:
    """Per-organ 0/1 masks from a label map.

    Args:
        label: integer label map (integral floats accepted), 0 = background.
        label_values: organ name -> label value; every nonzero value of ``label`` must be one of them.

    Returns:
        ``(C, *label.shape)`` uint8, channel ``c`` the ``c``-th organ of ``label_values``.
    """
    where = "label_map_to_masks"
    values = normalize_organs(dict(label_values), where=where)
    label = _integer_labels(where, "label", np.asarray(label))
    _check_label_values(where, "label", label, values)
    out = _channel_stack(label.shape, len(values), label)
    for c, v in enumerate(values.values()):
        np.equal(label, v, out=out[c].view(np.bool_))
    return out


def _integer_labels(where: str, name: str, label: np.ndarray) -> np.ndarray:
    if label.dtype == np.bool_:
        return label.astype(np.uint8)
    if label.dtype.kind in "iu":
        return label
    if label.dtype.kind == "f" and np.all(np.isfinite(label)) and np.all(label == np.round(label)):
        return label.astype(np.int32)
    _fail(where, name, "an integer label map", f"dtype {label.dtype} with non-integer values")


def _value_counts(label: np.ndarray, minlength: int = 1) -> np.ndarray:
    """Voxel count of each value 0 .. max of a non-negative integer label map (values <= 32767).
    torch.bincount reads uint8 / int16 as they are, where np.bincount would first copy the volume to int64."""
    flat = label.ravel(order="K")  # a view for C- or Fortran-contiguous arrays
    if flat.dtype == np.bool_:
        flat = flat.view(np.uint8)
    if flat.dtype not in (np.uint8, np.int8, np.int16, np.int32, np.int64):
        flat = flat.astype(np.int32)
    return torch.bincount(torch.from_numpy(np.ascontiguousarray(flat)), minlength=minlength).numpy()


def _present_values(label: np.ndarray) -> List[int]:
    """Distinct values of an integer label map; counted rather than sorted (np.unique's sort takes seconds on
    a CT-sized volume)."""
    if label.size == 0:
        return []
    lo, hi = int(label.min()), int(label.max())
    if lo >= 0 and hi <= _MAX_LABEL:
        return np.flatnonzero(_value_counts(label)).tolist()
    return [int(v) for v in np.unique(label)]


def _check_label_values(where: str, name: str, label: np.ndarray, values: Mapping[str, int]) -> None:
    unknown = sorted(set(_present_values(label)) - {0} - set(values.values()))
    if unknown:
        table = ", ".join(f"{k}={v}" for k, v in values.items())
        raise ValueError(f"{where}: {name}: label values {unknown[:20]} are not organs' label values "
                         f"(0 = background, {table})")


def _channel_stack(shape: Tuple[int, ...], count: int, like: np.ndarray) -> np.ndarray:
    """An empty (count, *shape) uint8 stack whose channels have ``like``'s memory order (Fortran-ordered
    channels for arrays read from files), so that filling a channel from a mask is not a transpose."""
    if like.flags.f_contiguous and not like.flags.c_contiguous:
        return np.moveaxis(np.empty(shape + (count,), dtype=np.uint8, order="F"), -1, 0)
    return np.empty((count,) + shape, dtype=np.uint8)


def check_geometry(reference: Image, other: Image, *, what: str) -> None:
    """Raise ValueError unless ``other`` has the spatial shape and (within 1e-3 relative) the spacing of
    ``reference``.

    Args:
        reference, other: the images compared (channel axes are ignored).
        what: names the two, other first, e.g. ``"label 'x/seg.nrrd' vs image 'x/ct.nii.gz'"``; it starts
            the message, followed by both shapes or both spacings in the same order.
    """
    if reference.shape != other.shape:
        raise ValueError(f"{what}: shapes differ: {other.shape} vs {reference.shape}")
    r, o = np.asarray(reference.spacing), np.asarray(other.spacing)
    if np.any(np.abs(o - r) > _SPACING_RTOL * np.abs(r)):
        raise ValueError(f"{what}: spacings differ by more than {_SPACING_RTOL:g} relative: "
                         f"{tuple(round(v, 6) for v in other.spacing)} mm vs "
                         f"{tuple(round(v, 6) for v in reference.spacing)} mm")


# ------------------------------------------------------------------------------------------- loading files


class _UniqueKeyLoader:
    """A yaml.SafeLoader subclass that refuses duplicate mapping keys (PyYAML keeps the last one silently,
    which would drop an organ). Built lazily so that importing fastseg.data does not need PyYAML."""

    _cls = None

    @classmethod
    def get(cls):
        if cls._cls is None:
            import yaml

            class Loader(yaml.SafeLoader):
                pass

            def construct_mapping(loader, node, deep=False):
                seen = set()
                for key_node, _ in node.value:
                    key = loader.construct_object(key_node, deep=deep)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r}", key_node.start_mark)
                    seen.add(key)
                return loader.construct_mapping(node, deep=deep)

            Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
            cls._cls = Loader
        return cls._cls


def _json_pairs(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _parse_description(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in DESCRIPTION_SUFFIXES:
        _fail("DatasetSpec.load", "path", "a .json, .yaml or .yml dataset description", str(path))
    if not path.is_file():
        raise FileNotFoundError(f"DatasetSpec.load: path: no such file: {str(path)!r}")
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            return json.loads(text, object_pairs_hook=_json_pairs)
        except ValueError as err:
            raise ValueError(f"dataset description {str(path)!r}: not valid JSON: {err}") from err
    import yaml

    try:
        return yaml.load(text, Loader=_UniqueKeyLoader.get())
    except yaml.YAMLError as err:
        raise ValueError(f"dataset description {str(path)!r}: not valid YAML: {err}") from err


def _pattern_fields(where: str, key: str, pattern) -> None:
    if not isinstance(pattern, str) or not pattern.strip():
        _fail(where, key, "a path pattern string", pattern)
    required = _PATTERN_FIELDS[key]
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as err:
        _fail(where, key, f"a path pattern with placeholders {{{'}, {'.join(required)}}} ({err})", pattern)
    fields = set()
    for _, field_name, spec, conversion in parsed:
        if field_name is None:
            continue
        if field_name not in required or spec or conversion:
            _fail(where, key, "placeholders " + " and ".join(f"{{{f}}}" for f in required) + " only", pattern)
        fields.add(field_name)
    missing = [f for f in required if f not in fields]
    if missing:
        _fail(where, key, "a path pattern containing " + " and ".join(f"{{{f}}}" for f in required), pattern)


def _case_names(where: str, name: str, value) -> List[str]:
    if not isinstance(value, (list, tuple)):
        _fail(where, name, "a list of case names", value)
    for case in value:
        if not isinstance(case, str) or not case or "/" in case or "\\" in case:
            _fail(where, name, "case names as non-empty strings without '/' (quote names such as 001 in YAML)",
                  case)
    duplicates = sorted({c for c in value if list(value).count(c) > 1})
    if duplicates:
        raise ValueError(f"{where}: {name}: duplicate case(s) {duplicates}")
    return list(value)


@dataclass
class Case:
    """One loaded case.

    Attributes:
        name: the case name.
        image: the image, or None for a dataset without images.
        label: geometry of the label file(s); array: the label map (uint8 if every label value is < 256, else
            int16) or, loaded with ``multilabel=True``, a ``(C, *spatial)`` uint8 0/1 stack in organ order.
    """

    name: str
    image: Optional[Image]
    label: Image


class DatasetSpec:
    """A validated dataset description; see the module docstring for the format.

    Args:
        organs: organ names (label value = position + 1) or a mapping name -> label value.
        name, modality: free text (name defaults to the root folder's name).
        image, label, masks: path patterns with ``{case}`` (and ``{organ}`` for masks), relative to ``root``;
            exactly one of ``label`` and ``masks``.
        priority: organs winning overlaps, first wins (see :func:`masks_to_label_map`).
        splits: split name -> case names. cases: the case names. Without either, the cases are discovered
            by globbing the first pattern (image, else label, else masks).
        root: the folder relative paths resolve against (the description file's folder).
        source: where the description came from, for error messages.

    Example:
        >>> spec = DatasetSpec.load("data/phantom/dataset.yaml")
        >>> case = spec.load_case(spec.cases("test")[0])
        >>> case.label.array.shape, spec.organs[:2]
    """

    def __init__(
        self,
        *,
        organs: Organs,
        name: Optional[str] = None,
        modality: Optional[str] = None,
        image: Optional[str] = None,
        label: Optional[str] = None,
        masks: Optional[str] = None,
        priority: Optional[Sequence[str]] = None,
        splits: Optional[Mapping[str, Sequence[str]]] = None,
        cases: Optional[Sequence[str]] = None,
        root: PathLike = ".",
        source: Optional[str] = None,
    ):
        where = f"dataset description {source!r}" if source else "DatasetSpec"
        self.where = where
        self.root = Path(root)
        self.label_values = normalize_organs(organs, where=where)
        for key, value in (("name", name), ("modality", modality)):
            if value is not None and not isinstance(value, str):
                _fail(where, key, "a string", value)
        self.name = name if name is not None else self.root.resolve().name
        self.modality = modality
        if (label is None) == (masks is None):
            _fail(where, "label/masks", "exactly one of 'label' (one label map per case) and 'masks' (one mask "
                  "per organ per case)", "both" if label is not None else "neither")
        for key, value in (("image", image), ("label", label), ("masks", masks)):
            if value is not None:
                _pattern_fields(where, key, value)
        self.image, self.label, self.masks = image, label, masks
        self.priority = self._checked_priority(priority)
        self._explicit_cases = None if cases is None else _case_names(where, "cases", cases)
        self.splits = self._checked_splits(splits)
        self._cases: Optional[List[str]] = None

    # ---------------------------------------------------------------- construction

    def _checked_priority(self, priority) -> Optional[List[str]]:
        if priority is None:
            return None
        if isinstance(priority, str) or not isinstance(priority, (list, tuple)):
            _fail(self.where, "priority", "a list of organ names", priority)
        _check_known_organs(self.where, "priority", priority, self.organs)
        duplicates = sorted({n for n in priority if list(priority).count(n) > 1})
        if duplicates:
            raise ValueError(f"{self.where}: priority: duplicate organ(s) {duplicates}")
        return list(priority)

    def _checked_splits(self, splits) -> Optional[Dict[str, List[str]]]:
        if splits is None:
            return None
        if not isinstance(splits, Mapping) or not splits:
            _fail(self.where, "splits", "a mapping split name -> list of case names", splits)
        out = {}
        for split, names in splits.items():
            if not isinstance(split, str) or not split:
                _fail(self.where, "splits", "split names as non-empty strings", split)
            out[split] = _case_names(self.where, f"splits[{split!r}]", names)
            if self._explicit_cases is not None:
                unknown = [c for c in out[split] if c not in self._explicit_cases]
                if unknown:
                    raise ValueError(f"{self.where}: splits[{split!r}]: unknown case(s) {unknown}, not in `cases`")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], root: PathLike = ".", source: Optional[str] = None) -> "DatasetSpec":
        """Validate a parsed description (unknown keys are an error) whose relative paths resolve against
        ``root``."""
        where = f"dataset description {source!r}" if source else "DatasetSpec"
        if not isinstance(data, Mapping):
            _fail(where, "top level", "a mapping with keys " + ", ".join(_KEYS), type(data).__name__)
        unknown = [k for k in data if k not in _KEYS]
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; the known keys are: {', '.join(_KEYS)}")
        if "organs" not in data:
            raise ValueError(f"{where}: organs: missing (a list of organ names or a mapping name -> label value)")
        return cls(**dict(data), root=root, source=source)

    @classmethod
    def load(cls, path: PathLike) -> "DatasetSpec":
        """Read and validate a ``.json``, ``.yaml`` or ``.yml`` description."""
        path = Path(path)
        data = _parse_description(path)
        return cls.from_dict(data, root=path.parent, source=str(path))

    def to_dict(self, root: Optional[PathLike] = None) -> Dict[str, Any]:
        """The description as plain data; relative patterns rewritten relative to ``root`` when given."""
        def moved(pattern):
            if pattern is None or root is None or Path(pattern).is_absolute():
                return pattern
            return os.path.relpath(os.path.join(os.path.abspath(self.root), pattern), os.path.abspath(root))

        values = self.label_values
        organs: Any = self.organs if list(values.values()) == list(range(1, len(values) + 1)) else dict(values)
        out: Dict[str, Any] = {"name": self.name}
        if self.modality is not None:
            out["modality"] = self.modality
        out["organs"] = organs
        for key in ("image", "label", "masks"):
            pattern = moved(getattr(self, key))
            if pattern is not None:
                out[key] = pattern
        if self.priority is not None:
            out["priority"] = list(self.priority)
        if self.splits is not None:
            out["splits"] = {k: list(v) for k, v in self.splits.items()}
        if self._explicit_cases is not None:
            out["cases"] = list(self._explicit_cases)
        return out

    def save(self, path: PathLike) -> Path:
        """Write the description (JSON or YAML by suffix) atomically; relative patterns are rewritten to stay
        valid from the new file's folder."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in DESCRIPTION_SUFFIXES:
            _fail("DatasetSpec.save", "path", "a .json, .yaml or .yml file", str(path))
        data = self.to_dict(root=path.parent)
        if suffix == ".json":
            text = json.dumps(data, indent=2) + "\n"
        else:
            import yaml

            text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
        with atomic_output(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path

    # ---------------------------------------------------------------- queries

    @property
    def organs(self) -> List[str]:
        """Organ names in order (the channel order of multi-label targets)."""
        return list(self.label_values)

    @property
    def num_classes(self) -> int:
        """Largest label value + 1 (classes of a label map, background included)."""
        return max(self.label_values.values()) + 1

    def cases(self, split: Optional[str] = None) -> List[str]:
        """Case names: of ``split``, or all (``cases``, else the splits' union, else discovered on disk)."""
        if split is not None:
            if self.splits is None:
                raise ValueError(f"{self.where}: split {split!r} requested but the description has no splits")
            if split not in self.splits:
                raise ValueError(f"{self.where}: unknown split {split!r}; the splits are: {_known(self.splits)}")
            return list(self.splits[split])
        if self._cases is None:
            if self._explicit_cases is not None:
                self._cases = list(self._explicit_cases)
            elif self.splits is not None:
                self._cases = list(dict.fromkeys(c for names in self.splits.values() for c in names))
            else:
                self._cases = self._discover()
        return list(self._cases)

    def _resolve(self, pattern: str, **fields) -> Path:
        path = Path(pattern.format(**fields))
        return path if path.is_absolute() else self.root / path

    def _discover(self) -> List[str]:
        key = "image" if self.image else ("label" if self.label else "masks")
        pattern = getattr(self, key)
        organ = self.organs[0]
        full = pattern if Path(pattern).is_absolute() else os.path.join(str(self.root), pattern)
        glob_parts, regex_parts = [], []
        for literal, field_name, _, _ in string.Formatter().parse(full):
            glob_parts.append(glob.escape(literal))
            regex_parts.append(re.escape(literal))
            if field_name == "case":
                glob_parts.append("*")
                regex_parts.append("(?P=case)" if "(?P<case>" in "".join(regex_parts) else r"(?P<case>[^/\\]+)")
            elif field_name == "organ":
                glob_parts.append(glob.escape(organ))
                regex_parts.append(re.escape(organ))
        regex = re.compile("".join(regex_parts) + r"\Z")
        found = sorted({m.group("case") for m in map(regex.match, glob.glob("".join(glob_parts))) if m})
        if not found:
            raise ValueError(f"{self.where}: no case found: nothing matches {key} pattern {full!r} (give `cases` "
                             f"or `splits` to list them)")
        return found

    @property
    def image_pattern(self) -> Optional[str]:
        """The ``image`` pattern (None for a dataset without images)."""
        return self.image

    def image_path(self, case: str) -> Optional[Path]:
        """The image file of ``case`` (None for a dataset without images)."""
        return self.case_paths(case)["image"]

    def case_paths(self, case: str) -> Dict[str, Any]:
        """``{'image': Path | None, 'label': Path}`` or ``{'image': ..., 'masks': {organ: Path}}``."""
        self._check_case(case)
        out: Dict[str, Any] = {"image": self._resolve(self.image, case=case) if self.image else None}
        if self.label is not None:
            out["label"] = self._resolve(self.label, case=case)
        else:
            out["masks"] = {o: self._resolve(self.masks, case=case, organ=o) for o in self.organs}
        return out

    def _check_case(self, case: str) -> None:
        known = self.cases()
        if case not in known:
            shown = ", ".join(known[:20]) + (f", ... ({len(known)} cases)" if len(known) > 20 else "")
            raise ValueError(f"{self.where}: unknown case {case!r}; the cases are: {shown}")

    # ---------------------------------------------------------------- loading

    def load_case(self, case: str, *, multilabel: bool = False) -> Case:
        """Read one case's image (if any) and label.

        Args:
            case: a name from :meth:`cases`.
            multilabel: False: a label map (overlapping masks resolved by priority). True: a
                ``(C, *spatial)`` uint8 0/1 stack in organ order (every mask kept).

        Returns:
            :class:`Case`. Raises FileNotFoundError for a missing file, ValueError (ImageFormatError for a
            corrupt file) for unknown label values, non-binary masks or shape / spacing mismatches (every mask
            against the first, the label against the image).
        """
        paths = self.case_paths(case)
        label, label_path = self._read_label(paths, multilabel)
        image = read_image(paths["image"]) if paths["image"] is not None else None
        if image is not None:
            check_geometry(image, label, what=f"case {case!r}: label {str(label_path)!r} vs image "
                                              f"{str(paths['image'])!r}")
        return Case(case, image, label)

    def load_label(self, case: str, *, multilabel: bool = False) -> Image:
        """The label of :meth:`load_case` alone (the image is not read)."""
        return self._read_label(self.case_paths(case), multilabel)[0]

    def _read_label(self, paths: Mapping[str, Any], multilabel: bool) -> Tuple[Image, Path]:
        if not isinstance(multilabel, bool):
            _fail(self.where, "multilabel", "True or False", multilabel)
        if self.label is not None:
            return self._read_label_map(paths["label"], multilabel)
        return self._read_masks(paths["masks"], multilabel)

    def _read_label_map(self, path: Path, multilabel: bool) -> Tuple[Image, Path]:
        img = read_image(path)
        where = f"label map {str(path)!r}"
        array = _integer_labels(where, "values", img.array)
        _check_label_values(where, "values", array, self.label_values)
        if multilabel:
            return img.with_array(label_map_to_masks(array, self.label_values)), path
        return img.with_array(array.astype(_label_dtype(self.label_values), copy=False)), path

    def _read_masks(self, paths: Mapping[str, Path], multilabel: bool) -> Tuple[Image, Path]:
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.where}: missing mask file(s): {missing}")
        first_path = next(iter(paths.values()))
        reference = None
        masks = {}
        # one file per organ: reading is mostly zlib inflating (it releases the GIL), so threads overlap it
        with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
            images = list(pool.map(read_image, paths.values()))
        for (organ, path), img in zip(paths.items(), images):
            if reference is None:
                reference = img
            else:
                check_geometry(reference, img, what=f"mask {str(path)!r} vs mask {str(first_path)!r}")
            masks[organ] = _binary(path, img.array)
        if multilabel:
            stack = _channel_stack(reference.shape, len(masks), reference.array)
            for c, organ in enumerate(self.organs):
                stack[c] = masks[organ]
            return reference.with_array(stack), first_path
        return reference.with_array(masks_to_label_map(masks, self.label_values, self.priority)), first_path


def _binary(path: Path, array: np.ndarray) -> np.ndarray:
    """Inside = nonzero; a mask with several nonzero values is refused (it would be a label map)."""
    if array.dtype == np.bool_ or array.size == 0:
        return array != 0
    lo, hi = array.min(), array.max()
    if array.dtype.itemsize == 1 and lo >= 0 and hi <= 1:
        return array.view(np.bool_)  # the usual 0/1 uint8 mask: no new 40 MB array
    inside = array != 0
    # the nonzero values are all one value iff their extremes agree
    hi_nz = np.max(array, where=inside, initial=lo)
    lo_nz = np.min(array, where=inside, initial=hi)
    if inside.any() and hi_nz != lo_nz:
        raise ValueError(f"mask {str(path)!r}: expected a binary mask (0 and one nonzero value), got nonzero "
                         f"values from {lo_nz} to {hi_nz}")
    return inside


def write_dataset_description(path: PathLike, *, organs: Organs, **fields) -> DatasetSpec:
    """Validate and write a description whose patterns are relative to ``path``'s folder; returns the spec.

    Example:
        >>> write_dataset_description("data/dataset.json", name="phantom", modality="CT", organs=["Brain"],
        ...                           image="images/{case}.nii.gz", label="labels/{case}.nii.gz")
    """
    path = Path(path)
    unknown = [k for k in fields if k not in _KEYS]
    if unknown:
        raise ValueError(f"write_dataset_description: unknown key(s) {unknown}; the known keys are: "
                         f"{', '.join(_KEYS)}")
    spec = DatasetSpec(organs=organs, root=path.parent, **fields)
    spec.save(path)
    return spec
