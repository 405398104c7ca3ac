"""Atomic file output: everything fastseg writes goes to a temp file in the target folder, then is renamed.

A crash, a full disk or a kill mid-write therefore leaves either the previous file or none — never half of one.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, Path]


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


def _new_temp_file(folder: Path, prefix: str, suffix: str) -> Path:
    """Creates an empty file with a fresh name. Not mkstemp: its files are mode 0600, and the output should get
    the permissions a plain open() gives (umask applied), which reading the umask cannot do thread-safely."""
    while True:
        tmp = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temp path next to ``path`` with the same suffix (so writers that pick the format from the name
    still work); on success it replaces ``path``, on any error it is removed. Missing folders are created.

    Example:
        >>> with atomic_path("out/summary.csv") as tmp:
        ...     tmp.write_text("organ,dice\\n")
    """
    path = Path(path)
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"cannot write {str(path)!r}: {str(folder)!r} is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(path)
    tmp = _new_temp_file(folder, f".{path.name[:len(path.name) - len(suffix)]}.", f".tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_figure(fig, path: PathLike, **kwargs) -> Path:
    """Saves a matplotlib figure atomically (the format follows ``path``'s suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", **kwargs)
    return path
