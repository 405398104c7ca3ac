"""Reference segmentation networks."""
from fastseg.models.unet import UNet, plan_topology

__all__ = ["UNet", "plan_topology"]
