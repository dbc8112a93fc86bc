"""What a stage needs besides the spec: where the run lives and how to reach compute."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .runtime import resolve_device


@dataclass(frozen=True)
class RunContext:
    run_dir: Path
    device: torch.device
    address: str | None = None  # Ray cluster address ("auto" joins `ray up`'s cluster); None starts a local Ray
    progress: bool = True  # live bars on a terminal; per-epoch log lines always

    @classmethod
    def create(cls, run_dir: str | Path, device: str = "auto", address: str | None = None,
               progress: bool | None = None) -> "RunContext":
        return cls(Path(run_dir), resolve_device(device), address,
                   sys.stderr.isatty() if progress is None else progress)


def setup_logging(level: int = logging.INFO) -> None:
    """One line per event on stderr: readable in a terminal and in a log file alike."""
    root = logging.getLogger("kdsearch")
    if not root.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    root.setLevel(level)
