"""Atomic file writes and provenance.

Every stage output is written to a temporary file in the destination directory and renamed into
place, so a crash (or SIGKILL) leaves either the old file or the new one, never a torn one: a
Parquet file is only readable once closed, and `torch.save` is not atomic either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path` (same filesystem)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; a shipped model file should be readable
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    import torch  # here, not at the top: the CLI's read-only commands import this module and must start fast

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_to_parquet(df: "Any", path: str | os.PathLike[str]) -> None:
    """Write a pandas DataFrame as Parquet atomically (readers never see an unclosed file)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def stable_hash(obj: Any) -> str:
    """Short content hash of a JSON-able object (keys sorted), used for stage-input fingerprints."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: str | os.PathLike[str]) -> str:
    """Short content hash of a file (e.g. a model checkpoint a later stage depends on)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def git_commit() -> str | None:
    """The commit of the kdsearch source tree, for provenance; None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
