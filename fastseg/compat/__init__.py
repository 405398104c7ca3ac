"""Drop-in replacements for the losses and surface metrics of other frameworks, on fastseg's kernels.

* :mod:`fastseg.compat.monai`: MONAI 1.6.1's ``DiceLoss`` and ``DiceCELoss``, and its
  ``compute_hausdorff_distance``, ``compute_average_surface_distance`` and ``compute_surface_dice``.
* :mod:`fastseg.compat.nnunet`: nnU-Net v2's ``DC_and_CE_loss`` (with ``SoftDiceLoss`` /
  ``MemoryEfficientSoftDiceLoss``) and ``DeepSupervisionWrapper``.

Each reproduces the original's arguments, errors, values and gradients; the configurations the kernel can
express exactly run through :func:`fastseg.functional.dice_ce_stats`, the others through a plain PyTorch
transcription of the original formulas. Neither MONAI nor nnU-Net is imported.

Example:
    >>> from fastseg.compat.monai import DiceCELoss      # instead of: from monai.losses import DiceCELoss
    >>> loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
"""
from fastseg.compat import monai, nnunet

__all__ = ["monai", "nnunet"]
