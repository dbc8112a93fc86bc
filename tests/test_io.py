"""Atomic writes leave either the old file or the new one, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from kdsearch.io import atomic_path, atomic_write_text


def test_atomic_write_replaces_and_is_readable(tmp_path):
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert stat.S_IMODE(p.stat().st_mode) & 0o044  # group/other can read (umask permitting)
    assert [x.name for x in p.parent.iterdir()] == ["f.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
