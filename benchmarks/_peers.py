"""Shared setup of the Dice + cross-entropy loss benchmarks: inputs, the peers, one forward+backward step.

Used by benchmarks/bench_dice_ce.py (the script that prints and saves tables) and by
benchmarks/test_bench_dice_ce.py (pytest-benchmark entries), so the two never measure different things.

Every method computes the same loss on the same inputs: softmax over C classes, mean over (sample,
foreground class) of the soft Dice loss 1 - (2I + 1e-5) / (P + G + 1e-5) with the background channel
dropped, plus the mean voxel cross-entropy over all classes. nnU-Net returns CE - mean(Dice) instead,
i.e. the same value minus 1 (same gradient); ``Method.to_fastseg_convention`` undoes that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

SMOOTH = 1e-5
SEED = 0

FULL_SHAPES: Tuple[Tuple[int, ...], ...] = ((2, 8, 96, 96, 96), (2, 16, 128, 128, 128), (2, 22, 128, 128, 128))
QUICK_SHAPES: Tuple[Tuple[int, ...], ...] = ((2, 8, 96, 96, 96),)
FULL_DTYPES: Tuple[str, ...] = ("float32", "bfloat16")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "half": "float16", "f16": "float16", "fp64": "float64", "double": "float64"}
TARGET_DTYPES = {"int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "uint8": torch.uint8}

# Timed methods, in table order. "eager_ref" is available but not run by default.
DEFAULT_METHODS: Tuple[str, ...] = ("fastseg", "monai", "nnunet", "compiled_ref")
ALL_METHODS: Tuple[str, ...] = DEFAULT_METHODS + ("eager_ref",)


class Unavailable(RuntimeError):
    """A peer that cannot be built here (not installed, no kernel for this device, ...)."""


def canonical_dtype(name: str) -> str:
    name = name.strip().lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return name


def parse_shape(text: str) -> Tuple[int, ...]:
    """'2x8x96x96x96' (or with commas); 'BxCxS' is shorthand for the cube BxCxSxSxS."""
    parts = [int(p) for p in text.replace(",", "x").replace("*", "x").lower().split("x") if p]
    if len(parts) == 3:
        parts = parts + [parts[2], parts[2]]
    if len(parts) < 3 or any(p <= 0 for p in parts):
        raise ValueError(f"bad shape {text!r}: expected BxCxS or BxCxDxHxW with positive sizes")
    if parts[1] < 2:
        raise ValueError(f"bad shape {text!r}: softmax Dice + CE needs at least 2 classes")
    return tuple(parts)


def shape_str(shape: Sequence[int]) -> str:
    spatial = tuple(shape[2:])
    if len(spatial) == 3 and len(set(spatial)) == 1:
        return f"{shape[0]}×{shape[1]}×{spatial[0]}³"
    return "×".join(str(s) for s in shape)


def logits_bytes(shape: Sequence[int], dtype: str) -> int:
    return math.prod(shape) * DTYPES[dtype].itemsize


def make_inputs(shape: Sequence[int], dtype: str, device: str = "cpu", seed: int = SEED,
                target_dtype: str = "int64"):
    """Logits ~ N(0, 1) as a leaf requiring grad, and labels uniform in [0, C) shaped (B, 1, *spatial).

    Both are drawn on the CPU from a seeded generator (the same values on every device and in every
    process), then moved. int64 labels are what F.cross_entropy wants, so no peer pays for a cast.
    """
    shape = tuple(int(s) for s in shape)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if DTYPES[dtype] != torch.float32:
        x = x.to(DTYPES[dtype])
    labels = torch.randint(0, shape[1], (shape[0], 1) + shape[2:], generator=gen, dtype=torch.int64)
    if target_dtype != "int64":
        labels = labels.to(TARGET_DTYPES[target_dtype])
    if device != "cpu":
        x, labels = x.to(device), labels.to(device)
    return x.requires_grad_(True), labels


def reference_dice_ce(logits: torch.Tensor, target: torch.Tensor, smooth: float = SMOOTH,
                      compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Straightforward PyTorch version of the loss: softmax, one-hot, Dice without background, F.cross_entropy.

    Computes in float32 (float64 for the oracle) whatever the logits' dtype, like fastseg's accumulation.
    """
    x = logits.to(compute_dtype)
    labels = target[:, 0].long()
    C = x.shape[1]
    p = torch.softmax(x, dim=1)
    g = F.one_hot(labels, C).movedim(-1, 1).to(compute_dtype)
    dims = tuple(range(2, x.dim()))
    intersection = (p * g).sum(dims)
    pred_sum = p.sum(dims)
    target_sum = g.sum(dims)
    dice = 1.0 - (2.0 * intersection + smooth) / (pred_sum + target_sum + smooth)
    return dice[:, 1:].mean() + F.cross_entropy(x, labels)


@dataclass
class Method:
    key: str
    label: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    offset: float = 0.0  # value + offset = value in fastseg's (MONAI's) convention
    note: str = ""
    compiled: bool = False

    def to_fastseg_convention(self, value: float) -> float:
        return value + self.offset


def _build_fastseg(device: str) -> Method:
    try:
        import fastseg
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        raise Unavailable(f"fastseg not importable: {type(exc).__name__}: {exc}") from exc
    info = fastseg.build_info()
    label = "fastseg DiceCELoss"
    note = ""
    if not info.get("extension"):
        label += " [pure-PyTorch fallback]"
        note = f"fastseg extension not loaded: {info.get('reason')}"
    elif device.startswith("cuda") and not info.get("cuda_kernels"):
        raise Unavailable("fastseg was built without CUDA kernels (build_info: cuda_kernels=False)")
    loss = fastseg.DiceCELoss(activation="softmax", include_background=False, smooth_nr=SMOOTH, smooth_dr=SMOOTH)
    return Method("fastseg", label, loss.to(device), note=note)


def _build_monai(device: str) -> Method:
    try:
        import monai
        from monai.losses import DiceCELoss
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"MONAI not importable: {type(exc).__name__}: {exc}") from exc
    loss = DiceCELoss(softmax=True, to_onehot_y=True, include_background=False)
    return Method("monai", "MONAI DiceCELoss", loss.to(device), note=f"monai {monai.__version__}")


def _build_nnunet(device: str, compile_dc: Optional[bool] = None) -> Method:
    """DC_and_CE_loss exactly as nnUNetTrainer._build_loss builds it (no ignore label, not DDP, per-sample
    Dice). The trainer wraps the Dice part in torch.compile on CUDA (never on CPU); so do we by default."""
    try:
        import nnunetv2
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"nnU-Net v2 not importable: {type(exc).__name__}: {exc}") from exc
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if compile_dc is None:
        compile_dc = device.startswith("cuda")
    label = "nnU-Net DC_and_CE_loss"
    if compile_dc:
        loss.dc = torch.compile(loss.dc)
        label += " [dc compiled, as its trainer on CUDA]"
    version = getattr(nnunetv2, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as _v
            version = _v("nnunetv2")
        except Exception:  # noqa: BLE001
            version = "?"
    return Method("nnunet", label, loss.to(device), offset=1.0,
                  note=f"nnunetv2 {version}; value = CE - mean Dice = fastseg - 1", compiled=compile_dc)


def _build_compiled_ref(device: str) -> Method:
    if not hasattr(torch, "compile"):
        raise Unavailable("torch.compile is not available in this torch")
    return Method("compiled_ref", "torch.compile(reference)", torch.compile(reference_dice_ce), compiled=True)


def _build_eager_ref(device: str) -> Method:
    return Method("eager_ref", "eager reference (PyTorch)", reference_dice_ce)


_BUILDERS = {
    "fastseg": _build_fastseg,
    "monai": _build_monai,
    "nnunet": _build_nnunet,
    "compiled_ref": _build_compiled_ref,
    "eager_ref": _build_eager_ref,
}


def build(method: str, device: str = "cpu") -> Method:
    """The loss callable of one method; raises Unavailable (with the reason) when it cannot be built."""
    if method not in _BUILDERS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(_BUILDERS)}")
    return _BUILDERS[method](device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fwd_bwd(fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One training-style step of the loss alone: forward, backward into a freshly allocated logits.grad."""
    logits.grad = None
    loss = fn(logits, target)
    loss.backward()
    return loss


def make_step(fn: Callable, logits: torch.Tensor, target: torch.Tensor, device: str) -> Callable[[], None]:
    """A no-argument closure timing-ready for pytest-benchmark: fwd_bwd then a device sync."""

    def step() -> None:
        fwd_bwd(fn, logits, target)
        synchronize(device)

    return step
