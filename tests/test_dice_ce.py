import itertools

import pytest
import torch

import fastseg
from fastseg import _extension, _reference
from fastseg.functional import dice_ce_loss, dice_loss

from oracle import loss as oracle_loss

needs_ext = pytest.mark.skipif(not _extension.available(), reason="compiled extension not loaded")


def make_inputs(shape=(2, 4, 5, 6, 7), activation="softmax", target_kind="labels", ignore_index=None, seed=0,
                dtype=torch.float64, label_dtype=torch.int64, absent=(2,)):
    """Random logits and a target; classes in `absent` are missing from sample 0."""
    gen = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    x = (2 * torch.randn(shape, generator=gen)).to(dtype)
    labels = torch.randint(0, C, (B, *shape[2:]), generator=gen)
    for c in absent:
        if c < C:
            labels[0][labels[0] == c] = 0
    if ignore_index is not None:
        drop = torch.rand(labels.shape, generator=gen) < 0.2
        labels = torch.where(drop, torch.full_like(labels, ignore_index), labels)
    if target_kind == "labels":
        return x, labels.to(label_dtype)
    mask = torch.nn.functional.one_hot(labels.clamp(0, C - 1), C).movedim(-1, 1)
    if activation == "sigmoid":  # overlapping organs: channel 1 also covers part of channel 0
        mask[:, 1] |= (torch.rand(mask[:, 1].shape, generator=gen) < 0.1).long()
    if target_kind == "uint8":
        return x, mask.to(torch.uint8)
    return x, (mask.to(torch.float64) * 0.9 + 0.05) if target_kind == "soft" else mask.to(torch.float64)


def assert_value_and_grad(fn_a, fn_b, x, atol=1e-10, rtol=1e-9):
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    a, b = fn_a(xa), fn_b(xb)
    torch.testing.assert_close(a, b.to(a.dtype), atol=atol, rtol=rtol)
    seed = torch.randn_like(a) if a.dim() else torch.ones_like(a)
    (ga,) = torch.autograd.grad((a * seed).sum(), xa)
    (gb,) = torch.autograd.grad((b * seed.to(b.dtype)).sum(), xb)
    torch.testing.assert_close(ga, gb.to(ga.dtype), atol=atol, rtol=rtol)


# --- the op against its in-package reference -------------------------------------------------------

OP_GRID = [(a, k, s, i) for a, k, s, i in itertools.product(("softmax", "sigmoid"), ("labels", "uint8", "float"),
                                                            (False, True), (None, 3))
           if k == "labels" or i is None]  # ignore_index needs labels


@needs_ext
@pytest.mark.parametrize("activation,target_kind,squared,ignore_index", OP_GRID)
def test_stats_op_matches_reference(activation, target_kind, squared, ignore_index):
    x, t = make_inputs((3, 4, 37, 11), activation, target_kind, ignore_index, seed=1)
    x3 = x.reshape(3, 4, -1)
    t3 = t.reshape(3, -1) if t.dim() == 3 else t.reshape(3, 4, -1)
    act = 0 if activation == "softmax" else 1
    ref = lambda v: _reference.dice_ce_stats(v, t3, act, ignore_index, squared)  # noqa: E731
    ker = lambda v: torch.ops.fastseg.dice_ce_stats(v, t3, act, ignore_index, squared)  # noqa: E731
    assert_value_and_grad(ker, ref, x3)


@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_stats_op_low_precision_accumulates_in_float32(dtype):
    x, t = make_inputs((2, 6, 4000), dtype=torch.float64, seed=3)
    xl = x.to(dtype)
    ker = torch.ops.fastseg.dice_ce_stats(xl, t, 0, None, False)
    assert ker.dtype == torch.float32
    ref = _reference.dice_ce_stats(xl.double(), t, 0, None, False)
    torch.testing.assert_close(ker.double(), ref, rtol=2e-5, atol=1e-2)
    gs = torch.randn(2, 6, 5)
    g = torch.ops.fastseg.dice_ce_stats_backward(gs, xl, t, 0, None, False)
    assert g.dtype == dtype and g.shape == xl.shape
    # the float32 maths on the same values, rounded to the logits' dtype once and exactly as torch rounds
    g32 = torch.ops.fastseg.dice_ce_stats_backward(gs, xl.float(), t, 0, None, False)
    assert torch.equal(g, g32.to(dtype))


# --- the loss against an independent float64 formulation ------------------------------------------

LOSS_CASES = [
    dict(),
    dict(include_background=False),
    dict(batch_dice=True),
    dict(squared_pred=True, smooth_nr=0.0, smooth_dr=1.0),
    dict(weight=[0.5, 1.0, 2.0, 3.0], label_smoothing=0.1),
    dict(weight=[0.5, 1.0, 2.0, 3.0], ignore_index=7, label_smoothing=0.2, include_background=False),
    dict(ignore_index=-1, batch_dice=True, lambda_dice=0.7, lambda_ce=0.3),
    dict(absent_classes="ignore"),
    dict(absent_classes="ignore", include_background=False, batch_dice=True),
    dict(absent_classes="ignore", absent_penalty=2.0, ignore_index=255),
    dict(absent_penalty=1.0, batch_dice=True, include_background=False),
    dict(reduction="sum", weight=[1.0, 2.0, 0.0, 1.0], absent_classes="ignore"),
    dict(reduction="none"),
    dict(reduction="none", batch_dice=True, absent_classes="ignore", absent_penalty=0.5, ignore_index=9),
    dict(activation="sigmoid"),
    dict(activation="sigmoid", target_kind="float", weight=[1.0, 2.0, 1.0, 0.5], pos_weight=[3.0, 1.0, 2.0, 1.0]),
    dict(activation="sigmoid", target_kind="uint8", absent_classes="ignore", batch_dice=True),
    dict(activation="sigmoid", ignore_index=4, include_background=False, reduction="none"),
    dict(activation="sigmoid", target_kind="soft", squared_pred=True, reduction="sum"),
    dict(target_kind="float", label_smoothing=0.1, weight=[1.0, 2.0, 3.0, 4.0]),
    dict(target_kind="uint8", absent_classes="ignore", absent_penalty=1.0),
]


def _case_id(case):
    return ",".join(f"{k}={v}" for k, v in case.items()) or "defaults"


@pytest.mark.parametrize("case", LOSS_CASES, ids=_case_id)
@pytest.mark.parametrize("spatial", [(5, 6, 7), (9, 8)], ids=["3d", "2d"])
def test_loss_matches_oracle(case, spatial):
    case = dict(case)
    kind = case.pop("target_kind", "labels")
    x, t = make_inputs((3, 4, *spatial), case.get("activation", "softmax"), kind, case.get("ignore_index"))
    assert_value_and_grad(lambda v: dice_ce_loss(v, t, **case), lambda v: oracle_loss(v, t, **case), x)


def test_none_reduction_sums_to_sum_reduction():
    x, t = make_inputs(ignore_index=5)
    opts = dict(batch_dice=True, absent_classes="ignore", absent_penalty=0.3, ignore_index=5, weight=[1, 2, 3, 4])
    none = dice_ce_loss(x, t, reduction="none", **opts)
    assert none.shape == (2, 4)
    torch.testing.assert_close(none.sum(), dice_ce_loss(x, t, reduction="sum", **opts))


def test_class_adaptive_dice_averages_present_classes_only():
    # Sample 0 holds classes {0, 1}, sample 1 holds {0, 1, 2, 3}; 'ignore' averages over those.
    x, t = make_inputs((2, 4, 6, 6, 6), absent=(2, 3))
    assert set(t[0].unique().tolist()) == {0, 1}
    _, st = dice_ce_loss(x, t, return_stats=True)
    d = 1 - (2 * st.intersection + 1e-5) / (st.pred_sum + st.target_sum + 1e-5)
    expected = (d[0, :2].mean() + d[1].mean()) / 2
    got = dice_loss(x, t, absent_classes="ignore")
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(dice_loss(x, t), d.mean())


def test_stats_are_returned_from_the_same_pass():
    x, t = make_inputs(ignore_index=-1)
    loss, st = dice_ce_loss(x, t, ignore_index=-1, return_stats=True)
    ref = _reference.dice_ce_stats(x.reshape(2, 4, -1), t.reshape(2, -1), 0, -1, False)
    torch.testing.assert_close(st.intersection, ref[..., 0])
    torch.testing.assert_close(st.pred_sum, ref[..., 1])
    torch.testing.assert_close(st.target_sum, ref[..., 2])
    assert torch.equal(st.present, ref[..., 2] > 0)
    counts = torch.stack([(t == c).sum((1, 2, 3)) for c in range(4)], 1).double()
    torch.testing.assert_close(st.target_sum, counts)
    assert not st.intersection.requires_grad


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_logits_give_finite_loss_close_to_float64(dtype):
    # Logits of a confident network on a volume large enough that fp16 sums of probabilities overflow.
    x, t = make_inputs((2, 8, 48, 48, 48), dtype=torch.float64, seed=4)
    x = x * 4
    xl = x.to(dtype)
    opts = dict(include_background=False, absent_classes="ignore")
    got = dice_ce_loss(xl, t, **opts)
    ref = dice_ce_loss(xl.double(), t, **opts)
    assert torch.isfinite(got) and got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 1e-3
    xr = xl.clone().requires_grad_()
    dice_ce_loss(xr, t, **opts).backward()
    assert xr.grad.dtype == dtype and torch.isfinite(xr.grad).all()


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                         torch.uint16, torch.uint32])
def test_every_integer_label_dtype(label_dtype):
    x, t = make_inputs(dtype=torch.float32)
    ref = dice_ce_loss(x, t)
    got = dice_ce_loss(x, t.to(label_dtype))
    torch.testing.assert_close(got, ref)
    got1 = dice_ce_loss(x, t.to(label_dtype).unsqueeze(1))  # (B, 1, *spatial)
    torch.testing.assert_close(got1, ref)


def test_bool_labels_and_bool_masks():
    x, t = make_inputs((2, 2, 6, 6, 6), dtype=torch.float32)
    torch.testing.assert_close(dice_ce_loss(x, t.bool()), dice_ce_loss(x, t))
    mask = torch.nn.functional.one_hot(t, 2).movedim(-1, 1)
    torch.testing.assert_close(dice_ce_loss(x, mask.bool(), activation="sigmoid"),
                               dice_ce_loss(x, t, activation="sigmoid"))


def test_layouts_channels_last_and_non_contiguous():
    x, t = make_inputs((2, 5, 6, 7, 8), dtype=torch.float32, seed=5)
    opts = dict(include_background=False, weight=[1, 2, 3, 4, 5])
    ref_x = x.clone().requires_grad_()
    ref = dice_ce_loss(ref_x, t, **opts)
    ref.backward()
    views = {
        "channels_last_3d": x.contiguous(memory_format=torch.channels_last_3d),
        "transposed": x.transpose(2, 4).contiguous().transpose(2, 4),
        "strided": torch.stack([x, x], dim=-1)[..., 1],
    }
    for name, v in views.items():
        v = v.detach().requires_grad_()
        got = dice_ce_loss(v, t, **opts)
        torch.testing.assert_close(got, ref, msg=name)
        got.backward()
        torch.testing.assert_close(v.grad, ref_x.grad, msg=name)
    t_nc = torch.stack([t, t], dim=-1)[..., 0]
    assert not t_nc.is_contiguous()
    torch.testing.assert_close(dice_ce_loss(x, t_nc, **opts), ref)


@needs_ext
def test_stats_do_not_depend_on_the_thread_count():
    # the CPU kernel sums per chunk of tiles and adds the chunks in a fixed order, whichever thread did which
    x, t = make_inputs((2, 4, 200_000), dtype=torch.float32, seed=9)
    before = torch.get_num_threads()
    try:
        stats = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            stats.append(torch.ops.fastseg.dice_ce_stats(x, t, 0, None, False))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(stats[0], s) for s in stats[1:])


@needs_ext
def test_large_gradient_takes_the_streaming_path_correctly():
    # A float32 gradient of 16 MB or more is written with streaming stores (csrc/common/cpu_stream.h); the odd
    # voxel count leaves the class rows unaligned, so their copied ends are covered as well.
    x, t = make_inputs((1, 3, 1_400_001), dtype=torch.float32, seed=7, absent=())
    gs = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(8))
    got = torch.ops.fastseg.dice_ce_stats_backward(gs, x, t, 0, None, False)
    assert got.nbytes >= 16 << 20
    xr = x.double().requires_grad_()
    (ref,) = torch.autograd.grad((_reference.dice_ce_stats(xr, t, 0, None, False) * gs.double()).sum(), xr)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_channels_last_gradient_keeps_layout():
    x, t = make_inputs((2, 3, 4, 5, 6), dtype=torch.float32)
    v = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    dice_ce_loss(v, t).backward()
    assert v.grad.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    x = torch.randn(0, 4, 5, 5, 5, requires_grad=True)
    t = torch.zeros(0, 5, 5, 5, dtype=torch.long)
    loss = dice_ce_loss(x, t, reduction=reduction)
    assert torch.all(loss == 0)
    loss.sum().backward()
    assert x.grad.shape == x.shape


def test_all_voxels_ignored_gives_zero_ce():
    x, t = make_inputs(dtype=torch.float32)
    t = torch.full_like(t, 255)
    loss = dice_ce_loss(x, t, ignore_index=255, lambda_dice=0.0)
    assert loss.item() == 0.0


@needs_ext
def test_gradcheck_float64():
    x, t = make_inputs((2, 3, 3, 4), ignore_index=9, absent=())
    x.requires_grad_()
    for opts in (dict(ignore_index=9, label_smoothing=0.1, squared_pred=True),
                 dict(activation="sigmoid", ignore_index=9, pos_weight=[1.0, 2.0, 3.0]),
                 dict(batch_dice=True, absent_classes="ignore", absent_penalty=1.0, ignore_index=9)):
        assert torch.autograd.gradcheck(lambda v: dice_ce_loss(v, t, **opts), (x,))
    xm, mask = make_inputs((2, 3, 3, 4), "sigmoid", "soft")
    xm.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: dice_ce_loss(v, mask, activation="sigmoid", squared_pred=True), (xm,))


@needs_ext
@pytest.mark.parametrize("activation,target_kind", [(0, "labels"), (1, "labels"), (0, "float"), (1, "uint8")])
def test_opcheck(activation, target_kind):
    x, t = make_inputs((2, 3, 4, 5), "softmax" if activation == 0 else "sigmoid", target_kind, dtype=torch.float32)
    x3 = x.reshape(2, 3, -1).requires_grad_()
    t3 = t.reshape(2, -1) if target_kind == "labels" else t.reshape(2, 3, -1).to(
        torch.uint8 if target_kind == "uint8" else torch.float32)
    torch.library.opcheck(torch.ops.fastseg.dice_ce_stats.default, (x3, t3, activation, None, False))
    torch.library.opcheck(torch.ops.fastseg.dice_ce_stats.default, (x3, t3, activation, None, True))
    gs = torch.randn(2, 3, 5)
    torch.library.opcheck(torch.ops.fastseg.dice_ce_stats_backward.default,
                          (gs, x3.detach(), t3, activation, None, False))


@needs_ext
def test_torch_compile_fullgraph():
    x, t = make_inputs((2, 4, 6, 6, 6), dtype=torch.float32, ignore_index=255)
    opts = dict(include_background=False, absent_classes="ignore", ignore_index=255, weight=[1.0, 2.0, 1.0, 1.0])
    compiled = torch.compile(lambda v, y: dice_ce_loss(v, y, **opts), fullgraph=True, backend="aot_eager")
    assert_value_and_grad(lambda v: compiled(v, t), lambda v: dice_ce_loss(v, t, **opts), x, atol=1e-6, rtol=1e-5)


def test_module_matches_functional_and_keeps_stats():
    x, t = make_inputs(dtype=torch.float32, ignore_index=4)
    m = fastseg.DiceCELoss(include_background=False, weight=[1, 2, 3, 4], ignore_index=4, absent_classes="ignore")
    torch.testing.assert_close(m(x, t), dice_ce_loss(x, t, include_background=False, weight=[1, 2, 3, 4],
                                                     ignore_index=4, absent_classes="ignore"))
    assert m.last_stats is not None and m.last_stats.intersection.shape == (2, 4)
    assert "absent_classes='ignore'" in repr(m)
    assert "weight" in m.state_dict()
    d = fastseg.DiceLoss(batch_dice=True)
    torch.testing.assert_close(d(x, t.clamp(max=3)), dice_loss(x, t.clamp(max=3), batch_dice=True))


def test_absent_penalty_drives_absent_mass_down():
    # Class 3 never occurs. With class-adaptive Dice alone it gets no direct gradient; the penalty pushes it.
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 3, (2, 8, 8, 8), generator=gen)
    init = torch.randn(2, 4, 8, 8, 8, generator=gen)
    init[:, 3] += 2.0

    def absent_mass(penalty):
        x = init.clone().requires_grad_()
        opt = torch.optim.SGD([x], lr=50.0)
        for _ in range(30):
            opt.zero_grad()
            dice_loss(x, t, absent_classes="ignore", absent_penalty=penalty).backward()
            opt.step()
        return torch.softmax(x.detach(), 1)[:, 3].mean().item()

    masses = [absent_mass(w) for w in (0.0, 1.0, 10.0)]
    assert masses[0] > masses[1] > masses[2], masses
    assert masses[2] < 0.5 * masses[0], masses


# --- errors -----------------------------------------------------------------------------------------

def _x(*shape):
    return torch.randn(*shape)


ERROR_CASES = [
    ("logits.*at least one spatial", lambda: dice_ce_loss(_x(2, 3), torch.zeros(2, dtype=torch.long))),
    ("logits.*float16, bfloat16", lambda: dice_ce_loss(torch.zeros(2, 3, 4, dtype=torch.long),
                                                        torch.zeros(2, 4, dtype=torch.long))),
    ("target.*labels of shape \\(2, 4, 4\\)", lambda: dice_ce_loss(_x(2, 3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.long))),
    ("target.*labels of shape", lambda: dice_ce_loss(_x(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))),
    ("target.*integer class labels", lambda: dice_ce_loss(_x(2, 3, 4, 4), torch.zeros(2, 4, 4))),
    ("target.*mask of shape", lambda: dice_ce_loss(_x(2, 3, 4, 4), torch.zeros(2, 2, 4, 4))),
    ("labels in \\[0, 3\\).*got label 3", lambda: dice_ce_loss(_x(2, 3, 4, 4), torch.full((2, 4, 4), 3))),
    ("labels in \\[0, 3\\) or ignore_index=255.*got label -1",
     lambda: dice_ce_loss(_x(2, 3, 4, 4), torch.full((2, 4, 4), -1), ignore_index=255)),
    ("same device.*cpu.*meta", lambda: dice_ce_loss(_x(2, 3, 4), torch.zeros(2, 4, dtype=torch.long, device="meta"))),
    ("activation must be one of 'softmax', 'sigmoid', got 'relu'",
     lambda: dice_ce_loss(_x(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), activation="relu")),
    ("reduction must be one of", lambda: dice_ce_loss(_x(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), reduction="avg")),
    ("absent_classes must be one of 'keep', 'ignore', got 'drop'",
     lambda: dice_ce_loss(_x(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), absent_classes="drop")),
    ("weight must be a scalar or one value per class \\(3\\)",
     lambda: dice_ce_loss(_x(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), weight=[1.0, 2.0])),
    ("weight must be non-negative", lambda: dice_ce_loss(_x(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), weight=[1, -1, 1])),
    ("label_smoothing must be a number in \\[0, 1\\]",
     lambda: dice_ce_loss(_x(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), label_smoothing=1.5)),
    ("label_smoothing must be 0 with activation='sigmoid'",
     lambda: dice_ce_loss(_x(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), activation="sigmoid", label_smoothing=0.1)),
    ("pos_weight must be None with activation='softmax'",
     lambda: dice_ce_loss(_x(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), pos_weight=[1.0, 1.0, 1.0])),
    ("ignore_index must be None with a \\(B, C, \\*spatial\\) mask",
     lambda: dice_ce_loss(_x(2, 3, 4), torch.zeros(2, 3, 4), ignore_index=0)),
    ("at least 2 channels for activation='softmax'",
     lambda: dice_ce_loss(_x(2, 1, 4), torch.zeros(2, 4, dtype=torch.long))),
    ("binary \\(0/1\\) mask", lambda: dice_ce_loss(_x(2, 3, 4), torch.full((2, 3, 4), 2), activation="sigmoid")),
    ("values in \\[0, 1\\]", lambda: dice_ce_loss(_x(2, 3, 4), torch.full((2, 3, 4), 1.5), activation="sigmoid")),
    ("smooth_dr must be a non-negative number",
     lambda: dice_ce_loss(_x(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), smooth_dr=-1.0)),
    ("ignore_index must be an int or None",
     lambda: dice_ce_loss(_x(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), ignore_index=1.5)),
]


@pytest.mark.parametrize("pattern,call", ERROR_CASES, ids=[p for p, _ in ERROR_CASES])
def test_errors_are_clear(pattern, call):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="absent_classes must be one of"):
        fastseg.DiceCELoss(absent_classes="skip")


@needs_ext
def test_op_level_errors():
    with pytest.raises(ValueError, match="logits must be \\(B, C, N\\)"):
        torch.ops.fastseg.dice_ce_stats(_x(2, 3), torch.zeros(2, 3, dtype=torch.long), 0, None, False)
    with pytest.raises(ValueError, match="activation must be 0 \\(softmax\\) or 1 \\(sigmoid\\), got 7"):
        torch.ops.fastseg.dice_ce_stats(_x(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), 7, None, False)
    with pytest.raises(ValueError, match="got label 5"):
        torch.ops.fastseg.dice_ce_stats(_x(2, 3, 4), torch.full((2, 4), 5), 0, None, False)


@needs_ext
def test_double_backward_is_refused_clearly():
    x, t = make_inputs(dtype=torch.float32)
    x.requires_grad_()
    (g,) = torch.autograd.grad(dice_ce_loss(x, t), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
