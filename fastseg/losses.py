"""nn.Module front-ends of fastseg.functional, and the deep-supervision wrapper."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from fastseg import functional as F_

__all__ = ["DiceCELoss", "DiceLoss", "DeepSupervisionLoss", "downsample_labels"]

_CHOICES = {"activation": tuple(F_._ACTIVATIONS), "reduction": F_._REDUCTIONS, "absent_classes": F_._ABSENT}


class _FusedLoss(nn.Module):
    """Stores the functional's keyword arguments; the last pass's statistics are kept in ``last_stats``."""

    _fn = None

    def __init__(self, **kwargs):
        super().__init__()
        weight = kwargs.pop("weight", None)
        pos_weight = kwargs.pop("pos_weight", None)
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.register_buffer(
            "pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        )
        self.options = kwargs
        self.last_stats: Optional[F_.DiceCEStats] = None
        # Validate the choice options now rather than at the first forward.
        for key, choices in _CHOICES.items():
            if key in kwargs:
                F_._check_choice(key, kwargs[key], choices)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        extra = {"weight": self.weight}
        if self.pos_weight is not None:
            extra["pos_weight"] = self.pos_weight
        loss, self.last_stats = type(self)._fn(logits, target, **self.options, **extra, return_stats=True)
        return loss

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class DiceCELoss(_FusedLoss):
    """Fused soft Dice + cross-entropy; see :func:`fastseg.functional.dice_ce_loss` for every argument.

    Example:
        >>> loss_fn = DiceCELoss(include_background=False, absent_classes="ignore")
        >>> loss = loss_fn(torch.randn(2, 4, 8, 8, 8), torch.randint(0, 4, (2, 8, 8, 8)))
    """

    _fn = staticmethod(F_.dice_ce_loss)

    def __init__(self, *, activation="softmax", include_background=True, batch_dice=False, smooth_nr=1e-5,
                 smooth_dr=1e-5, squared_pred=False, weight=None, pos_weight=None, lambda_dice=1.0,
                 lambda_ce=1.0, ignore_index=None, label_smoothing=0.0, reduction="mean",
                 absent_classes="keep", absent_penalty=0.0, sync_batch_dice=True):
        super().__init__(activation=activation, include_background=include_background, batch_dice=batch_dice,
                         smooth_nr=smooth_nr, smooth_dr=smooth_dr, squared_pred=squared_pred, weight=weight,
                         pos_weight=pos_weight, lambda_dice=lambda_dice, lambda_ce=lambda_ce,
                         ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
                         absent_classes=absent_classes, absent_penalty=absent_penalty,
                         sync_batch_dice=sync_batch_dice)


class DiceLoss(_FusedLoss):
    """Fused soft Dice loss; see :func:`fastseg.functional.dice_loss`."""

    _fn = staticmethod(F_.dice_loss)

    def __init__(self, *, activation="softmax", include_background=True, batch_dice=False, smooth_nr=1e-5,
                 smooth_dr=1e-5, squared_pred=False, weight=None, ignore_index=None, reduction="mean",
                 absent_classes="keep", absent_penalty=0.0, sync_batch_dice=True):
        super().__init__(activation=activation, include_background=include_background, batch_dice=batch_dice,
                         smooth_nr=smooth_nr, smooth_dr=smooth_dr, squared_pred=squared_pred, weight=weight,
                         ignore_index=ignore_index, reduction=reduction, absent_classes=absent_classes,
                         absent_penalty=absent_penalty, sync_batch_dice=sync_batch_dice)


def downsample_labels(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of the trailing spatial dims of a label map or mask to ``size``.

    Uses 'nearest-exact' sampling (source index floor((i + 0.5) * in / out)) — the same as MONAI's deep
    supervision — by index selection, so it works for every dtype and never blends labels.
    """
    size = tuple(int(s) for s in size)
    nd = len(size)
    if target.dim() < nd:
        raise ValueError(f"downsample_labels: target has {target.dim()} dims, fewer than size {size}")
    out = target
    for k, n_out in enumerate(size):
        dim = target.dim() - nd + k
        n_in = target.shape[dim]
        if n_in == n_out:
            continue
        idx = ((torch.arange(n_out, device=target.device, dtype=torch.float64) + 0.5) * (n_in / n_out)).floor()
        out = out.index_select(dim, idx.clamp_(max=n_in - 1).long())
    return out


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over deep-supervision outputs.

    ``forward(outputs, target)`` takes logits at decreasing resolution (highest first) and the
    full-resolution target, which is resized (nearest) to each level's spatial shape. ``weights``
    defaults to 1 / 2^i normalised to sum 1 (nnU-Net's scheme without its zeroed lowest level); levels
    with weight 0 are not evaluated.
    """

    def __init__(self, loss: nn.Module, weights: Optional[Sequence[float]] = None):
        super().__init__()
        self.loss = loss
        if weights is not None:
            w = [float(v) for v in weights]
            if any(v < 0 for v in w) or sum(w) <= 0:
                raise ValueError(f"DeepSupervisionLoss: weights must be non-negative with a positive sum, got {w}")
            self.weights = w
        else:
            self.weights = None

    def level_weights(self, levels: int) -> list:
        if self.weights is None:
            raw = [1.0 / 2**i for i in range(levels)]
            total = sum(raw)
            return [v / total for v in raw]
        if len(self.weights) != levels:
            raise ValueError(
                f"DeepSupervisionLoss: got {levels} outputs but {len(self.weights)} weights {self.weights}"
            )
        return self.weights

    def forward(self, outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        if len(outputs) == 0:
            raise ValueError("DeepSupervisionLoss: outputs must be a non-empty list of logits")
        total = None
        for w, out in zip(self.level_weights(len(outputs)), outputs):
            if w == 0:
                continue
            t = downsample_labels(target, out.shape[2:])
            term = w * self.loss(out, t)
            total = term if total is None else total + term
        return total
