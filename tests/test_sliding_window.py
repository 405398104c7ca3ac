import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastseg.inference import gaussian_importance_map, sliding_window_inference, window_starts
from fastseg.models import UNet


def _conv_predictor(in_ch=1, out_ch=2, ndim=2, kernel=3, seed=0, nonlinear=True):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_ch, in_ch, *([kernel] * ndim), generator=gen, dtype=torch.float64)
    bias = torch.randn(out_ch, generator=gen, dtype=torch.float64)
    conv = F.conv2d if ndim == 2 else F.conv3d

    def predict(x):
        y = conv(x.double(), weight, bias, padding=kernel // 2)
        return torch.tanh(y) if nonlinear else y

    predict.weight, predict.bias = weight, bias
    return predict


def _tiny_unet(ndim=3):
    torch.manual_seed(0)
    return UNet(1, 3, spatial_dims=ndim, features=(4, 8, 8), strides=(1, 2, (2,) * (ndim - 1) + (1,))).eval()


def _brute_starts(size, roi, overlap):
    """nnU-Net's grid, written independently: as few windows as possible with steps <= roi * (1 - overlap)
    (at least 1), spread evenly from 0 to size - roi, positions rounded half up."""
    if size <= roi:
        return [0]
    span = size - roi
    target = Fraction(max(roi * (1 - overlap), 1.0))
    n = 2
    while Fraction(span, n - 1) > target:
        n += 1
    return [math.floor(Fraction(i * span, n - 1) + Fraction(1, 2)) for i in range(n)]


def _brute_gaussian(roi, sigma_scale):
    w = np.ones(())
    for n in roi:
        c = (n - 1) / 2
        g = np.array([math.exp(-((i - c) ** 2) / (2 * (sigma_scale * n) ** 2)) for i in range(n)])
        w = np.multiply.outer(w, g)
    return w / w.max()


def _brute_sliding_window(x, roi, predictor, overlap, sigma_scale, gaussian, cval):
    """Window by window, in numpy float64, one predictor call per window."""
    x = x.double().numpy()
    b, _, h, w = x.shape
    ph, pw = max(h, roi[0]), max(w, roi[1])
    oh, ow = (ph - h) // 2, (pw - w) // 2
    padded = np.full((b, x.shape[1], ph, pw), cval, dtype=np.float64)
    padded[:, :, oh:oh + h, ow:ow + w] = x
    weight = _brute_gaussian(roi, sigma_scale) if gaussian else np.ones(roi)
    acc, wsum = None, np.zeros((ph, pw))
    for i in _brute_starts(ph, roi[0], overlap):
        for j in _brute_starts(pw, roi[1], overlap):
            wsum[i:i + roi[0], j:j + roi[1]] += weight
            for k in range(b):
                win = torch.from_numpy(padded[k:k + 1, :, i:i + roi[0], j:j + roi[1]].copy())
                y = predictor(win).double().numpy()[0]
                if acc is None:
                    acc = np.zeros((b, y.shape[0], ph, pw))
                acc[k, :, i:i + roi[0], j:j + roi[1]] += y * weight
    return (acc / wsum)[:, :, oh:oh + h, ow:ow + w]


@pytest.mark.parametrize("size, roi, overlap", [
    (10, 4, 0.5), (13, 4, 0.5), (13, 6, 0.25), (17, 5, 0.0), (6, 6, 0.5), (3, 6, 0.5), (9, 2, 0.9), (40, 7, 0.6),
])
def test_window_starts(size, roi, overlap):
    starts = window_starts(size, roi, overlap)
    assert starts == _brute_starts(size, roi, overlap)
    assert starts[0] == 0 and starts[-1] == max(size - roi, 0)
    assert all(b > a for a, b in zip(starts, starts[1:]))
    step = max(roi * (1 - overlap), 1)
    assert all(b - a <= math.ceil(step) for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("roi", [(7,), (5, 9), (3, 4, 11), (64, 64, 64)])
def test_gaussian_importance_map(roi):
    g = gaussian_importance_map(roi)
    assert g.shape == roi and g.dtype == torch.float32
    ref = _brute_gaussian(roi, 0.125)
    ref = np.maximum(ref, ref[ref > 0].min())
    np.testing.assert_allclose(g.numpy(), ref, rtol=1e-6, atol=0)
    assert g.max().item() == pytest.approx(1.0, rel=1e-6)
    for axis in range(len(roi)):
        assert torch.equal(g, g.flip(axis))


def test_gaussian_odd_size_matches_filtered_delta():
    ndimage = pytest.importorskip("scipy.ndimage")
    delta = np.zeros((9, 15))
    delta[4, 7] = 1
    ref = ndimage.gaussian_filter(delta, sigma=(9 * 0.125, 15 * 0.125), mode="constant", truncate=20.0)
    ref /= ref.max()
    np.testing.assert_allclose(gaussian_importance_map((9, 15)).double().numpy(), ref, rtol=1e-5, atol=1e-12)


def test_gaussian_has_no_zeros_and_errors():
    g = gaussian_importance_map((32, 32, 32), sigma_scale=0.01, dtype=torch.float64)
    assert (g > 0).all() and g.dtype == torch.float64
    g = gaussian_importance_map((4, 6), sigma_scale=(0.5, 0.1))
    np.testing.assert_allclose(g.numpy(), np.multiply.outer(_brute_gaussian((4,), 0.5), _brute_gaussian((6,), 0.1)),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="sigma_scale must be a positive float"):
        gaussian_importance_map((4, 4), sigma_scale=0)
    with pytest.raises(ValueError, match="roi_size must be a positive int"):
        gaussian_importance_map((4, 0))
    with pytest.raises(ValueError, match="dtype must be a floating"):
        gaussian_importance_map((4, 4), dtype=torch.int32)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_one_window_equals_whole_volume_inference(mode):
    net = _tiny_unet()
    x = torch.randn(2, 1, 16, 12, 8)
    with torch.no_grad():
        whole = net(x)
        # the same batch of windows as the whole volume: float32 convolutions see the same batch size
        out = sliding_window_inference(x, (16, 12, 8), 2, net, mode=mode)
        out64 = sliding_window_inference(x.double(), (16, 12, 8), 1, net.double(), mode=mode)
        net.float()
    assert out.shape == whole.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(out64, whole.double(), rtol=1e-5, atol=1e-5)

    # roi larger than the volume: one window on the centred, cval-padded volume, cropped back
    small = torch.randn(1, 1, 13, 12, 5)
    padded = F.pad(small, (1, 2, 0, 0, 1, 2), value=-1.5)  # (roi - size) // 2 before, the rest after
    with torch.no_grad():
        ref = net(padded)[:, :, 1:14, :, 1:6]
        out = sliding_window_inference(small, (16, 12, 8), 4, net, mode=mode, cval=-1.5)
    assert out.shape == (1, 3, 13, 12, 5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape, roi, overlap, mode, cval", [
    ((13, 10), (6, 4), 0.5, "gaussian", 0.0),
    ((13, 3), (6, 4), 0.5, "gaussian", 0.5),
    ((11, 9), (5, 5), 0.25, "constant", 0.0),
    ((16, 7), (4, 7), 0.75, "gaussian", 0.0),
])
def test_matches_brute_force_blending(shape, roi, overlap, mode, cval):
    predictor = _conv_predictor(in_ch=2, out_ch=3)
    x = torch.randn(2, 2, *shape, generator=torch.Generator().manual_seed(1))
    out = sliding_window_inference(x, roi, 3, predictor, overlap=overlap, mode=mode, cval=cval)
    ref = _brute_sliding_window(x, roi, predictor, overlap, 0.125, mode == "gaussian", cval)
    assert out.dtype == torch.float64  # a float64 predictor is blended in float64
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-10)
    out32 = sliding_window_inference(x, roi, 2, lambda t: predictor(t).float(), overlap=overlap, mode=mode,
                                     cval=cval)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_matches_monai_where_the_grids_coincide(mode):
    inferers = pytest.importorskip("monai.inferers")
    net = _tiny_unet()
    # MONAI steps by int(roi * (1 - overlap)) and clamps the last window; with these sizes that is the same
    # grid (starts 0, 8 / 0, 4 / 0, 4, 8); sigma_scale 0.5 keeps MONAI's 1e-3 weight floor out of play
    x = torch.randn(1, 1, 24, 20, 16)
    with torch.no_grad():
        ours = sliding_window_inference(x, (16, 16, 8), 2, net, overlap=0.5, mode=mode, sigma_scale=0.5)
        ref = inferers.sliding_window_inference(x, (16, 16, 8), 2, net, overlap=0.5, mode=mode, sigma_scale=0.5)
    torch.testing.assert_close(ours, torch.as_tensor(ref), rtol=1e-5, atol=1e-5)


def test_constant_mode_linear_conv_equals_whole_volume_conv_in_the_interior():
    predictor = _conv_predictor(in_ch=1, out_ch=2, nonlinear=False)
    x = torch.randn(1, 1, 20, 15, dtype=torch.float64)
    roi, overlap = (8, 6), 0.5
    out = sliding_window_inference(x, roi, 4, predictor, overlap=overlap, mode="constant")
    whole = predictor(x)
    # a window's 'same' zero padding is wrong only on its own border, unless that border is the volume's; a
    # voxel is exact where no window covering it has it on such a border
    exact = torch.ones(x.shape[2:], dtype=torch.bool)
    for i in _brute_starts(20, roi[0], overlap):
        for j in _brute_starts(15, roi[1], overlap):
            inner = torch.zeros_like(exact)
            inner[i:i + roi[0], j:j + roi[1]] = True
            lo0, hi0 = (i + 1 if i > 0 else 0), (i + roi[0] - 1 if i + roi[0] < 20 else 20)
            lo1, hi1 = (j + 1 if j > 0 else 0), (j + roi[1] - 1 if j + roi[1] < 15 else 15)
            inner[lo0:hi0, lo1:hi1] = False
            exact &= ~inner
    assert exact.sum() > 0.3 * exact.numel()
    torch.testing.assert_close(out[..., exact], whole[..., exact], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[..., ~exact], whole[..., ~exact])  # the mask is not vacuous

    # a pointwise (1x1) linear predictor is exact everywhere, whatever the blending
    pointwise = _conv_predictor(in_ch=1, out_ch=2, kernel=1, nonlinear=False)
    for mode in ("constant", "gaussian"):
        out = sliding_window_inference(x, roi, 4, pointwise, overlap=overlap, mode=mode)
        torch.testing.assert_close(out, pointwise(x), rtol=1e-12, atol=1e-12)


def test_mirroring():
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 1, 3, 3, 3, generator=gen, dtype=torch.float64)
    k_sym = k + k.flip(2) + k.flip(3) + k.flip(2, 3)  # symmetric in spatial axes 0 and 1, not in axis 2

    def equivariant(t):
        return torch.tanh(F.conv3d(t, k_sym, padding=1))

    x = torch.randn(1, 1, 12, 10, 8, dtype=torch.float64, generator=gen)
    plain = sliding_window_inference(x, (8, 6, 8), 2, equivariant, overlap=0.5)
    tta = sliding_window_inference(x, (8, 6, 8), 2, equivariant, overlap=0.5, mirror_axes=(0, 1))
    torch.testing.assert_close(tta, plain, rtol=1e-12, atol=1e-12)
    # not equivariant along axis 2: TTA changes the result, and equals the average over the 4 flips
    tta2 = sliding_window_inference(x, (12, 10, 8), 1, equivariant, mirror_axes=[2, 0])
    flips = [(), (2,), (4,), (2, 4)]
    ref = sum(equivariant(x.flip(d)).flip(d) for d in flips) / 4
    torch.testing.assert_close(tta2, ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(tta2, equivariant(x))


def test_sw_batch_size_invariance_and_deep_supervision_lists():
    # float64 so that the batch size of the convolutions does not change the rounding
    net = _tiny_unet(ndim=2).double()
    x = torch.randn(2, 1, 20, 18, dtype=torch.float64)
    with torch.no_grad():
        outs = [sliding_window_inference(x, (8, 8), n, net, overlap=0.5) for n in (1, 3, 7, 100)]
        net.train()  # deep supervision: the predictor now returns a list, full resolution first
        listed = sliding_window_inference(x, (8, 8), 5, net, overlap=0.5)
    for out in outs[1:] + [listed]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-10)


def test_devices_progress_and_gradients(capsys):
    predictor = _conv_predictor(out_ch=1)
    x = torch.randn(1, 1, 9, 9, dtype=torch.float64, requires_grad=True)
    out = sliding_window_inference(x, 4, 2, predictor, device="cpu", sw_device=torch.device("cpu"), progress=True)
    assert out.shape == (1, 1, 9, 9)
    out.sum().backward()  # not wrapped in no_grad: gradients flow as with MONAI
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert "sliding window" in capsys.readouterr().err


def test_errors():
    x = torch.randn(1, 1, 8, 8)
    net = _conv_predictor()
    with pytest.raises(ValueError, match=r"roi_size must be a positive int or 2 positive ints"):
        sliding_window_inference(x, (4, 0), 1, net)
    with pytest.raises(ValueError, match=r"roi_size must be a positive int or 2 positive ints.*got \(4, 4, 4\)"):
        sliding_window_inference(x, (4, 4, 4), 1, net)
    with pytest.raises(ValueError, match="roi_size"):
        sliding_window_inference(x, (4.0, 4), 1, net)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"overlap must be a float in \[0, 1\), got " + str(bad)):
            sliding_window_inference(x, 4, 1, net, overlap=bad)
    with pytest.raises(ValueError, match="mode must be one of 'gaussian', 'constant', got 'mean'"):
        sliding_window_inference(x, 4, 1, net, mode="mean")
    with pytest.raises(ValueError, match=r"mirror_axes must be distinct spatial axis indices in \[0, 2\)"):
        sliding_window_inference(x, 4, 1, net, mirror_axes=(2,))
    with pytest.raises(ValueError, match="mirror_axes"):
        sliding_window_inference(x, 4, 1, net, mirror_axes=(0, 0))
    with pytest.raises(ValueError, match="sw_batch_size must be a positive int"):
        sliding_window_inference(x, 4, 0, net)
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        sliding_window_inference(x, 4, 1, net, padding_mode="wrap")
    with pytest.raises(ValueError, match=r"inputs must be a \(B, C, H, W\) or \(B, C, H, W, D\) tensor"):
        sliding_window_inference(torch.randn(8, 8), 4, 1, net)
    with pytest.raises(ValueError, match=r"predictor must map .* got output shape \(1, 2, 2, 2\)"):
        sliding_window_inference(x, 4, 1, lambda t: net(t)[..., ::2, ::2])


@pytest.mark.parametrize("padding_mode", ["constant", "reflect", "replicate", "circular"])
def test_padding_modes_are_cropped_away(padding_mode):
    x = torch.randn(2, 1, 5, 6, 7)
    out = sliding_window_inference(x, (8, 8, 4), 3, lambda t: 2 * t, padding_mode=padding_mode)
    torch.testing.assert_close(out, 2 * x, rtol=1e-6, atol=1e-6)
    half = sliding_window_inference(x, 4, 3, lambda t: t.bfloat16(), mirror_axes=(0, 2))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, x.bfloat16().float(), rtol=0, atol=1e-6)


def test_empty_input_error():
    with pytest.raises(ValueError, match="inputs must be a non-empty tensor"):
        sliding_window_inference(torch.zeros(0, 1, 4, 4), 2, 1, lambda t: t)
