r"""Confidence analysis of softmax outputs against the ground truth: reliability diagrams, expected and maximum
calibration errors, mean confidence on true-positive, false-positive and false-negative voxels, grouped by
organ size (the per-class confidence analysis of Tappeiner, Welk & Schubert, IJCARS 2022).

Everything derives from three sums that the op ``fastseg::calibration_stats`` computes in one pass over the
probabilities (C++ / CUDA kernels in csrc/confidence/, float64 results):

* class-wise reliability bins ``(C, K, 3)``: for every voxel and class c, in bin k of :math:`p_c` (K equal
  bins of [0, 1], p = 1 in the last): ``[count, sum p_c, sum 1[target == c]]``;
* top-label bins ``(K, 3)``: confidence :math:`\max_c p_c`, correct :math:`1[\arg\max_c p_c = y]` (lowest
  index on ties, as ``torch.argmax``): ``[count, sum confidence, sum correct]``;
* confusion sums ``(C, 6)``: with :math:`a = \arg\max_c p_c`, ``[TP, sum p_c on TP, FP, sum p_c on FP, FN,
  sum p_c on FN]`` where TP: a = y = c, FP: a = c != y, FN: y = c != a.

Voxels whose label is ``ignore_index`` count nowhere; probabilities are clamped to [0, 1] (NaN read as 0).
From bin sums :math:`(n_k, s_k, h_k)`: confidence :math:`s_k / n_k`, accuracy :math:`h_k / n_k`, and

.. math::
    \mathrm{ECE} = \sum_k \frac{n_k}{N} \left|\frac{h_k}{n_k} - \frac{s_k}{n_k}\right|
                 = \frac{1}{N} \sum_k |h_k - s_k|, \qquad
    \mathrm{MCE} = \max_{k:\, n_k > 0} \left|\frac{h_k - s_k}{n_k}\right|

(Naeini et al., AAAI 2015; Guo et al., ICML 2017). Per class on the class-wise bins (Kull et al., NeurIPS
2019, whose classwise-ECE is the mean over classes), and once on the top-label bins.

The statistics are not differentiable (no gradient flows back to ``probs``).
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.distributed as dist

from fastseg._atomic import save_figure
from fastseg.ops import confidence as _ops

__all__ = [
    "CalibrationStats",
    "calibration_stats",
    "ConfidenceAnalysis",
    "reliability",
    "expected_calibration_error",
    "maximum_calibration_error",
]

_INT_LABELS = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_WIDE_UNSIGNED = tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))
_PROB_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CalibrationStats(NamedTuple):
    """The op's sums (float64, on the input's device); see the module docstring."""

    classwise: torch.Tensor  # (C, num_bins, 3) [count, sum p_c, sum 1[target == c]]
    top_label: torch.Tensor  # (num_bins, 3) [count, sum max p, sum 1[argmax == target]]
    confusion: torch.Tensor  # (C, 6) [TP, sum p_c on TP, FP, sum p_c on FP, FN, sum p_c on FN]


def _fail(fn: str, name: str, expected: str, got) -> None:
    raise ValueError(f"fastseg.confidence.{fn}: {name} must be {expected}, got {got!r}")


def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_num_bins(fn: str, num_bins) -> None:
    if not _is_int(num_bins) or not 1 <= num_bins <= _ops.MAX_BINS:
        _fail(fn, "num_bins", f"an integer in [1, {_ops.MAX_BINS}]", num_bins)


def _check_ignore_index(fn: str, ignore_index) -> None:
    if ignore_index is not None and not _is_int(ignore_index):
        _fail(fn, "ignore_index", "None or an integer label", ignore_index)


def _prepare(fn: str, probs, target) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates probs (B, C, *spatial) and target (B, *spatial) or (B, 1, *spatial); returns the labels as
    (B, *spatial) in a dtype the kernels read."""
    if not isinstance(probs, torch.Tensor):
        _fail(fn, "probs", "a torch.Tensor", type(probs).__name__)
    if not isinstance(target, torch.Tensor):
        _fail(fn, "target", "a torch.Tensor", type(target).__name__)
    if probs.dim() < 2 or probs.shape[1] < 1:
        _fail(fn, "probs", "a (B, C, *spatial) tensor of probabilities with C >= 1", _describe(probs))
    if probs.dtype not in _PROB_DTYPES:
        _fail(fn, "probs", "float16, bfloat16, float32 or float64", _describe(probs))
    if target.device != probs.device:
        raise ValueError(f"fastseg.confidence.{fn}: probs and target must be on the same device, got probs on "
                         f"{probs.device} and target on {target.device}")
    if target.dtype not in _INT_LABELS + _WIDE_UNSIGNED:
        _fail(fn, "target", "integer class labels (bool or an integer dtype)", _describe(target))
    expected = (probs.shape[0], *probs.shape[2:])
    if target.dim() == probs.dim() and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(target.shape) != expected:
        _fail(fn, "target", f"labels of shape (B, *spatial) = {expected} (or {(expected[0], 1, *expected[1:])}) "
              f"matching probs {tuple(probs.shape)}", _describe(target))
    if target.dtype in _WIDE_UNSIGNED:
        target = target.to(torch.int64)
    return probs, target


def calibration_stats(
    probs: torch.Tensor, target: torch.Tensor, num_bins: int = 15, ignore_index: Optional[int] = None
) -> CalibrationStats:
    """Reliability-bin and confusion sums of softmax probabilities, in one pass (see the module docstring).

    Args:
        probs: (B, C, *spatial) probabilities (softmax outputs), float16, bfloat16, float32 or float64, any
            strides (layouts whose spatial dims do not collapse into one stride are copied first).
        target: (B, *spatial) or (B, 1, *spatial) integer labels in [0, C) (or ``ignore_index``).
        num_bins: number K of equal-width confidence bins of [0, 1].
        ignore_index: label whose voxels count nowhere.

    Returns:
        CalibrationStats(classwise (C, K, 3), top_label (K, 3), confusion (C, 6)), float64 on probs' device.
        Counts are exact. CPU sums are float64; CUDA sums are 64-bit fixed point with 2^-32 resolution
        (deterministic; each probability at most 2^-33 off), see csrc/confidence/confidence_cuda.h.

    Example:
        >>> probs = torch.softmax(torch.randn(2, 4, 8, 8, 8), dim=1)
        >>> target = torch.randint(0, 4, (2, 8, 8, 8))
        >>> stats = calibration_stats(probs, target, num_bins=10)
        >>> stats.classwise.shape, stats.top_label.shape, stats.confusion.shape
        (torch.Size([4, 10, 3]), torch.Size([10, 3]), torch.Size([4, 6]))
    """
    fn = "calibration_stats"
    _check_num_bins(fn, num_bins)
    _check_ignore_index(fn, ignore_index)
    probs, target = _prepare(fn, probs, target)
    ignore = None if ignore_index is None else int(ignore_index)
    return CalibrationStats(*_ops.calibration_stats(probs.detach(), target, int(num_bins), ignore))


# ------------------------------------------------------------------------------------------ derived metrics


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, nan where den == 0."""
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(num, math.nan))


def reliability(bins: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per bin of (..., K, 3) sums: mean confidence, accuracy (both nan in empty bins) and count."""
    n, s, h = bins.unbind(-1)
    return {"confidence": _ratio(s, n), "accuracy": _ratio(h, n), "count": n}


def expected_calibration_error(bins: torch.Tensor) -> torch.Tensor:
    """ECE of (..., K, 3) bin sums: sum_k |h_k - s_k| / sum_k n_k (nan without any voxel)."""
    n, s, h = bins.unbind(-1)
    return _ratio((h - s).abs().sum(-1), n.sum(-1))


def maximum_calibration_error(bins: torch.Tensor) -> torch.Tensor:
    """MCE of (..., K, 3) bin sums: the largest |accuracy - confidence| over non-empty bins (nan if none)."""
    n, s, h = bins.unbind(-1)
    gap = torch.where(n > 0, (h - s).abs() / n.clamp(min=1e-300), torch.full_like(n, -1.0))
    mce = gap.amax(-1)
    return torch.where(mce >= 0, mce, torch.full_like(mce, math.nan))


def _nanmean(values: torch.Tensor) -> float:
    kept = values[~torch.isnan(values)]
    return float(kept.mean()) if kept.numel() else math.nan


# ----------------------------------------------------------------------------------------------- stateful


class ConfidenceAnalysis:
    r"""Accumulates :func:`calibration_stats` over a dataset and summarises it per class and per organ size.

    ``update(probs, target)`` adds a batch's sums and, per class, the ground-truth voxel count of each case
    (each batch element is a case); ``compute()`` returns the summary (below); ``table()`` formats it as
    Markdown and ``plot(path)`` draws it; ``reset()`` forgets everything.

    Organ size: a class's mean number of ground-truth voxels over the cases that contain it. A class is
    *small* below ``size_thresholds[0]`` voxels, *medium* below ``size_thresholds[1]``, *large* otherwise
    (names and thresholds configurable). Classes never present in the ground truth, and class 0 unless
    ``include_background``, belong to no group.

    Under ``torch.distributed`` (``sync=True``) ``compute`` first sums the accumulated statistics of every
    rank with one ``all_reduce`` (CUDA tensors for NCCL, CPU tensors otherwise), so every rank gets the
    summary of the whole dataset: every rank must call it. ``table`` and ``plot`` take that summary
    (``result=``) so they can run on one rank; without it they call ``compute``.

    Args:
        num_classes: C, the number of channels of ``probs``.
        num_bins: number of equal-width confidence bins.
        class_names: C names (default ``"class {i}"``).
        ignore_index: label whose voxels count nowhere.
        size_thresholds: increasing voxel counts separating the size groups.
        size_groups: one name per group (``len(size_thresholds) + 1``).
        include_background: whether class 0 enters the size groups and the means over classes.
        sync: sum over torch.distributed ranks in ``compute`` when a process group is initialised.

    Example:
        >>> analysis = ConfidenceAnalysis(num_classes=3, class_names=["background", "parotid", "lens"])
        >>> for probs, target in loader:                       # (B, C, D, H, W) softmax, (B, D, H, W) labels
        ...     analysis.update(probs, target)
        >>> result = analysis.compute()
        >>> result["ece"], result["groups"]["small"]["ece"]    # per-class ECE, mean over the small organs
        >>> print(analysis.table(result)); analysis.plot("confidence.png", result)
    """

    def __init__(
        self,
        num_classes: int,
        num_bins: int = 15,
        class_names: Optional[Sequence[str]] = None,
        ignore_index: Optional[int] = None,
        size_thresholds: Sequence[float] = (1e3, 1e5),
        size_groups: Sequence[str] = ("small", "medium", "large"),
        include_background: bool = False,
        sync: bool = True,
    ) -> None:
        fn = "ConfidenceAnalysis"
        if not _is_int(num_classes) or num_classes < 1:
            _fail(fn, "num_classes", "a positive integer", num_classes)
        _check_num_bins(fn, num_bins)
        _check_ignore_index(fn, ignore_index)
        if class_names is None:
            class_names = [f"class {i}" for i in range(num_classes)]
        if isinstance(class_names, str) or len(class_names) != num_classes:
            _fail(fn, "class_names", f"None or {num_classes} names", class_names)
        thresholds = [float(t) for t in size_thresholds]
        if any(not math.isfinite(t) or t < 0 for t in thresholds) or thresholds != sorted(set(thresholds)):
            _fail(fn, "size_thresholds", "strictly increasing non-negative voxel counts", tuple(size_thresholds))
        groups = [str(g) for g in size_groups]
        if len(groups) != len(thresholds) + 1 or len(set(groups)) != len(groups):
            _fail(fn, "size_groups", f"{len(thresholds) + 1} distinct names (one more than size_thresholds)",
                  tuple(size_groups))
        self.num_classes = int(num_classes)
        self.num_bins = int(num_bins)
        self.class_names = [str(n) for n in class_names]
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.size_thresholds = thresholds
        self.size_groups = groups
        self.include_background = bool(include_background)
        self.sync = bool(sync)
        self.reset()

    def __repr__(self) -> str:
        return (f"ConfidenceAnalysis(num_classes={self.num_classes}, num_bins={self.num_bins}, "
                f"ignore_index={self.ignore_index}, size_thresholds={tuple(self.size_thresholds)}, "
                f"size_groups={tuple(self.size_groups)}, include_background={self.include_background}, "
                f"cases={int(self._state['cases'].item())})")

    def reset(self) -> None:
        C, K = self.num_classes, self.num_bins
        f64 = dict(dtype=torch.float64)
        self._state: Dict[str, torch.Tensor] = {
            "classwise": torch.zeros((C, K, 3), **f64),
            "top_label": torch.zeros((K, 3), **f64),
            "confusion": torch.zeros((C, 6), **f64),
            "gt_voxels": torch.zeros(C, **f64),  # summed over cases
            "cases_present": torch.zeros(C, **f64),
            "cases": torch.zeros(1, **f64),
        }
        self._placed = False  # the state moves to the first batch's device

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> CalibrationStats:
        """Adds a batch: probs (B, C, *spatial) softmax outputs, target (B, *spatial) labels. Returns the
        batch's statistics. The state moves to the device of the first batch (no host sync per batch)."""
        fn = "ConfidenceAnalysis.update"
        probs, target = _prepare(fn, probs, target)
        if probs.shape[1] != self.num_classes:
            _fail(fn, "probs", f"{self.num_classes} class channels (num_classes)", _describe(probs))
        stats = CalibrationStats(*_ops.calibration_stats(probs.detach(), target, self.num_bins, self.ignore_index))
        if not self._placed:
            self._state = {k: v.to(probs.device) for k, v in self._state.items()}
            self._placed = True
        dev = self._state["cases"].device
        counts = self._gt_counts(target).to(dev)
        self._state["classwise"] += stats.classwise.to(dev)
        self._state["top_label"] += stats.top_label.to(dev)
        self._state["confusion"] += stats.confusion.to(dev)
        self._state["gt_voxels"] += counts.sum(0)
        self._state["cases_present"] += (counts > 0).sum(0).to(torch.float64)
        self._state["cases"] += target.shape[0]
        return stats

    def _gt_counts(self, target: torch.Tensor) -> torch.Tensor:
        """(B, C) float64 ground-truth voxel counts per case (labels already checked by the op)."""
        B, C = target.shape[0], self.num_classes
        labels = target.reshape(B, -1).long()
        valid = (labels >= 0) & (labels < C)
        if self.ignore_index is not None:
            valid &= labels != self.ignore_index
        counts = torch.zeros((B, C), dtype=torch.float64, device=target.device)
        return counts.scatter_add_(1, torch.where(valid, labels, 0), valid.to(torch.float64))

    def _synced_state(self) -> Dict[str, torch.Tensor]:
        """The accumulated state summed over ranks (when distributed), as CPU float64 tensors."""
        state = self._state
        if self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                      else torch.device("cpu"))
            flat = torch.cat([v.reshape(-1).to(device) for v in state.values()])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            parts = flat.split([v.numel() for v in state.values()])
            state = {k: p.reshape(v.shape) for (k, v), p in zip(state.items(), parts)}
        return {k: v.detach().to("cpu", torch.float64) for k, v in state.items()}

    def size_group_of(self, voxels: float) -> str:
        """The size group of a class with `voxels` mean ground-truth voxels per case."""
        return self.size_groups[sum(voxels >= t for t in self.size_thresholds)]

    def compute(self) -> Dict[str, Any]:
        """The summary over everything added (on every rank, with ``sync``). Keys (tensors are float64 on the
        CPU; nan where undefined, e.g. the FP confidence of a class without false positives):

        * ``class_names``, ``num_bins``, ``bin_edges`` (K + 1,), ``cases`` (int);
        * ``ece``, ``mce`` (C,): class-wise calibration errors; ``classwise_ece`` (float): their mean over
          the analysed classes (all, or all but class 0 without ``include_background``);
        * ``top_label_ece``, ``top_label_mce`` (float);
        * ``reliability``: ``{"confidence", "accuracy", "count"}`` each (C, K); ``top_label_reliability``
          the same, each (K,);
        * ``tp``, ``fp``, ``fn`` (C,) voxel counts; ``tp_confidence``, ``fp_confidence``,
          ``fn_confidence`` (C,): mean p_c over those voxels;
        * ``gt_voxels`` (C,): mean ground-truth voxels per case containing the class; ``cases_present`` (C,);
        * ``size_group``: per class its group name or None;
        * ``groups``: per group name ``{"classes": [indices], "class_names", "ece", "mce", "tp_confidence",
          "fp_confidence", "fn_confidence"`` (means over the group's classes, nan-skipping), ``"reliability"``
          (the group's class-wise bins pooled: (K,) confidence, accuracy, count)``}``.
        """
        st = self._synced_state()
        cls, top, conf = st["classwise"], st["top_label"], st["confusion"]
        K = self.num_bins
        gt = _ratio(st["gt_voxels"], st["cases_present"])
        ece, mce = expected_calibration_error(cls), maximum_calibration_error(cls)
        per_class = {
            "ece": ece,
            "mce": mce,
            "tp": conf[:, 0],
            "fp": conf[:, 2],
            "fn": conf[:, 4],
            "tp_confidence": _ratio(conf[:, 1], conf[:, 0]),
            "fp_confidence": _ratio(conf[:, 3], conf[:, 2]),
            "fn_confidence": _ratio(conf[:, 5], conf[:, 4]),
        }
        analysed = [c for c in range(self.num_classes) if self.include_background or c != 0]
        size_group: List[Optional[str]] = [None] * self.num_classes
        for c in analysed:
            if st["cases_present"][c] > 0:
                size_group[c] = self.size_group_of(float(gt[c]))
        groups = {}
        for name in self.size_groups:
            members = [c for c in range(self.num_classes) if size_group[c] == name]
            idx = torch.tensor(members, dtype=torch.long)
            summary = {"classes": members, "class_names": [self.class_names[c] for c in members]}
            for key in ("ece", "mce", "tp_confidence", "fp_confidence", "fn_confidence"):
                summary[key] = _nanmean(per_class[key][idx])
            summary["reliability"] = reliability(cls[idx].sum(0))
            groups[name] = summary
        return {
            "class_names": list(self.class_names),
            "num_bins": K,
            "bin_edges": torch.linspace(0, 1, K + 1, dtype=torch.float64),
            "cases": int(st["cases"].item()),
            **per_class,
            "classwise_ece": _nanmean(ece[torch.tensor(analysed, dtype=torch.long)]),
            "top_label_ece": float(expected_calibration_error(top)),
            "top_label_mce": float(maximum_calibration_error(top)),
            "reliability": reliability(cls),
            "top_label_reliability": reliability(top),
            "gt_voxels": gt,
            "cases_present": st["cases_present"],
            "size_group": size_group,
            "groups": groups,
        }

    def table(self, result: Optional[Dict[str, Any]] = None) -> str:
        """Markdown: one row per class, one per size group (means), and the top-label errors."""
        r = self.compute() if result is None else result

        def num(v, fmt=".4f") -> str:
            v = float(v)
            return "–" if math.isnan(v) else format(v, fmt)

        head = ("| class | size | GT voxels / case | ECE | MCE | conf. TP | conf. FP | conf. FN | TP | FP | FN |\n"
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        rows = [head]
        for c, name in enumerate(r["class_names"]):
            rows.append(
                f"| {name} | {r['size_group'][c] or '–'} | {num(r['gt_voxels'][c], '.0f')} | {num(r['ece'][c])} "
                f"| {num(r['mce'][c])} | {num(r['tp_confidence'][c])} | {num(r['fp_confidence'][c])} "
                f"| {num(r['fn_confidence'][c])} | {num(r['tp'][c], '.0f')} | {num(r['fp'][c], '.0f')} "
                f"| {num(r['fn'][c], '.0f')} |")
        for name, g in r["groups"].items():
            rows.append(f"| **{name}** (mean of {len(g['classes'])}) | {name} | | {num(g['ece'])} | {num(g['mce'])} "
                        f"| {num(g['tp_confidence'])} | {num(g['fp_confidence'])} | {num(g['fn_confidence'])} "
                        f"| | | |")
        rows.append("")
        rows.append(f"Class-wise ECE (mean over classes): {num(r['classwise_ece'])}; top-label ECE: "
                    f"{num(r['top_label_ece'])}, MCE: {num(r['top_label_mce'])}; {r['num_bins']} bins, "
                    f"{r['cases']} cases.")
        return "\n".join(rows) + "\n"

    def plot(self, path: Union[str, os.PathLike], result: Optional[Dict[str, Any]] = None, dpi: int = 120) -> Path:
        """Writes a figure (PNG, or another format matplotlib knows by the suffix) atomically: reliability
        diagrams of each size group (class-wise bins pooled over its classes) and of the top label, and a bar
        chart of the per-class ECE coloured by size group. Returns the path."""
        r = self.compute() if result is None else result
        path = Path(path)
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib is optional
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        panels = [(f"{name} organs ({len(g['classes'])})", g["reliability"]) for name, g in r["groups"].items()]
        panels.append(("top label", r["top_label_reliability"]))
        fig = Figure(figsize=(3.2 * len(panels), 6.4), layout="constrained")
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(2, len(panels))
        edges = r["bin_edges"].numpy()
        colours = {name: f"C{i}" for i, name in enumerate(r["groups"])}
        for i, (title, rel) in enumerate(panels):
            ax = fig.add_subplot(grid[0, i])
            _reliability_panel(ax, edges, rel, title)
        ax = fig.add_subplot(grid[1, :])
        ece = r["ece"].numpy()
        names = r["class_names"]
        ax.bar(range(len(names)), ece, color=[colours.get(g, "0.6") for g in r["size_group"]])
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("class-wise ECE")
        ax.legend(handles=[Patch(color=colour, label=name) for name, colour in colours.items()]
                  + [Patch(color="0.6", label="no group")], fontsize=7)
        return save_figure(fig, path, dpi=dpi)


def _reliability_panel(ax, edges, rel: Dict[str, torch.Tensor], title: str) -> None:
    """Accuracy per bin as bars, the gap to the mean confidence hatched, the diagonal for reference."""
    width = edges[1:] - edges[:-1]
    acc, conf, count = rel["accuracy"].numpy(), rel["confidence"].numpy(), rel["count"].numpy()
    filled = count > 0
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    if not filled.any():
        ax.text(0.5, 0.5, "no voxels", ha="center", va="center", fontsize=8, color="0.4")
        return
    ax.bar(edges[:-1][filled], acc[filled], width=width[filled], align="edge", color="C0", edgecolor="k",
           linewidth=0.3, label="accuracy")
    ax.bar(edges[:-1][filled], (conf - acc)[filled], bottom=acc[filled], width=width[filled], align="edge",
           color="C3", alpha=0.3, hatch="//", linewidth=0, label="gap to confidence")
    ax.legend(fontsize=6, loc="upper left")

