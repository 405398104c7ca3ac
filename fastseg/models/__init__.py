"""Reference segmentation networks."""
from fastseg.models.unet import UNet, plan_topology, trained_patch_size

__all__ = ["UNet", "plan_topology", "trained_patch_size"]
