"""One search trial: a short QAT+KD of the float KD student under a bit configuration, resumable.

`run_trial` is the bookkeeping every trial shares (the real QAT trial and the synthetic ones of the tests
and benchmarks); the work itself is a function `work(bits, ckpt_path, on_epoch) -> history` that saves
`ckpt_path` after each epoch and then calls `on_epoch(metrics)` (what `kdsearch.train.fit` does).

Resume, in order of preference:
* the trial's own record, runs/<name>/search/trials/<number>/ (keyed by the Optuna trial number, which a
  restored study hands out again): a finished trial is reported from its record and never retrained, an
  unfinished one continues from its last epoch checkpoint;
* Tune's checkpoint (`tune.get_checkpoint()`), reported with every epoch: what a retry on another node
  sees when the run directory is not on a shared file system.
A record whose bits differ from the trial's (a number reused for another sample after a crash) is stale
and discarded. trial.json keeps one entry per attempt (start epoch, epochs trained), for provenance.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import atomic_write_json
from ..pareto import ACC, BOPS, SIZE
from .space import SearchSpace

log = logging.getLogger("kdsearch.search.trial")

Work = Callable[[dict[str, int], Path, Callable[[dict[str, float]], None]], list[dict[str, float]]]
CKPT_NAME = "ckpt.pt"


class TrialRecord:
    """runs/<name>/search/trials/<number>/: trial.json (bits, history, attempts, final) and the checkpoint."""

    def __init__(self, trials_dir: str | Path, number: int, bits: Mapping[str, int]) -> None:
        self.root = Path(trials_dir) / f"{int(number):05d}"
        self.ckpt = self.root / CKPT_NAME
        self.meta_path = self.root / "trial.json"
        self.bits = {k: int(v) for k, v in bits.items()}
        meta = json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else None
        if meta is not None and meta.get("bits") != self.bits:
            log.info("trial %s: record %s holds other bits (a sample lost in a crash); starting afresh",
                     number, self.root)
            shutil.rmtree(self.root)
            meta = None
        self.meta: dict[str, Any] = meta or {"number": int(number), "bits": self.bits, "history": [],
                                             "attempts": [], "final": None, "seconds": 0.0}
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def epochs_done(self) -> int:
        return len(self.meta["history"])

    def save(self) -> None:
        atomic_write_json(self.meta_path, self.meta)

    def adopt(self, ckpt_dir: str | Path) -> None:
        """Take a Tune checkpoint's files when they are further along than the local ones."""
        other = Path(ckpt_dir)
        meta_file = other / "trial.json"
        if not meta_file.is_file():
            return
        theirs = json.loads(meta_file.read_text())
        if theirs.get("bits") == self.bits and len(theirs.get("history", [])) > self.epochs_done:
            if (other / CKPT_NAME).is_file():
                shutil.copy2(other / CKPT_NAME, self.ckpt)
            self.meta.update(history=theirs["history"], seconds=theirs.get("seconds", 0.0))
            self.save()


def run_trial(config: Mapping[str, Any], trials_dir: str | Path, space: SearchSpace, work: Work, *,
              epochs: int) -> None:
    """Run (or resume, or replay) one trial inside a Tune function trainable."""
    from ray import tune

    number, bits = int(config["number"]), {k: int(v) for k, v in config["bits"].items()}
    rec = TrialRecord(trials_dir, number, bits)
    static = {SIZE: space.size_mb(bits), "avg_bits": space.avg_bits(bits), "number": number}
    if space.bops:  # a space restored from before BOPs has none
        static[BOPS] = space.gbops(bits)
    if rec.meta["final"] is not None:  # finished before a crash: report, do not retrain
        rec.meta["attempts"].append({"start_epoch": rec.epochs_done, "trained": 0, "replayed": True})
        rec.save()
        tune.report({**rec.meta["final"], "replayed": 1})
        return
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            rec.adopt(d)
    from ..raycluster import where

    attempt = {"start_epoch": rec.epochs_done, "trained": 0, "node": where()}  # where each attempt ran
    rec.meta["attempts"].append(attempt)
    rec.save()
    t0, base_s = time.perf_counter(), float(rec.meta["seconds"])

    def row(m: Mapping[str, float]) -> dict[str, float]:
        extra = {"train_loss": float(m["train_loss"])} if "train_loss" in m else {}
        return {"epoch": int(m["epoch"]), ACC: float(m[ACC]), "epoch_s": float(m.get("epoch_s", 0.0)),
                "wall_s": base_s + time.perf_counter() - t0, **extra, **static}

    def on_epoch(m: dict[str, float]) -> None:
        r = row(m)
        attempt["trained"] += 1
        rec.meta["history"].append(r)
        rec.meta["seconds"] = r["wall_s"]
        if r["epoch"] >= epochs:  # before the report: a scheduler may stop the trial at its last result
            rec.meta["final"] = r
        rec.save()
        with tempfile.TemporaryDirectory(prefix="kdsearch-ckpt-") as d:
            if rec.ckpt.is_file():
                shutil.copy2(rec.ckpt, Path(d) / CKPT_NAME)
            shutil.copy2(rec.meta_path, Path(d) / "trial.json")
            tune.report(r, checkpoint=tune.Checkpoint.from_directory(d))

    history = work(bits, rec.ckpt, on_epoch)
    if not history:
        raise RuntimeError(f"trial {number}: the work returned no epochs")
    if attempt["trained"] == 0:  # the checkpoint was already complete: record and report its last epoch once
        final = row(history[-1])
        if final["epoch"] >= epochs:
            rec.meta["final"] = final
            rec.save()
        tune.report(final)


# ---- the real trial: QAT + KD from the float KD student ----------------------------------------------------

@dataclass(frozen=True)
class QatPayload:
    """What every QAT trial needs, built once by the driver (small: the spec as a dict, paths, handles' names)."""

    spec: dict[str, Any]
    trials_dir: str
    student_path: str
    space: SearchSpace
    source: str  # "cache" (logit cache at cache_dir), "live" (attach to the Ray actors `pool_tag`), "none"
    cache_dir: str | None = None
    pool_tag: str | None = None
    teachers: tuple[str, ...] = ()
    cpus: float = 1.0
    key: str = ""  # the search's inputs key: a trial checkpoint is resumed only under the same key and bits

    def __post_init__(self) -> None:
        if self.source not in ("cache", "live", "none"):
            raise ValueError(f"QatPayload.source must be cache, live or none (got {self.source!r})")
        if self.source == "cache" and not self.cache_dir:
            raise ValueError("QatPayload.cache_dir is required for the cache source")
        if self.source == "live" and not (self.pool_tag and self.teachers):
            raise ValueError("QatPayload.pool_tag and teachers are required for the live source")


def _qat_work(bits: dict[str, int], ckpt_path: Path, on_epoch: Callable[[dict[str, float]], None], *,
              payload: QatPayload) -> list[dict[str, float]]:
    from ..distill import LogitCache, TeacherPool
    from ..io import stable_hash
    from ..qat import qat_finetune
    from ..quant import model_size
    from ..raycluster import task_device
    from ..spec import parse_spec

    spec = parse_spec(payload.spec)

    def check_size(model: Any) -> None:  # the constraint and the size model must be one idea
        size = model_size(model).total_bytes
        if size != payload.space.size_bytes(bits):
            raise RuntimeError(f"size model says {size} bytes for {bits}, the search space "
                               f"{payload.space.size_bytes(bits)}")

    teacher: Any = None
    if payload.source == "cache":
        teacher = LogitCache(payload.cache_dir)
    elif payload.source == "live":
        teacher = TeacherPool.attach(payload.pool_tag, payload.teachers)  # type: ignore[arg-type]
    _, out = qat_finetune(spec, Path(payload.student_path), bits, spec.search.trial, device=task_device(spec.device),
                          seed=spec.seed, teacher=teacher, ckpt_path=ckpt_path, desc=f"trial {ckpt_path.parent.name}",
                          on_epoch=on_epoch, on_quantized=check_size, fresh_views=False,
                          resume_key=stable_hash({"search": payload.key, "bits": bits}))
    return list(out["history"])


def qat_trial(config: dict[str, Any], payload: QatPayload) -> None:
    """The Tune function trainable of `kdsearch search` (top-level: Tune pickles it by reference)."""
    from ..runtime import set_cpu_threads
    from ..spec import parse_spec

    set_cpu_threads(payload.cpus)
    epochs = parse_spec(payload.spec).search.trial_epochs
    run_trial(config, payload.trials_dir, payload.space, functools.partial(_qat_work, payload=payload), epochs=epochs)
