"""A disk cache of preprocessed cases, so that a second training run on the same data skips reading and
resampling them (nnU-Net's "preprocessed" folder, but filled on first use and keyed automatically).

Two kinds of entry per case, both keyed by a fingerprint of the case's source files (path, size and mtime of
the image and of every label file) and of how they are read (label values, priority, multi-label):

* ``<case>-<source>.json``: the raw image's spacing and direction. The trainer needs the median spacing and the
  lateral axis of all training cases before it can preprocess any of them; with these it reads no image.
* ``<case>-<source>-<prep>.npz``: the preprocessed image and label, ``prep`` a fingerprint of the target spacing,
  the CT window and the fastseg preprocessing version.

A changed file, spacing or window therefore misses and writes new entries; nothing is ever overwritten in
place (every write is atomic) and stale entries are simply no longer read. A corrupt entry (a killed process
cannot leave one, a full disk or a hand edit can) is read as a miss and rewritten.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from fastseg import _atomic

__all__ = ["CaseCache"]

# Bump when preprocess_case or the class renumbering changes what a cached case holds.
PREPROCESSING_VERSION = 1


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _stat(path: Path) -> List[Any]:
    st = path.stat()  # FileNotFoundError here names the missing file, as reading it would
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


class CaseCache:
    """The cache folder of one dataset description, read as ``multilabel`` or not.

    Example:
        >>> cache = CaseCache("runs/cache", spec, multilabel=False)
        >>> meta = cache.meta("case_000", load)          # {"spacing": [...], "direction": [[...]]}
        >>> image, label = cache.prepared("case_000", key, make)
    """

    def __init__(self, root: Union[str, Path], spec, *, multilabel: bool):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"TrainConfig: cache_dir: expected a folder, got the file {str(self.root)!r}")
        self.spec = spec
        self.multilabel = multilabel

    def source_key(self, case: str) -> str:
        paths = self.spec.case_paths(case)
        files = [_stat(paths["image"])] if paths["image"] is not None else []
        if "label" in paths:
            files.append(_stat(paths["label"]))
        else:
            files += [_stat(p) for p in paths["masks"].values()]
        return _digest({"case": case, "files": files, "multilabel": self.multilabel,
                        "label_values": dict(self.spec.label_values),
                        "priority": list(getattr(self.spec, "priority", None) or [])})

    @staticmethod
    def prep_key(spacing: Sequence[float], window: Sequence[float], label_values: Optional[Sequence[int]]) -> str:
        return _digest({"spacing": [float(s) for s in spacing], "window": [float(w) for w in window],
                        "label_values": None if label_values is None else [int(v) for v in label_values],
                        "version": PREPROCESSING_VERSION})

    def meta(self, case: str, load: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
        """The cached ``{"spacing", "direction"}`` of ``case``, or ``load()``'s, written to the cache."""
        path = self.root / f"{case}-{self.source_key(case)}.json"
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and {"spacing", "direction"} <= set(data):
                return data
        except (OSError, ValueError):
            pass
        data = load()
        _atomic.write_text(path, json.dumps(data))
        return data

    def prepared(self, case: str, prep_key: str,
                 make: Callable[[], Tuple[np.ndarray, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray]:
        """The cached ``(image, label)`` of ``case`` preprocessed as ``prep_key`` says, or ``make()``'s."""
        path = self.root / f"{case}-{self.source_key(case)}-{prep_key}.npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                return data["image"], data["label"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            pass
        image, label = make()
        with _atomic.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
                np.savez(f, image=image, label=label)
        return image, label
