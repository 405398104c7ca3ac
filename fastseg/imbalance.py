"""Exact class-imbalance analysis of patch-based training, and patch-size recommendation.

Tappeiner, Welk & Schubert ("Tackling the class imbalance problem of deep learning-based head and neck organ
segmentation", IJCARS 2022, https://doi.org/10.1007/s11548-022-02649-5) choose nnU-Net's training patch
size by a class-imbalance measure: they draw many patches with the training sampler and take the spread
(standard deviation) of the per-batch label ratios. This module computes the ingredients of such a measure
*exactly* — as expectations over every patch position the sampler of :mod:`fastseg.data.sampling` can
draw, not from a few thousand draws — and from them a score, for a grid of patch sizes and
foreground-oversampling ratios.

Sampler (the "Patch sampling semantics" of fastseg, implemented by
:class:`fastseg.data.sampling.PatchSampler`): a case is padded to at least the patch size (label 0 around
it, centred); a patch is the box ``[lo, lo + P)``. With probability ``1 - o`` it is a *random* patch, ``lo``
uniform over all valid positions; with probability ``o`` (``oversample_foreground``) a *foreground* patch:
a class ``c`` uniform among the foreground classes present in the case (not 0, not the ignore label), a
voxel ``v`` uniform among the voxels of ``c``, ``lo = clip(v - P // 2, 0, S' - P)``. A case without
foreground always gives a random patch. Every sample picks its case uniformly.

Per class ``c``, patch size ``P`` and ratio ``o`` the report holds

* ``fraction[c] = f_c = E[n_c] / |P|``: the expected share of the patch's voxels that belong to class
  ``c`` (``n_c`` = voxels of class ``c`` in the patch, padding counts as background, ignored voxels count
  for no class, so the shares add up to one minus the expected ignored share), and
* ``presence[c] = p_c = Pr[n_c > 0]``: the probability that a sampled patch contains class ``c``.

Both are linear in the sampling distribution, so they are mixtures ``(1 - o) * random + o * foreground``
of the two modes, averaged over the cases.

Imbalance score
---------------
With ``S`` the classes that occur in the data set (background always included), ``K = |S|``, ``F = S`` minus
the background and ``B`` the batch size::

    score = sqrt( mean_{c in S} ln(K * f_c) ** 2  +  mean_{c in F} (1 - p_c) / (B * p_c) )

Why this form. The paper's measure is the spread of the per-batch label ratios ``r_c`` (share of class
``c`` in a batch) around their mean; a perfectly balanced batch has every ``r_c = 1 / K``. Two things make
the ratios of a batch deviate from balance, and the score adds one term for each:

1. *Between classes*: the expected shares ``f_c = E[r_c]`` differ. The term is the mean squared
   **log**-deviation of ``f_c`` from ``1 / K``. The log scale is the point: organ volumes span four orders of
   magnitude (head and neck: brain 6e5 voxels, cochlea 20), and on a linear scale (the paper's standard
   deviation) the background share alone decides the value, while a class 1000 times under-represented
   counts no more than one 10 times under-represented. In log units both directions and all organ sizes
   weigh alike (the term is zero exactly when every class has the share ``1 / K``).
2. *Between batches*: ``r_c`` fluctuates from batch to batch, above all because small classes are absent
   from most patches. The term is the mean over the foreground classes of the squared coefficient of
   variation of ``r_c`` over batches of ``B`` independent patches, ``Var(r_c) / E[r_c]^2``, evaluated for a
   class whose share is the same in every patch that contains it: then ``Var(r_c) / E[r_c]^2 =
   (1 - p_c) / (B p_c)``. It is what presence-sensitive losses (Dice, the paper's class adaptive Dice) feel:
   a class absent from a batch gets no overlap gradient. The background, present in all but patches lying
   wholly inside organs, is left out of this term.

The paper's squared spread splits the same way, ``E[(r_c - 1/K)^2] = (f_c - 1/K)^2 + Var(r_c)``; the score
measures both parts relative to each class's own scale (log ratio to balance, coefficient of variation), so
that it is dimensionless and not decided by the background alone. Lower is better; 0 means every batch is
perfectly balanced. The two terms pull in opposite directions: foreground oversampling with small patches
raises the share of every organ (term 1 falls as the patch shrinks), while small patches miss most organs
most of the time (term 2 rises). On the head-and-neck masks with nnU-Net's 1/3 oversampling the share term
wins and the score favours small patches (so would the paper's linear spread, whose background part falls
with the background share); without oversampling it favours large ones. The score measures imbalance, not context:
keep the candidates to sizes that give the network enough of it — which the coverage below measures.

Organ coverage
--------------
Per foreground class ``c`` and patch size, ``coverage[c]`` is the expected share of the organ that a
foreground patch drawn for ``c`` shows: the mean over the voxels ``v`` of ``c`` of ``|c ∩ patch(v)| / |c|``,
``patch(v)`` the patch the sampler centres on ``v`` (clipped to the padded case as above), averaged over the
cases that contain ``c``. It is 1 when every such patch holds the whole organ and falls as the patch shrinks
below the organ's extent: where the imbalance score rewards small patches, coverage says how much of each
organ (and so of its shape and neighbours) the network still sees. :meth:`ImbalanceReport.best` takes a
``min_coverage`` that every organ must reach. Computed exactly by the same op as the other statistics (below).

Co-presence
-----------
``co_presence[i, s, c]`` is the probability that a foreground patch drawn for organ ``s`` also holds class
``c`` (same averaging as the coverage). Context is more than the organ itself: a left orbit looks like a right
one, and what tells them apart is what else the patch shows. The table's "partner in view" column is the least
such probability over the left / right pairs of the data (:meth:`ImbalanceReport.least_seen_partner`).

Algorithm
---------
The statistics of one case for every patch size come from the op ``fastseg::patch_stats`` (CPU kernel
in ``csrc/imbalance/``, pure-PyTorch reference in :mod:`fastseg._reference`). It reads the label map once
into runs of equal labels along the last axis and works on runs from then on: presence is a bit-packed
OR-dilation of each class by the patch (an area's worth of words, not a volume), counts are closed forms
(per-axis coverages for random patches, one summed-volume table of the foreground weights for foreground
patches), and the background's presence is one minus the probability that the patch lies wholly inside the
non-background voxels (a bit-packed erosion). Coverage sums, per run, box sums on one summed-volume table of
each class over its bounding box (O(1) per run and patch size); co-presence is the presence count kept per
source class. Everything is exact. Patch sizes and classes are independent tasks on torch's intra-op threads.
"""
from __future__ import annotations

import copy
import functools
import itertools
import json
from pathlib import Path
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from fastseg.ops.imbalance import patch_stats

__all__ = ["analyze_imbalance", "ImbalanceReport", "Recommendation", "imbalance_score",
           "estimate_training_memory", "unet_memory_fn", "candidate_patch_sizes", "budget_patch_sizes",
           "auto_patch_sizes", "recommend_patch_size"]

_WHERE = "analyze_imbalance"


def _fail(where: str, name: str, expected: str, got) -> None:
    raise ValueError(f"{where}: {name}: expected {expected}, got {got!r}")


def _describe(a) -> str:
    a = np.asarray(a)
    return f"{a.dtype} array of shape {tuple(a.shape)}"


# ------------------------------------------------------------------------------------------- the score


def imbalance_score(fraction: np.ndarray, presence: np.ndarray, scored: np.ndarray, batch_size: int = 2
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The module's imbalance score from expected shares and presence probabilities (see the module doc).

    Args:
        fraction: (..., C) expected voxel share ``f_c`` per class.
        presence: (..., C) probability ``p_c`` that a patch contains class ``c``.
        scored: (C,) bool, the classes that occur in the data set (index 0, the background, is always scored
            in the share term and never in the presence term).
        batch_size: patches per batch ``B``.

    Returns:
        (score, share term, presence term), each of shape ``fraction.shape[:-1]``; ``score = sqrt(share +
        presence)``. Classes with ``f_c = 0`` or ``p_c = 0`` make the score infinite.
    """
    fraction = np.asarray(fraction, np.float64)
    presence = np.asarray(presence, np.float64)
    scored = np.asarray(scored, bool).copy()
    scored[0] = True
    fg = scored.copy()
    fg[0] = False
    k = int(scored.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.mean(np.log(k * fraction[..., scored]) ** 2, axis=-1)
        if fg.any():
            p = presence[..., fg]
            absent = np.mean(np.where(p > 0, (1.0 - p) / (batch_size * p), np.inf), axis=-1)
        else:
            absent = np.zeros_like(share)
    return np.sqrt(share + absent), share, absent


# ---------------------------------------------------------------------------------------------- memory


def estimate_training_memory(model: nn.Module, patch_size: Sequence[int], batch_size: int = 2,
                             in_channels: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Estimated peak memory (bytes) of a training step of ``model`` with Adam on ``(batch_size, in_channels,
    *patch_size)`` inputs, derived from the network itself.

    The forward pass runs on the ``meta`` device (no data, no arithmetic; a copy of the module whose
    parameters are meta tensors, so the model itself is untouched) under
    :func:`torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd keeps for the
    backward pass. With ``P`` the parameter bytes, ``S`` the saved activations (each storage once: views and
    in-place results share one; parameters not included), ``O`` the outputs autograd does not already keep
    (logits of every deep-supervision level) and ``L`` the largest saved storage, the estimate is the larger
    of the two peaks of a step after the first:

    * start of the backward pass: ``3 P + S + O + 2 L`` (parameters and Adam's two moments persist between
      steps; gradients of the parameters appear while the activations are being freed; the gradient flowing
      into the largest activation and the one flowing out of it are the transient),
    * Adam's update: ``5 P`` (parameters, gradients, two moments and about one parameter-sized temporary of
      torch's multi-tensor implementation).

    Measured against torch's CPU memory profiler on nnU-Net-like U-Nets it is within about 20 % (see
    ``tests/test_imbalance.py``). Not included: the CUDA context and cuDNN workspaces (a few hundred MB,
    framework dependent), the loss's own buffers and the caching allocator's fragmentation. Mixed precision
    is modelled only roughly, by ``dtype`` (it then applies to the parameters as well).

    Args:
        model: any module taking ``(B, in_channels, *patch_size)`` tensors.
        patch_size: spatial input size.
        batch_size: samples per step.
        in_channels: input channels.
        dtype: dtype of the parameters and activations.

    Returns:
        bytes, an int.

    Example:
        >>> from fastseg.models import UNet
        >>> net = UNet.from_patch_size(1, 4, (64, 64, 32), (1.0, 1.0, 2.5))
        >>> estimate_training_memory(net, (64, 64, 32)) > 0
        True
    """
    where = "estimate_training_memory"
    if not isinstance(model, nn.Module):
        _fail(where, "model", "a torch.nn.Module", type(model).__name__)
    size = _positive_ints(where, "patch_size", patch_size)
    for name, value in (("batch_size", batch_size), ("in_channels", in_channels)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            _fail(where, name, "a positive integer", value)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        _fail(where, "dtype", "a floating-point torch.dtype", dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    # the memo makes deepcopy use meta stand-ins instead of copying (possibly large) parameter data
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty(p.shape, device="meta", dtype=dtype), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty(b.shape, device="meta", dtype=dtype if b.is_floating_point() else b.dtype)
    meta = copy.deepcopy(model, memo)
    meta.train()
    param_bytes = sum(p.numel() for p in meta.parameters() if p.requires_grad) * itemsize
    params = {p.untyped_storage()._cdata for p in meta.parameters()}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in params:
            saved[key] = max(saved.get(key, 0), storage.nbytes())
        return t

    x = torch.empty((batch_size, in_channels, *size), device="meta", dtype=dtype)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = meta(x)
    except Exception as exc:
        raise ValueError(f"{where}: model: its forward pass failed on a meta tensor of shape {tuple(x.shape)} "
                         f"({type(exc).__name__}: {exc})") from exc
    outputs = {}
    for o in _flatten(out):
        if isinstance(o, torch.Tensor) and o.untyped_storage()._cdata not in saved:
            outputs[o.untyped_storage()._cdata] = o.untyped_storage().nbytes()
    activations = sum(saved.values()) + sum(outputs.values()) + 2 * max(saved.values(), default=0)
    return int(max(3 * param_bytes + activations, 5 * param_bytes))


def _flatten(obj):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flatten(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flatten(o)
    else:
        yield obj


# ---------------------------------------------------------------------------------------------- report


def _positive_ints(where: str, name: str, value, ndim: Optional[int] = None) -> Tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
        ok = len(out) > 0 and all(not isinstance(v, bool) and o == v and o >= 1 for o, v in zip(out, value))
    except (TypeError, ValueError):
        ok = False
    if not ok or (ndim is not None and len(out) != ndim):
        n = f"{ndim} " if ndim is not None else ""
        _fail(where, name, f"{n}positive integers (one per spatial axis)", value)
    return out


def _format_size(size: Sequence[int]) -> str:
    return "x".join(str(s) for s in size)


@dataclass(frozen=True)
class Recommendation:
    """The patch size :meth:`ImbalanceReport.best` recommends.

    Attributes:
        patch_size: the recommended patch size.
        oversample_foreground: the foreground-oversampling ratio it was scored with.
        score: its imbalance score.
        memory_bytes: its estimated training memory, None without a budget.
        memory_budget_bytes: the budget, None without one.
    """

    patch_size: Tuple[int, ...]
    oversample_foreground: float
    score: float
    memory_bytes: Optional[int] = None
    memory_budget_bytes: Optional[int] = None


@dataclass
class ImbalanceReport:
    """Result of :func:`analyze_imbalance`.

    Attributes:
        patch_sizes: the candidate patch sizes (``n_patch``).
        oversample_foreground: the foreground-oversampling ratios (``n_over``).
        class_names: ``C`` names, index = label value.
        presence: (n_patch, n_over, C) probability that a sampled patch contains each class.
        fraction: (n_patch, n_over, C) expected share of the patch's voxels of each class.
        coverage: (n_patch, C) expected share of each organ inside a foreground patch drawn for it (module
            doc; it does not depend on the ratio); nan for the background and classes absent from the data.
        co_presence: (n_patch, C, C) ``[i, s, c]``: the probability that a foreground patch drawn for organ
            ``s`` holds class ``c``, over the cases that contain ``s`` (nan rows for the background and absent
            classes). :meth:`least_seen_partner` reads it for left / right pairs.
        score: (n_patch, n_over) imbalance score (lower is better, see the module doc).
        share_term, presence_term: (n_patch, n_over) the two terms under the score's square root.
        presence_random, presence_foreground, fraction_random, fraction_foreground: (n_patch, C) the pure
            random and pure foreground modes (every ratio is a mixture of them).
        scored: (C,) bool, classes that occur in the data (background always True).
        batch_size: ``B`` of the score and of the default memory estimate.
        spacing: voxel spacing per axis (mm) or None.
        num_cases: number of label maps analysed.
        ignore_label: the label value that belongs to no class, or None.
        seconds: wall time of the analysis.
        memory_bytes: patch size -> estimated training memory, filled by :meth:`best`.
    """

    patch_sizes: List[Tuple[int, ...]]
    oversample_foreground: Tuple[float, ...]
    class_names: List[str]
    presence: np.ndarray
    fraction: np.ndarray
    coverage: np.ndarray
    co_presence: np.ndarray
    score: np.ndarray
    share_term: np.ndarray
    presence_term: np.ndarray
    presence_random: np.ndarray
    presence_foreground: np.ndarray
    fraction_random: np.ndarray
    fraction_foreground: np.ndarray
    scored: np.ndarray
    batch_size: int
    spacing: Optional[Tuple[float, ...]]
    num_cases: int
    ignore_label: Optional[int]
    seconds: float
    memory_bytes: Dict[Tuple[int, ...], int] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------- recommendation

    def _default_memory_fn(self) -> Callable[[Tuple[int, ...]], int]:
        return unet_memory_fn(self.spacing or (1.0,) * len(self.patch_sizes[0]), len(self.class_names),
                              batch_size=self.batch_size)

    def least_covered(self, i: int) -> Tuple[Optional[int], float]:
        """(class, coverage) of the organ that patch size ``i`` covers least; (None, nan) without organs."""
        row = self.coverage[i]
        if not np.isfinite(row).any():
            return None, math.nan
        k = int(np.nanargmin(row))
        return k, float(row[k])

    def best(self, memory_budget_gb: Optional[float] = None,
             memory_fn: Optional[Callable[[Tuple[int, ...]], int]] = None, *,
             oversample_foreground: Optional[float] = None,
             min_coverage: Optional[float] = None) -> Recommendation:
        """The patch size (and oversampling ratio) with the lowest score whose training fits the budget and,
        with ``min_coverage``, that shows every organ at least that share of itself (:attr:`coverage`).

        Args:
            memory_budget_gb: GPU memory budget in GiB (2**30 bytes); None: no memory constraint.
            memory_fn: patch size -> estimated bytes of one training step. Default (with a budget): the
                reference :class:`fastseg.models.UNet` planned for the patch size and ``spacing`` (1 mm when
                the report has none), one input channel, ``batch_size`` patches, measured by
                :func:`estimate_training_memory`.
            oversample_foreground: restrict the choice to this ratio (one of the analysed ones); default: all.
            min_coverage: in (0, 1]: only patch sizes whose least covered organ reaches it; None: no constraint.

        Returns:
            :class:`Recommendation`.

        Raises:
            ValueError: no candidate fits the budget (the message gives the smallest estimate), none reaches
                ``min_coverage`` (the message gives the best coverage), or bad arguments.
        """
        where = "ImbalanceReport.best"
        budget = None
        if memory_budget_gb is not None:
            if isinstance(memory_budget_gb, bool) or not isinstance(memory_budget_gb, numbers.Real) \
                    or not memory_budget_gb > 0 or not math.isfinite(memory_budget_gb):
                _fail(where, "memory_budget_gb", "a positive number of GiB or None", memory_budget_gb)
            budget = int(memory_budget_gb * 2 ** 30)
        if memory_fn is not None and not callable(memory_fn):
            _fail(where, "memory_fn", "a callable patch_size -> bytes or None", memory_fn)
        if min_coverage is not None and (isinstance(min_coverage, bool)
                                         or not isinstance(min_coverage, numbers.Real)
                                         or not 0 < min_coverage <= 1):
            _fail(where, "min_coverage", "a share in (0, 1] or None", min_coverage)
        columns = list(range(len(self.oversample_foreground)))
        if oversample_foreground is not None:
            matches = [j for j, o in enumerate(self.oversample_foreground)
                       if math.isclose(o, float(oversample_foreground), abs_tol=1e-12)]
            if not matches:
                _fail(where, "oversample_foreground", f"one of the analysed ratios {self.oversample_foreground}",
                      oversample_foreground)
            columns = matches
        fits = list(range(len(self.patch_sizes)))
        if budget is not None:
            fn = memory_fn or self._default_memory_fn()
            for i, patch in enumerate(self.patch_sizes):
                if patch not in self.memory_bytes or memory_fn is not None:
                    value = fn(patch)
                    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
                        _fail(where, "memory_fn", "a callable returning a non-negative number of bytes",
                              f"{value!r} for patch size {patch}")
                    self.memory_bytes[patch] = int(value)
            fits = [i for i, p in enumerate(self.patch_sizes) if self.memory_bytes[p] <= budget]
            if not fits:
                i = min(range(len(self.patch_sizes)), key=lambda i: self.memory_bytes[self.patch_sizes[i]])
                need = self.memory_bytes[self.patch_sizes[i]]
                raise ValueError(f"{where}: memory_budget_gb: no candidate patch size fits "
                                 f"{memory_budget_gb} GiB; the smallest estimate is {need / 2 ** 30:.2f} GiB "
                                 f"for {_format_size(self.patch_sizes[i])}")
        if min_coverage is not None:
            covered = [i for i in fits if not self.least_covered(i)[1] < min_coverage]
            if not covered:
                i = max(fits, key=lambda i: self.least_covered(i)[1])
                k, value = self.least_covered(i)
                scope = " within the budget" if budget is not None else ""
                raise ValueError(f"{where}: min_coverage: no candidate patch size{scope} shows every organ "
                                 f"{min_coverage:g} of itself; the best is "
                                 f"{_format_size(self.patch_sizes[i])}, whose least covered organ "
                                 f"{self.class_names[k]} gets {value:.3f}")
            fits = covered
        i, j = min(((i, j) for i in fits for j in columns), key=lambda ij: (self.score[ij], ij))
        patch = self.patch_sizes[i]
        return Recommendation(patch_size=patch, oversample_foreground=self.oversample_foreground[j],
                              score=float(self.score[i, j]),
                              memory_bytes=self.memory_bytes.get(patch) if budget is not None else None,
                              memory_budget_bytes=budget)

    def least_seen_partner(self, i: int) -> Tuple[Optional[int], Optional[int], float]:
        """(organ, partner, probability) of the left / right pair member (Parotid-Lt / Parotid-Rt, ...) whose
        foreground patches at patch size ``i`` show the other side's organ least often; (None, None, nan)
        without pairs in the data. A patch that never shows both sides leaves only the surroundings to tell
        left from right; the CPU demo's network could not, at 64x64x32 (README)."""
        from fastseg.data.augment import lateral_pairs

        worst = (None, None, math.nan)
        for a, b in lateral_pairs(self.class_names):
            for s, c in ((a, b), (b, a)):
                p = self.co_presence[i, s, c]
                if math.isfinite(p) and self.scored[c] and (worst[0] is None or p < worst[2]):
                    worst = (s, c, float(p))
        return worst

    # ------------------------------------------------------------------------------------------ output

    def table(self, per_class: bool = True) -> str:
        """Markdown: one row per (patch size, ratio) with the score, its two terms and the least present
        class; with ``per_class`` a second table of ``presence % / expected share`` for every class."""
        mm = self.spacing is not None
        pairs = self.least_seen_partner(0)[0] is not None
        head = ["patch", *(["mm"] if mm else []), "oversample", "score", "share term", "presence term",
                "least present class", "least covered organ", *(["partner in view"] if pairs else []),
                *(["memory GiB"] if self.memory_bytes else [])]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        fg = self.scored.copy()
        fg[0] = False
        for i, patch in enumerate(self.patch_sizes):
            for j, o in enumerate(self.oversample_foreground):
                row = [_format_size(patch)]
                if mm:
                    row.append("x".join(f"{p * s:.0f}" for p, s in zip(patch, self.spacing)))
                row += [f"{o:.3g}", f"{self.score[i, j]:.3f}", f"{self.share_term[i, j]:.2f}",
                        f"{self.presence_term[i, j]:.2f}"]
                if fg.any():
                    k = int(np.flatnonzero(fg)[np.argmin(self.presence[i, j, fg])])
                    row.append(f"{self.class_names[k]} ({100 * self.presence[i, j, k]:.1f} %)")
                else:
                    row.append("-")
                k, value = self.least_covered(i)
                row.append("-" if k is None else f"{self.class_names[k]} ({100 * value:.1f} %)")
                if pairs:
                    s, c, p = self.least_seen_partner(i)
                    row.append(f"{self.class_names[c]} for {self.class_names[s]} ({100 * p:.1f} %)")
                if self.memory_bytes:
                    m = self.memory_bytes.get(patch)
                    row.append("-" if m is None else f"{m / 2 ** 30:.2f}")
                lines.append("| " + " | ".join(row) + " |")
        if not per_class:
            return "\n".join(lines) + "\n"
        lines += ["", "Per class: presence % / expected voxel share", ""]
        names = [n for n, s in zip(self.class_names, self.scored) if s]
        keep = np.flatnonzero(self.scored)
        lines.append("| patch | oversample | " + " | ".join(names) + " |")
        lines.append("|" + "---|" * (len(names) + 2))
        for i, patch in enumerate(self.patch_sizes):
            for j, o in enumerate(self.oversample_foreground):
                cells = [f"{100 * self.presence[i, j, k]:.1f} / {self.fraction[i, j, k]:.2e}" for k in keep]
                lines.append(f"| {_format_size(patch)} | {o:.3g} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        """Plain-Python (JSON-ready) form of the report."""
        return {
            "patch_sizes": [list(p) for p in self.patch_sizes],
            "oversample_foreground": list(self.oversample_foreground),
            "class_names": list(self.class_names),
            "scored": self.scored.tolist(),
            "batch_size": self.batch_size,
            "spacing": None if self.spacing is None else list(self.spacing),
            "num_cases": self.num_cases,
            "ignore_label": self.ignore_label,
            "seconds": self.seconds,
            "score": self.score.tolist(),
            "share_term": self.share_term.tolist(),
            "presence_term": self.presence_term.tolist(),
            "presence": self.presence.tolist(),
            "fraction": self.fraction.tolist(),
            "coverage": self.coverage.tolist(),
            "co_presence": self.co_presence.tolist(),
            "presence_random": self.presence_random.tolist(),
            "presence_foreground": self.presence_foreground.tolist(),
            "fraction_random": self.fraction_random.tolist(),
            "fraction_foreground": self.fraction_foreground.tolist(),
            "memory_bytes": {_format_size(p): m for p, m in self.memory_bytes.items()},
        }

    def to_json(self, path) -> Path:
        """Write :meth:`to_dict` as JSON, atomically (temp file in the same folder, then rename)."""
        from fastseg._atomic import write_text

        # inf (a class never present) is not JSON: write null
        text = json.dumps(_json_safe(self.to_dict()), indent=1)
        return write_text(path, text + "\n")

    def plot(self, path, *, oversample_foreground: Optional[Sequence[float]] = None) -> Path:
        """PNG (or any matplotlib format, from the suffix) of the score against the patch size, one line per
        ratio, of each class's presence against the patch size, one panel per ratio, and of each organ's
        coverage. Written atomically.

        Args:
            path: output file.
            oversample_foreground: the ratios to draw presence panels for (default: all analysed).
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        from fastseg._atomic import save_figure

        where = "ImbalanceReport.plot"
        ratios = list(self.oversample_foreground) if oversample_foreground is None else list(oversample_foreground)
        columns = []
        for r in ratios:
            hit = [j for j, o in enumerate(self.oversample_foreground) if math.isclose(o, float(r), abs_tol=1e-12)]
            if not hit:
                _fail(where, "oversample_foreground", f"ratios among {self.oversample_foreground}", r)
            columns.append(hit[0])
        order = sorted(range(len(self.patch_sizes)), key=lambda i: (math.prod(self.patch_sizes[i]),
                                                                     self.patch_sizes[i]))
        x = np.arange(len(order))
        labels = [_format_size(self.patch_sizes[i]) for i in order]
        size = (max(7.0, 0.45 * len(order) + 4), 3.2 * (2 + len(columns)))
        fig, axes = plt.subplots(2 + len(columns), 1, figsize=size, squeeze=False)
        ax = axes[0, 0]
        for j, o in enumerate(self.oversample_foreground):
            ax.plot(x, self.score[order, j], marker="o", label=f"oversample {o:.3g}")
        ax.set_ylabel("imbalance score (lower is better)")
        ax.set_title(f"{self.num_cases} cases, batch size {self.batch_size}")
        ax.legend(fontsize="small")
        keep = np.flatnonzero(self.scored)
        cmap = plt.get_cmap("tab20")

        def per_class(ax, values, legend):
            for n, k in enumerate(keep):
                # 20 colours, then the same colours dashed
                ax.plot(x, 100 * values[order, k], marker=".", color=cmap(n % 20),
                        linestyle=("-", "--", ":")[(n // 20) % 3], label=self.class_names[k])
            ax.set_ylim(0, 102)
            if legend:
                ax.legend(fontsize="x-small", ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))

        for row, j in enumerate(columns, start=1):
            per_class(axes[row, 0], self.presence[:, j], legend=row == 1)
            axes[row, 0].set_ylabel("presence in a patch (%)")
            axes[row, 0].set_title(f"oversample_foreground = {self.oversample_foreground[j]:.3g}")
        per_class(axes[-1, 0], self.coverage, legend=not columns)
        axes[-1, 0].set_ylabel("organ coverage (%)")
        axes[-1, 0].set_title("share of the organ inside a foreground patch drawn for it")
        for row in range(axes.shape[0]):
            axes[row, 0].set_xticks(x)
            axes[row, 0].set_xticklabels(labels, rotation=45, ha="right", fontsize="small")
            axes[row, 0].grid(alpha=0.3)
        fig.tight_layout()
        try:
            return save_figure(fig, path, dpi=110)
        finally:
            plt.close(fig)


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, list):
        return [_json_safe(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------- driver


def _check_label_map(i: int, label, ndim: Optional[int], num_classes: Optional[int],
                     ignore_label: Optional[int]) -> np.ndarray:
    name = f"label_maps[{i}]"
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    label = np.asarray(label)
    if label.dtype == bool:
        label = label.view(np.uint8)
    if not np.issubdtype(label.dtype, np.integer) or label.ndim == 0 or label.size == 0:
        _fail(_WHERE, name, "a non-empty integer label map", _describe(label))
    if ndim is not None and label.ndim != ndim:
        _fail(_WHERE, name, f"{ndim} spatial axes like label_maps[0]", _describe(label))
    valid = label if ignore_label is None else label[label != ignore_label]
    if valid.size:
        lo, hi = int(valid.min()), int(valid.max())
        if lo < 0:
            _fail(_WHERE, name, "label values >= 0 (or the ignore_label)", f"minimum {lo}")
        if num_classes is not None and hi >= num_classes:
            _fail(_WHERE, name, f"label values < num_classes={num_classes} (or the ignore_label)",
                  f"maximum {hi}")
    return label


def _check_ratios(value) -> Tuple[float, ...]:
    ratios = (value,) if isinstance(value, numbers.Real) else value
    try:
        out = tuple(float(r) for r in ratios)
        ok = len(out) > 0 and all(not isinstance(r, bool) and 0.0 <= o <= 1.0 for o, r in zip(out, ratios))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        _fail(_WHERE, "oversample_foreground", "a probability in [0, 1] or a non-empty sequence of them", value)
    return out


def _analyze_case(label: np.ndarray, sizes: Sequence[Tuple[int, ...]], num_classes: int,
                  ignore_label: Optional[int]) -> Tuple[np.ndarray, List[int], np.ndarray, np.ndarray]:
    """One case, every patch size: (4, n_patch, C) expected count and presence under random patches, then
    under foreground patches; the classes present; the (n_patch, C) organ coverage and the (n_patch, C, C)
    co-presence (nan for the background and absent classes)."""
    stats, counts, joint = patch_stats(label, sizes, num_classes, ignore_label)
    present = (torch.nonzero(counts[1:]).flatten() + 1).tolist()
    coverage = np.full((len(sizes), num_classes), np.nan)
    coverage[:, present] = stats[:, 4, present].numpy()
    co_presence = np.full((len(sizes), num_classes, num_classes), np.nan)
    co_presence[:, present] = joint[:, present].numpy()
    return stats[:, :4].numpy().transpose(1, 0, 2), present, coverage, co_presence


def analyze_imbalance(label_maps: Sequence[np.ndarray], patch_sizes: Sequence[Sequence[int]], *,
                      oversample_foreground: Union[float, Sequence[float]] = (0.0, 1 / 3),
                      num_classes: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                      spacing: Optional[Sequence[float]] = None, ignore_label: Optional[int] = None,
                      batch_size: int = 2, num_workers: int = 0) -> ImbalanceReport:
    """Exact per-class presence probability and expected voxel share of sampled training patches, and the
    imbalance score, for every candidate patch size and foreground-oversampling ratio (see the module doc).

    Args:
        label_maps: one integer label map per case (2D or 3D, all with the same number of axes; shapes may
            differ). Read once, in order, so a lazy sequence that loads on access works.
        patch_sizes: candidate patch sizes, each one positive int per axis (e.g. ``[(128, 128, 64)]``).
        oversample_foreground: ratio(s) of foreground patches (nnU-Net: 1/3).
        num_classes: number of classes C (background included); default: largest label + 1.
        class_names: C names (index = label value); default "background", "1", "2", ...
        spacing: voxel spacing per axis in mm, for the table and the default memory model of
            :meth:`ImbalanceReport.best`.
        ignore_label: a label value that counts for no class and is never a foreground class (not 0).
        batch_size: patches per batch, for the score's presence term and the memory estimate.
        num_workers: analyse the cases in this many processes (0: in this process), which share torch's
            intra-op threads between them. The op already runs on those threads, so this pays only when a
            case has fewer classes x patch sizes than there are cores; the result is the same.

    Returns:
        :class:`ImbalanceReport`.

    Example:
        >>> lab = np.zeros((40, 40, 20), np.uint8); lab[10:20, 10:20, 5:10] = 1; lab[30:32, 5:7, 2:4] = 2
        >>> rep = analyze_imbalance([lab], [(16, 16, 8), (32, 32, 16)], oversample_foreground=(0, 1 / 3))
        >>> rep.presence.shape, rep.best().patch_size in rep.patch_sizes
        ((2, 2, 3), True)
    """
    t0 = time.perf_counter()
    if isinstance(label_maps, (np.ndarray, torch.Tensor)) or not isinstance(label_maps, Sequence) \
            or len(label_maps) == 0:
        _fail(_WHERE, "label_maps", "a non-empty sequence of label maps (one array per case)",
              _describe(label_maps) if isinstance(label_maps, (np.ndarray, torch.Tensor)) else label_maps)
    if ignore_label is not None:
        if isinstance(ignore_label, bool) or not isinstance(ignore_label, numbers.Integral) or ignore_label == 0:
            _fail(_WHERE, "ignore_label", "an integer other than 0 (the background) or None", ignore_label)
        ignore_label = int(ignore_label)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            _fail(_WHERE, "num_classes", "a positive integer or None", num_classes)
        num_classes = int(num_classes)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        _fail(_WHERE, "batch_size", "a positive integer", batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral) or num_workers < 0:
        _fail(_WHERE, "num_workers", "an integer >= 0", num_workers)
    ratios = _check_ratios(oversample_foreground)
    if isinstance(patch_sizes, (str, bytes)) or not isinstance(patch_sizes, Sequence) or len(patch_sizes) == 0:
        _fail(_WHERE, "patch_sizes", "a non-empty sequence of patch sizes, e.g. [(128, 128, 64)]", patch_sizes)
    if all(isinstance(p, numbers.Integral) for p in patch_sizes):
        _fail(_WHERE, "patch_sizes", f"a sequence of patch sizes; for one size write [{tuple(patch_sizes)}]",
              patch_sizes)

    first = _check_label_map(0, label_maps[0], None, num_classes, ignore_label)
    ndim = first.ndim
    sizes = [_positive_ints(_WHERE, f"patch_sizes[{i}]", p, ndim) for i, p in enumerate(patch_sizes)]
    if spacing is not None:
        try:
            spacing = tuple(float(s) for s in spacing)
            ok = len(spacing) == ndim and all(math.isfinite(s) and s > 0 for s in spacing)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            _fail(_WHERE, "spacing", f"{ndim} positive finite numbers (mm per axis) or None", spacing)

    # the class count must be known before the first case is analysed; without num_classes that means one
    # cheap pass over the maxima (label maps are then read twice)
    if num_classes is None:
        top = 0
        for i in range(len(label_maps)):
            lab = first if i == 0 else _check_label_map(i, label_maps[i], ndim, None, ignore_label)
            valid = lab if ignore_label is None else lab[lab != ignore_label]
            top = max(top, int(valid.max()) if valid.size else 0)
        num_classes = top + 1
    if class_names is None:
        class_names = ["background"] + [str(c) for c in range(1, num_classes)]
    else:
        if isinstance(class_names, str) or len(class_names) != num_classes:
            _fail(_WHERE, "class_names", f"{num_classes} names (num_classes, background included)", class_names)
        class_names = [str(n) for n in class_names]

    n_cases = len(label_maps)
    sums = np.zeros((4, len(sizes), num_classes))
    coverage_sum = np.zeros((len(sizes), num_classes))
    co_presence_sum = np.zeros((len(sizes), num_classes, num_classes))
    containing = np.zeros(num_classes)
    seen = np.zeros(num_classes, bool)
    seen[0] = True

    def load(i: int) -> np.ndarray:
        return first if i == 0 else _check_label_map(i, label_maps[i], ndim, num_classes, ignore_label)

    def add(result) -> None:
        stats, present, coverage, co_presence = result
        sums[...] += stats
        seen[present] = True
        found = np.isfinite(coverage[0])
        coverage_sum[:, found] += coverage[:, found]
        co_presence_sum[:, found] += co_presence[:, found]
        containing[found] += 1

    if num_workers == 0 or n_cases == 1:
        for i in range(n_cases):
            add(_analyze_case(load(i), sizes, num_classes, ignore_label))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # cases go out one at a time, at most 2 per worker in flight, so a lazy label_maps sequence is
        # never held in memory as a whole; results come back in order, so the sums do not depend on timing.
        # Spawned, not forked: a child forked after the op has used the OpenMP thread pool hangs.
        threads = max(1, torch.get_num_threads() // num_workers)
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            pending = []
            for i in range(n_cases):
                pending.append(pool.submit(_analyze_case, load(i), sizes, num_classes, ignore_label))
                while len(pending) > 2 * num_workers:
                    add(pending.pop(0).result())
            for job in pending:
                add(job.result())
    count_r, present_r, count_f, present_f = sums

    volumes = np.array([float(math.prod(p)) for p in sizes])[:, None]
    frac_r = count_r / n_cases / volumes
    frac_f = count_f / n_cases / volumes
    pres_r = present_r / n_cases
    pres_f = present_f / n_cases
    o = np.asarray(ratios)[None, :, None]
    fraction = (1 - o) * frac_r[:, None, :] + o * frac_f[:, None, :]
    presence = (1 - o) * pres_r[:, None, :] + o * pres_f[:, None, :]
    score, share, absent = imbalance_score(fraction, presence, seen, batch_size)
    with np.errstate(invalid="ignore", divide="ignore"):
        coverage = np.where(containing > 0, coverage_sum / containing, np.nan)
        co_presence = np.where(containing[:, None] > 0, co_presence_sum / containing[:, None], np.nan)
    return ImbalanceReport(
        patch_sizes=sizes, oversample_foreground=ratios, class_names=list(class_names), presence=presence,
        fraction=fraction, coverage=coverage, co_presence=co_presence, score=score, share_term=share,
        presence_term=absent,
        presence_random=pres_r, presence_foreground=pres_f, fraction_random=frac_r, fraction_foreground=frac_f,
        scored=seen, batch_size=int(batch_size), spacing=spacing, num_cases=n_cases, ignore_label=ignore_label,
        seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------- trainer glue
def unet_memory_fn(spacing: Sequence[float], num_classes: int, *, batch_size: int = 2, base_features: int = 32,
                   max_features: int = 320) -> Callable[[Sequence[int]], int]:
    """patch size -> :func:`estimate_training_memory` of the reference :class:`fastseg.models.UNet` planned for
    it (one input channel) at the size it trains on (:func:`fastseg.models.trained_patch_size`), memoised: the
    estimate the trainer's ``patch_size: auto`` budgets with."""
    from fastseg.models import UNet, trained_patch_size

    spacing = tuple(float(s) for s in spacing)

    @functools.lru_cache(maxsize=None)
    def memory(patch: Tuple[int, ...]) -> int:
        trained = trained_patch_size(patch, spacing, base_features=base_features, max_features=max_features)
        net = UNet.from_patch_size(1, num_classes, trained, spacing, base_features=base_features,
                                   max_features=max_features)
        return estimate_training_memory(net, trained, batch_size=batch_size)

    return lambda patch: memory(tuple(int(p) for p in patch))


def _median_shape(shapes: Sequence[Sequence[int]]) -> np.ndarray:
    return np.median(np.asarray([list(s) for s in shapes], dtype=np.float64), axis=0)


def candidate_patch_sizes(shapes: Sequence[Sequence[int]], *, fractions=(0.5, 0.625, 0.75, 0.875, 1.0),
                          multiple: Sequence[int] = None) -> List[Tuple[int, ...]]:
    """Patch sizes of the median case shape's aspect: fractions of it, rounded to ``multiple`` (default 16 per
    axis, 8 along a short last axis). nnU-Net's rule takes the largest of these that fits the memory.

    At a fixed aspect the imbalance score is lowest for the smallest patch when foreground is oversampled (the
    module doc), so a choice among these by score alone is a choice of the least context; hence the candidates
    start at half the case extent. :func:`budget_patch_sizes` searches the aspect at a fixed cost instead.
    """
    median = _median_shape(shapes)
    if multiple is None:
        multiple = [8 if n < 64 else 16 for n in median]
    out = []
    for f in fractions:
        size = tuple(int(max(m, round(n * f / m) * m)) for n, m in zip(median, multiple))
        if size not in out:
            out.append(size)
    return out


def budget_patch_sizes(shapes: Sequence[Sequence[int]], memory_fn: Callable[[Sequence[int]], int],
                       memory_budget_gb: float, *, min_fill: float = 0.85, steps: int = 8,
                       multiple: int = 8) -> List[Tuple[int, ...]]:
    """Patch sizes of about the cost the budget allows, in every aspect: the candidates of ``patch_size: auto``.

    Memory decides how many voxels a patch can have; how to shape them is the question the imbalance score
    can answer (wide enough to hold both parotids, flat enough to leave voxels for that, ...). Tappeiner et
    al. 2022 choose nnU-Net's patch size by a class-imbalance measure; here the budget fixes the cost and the
    score picks the shape. The grid: per axis ``k / steps`` of the median case extent for ``k = 2 .. steps`` (a
    quarter up to the whole; more would only pad), rounded to ``multiple``; where even its smallest shape does
    not fit the budget, the grid of the halved extent (repeatedly, down to ``multiple`` per axis). Kept: the
    shapes whose estimated memory lies between ``min_fill`` times the usable budget (the budget, or the memory
    of the whole median shape where that is less) and the budget.

    Args:
        shapes: the (preprocessed) case shapes.
        memory_fn: patch size -> estimated bytes of a training step (e.g. :func:`unet_memory_fn`).
        memory_budget_gb: GiB (2**30 bytes).
        min_fill: in (0, 1], the least share of the usable budget a candidate uses.
        steps: grid resolution per axis.
        multiple: every patch extent is a multiple of it.

    Returns:
        the candidates, smallest first.

    Raises:
        ValueError: bad arguments, or no shape of the grid fits the budget (the message gives the smallest
            estimate).
    """
    where = "budget_patch_sizes"
    if not callable(memory_fn):
        _fail(where, "memory_fn", "a callable patch_size -> bytes", memory_fn)
    if isinstance(memory_budget_gb, bool) or not isinstance(memory_budget_gb, numbers.Real) \
            or not memory_budget_gb > 0 or not math.isfinite(memory_budget_gb):
        _fail(where, "memory_budget_gb", "a positive number of GiB", memory_budget_gb)
    if isinstance(min_fill, bool) or not isinstance(min_fill, numbers.Real) or not 0 < min_fill <= 1:
        _fail(where, "min_fill", "a share in (0, 1]", min_fill)
    for name, value, least in (("steps", steps, 4), ("multiple", multiple, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            _fail(where, name, f"an integer >= {least}", value)
    extent = _median_shape(shapes)
    budget = memory_budget_gb * 2 ** 30
    while True:
        axes = [sorted({int(max(multiple, round(n * k / steps / multiple) * multiple))
                        for k in range(2, steps + 1)}) for n in extent]
        grid = sorted(itertools.product(*axes), key=lambda s: (int(np.prod(s)), s))
        lo = memory_fn(grid[0])
        # Large cases under a small budget: even a quarter of the median does not fit; the grid of the
        # halved extent still offers every aspect (rather than an error the user can only fix with memory)
        if lo <= budget or all(p == multiple for p in grid[0]):
            break
        extent = extent / 2
    hi = memory_fn(grid[-1])
    usable = min(budget, hi)
    # Memory is nearly affine in the voxel count: a line through the grid's two ends picks the shapes worth
    # an exact estimate (30 % slack for the network plans, which differ with the aspect).
    v0, v1 = np.prod(grid[0]), np.prod(grid[-1])
    rate = (hi - lo) / max(v1 - v0, 1)
    near = [s for s in grid if min_fill * usable / 1.3 <= lo + rate * (np.prod(s) - v0) <= 1.3 * budget]
    kept = [s for s in near if min_fill * usable <= memory_fn(s) <= budget]
    if not kept:
        if lo > budget:
            raise ValueError(f"{where}: memory_budget_gb: no patch size fits {memory_budget_gb} GiB; the smallest "
                             f"estimate is {lo / 2 ** 30:.2f} GiB for {_format_size(grid[0])}")
        kept = [max((s for s in grid if memory_fn(s) <= budget), key=memory_fn)]
    return kept


def auto_patch_sizes(shapes: Sequence[Sequence[int]], *, spacing: Sequence[float], num_classes: int,
                     memory_budget_gb: float, batch_size: int = 2, base_features: int = 32,
                     max_features: int = 320, min_fill: float = 0.85,
                     memory_fn: Optional[Callable[[Sequence[int]], int]] = None) -> List[Tuple[int, ...]]:
    """The candidates of ``patch_size: auto``: the :func:`budget_patch_sizes` of the configured reference
    U-Net, each taken at the size the network trains on (:func:`fastseg.models.trained_patch_size`, so two
    grid shapes that train alike are scored once). ``memory_fn`` (default: :func:`unet_memory_fn` of the same
    configuration) lets a caller share its memoised estimates."""
    from fastseg.models import trained_patch_size

    if memory_fn is None:
        memory_fn = unet_memory_fn(spacing, num_classes, batch_size=batch_size, base_features=base_features,
                                   max_features=max_features)
    sizes = budget_patch_sizes(shapes, memory_fn, memory_budget_gb, min_fill=min_fill)
    return list(dict.fromkeys(trained_patch_size(s, spacing, base_features=base_features,
                                                 max_features=max_features) for s in sizes))


def recommend_patch_size(label_maps: Sequence[np.ndarray], *, spacing: Sequence[float], num_classes: int,
                         oversample_foreground: float, memory_budget_gb: float, batch_size: int = 2,
                         base_features: int = 32, max_features: int = 320,
                         min_coverage: Optional[float] = None, min_fill: float = 0.85) -> List[int]:
    """The trainer's ``patch_size: auto``: of the :func:`auto_patch_sizes` (estimated training memory of the
    configured reference U-Net between ``min_fill`` of the budget and the budget, at the sizes the network
    trains on), the one with the lowest imbalance score and, with ``min_coverage``, whose least covered organ
    reaches it (:meth:`ImbalanceReport.best`)."""
    memory = unet_memory_fn(spacing, num_classes, batch_size=batch_size, base_features=base_features,
                            max_features=max_features)
    sizes = auto_patch_sizes([m.shape for m in label_maps], spacing=spacing, num_classes=num_classes,
                             memory_budget_gb=memory_budget_gb, batch_size=batch_size,
                             base_features=base_features, max_features=max_features, min_fill=min_fill,
                             memory_fn=memory)
    report = analyze_imbalance(label_maps, sizes, oversample_foreground=(float(oversample_foreground),),
                               num_classes=num_classes, spacing=spacing, batch_size=batch_size)
    return list(report.best(memory_budget_gb, memory, min_coverage=min_coverage).patch_size)
