"""Errors every layer may raise and the CLI maps to one line (exit 2 for user mistakes, 1 for failures)."""

from __future__ import annotations


class StageFailed(RuntimeError):
    """A stage ran but produced nothing usable; it is not recorded as done, so a rerun tries it again."""
