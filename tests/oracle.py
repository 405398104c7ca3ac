"""An independent, deliberately plain float64 formulation of fastseg's Dice + CE loss, for the tests.

It shares no code with fastseg: probabilities and one-hot targets are materialised, CE comes from
torch.nn.functional where torch defines it, and each option is written out as the docstring of
fastseg.functional.dice_ce_loss states it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def one_hot(labels: torch.Tensor, C: int, ignore_index):
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    g = F.one_hot(safe, C).movedim(-1, 1).to(torch.float64)
    return g * valid.unsqueeze(1), valid


def loss(x, target, *, activation="softmax", include_background=True, batch_dice=False, smooth_nr=1e-5,
         smooth_dr=1e-5, squared_pred=False, weight=None, pos_weight=None, lambda_dice=1.0, lambda_ce=1.0,
         ignore_index=None, label_smoothing=0.0, reduction="mean", absent_classes="keep", absent_penalty=0.0):
    x = x.to(torch.float64)
    B, C = x.shape[:2]
    sdims = tuple(range(2, x.dim()))
    labels = target.dim() == x.dim() - 1
    if labels:
        g, valid = one_hot(target, C, ignore_index)
    else:
        g, valid = target.to(torch.float64), torch.ones((B,) + x.shape[2:], dtype=torch.bool)
    m = valid.unsqueeze(1).to(torch.float64)
    w = torch.ones(C, dtype=torch.float64) if weight is None else torch.as_tensor(weight, dtype=torch.float64)
    wv = w.view(1, C, *([1] * len(sdims)))
    p = torch.softmax(x, 1) if activation == "softmax" else torch.sigmoid(x)

    # CE as torch defines it, and its per-(b, c) decomposition for reduction='none'.
    if activation == "softmax":
        logp = torch.log_softmax(x, 1)
        gs = (1 - label_smoothing) * g + label_smoothing / C
        ce_bc = (-(wv * gs * logp) * m).sum(sdims)
        if labels:
            ii = -100 if ignore_index is None else ignore_index
            ce_mean = F.cross_entropy(x, target.long(), weight=w, ignore_index=ii, label_smoothing=label_smoothing)
            ce_sum = F.cross_entropy(x, target.long(), weight=w, ignore_index=ii, label_smoothing=label_smoothing,
                                     reduction="sum")
        else:
            ce_mean = F.cross_entropy(x, g, weight=w, label_smoothing=label_smoothing)
            ce_sum = F.cross_entropy(x, g, weight=w, label_smoothing=label_smoothing, reduction="sum")
    else:
        pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float64).view(C, *([1] * len(sdims)))
        el = F.binary_cross_entropy_with_logits(x, g, weight=wv.expand_as(x), pos_weight=pw, reduction="none") * m
        ce_bc = el.sum(sdims)
        ce_sum = el.sum()
        ce_mean = ce_sum / (m.sum() * C)

    dims = (0,) + sdims if batch_dice else sdims
    pp, gg = (p * p, g * g) if squared_pred else (p, g)
    I = (p * g * m).sum(dims)
    P = (pp * m).sum(dims)
    G = (gg * m).sum(dims)
    if batch_dice:
        I, P, G = I[None], P[None], G[None]
    dice = 1 - (2 * I + smooth_nr) / (P + G + smooth_dr)
    sel = torch.ones(C, dtype=torch.bool)
    if not include_background:
        sel[0] = False
    present = G > 0
    nvalid = m.sum(dims) if batch_dice else m.sum(sdims)  # (B, 1) or (1, 1)
    nvalid = nvalid.reshape(-1, 1)
    terms, pens, counts = [], [], []
    for r in range(dice.shape[0]):
        cls = [c for c in range(C) if sel[c] and (absent_classes == "keep" or present[r, c])]
        terms.append(sum((w[c] * dice[r, c] for c in cls), torch.zeros((), dtype=torch.float64)))
        counts.append(len(cls))
        absent = [c for c in range(C) if sel[c] and not present[r, c]]
        pens.append(sum((P[r, c] for c in absent), torch.zeros((), dtype=torch.float64)) / nvalid[r, 0].clamp_min(1))

    if reduction == "sum":
        return lambda_dice * sum(terms) + lambda_ce * ce_sum + absent_penalty * sum(pens)
    if reduction == "mean":
        if absent_classes == "keep":
            dice_red = sum(terms) / (len(terms) * int(sel.sum()))
        else:
            dice_red = sum(t / n if n else t * 0 for t, n in zip(terms, counts)) / len(terms)
        return lambda_dice * dice_red + lambda_ce * ce_mean + absent_penalty * sum(pens) / len(pens)
    # 'none': (B, C) terms whose sum is the 'sum' reduction.
    rows = B if batch_dice else 1
    out = lambda_ce * ce_bc.clone()
    for r in range(dice.shape[0]):
        for c in range(C):
            counted = sel[c] and (absent_classes == "keep" or present[r, c])
            extra = (lambda_dice * w[c] * dice[r, c] if counted else 0.0)
            extra = extra + (absent_penalty * P[r, c] / nvalid[r, 0].clamp_min(1) if sel[c] and not present[r, c] else 0.0)
            if batch_dice:
                out[:, c] = out[:, c] + extra / rows
            else:
                out[r, c] = out[r, c] + extra
    return out
