"""Drop-in replacements for nnU-Net v2 (2.8.1)'s trainer loss: ``DC_and_CE_loss``, its Dice classes
``SoftDiceLoss`` / ``MemoryEfficientSoftDiceLoss``, ``RobustCrossEntropyLoss`` and ``DeepSupervisionWrapper``
(``nnunetv2.training.loss``), with nnU-Net's arguments, sign convention and values. nnU-Net is not imported.

**Fused path.** ``DC_and_CE_loss`` with softmax Dice (its fixed ``apply_nonlin``) on (b, 1, ...) label targets
(integer, or float cast with ``.long()`` as nnU-Net does) computes Dice and CE from one pass of
:func:`fastseg.functional.dice_ce_stats`: ``ignore_label`` is the kernel's ``ignore_index`` (out of the Dice
sums and of the CE, CE skipped when every voxel is ignored, without a host sync); ``ce_kwargs`` weight and
label_smoothing with 'mean' / 'sum'; ``batch_dice``, ``do_bg``, ``smooth``, ``clip_tp``; with ``ddp`` and
``batch_dice`` the per-class sums are summed over ranks by :func:`fastseg.distributed.all_reduce_sum` (nnU-Net
all-gathers and sums: the same values and gradient). A CE ``ignore_index`` that differs from the Dice's
takes a second (memory-light) pass. The Dice classes used alone are fused with ``apply_nonlin`` =
``softmax_helper_dim1`` (this module's or nnU-Net's) or ``torch.sigmoid``, on label targets (a boolean
``loss_mask`` included) or one-hot / [0, 1] targets of the prediction's shape.

**Fallback.** Everything else runs a plain PyTorch transcription of nnU-Net: a CE ``reduction='none'``, a CE
weight torch rejects, one-hot targets given to ``DC_and_CE_loss``, float labels that are not whole numbers
together with ``ignore_label``, a single output channel, a non-binary ``loss_mask``, other nonlinearities,
inputs without spatial dimensions.

**Documented deviations.**

* nnU-Net accumulates the Dice sums in float32 even for float64 logits; the fused path accumulates float64
  logits in float64 (values agree to float32 precision; the Dice term keeps nnU-Net's float32 dtype).
* ``ddp=True`` (nnU-Net's default) works without an initialised process group: the sums are then local,
  where nnU-Net's all-gather raises.
* ``ce_kwargs`` is copied, not updated in place with ``ignore_index`` as nnU-Net does.
* ``dice_class=None`` means nnU-Net's default, ``SoftDiceLoss``; nnU-Net's classes (or this module's, or
  their names) select by ``__name__``.
* ``DeepSupervisionWrapper(loss, weight_factors=None)`` weights every output 1, as nnU-Net documents
  (nnU-Net 2.8.1 raises a TypeError on None).
* With ``ignore_label`` and every voxel ignored, nnU-Net adds the integer 0 for the CE, so the result has the
  Dice term's float32 dtype; the fused path adds a zero of the logits' dtype (the same value).
* Labels that are neither a class nor the ignore label raise fastseg's ``ValueError`` on the fused path where
  nnU-Net raises the ``RuntimeError`` of ``scatter_``; in voxels excluded by a boolean ``loss_mask`` given to
  a Dice class they are not checked (nnU-Net's ``scatter_`` still fails on them).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from fastseg import distributed as _dist
from fastseg.compat.monai import _Pass, _fusable_input, _is_int, _labels, _mask_in_range, _run, _same_pass
from fastseg.compat.monai import _softmax_ce_terms

__all__ = [
    "DC_and_CE_loss",
    "SoftDiceLoss",
    "MemoryEfficientSoftDiceLoss",
    "RobustCrossEntropyLoss",
    "DeepSupervisionWrapper",
    "softmax_helper_dim1",
]

# Label value of voxels excluded by a boolean loss_mask; no class label can equal it.
_MASKED = torch.iinfo(torch.int64).min


def softmax_helper_dim1(x: torch.Tensor) -> torch.Tensor:
    """nnU-Net's ``softmax_helper_dim1``: softmax over the channel dimension."""
    return torch.softmax(x, 1)


def _activation_of(apply_nonlin: Optional[Callable]) -> Optional[str]:
    """The kernel activation equal to ``apply_nonlin``, or None when the kernel cannot apply it."""
    if apply_nonlin is softmax_helper_dim1:
        return "softmax"
    if apply_nonlin is torch.sigmoid:
        return "sigmoid"
    if (getattr(apply_nonlin, "__name__", None) == "softmax_helper_dim1"
            and getattr(apply_nonlin, "__module__", "") == "nnunetv2.utilities.helpers"):
        return "softmax"
    return None


def _unwrap(module):
    """The module behind a ``torch.compile`` wrapper (nnU-Net's trainer compiles ``loss.dc``)."""
    return getattr(module, "_orig_mod", module)


# ------------------------------------------------------------------------------------------- Dice classes


class _SoftDice(nn.Module):
    """Shared routing of nnU-Net's two soft Dice losses; subclasses give the Dice formula and the fallback."""

    def __init__(self, apply_nonlin: Optional[Callable] = None, batch_dice: bool = False, do_bg: bool = True,
                 smooth: float = 1.0, ddp: bool = True):
        super().__init__()
        self.do_bg = do_bg
        self.batch_dice = batch_dice
        self.apply_nonlin = apply_nonlin
        self.smooth = smooth
        self.ddp = ddp

    def _fused_pass(self, x, y, loss_mask) -> Optional[_Pass]:
        activation = _activation_of(self.apply_nonlin)
        if activation is None or not _fusable_input(x) or not isinstance(y, torch.Tensor):
            return None
        if (activation == "softmax" and x.shape[1] < 2) or y.device != x.device or y.dtype.is_complex:
            return None
        if y.dim() == x.dim() - 1:
            y = y.unsqueeze(1)
        if y.dim() != x.dim() or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
            return None
        if y.shape == x.shape:  # nnU-Net reads a target of the prediction's shape as one-hot
            if loss_mask is not None or not _mask_in_range(y, binary=False):
                return None
            return _Pass(activation, y, None, False)
        if y.shape[1] != 1:
            return None
        labels = _labels(y)
        if loss_mask is None:
            return _Pass(activation, labels, None, True)
        if not isinstance(loss_mask, torch.Tensor) or loss_mask.device != x.device:
            return None
        if loss_mask.shape != y.shape or not _mask_in_range(loss_mask, binary=True):
            return None
        labels = torch.where(loss_mask[:, 0].bool(), labels.long(), _MASKED)
        return _Pass(activation, labels, _MASKED, True)

    def _sums(self, stats: torch.Tensor):
        """I, P, G as nnU-Net reduces them: (b, c), or (c,) summed over the batch and, with ddp, the ranks."""
        I, P, G = stats[..., 0], stats[..., 1], stats[..., 2]
        if self.batch_dice:
            I, P, G = I.sum(0), P.sum(0), G.sum(0)
            if self.ddp:
                I, P, G = _dist.all_reduce_sum(torch.stack([I, P, G])).unbind(0)
        return I, P, G

    def _from_stats(self, stats: torch.Tensor) -> torch.Tensor:
        dc = self._dc(*self._sums(stats))
        if not self.do_bg:
            dc = dc[..., 1:]
        # nnU-Net's sums, hence its Dice, are float32 whatever the logits' dtype.
        return -dc.mean().to(torch.float32)

    def _dc(self, I, P, G):
        raise NotImplementedError

    def _reference(self, x, y, loss_mask):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (b, c, ...) logits; y: (b, 1, ...) or (b, ...) labels, or a (b, c, ...) one-hot target;
        loss_mask: (b, 1, ...), 1 where the voxel counts. Returns -mean(Dice)."""
        p = self._fused_pass(x, y, loss_mask)
        if p is None:
            return self._reference(x, y, loss_mask)
        return self._from_stats(_run(x, p, False))


def _one_hot_like(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """nnU-Net's target encoding: a target of x's shape is taken as one-hot, else labels are scattered."""
    with torch.no_grad():
        if x.dim() != y.dim():
            y = y.view((y.shape[0], 1, *y.shape[1:]))
        if x.shape == y.shape:
            return y.to(torch.float32)
        y_onehot = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        y_onehot.scatter_(1, y.long(), 1)
        return y_onehot


class SoftDiceLoss(_SoftDice):
    """nnU-Net v2's ``SoftDiceLoss``: per (sample or batch, class) dc = (2 tp + smooth) /
    clip(2 tp + fp + fn + smooth, 1e-8) with tp optionally clipped below at ``clip_tp``; returns -mean(dc)
    (background dropped unless ``do_bg``). See the module docstring for the fused path and deviations."""

    def __init__(self, apply_nonlin: Optional[Callable] = None, batch_dice: bool = False, do_bg: bool = True,
                 smooth: float = 1.0, ddp: bool = True, clip_tp: Optional[float] = None):
        super().__init__(apply_nonlin=apply_nonlin, batch_dice=batch_dice, do_bg=do_bg, smooth=smooth, ddp=ddp)
        self.clip_tp = clip_tp

    def _dc(self, I, P, G):
        tp, fp, fn = I, P - I, G - I
        if self.clip_tp is not None:
            tp = torch.clip(tp, min=self.clip_tp, max=None)
        return (2 * tp + self.smooth) / torch.clip(2 * tp + fp + fn + self.smooth, 1e-8)

    def _reference(self, x, y, loss_mask):
        axes = ([0] if self.batch_dice else []) + list(range(2, x.dim()))
        if self.apply_nonlin is not None:
            x = self.apply_nonlin(x)
        y_onehot = _one_hot_like(x, y)
        tp = x * y_onehot
        fp = x * (1 - y_onehot)
        fn = (1 - x) * y_onehot
        if loss_mask is not None:
            with torch.no_grad():
                m = torch.tile(loss_mask, (1, tp.shape[1], *[1 for _ in range(2, tp.dim())]))
            tp, fp, fn = tp * m, fp * m, fn * m
        if len(axes) > 0:
            tp, fp, fn = (t.sum(dim=axes, dtype=torch.float32) for t in (tp, fp, fn))
        if self.ddp and self.batch_dice:
            # nnU-Net all-gathers and sums; the sum of an all-gather is an all-reduce
            tp, fp, fn = (_dist.all_reduce_sum(t).to(torch.float32) for t in (tp, fp, fn))
        if self.clip_tp is not None:
            tp = torch.clip(tp, min=self.clip_tp, max=None)
        dc = (2 * tp + self.smooth) / torch.clip(2 * tp + fp + fn + self.smooth, 1e-8)
        if not self.do_bg:
            dc = dc[1:] if self.batch_dice else dc[:, 1:]
        return -dc.mean()


class MemoryEfficientSoftDiceLoss(_SoftDice):
    """nnU-Net v2's ``MemoryEfficientSoftDiceLoss`` (what its trainer uses): dc = (2 I + smooth) /
    clip(G + P + smooth, 1e-8) per (sample or batch, class); returns -mean(dc) (background dropped unless
    ``do_bg``). See the module docstring for the fused path and deviations."""

    def _dc(self, I, P, G):
        return (2 * I + self.smooth) / (G + P + float(self.smooth)).clamp_min(1e-8)

    def _reference(self, x, y, loss_mask):
        if self.apply_nonlin is not None:
            x = self.apply_nonlin(x)
        axes = tuple(range(2, x.dim()))
        y_onehot = _one_hot_like(x, y)
        if not self.do_bg:
            y_onehot = y_onehot[:, 1:]
            x = x[:, 1:]
        with torch.no_grad():
            counted = y_onehot if loss_mask is None else y_onehot * loss_mask
            sum_gt = counted.sum(axes, dtype=torch.float32)
        if loss_mask is None:
            intersect = (x * y_onehot).sum(axes, dtype=torch.float32)
            sum_pred = x.sum(axes, dtype=torch.float32)
        else:
            intersect = (x * y_onehot * loss_mask).sum(axes, dtype=torch.float32)
            sum_pred = (x * loss_mask).sum(axes, dtype=torch.float32)
        if self.batch_dice:
            intersect, sum_pred, sum_gt = (t.sum(0, dtype=torch.float32) for t in (intersect, sum_pred, sum_gt))
            if self.ddp:
                intersect, sum_pred, sum_gt = (_dist.all_reduce_sum(t) for t in (intersect, sum_pred, sum_gt))
        dc = (2 * intersect + self.smooth) / (sum_gt + sum_pred + float(self.smooth)).clamp_min(1e-8)
        return -dc.mean()


_DICE_CLASSES = {"SoftDiceLoss": SoftDiceLoss, "MemoryEfficientSoftDiceLoss": MemoryEfficientSoftDiceLoss}


def _dice_class(dice_class):
    if dice_class is None:
        return SoftDiceLoss
    name = dice_class if isinstance(dice_class, str) else getattr(dice_class, "__name__", None)
    if name not in _DICE_CLASSES:
        raise ValueError(
            "fastseg.compat.nnunet.DC_and_CE_loss: dice_class must be None, SoftDiceLoss or "
            "MemoryEfficientSoftDiceLoss (nnU-Net's classes, this module's, or their names), "
            f"got {dice_class!r}"
        )
    return _DICE_CLASSES[name]


# ------------------------------------------------------------------------------------------ cross-entropy


class RobustCrossEntropyLoss(nn.CrossEntropyLoss):
    """nnU-Net's ``RobustCrossEntropyLoss``: ``nn.CrossEntropyLoss`` taking (b, 1, ...) float labels."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == input.ndim:
            assert target.shape[1] == 1
            target = target[:, 0]
        return super().forward(input, target.long())


# -------------------------------------------------------------------------------------------- compound


class DC_and_CE_loss(nn.Module):
    """nnU-Net v2's ``DC_and_CE_loss``: ``weight_ce * CE + weight_dice * (-mean Dice)`` with a softmax Dice.

    Args:
        soft_dice_kwargs: arguments of the Dice class (batch_dice, do_bg, smooth, ddp; clip_tp for
            SoftDiceLoss); the nonlinearity is fixed to softmax.
        ce_kwargs: arguments of ``torch.nn.CrossEntropyLoss`` (weight, ignore_index, label_smoothing,
            reduction, ...).
        weight_ce, weight_dice: weights of the two terms; a zero weight skips its term.
        ignore_label: label excluded from the Dice sums and used as the CE's ignore_index; the CE is skipped
            when every voxel is ignored.
        dice_class: None (nnU-Net's default SoftDiceLoss), or SoftDiceLoss / MemoryEfficientSoftDiceLoss
            (nnU-Net's classes or this module's, compared by name; nnU-Net's trainer uses the latter).

    ``forward(net_output, target)``: (b, c, ...) logits and (b, 1, ...) labels (float allowed). Submodules
    ``ce`` and ``dc`` mirror nnU-Net's (same state dict). See the module docstring for the fused path and the
    documented deviations.

    Example:
        >>> loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
        ...                          dice_class=MemoryEfficientSoftDiceLoss)
        >>> loss = loss_fn(torch.randn(2, 4, 8, 8, 8), torch.randint(0, 4, (2, 1, 8, 8, 8)).float())
    """

    def __init__(self, soft_dice_kwargs, ce_kwargs, weight_ce=1, weight_dice=1, ignore_label=None,
                 dice_class=None):
        super().__init__()
        ce_kwargs = dict(ce_kwargs)
        if ignore_label is not None:
            ce_kwargs["ignore_index"] = ignore_label
        self.weight_dice = weight_dice
        self.weight_ce = weight_ce
        self.ignore_label = ignore_label
        self.ce = RobustCrossEntropyLoss(**ce_kwargs)
        self.dc = _dice_class(dice_class)(apply_nonlin=softmax_helper_dim1, **soft_dice_kwargs)

    def _fused_passes(self, x, target):
        """(dice pass, CE pass) of the kernel for this call, a pass being None when its term is off; or None
        when the call goes through the Dice module and torch's CE (the fallback)."""
        dc = _unwrap(self.dc)
        if not isinstance(dc, _SoftDice) or _activation_of(dc.apply_nonlin) != "softmax":
            return None
        if not _fusable_input(x) or not isinstance(target, torch.Tensor) or x.shape[1] < 2:
            return None
        if (target.dim() != x.dim() or target.shape[1] != 1 or target.shape[0] != x.shape[0]
                or target.shape[2:] != x.shape[2:] or target.device != x.device or target.dtype.is_complex):
            return None
        C = x.shape[1]
        il = self.ignore_label
        if il is not None:
            if not _is_int(il):
                return None
            # nnU-Net masks by comparing the float labels but encodes their truncation: only whole numbers
            # give the same voxels both ways.
            if target.dtype.is_floating_point and target.numel() and not bool((target == target.trunc()).all()):
                return None
        labels = _labels(target)
        dice_pass = _Pass("softmax", labels, il, True) if self.weight_dice != 0 else None
        if self.weight_ce == 0:
            return dice_pass, None
        ce = self.ce
        if ce.reduction not in ("mean", "sum") or not 0.0 <= ce.label_smoothing <= 1.0:
            return None
        if ce.weight is not None and (ce.weight.dim() != 1 or ce.weight.shape[0] != C):
            return None
        ii = ce.ignore_index
        if il is None and dice_pass is not None and not 0 <= ii < C:
            # No label can equal an out-of-range ignore_index without the Dice's one-hot failing (here and in
            # nnU-Net), so the Dice pass serves the CE as well.
            return dice_pass, dice_pass
        return dice_pass, _Pass("softmax", labels, ii, True)

    def _ce_from_stats(self, x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        ce = self.ce
        num, label_weight = _softmax_ce_terms(stats, ce.weight, float(ce.label_smoothing))
        if self.ignore_label is None:
            loss = num if ce.reduction == "sum" else num / label_weight
            return loss.to(x.dtype)
        # nnU-Net skips the CE when every voxel is ignored; torch.where keeps that free of a host sync, and the
        # safe divisor keeps the 0/0 of the skipped branch out of the gradient.
        has_fg = stats[..., 2].sum() > 0
        if ce.reduction != "sum":
            num = num / torch.where(has_fg, label_weight, torch.ones_like(label_weight))
        return torch.where(has_fg, num, torch.zeros_like(num)).to(x.dtype)

    def _reference(self, net_output, target):
        """nnU-Net's forward: the Dice module (fused where it can be) and torch's CE."""
        if self.ignore_label is not None:
            mask = target != self.ignore_label
            target_dice = torch.where(mask, target, 0)
            num_fg = mask.sum()
        else:
            target_dice = target
            mask = None
        dc_loss = self.dc(net_output, target_dice, loss_mask=mask) if self.weight_dice != 0 else 0
        ce_loss = (self.ce(net_output, target[:, 0])
                   if self.weight_ce != 0 and (self.ignore_label is None or num_fg > 0) else 0)
        return self.weight_ce * ce_loss + self.weight_dice * dc_loss

    def forward(self, net_output: torch.Tensor, target: torch.Tensor):
        """net_output: (b, c, ...) logits; target: (b, 1, ...) labels."""
        if self.ignore_label is not None:
            assert target.shape[1] == 1, 'ignore label is not implemented for one hot encoded target variables ' \
                                         '(DC_and_CE_loss)'
        passes = self._fused_passes(net_output, target)
        if passes is None:
            return self._reference(net_output, target)
        dice_pass, ce_pass = passes
        dc_loss = ce_loss = 0
        stats = None
        if dice_pass is not None:
            stats = _run(net_output, dice_pass, False)
            dc_loss = _unwrap(self.dc)._from_stats(stats)
        if ce_pass is not None:
            ce_stats = stats if _same_pass(dice_pass, ce_pass) else _run(net_output, ce_pass, False)
            ce_loss = self._ce_from_stats(net_output, ce_stats)
        return self.weight_ce * ce_loss + self.weight_dice * dc_loss


# ------------------------------------------------------------------------------------- deep supervision


class DeepSupervisionWrapper(nn.Module):
    """nnU-Net v2's ``DeepSupervisionWrapper``: ``sum_i w_i * loss(args[0][i], args[1][i], ...)`` over the
    levels whose weight is not 0 (those are not evaluated). Every argument is a tuple or list (outputs
    highest resolution first, targets already downsampled); ``weight_factors`` are used as given (nnU-Net's
    trainer passes 1 / 2^i with the lowest level 0, normalised to sum 1); None weights every level 1.
    """

    def __init__(self, loss, weight_factors=None):
        super().__init__()
        if weight_factors is not None:
            assert any([x != 0 for x in weight_factors]), "At least one weight factor should be != 0.0"
            weight_factors = tuple(weight_factors)
        self.weight_factors = weight_factors
        self.loss = loss

    def forward(self, *args):
        assert all([isinstance(i, (tuple, list)) for i in args]), \
            f"all args must be either tuple or list, got {[type(i) for i in args]}"
        weights = (1,) * len(args[0]) if self.weight_factors is None else self.weight_factors
        return sum([weights[i] * self.loss(*inputs) for i, inputs in enumerate(zip(*args)) if weights[i] != 0.0])
