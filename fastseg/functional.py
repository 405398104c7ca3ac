"""Functional losses. Every loss is assembled on (B, C) tensors from the per-(sample, class) sums of one
fused kernel pass (fastseg.ops.dice_ce_stats), so no probability map, log-probability map or one-hot target
is ever materialised.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch

from fastseg import distributed as _dist
from fastseg.ops.dice_ce import SIGMOID, SOFTMAX, dice_ce_stats as _dice_ce_stats_op

__all__ = ["DiceCEStats", "dice_ce_loss", "dice_loss", "dice_ce_stats"]

WeightLike = Union[torch.Tensor, Sequence[float], None]

_ACTIVATIONS = {"softmax": SOFTMAX, "sigmoid": SIGMOID}
_REDUCTIONS = ("mean", "sum", "none")
_ABSENT = ("keep", "ignore")


class DiceCEStats(NamedTuple):
    """Per-(sample, class) statistics of one loss evaluation, detached, each (B, C).

    intersection = sum p g, pred_sum = sum p (sum p^2 with squared_pred), target_sum = sum g (voxel counts
    for label targets), present = target_sum > 0, ce = this class's share of the summed (weighted)
    cross-entropy. Ignored voxels count in none of them.
    """

    intersection: torch.Tensor
    pred_sum: torch.Tensor
    target_sum: torch.Tensor
    present: torch.Tensor
    ce: torch.Tensor


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"fastseg.dice_ce_loss: {name} must be {expected}, got {got!r}")


def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        _fail(name, "one of " + ", ".join(repr(c) for c in choices), value)


def _prepare(logits: torch.Tensor, target: torch.Tensor, activation: int, ignore_index: Optional[int]):
    """Validate and flatten to (B, C, N) logits and a (B, N) label or (B, C, N) mask target."""
    if not isinstance(logits, torch.Tensor):
        _fail("logits", "a torch.Tensor", type(logits).__name__)
    if not isinstance(target, torch.Tensor):
        _fail("target", "a torch.Tensor", type(target).__name__)
    if logits.dim() < 3:
        _fail("logits", "a (B, C, *spatial) tensor with at least one spatial dimension", _describe(logits))
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        _fail("logits", "float16, bfloat16, float32 or float64", _describe(logits))
    if target.device != logits.device:
        raise ValueError(
            f"fastseg.dice_ce_loss: logits and target must be on the same device, got logits on "
            f"{logits.device} and target on {target.device}"
        )
    B, C = logits.shape[:2]
    spatial = tuple(logits.shape[2:])
    n = math.prod(spatial)
    if activation == SOFTMAX and C < 2:
        _fail("logits", "at least 2 channels for activation='softmax' (use 'sigmoid' for one channel)",
              _describe(logits))
    is_float = target.dtype.is_floating_point
    if target.dim() == logits.dim() and target.shape[1] == 1 and C > 1:
        target = target[:, 0]
    if target.dim() == logits.dim() - 1:
        if is_float or target.is_complex():
            _fail("target", "integer class labels when shaped (B, *spatial) or (B, 1, *spatial) "
                  "(a float target must be a (B, C, *spatial) mask)", _describe(target))
        if tuple(target.shape) != (B, *spatial):
            _fail("target", f"labels of shape {(B, *spatial)} matching logits {tuple(logits.shape)}",
                  _describe(target))
        if target.dtype == torch.bool:
            target = target.view(torch.uint8)
        elif target.dtype in (torch.uint16, torch.uint32, torch.uint64):
            target = target.to(torch.int64)
        return logits.reshape(B, C, n), target.reshape(B, n)
    if target.dim() == logits.dim():
        if tuple(target.shape) != tuple(logits.shape):
            _fail("target", f"a mask of shape {tuple(logits.shape)} (same as logits) or labels of shape "
                  f"{(B, *spatial)}", _describe(target))
        if ignore_index is not None:
            _fail("ignore_index", "None with a (B, C, *spatial) mask target (ignore_index needs labels)",
                  ignore_index)
        target = _as_mask(target, logits)
        return logits.reshape(B, C, n), target.reshape(B, C, n)
    _fail("target", f"labels of shape {(B, *spatial)} or {(B, 1, *spatial)}, or a mask of shape "
          f"{tuple(logits.shape)}", _describe(target))


def _as_mask(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if target.dtype in (torch.bool, torch.uint8):
        return target.view(torch.uint8)
    checking = not torch.compiler.is_compiling() and target.numel() > 0
    if target.dtype.is_floating_point:
        if checking and not bool(((target >= 0) & (target <= 1)).all()):
            _fail("target", "a mask with values in [0, 1]", _describe(target))
        return target.to(acc)
    if checking and not bool(((target == 0) | (target == 1)).all()):
        _fail("target", "a binary (0/1) mask when it has the logits' shape", _describe(target))
    return target.to(torch.uint8)


def _class_vector(name: str, value: WeightLike, C: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    if value is None:
        return None
    v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if v.dim() == 0:
        v = v.expand(C)
    if v.shape != (C,):
        _fail(name, f"a scalar or one value per class ({C})", tuple(v.shape))
    if not torch.compiler.is_compiling() and bool((v < 0).any()):
        _fail(name, "non-negative", v.tolist())
    return v


def dice_ce_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    activation: str = "softmax",
    ignore_index: Optional[int] = None,
    squared_pred: bool = False,
) -> torch.Tensor:
    """The raw fused statistics: a (B, C, 5) tensor [I, P, G, A, U] (see csrc/dice_ce/dice_ce.h),
    differentiable with respect to ``logits``. For building losses of your own."""
    _check_choice("activation", activation, tuple(_ACTIVATIONS))
    act = _ACTIVATIONS[activation]
    x, t = _prepare(logits, target, act, ignore_index)
    return _dice_ce_stats_op(x, t, act, ignore_index, bool(squared_pred))


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    activation: str = "softmax",
    include_background: bool = True,
    batch_dice: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    squared_pred: bool = False,
    weight: WeightLike = None,
    pos_weight: WeightLike = None,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    absent_classes: str = "keep",
    absent_penalty: float = 0.0,
    sync_batch_dice: bool = True,
    return_stats: bool = False,
):
    r"""Fused multi-class soft Dice + cross-entropy in one pass over the logits.

    Args:
        logits: (B, C, \*spatial) raw scores, float16 / bfloat16 / float32 / float64, any strides
            (channels_last_3d too). Sums are accumulated in float32 (float64 for float64 logits).
        target: integer labels (B, \*spatial) or (B, 1, \*spatial) of any integer dtype, or a
            (B, C, \*spatial) mask (bool / integer 0-1, or float in [0, 1] as soft or one-hot targets) —
            masks allow overlapping organs (Lens inside Orbit) with ``activation='sigmoid'``.
        activation: ``'softmax'`` (mutually exclusive classes, CE) or ``'sigmoid'`` (independent
            channels, binary CE per channel).
        include_background: keep channel 0 in the Dice term (CE always uses every class).
        batch_dice: sum I, P, G over the batch (and, under ``torch.distributed`` with
            ``sync_batch_dice``, over every rank with a correct gradient) before the ratio.
        smooth_nr, smooth_dr: Dice_c = (2 I_c + smooth_nr) / (P_c + G_c + smooth_dr) (MONAI's names).
        squared_pred: P = sum p^2 and G = sum g^2 in the denominator.
        weight: per-class weights (C,), multiplying each class's Dice loss and its CE (as
            ``F.cross_entropy``'s ``weight``; per-channel BCE weight with sigmoid).
        pos_weight: sigmoid only, per-class weight of the positive BCE term (``BCEWithLogitsLoss``).
        lambda_dice, lambda_ce: weights of the two terms.
        ignore_index: label whose voxels count in neither term (label targets only).
        label_smoothing: softmax only, as ``F.cross_entropy``.
        reduction: ``'mean'`` — mean Dice loss (see ``absent_classes``) + mean CE over voxels as
            ``F.cross_entropy`` / ``BCEWithLogitsLoss``; ``'sum'`` — summed Dice terms + summed CE;
            ``'none'`` — a (B, C) tensor of per-sample, per-class terms whose sum is the ``'sum'``
            value: ``lambda_dice`` times the Dice term (divided by B with ``batch_dice``) plus
            ``lambda_ce`` times the class's share of the summed CE (voxels labelled c for softmax,
            channel c for sigmoid) plus the absent-class penalty; excluded classes have Dice term 0.
        absent_classes: ``'keep'`` — mean of (1 - Dice_c) over all (sample, class) pairs (MONAI,
            nnU-Net); ``'ignore'`` — the class adaptive Dice of Tappeiner et al. 2022: per sample, the
            mean of (1 - Dice_c) over the classes present in that sample's target (present anywhere
            in the batch with ``batch_dice``), then the mean over samples; a sample with no present
            class contributes 0.
        absent_penalty: weight of an explicit penalty on predicted mass of absent classes: per
            sample, sum over (Dice-counted) classes absent from its target of P_c / #valid voxels,
            i.e. the fraction of the patch predicted as organs that are not in it (in [0, 1] for
            softmax); averaged over samples (summed with ``'sum'``). Unlike the Dice of an absent
            class, whose gradient is ~smooth / P^2 and vanishes, this pushes every false-positive
            voxel with a constant 1 / N, like CE does, on top of it.
        sync_batch_dice: all-reduce batch Dice statistics across ``torch.distributed`` ranks.
        return_stats: also return the :class:`DiceCEStats` of this pass (free: same kernel pass).

    Returns:
        The loss (scalar, or (B, C) with ``reduction='none'``), and the stats if ``return_stats``.
        An empty batch gives 0 (connected to the graph) rather than nan.

    Example:
        >>> logits = torch.randn(2, 4, 16, 16, 16, requires_grad=True)
        >>> labels = torch.randint(0, 4, (2, 16, 16, 16), dtype=torch.uint8)
        >>> loss = dice_ce_loss(logits, labels, include_background=False, absent_classes="ignore")
        >>> loss.backward()
    """
    _check_choice("activation", activation, tuple(_ACTIVATIONS))
    _check_choice("reduction", reduction, _REDUCTIONS)
    _check_choice("absent_classes", absent_classes, _ABSENT)
    for name, value in (("smooth_nr", smooth_nr), ("smooth_dr", smooth_dr), ("lambda_dice", lambda_dice),
                        ("lambda_ce", lambda_ce), ("absent_penalty", absent_penalty)):
        if not isinstance(value, (int, float)) or value < 0:
            _fail(name, "a non-negative number", value)
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        _fail("label_smoothing", "a number in [0, 1]", label_smoothing)
    act = _ACTIVATIONS[activation]
    if act == SIGMOID and label_smoothing:
        _fail("label_smoothing", "0 with activation='sigmoid' (smoothing is defined for softmax CE)",
              label_smoothing)
    if act == SOFTMAX and pos_weight is not None:
        _fail("pos_weight", "None with activation='softmax' (it weights the positive BCE term)", pos_weight)
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        _fail("ignore_index", "an int or None", ignore_index)

    x, t = _prepare(logits, target, act, ignore_index)
    B, C, N = x.shape
    stats = _dice_ce_stats_op(x, t, act, ignore_index, bool(squared_pred))
    w = _class_vector("weight", weight, C, stats)
    pw = _class_vector("pos_weight", pos_weight, C, stats)
    loss, ce_bc = _assemble(
        stats, labels=t.dim() == 2, n_voxels=N, act=act, include_background=include_background,
        batch_dice=batch_dice, smooth_nr=float(smooth_nr), smooth_dr=float(smooth_dr), weight=w,
        pos_weight=pw, lambda_dice=float(lambda_dice), lambda_ce=float(lambda_ce),
        label_smoothing=float(label_smoothing), reduction=reduction, ignore_absent=absent_classes == "ignore",
        absent_penalty=float(absent_penalty), sync=sync_batch_dice,
    )
    if B == 0 or N == 0:
        loss = loss.nan_to_num(0.0)
    if not return_stats:
        return loss
    s = stats.detach()
    out = DiceCEStats(s[..., 0], s[..., 1], s[..., 2], s[..., 2] > 0, ce_bc.detach())
    return loss, out


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    activation: str = "softmax",
    include_background: bool = True,
    batch_dice: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    squared_pred: bool = False,
    weight: WeightLike = None,
    ignore_index: Optional[int] = None,
    reduction: str = "mean",
    absent_classes: str = "keep",
    absent_penalty: float = 0.0,
    sync_batch_dice: bool = True,
    return_stats: bool = False,
):
    """Soft Dice loss alone: :func:`dice_ce_loss` with ``lambda_ce=0`` (same arguments and semantics)."""
    return dice_ce_loss(
        logits, target, activation=activation, include_background=include_background, batch_dice=batch_dice,
        smooth_nr=smooth_nr, smooth_dr=smooth_dr, squared_pred=squared_pred, weight=weight,
        ignore_index=ignore_index, reduction=reduction, absent_classes=absent_classes,
        absent_penalty=absent_penalty, sync_batch_dice=sync_batch_dice, lambda_ce=0.0,
        return_stats=return_stats,
    )


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den == 0 (no host sync)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def _assemble(stats, *, labels, n_voxels, act, include_background, batch_dice, smooth_nr, smooth_dr, weight,
              pos_weight, lambda_dice, lambda_ce, label_smoothing, reduction, ignore_absent, absent_penalty,
              sync):
    """Loss from the (B, C, 5) sums. Returns (loss, per-(b, c) summed weighted CE)."""
    I, P, G, A, U = stats.unbind(-1)
    B, C = I.shape
    ones = torch.ones(C, dtype=stats.dtype, device=stats.device)
    w = ones if weight is None else weight

    # Cross-entropy, decomposed per (sample, class) so that summing gives F.cross_entropy's numerator.
    if act == SOFTMAX:
        ce_bc = w * ((1.0 - label_smoothing) * A + (label_smoothing / C) * U)
        ce_den = (w * G).sum() if labels else stats.new_tensor(float(B * n_voxels))
    else:
        ce_bc = w * ((ones if pos_weight is None else pos_weight) * A + U)
        ce_den = (G.sum() if labels else stats.new_tensor(float(B * n_voxels))) * C
    valid = G.sum(1) if labels else stats.new_full((B,), float(n_voxels))  # voxels per sample

    # Dice on per-sample or batch sums.
    if batch_dice:
        I, P, G = I.sum(0, keepdim=True), P.sum(0, keepdim=True), G.sum(0, keepdim=True)
        valid = valid.sum(0, keepdim=True)
        if sync and _dist.is_active():
            I, P, G = _dist.all_reduce_sum(torch.stack([I, P, G])).unbind(0)
            valid = G.sum(1) if labels else valid * _dist.world_size()
    dice = 1.0 - (2.0 * I + smooth_nr) / (P + G + smooth_dr)
    selected = ones.bool()
    if not include_background:
        selected = torch.arange(C, device=stats.device) > 0
    present = G > 0
    counted = selected & present if ignore_absent else selected.expand_as(dice)
    terms = torch.where(counted, w * dice, torch.zeros_like(dice))
    absent = selected & ~present
    pen_bc = torch.where(absent, P, torch.zeros_like(P)) / valid.clamp_min(1.0).unsqueeze(1)

    if reduction == "none":
        rows = float(B) if batch_dice else 1.0
        out = lambda_dice * terms / rows + lambda_ce * ce_bc + absent_penalty * pen_bc / rows
        return out, ce_bc
    if reduction == "sum":
        dice_red, ce_red, pen_red = terms.sum(), ce_bc.sum(), pen_bc.sum()
    else:
        if ignore_absent:
            dice_red = _safe_div(terms.sum(1), counted.sum(1).to(terms.dtype)).mean()
        else:
            dice_red = terms.sum() / (terms.shape[0] * selected.sum()).clamp_min(1)
        ce_red = _safe_div(ce_bc.sum(), ce_den)
        pen_red = pen_bc.sum(1).mean()
    loss = lambda_dice * dice_red + lambda_ce * ce_red
    if absent_penalty:
        loss = loss + absent_penalty * pen_red
    return loss, ce_bc
