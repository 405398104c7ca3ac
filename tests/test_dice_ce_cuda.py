"""The CUDA kernels of fastseg::dice_ce_stats against the CPU kernels (same inputs, same op contract).

Skipped without a CUDA device or without the CUDA kernels in the built extension.
"""
import itertools

import pytest
import torch

import fastseg
from fastseg import _extension
from fastseg.functional import dice_ce_loss

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not _extension.cuda_available(),
                       reason="needs a CUDA device and fastseg built with its CUDA kernels"),
]

SOFTMAX, SIGMOID = 0, 1
# Tolerance per logits dtype, relative to the largest magnitude compared: both devices accumulate in float32
# (float64) but in different orders; half-precision gradients are rounded to their dtype on both.
STATS_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make(B, C, spatial, *, dtype=torch.float32, target="labels", label_dtype=torch.int64, ignore_index=None,
         seed=0):
    """CPU logits (B, C, *spatial) and a target: labels (B, *spatial) or a (B, C, *spatial) mask."""
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(B, C, *spatial, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, C, (B, *spatial), generator=gen)
    if target == "labels":
        if ignore_index is not None:
            drop = torch.rand(labels.shape, generator=gen) < 0.2
            labels = torch.where(drop, torch.full_like(labels, ignore_index), labels)
        return x, labels.to(label_dtype)
    if target == "uint8":
        return x, (torch.rand(B, C, *spatial, generator=gen) < 0.3).to(torch.uint8)
    if target == "bool":
        return x, torch.rand(B, C, *spatial, generator=gen) < 0.3
    return x, torch.rand(B, C, *spatial, generator=gen, dtype=_acc(dtype))  # soft float mask


def flat(x, t):
    B, C = x.shape[:2]
    return x.reshape(B, C, -1), (t.reshape(B, -1) if t.dim() == x.dim() - 1 else t.reshape(B, C, -1))


def assert_close_scaled(actual, expected, rtol):
    expected = expected.to(actual.device, actual.dtype)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


def _on(v, dev):
    return v(dev) if callable(v) else v.to(dev)


def op_both(x, t, act, ignore_index=None, squared=False, seed=0):
    """Stats and the backward op on CPU and CUDA for the same (B, C, N) inputs; compares them. x and t may
    be callables device -> tensor, to build the same strided views on both devices."""
    shape, dtype = _on(x, "cpu").shape, _on(x, "cpu").dtype
    gs = torch.randn(shape[0], shape[1], 5, generator=torch.Generator().manual_seed(seed + 1), dtype=_acc(dtype))
    out = {}
    for dev in ("cpu", "cuda"):
        xd, td, gd = _on(x, dev), _on(t, dev), gs.to(dev)
        out[dev] = (torch.ops.fastseg.dice_ce_stats(xd, td, act, ignore_index, squared),
                    torch.ops.fastseg.dice_ce_stats_backward(gd, xd, td, act, ignore_index, squared))
    (s_cpu, g_cpu), (s_cuda, g_cuda) = out["cpu"], out["cuda"]
    assert s_cuda.dtype == _acc(dtype) and s_cuda.shape == (shape[0], shape[1], 5)
    assert g_cuda.dtype == dtype and g_cuda.shape == shape
    assert_close_scaled(s_cuda.cpu(), s_cpu, STATS_RTOL[dtype])
    assert_close_scaled(g_cuda.cpu(), g_cpu, GRAD_RTOL[dtype])
    return s_cuda, g_cuda


DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", (SOFTMAX, SIGMOID))
@pytest.mark.parametrize("target", ("labels", "uint8", "float"))
@pytest.mark.parametrize("C", (2, 5, 16, 40))
def test_op_matches_cpu(dtype, act, target, C):
    x, t = make(2, C, (9, 11, 13), dtype=dtype, target=target, seed=C)  # N = 1287, odd
    op_both(*flat(x, t), act)


@pytest.mark.parametrize("label_dtype", (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64))
@pytest.mark.parametrize("act", (SOFTMAX, SIGMOID))
@pytest.mark.parametrize("squared", (False, True))
def test_label_dtypes_ignore_index_squared(label_dtype, act, squared):
    ignore = 255 if label_dtype == torch.uint8 else (-1 if label_dtype == torch.int8 else -100)
    x, t = make(3, 6, (17, 19), label_dtype=label_dtype, ignore_index=ignore, seed=7)
    op_both(*flat(x, t), act, ignore_index=ignore, squared=squared)
    x, t = make(3, 6, (17, 19), label_dtype=label_dtype, seed=8)
    op_both(*flat(x, t), act, ignore_index=0, squared=squared)  # ignoring a class's voxels
    op_both(*flat(x, t), act, squared=squared)


@pytest.mark.parametrize("act", (SOFTMAX, SIGMOID))
@pytest.mark.parametrize("C", (1, 3, 4, 8, 9, 17, 33, 100, 256, 257, 300))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_class_counts_across_kernel_paths(act, C, dtype):
    # C <= 4, <= 8, split over 2..32 lanes per voxel, and beyond 256 classes (log-sum-exp pre-pass, wide
    # backward with and without the shared-memory cache).
    if act == SOFTMAX and C == 1:
        C = 2
    x, t = make(2, C, (37,), dtype=dtype, seed=C)
    op_both(*flat(x, t), act)
    x, t = make(1, C, (23,), dtype=dtype, target="uint8", seed=C + 1)
    op_both(*flat(x, t), act, squared=True)


@pytest.mark.parametrize("N", (1, 2, 31, 33, 100_003))
def test_odd_voxel_counts(N):
    x, t = make(3, 7, (N,), seed=N % 97)
    op_both(x, t, SOFTMAX, ignore_index=3)
    op_both(x, t, SIGMOID)


@pytest.mark.parametrize("layout", ("channels_last", "strided"))
@pytest.mark.parametrize("C", (3, 13, 40))
@pytest.mark.parametrize("act", (SOFTMAX, SIGMOID))
def test_non_contiguous_logits_and_targets(layout, C, act):
    x0, t0 = make(2, C, (45,), dtype=torch.float16, seed=C)
    _, m0 = make(2, C, (45,), target="float", seed=C + 1)
    if layout == "channels_last":  # c-stride 1
        x = lambda d: x0.to(d).transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
        t = lambda d: t0.to(d)  # noqa: E731
        m = lambda d: m0.to(d).transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    else:  # views made on each device (moving a non-dense tensor would make it contiguous)
        x = lambda d: torch.cat([x0, x0], 2).to(d)[:, :, ::2]  # noqa: E731
        t = lambda d: torch.stack([t0, t0], -1).to(d)[..., 0]  # noqa: E731
        m = lambda d: torch.cat([m0, m0], 1).to(d)[:, ::2]  # noqa: E731
    assert x("cuda").stride() == x("cpu").stride()
    _, g = op_both(x, t, act, ignore_index=0)
    assert g.stride() == torch.empty_like(x("cuda")).stride()
    op_both(x, m, act)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ("softmax", "sigmoid"))
def test_loss_and_grad_channels_last_3d(dtype, activation):
    x, t = make(2, 5, (6, 7, 9), dtype=dtype, seed=11)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    opts = dict(activation=activation, include_background=False, absent_classes="ignore")
    if activation == "softmax":
        opts.update(ignore_index=4)
    res = {}
    for dev in ("cpu", "cuda"):
        xd = x.to(dev).requires_grad_()
        loss = dice_ce_loss(xd, t.to(dev), **opts)
        (g,) = torch.autograd.grad(loss, xd)
        res[dev] = (loss, g)
    assert res["cuda"][1].is_contiguous(memory_format=torch.channels_last_3d)
    assert_close_scaled(res["cuda"][0].cpu(), res["cpu"][0], STATS_RTOL[dtype])
    assert_close_scaled(res["cuda"][1].cpu(), res["cpu"][1], GRAD_RTOL[dtype])


@pytest.mark.parametrize("case", [
    dict(activation="softmax", target="labels", opts=dict(batch_dice=True, squared_pred=True)),
    dict(activation="softmax", target="uint8", opts=dict(weight=[1.0, 2.0, 0.5, 1.0], label_smoothing=0.1)),
    dict(activation="sigmoid", target="bool", opts=dict(pos_weight=[2.0, 1.0, 1.0, 3.0], reduction="sum")),
    dict(activation="sigmoid", target="float", opts=dict(absent_penalty=0.5)),
])
def test_loss_2d_matches_cpu(case):
    x, t = make(3, 4, (33, 29), target=case["target"], seed=5)
    res = {}
    for dev in ("cpu", "cuda"):
        xd = x.to(dev).requires_grad_()
        loss = dice_ce_loss(xd, t.to(dev), activation=case["activation"], **case["opts"])
        (g,) = torch.autograd.grad(loss, xd)
        res[dev] = (loss, g)
    assert_close_scaled(res["cuda"][0].cpu(), res["cpu"][0], 1e-4)
    assert_close_scaled(res["cuda"][1].cpu(), res["cpu"][1], 1e-4)


def test_module_on_cuda():
    x, t = make(2, 4, (8, 8, 8), seed=2)
    crit = fastseg.DiceCELoss(include_background=False)
    xd = x.cuda().requires_grad_()
    loss = crit(xd, t.cuda())
    loss.backward()
    assert torch.isfinite(xd.grad).all()
    torch.testing.assert_close(loss.cpu(), crit(x, t), rtol=1e-4, atol=1e-5)


def test_deterministic():
    x, t = make(2, 12, (64, 64), seed=3)
    x, t = flat(x.cuda(), t.cuda())
    a = torch.ops.fastseg.dice_ce_stats(x, t, SOFTMAX, None, False)
    b = torch.ops.fastseg.dice_ce_stats(x, t, SOFTMAX, None, False)
    assert torch.equal(a, b)


def test_batch_beyond_grid_y_limit():
    x, t = make(65_537, 2, (3,), seed=4)
    op_both(x, t, SOFTMAX)


def test_out_of_range_labels():
    x, t = make(2, 4, (50,), seed=6)
    t[0, 3], t[1, 7] = 9, -5
    # The op cannot raise on CUDA: such labels count as ignored and never index out of bounds.
    got = torch.ops.fastseg.dice_ce_stats(x.cuda(), t.cuda(), SOFTMAX, 7, False)
    fixed = t.clone()
    fixed[0, 3] = fixed[1, 7] = 7
    assert_close_scaled(got.cpu(), torch.ops.fastseg.dice_ce_stats(x, fixed, SOFTMAX, 7, False), 1e-4)
    # The Python layer checks them before launching.
    with pytest.raises(ValueError, match="class labels in"):
        fastseg.functional.dice_ce_stats(x.cuda().unsqueeze(-1), t.cuda().unsqueeze(-1))


def test_empty_inputs():
    for shape in ((0, 3, 5), (2, 3, 0)):
        x = torch.randn(shape, device="cuda")
        t = torch.zeros(shape[0], shape[2], dtype=torch.long, device="cuda")
        s = torch.ops.fastseg.dice_ce_stats(x, t, SOFTMAX, None, False)
        assert s.shape == (shape[0], 3, 5) and not s.any()
        g = torch.ops.fastseg.dice_ce_stats_backward(torch.ones(shape[0], 3, 5, device="cuda"), x, t, SOFTMAX,
                                                     None, False)
        assert g.shape == x.shape


def test_expanded_grad_stats():
    x, t = make(2, 5, (40,), seed=8)
    x, t = x.cuda(), t.cuda()
    gs = torch.ones((), device="cuda").expand(2, 5, 5)
    g = torch.ops.fastseg.dice_ce_stats_backward(gs, x, t, SOFTMAX, None, False)
    ref = torch.ops.fastseg.dice_ce_stats_backward(gs.contiguous(), x, t, SOFTMAX, None, False)
    assert torch.equal(g, ref)


def test_runs_on_the_current_stream():
    x, t = make(2, 6, (32, 32), seed=9)
    x, t = flat(x.cuda(), t.cuda())
    expected = torch.ops.fastseg.dice_ce_stats(x, t, SOFTMAX, None, False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            got = torch.ops.fastseg.dice_ce_stats(x, t, SOFTMAX, None, False)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_guard():
    x, t = make(2, 4, (100,), seed=10)
    with torch.cuda.device(0):
        got = torch.ops.fastseg.dice_ce_stats(x.to("cuda:1"), t.to("cuda:1"), SOFTMAX, None, False)
    assert got.device == torch.device("cuda:1")
    assert_close_scaled(got.cpu(), torch.ops.fastseg.dice_ce_stats(x, t, SOFTMAX, None, False), 1e-4)


@pytest.mark.parametrize("act,target", list(itertools.product((SOFTMAX, SIGMOID), ("labels", "uint8", "float"))))
def test_opcheck_cuda(act, target):
    x, t = make(2, 3, (20,), target=target, seed=12)
    x, t = x.cuda(), t.cuda()
    torch.library.opcheck(torch.ops.fastseg.dice_ce_stats.default, (x, t, act, None, False))
    torch.library.opcheck(torch.ops.fastseg.dice_ce_stats.default, (x.requires_grad_(), t, act, None, True))
    gs = torch.randn(2, 3, 5, device="cuda")
    torch.library.opcheck(torch.ops.fastseg.dice_ce_stats_backward.default,
                          (gs, x.detach(), t, act, 1 if target == "labels" else None, False))
