"""Evaluate predicted label maps against ground truth, per case and organ, with fastseg's metrics: Dice, HD95,
ASSD and surface Dice (NSD) at a tolerance in mm, computed with the ground truth's spacing by
:func:`fastseg.metrics.surface_metrics` (MONAI's conventions by default).

Empty masks, as ``surface_metrics`` returns them, and how the summary treats them:

* organ absent from both the ground truth and the prediction: every metric is nan; the case is left out of
  that organ's statistics and counted in ``n_absent``.
* exactly one of the two empty (a missed or a hallucinated organ): Dice and NSD are 0 and enter the
  statistics; HD95 and ASSD are inf, are left out of the distance statistics (a mean with an infinite term
  says nothing) and are counted in ``n_inf``.

So for each organ ``n`` counts the cases where it is in the ground truth or the prediction; Dice and NSD
statistics are over those ``n`` cases, HD95 and ASSD statistics over ``n - n_inf``. ``std`` is the population
standard deviation (ddof = 0). A statistic over no value is nan (JSON: null).
"""
from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from fastseg.data.dataset import (
    DESCRIPTION_SUFFIXES,
    DatasetSpec,
    _integer_labels,
    _present_values,
    _value_counts,
    check_geometry,
    normalize_organs,
)
from fastseg._atomic import save_figure
from fastseg.data.io import Image, atomic_output, case_name, read_image
from fastseg.metrics.surface import CONVENTIONS, surface_metrics

__all__ = ["evaluate_folders", "EvaluationResult"]

PathLike = Union[str, os.PathLike]
OrgansArg = Union[None, Sequence[str], Mapping[str, int], DatasetSpec]

_FN = "evaluate_folders"
_DESCRIPTION_NAMES = tuple(f"dataset{s}" for s in DESCRIPTION_SUFFIXES)
_OUTPUTS = ("per_case.csv", "summary.csv", "summary.md", "results.json", "boxplots.png")


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{_FN}: {name}: expected {expected}, got {got!r}")


def _hd_key(percentile: float) -> str:
    return f"hd{percentile:g}"


# ------------------------------------------------------------------------------------------- result


@dataclass
class EvaluationResult:
    """Per-case and per-organ results of :func:`evaluate_folders`.

    Attributes:
        per_case: one dict per (case, organ): ``case``, ``organ``, ``dice``, ``hd95``, ``assd``, ``nsd``
            (floats; inf / nan as described in the module docstring), ``gt_voxels``, ``pred_voxels``. The HD
            key is ``hd<percentile>`` (``hd95`` by default).
        summary: organ -> ``{label, n, n_inf, n_absent, <metric>_mean, <metric>_median, <metric>_std}``.
        organs: organ -> label value, in evaluation order.
        settings: tolerance, percentile, convention, the folders, and predictions that had no ground truth.
    """

    per_case: List[Dict[str, Any]]
    summary: Dict[str, Dict[str, Any]]
    organs: Dict[str, int]
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> Tuple[str, ...]:
        return ("dice", _hd_key(self.settings.get("percentile", 95)), "assd", "nsd")

    def markdown(self) -> str:
        """The per-organ summary as a markdown table (organs as rows)."""
        _, hd, _, _ = self.metrics
        tol = f"{self.settings.get('tolerance', 2.0):g}"
        header = ["Organ", "n", "Dice mean ± std", f"{hd.upper()} (mm) mean / median", "ASSD (mm) mean",
                  f"NSD@{tol} mm mean", "one empty"]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for organ, s in self.summary.items():
            row = [organ, str(s["n"]), f"{_fmt(s['dice_mean'], 3)} ± {_fmt(s['dice_std'], 3)}",
                   f"{_fmt(s[hd + '_mean'], 2)} / {_fmt(s[hd + '_median'], 2)}", _fmt(s["assd_mean"], 2),
                   _fmt(s["nsd_mean"], 3), str(s["n_inf"])]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: PathLike) -> Dict[str, Path]:
        """Write per_case.csv, summary.csv, summary.md, results.json and boxplots.png into ``out_dir`` (created
        if missing), each atomically. Returns name -> path."""
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            _fail("out_dir", "a folder", str(out))
        out.mkdir(parents=True, exist_ok=True)
        texts = {
            "per_case.csv": _csv(["case", "organ", *self.metrics, "gt_voxels", "pred_voxels"], self.per_case),
            "summary.csv": _csv(["organ", *next(iter(self.summary.values()), {}).keys()],
                                [{"organ": o, **s} for o, s in self.summary.items()]),
            "summary.md": self._summary_md(),
            "results.json": json.dumps(_json_safe({"settings": self.settings, "organs": self.organs,
                                                   "summary": self.summary, "per_case": self.per_case}),
                                       indent=2, allow_nan=False) + "\n",
        }
        paths = {}
        for name, text in texts.items():
            with atomic_output(out / name) as tmp:
                tmp.write_text(text, encoding="utf-8")
            paths[name] = out / name
        paths["boxplots.png"] = self._boxplots(out / "boxplots.png")
        return paths

    def _summary_md(self) -> str:
        s = self.settings
        return (f"# Evaluation\n\nPredictions `{s.get('pred_dir')}` against `{s.get('gt_dir')}`: "
                f"{s.get('num_cases')} cases, convention '{s.get('convention')}', HD percentile "
                f"{s.get('percentile'):g}, NSD tolerance {s.get('tolerance'):g} mm.\n\n" + self.markdown() +
                "\nn: cases with the organ in the ground truth or the prediction. one empty: cases where exactly "
                "one of the two is empty; their Dice and NSD (0) are included, their infinite distances are "
                "left out of the HD and ASSD statistics. std: population standard deviation.\n")

    def _boxplots(self, path: Path) -> Path:
        # lazily, and without pyplot: no global backend switch in the caller's (notebook) process
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        organs = list(self.summary)
        _, hd, _, _ = self.metrics
        fig = Figure(figsize=(max(6.0, 0.45 * len(organs) + 2.0), 7.0), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, 1, sharex=True)
        for ax, key, title in ((axes[0], "dice", "Dice"), (axes[1], hd, f"{hd.upper()} (mm)")):
            data = [[r[key] for r in self.per_case if r["organ"] == o and math.isfinite(r[key])] for o in organs]
            ax.boxplot([d if d else [math.nan] for d in data], showfliers=True)
            ax.set_ylabel(title)
            ax.grid(axis="y", alpha=0.3)
        axes[1].set_xticks(range(1, len(organs) + 1))
        axes[1].set_xticklabels(organs, rotation=60, ha="right")
        return save_figure(fig, path, dpi=100)


def _fmt(value: float, digits: int) -> str:
    return "–" if not math.isfinite(value) else f"{value:.{digits}f}"


def _csv_cell(value) -> Any:
    if isinstance(value, float):
        return repr(value)  # exact, and 'inf' / 'nan' parse back with float()
    return value


def _csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row[c]) for c in columns])
    return buf.getvalue()


def _json_safe(value):
    """Strict JSON: inf and nan become null; tensors and arrays become lists."""
    if hasattr(value, "tolist"):
        return _json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------- inputs


def _existing_dir(name: str, path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{_FN}: {name}: no such folder: {str(path)!r}")
    if not path.is_dir():
        _fail(name, "a folder", str(path))
    return path


def _label_files(name: str, folder: Path) -> Dict[str, Path]:
    """case -> file for every .nii / .nii.gz / .nrrd file of ``folder``."""
    out: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        case = case_name(path)
        if case is None or not path.is_file():
            continue
        if case in out:
            raise ValueError(f"{_FN}: {name}: two files for case {case!r}: {out[case].name} and {path.name}")
        out[case] = path
    return out


def _description_in(folder: Path) -> Optional[Path]:
    found = [folder / n for n in _DESCRIPTION_NAMES if (folder / n).is_file()]
    return found[0] if found else None


def _organ_table(organs: OrgansArg) -> Dict[str, int]:
    if isinstance(organs, DatasetSpec):
        return dict(organs.label_values)
    if isinstance(organs, str) or not isinstance(organs, (Sequence, Mapping)):
        _fail("organs", "a list of organ names, a mapping name -> label value or a DatasetSpec", organs)
    return normalize_organs(organs if isinstance(organs, Mapping) else list(organs), where=f"{_FN}: organs")


def _check_settings(tolerance, percentile, convention) -> None:
    def number(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    if not number(tolerance) or tolerance < 0:
        _fail("tolerance", "a finite number >= 0 (mm)", tolerance)
    if not number(percentile) or not 0 <= percentile <= 100:
        _fail("percentile", "a number in [0, 100]", percentile)
    if convention not in CONVENTIONS:
        _fail("convention", " or ".join(repr(c) for c in CONVENTIONS), convention)


@dataclass
class _GroundTruth:
    """Where each case's ground-truth label map comes from: files, or a dataset description."""

    cases: List[str]
    known: Dict[str, int]  # every label value the label maps may hold
    files: Optional[Dict[str, Path]] = None
    spec: Optional[DatasetSpec] = None

    def source(self, case: str) -> str:
        if self.files is not None:
            return repr(str(self.files[case]))
        return f"case {case!r} of {self.spec.where}"

    def read(self, case: str) -> Image:
        if self.files is not None:
            return read_image(self.files[case])
        return self.spec.load_label(case)


def _select(organs: OrgansArg, known: Optional[Dict[str, int]], source: str) -> Dict[str, int]:
    """The organs to evaluate: all of ``known`` (the description's table) by default; names select organs of
    ``known``; a mapping or DatasetSpec must agree with ``known`` where given."""
    if known is None:
        return _organ_table(organs)
    if organs is None:
        return dict(known)
    if isinstance(organs, (list, tuple)) and all(isinstance(o, str) for o in organs):
        _organ_table(organs)  # duplicates, empty names
        selected = {name: known.get(name, -1) for name in organs}
    else:
        selected = _organ_table(organs)
    for name, value in selected.items():
        if name not in known:
            raise ValueError(f"{_FN}: organs: unknown organ {name!r}; the organs of {source} are: "
                             f"{', '.join(known)}")
        if known[name] != value:
            raise ValueError(f"{_FN}: organs: {name!r} has label value {value} but {known[name]} in {source}")
    return selected


def _ground_truth(gt_dir: Path, organs: OrgansArg, split: Optional[str]) -> Tuple[_GroundTruth, Dict[str, int]]:
    """The ground truth and the organs to evaluate (name -> label value)."""
    if gt_dir.is_file():
        spec = DatasetSpec.load(gt_dir)
        known = dict(spec.label_values)
        return _GroundTruth(spec.cases(split), known, spec=spec), _select(organs, known, spec.where)
    if split is not None:
        _fail("split", "None when gt_dir is a folder of label maps (splits come from a dataset description)", split)
    files = _label_files("gt_dir", gt_dir)
    if not files:
        raise ValueError(f"{_FN}: gt_dir: no .nii, .nii.gz or .nrrd label map in {str(gt_dir)!r}")
    description = _description_in(gt_dir)
    if description is None and organs is None:
        _fail("organs", f"organ names (or a {'/'.join(_DESCRIPTION_NAMES)} in gt_dir) to name the labels", None)
    if description is None:
        selected = _organ_table(organs)
        return _GroundTruth(sorted(files), selected, files=files), selected
    spec = DatasetSpec.load(description)
    known = dict(spec.label_values)
    return _GroundTruth(sorted(files), known, files=files), _select(organs, known, spec.where)


def _lookup(known: Mapping[str, int], selected: Mapping[str, int]) -> np.ndarray:
    """Label value -> evaluation index (organ k of ``selected`` -> k + 1, other known organs -> 0 so they count
    as background, unknown values -> -1)."""
    lut = np.full(max(known.values()) + 1, -1, dtype=np.int64)
    lut[0] = 0
    for value in known.values():
        lut[value] = 0
    for k, value in enumerate(selected.values()):
        lut[value] = k + 1
    return lut


def _remap(array: np.ndarray, lut: np.ndarray, what: str, known: Mapping[str, int]) -> np.ndarray:
    labels = _integer_labels(_FN, what, array)
    present = _present_values(labels)
    bad = [v for v in present if v < 0 or v >= lut.size or lut[v] < 0]
    if bad:
        table = ", ".join(f"{k}={v}" for k, v in known.items())
        raise ValueError(f"{_FN}: {what}: label values {bad[:20]} are not organs' label values (0 = background, "
                         f"{table})")
    if np.array_equal(lut, np.arange(lut.size)):
        # dtypes torch reads and reduces everywhere (uint16 / uint32 tensors lack some CPU kernels)
        return labels if labels.dtype in (np.uint8, np.int16, np.int32, np.int64) else labels.astype(np.int32)
    small = lut.astype(np.uint8 if lut.max() < 256 else np.int16)
    return small[labels]


# ------------------------------------------------------------------------------------------- evaluation


def _c_ordered(pred: np.ndarray, gt: np.ndarray, spacing) -> Tuple[np.ndarray, np.ndarray, Tuple[float, ...]]:
    """C-contiguous views for the metrics, which run several times slower on strided tensors. Files give
    Fortran-ordered arrays, whose transpose is C-contiguous without a copy; every metric is unchanged by a
    permutation of the axes that permutes the spacing alike (6-neighbour erosions, 2x2x2 surfel blocks and
    exact Euclidean distances are all symmetric in the axes)."""
    if gt.flags.f_contiguous and not gt.flags.c_contiguous:
        return np.asfortranarray(pred).T, gt.T, tuple(spacing)[::-1]
    return np.ascontiguousarray(pred), gt if gt.flags.c_contiguous else np.ascontiguousarray(gt), tuple(spacing)


def _case_rows(case: str, pred: np.ndarray, gt: np.ndarray, spacing, organs: Sequence[str], metric_keys,
               percentile: float, tolerance: float, convention: str) -> List[Dict[str, Any]]:
    K = len(organs)
    pred, gt, spacing = _c_ordered(pred, gt, spacing)
    m = surface_metrics(pred[None], gt[None], spacing=spacing, percentile=percentile, tolerance=tolerance,
                        convention=convention, num_classes=K + 1)
    gt_counts = _value_counts(gt, minlength=K + 1)
    pred_counts = _value_counts(pred, minlength=K + 1)
    dice, hd, assd, nsd = metric_keys
    rows = []
    for k, organ in enumerate(organs):
        rows.append({
            "case": case,
            "organ": organ,
            dice: float(m["dice"][0, k]),
            hd: float(m["hd_percentile"][0, k]),
            assd: float(m["assd"][0, k]),
            nsd: float(m["nsd"][0, k]),
            "gt_voxels": int(gt_counts[k + 1]),
            "pred_voxels": int(pred_counts[k + 1]),
        })
    return rows


def _stats(values: Sequence[float], key: str) -> Dict[str, float]:
    if not values:
        return {f"{key}_mean": math.nan, f"{key}_median": math.nan, f"{key}_std": math.nan}
    arr = np.asarray(values, dtype=np.float64)
    return {f"{key}_mean": float(arr.mean()), f"{key}_median": float(np.median(arr)), f"{key}_std": float(arr.std())}


def _summarise(rows: Sequence[Mapping[str, Any]], organs: Mapping[str, int], metric_keys) -> Dict[str, Dict]:
    dice, hd, assd, nsd = metric_keys
    summary = {}
    for organ, value in organs.items():
        mine = [r for r in rows if r["organ"] == organ]
        present = [r for r in mine if not math.isnan(r[dice])]
        entry: Dict[str, Any] = {
            "label": value,
            "n": len(present),
            "n_inf": sum(1 for r in present if math.isinf(r[hd])),
            "n_absent": len(mine) - len(present),
        }
        for key in metric_keys:
            entry.update(_stats([r[key] for r in present if math.isfinite(r[key])], key))
        summary[organ] = entry
    return summary


def evaluate_folders(
    pred_dir: PathLike,
    gt_dir: PathLike,
    *,
    organs: OrgansArg = None,
    out_dir: Optional[PathLike] = None,
    tolerance: float = 2.0,
    percentile: float = 95,
    convention: str = "monai",
    split: Optional[str] = None,
) -> EvaluationResult:
    """Dice, HD95, ASSD and surface Dice per case and organ; summary statistics per organ.

    Args:
        pred_dir: folder of predicted label maps ``<case>.nii.gz`` / ``.nii`` / ``.nrrd``.
        gt_dir: folder of ground-truth label maps with the same case names, or a dataset description file
            (``.json`` / ``.yaml``), whose cases give the ground truth through ``DatasetSpec.load_label`` (the
            label map of ``load_case``: overlapping masks resolved by the description's priority).
        organs: organ names (label value = position + 1), a mapping name -> label value, or a DatasetSpec.
            Required for a folder of label maps without a ``dataset.json`` / ``dataset.yaml`` in it. With a
            description (gt_dir itself, or in gt_dir): the organs to evaluate among its organs (names take its
            label values; the organs left out count as background); default: all of them.
        out_dir: if given, per_case.csv, summary.csv, summary.md, results.json and boxplots.png are written
            there, each atomically, after every case has been evaluated.
        tolerance: surface Dice tolerance in mm. percentile: of the Hausdorff distance (95: HD95).
        convention: ``'monai'`` or ``'deepmind'`` (see :mod:`fastseg.metrics.surface`).
        split: with a description file: evaluate the cases of this split only (default: every case).

    Returns:
        :class:`EvaluationResult`. Every ground-truth case needs a prediction (else ValueError listing the
        missing ones); predictions without ground truth are ignored and listed in ``settings``. A prediction
        and its ground truth must agree in shape and spacing (the ground truth's spacing is used).

    Example:
        >>> result = evaluate_folders("runs/pred", "data/phantom/labels", organs=["Brain", "Parotid-Lt"])
        >>> print(result.markdown())
    """
    _check_settings(tolerance, percentile, convention)
    pred_dir = _existing_dir("pred_dir", pred_dir)
    gt_path = Path(gt_dir)
    if not gt_path.exists():
        raise FileNotFoundError(f"{_FN}: gt_dir: no such folder or dataset description: {str(gt_path)!r}")
    truth, selected = _ground_truth(gt_path, organs, split)
    predictions = _label_files("pred_dir", pred_dir)
    missing = [c for c in truth.cases if c not in predictions]
    if missing:
        raise ValueError(f"{_FN}: pred_dir: no prediction for {len(missing)} of {len(truth.cases)} ground-truth "
                         f"case(s) in {str(pred_dir)!r}: {missing[:20]}" + (" ..." if len(missing) > 20 else ""))
    metric_keys = ("dice", _hd_key(float(percentile)), "assd", "nsd")
    lut = _lookup(truth.known, selected)
    rows: List[Dict[str, Any]] = []
    for case in truth.cases:
        gt_img = truth.read(case)
        pred_img = read_image(predictions[case])
        check_geometry(gt_img, pred_img, what=f"case {case!r}: prediction {str(predictions[case])!r} vs ground "
                                             f"truth {truth.source(case)}")
        gt = _remap(gt_img.array, lut, f"ground truth {truth.source(case)}", truth.known)
        pred = _remap(pred_img.array, lut, f"prediction {str(predictions[case])!r}", truth.known)
        rows += _case_rows(case, pred, gt, gt_img.spacing, list(selected), metric_keys, float(percentile),
                           float(tolerance), convention)
    settings = {
        "pred_dir": str(pred_dir),
        "gt_dir": str(gt_path),
        "num_cases": len(truth.cases),
        "tolerance": float(tolerance),
        "percentile": float(percentile),
        "convention": convention,
        "split": split,
        "unmatched_predictions": sorted(c for c in predictions if c not in set(truth.cases)),
    }
    result = EvaluationResult(rows, _summarise(rows, selected, metric_keys), dict(selected), settings)
    if out_dir is not None:
        result.write(out_dir)
    return result


# ------------------------------------------------------------------------------------------- confidence
PROBS_SUFFIX = "_probs.npz"


def confidence_folders(
    pred_dir: PathLike,
    gt_dir: PathLike,
    *,
    out_dir: Optional[PathLike] = None,
    num_bins: int = 15,
    split: Optional[str] = None,
    size_thresholds: Sequence[float] = (1e3, 1e5),
):
    """Per-class confidence analysis (:class:`fastseg.confidence.ConfidenceAnalysis`) of the probabilities
    ``fastseg predict --save-probabilities`` wrote (``<case>_probs.npz``) against the ground truth.

    Args:
        pred_dir: folder of ``<case>_probs.npz`` files (their organ names fix the channel order).
        gt_dir: folder of ground-truth label maps (with a ``dataset.json`` / ``.yaml`` naming the organs) or a
            dataset description, as for :func:`evaluate_folders`.
        out_dir: if given, ``confidence.md``, ``confidence.json`` and ``confidence.png`` are written there.
        num_bins, size_thresholds: see ConfidenceAnalysis (organ size in ground-truth voxels).
        split: with a description file, the split to analyse (default: every case).

    Returns:
        ``(analysis, summary)``: the ConfidenceAnalysis and its ``compute()`` result.
    """
    import torch

    from fastseg.confidence import ConfidenceAnalysis
    from fastseg.training.predictor import load_probability_file

    fn = "confidence_folders"
    pred_dir = _existing_dir("pred_dir", pred_dir)
    gt_path = Path(gt_dir)
    if not gt_path.exists():
        raise FileNotFoundError(f"{fn}: gt_dir: no such folder or dataset description: {str(gt_path)!r}")
    files = {p.name[: -len(PROBS_SUFFIX)]: p for p in sorted(pred_dir.iterdir()) if p.name.endswith(PROBS_SUFFIX)}
    if not files:
        raise ValueError(f"{fn}: pred_dir: no <case>{PROBS_SUFFIX} in {str(pred_dir)!r} "
                         "(write them with `fastseg predict --save-probabilities`)")
    first = load_probability_file(next(iter(files.values())))
    truth, selected = _ground_truth(gt_path, list(first["organs"]), split)
    missing = [c for c in truth.cases if c not in files]
    if missing:
        raise ValueError(f"{fn}: pred_dir: no probabilities for {len(missing)} ground-truth case(s): {missing[:20]}")
    lut = _lookup(truth.known, selected)
    analysis = ConfidenceAnalysis(len(selected) + 1, num_bins=num_bins, class_names=["background", *selected],
                                  size_thresholds=tuple(size_thresholds), sync=False)
    for case in truth.cases:
        probs = load_probability_file(files[case])
        if probs["organs"] != list(selected):
            raise ValueError(f"{fn}: {str(files[case])!r}: organs {probs['organs']} differ from the first file's "
                             f"{list(selected)}")
        gt_img = truth.read(case)
        if tuple(probs["probs"].shape[1:]) != tuple(gt_img.array.shape):
            raise ValueError(f"{fn}: case {case!r}: probabilities of shape {probs['probs'].shape[1:]} vs ground "
                             f"truth {truth.source(case)} of shape {gt_img.array.shape}")
        gt = _remap(gt_img.array, lut, f"ground truth {truth.source(case)}", truth.known)
        analysis.update(torch.from_numpy(probs["probs"])[None], torch.from_numpy(np.ascontiguousarray(gt))[None])
    summary = analysis.compute()
    if out_dir is not None:
        out = Path(out_dir)
        with atomic_output(out / "confidence.md") as tmp:
            tmp.write_text(analysis.table(summary))
        with atomic_output(out / "confidence.json") as tmp:
            tmp.write_text(json.dumps(_json_safe(summary), indent=1))
        analysis.plot(out / "confidence.png", summary)
    return analysis, summary

