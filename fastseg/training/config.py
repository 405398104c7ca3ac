"""TrainConfig: every setting of the reference trainer, loadable from YAML / JSON and overridable by CLI flags.

A config is plain data (numbers, strings, lists), so it is stored verbatim in checkpoints and read back with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

_CHOICES = {
    "optimizer": ("adamw", "sgd"),
    "activation": ("softmax", "sigmoid"),
    "absent_classes": ("keep", "ignore"),
    "device": ("auto", "cpu", "cuda"),
}


@dataclass
class TrainConfig:
    """Settings of :class:`fastseg.training.Trainer`.

    Data:
        dataset: dataset description file (JSON / YAML, see ``fastseg.data.dataset``).
        output_dir: where checkpoints, logs and plots go.
        train_split, val_split: split names in the description; with no ``val_split`` in it, the last
            ``val_cases`` training cases are held out for validation (0: no validation).
        target_spacing: resample every case to this spacing (mm, array order); None keeps the median spacing
            of the training cases.
        window: CT window (HU) clipped before normalisation.
        patch_size: training patch (voxels, array order), or "auto" for the class-imbalance recommendation
            (``fastseg imbalance``): the best-balanced shape of any aspect whose estimated training memory uses
            85-100 % of ``memory_budget_gb`` (fastseg.imbalance.recommend_patch_size) and, if set, whose patches
            show every organ at least ``min_coverage`` of itself (fastseg.imbalance's organ coverage).
        oversample_foreground: probability that a patch is centred on a voxel of a present organ (nnU-Net: 1/3).
        cache_dir: folder of preprocessed cases (fastseg.training.cache), filled on first use and read by later
            runs on the same files with the same spacing and window; None: every run reads and preprocesses.
    Model: ``base_features``, ``max_features`` of ``fastseg.models.UNet.from_patch_size``; ``deep_supervision``.
    Loss: fastseg.DiceCELoss with ``activation``, ``absent_classes`` ('ignore' = class adaptive Dice of
        Tappeiner et al. 2022), ``include_background``, ``batch_dice``, ``lambda_dice``, ``lambda_ce``,
        ``absent_penalty``. With activation 'sigmoid' the target is the multi-label organ stack (overlaps kept).
    Optimisation: ``optimizer`` 'adamw' | 'sgd' (nesterov, momentum 0.99 as nnU-Net), ``lr``, ``weight_decay``,
        poly schedule ``(1 - it / iterations) ** poly_exponent``, ``grad_clip`` (max L2 norm; 0 = off).
    Run: ``iterations``, ``batch_size``, ``val_every`` / ``checkpoint_every`` (iterations; 0 = only at the
        end), ``num_workers`` (DataLoader), ``seed``, ``deterministic`` (torch deterministic algorithms),
        ``device``, ``amp`` (bf16 autocast, CUDA only), ``sw_overlap`` (validation sliding window).
    Augmentation: ``augment`` (nnU-Net's transforms, fastseg.data.augment); ``lateral_pairs``: left / right
        organ pairs whose labels are swapped when a patch is mirrored along the patient's left-right axis
        (found from the images' direction) — 'auto' pairs names that differ by a side token (Parotid-Lt /
        Parotid-Rt), a list of [left, right] names sets them, 'none' mirrors without swapping (nnU-Net's
        behaviour, which leaves the network unable to tell left from right organs).
    Cascade (``fastseg.training.cascade``, softmax only): ``cascade`` trains two stages, all organs at
        ``cascade_coarse_spacing`` (None: twice the target spacing), then the small organs at the target
        spacing inside a crop around stage one's prediction grown by ``cascade_margin_mm``, with stage one's
        probabilities of them as extra input channels. Small organs: ``cascade_small_organs`` (names), or
        by default those whose median volume over the training cases is below ``cascade_max_volume_ml``.
    """

    dataset: str = ""
    output_dir: str = "runs/train"
    train_split: str = "train"
    val_split: Optional[str] = "val"
    val_cases: int = 1
    target_spacing: Optional[List[float]] = None
    window: List[float] = field(default_factory=lambda: [-1000.0, 1600.0])
    patch_size: Union[List[int], str] = field(default_factory=lambda: [96, 96, 48])
    memory_budget_gb: float = 8.0
    min_coverage: Optional[float] = None
    oversample_foreground: float = 1.0 / 3.0
    cache_dir: Optional[str] = None
    base_features: int = 16
    max_features: int = 256
    deep_supervision: bool = True
    activation: str = "softmax"
    absent_classes: str = "ignore"
    include_background: bool = False
    batch_dice: bool = False
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    absent_penalty: float = 0.0
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    iterations: int = 1000
    batch_size: int = 2
    val_every: int = 250
    checkpoint_every: int = 250
    num_workers: int = 2
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: bool = True
    sw_overlap: float = 0.5
    augment: bool = True
    lateral_pairs: Union[str, List[List[str]]] = "auto"
    cascade: bool = False
    cascade_small_organs: Optional[List[str]] = None
    cascade_max_volume_ml: float = 10.0
    cascade_coarse_spacing: Optional[List[float]] = None
    cascade_margin_mm: float = 10.0

    def __post_init__(self) -> None:
        self.validate()

    # --- validation -------------------------------------------------------------------------------------
    def validate(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                _fail(name, "one of " + ", ".join(repr(a) for a in allowed), value)
        for name in ("iterations", "batch_size", "base_features", "max_features"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("val_every", "checkpoint_every", "num_workers", "val_cases", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("lr", "memory_budget_gb"):
            _check_real(name, getattr(self, name), positive=True)
        for name in ("weight_decay", "grad_clip", "lambda_dice", "lambda_ce", "absent_penalty", "poly_exponent"):
            _check_real(name, getattr(self, name), positive=False)
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir):
            _fail("cache_dir", "a folder path or null", self.cache_dir)
        if self.min_coverage is not None:
            _check_real("min_coverage", self.min_coverage, positive=True)
            if not self.min_coverage <= 1:
                _fail("min_coverage", "a share in (0, 1] or null", self.min_coverage)
        if not 0.0 <= float(self.oversample_foreground) <= 1.0:
            _fail("oversample_foreground", "a probability in [0, 1]", self.oversample_foreground)
        if not 0.0 <= float(self.sw_overlap) < 1.0:
            _fail("sw_overlap", "a number in [0, 1)", self.sw_overlap)
        if isinstance(self.patch_size, str):
            if self.patch_size != "auto":
                _fail("patch_size", "a list of 2 or 3 positive ints or 'auto'", self.patch_size)
        else:
            self.patch_size = _int_list("patch_size", self.patch_size)
        if self.target_spacing is not None:
            self.target_spacing = _positive_list("target_spacing", self.target_spacing)
        w = _float_list("window", self.window)
        if len(w) != 2 or not w[0] < w[1]:
            _fail("window", "[low, high] with low < high (HU)", self.window)
        self.window = w
        pairs = self.lateral_pairs
        if isinstance(pairs, str):
            if pairs not in ("auto", "none"):
                _fail("lateral_pairs", "'auto', 'none' or a list of [left, right] organ names", pairs)
        elif not isinstance(pairs, (list, tuple)) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(o, str) for o in p) for p in pairs):
            _fail("lateral_pairs", "'auto', 'none' or a list of [left, right] organ names", pairs)
        else:
            self.lateral_pairs = [list(p) for p in pairs]
        self._validate_cascade()

    def _validate_cascade(self) -> None:
        if not isinstance(self.cascade, bool):
            _fail("cascade", "true or false", self.cascade)
        _check_real("cascade_max_volume_ml", self.cascade_max_volume_ml, positive=True)
        _check_real("cascade_margin_mm", self.cascade_margin_mm, positive=False)
        if self.cascade_coarse_spacing is not None:
            self.cascade_coarse_spacing = _positive_list("cascade_coarse_spacing", self.cascade_coarse_spacing)
        small = self.cascade_small_organs
        if small is not None:
            if isinstance(small, str) or not isinstance(small, (list, tuple)) or not small \
                    or not all(isinstance(o, str) and o for o in small):
                _fail("cascade_small_organs", "a non-empty list of organ names or null (split by volume)", small)
            if len(set(small)) != len(small):
                _fail("cascade_small_organs", "organ names without repeats", small)
            self.cascade_small_organs = list(small)
        if self.cascade and self.activation != "softmax":
            _fail("activation", "'softmax' with cascade: true (stage two replaces stage one's small-organ labels, "
                  "which needs one label per voxel)", self.activation)

    # --- (de)serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], *, source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {unknown}; known settings: {sorted(known)}")
        return cls(**values)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "TrainConfig":
        """Reads a YAML (.yaml / .yml) or JSON file of settings."""
        path = Path(path)
        if not path.is_file():
            _fail("config", "an existing .yaml, .yml or .json file", str(path))
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text)
            elif path.suffix == ".json":
                values = json.loads(text)
            else:
                raise ValueError(f"unknown suffix {path.suffix!r}")
        except Exception as exc:  # the parsers' messages name the line; keep them
            raise ValueError(f"config: could not parse {path}: {exc}") from exc
        if not isinstance(values, dict):
            _fail("config", f"a mapping of settings in {path}", type(values).__name__)
        return cls.from_dict(values, source=str(path))

    def replace(self, **changes: Any) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **changes})


def _fail(name: str, expected: str, got: Any) -> None:
    raise ValueError(f"TrainConfig: {name}: expected {expected}, got {got!r}")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, f"an int >= {minimum}", value)


def _check_real(name: str, value: Any, *, positive: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        _fail(name, "a finite number " + ("> 0" if positive else ">= 0"), value)


def _float_list(name: str, value: Any) -> List[float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        _fail(name, "a list of numbers", value)
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        _fail(name, "a list of numbers", value)
    if not all(math.isfinite(v) for v in out):
        _fail(name, "finite numbers", value)
    return out


def _positive_list(name: str, value: Any) -> List[float]:
    out = _float_list(name, value)
    if len(out) not in (2, 3) or min(out) <= 0:
        _fail(name, "2 or 3 positive numbers", value)
    return out


def _int_list(name: str, value: Any) -> List[int]:
    out = _float_list(name, value)
    if len(out) not in (2, 3) or any(v != int(v) or v < 1 for v in out):
        _fail(name, "2 or 3 positive ints", value)
    return [int(v) for v in out]


def parse_override(text: str) -> Tuple[str, Any]:
    """``key=value`` from the command line; the value is parsed as YAML (numbers, lists, true/false, null)."""
    import yaml

    if "=" not in text:
        raise ValueError(f"--set: expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"--set {key}: could not parse {raw!r}: {exc}") from exc
    return key.strip(), value
