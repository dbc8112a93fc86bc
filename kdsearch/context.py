"""What a stage needs besides the spec: where the run lives, which device it asks for, how to reach compute.

The driver never resolves a device: `device_request` ("auto", "cpu", "cuda") travels to the Ray tasks, which
resolve it where they run (`kdsearch.raycluster.task_device`), so a driver on a GPU-less head node still puts
the work on the workers' GPUs.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunContext:
    run_dir: Path
    device_request: str = "auto"
    address: str | None = None  # Ray cluster address ("auto" joins `ray up`'s cluster); None starts a local Ray
    progress: bool = True  # live bars on a terminal; per-epoch log lines always
    py_modules: tuple[str, ...] = ()  # the user's packages every Ray worker imports (runtime_env py_modules)

    @classmethod
    def create(cls, run_dir: str | Path, device: str = "auto", address: str | None = None,
               progress: bool | None = None, py_modules: tuple[str, ...] = ()) -> "RunContext":
        return cls(Path(run_dir), device, address, sys.stderr.isatty() if progress is None else progress,
                   tuple(py_modules))

    @property
    def device(self) -> Any:
        """This process's device for the request; for in-process helpers (tests, benchmarks), not for stages."""
        from .runtime import resolve_device

        return resolve_device(self.device_request)


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler that writes to whatever `sys.stderr` is when a record is emitted, not the stream it saw when it
    was made: a program (or a test harness) that swaps stderr must not leave the logger writing to a closed file."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """One line per event on stderr: readable in a terminal and in a log file alike."""
    root = logging.getLogger("kdsearch")
    if not root.handlers:
        h = _CurrentStderr()
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    root.setLevel(level)
