import math

import pytest
import torch
import torch.nn.functional as F

import fastseg
from fastseg.models import UNet, plan_topology


def _tiny(ndim=3, **kw):
    kw.setdefault("features", (4, 8, 16, 16))
    return UNet(1, 3, spatial_dims=ndim, **kw)


@pytest.mark.parametrize("ndim, strides, kernels, shape", [
    (3, None, None, (16, 16, 16)),
    (3, (1, (2, 2, 1), 2, (2, 2, 1)), ((3, 3, 1), (3, 3, 1), 3, 3), (16, 24, 8)),
    (2, None, None, (16, 24)),
    (2, (1, (2, 1), 2, 2), ((3, 1), 3, 5, 3), (32, 8)),
])
def test_shapes_train_and_eval(ndim, strides, kernels, shape):
    net = _tiny(ndim, strides=strides, kernel_sizes=kernels)
    x = torch.randn(2, 1, *shape)
    outs = net(x)
    scales = net.deep_supervision_scales()
    assert isinstance(outs, list) and len(outs) == len(scales) == 2  # 4 stages: full and the next one
    assert scales[0] == (1,) * ndim
    for out, scale in zip(outs, scales):
        assert out.shape == (2, 3) + tuple(s // f for s, f in zip(shape, scale))
    # the scales are the cumulative strides, computed here from the configured strides
    st = [(1,) * ndim] + [(2,) * ndim] * 3 if strides is None else [
        (s,) * ndim if isinstance(s, int) else s for s in strides]
    assert scales[1] == st[1]
    net.eval()
    with torch.no_grad():
        y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3) + shape
    # instance norm has no running statistics and dropout is off: train and eval agree
    torch.testing.assert_close(y, outs[0].detach())


def test_deep_supervision_levels_default_depth():
    # 5 stages (the default depth): outputs at full, /2, /4 - the /8 decoder level is left out, as the
    # level nnU-Net weights 0 in its loss
    net = UNet(1, 2, features=(2, 2, 2, 2, 2))
    assert net.deep_supervision_scales() == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    outs = net(torch.randn(1, 1, 32, 16, 16))
    assert [tuple(o.shape[2:]) for o in outs] == [(32, 16, 16), (16, 8, 8), (8, 4, 4)]
    assert net.patch_divisor == (16, 16, 16)


def test_no_deep_supervision_and_shallow_nets():
    net = _tiny(deep_supervision=False)
    assert net.deep_supervision_scales() == [(1, 1, 1)]
    assert isinstance(net(torch.randn(1, 1, 16, 16, 16)), torch.Tensor)
    assert len(net.heads) == 1
    one = UNet(2, 3, spatial_dims=2, features=(4,))
    outs = one(torch.randn(1, 2, 5, 7))
    assert len(outs) == 1 and outs[0].shape == (1, 3, 5, 7)
    two = UNet(1, 3, spatial_dims=2, features=(4, 8))
    assert [o.shape for o in two(torch.randn(1, 1, 6, 4))] == [(1, 3, 6, 4)]


def test_divisibility_error():
    net = _tiny(strides=(1, 2, (2, 2, 1), (2, 2, 1)))
    assert net.patch_divisor == (8, 8, 2)
    with pytest.raises(ValueError, match=r"input spatial size \(12, 16, 6\) must be divisible by patch_divisor "
                                         r"\(8, 8, 2\).*e\.g\. to \(16, 16, 6\)"):
        net(torch.randn(1, 1, 12, 16, 6))
    with pytest.raises(ValueError, match="in_channels=1 channels, got 2"):
        net(torch.randn(1, 2, 8, 8, 2))
    with pytest.raises(ValueError, match="3 spatial dims"):
        net(torch.randn(1, 1, 8, 8))
    assert net.padded_patch_size((12, 16, 5)) == (16, 16, 6)


def test_constructor_errors():
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        UNet(1, 2, spatial_dims=4)
    with pytest.raises(ValueError, match=r"strides\[0\] must be 1 on every axis"):
        UNet(1, 2, features=(4, 8), strides=(2, 2))
    with pytest.raises(ValueError, match="strides must be a sequence with one entry per stage"):
        UNet(1, 2, features=(4, 8), strides=(1, 2, 2))
    with pytest.raises(ValueError, match=r"kernel_sizes\[1\] must be an int or a sequence of 3 positive ints"):
        UNet(1, 2, features=(4, 8), kernel_sizes=(3, (3, 3)))
    with pytest.raises(ValueError, match="kernel_sizes must be odd"):
        UNet(1, 2, features=(4, 8), kernel_sizes=(3, (3, 3, 2)))
    with pytest.raises(ValueError, match="norm must be one of 'instance', 'batch', got 'group'"):
        UNet(1, 2, norm="group")
    with pytest.raises(ValueError, match="dropout must be a float in"):
        UNet(1, 2, dropout=1.0)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        UNet(1, 0)
    with pytest.raises(ValueError, match="features must be a non-empty sequence"):
        UNet(1, 2, features=())
    with pytest.raises(TypeError, match="strides is planned"):
        UNet.from_patch_size(1, 2, (16, 16, 16), (1, 1, 1), strides=None)


def test_layers_norm_and_init():
    net = UNet(1, 2, features=(32, 64, 128), kernel_sizes=((3, 3, 1), 3, 3), dropout=0.2, negative_slope=0.02)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert len(norms) == 2 * 3 + 2 * 2  # conv_per_stage per encoder and decoder stage
    assert all(m.affine and m.eps == 1e-5 and not m.track_running_stats for m in norms)
    assert sum(isinstance(m, torch.nn.Dropout3d) for m in net.modules()) == len(norms)
    conv = net.encoder[2][1][0]  # 128 -> 128 channels, 3x3x3: fan_in = 128 * 27
    assert tuple(conv.weight.shape) == (128, 128, 3, 3, 3)
    expected_std = math.sqrt(2.0 / (1 + 0.02**2)) / math.sqrt(128 * 27)
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    assert net.encoder[0][0][0].kernel_size == (3, 3, 1) and net.encoder[0][0][0].padding == (1, 1, 0)
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    assert all(torch.count_nonzero(m.bias) == 0 for m in convs)
    bn = UNet(1, 2, spatial_dims=2, features=(4, 8), norm="batch")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules())
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in bn.modules())
    assert bn(torch.randn(2, 1, 8, 8))[0].shape == (2, 2, 8, 8)


def _reference_forward(net: UNet, x: torch.Tensor) -> torch.Tensor:
    """The U-Net written out with torch.nn.functional calls on the model's parameters (eval, no dropout)."""
    conv = F.conv3d if net.spatial_dims == 3 else F.conv2d
    up = F.conv_transpose3d if net.spatial_dims == 3 else F.conv_transpose2d

    def block(layer, h, stride, kernel):
        c, norm = layer[0], layer[1]
        h = conv(h, c.weight, c.bias, stride=stride, padding=[k // 2 for k in kernel])
        h = F.instance_norm(h, weight=norm.weight, bias=norm.bias, eps=1e-5)
        return F.leaky_relu(h, net.negative_slope)

    skips = []
    for s, stage in enumerate(net.encoder):
        for i, layer in enumerate(stage):
            x = block(layer, x, net.strides[s] if i == 0 else 1, net.kernel_sizes[s])
        skips.append(x)
    for s in reversed(range(len(net.features) - 1)):
        t = net.upsample[s]
        x = up(x, t.weight, t.bias, stride=net.strides[s + 1])
        x = torch.cat([x, skips[s]], 1)
        for layer in net.decoder[s]:
            x = block(layer, x, 1, net.kernel_sizes[s])
    head = net.heads[0]
    return conv(x, head.weight, head.bias)


@pytest.mark.parametrize("ndim", [2, 3])
def test_forward_matches_functional_reference(ndim):
    torch.manual_seed(0)
    strides = (1, (2,) * (ndim - 1) + (1,), 2)
    kernels = ((3,) * (ndim - 1) + (1,), 3, 3)
    net = UNet(2, 3, spatial_dims=ndim, features=(4, 6, 8), strides=strides, kernel_sizes=kernels).eval()
    # non-zero biases and norm affines so every parameter matters
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 1:
                p.normal_()
    x = torch.randn(2, 2, *([8] * (ndim - 1) + [4]))
    with torch.no_grad():
        torch.testing.assert_close(net(x), _reference_forward(net, x), rtol=1e-5, atol=1e-5)


def test_from_patch_size_anisotropic():
    net = UNet.from_patch_size(1, 4, (64, 64, 32), (1.0, 1.0, 2.5), base_features=4, max_features=20)
    # in-plane spacing 1 mm vs 2.5 mm slices: the first downsampling keeps z, the first stage's kernel is flat
    assert net.strides[0] == (1, 1, 1)
    assert net.strides[1] == (2, 2, 1)
    assert net.kernel_sizes[0] == (3, 3, 1)
    assert net.kernel_sizes[1] == (3, 3, 3)
    assert net.features == (4, 8, 16, 20, 20)[:len(net.strides)]
    div = net.patch_divisor
    assert all(p % d == 0 for p, d in zip((64, 64, 32), div))
    assert all(p // d >= 4 for p, d in zip((64, 64, 32), div))  # bottleneck at least min_feature_map
    assert div[2] < div[0]
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 64, 64, 32)).shape == (1, 4, 64, 64, 32)
    flat = UNet.from_patch_size(1, 2, (32, 48), (0.5, 0.5))
    assert flat.spatial_dims == 2 and flat.patch_divisor == (8, 8)


@pytest.mark.parametrize("patch, spacing", [
    ((96, 160, 64), (1.0, 1.0, 2.5)),
    ((128, 128, 128), (1.0, 1.0, 1.0)),
    ((40, 192, 160), (3.0, 0.8, 0.8)),
    ((18, 64, 64), (5.0, 0.7, 0.7)),
    ((24, 30, 56), (1.0, 1.9, 4.1)),
    ((12, 12, 12), (1.0, 1.0, 1.0)),
    ((512, 512), (0.7, 0.7)),
    ((20, 9), (1.0, 1.0)),
])
def test_plan_topology_matches_nnunet(patch, spacing):
    topo = pytest.importorskip("nnunetv2.experiment_planning.experiment_planners.network_topology")
    _, pools, convs, _, _ = topo.get_pool_and_conv_props(spacing, patch, 4, 999999)
    strides, kernels = plan_topology(patch, spacing, min_feature_map=4)
    assert strides == [tuple(int(v) for v in p) for p in pools]
    assert kernels == [tuple(int(v) for v in k) for k in convs]


def test_plan_topology_errors():
    with pytest.raises(ValueError, match="spacing must have one value per axis"):
        plan_topology((16, 16, 16), (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing must be positive"):
        plan_topology((16, 16), (1.0, 0.0))
    with pytest.raises(ValueError, match="patch_size must be an int or a sequence of 2 positive ints"):
        plan_topology((16, 0), (1.0, 1.0))


def test_training_steps_reduce_dice_ce_with_deep_supervision():
    torch.manual_seed(0)
    net = UNet(1, 3, features=(4, 8, 8, 8), strides=(1, 2, 2, (2, 2, 1)))
    assert len(net.deep_supervision_scales()) == 2
    x = torch.randn(2, 1, 16, 16, 8)
    # a learnable target: the class is given by thresholds on the input intensity
    target = (x[:, 0] > -0.5).long() + (x[:, 0] > 0.7).long()
    loss_fn = fastseg.DeepSupervisionLoss(fastseg.DiceCELoss())
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for step in range(8):
        opt.zero_grad()
        outs = net(x)
        loss = loss_fn(outs, target)
        loss.backward()
        if step == 0:
            no_grad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
            assert not no_grad
            assert net.heads[1].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("patch, spacing", [((88, 64, 24), (2.0, 2.0, 3.0)), ((40, 48, 72), (2.0, 2.0, 3.0)),
                                            ((96, 64, 24), (2.0, 2.0, 3.0)), ((30, 50), (1.0, 1.0))])
def test_trained_patch_size_is_the_planned_networks_fixed_point(patch, spacing):
    from fastseg.models import trained_patch_size

    trained = trained_patch_size(patch, spacing, base_features=8, max_features=64)
    net = UNet.from_patch_size(1, 3, trained, spacing, base_features=8, max_features=64)
    assert net.padded_patch_size(trained) == trained
    assert all(t >= p for t, p in zip(trained, patch))
    assert all(t % d == 0 for t, d in zip(trained, net.patch_divisor))
    if patch == (88, 64, 24):  # the case the comparison's plan met: 88 is not a multiple of the divisor
        assert trained == (96, 64, 24)
