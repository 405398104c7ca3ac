"""Parity of fastseg.compat with the real MONAI 1.6.1 and nnU-Net v2 losses: values, gradients, output shapes
and dtypes, warnings and errors; and that the standard configurations take the fused kernel path."""
from __future__ import annotations

import inspect
import itertools
import warnings

import pytest
import torch

import fastseg.functional
from fastseg.compat import monai as cm
from fastseg.compat import nnunet as cn

F64_TOL = dict(rtol=1e-10, atol=1e-10)
F32_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ml():
    return pytest.importorskip("monai.losses")


@pytest.fixture(scope="module")
def nn_loss():
    """nnU-Net's loss modules as a namespace: DC_and_CE_loss, SoftDiceLoss, ... ."""
    compound = pytest.importorskip("nnunetv2.training.loss.compound_losses")
    dice = pytest.importorskip("nnunetv2.training.loss.dice")
    ds = pytest.importorskip("nnunetv2.training.loss.deep_supervision")
    helpers = pytest.importorskip("nnunetv2.utilities.helpers")

    class NS:
        DC_and_CE_loss = compound.DC_and_CE_loss
        SoftDiceLoss = dice.SoftDiceLoss
        MemoryEfficientSoftDiceLoss = dice.MemoryEfficientSoftDiceLoss
        DeepSupervisionWrapper = ds.DeepSupervisionWrapper
        softmax_helper_dim1 = helpers.softmax_helper_dim1

    return NS


SHAPES = {2: (5, 6), 3: (4, 5, 3)}


def make_inputs(dims=2, C=3, dtype=torch.float64, target="labels", B=2, seed=0, label_dtype=torch.float32):
    """Logits and a target: 'labels' (B, 1, ...), 'onehot' (B, C, ...) float, 'soft' (B, C, ...) in [0, 1],
    'binary' (B, C, ...) 0/1 independent channels."""
    g = torch.Generator().manual_seed(seed)
    spatial = SHAPES[dims]
    x = torch.randn((B, C, *spatial), generator=g, dtype=torch.float64).mul_(2).to(dtype)
    labels = torch.randint(0, C, (B, 1, *spatial), generator=g)
    if target == "labels":
        return x, labels.to(label_dtype)
    if target == "onehot":
        return x, torch.zeros((B, C, *spatial), dtype=dtype).scatter_(1, labels, 1.0)
    if target == "soft":
        return x, torch.rand((B, C, *spatial), generator=g, dtype=torch.float64).to(dtype)
    if target == "binary":
        return x, (torch.rand((B, C, *spatial), generator=g) > 0.6).to(dtype)
    raise AssertionError(target)


def run(fn, x, y, cotangent_seed=1):
    """(value, d<value, cotangent>/dx, warning messages) of fn(x, y)."""
    x = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(x, y)
    if out.dim() == 0:
        cot = torch.ones_like(out)
    else:
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(cotangent_seed)).to(out)
    (grad,) = torch.autograd.grad((out * cot).sum(), x)
    return out.detach(), grad, [str(w.message) for w in caught]


def assert_parity(ref_fn, our_fn, x, y, tol, what=""):
    ref, gref, wref = run(ref_fn, x, y)
    out, gout, wout = run(our_fn, x, y)
    assert wout == wref, what
    assert out.shape == ref.shape, what
    assert out.dtype == ref.dtype, what
    torch.testing.assert_close(out, ref, **tol, msg=lambda m: f"{what}: value {m}")
    torch.testing.assert_close(gout, gref, **tol, msg=lambda m: f"{what}: gradient {m}")


@pytest.fixture
def count_fused(monkeypatch):
    """Counts the calls of fastseg.functional.dice_ce_stats (the fused kernel path)."""
    calls = []
    original = fastseg.functional.dice_ce_stats

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(fastseg.functional, "dice_ce_stats", counting)
    return calls


# ------------------------------------------------------------------------------------------ signatures


@pytest.mark.parametrize("name", ["DiceLoss", "DiceCELoss"])
def test_monai_signatures_match(ml, name):
    ref = list(inspect.signature(getattr(ml, name).__init__).parameters.values())
    ours = list(inspect.signature(getattr(cm, name).__init__).parameters.values())
    assert [p.name for p in ours] == [p.name for p in ref]
    assert [p.kind for p in ours] == [p.kind for p in ref]
    for p, q in zip(ours, ref):
        assert p.default == q.default, p.name


def test_nnunet_signatures_match(nn_loss):
    for name in ("DC_and_CE_loss", "SoftDiceLoss", "MemoryEfficientSoftDiceLoss", "DeepSupervisionWrapper"):
        ref = list(inspect.signature(getattr(nn_loss, name).__init__).parameters)
        ours = list(inspect.signature(getattr(cn, name).__init__).parameters)
        assert ours == ref, name


# ------------------------------------------------------------------------------------- MONAI DiceLoss


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
@pytest.mark.parametrize("target", ["labels", "onehot"])
def test_monai_dice_grid_float64(ml, dims, act, target):
    x, y = make_inputs(dims, 3, torch.float64, target)
    for bg, batch, squared, jaccard, reduction in itertools.product(
        [True, False], [False, True], [False, True], [False, True], ["mean", "sum", "none"]
    ):
        kw = dict(include_background=bg, to_onehot_y=target == "labels", batch=batch, squared_pred=squared,
                  jaccard=jaccard, reduction=reduction, **{act: True})
        # MONAI takes the norm of its float32 one-hot target with squared_pred: float32 precision there.
        tol = dict(rtol=1e-6, atol=1e-7) if squared and target == "labels" else F64_TOL
        assert_parity(ml.DiceLoss(**kw), cm.DiceLoss(**kw), x, y, tol, str(kw))


@pytest.mark.parametrize("target", ["labels", "onehot", "soft"])
def test_monai_dice_float32(ml, target):
    x, y = make_inputs(3, 4, torch.float32, target)
    for act, bg, batch, reduction in itertools.product(["softmax", "sigmoid"], [True, False], [False, True],
                                                       ["mean", "none"]):
        kw = dict(include_background=bg, to_onehot_y=target == "labels", batch=batch, reduction=reduction,
                  **{act: True})
        assert_parity(ml.DiceLoss(**kw), cm.DiceLoss(**kw), x, y, F32_TOL, str(kw))


def test_monai_dice_half_close(ml):
    x, y = make_inputs(3, 3, torch.float16, "labels")
    ours = cm.DiceLoss(softmax=True, to_onehot_y=True)(x, y)
    ref = ml.DiceLoss(softmax=True, to_onehot_y=True)(x.float(), y)
    assert ours.dtype == ml.DiceLoss(softmax=True, to_onehot_y=True)(x, y).dtype
    torch.testing.assert_close(ours.float(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("smooth", [(0.0, 1e-6), (1.0, 1.0), (1e-5, 0.0)])
def test_monai_dice_smooth(ml, smooth):
    x, y = make_inputs(2, 3, torch.float64, "labels")
    kw = dict(softmax=True, to_onehot_y=True, smooth_nr=smooth[0], smooth_dr=smooth[1])
    assert_parity(ml.DiceLoss(**kw), cm.DiceLoss(**kw), x, y, F64_TOL, str(kw))


@pytest.mark.parametrize("weight", [torch.tensor([0.5, 1.0, 2.0]), [1, 2, 3], 2.0, torch.tensor(0.7)])
@pytest.mark.parametrize("batch", [False, True])
def test_monai_dice_weights(ml, weight, batch):
    x, y = make_inputs(2, 3, torch.float64, "labels")
    for reduction in ("mean", "sum", "none"):
        kw = dict(softmax=True, to_onehot_y=True, weight=weight, batch=batch, reduction=reduction)
        assert_parity(ml.DiceLoss(**kw), cm.DiceLoss(**kw), x, y, F64_TOL, str(kw))
    kw = dict(sigmoid=True, to_onehot_y=True, include_background=False, weight=[3.0, 0.5], batch=batch)
    assert_parity(ml.DiceLoss(**kw), cm.DiceLoss(**kw), x, y, F64_TOL, str(kw))


def test_monai_dice_weight_errors(ml):
    x, y = make_inputs(2, 3, torch.float64, "labels")
    for weight in ([1.0, 2.0], [1.0, -1.0, 2.0]):
        kw = dict(softmax=True, to_onehot_y=True, weight=weight)
        with pytest.raises(ValueError) as ref:
            ml.DiceLoss(**kw)(x, y)
        with pytest.raises(ValueError) as ours:
            cm.DiceLoss(**kw)(x, y)
        assert str(ours.value) == str(ref.value)


@pytest.mark.parametrize("ignore_index", [1, 0, 3, 255, -1])
@pytest.mark.parametrize("label_dtype", [torch.float32, torch.int64])
def test_monai_dice_ignore_index_labels(ml, ignore_index, label_dtype):
    x, y = make_inputs(3, 3, torch.float64, "labels", label_dtype=label_dtype)
    y = y.clone()
    y[0, 0, :2] = ignore_index
    y[1, 0, 1, 1:3] = ignore_index
    for act, bg, batch in itertools.product(["softmax", "sigmoid"], [True, False], [False, True]):
        kw = dict(to_onehot_y=True, include_background=bg, batch=batch, ignore_index=ignore_index, **{act: True})
        assert_parity(ml.DiceLoss(**kw), cm.DiceLoss(**kw), x, y, F64_TOL, str(kw))


@pytest.mark.parametrize("ignore_index", [1, 7])
def test_monai_dice_ignore_index_onehot_fallback(ml, ignore_index):
    x, y = make_inputs(2, 3, torch.float64, "onehot")
    y = y.clone()
    y[0, :, 0] = 0  # voxels without any class: MONAI's sentinel masking
    for bg in (True, False):
        kw = dict(softmax=True, include_background=bg, ignore_index=ignore_index)
        assert_parity(ml.DiceLoss(**kw), cm.DiceLoss(**kw), x, y, F64_TOL, str(kw))


def test_monai_dice_single_channel(ml):
    x, y = make_inputs(2, 1, torch.float64, "binary")
    for kw in (dict(sigmoid=True), dict(sigmoid=True, to_onehot_y=True, include_background=False),
               dict(softmax=True), dict(softmax=True, to_onehot_y=True), dict(sigmoid=True, ignore_index=1),
               dict(sigmoid=True, batch=True, reduction="none", weight=[2.0])):
        assert_parity(ml.DiceLoss(**kw), cm.DiceLoss(**kw), x, y, F64_TOL, str(kw))


def test_monai_dice_fallback_configs(ml):
    x, y = make_inputs(2, 3, torch.float64, "labels")
    probs = torch.softmax(x, 1)
    _, soft = make_inputs(2, 3, torch.float64, "soft")
    cases = [
        (dict(other_act=torch.tanh, to_onehot_y=True), x, y),
        (dict(other_act=torch.tanh, to_onehot_y=True, jaccard=True, include_background=False), x, y),
        (dict(to_onehot_y=True), probs, y),  # no activation: input taken as probabilities
        (dict(softmax=True, soft_label=True), x, soft),
        (dict(sigmoid=True, soft_label=True, jaccard=True, batch=True), x, soft),
        (dict(softmax=True, soft_label=True, squared_pred=True), x, soft),  # fused: squares are exact
        (dict(softmax=True), x, soft),  # soft targets without soft_label: linear, fused
        (dict(softmax=True, soft_label=True), x, make_inputs(2, 3, torch.float64, "onehot")[1]),
        (dict(sigmoid=True), x, 2.0 * soft),  # outside [0, 1]
    ]
    for kw, inp, tgt in cases:
        assert_parity(ml.DiceLoss(**kw), cm.DiceLoss(**kw), inp, tgt, F64_TOL, str(kw))


def test_monai_dice_target_requires_grad(ml):
    x, y = make_inputs(2, 3, torch.float64, "soft")
    ty_ref = y.clone().requires_grad_(True)
    ty_ours = y.clone().requires_grad_(True)
    ref = ml.DiceLoss(softmax=True)(x, ty_ref)
    ours = cm.DiceLoss(softmax=True)(x, ty_ours)
    torch.testing.assert_close(ours, ref, **F64_TOL)
    torch.testing.assert_close(torch.autograd.grad(ours, ty_ours)[0], torch.autograd.grad(ref, ty_ref)[0],
                               **F64_TOL)


def test_monai_dice_target_dtypes(ml):
    x, y = make_inputs(2, 3, torch.float32, "onehot")
    for t in (y.bool(), y.to(torch.uint8), y.long(), y.double()):
        assert_parity(ml.DiceLoss(sigmoid=True), cm.DiceLoss(sigmoid=True), x, t, F32_TOL, str(t.dtype))
    _, lab = make_inputs(2, 3, torch.float32, "labels")
    for t in (lab.long(), lab.to(torch.uint8), lab.int()):
        kw = dict(softmax=True, to_onehot_y=True)
        assert_parity(ml.DiceLoss(**kw), cm.DiceLoss(**kw), x, t, F32_TOL, str(t.dtype))


def test_monai_dice_constructor_errors(ml):
    cases = [dict(reduction="avg"), dict(other_act=3), dict(sigmoid=True, softmax=True),
             dict(softmax=True, other_act=torch.tanh)]
    for kw in cases:
        with pytest.raises(Exception) as ref:
            ml.DiceLoss(**kw)
        with pytest.raises(type(ref.value)) as ours:
            cm.DiceLoss(**kw)
        assert str(ours.value) == str(ref.value), kw


def test_monai_dice_forward_errors(ml):
    x, y = make_inputs(2, 3, torch.float64, "labels")
    _, onehot = make_inputs(2, 3, torch.float64, "onehot")
    cases = [(dict(softmax=True), y), (dict(softmax=True, include_background=False), y),
             (dict(softmax=True, to_onehot_y=True), onehot)]
    for kw, t in cases:
        with pytest.raises(AssertionError) as ref:
            ml.DiceLoss(**kw)(x, t)
        with pytest.raises(AssertionError) as ours:
            cm.DiceLoss(**kw)(x, t)
        assert str(ours.value) == str(ref.value), kw


def test_monai_dice_state_dict_compatible(ml):
    ref = ml.DiceLoss(softmax=True, weight=[1.0, 2.0, 3.0])
    ours = cm.DiceLoss(softmax=True, weight=[1.0, 2.0, 3.0])
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())


# ----------------------------------------------------------------------------------- MONAI DiceCELoss


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
@pytest.mark.parametrize("target", ["labels", "onehot"])
def test_monai_dicece_grid_float64(ml, dims, act, target):
    x, y = make_inputs(dims, 3, torch.float64, target)
    w = torch.tensor([0.5, 1.0, 2.5], dtype=torch.float64)
    for bg, batch, weight, lambdas, eps, reduction in itertools.product(
        [True, False], [False, True], [None, w], [(1.0, 1.0), (0.3, 1.7)], [0.0, 0.1], ["mean", "sum"]
    ):
        kw = dict(include_background=bg, to_onehot_y=target == "labels", batch=batch, weight=weight,
                  lambda_dice=lambdas[0], lambda_ce=lambdas[1], label_smoothing=eps, reduction=reduction,
                  **{act: True})
        assert_parity(ml.DiceCELoss(**kw), cm.DiceCELoss(**kw), x, y, F64_TOL, str(kw))


def test_monai_dicece_float32(ml):
    for target, act in itertools.product(["labels", "onehot", "soft"], ["softmax", "sigmoid"]):
        x, y = make_inputs(3, 4, torch.float32, target)
        for bg, weight in itertools.product([True, False], [None, torch.tensor([1.0, 2.0, 0.5, 1.5])]):
            kw = dict(include_background=bg, to_onehot_y=target == "labels", weight=weight, label_smoothing=0.05,
                      **{act: True})
            assert_parity(ml.DiceCELoss(**kw), cm.DiceCELoss(**kw), x, y, F32_TOL, str(kw))


def test_monai_dicece_options(ml):
    x, y = make_inputs(2, 3, torch.float64, "labels")
    cases = [
        dict(softmax=True, to_onehot_y=True, squared_pred=True),
        dict(softmax=True, to_onehot_y=True, jaccard=True, smooth_nr=0.0, smooth_dr=1e-6),
        dict(softmax=True, to_onehot_y=True, smooth_nr=1.0, smooth_dr=1.0, lambda_ce=0.0),
        dict(softmax=True, to_onehot_y=True, lambda_dice=0.0, label_smoothing=1.0),
        dict(other_act=torch.tanh, to_onehot_y=True),
        dict(other_act=torch.tanh, to_onehot_y=True, include_background=False, weight=torch.ones(3).double()),
        dict(to_onehot_y=True),
        dict(softmax=True, to_onehot_y=True, reduction=" sum "),
    ]
    for kw in cases:
        tol = dict(rtol=1e-6, atol=1e-7) if kw.get("squared_pred") else F64_TOL
        assert_parity(ml.DiceCELoss(**kw), cm.DiceCELoss(**kw), x, y, tol, str(kw))
    _, soft = make_inputs(2, 3, torch.float64, "soft")
    for kw in (dict(softmax=True), dict(sigmoid=True, batch=True, weight=torch.tensor([1.0, 3.0, 2.0]).double())):
        assert_parity(ml.DiceCELoss(**kw), cm.DiceCELoss(**kw), x, soft, F64_TOL, str(kw))


@pytest.mark.parametrize("weight", [None, torch.tensor([3.0], dtype=torch.float64)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_monai_dicece_single_channel_bce(ml, weight, reduction):
    x, y = make_inputs(3, 1, torch.float64, "binary")
    _, soft = make_inputs(3, 1, torch.float64, "soft")
    for kw, t in [(dict(sigmoid=True), y), (dict(sigmoid=True, include_background=False, to_onehot_y=True), y),
                  (dict(sigmoid=True, batch=True), soft), (dict(), y), (dict(softmax=True), y)]:
        kw = dict(kw, weight=weight, reduction=reduction)
        assert_parity(ml.DiceCELoss(**kw), cm.DiceCELoss(**kw), x, t, F64_TOL, str(kw))


def test_monai_dicece_errors(ml):
    ctor_cases = [dict(reduction="none"), dict(reduction="avg"), dict(lambda_dice=-1.0), dict(lambda_ce=-0.5),
                  dict(include_background=False, weight=2.0), dict(include_background=False, weight=torch.tensor(2.0)),
                  dict(weight=[1.0, 2.0, 3.0]), dict(sigmoid=True, softmax=True)]
    for kw in ctor_cases:
        with pytest.raises(Exception) as ref:
            ml.DiceCELoss(**kw)
        with pytest.raises(type(ref.value)) as ours:
            cm.DiceCELoss(**kw)
        # the set of options in MONAI's message has no fixed order: compare its first line
        assert str(ours.value).splitlines()[0] == str(ref.value).splitlines()[0], kw
    x, y = make_inputs(2, 3, torch.float64, "labels")
    for t in (y[:, 0], torch.zeros(2, 2, 5, 6)):
        with pytest.raises(ValueError) as ref:
            ml.DiceCELoss(softmax=True, to_onehot_y=True)(x, t)
        with pytest.raises(ValueError) as ours:
            cm.DiceCELoss(softmax=True, to_onehot_y=True)(x, t)
        assert str(ours.value) == str(ref.value)
    kw = dict(softmax=True, label_smoothing=1.5, to_onehot_y=True)
    with pytest.raises(RuntimeError) as ref:
        ml.DiceCELoss(**kw)(x, y)
    with pytest.raises(RuntimeError) as ours:
        cm.DiceCELoss(**kw)(x, y)
    assert str(ours.value) == str(ref.value)
    kw = dict(softmax=True, label_smoothing=-0.1, to_onehot_y=True)  # torch accepts it: so do we
    assert_parity(ml.DiceCELoss(**kw), cm.DiceCELoss(**kw), x, y, F64_TOL, str(kw))


def test_monai_dicece_state_dict_compatible(ml):
    w = torch.tensor([1.0, 2.0, 3.0])
    ref = ml.DiceCELoss(softmax=True, include_background=False, weight=w)
    ours = cm.DiceCELoss(softmax=True, include_background=False, weight=w)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())


# ------------------------------------------------------------------------------------- nnU-Net


def nn_pair(nn_loss, dice_kwargs, ce_kwargs, dice_class, **kw):
    ref_class = getattr(nn_loss, dice_class) if dice_class else nn_loss.SoftDiceLoss
    ours_class = getattr(cn, dice_class) if dice_class else None
    ref = nn_loss.DC_and_CE_loss(dict(dice_kwargs, ddp=False), dict(ce_kwargs), dice_class=ref_class, **kw)
    # ddp=True must be harmless without a process group (the sums are local then)
    ours = cn.DC_and_CE_loss(dict(dice_kwargs, ddp=True), dict(ce_kwargs), dice_class=ours_class, **kw)
    return ref, ours


@pytest.mark.parametrize("dice_class", ["MemoryEfficientSoftDiceLoss", "SoftDiceLoss", None])
@pytest.mark.parametrize("dims", [2, 3])
def test_nnunet_dc_and_ce_grid(nn_loss, dice_class, dims):
    x, y = make_inputs(dims, 4, torch.float32, "labels")
    y_ign = y.clone()
    y_ign[0, 0, :2] = 4
    for batch_dice, do_bg, smooth, ignore in itertools.product([False, True], [False, True], [1e-5, 1.0],
                                                               [None, 4]):
        dice_kwargs = dict(batch_dice=batch_dice, do_bg=do_bg, smooth=smooth)
        ref, ours = nn_pair(nn_loss, dice_kwargs, {}, dice_class, ignore_label=ignore)
        t = y if ignore is None else y_ign
        assert_parity(ref, ours, x, t, F32_TOL, f"{dice_class} {dice_kwargs} ignore={ignore}")


@pytest.mark.parametrize("dice_class", ["MemoryEfficientSoftDiceLoss", "SoftDiceLoss"])
def test_nnunet_ce_options_and_weights(nn_loss, dice_class):
    x, y = make_inputs(3, 4, torch.float32, "labels")
    y_ign = y.clone()
    y_ign[1, 0, 0] = 255
    w = torch.tensor([0.5, 1.0, 2.0, 1.5])
    cases = [
        ({}, dict(weight_ce=0.5, weight_dice=2.0), y),
        ({}, dict(weight_ce=0, weight_dice=1), y),
        ({}, dict(weight_ce=1, weight_dice=0), y),
        ({}, dict(weight_ce=1, weight_dice=0, ignore_label=255), y_ign),
        (dict(label_smoothing=0.1), {}, y),
        (dict(label_smoothing=0.1), dict(ignore_label=255), y_ign),
        (dict(weight=w), {}, y),
        (dict(weight=w, label_smoothing=0.2), dict(ignore_label=255), y_ign),
        (dict(reduction="sum", label_smoothing=0.1), dict(ignore_label=255), y_ign),
        (dict(ignore_index=2), {}, y),  # CE ignores class 2, the Dice counts it: two passes
        (dict(ignore_index=2, label_smoothing=0.1, weight=w), dict(weight_dice=0), y),
        (dict(reduction="none"), {}, y),  # fallback CE (per-voxel map)
    ]
    for ce_kwargs, kw, t in cases:
        for batch_dice, do_bg in ((True, False), (False, True)):
            ref, ours = nn_pair(nn_loss, dict(batch_dice=batch_dice, do_bg=do_bg, smooth=1e-5), ce_kwargs,
                                dice_class, **kw)
            assert_parity(ref, ours, x, t, F32_TOL, f"{ce_kwargs} {kw} {batch_dice} {do_bg}")


@pytest.mark.parametrize("dice_class", ["MemoryEfficientSoftDiceLoss", "SoftDiceLoss"])
@pytest.mark.parametrize("weight_ce", [1, 0])
def test_nnunet_all_ignored(nn_loss, dice_class, weight_ce):
    x, _ = make_inputs(2, 3, torch.float32, "labels")
    y = torch.full((2, 1, *SHAPES[2]), 3.0)
    for batch_dice in (False, True):
        ref, ours = nn_pair(nn_loss, dict(batch_dice=batch_dice, do_bg=False, smooth=1e-5),
                            dict(label_smoothing=0.1), dice_class, ignore_label=3, weight_ce=weight_ce)
        assert_parity(ref, ours, x, y, F32_TOL, f"batch_dice={batch_dice}")


def test_nnunet_float64_and_targets(nn_loss):
    x, y = make_inputs(3, 3, torch.float64, "labels")
    tol = dict(rtol=2e-6, atol=1e-7)  # nnU-Net sums the Dice terms in float32
    for t in (y, y.long(), y.to(torch.uint8)):
        for dice_class in ("MemoryEfficientSoftDiceLoss", "SoftDiceLoss"):
            ref, ours = nn_pair(nn_loss, dict(batch_dice=True, do_bg=False, smooth=1e-5), {}, dice_class)
            assert_parity(ref, ours, x, t, tol, f"{dice_class} {t.dtype}")


def test_nnunet_clip_tp(nn_loss):
    x, y = make_inputs(2, 4, torch.float32, "labels")
    y = y.clamp(max=2)  # class 3 absent: its tp is tiny and clipped
    for batch_dice in (False, True):
        ref, ours = nn_pair(nn_loss, dict(batch_dice=batch_dice, do_bg=True, smooth=0.0, clip_tp=0.5), {},
                            "SoftDiceLoss")
        assert_parity(ref, ours, x, y, F32_TOL, f"batch_dice={batch_dice}")


@pytest.mark.parametrize("name", ["MemoryEfficientSoftDiceLoss", "SoftDiceLoss"])
def test_nnunet_dice_classes_standalone(nn_loss, name):
    x, y = make_inputs(3, 3, torch.float32, "labels")
    _, onehot = make_inputs(3, 3, torch.float32, "onehot")
    _, regions = make_inputs(3, 3, torch.float32, "binary")
    mask = torch.rand(y.shape, generator=torch.Generator().manual_seed(3)) > 0.3
    for batch_dice, do_bg in itertools.product([False, True], [False, True]):
        kw = dict(batch_dice=batch_dice, do_bg=do_bg, smooth=1e-5, ddp=False)
        for nonlin, t, m in [("softmax", y, None), ("softmax", y, mask), ("softmax", y[:, 0], None),
                             ("softmax", onehot, None), ("sigmoid", regions, None), ("sigmoid", regions, mask),
                             ("softmax", y, mask.float())]:
            ref_nl = nn_loss.softmax_helper_dim1 if nonlin == "softmax" else torch.sigmoid
            ours_nl = cn.softmax_helper_dim1 if nonlin == "softmax" else torch.sigmoid
            ref = getattr(nn_loss, name)(apply_nonlin=ref_nl, **kw)
            ours = getattr(cn, name)(apply_nonlin=ours_nl, **kw)
            assert_parity(lambda a, b: ref(a, b, loss_mask=m), lambda a, b: ours(a, b, loss_mask=m), x, t,
                          F32_TOL, f"{kw} {nonlin} {tuple(t.shape)} mask={m is not None}")
        # nnU-Net's own helper is recognised as softmax too
        ours = getattr(cn, name)(apply_nonlin=nn_loss.softmax_helper_dim1, **kw)
        ref = getattr(nn_loss, name)(apply_nonlin=nn_loss.softmax_helper_dim1, **kw)
        assert_parity(ref, ours, x, y, F32_TOL, str(kw))


def test_nnunet_dice_class_by_name(nn_loss):
    ours = cn.DC_and_CE_loss({"smooth": 1e-5}, {}, dice_class=nn_loss.MemoryEfficientSoftDiceLoss)
    assert type(ours.dc) is cn.MemoryEfficientSoftDiceLoss
    assert type(cn.DC_and_CE_loss({}, {}, dice_class="SoftDiceLoss").dc) is cn.SoftDiceLoss
    assert type(cn.DC_and_CE_loss({}, {}).dc) is cn.SoftDiceLoss
    with pytest.raises(ValueError, match="dice_class must be None, SoftDiceLoss or MemoryEfficientSoftDiceLoss"):
        cn.DC_and_CE_loss({}, {}, dice_class=torch.nn.MSELoss)
    with pytest.raises(TypeError, match="clip_tp"):
        cn.DC_and_CE_loss({"clip_tp": 0.1}, {}, dice_class=nn_loss.MemoryEfficientSoftDiceLoss)
    with pytest.raises(TypeError):
        cn.DC_and_CE_loss({}, {"bogus": 1})
    ce_kwargs = {}
    cn.DC_and_CE_loss({}, ce_kwargs, ignore_label=3)
    assert ce_kwargs == {}  # copied, not updated in place
    with pytest.raises(AssertionError, match="ignore label is not implemented"):
        cn.DC_and_CE_loss({}, {}, ignore_label=3)(torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
    ref = nn_loss.DC_and_CE_loss({}, {}, dice_class=nn_loss.MemoryEfficientSoftDiceLoss)
    assert cn.DC_and_CE_loss({}, {}, dice_class="MemoryEfficientSoftDiceLoss").state_dict().keys() == \
        ref.state_dict().keys()


def test_nnunet_deep_supervision(nn_loss):
    x0, y0 = make_inputs(3, 3, torch.float32, "labels", seed=0)
    outputs = [x0, x0[:, :, ::2, ::2, ::2].contiguous(), x0[:, :, ::4, ::4, ::4].contiguous()]
    targets = [y0, y0[:, :, ::2, ::2, ::2], y0[:, :, ::4, ::4, ::4]]
    weights = [1.0, 0.5, 0.0]
    weights = [w / sum(weights) for w in weights]
    dice_kwargs = dict(batch_dice=True, smooth=1e-5, do_bg=False)
    ref_loss, ours_loss = nn_pair(nn_loss, dice_kwargs, {}, "MemoryEfficientSoftDiceLoss", ignore_label=None)
    ref = nn_loss.DeepSupervisionWrapper(ref_loss, weights)
    ours = cn.DeepSupervisionWrapper(ours_loss, weights)
    ref_in = [o.detach().clone().requires_grad_(True) for o in outputs]
    our_in = [o.detach().clone().requires_grad_(True) for o in outputs]
    r, o = ref(ref_in, targets), ours(our_in, targets)
    torch.testing.assert_close(o, r, **F32_TOL)
    gr = torch.autograd.grad(r, ref_in[:2])
    go = torch.autograd.grad(o, our_in[:2])
    for a, b in zip(go, gr):
        torch.testing.assert_close(a, b, **F32_TOL)

    calls = []
    counting = cn.DeepSupervisionWrapper(lambda a, b: calls.append(a.shape) or a.sum(), weights)
    counting(outputs, targets)
    assert len(calls) == 2  # the zero-weight level is not evaluated
    unweighted = cn.DeepSupervisionWrapper(lambda a, b: a.sum())
    torch.testing.assert_close(unweighted(outputs, targets), sum(a.sum() for a in outputs))
    with pytest.raises(AssertionError, match="At least one weight factor"):
        cn.DeepSupervisionWrapper(ours_loss, [0, 0])
    with pytest.raises(AssertionError, match="all args must be either tuple or list"):
        ours(outputs[0], targets[0])


# ------------------------------------------------------------------------------------- fused path used


def test_fused_path_is_used(count_fused, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("fallback used for a standard configuration")

    for cls in (cm.DiceLoss, cn.SoftDiceLoss, cn.MemoryEfficientSoftDiceLoss):
        monkeypatch.setattr(cls, "_reference", forbidden)
    monkeypatch.setattr(cm.DiceCELoss, "ce", forbidden)
    monkeypatch.setattr(cm.DiceCELoss, "bce", forbidden)
    monkeypatch.setattr(cn.DC_and_CE_loss, "_reference", forbidden)

    x, y = make_inputs(3, 4, torch.float32, "labels")
    _, onehot = make_inputs(3, 4, torch.float32, "onehot")
    x1, y1 = make_inputs(3, 1, torch.float32, "binary")
    y_ign = y.clone()
    y_ign[0, 0, 0] = 4
    cases = [
        (cm.DiceLoss(softmax=True, to_onehot_y=True), x, y, 1),
        (cm.DiceLoss(softmax=True, to_onehot_y=True, include_background=False, batch=True, squared_pred=True,
                     jaccard=True, weight=[1.0, 2.0, 3.0], reduction="none"), x, y, 1),
        (cm.DiceLoss(sigmoid=True, to_onehot_y=True, ignore_index=4), x, y_ign, 1),
        (cm.DiceLoss(sigmoid=True), x, onehot, 1),
        (cm.DiceLoss(softmax=True, to_onehot_y=True), x.half(), y, 1),
        (cm.DiceCELoss(softmax=True, to_onehot_y=True), x, y, 1),
        (cm.DiceCELoss(softmax=True, to_onehot_y=True, include_background=False, batch=True,
                       weight=torch.tensor([1.0, 2.0, 3.0, 4.0]), label_smoothing=0.1), x, y, 1),
        (cm.DiceCELoss(softmax=True), x, onehot, 1),
        (cm.DiceCELoss(sigmoid=True, to_onehot_y=True), x, y, 2),  # sigmoid Dice + softmax CE
        (cm.DiceCELoss(sigmoid=True, weight=torch.tensor([2.0])), x1, y1, 1),
        (cn.DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": True}, {}, ignore_label=4,
                           dice_class="MemoryEfficientSoftDiceLoss"), x, y_ign, 1),
        (cn.DC_and_CE_loss({"batch_dice": False, "smooth": 1.0}, {"label_smoothing": 0.1}), x, y, 1),
        (cn.DC_and_CE_loss({}, {"ignore_index": 1}), x, y, 2),
        (cn.MemoryEfficientSoftDiceLoss(cn.softmax_helper_dim1), x, y, 1),
        (lambda a, b: cn.SoftDiceLoss(cn.softmax_helper_dim1)(a, b, loss_mask=b != 2), x, y, 1),
    ]
    for fn, inp, tgt, n in cases:
        count_fused.clear()
        out = fn(inp.detach().clone().requires_grad_(True), tgt)
        assert torch.isfinite(out).all()
        assert len(count_fused) == n, fn


def test_fallback_configs_do_not_call_kernel(count_fused):
    x, y = make_inputs(2, 3, torch.float32, "labels")
    cm.DiceLoss(other_act=torch.tanh, to_onehot_y=True)(x, y)
    cm.DiceLoss(to_onehot_y=True)(torch.softmax(x, 1), y)
    assert count_fused == []
    # the Dice falls back but the CE still takes one pass
    cm.DiceCELoss(other_act=torch.tanh, to_onehot_y=True)(x, y)
    assert len(count_fused) == 1


# ------------------------------------------------------------------------------------- DDP batch Dice


def _ddp_worker(rank, results_dir):
    from nnunetv2.training.loss import dice as nn_dice
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss

    x, y = make_inputs(3, 3, torch.float32, "labels", seed=10 + rank)
    y[0, 0, 0] = 3
    out = {}
    for name in ("MemoryEfficientSoftDiceLoss", "SoftDiceLoss"):
        kw = {"batch_dice": True, "do_bg": False, "smooth": 1e-5}
        losses = {
            "ref": DC_and_CE_loss(dict(kw, ddp=True), {}, ignore_label=3, dice_class=getattr(nn_dice, name)),
            "ours": cn.DC_and_CE_loss(dict(kw, ddp=True), {}, ignore_label=3, dice_class=name),
            "local": cn.DC_and_CE_loss(dict(kw, ddp=False), {}, ignore_label=3, dice_class=name),
        }
        for tag, fn in losses.items():
            xx = x.clone().requires_grad_(True)
            value = fn(xx, y)
            (grad,) = torch.autograd.grad(value, xx)
            out[f"{name}/{tag}"] = (value.detach(), grad)
    torch.save(out, f"{results_dir}/{rank}.pt")


def test_nnunet_ddp_batch_dice_matches(nn_loss, tmp_path):
    """Under torch.distributed (2 gloo ranks) the batch Dice sums over ranks with nnU-Net's values and
    per-rank gradients."""
    import torch.distributed as dist

    from gloo import run_on_ranks

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    run_on_ranks(_ddp_worker, 2, tmp_path, str(tmp_path))
    for rank in range(2):
        res = torch.load(tmp_path / f"{rank}.pt")
        for name in ("MemoryEfficientSoftDiceLoss", "SoftDiceLoss"):
            ref, ours, local = (res[f"{name}/{tag}"] for tag in ("ref", "ours", "local"))
            torch.testing.assert_close(ours[0], ref[0], **F32_TOL)
            torch.testing.assert_close(ours[1], ref[1], **F32_TOL)
            assert not torch.allclose(local[0], ref[0])  # the sums really were synchronised


def test_monai_metatensor_inputs(ml, count_fused):
    """MONAI pipelines hand MetaTensors to the loss: the fused path takes them too."""
    data = pytest.importorskip("monai.data")
    x, y = make_inputs(3, 3, torch.float32, "labels")
    for cls in ("DiceLoss", "DiceCELoss"):
        kw = dict(softmax=True, to_onehot_y=True, include_background=False)
        count_fused.clear()
        assert_parity(getattr(ml, cls)(**kw), getattr(cm, cls)(**kw), data.MetaTensor(x), data.MetaTensor(y),
                      F32_TOL, cls)
        assert len(count_fused) == 1
