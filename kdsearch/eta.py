"""An early estimate of how long a model's training has left, measured by the training loop itself.

Why early: on a machine slower than the spec assumes (the seed's 200-epoch WRN-28-10 on 2 CPU cores), one epoch
takes hours, so an estimate after the first epoch comes too late to change course. `StepClock` estimates after
`EARLY_S` seconds of steps (or the first epoch, if that is sooner), logs it once, logs it again after the first
full epoch (which then includes a validation pass), and keeps `<checkpoint>.eta.json` beside the checkpoint up to
date after every epoch. The stage's estimate and `kdsearch status` read those files
(`kdsearch.progress.stage_eta`).

Short runs (less than `LONG_S` in all: search trials, smoke tests) log and write nothing.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from .io import atomic_write_json
from .rundir import ETA_SUFFIX

log = logging.getLogger("kdsearch.eta")

EARLY_S = 30.0  # the first estimate after this much training time, or the first epoch if sooner
LONG_S = 600.0  # a model whose training takes less than this gets no estimate


def fmt_duration(seconds: float) -> str:
    """45s, 6m, 1h 23m: coarse on purpose (an ETA is an estimate)."""
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{math.ceil(s / 60):.0f}m"
    h, m = divmod(int(round(s / 60)), 60)
    return f"{h}h {m:02d}m"


def eta_path(ckpt_path: Path | None) -> Path | None:
    """Where the estimate of the model checkpointed at `ckpt_path` lives (None without a checkpoint)."""
    return None if ckpt_path is None else Path(ckpt_path).with_suffix(ETA_SUFFIX)


class StepClock:
    """Times the optimizer steps of one `fit` call: make it just before the first step, `tick(step)` after each step
    (global step index), `finish()` at the end. The first step pays for warm-up (allocations, DataLoader workers
    starting), so timing starts after it unless it alone took `EARLY_S`; validation passes fall between steps and
    are counted."""

    def __init__(self, desc: str, device: str, steps_per_epoch: int, total_steps: int,
                 path: Path | None) -> None:
        self.desc, self.device, self.path = desc, device, path
        self.steps_per_epoch, self.total_steps = max(1, steps_per_epoch), total_steps
        self._t0 = time.perf_counter()
        self._t1: float | None = None  # when the first step ended, and its global step count
        self._s1 = 0
        self._estimated = self._long = self._epoch_logged = False

    def tick(self, step: int) -> None:
        now, done = time.perf_counter(), step + 1
        first = self._t1 is None
        if first:
            self._t1, self._s1 = now, done
        epoch_end = done % self.steps_per_epoch == 0
        if not (epoch_end or (not self._estimated and now - self._t0 >= EARLY_S)):
            return
        # after the first step, time from its end; a first step that alone took EARLY_S dwarfs its warm-up
        per_step = (now - self._t0) if first else (now - self._t1) / (done - self._s1)  # type: ignore[operator]
        left = (self.total_steps - done) * per_step
        if not self._estimated:
            self._estimated, self._long = True, per_step * self.total_steps >= LONG_S
            self._epoch_logged = epoch_end
            if self._long:
                self._log(done, per_step, left, "after a full epoch" if epoch_end else "early estimate")
        elif epoch_end and not self._epoch_logged and self._long:
            self._epoch_logged = True
            self._log(done, per_step, left, "after a full epoch")
        if self._long:
            self._write(done, per_step, left, finished=False)

    def finish(self) -> None:
        """Mark the estimate done, so views stop counting this model."""
        if self._long and self.path is not None and self.path.is_file():
            self._write(self.total_steps, 0.0, 0.0, finished=True)

    def _write(self, done: int, per_step: float, left: float, *, finished: bool) -> None:
        if self.path is None:
            return
        atomic_write_json(self.path, {"model": self.desc, "device": self.device, "updated": time.time(),
                                      "ends_at": time.time() + left, "s_per_step": per_step, "steps_done": done,
                                      "total_steps": self.total_steps, "done": finished})

    def _log(self, done: int, per_step: float, left: float, when: str) -> None:
        until = time.strftime("%a %d %b %H:%M", time.localtime(time.time() + left))  # weeks away on a CPU
        log.info("ETA %s (%s): %.3g s/step on %s, %d of %d steps left: about %s (until %s)", self.desc, when,
                 per_step, self.device, self.total_steps - done, self.total_steps, fmt_duration(left), until)
