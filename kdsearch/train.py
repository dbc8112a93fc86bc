"""One training loop for every stage: scratch, KD, QAT and QAT+KD.

The loop does not know what it trains: a float model or one that `kdsearch.quant.quantize`
rewrote (QAT), with or without a teacher source (KD). Batches arrive as augmented uint8 images
(`kdsearch.data.Batch`); normalisation happens here, on the device, so that teachers served
elsewhere can receive the same uint8 views.

Resume is exact at epoch granularity: the learning rate is a pure function of the global step,
and the checkpoint (written atomically after every epoch) holds model, optimizer, step and history.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from .eta import StepClock, eta_path
from .io import atomic_torch_save, stable_hash
from .quant import is_quantized, strict_fp32, strict_fp32_active
from .spec import TrainConfig

log = logging.getLogger("kdsearch.train")


class TeacherSource(Protocol):
    """Anything that answers teacher logits [T, B, C] for a stream of batches (in-process, Ray pool, cache)."""

    def annotate(self, batches: Iterable[Any], epoch: int) -> Iterator[tuple[Any, torch.Tensor]]: ...


KDLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(student_logits [B,C], teacher_logits [T,B,C], labels [B]) -> scalar loss."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf: stop instead of writing a poisoned checkpoint."""


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    epochs_run: int = 0  # epochs executed in this call (0 when the checkpoint was already complete)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate after `step` optimizer steps: linear warm-up, then cosine to 0 / one-cycle / constant."""
    warm = int(cfg.warmup_epochs / cfg.epochs * total_steps)
    if cfg.schedule == "onecycle":  # Smith & Topin 2017: up for 25% of steps from lr/25, then linearly down
        peak = max(1, int(0.25 * total_steps))
        if step < peak:
            return cfg.lr * (0.04 + 0.96 * step / peak)
        return cfg.lr * max(0.0, (total_steps - step) / max(1, total_steps - peak))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warm) / max(1, total_steps - warm)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


class OptimizerSet:
    """SGD for the model's weights plus, when it has learned quantizer log-steps, Adam for those alone.

    Why a second optimizer: a learned step is a scale, not a weight. Under SGD its update is proportional
    to its gradient, which for a step whose channel has values at the clip edge is dominated by +-Qp terms
    and can dwarf the weights' updates (the runaway the issue measured). Adam's per-parameter normalisation
    makes the update of ``log s`` about ``step_lr`` per step whatever the gradient's size, so a step's drift
    over a run is bounded. Both follow the same schedule shape (``lr_scale`` per group x ``lr_at``).
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError("optimizer checkpoint holds a different set of optimizers")
        for o, st in zip(self.optimizers, states):
            o.load_state_dict(st)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> OptimizerSet:
    """SGD Nesterov (no weight decay on 1-d parameters: BN, biases); Adam at ``cfg.step_lr`` for learned log-steps."""
    from .quant import quantizer_parameters

    steps = {id(p) for p in quantizer_parameters(model)}
    decay, no_decay, step_params = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in steps:
            step_params.append(p)
        else:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    opts: list[torch.optim.Optimizer] = [
        torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)]
    if step_params:
        opts.append(torch.optim.Adam([{"params": step_params, "lr_scale": cfg.step_lr / cfg.lr}], lr=cfg.step_lr))
    return OptimizerSet(opts)


def _autocast(device: torch.device, cfg: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda" and cfg.bf16 and not strict_fp32_active():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _fp32_if_quantized(fn: _Fn) -> _Fn:
    """Run ``fn(model, ...)`` in strict fp32 (no autocast, no TF32, backward included) when ``model`` is quantized.

    Why: QAT must train and measure the function the exported integer model computes, in fp32 (see
    ``kdsearch.quant.precision``); bf16 autocast and TF32 stay on for float phases only. Teachers that
    enter their own bf16 autocast (``kdsearch.distill``) keep it.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        model = args[0] if args else kwargs["model"]
        with strict_fp32() if is_quantized(model) else contextlib.nullcontext():
            return fn(*args, **kwargs)

    return cast(_Fn, wrapper)


def _memory_format(device: torch.device, cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" and cfg.channels_last else torch.contiguous_format


@_fp32_if_quantized
@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[Any], normalizer: nn.Module, device: torch.device, cfg: TrainConfig | None = None
) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over `batches` (a `kdsearch.data.EvalLoader`)."""
    cfg = cfg or TrainConfig()
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    fmt = _memory_format(device, cfg)
    for batch in batches:
        x = normalizer(batch.images.to(device, non_blocking=True)).contiguous(memory_format=fmt)
        y = batch.labels.to(device, non_blocking=True)
        with _autocast(device, cfg):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += y.numel()
    model.train(was_training)
    return {"acc": 100.0 * correct / max(1, n), "loss": loss_sum / max(1, n)}


@dataclass(frozen=True)
class FitRun:
    """Everything one `fit` call needs besides the model and its data, in one typed place.

    `resume_key` is the caller's hash of every input that shapes the model besides `cfg` (data and
    augmentation, distillation settings, the teachers' files, the start model, bit configuration, pins,
    activation bits, seed): the checkpoint at `ckpt_path` is resumed only when it was written under the same
    key, so a crash followed by an edited spec starts over instead of finishing a model of other inputs.
    `teacher` + `kd_loss` turn the step into distillation; `on_epoch` receives each epoch's metrics (Ray Tune
    trials report from it); `start_epoch_hook(epoch)` runs before each epoch.
    """

    cfg: TrainConfig
    normalizer: nn.Module
    device: torch.device
    ckpt_path: Path | None = None
    resume_key: str | None = None
    teacher: TeacherSource | None = None
    kd_loss: KDLoss | None = None
    desc: str = "train"
    progress: bool | None = None
    on_epoch: Callable[[dict[str, float]], None] | None = None
    start_epoch_hook: Callable[[int], None] | None = None

    def __post_init__(self) -> None:
        if (self.teacher is None) != (self.kd_loss is None):
            raise ValueError("teacher and kd_loss go together: pass both for KD, neither for plain training")


@_fp32_if_quantized
def fit(model: nn.Module, train: Any, val: Iterable[Any] | None, run: FitRun) -> FitResult:
    """Train `model` for run.cfg.epochs on `train` (a `kdsearch.data.TrainLoader`), resuming from run.ckpt_path.

    `val` (a validation `EvalLoader`, never the test split: whatever reads the history makes choices from it)
    is measured after every epoch as `val_acc` / `val_loss`. Returns the full history, restored epochs included.
    """
    cfg, device, desc, ckpt_path = run.cfg, run.device, run.desc, run.ckpt_path
    teacher, kd_loss, on_epoch, start_epoch_hook = run.teacher, run.kd_loss, run.on_epoch, run.start_epoch_hook
    model.to(device=device, memory_format=_memory_format(device, cfg))
    normalizer = run.normalizer.to(device)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = len(train)
    total_steps = cfg.epochs * steps_per_epoch
    run_key = stable_hash({"cfg": cfg.model_dump(mode="json"), "steps": steps_per_epoch, "kd": teacher is not None,
                           "inputs": run.resume_key})
    result, start = FitResult(), 0

    if ckpt_path is not None and Path(ckpt_path).is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if state.get("run_key") == run_key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            result.history = list(state["history"])
            start = int(state["epoch"])
            log.info("%s: resumed from %s at epoch %d/%d", desc, ckpt_path, start, cfg.epochs)
        else:
            log.warning("%s: checkpoint %s was made from other inputs (training settings, data, distillation, "
                        "teachers, bits or seed changed since); starting over", desc, ckpt_path)

    show_bar = sys.stderr.isatty() if run.progress is None else run.progress
    fmt = _memory_format(device, cfg)
    clock = StepClock(desc, device.type, steps_per_epoch, total_steps, eta_path(ckpt_path))  # an early ETA
    for epoch in range(start, cfg.epochs):
        if start_epoch_hook is not None:
            start_epoch_hook(epoch)
        model.train()
        t0, loss_sum, correct, seen = time.perf_counter(), torch.zeros((), device=device), torch.zeros((), device=device), 0
        stream: Iterable[tuple[Any, torch.Tensor | None]]
        batches = train.epoch(epoch)
        stream = teacher.annotate(batches, epoch) if teacher is not None else ((b, None) for b in batches)
        bar = _progress_bar(show_bar, steps_per_epoch, f"{desc} epoch {epoch + 1}/{cfg.epochs}")
        for i, (batch, t_logits) in enumerate(stream):
            step = epoch * steps_per_epoch + i
            lr = lr_at(step, total_steps, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            x = normalizer(batch.images.to(device, non_blocking=True)).contiguous(memory_format=fmt)
            y = batch.labels.to(device, non_blocking=True)
            with _autocast(device, cfg):
                logits = model(x)
            logits = logits.float()
            if t_logits is not None and kd_loss is not None:
                loss = kd_loss(logits, t_logits.to(device, non_blocking=True).float(), y)
            else:
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            loss_sum += loss.detach() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
            bar.advance()
            clock.tick(step)
        bar.close()
        train_loss = (loss_sum / max(1, seen)).item()
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"{desc}: loss is {train_loss} in epoch {epoch + 1}; lower the learning rate")
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_acc": 100.0 * (correct / max(1, seen)).item(),
            "lr": lr_at((epoch + 1) * steps_per_epoch - 1, total_steps, cfg),
            "epoch_s": time.perf_counter() - t0,
        }
        if val is not None:
            ev = evaluate(model, val, normalizer, device, cfg)
            metrics.update(val_acc=ev["acc"], val_loss=ev["loss"])
        result.history.append(metrics)
        result.epochs_run += 1
        log.info("%s epoch %d/%d: %s", desc, epoch + 1, cfg.epochs, _fmt(metrics))
        if ckpt_path is not None:
            atomic_torch_save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                 "history": result.history, "run_key": run_key},
                ckpt_path,
            )
        if on_epoch is not None:
            on_epoch(metrics)
    clock.finish()
    return result


def _fmt(m: dict[str, float]) -> str:
    keys = ("train_loss", "train_acc", "val_acc", "epoch_s")
    return " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


class _NoBar:
    def advance(self) -> None: ...

    def close(self) -> None: ...


class _RichBar:
    """A transient per-epoch bar on a terminal; log files get one line per epoch instead."""

    def __init__(self, total: int, desc: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), transient=True)
        self._task = self._p.add_task(desc, total=total)
        self._p.start()

    def advance(self) -> None:
        self._p.advance(self._task)

    def close(self) -> None:
        self._p.stop()


def _progress_bar(show: bool, total: int, desc: str) -> _NoBar | _RichBar:
    return _RichBar(total, desc) if show else _NoBar()
