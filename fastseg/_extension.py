"""Loads the compiled extension, or explains once why fastseg runs on its pure-PyTorch reference.

The extension is refused when it was built against another torch (its ABI would not match) and when
FASTSEG_DISABLE_EXTENSION=1 is set (tests use this to exercise the fallback).
"""
from __future__ import annotations

import os
import warnings

import torch

__all__ = ["available", "cuda_available", "unavailable_reason", "build_info"]


def _torch_release(version: str) -> str:
    return version.split("+")[0]


def _load():
    if os.environ.get("FASTSEG_DISABLE_EXTENSION", "0") == "1":
        return None, "FASTSEG_DISABLE_EXTENSION=1 is set"
    try:
        from fastseg import _C
    except (ImportError, OSError) as exc:
        return None, f"the compiled extension fastseg._C could not be loaded ({exc})"
    built, running = _C.torch_version, _torch_release(torch.__version__)
    if built != running:
        return None, (
            f"fastseg._C was built against torch {built} but torch {running} is installed; "
            "rebuild with `pip install --no-build-isolation --force-reinstall --no-deps fastseg`"
        )
    return _C, None


_C, _REASON = _load()
if _C is None:
    warnings.warn(
        f"fastseg is using its pure-PyTorch reference implementation (slower, more memory): {_REASON}.",
        RuntimeWarning,
        stacklevel=2,
    )


def available() -> bool:
    """True when the compiled kernels are loaded."""
    return _C is not None


def cuda_available() -> bool:
    """True when the compiled extension contains the CUDA kernels."""
    return _C is not None and bool(_C.with_cuda)


def unavailable_reason() -> str | None:
    return _REASON


def build_info() -> dict:
    return {
        "extension": _C is not None,
        "cuda_kernels": cuda_available(),
        "built_against_torch": getattr(_C, "torch_version", None),
        "torch": torch.__version__,
        "reason": _REASON,
    }
