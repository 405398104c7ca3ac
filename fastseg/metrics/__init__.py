"""Segmentation metrics and the distance transforms they are built on."""
from fastseg.metrics.edt import distance_transform_edt
from fastseg.metrics.stateful import SurfaceMetric
from fastseg.metrics.surface import (
    average_surface_distance,
    dice_score,
    hausdorff_distance,
    normalized_surface_dice,
    surface_metrics,
)

__all__ = [
    "distance_transform_edt",
    "surface_metrics",
    "dice_score",
    "hausdorff_distance",
    "average_surface_distance",
    "normalized_surface_dice",
    "SurfaceMetric",
]
