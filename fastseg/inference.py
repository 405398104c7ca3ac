"""Sliding-window inference with Gaussian blending and mirroring test-time augmentation.

Follows nnU-Net's predictor (Isensee et al., Nature Methods 2021): windows on a regular grid whose first and
last windows touch the borders, each prediction weighted by a Gaussian importance map centred in the window
(sigma = 1/8 of the window) so window edges, which see less context, count less; mirroring TTA averages the
predictions over all flips of the chosen axes. Argument names are those of MONAI's
``monai.inferers.sliding_window_inference``.
"""
from __future__ import annotations

import itertools
import math
import operator
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["gaussian_importance_map", "sliding_window_inference", "window_starts"]

_MODES = ("gaussian", "constant")
_PADDING_MODES = ("constant", "reflect", "replicate", "circular")
Predictor = Callable[[torch.Tensor], Union[torch.Tensor, Sequence[torch.Tensor]]]


def _fail(fn: str, name: str, expected: str, got) -> None:
    raise ValueError(f"{fn}: {name} must be {expected}, got {got!r}")


def _roi_tuple(fn: str, roi_size, ndim: int) -> Tuple[int, ...]:
    if not isinstance(roi_size, (Sequence, torch.Size)):
        roi_size = (roi_size,) * ndim
    out = []
    for v in roi_size:
        try:
            iv = operator.index(v)
        except TypeError:
            iv = 0
        if isinstance(v, bool) or iv < 1:
            _fail(fn, "roi_size", f"a positive int or {ndim} positive ints", tuple(roi_size))
        out.append(int(iv))
    if len(out) != ndim:
        _fail(fn, "roi_size", f"a positive int or {ndim} positive ints (one per spatial dim)", tuple(roi_size))
    return tuple(out)


def gaussian_importance_map(roi_size: Union[int, Sequence[int]], sigma_scale: Union[float, Sequence[float]] = 0.125,
                            dtype: torch.dtype = torch.float32,
                            device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Separable Gaussian weight map for blending sliding-window predictions.

    ``w(x) = prod_a exp(-(x_a - c_a)^2 / (2 sigma_a^2))`` with centre ``c_a = (roi_a - 1) / 2`` (so the map is
    symmetric under flips) and ``sigma_a = sigma_scale_a * roi_a``, divided by its maximum so the peak is 1.
    Values that underflow to 0 in ``dtype`` are raised to the smallest positive value of the map (as nnU-Net
    does; and at least to the smallest normal number of ``dtype``), so every voxel of a window keeps a
    positive weight and the blended result never divides by zero.

    Args:
        roi_size: window size, an int per spatial axis (or one int for a 1D map).
        sigma_scale: sigma as a fraction of the window size, one float or one per axis; must be > 0.
        dtype: floating dtype of the map.
        device: device of the map.

    Returns:
        A tensor of shape ``roi_size``.
    """
    fn = "gaussian_importance_map"
    ndim = len(roi_size) if isinstance(roi_size, (Sequence, torch.Size)) else 1
    roi = _roi_tuple(fn, roi_size, ndim)
    scales = tuple(sigma_scale) if isinstance(sigma_scale, Sequence) else (sigma_scale,) * ndim
    if len(scales) != ndim or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)
                                  or s <= 0 for s in scales):
        _fail(fn, "sigma_scale", f"a positive float or {ndim} positive floats", sigma_scale)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        _fail(fn, "dtype", "a floating torch.dtype", dtype)
    # float64 so that the normalisation is exact before rounding to dtype
    weights = torch.ones((), dtype=torch.float64, device=device)
    for n, s in zip(roi, scales):
        x = torch.arange(n, dtype=torch.float64, device=device) - (n - 1) / 2
        g = torch.exp(-(x * x) / (2 * (s * n) ** 2))
        weights = weights[..., None] * g
    weights = (weights / weights.max()).to(dtype)
    # subnormal weights would make weight * prediction underflow to 0 and bias the blend
    smallest = max(weights[weights > 0].min().item(), torch.finfo(dtype).tiny)
    return weights.clamp_(min=smallest)


def window_starts(size: int, roi: int, overlap: float) -> List[int]:
    """Start indices of the windows along one axis (nnU-Net's grid).

    The target step is ``max(roi * (1 - overlap), 1)``; ``n = ceil((size - roi) / step) + 1`` windows are
    spread evenly so that the first starts at 0 and the last ends at ``size``: start ``i`` is
    ``i * (size - roi) / (n - 1)`` rounded half up. The actual step is thus at most the target step (the
    overlap at least the requested one) and the starts are distinct.

    Args:
        size: the (padded) axis length, ``>= roi``.
        roi: window length.
        overlap: fraction in [0, 1).

    Returns:
        The sorted window starts.
    """
    if size <= roi:
        return [0]
    step = max(roi * (1.0 - overlap), 1.0)
    n = math.ceil((size - roi) / step) + 1
    span = size - roi
    # integer form of floor(i * span / (n - 1) + 1/2): exact, no float rounding at the halves
    return [(2 * i * span + (n - 1)) // (2 * (n - 1)) for i in range(n)]


def _check_args(inputs, roi_size, sw_batch_size, overlap, mode, padding_mode, mirror_axes):
    fn = "sliding_window_inference"
    if not isinstance(inputs, torch.Tensor) or inputs.dim() not in (4, 5):
        got = f"shape {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        _fail(fn, "inputs", "a (B, C, H, W) or (B, C, H, W, D) tensor", got)
    if inputs.numel() == 0:
        _fail(fn, "inputs", "a non-empty tensor", f"shape {tuple(inputs.shape)}")
    ndim = inputs.dim() - 2
    roi = _roi_tuple(fn, roi_size, ndim)
    try:
        sw = operator.index(sw_batch_size)
    except TypeError:
        sw = 0
    if isinstance(sw_batch_size, bool) or sw < 1:
        _fail(fn, "sw_batch_size", "a positive int", sw_batch_size)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        _fail(fn, "overlap", "a float in [0, 1)", overlap)
    if mode not in _MODES:
        _fail(fn, "mode", "one of " + ", ".join(repr(m) for m in _MODES), mode)
    if padding_mode not in _PADDING_MODES:
        _fail(fn, "padding_mode", "one of " + ", ".join(repr(m) for m in _PADDING_MODES), padding_mode)
    axes = tuple(mirror_axes) if isinstance(mirror_axes, Sequence) else (mirror_axes,)
    if any(isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < ndim for a in axes) \
            or len(set(axes)) != len(axes):
        _fail(fn, "mirror_axes", f"distinct spatial axis indices in [0, {ndim}) (0 = first spatial dim)",
              mirror_axes)
    return roi, int(sw), axes


def _first(out) -> torch.Tensor:
    # deep-supervision models return logits highest resolution first
    if isinstance(out, (list, tuple)):
        if not out:
            raise ValueError("sliding_window_inference: predictor returned an empty list/tuple")
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"sliding_window_inference: predictor must return a tensor (or a list/tuple whose first "
                         f"item is one), got {type(out).__name__}")
    return out


def _predict(predictor: Predictor, x: torch.Tensor, mirror_axes: Tuple[int, ...]) -> torch.Tensor:
    """Predictor output for a batch of windows, averaged over all flips of ``mirror_axes``."""
    total = None
    flips = [c for k in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, k)]
    for axes in flips:
        dims = [a + 2 for a in axes]
        y = _first(predictor(x.flip(dims) if dims else x))
        # half-precision outputs are summed over flips in float32
        y = y.to(torch.promote_types(y.dtype, torch.float32))
        if dims:
            y = y.flip(dims)
        total = y if total is None else total + y
    return total if len(flips) == 1 else total / len(flips)


def sliding_window_inference(inputs: torch.Tensor, roi_size: Union[int, Sequence[int]], sw_batch_size: int,
                             predictor: Predictor, overlap: float = 0.5, mode: str = "gaussian",
                             sigma_scale: Union[float, Sequence[float]] = 0.125, padding_mode: str = "constant",
                             cval: float = 0.0, mirror_axes: Sequence[int] = (),
                             device: Optional[Union[str, torch.device]] = None,
                             sw_device: Optional[Union[str, torch.device]] = None,
                             progress: bool = False) -> torch.Tensor:
    """Predict a whole volume by blending predictions of overlapping windows.

    Where the volume is smaller than ``roi_size`` it is padded (centred, ``(roi - size) // 2`` before) with
    ``padding_mode`` / ``cval``. Windows sit at :func:`window_starts` per axis (first and last touching the
    borders), for every batch item; ``sw_batch_size`` windows go through ``predictor`` per call, on
    ``sw_device``. Each output is weighted by :func:`gaussian_importance_map` (``mode='gaussian'``) or by 1
    (``'constant'``); weighted outputs and weights are summed on ``device`` in float32 (float64 if the
    predictor returns float64; half-precision outputs are converted), divided, and the padding is cropped off.

    The predictor must keep the window's spatial size (e.g. logits of a segmentation network). It may return
    a tensor or a list/tuple (deep supervision), of which the first item is used. Gradients are not
    disabled here; wrap the call in ``torch.no_grad()`` / ``torch.inference_mode()`` for inference.

    Args:
        inputs: (B, C, *spatial) with 2 or 3 spatial dims.
        roi_size: window size, one int or one per spatial dim.
        sw_batch_size: windows per predictor call.
        predictor: maps (N, C, *roi_size) to (N, C_out, *roi_size).
        overlap: fraction of a window shared with its neighbour, in [0, 1); nnU-Net uses 0.5.
        mode: ``"gaussian"`` or ``"constant"`` blending.
        sigma_scale: Gaussian sigma as a fraction of ``roi_size``.
        padding_mode: ``"constant"``, ``"reflect"``, ``"replicate"`` or ``"circular"`` (torch.nn.functional.pad).
        cval: value for constant padding.
        mirror_axes: spatial axes (0 = first spatial dim) to mirror for test-time augmentation; the predictor
            is averaged over all 2^k flip combinations (flip input, predict, flip back).
        device: where the output is accumulated and returned; default ``inputs.device``.
        sw_device: where the predictor runs; default ``inputs.device``.
        progress: show a tqdm progress bar over predictor calls.

    Returns:
        (B, C_out, *spatial) blended predictions, float32 (float64 for a float64 predictor).

    Example:
        >>> net.eval()
        >>> with torch.no_grad():
        ...     logits = sliding_window_inference(image, (128, 128, 64), 2, net, overlap=0.5, mirror_axes=(0, 1))
    """
    roi, sw_batch_size, mirror_axes = _check_args(inputs, roi_size, sw_batch_size, overlap, mode, padding_mode,
                                                  mirror_axes)
    device = inputs.device if device is None else torch.device(device)
    sw_device = inputs.device if sw_device is None else torch.device(sw_device)
    spatial = tuple(inputs.shape[2:])
    batch = inputs.shape[0]

    pad_before = [max(r - s, 0) // 2 for s, r in zip(spatial, roi)]
    pad_after = [max(r - s, 0) - b for s, r, b in zip(spatial, roi, pad_before)]
    padded = inputs
    if any(pad_before) or any(pad_after):
        # F.pad lists (before, after) pairs from the last dim backwards
        pads = [p for b, a in zip(reversed(pad_before), reversed(pad_after)) for p in (b, a)]
        padded = F.pad(inputs, pads, mode=padding_mode, value=cval) if padding_mode == "constant" \
            else F.pad(inputs, pads, mode=padding_mode)
    full = tuple(padded.shape[2:])

    starts = list(itertools.product(*(window_starts(n, r, overlap) for n, r in zip(full, roi))))
    windows = [(b, lo) for b in range(batch) for lo in starts]

    chunks = range(0, len(windows), sw_batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="sliding window", unit="batch")
    acc = None
    for first in chunks:
        group = windows[first:first + sw_batch_size]
        x = torch.cat([padded[b:b + 1][(Ellipsis,) + _box(lo, roi)] for b, lo in group]).to(sw_device)
        y = _predict(predictor, x, mirror_axes)
        if y.dim() != len(roi) + 2 or y.shape[0] != len(group) or tuple(y.shape[2:]) != roi:
            raise ValueError(f"sliding_window_inference: predictor must map ({len(group)}, C, *{roi}) windows to "
                             f"({len(group)}, C_out, *{roi}), got output shape {tuple(y.shape)}")
        if acc is None:
            acc_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
            acc = torch.zeros((batch, y.shape[1]) + full, dtype=acc_dtype, device=device)
            w = gaussian_importance_map(roi, sigma_scale, dtype=acc_dtype, device=device) if mode == "gaussian" \
                else torch.ones(roi, dtype=acc_dtype, device=device)
        y = y.to(device=device, dtype=acc.dtype)
        for k, (b, lo) in enumerate(group):
            acc[(b, slice(None)) + _box(lo, roi)] += y[k] * w

    # the weight sum depends only on the window grid, shared by every batch item
    weight_sum = torch.zeros(full, dtype=acc.dtype, device=device)
    for lo in starts:
        weight_sum[_box(lo, roi)] += w
    out = acc / weight_sum
    crop = tuple(slice(b, b + s) for b, s in zip(pad_before, spatial))
    return out[(Ellipsis,) + crop]


def _box(lo: Sequence[int], roi: Sequence[int]) -> Tuple[slice, ...]:
    return tuple(slice(start, start + r) for start, r in zip(lo, roi))
