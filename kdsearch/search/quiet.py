"""Ray Tune's and Optuna's console output, reduced to what kdsearch does not already say.

A search's console is kdsearch's own lines (one per finished trial, the progress line, the summary). Left
alone, the libraries add per-run and per-trial noise: Tune's boxed experiment header and a TensorBoard hint
that points into Ray's temporary session folder (its new output engine prints both at any verbosity; the
legacy engine, RAY_AIR_NEW_OUTPUT=0, prints nothing at verbose=0), "Checkpoint successfully created" from
every trial worker at every epoch and "Restored on ... from checkpoint" from every resumed trial (INFO lines
of ray.train / ray.tune loggers in the workers), and Optuna's "A new study created" line. Warnings and
errors (a failed trial's traceback) still show.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

# The library loggers whose INFO lines are noise in a search: driver side (tune, optuna) and worker side (train).
QUIET_LOGGERS = ("ray.tune", "ray.train", "ray.air", "optuna")


def quiet_library_loggers() -> None:
    """Raise the library loggers to WARNING in this process: the driver (`run_search`), and every worker
    (`kdsearch.raycluster.ensure_ray` names this function as Ray's worker_process_setup_hook)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def tune_environment(snapshot_s: float) -> Iterator[None]:
    """Tune's settings for one run, read from the environment when the run starts; a user's own setting wins.

    TUNE_GLOBAL_CHECKPOINT_S: the experiment snapshot period (Tune's default is >= 10 s, and work since the last
    snapshot is redone after a crash). RAY_AIR_NEW_OUTPUT=0: the output engine that is silent at verbose=0.
    """
    keys = {"TUNE_GLOBAL_CHECKPOINT_S": str(snapshot_s), "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
            "RAY_AIR_NEW_OUTPUT": "0"}
    saved = {k: os.environ.get(k) for k in keys}
    for k, v in keys.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
