"""pytest-benchmark entries: forward + backward of fastseg vs MONAI vs nnU-Net Dice + CE losses.

Not part of the test suite (that is tests/). Run with

    python -m pytest benchmarks/test_bench_dice_ce.py --benchmark-only

Environment variables:
    FASTSEG_BENCH_ALL=1          every shape of bench_dice_ce.py in float32 and bfloat16 (default: 2x8x96^3 fp32)
    FASTSEG_BENCH_METHODS=...    comma list from fastseg, monai, nnunet, compiled_ref, eager_ref
    FASTSEG_BENCH_DEVICE=cuda    default cpu
    FASTSEG_BENCH_THREADS=N      torch.set_num_threads (default: torch's own)

Inputs, loss configurations and the step come from _peers.py, shared with bench_dice_ce.py.
"""
from __future__ import annotations

import os

import pytest
import torch

import _peers

_ALL = os.environ.get("FASTSEG_BENCH_ALL", "0") not in ("", "0", "false", "False")
SHAPES = _peers.FULL_SHAPES if _ALL else _peers.QUICK_SHAPES
DTYPES = _peers.FULL_DTYPES if _ALL else ("float32",)
METHODS = tuple(m.strip() for m in os.environ.get("FASTSEG_BENCH_METHODS", "fastseg,monai,nnunet").split(",")
                if m.strip())
DEVICE = os.environ.get("FASTSEG_BENCH_DEVICE", "cpu")

if os.environ.get("FASTSEG_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTSEG_BENCH_THREADS"]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", METHODS)
def test_dice_ce_forward_backward(benchmark, method, shape, dtype):
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("FASTSEG_BENCH_DEVICE=cuda but CUDA is not available")
    try:
        m = _peers.build(method, DEVICE)
    except _peers.Unavailable as exc:
        pytest.skip(str(exc))
    logits, target = _peers.make_inputs(shape, dtype, DEVICE)
    step = _peers.make_step(m.fn, logits, target, DEVICE)

    # Warm-up outside the measurement (compiles torch.compile'd methods); record what it computed.
    loss = _peers.fwd_bwd(m.fn, logits, target)
    _peers.synchronize(DEVICE)
    value = loss.item()
    benchmark.group = f"{_peers.shape_str(shape)} {dtype} {DEVICE}"
    benchmark.extra_info.update(
        label=m.label, loss=value, loss_fastseg_convention=m.to_fastseg_convention(value),
        threads=torch.get_num_threads(), torch=torch.__version__, note=m.note,
    )
    del loss
    benchmark(step)
