"""Pure-PyTorch versions of fastseg's ops: the oracle of the tests and the fallback without the extension.

They follow the op contracts in csrc/fastseg.cpp exactly but materialise probabilities and one-hot
targets, so they cost several times the logits in memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

SOFTMAX, SIGMOID = 0, 1


def check_labels(labels: torch.Tensor, num_classes: int, ignore_index: Optional[int]) -> None:
    """Raise if a label is neither a class in [0, num_classes) nor ignore_index (one host sync)."""
    if labels.numel() == 0:
        return
    valid = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        valid |= labels == ignore_index
    if not bool(valid.all()):
        bad = labels[~valid][0].item()
        also = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(
            f"fastseg.dice_ce: target must hold class labels in [0, {num_classes}){also}, got label {bad}"
        )


def dice_ce_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: int,
    ignore_index: Optional[int],
    squared_pred: bool,
) -> torch.Tensor:
    """(B, C, 5) sums [I, P, G, A, U] of csrc/dice_ce/dice_ce.h, differentiable by autograd."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    B, C, N = x.shape
    if target.dim() == 2:
        if not torch.compiler.is_compiling():
            check_labels(target, C, ignore_index)
        labels = target.long()
        valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
        classes = torch.arange(C, device=x.device).view(1, C, 1)
        g = ((labels.unsqueeze(1) == classes) & valid.unsqueeze(1)).to(acc)
    else:
        g = target.to(acc)
        valid = torch.ones((B, N), dtype=torch.bool, device=x.device)
    m = valid.unsqueeze(1).to(acc)
    if activation == SOFTMAX:
        logp = torch.log_softmax(x, dim=1)
        p = logp.exp()
        A = (g * -logp * m).sum(2)
        U = (-logp * m).sum(2)
    else:
        p = torch.sigmoid(x)
        A = (g * F.softplus(-x) * m).sum(2)
        U = ((1 - g) * F.softplus(x) * m).sum(2)
    pp, gg = (p * p, g * g) if squared_pred else (p, g)
    I = (p * g * m).sum(2)
    P = (pp * m).sum(2)
    G = (gg * m).sum(2)
    return torch.stack([I, P, G, A, U], dim=-1)
