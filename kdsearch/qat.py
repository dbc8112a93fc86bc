"""Quantization-aware (distillation) fine-tuning of one bit configuration: the search trials' work and
finalize's longer runs are this one function with different `TrainConfig`s.

The float student is loaded, its layers are swapped for quantized ones (`kdsearch.quant.quantize`), and
the ordinary training loop runs: with a teacher source this is QAT+KD, without it plain QAT. Scratch and KD
QAT of one seed read the same stream of views (`kdsearch.recipes.train_loader`); validation measures every
epoch, the test split is never read here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import load_model
from .spec import Spec, TrainConfig


def qat_finetune(
    spec: Spec, student_path: Path, bit_config: Mapping[str, int], cfg: TrainConfig, *, device: torch.device,
    seed: int, teacher: Any = None, ckpt_path: Path | None = None, bundle: Any = None, progress: bool = False,
    desc: str = "QAT", on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_quantized: Callable[[nn.Module], None] | None = None, resume_key: str | None = None,
    fresh_views: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """QAT(+KD) of `bit_config` from the float student at `student_path` for `cfg.epochs`, under run seed `seed`.

    Returns the trained quantized model and {val_acc, history, epochs_run}. The loader is the seed's student
    stream (`recipes.train_loader`): with `fresh_views` a cache must cover every epoch (finalize), without it a
    search trial may replay cached epochs. `on_quantized` sees the model right after the module swap (the
    search checks its size model there, before any training is paid for). `resume_key` is the caller's key of
    every input (see `train.fit`).
    """
    from .data import EvalLoader, Normalizer, load_data
    from .distill import KDLoss
    from .quant import BitConfig, quantize
    from .recipes import train_loader
    from .runtime import seed_everything
    from .train import FitRun, fit

    bundle = bundle if bundle is not None else load_data(spec.data)
    seed_everything(seed)
    model, _ = load_model(student_path)
    quantize(model, BitConfig(dict(bit_config)).validate(model), act_bits=spec.quant.act_bits)
    if on_quantized is not None:
        on_quantized(model)
    train = train_loader(spec, bundle, seed, batch_size=cfg.batch_size, device=device, teacher=teacher,
                         epochs=cfg.epochs if fresh_views else None)
    kd = KDLoss.from_config(spec.distill, label_smoothing=cfg.label_smoothing) if teacher is not None else None
    val = EvalLoader(bundle.val, batch_size=spec.data.eval_batch_size, device=device)
    result = fit(model, train, val, FitRun(cfg, normalizer=Normalizer.from_bundle(bundle), device=device,
                 ckpt_path=ckpt_path, teacher=teacher, kd_loss=kd, progress=progress, desc=desc, on_epoch=on_epoch,
                 resume_key=resume_key))
    return model, {"val_acc": float(result.final["val_acc"]), "history": result.history,
                   "epochs_run": result.epochs_run}
