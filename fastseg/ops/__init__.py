"""Op wrappers: each dispatches to the compiled kernel or, without it, to fastseg._reference."""
from fastseg.ops.dice_ce import SIGMOID, SOFTMAX, dice_ce_stats

__all__ = ["dice_ce_stats", "SOFTMAX", "SIGMOID"]
