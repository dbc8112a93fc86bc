"""A teacher ensemble served by Ray actors: one teacher per actor, answering logits for a batch.

Why actors: a large teacher ensemble (the seed's WRN-28-10 + DenseNet-190) does not fit beside the
student on one GPU, and on a cluster each teacher can own a GPU (or a fraction: `teachers.gpus`). The
pool sends each batch once as uint8 NumPy (one `ray.put`; every actor gets the same zero-copy ref, and
normalises inside itself), gathers [T, B, C] logits, and keeps the next `lookahead` batches in flight
while the student steps on the current one, so the teachers' time overlaps the student's.

Fault tolerance is Ray's: actors are created with `max_restarts` and `max_task_retries`, so a teacher
process that dies mid-run is restarted (its constructor runs again from the same arguments) and the
requests it had in flight are retried; the training loop only sees a slower batch.
"""

from __future__ import annotations

import copy
import os
import uuid
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .numerics import teacher_autocast, teacher_bf16, teacher_format


class TeacherActor:
    """One frozen teacher in its own process (wrapped by `ray.remote` in `TeacherPool`)."""

    def __init__(self, name: str, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 use_gpu: bool, threads: int, bf16: bool = True, channels_last: bool = True) -> None:
        from ..data import Normalizer

        self.name = name
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # A Ray worker otherwise sizes torch's pool to the host, oversubscribing the cores it shares.
            torch.set_num_threads(max(1, threads))
        self.fmt = teacher_format(channels_last)
        self.bf16 = teacher_bf16(self.device, bf16)
        self.model = model.to(self.device, memory_format=self.fmt).eval().requires_grad_(False)
        self.norm = Normalizer(mean, std).to(self.device)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, 3, H, W] -> float32 logits [B, C]."""
        with warnings.catch_warnings():  # the object store hands out read-only arrays; we never write into them
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(images)
        x = self.norm(x.to(self.device, non_blocking=True)).contiguous(memory_format=self.fmt)
        with torch.inference_mode(), teacher_autocast(self.device, self.bf16):
            out = self.model(x)
        return out.float().cpu().numpy()

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), "device": str(self.device), "threads": torch.get_num_threads()}


class TeacherPool:
    """A `TeacherSource` backed by one named, restartable Ray actor per teacher.

    `models` maps a teacher name (its architecture) to a model; the pool ships each model once through
    the object store. Actor names are `kdsearch-teacher-<tag>-<name>`: with the same `tag` (e.g. a hash
    of the teacher files) a second process, such as a Tune trial, joins the running actors instead of
    starting new ones (`TeacherPool.attach`). The pool object pickles (it holds actor handles and refs).
    """

    def __init__(self, models: Mapping[str, nn.Module], mean: tuple[float, ...], std: tuple[float, ...], *,
                 num_cpus: float = 1.0, num_gpus: float = 0.0, lookahead: int = 2, max_restarts: int = 3,
                 max_task_retries: int = 3, tag: str | None = None, bf16: bool = True,
                 channels_last: bool = True) -> None:
        import ray

        if not models:
            raise ValueError("TeacherPool needs at least one teacher")
        if lookahead < 0:
            raise ValueError(f"TeacherPool.lookahead must be >= 0 (got {lookahead})")
        self.tag = tag or uuid.uuid4().hex[:8]
        self.lookahead = lookahead
        self.teachers = tuple(models)
        remote = ray.remote(TeacherActor)
        threads = max(1, int(num_cpus))
        # The pool owns the model refs for its lifetime: a restarted actor re-reads them in its constructor,
        # and Ray frees an object once its owner drops the last reference.
        self._model_refs = {name: ray.put(copy.deepcopy(model).cpu().eval()) for name, model in models.items()}
        self.actors = [
            remote.options(name=self.actor_name(self.tag, name), get_if_exists=True, num_cpus=num_cpus,
                           num_gpus=num_gpus, max_restarts=max_restarts, max_task_retries=max_task_retries)
            .remote(name, ref, tuple(mean), tuple(std), num_gpus > 0, threads, bf16, channels_last)
            for name, ref in self._model_refs.items()
        ]

    @staticmethod
    def actor_name(tag: str, teacher: str) -> str:
        return f"kdsearch-teacher-{tag}-{teacher}"

    @classmethod
    def attach(cls, tag: str, teachers: Iterable[str], lookahead: int = 2) -> "TeacherPool":
        """Handles to a pool another process started with the same `tag` (raises ValueError if absent)."""
        import ray

        pool = cls.__new__(cls)
        pool.tag, pool.lookahead, pool.teachers = tag, lookahead, tuple(teachers)
        pool.actors = [ray.get_actor(cls.actor_name(tag, t)) for t in pool.teachers]
        pool._model_refs = {}  # the creating process owns them
        return pool

    def wait_ready(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([a.info.remote() for a in self.actors])

    def pids(self) -> list[int]:
        import ray

        return ray.get([a.pid.remote() for a in self.actors])

    def _submit(self, batch: Any) -> list[Any]:
        import ray

        ref = ray.put(np.ascontiguousarray(batch.images.detach().cpu().numpy()))  # once, shared by every actor
        return [a.logits.remote(ref) for a in self.actors]

    @staticmethod
    def _gather(refs: list[Any]) -> torch.Tensor:
        import ray

        return torch.from_numpy(np.stack(ray.get(refs)))  # [T, B, C]

    def annotate(self, batches: Iterable[Any], epoch: int) -> Iterator[tuple[Any, torch.Tensor]]:
        """Yield (batch, logits [T, B, C]) in order, with batches k+1..k+lookahead already submitted."""
        pending: deque[tuple[Any, list[Any]]] = deque()
        for batch in batches:
            pending.append((batch, self._submit(batch)))
            if len(pending) > self.lookahead:
                done, refs = pending.popleft()
                yield done, self._gather(refs)
        while pending:
            done, refs = pending.popleft()
            yield done, self._gather(refs)

    def shutdown(self) -> None:
        """Kill the actors (no restart); the pool is unusable afterwards."""
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors, self._model_refs = [], {}
