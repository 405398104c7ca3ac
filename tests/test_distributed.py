"""Batch Dice under torch.distributed: 2 CPU processes with the gloo backend."""
import os

import pytest
import torch
import torch.distributed as dist

from fastseg.functional import dice_ce_loss
from gloo import run_on_ranks

WORLD = 2
OPTS = dict(batch_dice=True, include_background=False, absent_classes="ignore", absent_penalty=0.5)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * WORLD, 4, 6, 5, 4, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 4, (2 * WORLD, 6, 5, 4), generator=gen)
    t[t == 3] = 0  # class 3 absent everywhere: exercises the batch-wide presence and the penalty
    t[:2][t[:2] == 2] = 1  # class 2 present on rank 1 only: presence must be global
    return x, t


def _worker(rank, out_dir):
    x, t = _inputs()
    xs = x[2 * rank:2 * rank + 2].clone().requires_grad_()
    loss = dice_ce_loss(xs, t[2 * rank:2 * rank + 2], **OPTS)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": xs.grad}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_batch_dice_uses_all_ranks_with_correct_gradient(tmp_path):
    run_on_ranks(_worker, WORLD, tmp_path, str(tmp_path))
    x, t = _inputs()
    full = x.clone().requires_grad_()
    ref = dice_ce_loss(full, t, **OPTS)
    ref.backward()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # Every rank sees the global Dice; its CE is local, so the mean over ranks is the global loss.
    torch.testing.assert_close(sum(r["loss"] for r in results) / WORLD, ref.detach())
    # DDP averages gradients over ranks, so each rank's gradient is WORLD x the global one.
    for r, res in enumerate(results):
        torch.testing.assert_close(res["grad"] / WORLD, full.grad[2 * r:2 * r + 2])
