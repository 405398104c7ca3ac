"""fastseg::dice_ce_stats: schema in csrc/fastseg.cpp, kernels in csrc/dice_ce/, fake + autograd here."""
from __future__ import annotations

from typing import Optional

import torch

from fastseg import _extension, _reference

SOFTMAX, SIGMOID = _reference.SOFTMAX, _reference.SIGMOID
NUM_STATS = 5


def dice_ce_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: int,
    ignore_index: Optional[int] = None,
    squared_pred: bool = False,
) -> torch.Tensor:
    """(B, C, 5) per-(sample, class) sums [I, P, G, A, U] from one pass over (B, C, N) logits.

    target is (B, N) integer labels or a (B, C, N) uint8 / float mask. See csrc/dice_ce/dice_ce.h for the
    definitions; differentiable with respect to logits.
    """
    if _extension.available():
        if logits.is_cuda and not torch.compiler.is_compiling() and target.dim() == 2:
            # The CUDA kernel cannot raise; a sync here keeps bad labels from being silently ignored.
            _reference.check_labels(target, logits.shape[1], ignore_index)
        return torch.ops.fastseg.dice_ce_stats(logits, target, activation, ignore_index, squared_pred)
    return _reference.dice_ce_stats(logits, target, activation, ignore_index, squared_pred)


def _stats_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _check_shapes(logits, target, activation):
    torch._check(logits.dim() == 3, lambda: f"fastseg::dice_ce_stats: logits must be (B, C, N), got {logits.shape}")
    torch._check(activation in (SOFTMAX, SIGMOID), lambda: f"fastseg::dice_ce_stats: bad activation {activation}")
    if target.dim() == 2:
        torch._check(target.shape[0] == logits.shape[0] and target.shape[1] == logits.shape[2])
    else:
        torch._check(target.shape == logits.shape)


if _extension.available():

    @torch.library.register_fake("fastseg::dice_ce_stats")
    def _dice_ce_stats_fake(logits, target, activation, ignore_index, squared_pred):
        _check_shapes(logits, target, activation)
        return logits.new_empty((logits.shape[0], logits.shape[1], NUM_STATS), dtype=_stats_dtype(logits))

    @torch.library.register_fake("fastseg::dice_ce_stats_backward")
    def _dice_ce_stats_backward_fake(grad_stats, logits, target, activation, ignore_index, squared_pred):
        _check_shapes(logits, target, activation)
        return torch.empty_like(logits)

    def _setup_context(ctx, inputs, output):
        logits, target, activation, ignore_index, squared_pred = inputs
        ctx.save_for_backward(logits, target)
        ctx.args = (activation, ignore_index, squared_pred)

    def _backward(ctx, grad_stats):
        logits, target = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.fastseg.dice_ce_stats_backward(grad_stats, logits, target, *ctx.args)
        return grad, None, None, None, None

    torch.library.register_autograd("fastseg::dice_ce_stats", _backward, setup_context=_setup_context)

    def _setup_context_bw(ctx, inputs, output):
        pass

    def _double_backward(ctx, grad):
        raise RuntimeError(
            "fastseg: double backward (second derivatives) of the fused Dice + CE loss is not supported; "
            "use fastseg._reference.dice_ce_stats if you need it"
        )

    torch.library.register_autograd(
        "fastseg::dice_ce_stats_backward", _double_backward, setup_context=_setup_context_bw
    )
