"""Segmentation metrics and the distance transforms they are built on."""
from fastseg.metrics.edt import distance_transform_edt

__all__ = ["distance_transform_edt"]
