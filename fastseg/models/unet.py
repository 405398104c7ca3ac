"""A plain nnU-Net-style U-Net (2D or 3D) and an nnU-Net-like topology planner.

Architecture after Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical
image segmentation", Nature Methods 18, 203-211 (2021): stages of (conv - norm - LeakyReLU) x n,
downsampling by the strided first convolution of a stage, upsampling by a transposed convolution whose
kernel equals its stride, skip connections by concatenation, 1x1 convolution segmentation heads and deep
supervision. The planner follows the same paper's rules for pooling and kernel sizes on anisotropic data.
"""
from __future__ import annotations

import math
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["UNet", "plan_topology", "trained_patch_size"]

IntOrSeq = Union[int, Sequence[int]]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_DROPOUT = {2: nn.Dropout2d, 3: nn.Dropout3d}
_NORMS = {
    "instance": {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
    "batch": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
}


def _fail(name: str, expected: str, got, where: str = "UNet") -> None:
    raise ValueError(f"{where}: {name} must be {expected}, got {got!r}")


def _positive_int(name: str, value, where: str = "UNet") -> int:
    # operator.index accepts Python and numpy integers but not floats or bools-as-numbers by accident
    try:
        out = operator.index(value)
    except TypeError:
        out = None
    if out is None or isinstance(value, bool) or out < 1:
        _fail(name, "a positive int", value, where)
    return int(out)


def _per_axis(name: str, value: IntOrSeq, ndim: int, where: str = "UNet") -> Tuple[int, ...]:
    """An int broadcast to every axis, or a sequence of exactly ``ndim`` positive ints."""
    if not isinstance(value, Sequence) and not isinstance(value, torch.Size):
        try:
            value = (operator.index(value),) * ndim
        except TypeError:
            _fail(name, f"an int or a sequence of {ndim} ints", value, where)
    try:
        if len(value) != ndim:
            raise ValueError
        return tuple(_positive_int(name, v, where) for v in value)
    except ValueError:
        _fail(name, f"an int or a sequence of {ndim} positive ints", value, where)


def _per_stage(name: str, value, n_stages: int, ndim: int, default: Sequence[Tuple[int, ...]]):
    if value is None:
        return [tuple(v) for v in default]
    if not isinstance(value, Sequence) or len(value) != n_stages:
        _fail(name, f"a sequence with one entry per stage ({n_stages}, the length of features)", value)
    return [_per_axis(f"{name}[{i}]", v, ndim) for i, v in enumerate(value)]


class _ConvNormAct(nn.Sequential):
    """conv -> (dropout) -> norm -> LeakyReLU, nnU-Net's ConvDropoutNormReLU order."""

    def __init__(self, ndim: int, in_ch: int, out_ch: int, kernel: Tuple[int, ...], stride: Tuple[int, ...],
                 norm: str, negative_slope: float, dropout: float):
        # padding k//2 with odd k makes the output size ceil(n / stride), so skip shapes line up exactly
        # whenever the input is divisible by the product of strides
        layers = [_CONV[ndim](in_ch, out_ch, kernel, stride=stride, padding=tuple(k // 2 for k in kernel),
                              bias=True)]
        if dropout > 0:
            layers.append(_DROPOUT[ndim](p=dropout))
        layers.append(_NORMS[norm][ndim](out_ch, eps=1e-5, affine=True))
        layers.append(nn.LeakyReLU(negative_slope, inplace=True))
        super().__init__(*layers)


class _Stage(nn.Sequential):
    def __init__(self, ndim: int, in_ch: int, out_ch: int, kernel: Tuple[int, ...], stride: Tuple[int, ...],
                 n_conv: int, **block):
        ones = (1,) * ndim
        super().__init__(*[
            _ConvNormAct(ndim, in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else ones, **block)
            for i in range(n_conv)
        ])


def plan_topology(patch_size: Sequence[int], spacing: Sequence[float], *, min_feature_map: int = 4
                  ) -> Tuple[List[Tuple[int, ...]], List[Tuple[int, ...]]]:
    """nnU-Net's rules for per-stage strides and kernel sizes from a patch size and a voxel spacing.

    Each step downsamples (stride 2) every axis whose current feature map is at least ``2 * min_feature_map``
    and whose current spacing is less than twice the smallest current spacing among those axes (so a
    1 x 1 x 2.5 mm volume is first downsampled in-plane only until the spacings are comparable). A lone
    pooled axis needs ``3 * min_feature_map``. Kernel sizes start at 1 along axes whose spacing is at least
    twice the smallest and turn (for good) to 3 once the ratio falls below 2; the bottleneck uses 3
    everywhere. Feature-map sizes are rounded up after each halving, as nnU-Net does.

    Args:
        patch_size: training patch size per spatial axis.
        spacing: voxel spacing (mm) per spatial axis, same order.
        min_feature_map: smallest edge length of the bottleneck feature map.

    Returns:
        (strides, kernel_sizes): one tuple per stage each, the first stage with stride 1.
    """
    ndim = len(patch_size)
    if len(spacing) != ndim:
        raise ValueError(f"plan_topology: spacing must have one value per axis of patch_size {tuple(patch_size)},"
                         f" got {tuple(spacing)}")
    where = "plan_topology"
    size = [float(v) for v in _per_axis("patch_size", tuple(patch_size), ndim, where)]
    cur = [float(s) for s in spacing]
    if any(not math.isfinite(s) or s <= 0 for s in cur):
        _fail("spacing", "positive and finite on every axis", tuple(spacing), where)
    _positive_int("min_feature_map", min_feature_map, where)

    strides: List[Tuple[int, ...]] = [(1,) * ndim]
    kernels: List[Tuple[int, ...]] = []
    kernel = [1] * ndim
    while True:
        axes = [a for a in range(ndim) if size[a] >= 2 * min_feature_map]
        if not axes:
            break
        smallest = min(cur[a] for a in axes)
        axes = [a for a in axes if cur[a] / smallest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * min_feature_map:
            break
        # the kernel of the stage about to be downsampled follows the spacing it sees now
        for a in range(ndim):
            if cur[a] / min(cur) < 2:
                kernel[a] = 3
        kernels.append(tuple(kernel))
        strides.append(tuple(2 if a in axes else 1 for a in range(ndim)))
        for a in axes:
            cur[a] *= 2
            size[a] = math.ceil(size[a] / 2)
    kernels.append((3,) * ndim)
    return strides, kernels


class UNet(nn.Module):
    """Plain nnU-Net-style U-Net (Isensee et al. 2021), 2D or 3D.

    Stage ``s`` has ``conv_per_stage`` blocks of conv - norm - LeakyReLU with ``features[s]`` channels; its
    first convolution has stride ``strides[s]`` (stage 0: stride 1). The decoder mirrors the encoder:
    transposed convolution (kernel = stride) to the next higher resolution, concatenation with the skip,
    ``conv_per_stage`` blocks, and a 1x1 convolution head.

    Deep supervision (``deep_supervision=True`` and training mode): ``forward`` returns a list of logits,
    highest resolution first. There is one output per decoder level except the lowest one (the level
    just above the bottleneck, which nnU-Net computes but weights 0 in its loss): with S stages the outputs
    are at the resolutions of encoder stages 0, 1, ..., S-3, i.e. downsampled by the cumulative strides
    listed by :meth:`deep_supervision_scales` (default 5 stages: full, /2, /4). A network with fewer than 3
    stages returns a one-element list. This is the order and the weighting that
    :class:`fastseg.DeepSupervisionLoss` expects (weights 1, 1/2, 1/4, ... normalised), which together
    reproduce nnU-Net's loss. In eval mode, or with ``deep_supervision=False``, ``forward`` returns the
    full-resolution logits tensor ``(B, num_classes, *spatial)``.

    Input spatial sizes must be divisible by :attr:`patch_divisor` (the product of the strides per axis),
    so that every upsampled feature map matches its skip connection.

    Args:
        in_channels: input channels (image modalities).
        num_classes: output channels (classes, background included for softmax).
        spatial_dims: 2 or 3.
        features: channels per stage; its length is the number of stages.
        strides: per stage an int or a per-axis tuple; the first must be 1. Default: 2 on every axis after
            the first stage.
        kernel_sizes: per stage an int or a per-axis tuple of odd sizes (e.g. (3, 3, 1) for thick slices).
            Default 3.
        conv_per_stage: convolution blocks per encoder and per decoder stage.
        deep_supervision: return the list of logits described above in training mode.
        norm: ``"instance"`` (affine, eps 1e-5, nnU-Net's choice) or ``"batch"``.
        negative_slope: LeakyReLU slope; also the ``a`` of the He initialisation.
        dropout: channel dropout probability after each convolution (0 disables it).

    Example:
        >>> net = UNet(1, 4, features=(8, 16, 32), strides=(1, (2, 2, 1), 2), kernel_sizes=((3, 3, 1), 3, 3))
        >>> net.patch_divisor
        (4, 4, 2)
        >>> [o.shape[2:] for o in net(torch.randn(2, 1, 16, 16, 8))]
        [torch.Size([16, 16, 8])]
    """

    def __init__(self, in_channels: int, num_classes: int, *, spatial_dims: int = 3,
                 features: Sequence[int] = (32, 64, 128, 256, 320),
                 strides: Optional[Sequence[IntOrSeq]] = None,
                 kernel_sizes: Optional[Sequence[IntOrSeq]] = None, conv_per_stage: int = 2,
                 deep_supervision: bool = True, norm: str = "instance", negative_slope: float = 0.01,
                 dropout: float = 0.0):
        super().__init__()
        if spatial_dims not in (2, 3):
            _fail("spatial_dims", "2 or 3", spatial_dims)
        ndim = spatial_dims
        in_channels = _positive_int("in_channels", in_channels)
        num_classes = _positive_int("num_classes", num_classes)
        if isinstance(features, int) or len(features) < 1:
            _fail("features", "a non-empty sequence of channel counts, one per stage", features)
        features = tuple(_positive_int("features entries", f) for f in features)
        n = len(features)
        strides = _per_stage("strides", strides, n, ndim, [(1,) * ndim] + [(2,) * ndim] * (n - 1))
        if strides[0] != (1,) * ndim:
            _fail("strides[0]", "1 on every axis (the first stage keeps full resolution)", strides[0])
        kernel_sizes = _per_stage("kernel_sizes", kernel_sizes, n, ndim, [(3,) * ndim] * n)
        if any(k % 2 == 0 for ks in kernel_sizes for k in ks):
            _fail("kernel_sizes", "odd on every axis (same-size padding)", kernel_sizes)
        conv_per_stage = _positive_int("conv_per_stage", conv_per_stage)
        if norm not in _NORMS:
            _fail("norm", "one of " + ", ".join(repr(k) for k in _NORMS), norm)
        if not (isinstance(negative_slope, (int, float)) and 0 <= negative_slope < 1):
            _fail("negative_slope", "a float in [0, 1)", negative_slope)
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            _fail("dropout", "a float in [0, 1)", dropout)

        self.in_channels, self.num_classes, self.spatial_dims = in_channels, num_classes, ndim
        self.features, self.strides, self.kernel_sizes = features, tuple(strides), tuple(kernel_sizes)
        self.conv_per_stage, self.norm = conv_per_stage, norm
        self.negative_slope, self.dropout = float(negative_slope), float(dropout)
        self.deep_supervision = bool(deep_supervision)
        block = dict(norm=norm, negative_slope=self.negative_slope, dropout=self.dropout)

        self.encoder = nn.ModuleList(
            _Stage(ndim, in_channels if s == 0 else features[s - 1], features[s], kernel_sizes[s], strides[s],
                   conv_per_stage, **block)
            for s in range(n)
        )
        # decoder[s] / upsample[s] produce the resolution of encoder stage s (s = 0 .. n-2)
        self.upsample = nn.ModuleList(
            _CONV_T[ndim](features[s + 1], features[s], strides[s + 1], stride=strides[s + 1], bias=True)
            for s in range(n - 1)
        )
        self.decoder = nn.ModuleList(
            _Stage(ndim, 2 * features[s], features[s], kernel_sizes[s], (1,) * ndim, conv_per_stage, **block)
            for s in range(n - 1)
        )
        # heads only where an output is returned, so DDP never sees unused parameters
        n_heads = self._num_supervised() if self.deep_supervision else 1
        self.heads = nn.ModuleList(_CONV[ndim](features[s], num_classes, 1, bias=True) for s in range(n_heads))
        self.apply(self._init_weights)

    def _num_supervised(self) -> int:
        return max(1, len(self.features) - 2)

    def _init_weights(self, module: nn.Module) -> None:
        # nnU-Net's InitWeights_He(1e-2): Kaiming normal with the LeakyReLU slope, zero biases
        if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(module.weight, a=self.negative_slope)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def patch_divisor(self) -> Tuple[int, ...]:
        """Product of the strides per axis: every input spatial size must be a multiple of it."""
        return tuple(math.prod(s[a] for s in self.strides) for a in range(self.spatial_dims))

    def padded_patch_size(self, patch_size: Sequence[int]) -> Tuple[int, ...]:
        """The smallest size >= ``patch_size`` (per axis) that is divisible by :attr:`patch_divisor`."""
        return tuple(-(-int(p) // d) * d for p, d in zip(patch_size, self.patch_divisor))

    def deep_supervision_scales(self) -> List[Tuple[int, ...]]:
        """Per-axis downsampling factor of each output returned in training mode, highest resolution first.

        With ``deep_supervision=False`` this is ``[(1, ..., 1)]``. Output ``i`` has spatial shape
        ``input_shape // scales[i]``.
        """
        k = self._num_supervised() if self.deep_supervision else 1
        scales, cur = [], (1,) * self.spatial_dims
        for s in range(k):
            cur = tuple(c * st for c, st in zip(cur, self.strides[s]))
            scales.append(cur)
        return scales

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != self.spatial_dims + 2:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"UNet: input must be a (B, C, *spatial) tensor with {self.spatial_dims} spatial "
                             f"dims, got {got}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"UNet: input must have in_channels={self.in_channels} channels, got "
                             f"{x.shape[1]} (shape {tuple(x.shape)})")
        spatial = tuple(x.shape[2:])
        div = self.patch_divisor
        if any(s % d for s, d in zip(spatial, div)):
            raise ValueError(f"UNet: input spatial size {spatial} must be divisible by patch_divisor {div} (the "
                             f"product of the strides per axis); pad or crop it, e.g. to "
                             f"{self.padded_patch_size(spatial)}")

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Args:
            x: (B, in_channels, *spatial), spatial sizes divisible by :attr:`patch_divisor`.

        Returns:
            (B, num_classes, *spatial) logits; in training mode with deep supervision a list of logits at
            the scales of :meth:`deep_supervision_scales`, highest resolution first.
        """
        self._check_input(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        supervised = self.deep_supervision and self.training
        n_out = len(self.heads) if supervised else 1
        outputs: List[torch.Tensor] = []
        for s in range(len(self.features) - 2, -1, -1):
            x = self.decoder[s](torch.cat([self.upsample[s](x), skips[s]], dim=1))
            if s < n_out:
                outputs.append(self.heads[s](x))
        if not outputs:  # a single stage: no decoder
            outputs.append(self.heads[0](x))
        outputs.reverse()
        return outputs if supervised else outputs[0]

    @classmethod
    def from_patch_size(cls, in_channels: int, num_classes: int, patch_size: Sequence[int],
                        spacing: Sequence[float], *, base_features: int = 32, max_features: int = 320,
                        min_feature_map: int = 4, spatial_dims: Optional[int] = None, **kwargs) -> "UNet":
        """Build a U-Net whose depth, strides and kernel sizes are planned as nnU-Net does.

        Strides and kernel sizes come from :func:`plan_topology`; stage ``s`` has
        ``min(base_features * 2**s, max_features)`` channels. The returned model's :attr:`patch_divisor`
        tells which patch sizes it accepts; when ``patch_size`` itself is not a multiple (sizes are rounded
        up while planning, as in nnU-Net), use :meth:`padded_patch_size` to get the patch size to train with.

        Args:
            in_channels, num_classes: as for :class:`UNet`.
            patch_size: training patch size per spatial axis.
            spacing: voxel spacing (mm) per spatial axis, same order as ``patch_size``.
            base_features: channels of the first stage.
            max_features: cap on the channels of any stage.
            min_feature_map: smallest edge length of the bottleneck feature map.
            spatial_dims: 2 or 3; defaults to ``len(patch_size)``.
            **kwargs: other :class:`UNet` keyword arguments (not features, strides or kernel_sizes).

        Returns:
            A :class:`UNet`.
        """
        patch_size = tuple(patch_size)
        spacing = tuple(spacing)
        if spatial_dims is None:
            spatial_dims = len(patch_size)
        if len(patch_size) != spatial_dims:
            _fail("patch_size", f"a sequence of spatial_dims={spatial_dims} ints", patch_size)
        for name in ("features", "strides", "kernel_sizes"):
            if name in kwargs:
                raise TypeError(f"UNet.from_patch_size: {name} is planned, it cannot be passed (got {name}="
                                f"{kwargs[name]!r})")
        base_features = _positive_int("base_features", base_features)
        max_features = _positive_int("max_features", max_features)
        strides, kernels = plan_topology(patch_size, spacing, min_feature_map=min_feature_map)
        features = tuple(min(base_features * 2**s, max_features) for s in range(len(strides)))
        return cls(in_channels, num_classes, spatial_dims=spatial_dims, features=features, strides=strides,
                   kernel_sizes=kernels, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
                f"spatial_dims={self.spatial_dims}, features={self.features}, strides={self.strides}, "
                f"kernel_sizes={self.kernel_sizes}, conv_per_stage={self.conv_per_stage}, "
                f"deep_supervision={self.deep_supervision}, norm={self.norm!r}")


def trained_patch_size(patch_size: Sequence[int], spacing: Sequence[float], *, base_features: int = 32,
                       max_features: int = 320) -> Tuple[int, ...]:
    """The patch a :meth:`UNet.from_patch_size` network trains on: ``patch_size`` rounded up to the planned
    network's :attr:`UNet.patch_divisor`, re-planned until stable (a larger patch may allow another stage)."""
    patch = tuple(int(p) for p in patch_size)
    for _ in range(4):
        padded = UNet.from_patch_size(1, 2, patch, spacing, base_features=base_features,
                                      max_features=max_features).padded_patch_size(patch)
        if padded == patch:
            break
        patch = padded
    return patch
