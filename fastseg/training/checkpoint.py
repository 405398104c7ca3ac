"""Checkpoints: written atomically (temp file + rename), read with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain Python data (config, plan, history), so the restricted unpickler of
``weights_only=True`` reads it and a checkpoint from an untrusted source cannot run code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Union

import torch

from fastseg._atomic import atomic_path

FORMAT = "fastseg-checkpoint-1"


def save_checkpoint(state: Dict[str, Any], path: Union[str, Path]) -> Path:
    """Writes ``state`` (plus a format tag) to ``path`` atomically: a crash or a kill mid-write leaves the
    previous checkpoint intact and no partial file."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
    return Path(path)


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Reads a checkpoint written by :func:`save_checkpoint`; clear errors for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: path: expected an existing checkpoint file, got '{path}'")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"load_checkpoint: could not read '{path}' as a fastseg checkpoint: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"load_checkpoint: '{path}': expected a {FORMAT} checkpoint, got format {got!r}")
    return state
