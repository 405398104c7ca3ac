"""The compiled extension's loading, and the pure-PyTorch fallback without it."""
import os
import subprocess
import sys
import textwrap

import fastseg


def test_build_info_reports_the_extension():
    info = fastseg.build_info()
    assert set(info) >= {"extension", "cuda_kernels", "built_against_torch", "torch", "reason"}
    if info["extension"]:
        assert info["reason"] is None
        assert info["built_against_torch"] == info["torch"].split("+")[0]


def test_fallback_warns_once_and_gives_the_same_loss():
    code = textwrap.dedent(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastseg
            import torch
            x = torch.randn(2, 4, 6, 6, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
            t = torch.randint(0, 4, (2, 6, 6, 6), generator=torch.Generator().manual_seed(1))
            loss = fastseg.DiceCELoss(include_background=False, absent_classes="ignore")(x, t)
            loss.backward()
            fastseg.dice_ce_loss(x, t)
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1, msgs
        assert "pure-PyTorch reference" in msgs[0] and "FASTSEG_DISABLE_EXTENSION" in msgs[0], msgs
        assert not fastseg._extension.available()
        print(repr(loss.item()), repr(x.grad.abs().sum().item()))
        """
    )
    env = dict(os.environ, FASTSEG_DISABLE_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    loss_fb, grad_fb = map(float, out.stdout.split())

    import torch

    x = torch.randn(2, 4, 6, 6, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    t = torch.randint(0, 4, (2, 6, 6, 6), generator=torch.Generator().manual_seed(1))
    loss = fastseg.DiceCELoss(include_background=False, absent_classes="ignore")(x, t)
    loss.backward()
    assert abs(loss.item() - loss_fb) < 1e-5
    assert abs(x.grad.abs().sum().item() - grad_fb) < 1e-4 * grad_fb
