"""Quantization-aware (distillation) fine-tuning of one bit configuration: the search trials' work and
finalize's longer runs are this one function with different `TrainConfig`s.

The float student is loaded, its layers are swapped for quantized ones (`kdsearch.quant.quantize`), and
the ordinary training loop runs: with a teacher source this is QAT+KD, without it plain QAT. A
`LogitCache` teacher replays its own augmentation stream; otherwise the loader uses the cache's seed too,
so scratch and KD QAT see the same views.
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
    teacher: Any = None, ckpt_path: Path | None = None, bundle: Any = None, progress: bool = False,
    desc: str = "QAT", on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_quantized: Callable[[nn.Module], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """QAT(+KD) of `bit_config` from the float student at `student_path` for `cfg.epochs`.

    Returns the trained quantized model and {acc, history, epochs_run}. `on_quantized` sees the model right
    after the module swap (the search checks its size model there, before any training is paid for).
    """
    from .data import EvalLoader, Normalizer, TrainLoader, load_data
    from .distill import KDLoss, LogitCache, cache_seed
    from .quant import BitConfig, quantize
    from .runtime import seed_everything
    from .train import fit

    bundle = bundle if bundle is not None else load_data(spec.data, seed=spec.seed)
    seed_everything(spec.seed)
    model, _ = load_model(student_path)
    quantize(model, BitConfig(dict(bit_config)).validate(model), act_bits=spec.quant.act_bits)
    if on_quantized is not None:
        on_quantized(model)
    if isinstance(teacher, LogitCache):
        train: Any = teacher.train_loader(bundle, spec.data, batch_size=cfg.batch_size, device=device)
    else:
        train = TrainLoader(bundle, spec.data, batch_size=cfg.batch_size, seed=cache_seed(spec), device=device)
    kd = KDLoss.from_config(spec.distill, label_smoothing=cfg.label_smoothing) if teacher is not None else None
    test = EvalLoader(bundle.test, batch_size=spec.data.eval_batch_size, device=device)
    result = fit(model, train, test, cfg, normalizer=Normalizer.from_bundle(bundle), device=device,
                 ckpt_path=ckpt_path, teacher=teacher, kd_loss=kd, progress=progress, desc=desc, on_epoch=on_epoch)
    return model, {"acc": float(result.final["test_acc"]), "history": result.history, "epochs_run": result.epochs_run}
