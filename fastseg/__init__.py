"""fastseg: fused C++/CUDA losses and metrics for 3D medical segmentation under severe class imbalance."""
from fastseg import _extension, functional
from fastseg import confidence
from fastseg._extension import build_info
from fastseg.functional import DiceCEStats, dice_ce_loss, dice_loss
from fastseg.losses import DeepSupervisionLoss, DiceCELoss, DiceLoss, downsample_labels
from fastseg.metrics import distance_transform_edt

__version__ = "0.1.0"

__all__ = [
    "DiceCELoss",
    "DiceLoss",
    "DeepSupervisionLoss",
    "DiceCEStats",
    "dice_ce_loss",
    "dice_loss",
    "downsample_labels",
    "distance_transform_edt",
    "functional",
    "confidence",
    "build_info",
]
