"""Drop-in replacements for MONAI 1.6.1's ``monai.losses.DiceLoss`` and ``monai.losses.DiceCELoss``.

Both classes take MONAI's constructor arguments (same names, order and defaults), raise MONAI's errors and
warnings for the same arguments and inputs, and return MONAI's values, gradients and output shapes. MONAI is
not imported: it is only the reference of the tests.

**Fused path.** The common configurations run one pass of :func:`fastseg.functional.dice_ce_stats` over the
logits and assemble MONAI's formulas from the per-(sample, class) sums [I, P, G, A, U] (no probability map,
log-probability map or one-hot target is materialised):

* Dice / Jaccard: ``softmax=True`` (more than one channel) or ``sigmoid=True``, with ``to_onehot_y=True`` and
  (B, 1, ...) labels (integer, bool, or float truncated like MONAI's ``one_hot``; ``ignore_index`` of
  DiceLoss included), or with a (B, C, ...) mask target whose values lie in [0, 1] (exactly 0 or 1 when
  ``soft_label=True`` without ``squared_pred``). Every value of ``include_background``, ``batch``,
  ``squared_pred``, ``jaccard``, ``weight``, ``reduction``, ``smooth_nr`` and ``smooth_dr`` is handled there:
  tp = I, fp = P - I, fn = G - I (with ``squared_pred`` P and G are the sums of squares, which is what MONAI's
  norm-based formula reduces to).
* DiceCELoss's cross-entropy: ``nn.CrossEntropyLoss(weight, reduction, label_smoothing)`` on the raw logits is
  ``sum_c w_c((1 - eps) A_bc + eps / C U_bc)``, divided by ``sum_c w_c G_bc`` (label targets) or by the voxel
  count (probability targets) for ``'mean'``; with one channel ``BCEWithLogitsLoss(pos_weight=weight)`` is
  ``pos_weight A + U``. With softmax the Dice and CE share the pass; ``sigmoid=True`` with several channels
  needs a sigmoid pass (Dice) and a softmax pass (CE); the CE keeps its fused pass when the Dice falls back.

**Fallback.** Everything else runs a plain PyTorch transcription of MONAI's formulas: ``other_act``, no
activation (the input taken as probabilities, including ``softmax=True`` with one channel), ``soft_label``
with non-binary targets, mask targets outside [0, 1], ``ignore_index`` with a mask (one-hot) target (MONAI's
spatial masking of ``create_ignore_mask``), float labels that are not whole numbers together with
``ignore_index``, a target that requires grad, inputs with no spatial dimension, and any input MONAI rejects
(so that MONAI's own error is raised).

**Documented deviations.**

* The fused kernel accumulates float16 / bfloat16 inputs in float32 where MONAI sums in the input dtype, and
  float32 in a different order: values agree within normal floating-point tolerance (exactly for float64).
  The output dtype is MONAI's.
* Labels outside [0, C) raise fastseg's ``ValueError`` on the fused path where MONAI raises the
  ``RuntimeError`` of ``scatter_``.
* MONAI rewrites its ``class_weight`` buffer in place when a scalar weight is first expanded to the number of
  classes (so a later call with another number of classes fails); here the scalar is expanded per call and the
  buffer is left as given.
"""
from __future__ import annotations

import warnings
from collections.abc import Hashable
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.loss import _Loss

from fastseg import functional as _F

__all__ = [
    "DiceLoss",
    "DiceCELoss",
    "compute_hausdorff_distance",
    "compute_average_surface_distance",
    "compute_surface_dice",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOSS_REDUCTIONS = ("none", "mean", "sum")
_DICECE_REDUCTIONS = ("mean", "sum")


# --------------------------------------------------------------------------------------------- arguments


def _loss_reduction(reduction) -> str:
    """MONAI's ``LossReduction(reduction).value``: the enum lookup accepts the value strings (and StrEnum
    members, which compare equal to them) and raises the enum's ValueError otherwise."""
    if isinstance(reduction, str):
        for value in _LOSS_REDUCTIONS:
            if reduction == value:
                return value
    raise ValueError(f"{reduction!r} is not a valid LossReduction")


def _edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance (edits and adjacent transpositions), as MONAI's spelling hint uses."""
    prev2: list = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + cost)
        prev2, prev = prev, cur
    return prev[len(b)]


def _dicece_reduction(reduction) -> str:
    """MONAI's ``look_up_option(reduction, DiceCEReduction)``, with its error messages."""
    if not isinstance(reduction, Hashable):
        raise ValueError(f"Unrecognized option type: {type(reduction)}:{reduction}.")
    if isinstance(reduction, str):
        key = reduction.strip()
        for value in _DICECE_REDUCTIONS:
            if key == value:
                return value
        reduction = key
    options = set(_DICECE_REDUCTIONS)
    text = f"{reduction}"
    close = {o: _edit_distance(o, text) for o in options}
    close = {o: d for o, d in close.items() if d <= 3}
    supported = f"Available options are {options}.\n"
    if close:
        guess = min(close, key=close.get)
        raise ValueError(f"By '{text}', did you mean '{guess}'?\n'{text}' is not a valid value.\n" + supported)
    raise ValueError(f"Unsupported option '{text}', " + supported)


# ------------------------------------------------------------------------------------------ fused passes


class _Pass(NamedTuple):
    """One call of fastseg.functional.dice_ce_stats: its arguments, and whether the target holds labels."""

    activation: str
    target: torch.Tensor
    ignore_index: Optional[int]
    labels: bool


def _run(x: torch.Tensor, p: _Pass, squared_pred: bool) -> torch.Tensor:
    # Looked up at call time so that the tests can observe which configurations take the fused path.
    return _F.dice_ce_stats(x, p.target, activation=p.activation, ignore_index=p.ignore_index,
                            squared_pred=squared_pred)


def _same_pass(a: Optional[_Pass], b: Optional[_Pass]) -> bool:
    return (a is not None and b is not None and a.activation == b.activation and a.target is b.target
            and a.ignore_index == b.ignore_index)


def _fusable_input(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in _FLOAT_DTYPES and x.dim() >= 3


def _fusable_target(x: torch.Tensor, t) -> bool:
    """Same batch and spatial shape as the input, same device, a real dtype."""
    return (isinstance(t, torch.Tensor) and t.dim() == x.dim() and t.device == x.device
            and not t.dtype.is_complex and t.shape[0] == x.shape[0] and t.shape[2:] == x.shape[2:])


def _labels(target: torch.Tensor) -> torch.Tensor:
    """(B, 1, ...) labels as the kernel reads them; float labels truncated as MONAI's ``one_hot`` and
    ``CrossEntropyLoss`` path (``.long()``) do."""
    lab = target[:, 0]
    return lab.long() if lab.dtype.is_floating_point else lab


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _mask_in_range(target: torch.Tensor, binary: bool) -> bool:
    """Whether a (B, C, ...) target can be the kernel's mask (floats in [0, 1], integers 0 / 1), with exactly
    0 / 1 required when ``binary`` (soft_label's |p - g| agrees with the kernel's p + g - 2 p g only there).
    One host sync."""
    if target.numel() == 0 or target.dtype == torch.bool:
        return True
    if target.dtype.is_floating_point and not binary:
        ok = (target >= 0) & (target <= 1)
    else:
        ok = (target == 0) | (target == 1)
    return bool(ok.all())


# ---------------------------------------------------------------------------------------------- DiceLoss


class DiceLoss(_Loss):
    """MONAI 1.6.1 ``monai.losses.DiceLoss`` on fastseg's fused kernel where possible.

    Arguments, defaults, errors, warnings, values, gradients and output shapes are MONAI's (``reduction='none'``
    gives the broadcastable (B, C', 1, ...) shape, (C', 1, ...) with ``batch=True``). See the module docstring
    for the configurations that take the fused pass and for the documented deviations.

    Example:
        >>> loss_fn = DiceLoss(to_onehot_y=True, softmax=True, include_background=False)
        >>> loss = loss_fn(torch.randn(2, 4, 8, 8, 8), torch.randint(0, 4, (2, 1, 8, 8, 8)))
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Optional[Callable] = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Union[Sequence[float], float, int, torch.Tensor, None] = None,
        soft_label: bool = False,
        ignore_index: Optional[int] = None,
    ) -> None:
        super().__init__(reduction=_loss_reduction(reduction))
        if other_act is not None and not callable(other_act):
            raise TypeError(f"other_act must be None or callable but is {type(other_act).__name__}.")
        if int(sigmoid) + int(softmax) + int(other_act is not None) > 1:
            raise ValueError("Incompatible values: more than 1 of [sigmoid=True, softmax=True, other_act is not None].")
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.other_act = other_act
        self.squared_pred = squared_pred
        self.jaccard = jaccard
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.batch = batch
        self.ignore_index = ignore_index
        # Same buffer name as MONAI, so that state dicts load either way.
        self.register_buffer("class_weight", torch.as_tensor(weight) if weight is not None else None)
        self.soft_label = soft_label

    # -- routing

    def _fused_pass(self, x, t) -> Optional[_Pass]:
        """The kernel call reproducing this configuration exactly, or None for the fallback."""
        if self.other_act is not None or not _fusable_input(x) or not _fusable_target(x, t):
            return None
        if t.requires_grad:  # MONAI differentiates through the target too; the kernel does not
            return None
        C = x.shape[1]
        if self.sigmoid:
            activation = "sigmoid"
        elif self.softmax and C > 1:
            activation = "softmax"
        else:
            return None
        ii = self.ignore_index
        if self.to_onehot_y and C > 1:
            if t.shape[1] != 1:
                return None
            if ii is not None:
                if not _is_int(ii):
                    return None
                # MONAI masks on the float labels but one-hot encodes their truncation: only whole numbers
                # give the same voxels both ways.
                if t.dtype.is_floating_point and t.numel() and not bool((t == t.trunc()).all()):
                    return None
            return _Pass(activation, _labels(t), ii, True)
        if ii is not None or t.shape[1] != C:
            return None
        if not _mask_in_range(t, binary=self.soft_label and not self.squared_pred):
            return None
        return _Pass(activation, t, None, False)

    def _warn_single_channel(self, n_pred_ch: int) -> None:
        """MONAI's single-channel warnings, for the fused path (the fallback warns inline, in MONAI's order)."""
        if n_pred_ch != 1:
            return
        if self.softmax:
            warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
        if self.to_onehot_y:
            warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=3)
        if not self.include_background:
            warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)

    def _output_dtype(self, x: torch.Tensor, t: torch.Tensor, p: _Pass) -> torch.dtype:
        """The dtype MONAI's products input * target (* ignore mask) end up in."""
        target_dtype = torch.float32 if p.labels else t.dtype
        dtype = torch.promote_types(x.dtype, target_dtype)
        if self.ignore_index is not None:
            dtype = torch.promote_types(dtype, torch.float32)
        return dtype

    # -- assembly

    def _from_stats(self, stats: torch.Tensor, ndim: int) -> torch.Tensor:
        I, P, G = stats[..., 0], stats[..., 1], stats[..., 2]
        if not self.include_background and I.shape[1] > 1:
            I, P, G = I[:, 1:], P[:, 1:], G[:, 1:]
        if self.batch:
            I, P, G = I.sum(0), P.sum(0), G.sum(0)
        return self._finish(I, P - I, G - I, I.shape[-1], ndim)

    def _finish(self, tp, fp, fn, num_of_classes: int, ndim: int) -> torch.Tensor:
        """MONAI's Dice / Jaccard from tp, fp, fn, then class weights and the reduction."""
        if not self.jaccard:
            fp = fp * 0.5
            fn = fn * 0.5
        numerator = 2 * tp + self.smooth_nr
        denominator = 2 * (tp + fp + fn) + self.smooth_dr
        f = 1 - numerator / denominator

        w = self.class_weight
        if w is not None and num_of_classes != 1:
            if w.ndim == 0:
                w = w.reshape(1).expand(num_of_classes)
            elif w.shape[0] != num_of_classes:
                raise ValueError(
                    "The length of the `weight` sequence should be the same as the number of classes. "
                    "If `include_background=False`, the weight should not include the background category class 0."
                )
            if w.min() < 0:
                raise ValueError("the value/values of the `weight` should be no less than 0.")
            f = f * w.to(f)

        if self.reduction == "mean":
            return torch.mean(f)
        if self.reduction == "sum":
            return torch.sum(f)
        if self.reduction == "none":
            return f.view(list(f.shape[0:2]) + [1] * (ndim - 2))
        raise ValueError(f'Unsupported reduction: {self.reduction}, available options are ["mean", "sum", "none"].')

    def _fused(self, x: torch.Tensor, t: torch.Tensor, p: _Pass, stats: torch.Tensor) -> torch.Tensor:
        self._warn_single_channel(x.shape[1])
        return self._from_stats(stats, x.dim()).to(self._output_dtype(x, t, p))

    # -- fallback

    def _reference(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MONAI's DiceLoss.forward in plain PyTorch (materialises probabilities and one-hot targets)."""
        if self.sigmoid:
            input = torch.sigmoid(input)
        n_pred_ch = input.shape[1]
        if self.softmax:
            if n_pred_ch == 1:
                warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
            else:
                input = torch.softmax(input, 1)
        if self.other_act is not None:
            input = self.other_act(input)

        original_target = target
        ii = self.ignore_index
        if self.to_onehot_y:
            if n_pred_ch == 1:
                warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=3)
            else:
                if ii is not None and (ii < 0 or ii >= n_pred_ch):
                    target = torch.where(target == ii, torch.zeros_like(target), target)
                target = _one_hot(target, n_pred_ch)
        if not self.include_background:
            if n_pred_ch == 1:
                warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
            else:
                target = target[:, 1:]
                input = input[:, 1:]

        mask = _ignore_mask(original_target, ii)
        if target.shape != input.shape:
            raise AssertionError(f"ground truth has different shape ({target.shape}) from input ({input.shape})")
        if mask is not None:
            input, target = input * mask, target * mask

        reduce_axis = list(range(2, input.dim()))
        if self.batch:
            reduce_axis = [0] + reduce_axis
        tp, fp, fn = _tp_fp_fn(input, target, reduce_axis, 2 if self.squared_pred else 1, self.soft_label)
        return self._finish(tp, fp, fn, target.shape[1], input.dim())

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """input: (B, C, ...) logits (or probabilities without activation); target: (B, C, ...) or (B, 1, ...)."""
        p = self._fused_pass(input, target)
        if p is None:
            return self._reference(input, target)
        return self._fused(input, target, p, _run(input, p, self.squared_pred))


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """MONAI's ``one_hot(labels, num_classes)`` along dim 1, float32."""
    if labels.dim() < 2:
        labels = labels.reshape(list(labels.shape) + [1] * (2 - labels.dim()))
    shape = list(labels.shape)
    if shape[1] != 1:
        raise AssertionError("labels should have a channel with length equal to one.")
    shape[1] = num_classes
    out = torch.zeros(size=shape, dtype=torch.float, device=labels.device)
    return out.scatter_(dim=1, index=labels.long(), value=1)


def _ignore_mask(y: torch.Tensor, ignore_index: Optional[int]) -> Optional[torch.Tensor]:
    """MONAI's ``create_ignore_mask``: label targets compare directly; one-hot targets mask the voxels of the
    ignored class in every channel, or (sentinel index) the voxels where no channel is set."""
    if ignore_index is None:
        return None
    if y.shape[1] == 1:
        return (y != ignore_index).float()
    num_classes = y.shape[1]
    if 0 <= ignore_index < num_classes:
        return 1.0 - y[:, ignore_index : ignore_index + 1]
    return (y.sum(dim=1, keepdim=True) > 0).float()


def _tp_fp_fn(input, target, axes, ord: int, soft_label: bool):
    """MONAI's ``compute_tp_fp_fn`` (decoupled): plain sums, or the norm form that is exact for soft labels."""
    if ord == 1 and not soft_label:
        tp = torch.sum(input * target, dim=axes)
        fp = torch.sum(input, dim=axes) - tp
        fn = torch.sum(target, dim=axes) - tp
        return tp, fp, fn
    pred_o = torch.linalg.vector_norm(input, ord=ord, dim=axes)
    ground_o = torch.linalg.vector_norm(target, ord=ord, dim=axes)
    difference = torch.linalg.vector_norm(input - target, ord=ord, dim=axes)
    if ord > 1:
        pred_o = torch.pow(pred_o, exponent=ord)
        ground_o = torch.pow(ground_o, exponent=ord)
        difference = torch.pow(difference, exponent=ord)
    tp = (pred_o + ground_o - difference) / 2
    return tp, pred_o - tp, ground_o - tp


# -------------------------------------------------------------------------------------------- DiceCELoss


def _softmax_ce_terms(stats: torch.Tensor, weight: Optional[torch.Tensor], label_smoothing: float):
    """Numerator and label-weight sum of ``F.cross_entropy(weight, label_smoothing)`` from softmax sums.

    Per voxel the loss is sum_c w_c ((1 - eps) t_c + eps / C) (-log p_c) with t the one-hot label (or the
    probability target), so its sum over the counted voxels is sum_bc w_c ((1 - eps) A_bc + eps / C U_bc).
    For label targets torch's 'mean' divides the NLL and the smoothing term alike by the summed weight of the
    counted labels, sum_bc w_c G_bc (their number without weights); for probability targets by the voxel count.
    """
    A, U, G = stats[..., 3], stats[..., 4], stats[..., 2]
    C = A.shape[1]
    num = A if not label_smoothing else (1.0 - label_smoothing) * A + (label_smoothing / C) * U
    if weight is None:
        return num.sum(), G.sum()
    w = weight.to(num)
    return (num * w).sum(), (G * w).sum()


class DiceCELoss(_Loss):
    """MONAI 1.6.1 ``monai.losses.DiceCELoss`` on fastseg's fused kernel where possible.

    ``lambda_dice`` times :class:`DiceLoss` (with ``weight[1:]`` when the background is excluded) plus
    ``lambda_ce`` times ``nn.CrossEntropyLoss(weight, reduction, label_smoothing)`` on the raw logits
    ((B, 1, ...) targets squeezed and cast to long, (B, C, ...) targets used as class probabilities), or
    ``nn.BCEWithLogitsLoss(pos_weight=weight)`` with a single channel. ``reduction`` is 'mean' or 'sum'.
    Submodules ``dice``, ``cross_entropy`` and ``binary_cross_entropy`` mirror MONAI's (same state dict keys).
    See the module docstring for the routing and the documented deviations.

    Example:
        >>> loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        >>> loss = loss_fn(torch.randn(2, 4, 8, 8, 8), torch.randint(0, 4, (2, 1, 8, 8, 8)))
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Optional[Callable] = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Optional[torch.Tensor] = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        reduction = _dicece_reduction(reduction)
        # MONAI slices here, so a weight that cannot be sliced fails here with Python's own error.
        dice_weight = weight[1:] if weight is not None and not include_background else weight
        self.dice = DiceLoss(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            other_act=other_act,
            squared_pred=squared_pred,
            jaccard=jaccard,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            weight=dice_weight,
        )
        # The torch modules hold the CE options, validate them as MONAI's do, and compute the fallback.
        self.cross_entropy = nn.CrossEntropyLoss(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
        self.binary_cross_entropy = nn.BCEWithLogitsLoss(pos_weight=weight, reduction=reduction)
        if lambda_dice < 0.0:
            raise ValueError("lambda_dice should be no less than 0.0.")
        if lambda_ce < 0.0:
            raise ValueError("lambda_ce should be no less than 0.0.")
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce

    def ce(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MONAI's cross-entropy term, computed by torch (the fallback)."""
        n_pred_ch, n_target_ch = input.shape[1], target.shape[1]
        if n_pred_ch != n_target_ch and n_target_ch == 1:
            target = torch.squeeze(target, dim=1).long()
        elif not torch.is_floating_point(target):
            target = target.to(dtype=input.dtype)
        return self.cross_entropy(input, target)

    def bce(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MONAI's single-channel binary cross-entropy term, computed by torch (the fallback)."""
        if not torch.is_floating_point(target):
            target = target.to(dtype=input.dtype)
        return self.binary_cross_entropy(input, target)

    def _ce_pass(self, x, t, dice_pass: Optional[_Pass]) -> Optional[_Pass]:
        """The kernel call giving the CE / BCE term exactly, or None for torch's loss module."""
        if not _fusable_input(x) or not _fusable_target(x, t):
            return None
        C = x.shape[1]
        if C == 1:
            pos_weight = self.binary_cross_entropy.pos_weight
            if t.requires_grad or (pos_weight is not None and pos_weight.numel() != 1):
                return None
            if dice_pass is not None and not dice_pass.labels and dice_pass.activation == "sigmoid":
                return dice_pass
            return _Pass("sigmoid", t, None, False) if _mask_in_range(t, binary=False) else None
        ce = self.cross_entropy
        w = ce.weight
        if w is not None and (w.dim() != 1 or w.shape[0] != C):
            return None  # torch raises its own error
        if not 0.0 <= ce.label_smoothing <= 1.0 or ce.ignore_index != -100:
            return None
        if t.shape[1] == 1:
            labels = dice_pass.target if dice_pass is not None and dice_pass.labels else _labels(t)
            return _Pass("softmax", labels, None, True)
        if t.requires_grad:  # probability targets are differentiated by torch
            return None
        if dice_pass is not None and not dice_pass.labels:
            return _Pass("softmax", dice_pass.target, None, False)  # already range-checked
        return _Pass("softmax", t, None, False) if _mask_in_range(t, binary=False) else None

    def _ce_from_stats(self, x: torch.Tensor, t: torch.Tensor, p: _Pass, stats: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        voxels = stats.new_tensor(float(x.numel() // C)) if C else stats.new_tensor(0.0)
        if C == 1:
            A, U = stats[..., 3], stats[..., 4]
            pos_weight = self.binary_cross_entropy.pos_weight
            num = (A * pos_weight.to(A).reshape(()) if pos_weight is not None else A) + U
            loss = num.sum() if self.binary_cross_entropy.reduction == "sum" else num.sum() / voxels
        else:
            ce = self.cross_entropy
            num, label_weight = _softmax_ce_terms(stats, ce.weight, float(ce.label_smoothing))
            if ce.reduction == "sum":
                loss = num
            else:
                loss = num / (label_weight if p.labels else voxels)
        # torch's loss has the input's dtype, promoted with a float target's
        dtype = x.dtype if p.labels or not t.dtype.is_floating_point else torch.promote_types(x.dtype, t.dtype)
        return loss.to(dtype)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """input: (B, C, ...) logits; target: (B, 1, ...) labels or (B, C, ...) one-hot / probabilities."""
        if input.dim() != target.dim():
            raise ValueError(
                "the number of dimensions for input and target should be the same, "
                f"got shape {input.shape} (nb dims: {len(input.shape)}) and {target.shape} "
                f"(nb dims: {len(target.shape)}). "
                "if target is not one-hot encoded, please provide a tensor with shape B1H[WD]."
            )
        if target.shape[1] != 1 and target.shape[1] != input.shape[1]:
            raise ValueError(
                "number of channels for target is neither 1 (without one-hot encoding) nor the same as input, "
                f"got shape {input.shape} and {target.shape}."
            )
        dice_pass = self.dice._fused_pass(input, target)
        ce_pass = self._ce_pass(input, target, dice_pass)

        dice_stats = None
        if dice_pass is None:
            dice_loss = self.dice._reference(input, target)
        else:
            dice_stats = _run(input, dice_pass, self.dice.squared_pred)
            dice_loss = self.dice._fused(input, target, dice_pass, dice_stats)

        if ce_pass is None:
            ce_loss = self.ce(input, target) if input.shape[1] != 1 else self.bce(input, target)
        else:
            # squared_pred changes only P and G, which the CE does not read, so a shared pass is exact.
            stats = dice_stats if _same_pass(dice_pass, ce_pass) else _run(input, ce_pass, self.dice.squared_pred)
            ce_loss = self._ce_from_stats(input, target, ce_pass, stats)
        return self.lambda_dice * dice_loss + self.lambda_ce * ce_loss


from fastseg.compat.monai_metrics import compute_hausdorff_distance, compute_average_surface_distance, compute_surface_dice  # noqa: E402,F401
