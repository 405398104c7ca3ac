import pytest
import torch
import torch.nn.functional as F

import fastseg
from fastseg.functional import dice_ce_loss


def test_downsample_labels_is_nearest_exact():
    t = torch.randint(0, 9, (2, 17, 12, 9))
    for size in [(9, 6, 5), (4, 3, 2), (17, 12, 9), (5, 12, 3)]:
        got = fastseg.downsample_labels(t, size)
        ref = F.interpolate(t[:, None].double(), size=size, mode="nearest-exact")[:, 0].long()
        assert torch.equal(got, ref)
        assert got.dtype == t.dtype


def test_default_weights_are_normalised_halvings_and_targets_resized():
    gen = torch.Generator().manual_seed(0)
    outs = [torch.randn(2, 3, 16 // 2**i, 16 // 2**i, 8 // 2**i, generator=gen) for i in range(3)]
    t = torch.randint(0, 3, (2, 16, 16, 8), generator=gen)
    loss_fn = fastseg.DiceCELoss(include_background=False)
    ds = fastseg.DeepSupervisionLoss(loss_fn)
    assert ds.level_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    expected = sum(w * dice_ce_loss(o, fastseg.downsample_labels(t, o.shape[2:]), include_background=False)
                   for w, o in zip([4 / 7, 2 / 7, 1 / 7], outs))
    torch.testing.assert_close(ds(outs, t), expected)


def test_user_weights_and_zero_levels_skipped():
    outs = [torch.randn(1, 2, 8, 8, requires_grad=True), torch.randn(1, 2, 4, 4, requires_grad=True)]
    t = torch.randint(0, 2, (1, 8, 8))
    ds = fastseg.DeepSupervisionLoss(fastseg.DiceLoss(), weights=[1.0, 0.0])
    ds(outs, t).backward()
    assert outs[1].grad is None
    torch.testing.assert_close(ds(outs, t), fastseg.DiceLoss()(outs[0], t))


def test_deep_supervision_errors():
    with pytest.raises(ValueError, match="weights must be non-negative"):
        fastseg.DeepSupervisionLoss(fastseg.DiceLoss(), weights=[1.0, -1.0])
    ds = fastseg.DeepSupervisionLoss(fastseg.DiceLoss(), weights=[1.0, 0.5])
    with pytest.raises(ValueError, match="got 3 outputs but 2 weights"):
        ds([torch.randn(1, 2, 4, 4)] * 3, torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty list"):
        ds([], torch.zeros(1, 4, 4, dtype=torch.long))
