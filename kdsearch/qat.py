"""Quantization-aware (distillation) fine-tuning of one bit configuration: the search trials' work and
finalize's longer runs are this one function with different `TrainConfig`s; post-training quantization is the
same function with no training.

The recipe, in order (each step's reason is in the function it calls):

1. load the float student, re-estimate its BatchNorm statistics (PreciseBN: calibration below runs on them)
   and swap its layers for quantized ones (`kdsearch.quant.quantize`): weight steps from the float weights
   (MSE per channel), fixed at 8 bits and wider, learned log-steps below;
2. calibrate every activation range on `quant.calib_batches` un-augmented training batches, eval mode
   (`kdsearch.quant.calibrate`); with `train=False` this is post-training quantization (PTQ) and stops here;
3. the ordinary training loop (`kdsearch.train.fit`): QAT+KD with a teacher source, plain QAT without; the
   schedule warms up from 0 to a fraction of the float learning rate (`spec.qat_schedule`);
4. BatchNorm statistics re-estimated with the final weights on `quant.bn_batches` augmented training batches
   (`kdsearch.quant.reestimate_bn`, `augmented_train_batches` says why augmented), then validation measured once
   more: that is the model's number.

Scratch and KD QAT of one seed read the same stream of views (`kdsearch.recipes.train_loader`); validation
measures every epoch, the test split is never read here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import load_model
from .spec import Spec, TrainConfig

RECIPE_VERSION = 5  # 5: the integer graph (int32 biases, one grid per tensor, quantized residual adds); 4: PreciseBN before calibration; part of every QAT model's inputs key: a model made by an older recipe is not reused


def recipe_key(spec: Spec) -> dict[str, Any]:
    """The QAT recipe's own inputs besides the TrainConfig (callers fold it into their resume keys)."""
    from .quant import QUANT_VERSION

    q = spec.quant
    return {"recipe": RECIPE_VERSION, "quant": QUANT_VERSION, "calib_batches": q.calib_batches, "bn_batches": q.bn_batches}


def clean_train_batches(bundle: Any, n_batches: int, batch_size: int, device: torch.device,
                        seed: int) -> Iterator[torch.Tensor]:
    """`n_batches` normalised, un-augmented training batches, a seeded random sample of the train split.

    Never validation or test: calibration and BN statistics are part of training, so they see training images.
    Un-augmented and normalised exactly as evaluation feeds the model, so the ranges and statistics describe
    what the deployed model sees.
    """
    from .data import Normalizer

    norm = Normalizer.from_bundle(bundle).to(device)
    n = min(len(bundle.train), n_batches * batch_size)
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(bundle.train), generator=g)[:n]
    images = bundle.train.images[idx]
    for s in range(0, n, batch_size):
        yield norm(images[s:s + batch_size].to(device)).float()


def augmented_train_batches(spec: Spec, bundle: Any, n_batches: int, batch_size: int, device: torch.device,
                            seed: int) -> Iterator[torch.Tensor]:
    """`n_batches` normalised training batches under the spec's augmentation, a seeded sample of the train split.

    For BatchNorm re-estimation: the running statistics must describe the distribution the network was trained
    on (the augmented views: pad-crop borders and all), as the float student's own statistics do. Measured on the
    evidence student: statistics re-estimated on un-augmented images cost 8-bit PTQ 5 points of validation
    accuracy (73.70% -> 68.52%), because the learned affine parameters expect the augmented statistics.
    """
    from .data import Normalizer, TrainLoader

    norm = Normalizer.from_bundle(bundle).to(device)
    loader = TrainLoader(bundle, spec.data, batch_size=min(batch_size, len(bundle.train)), seed=seed, device=device,
                         drop_last=False)
    for i, batch in enumerate(loader.epoch(0)):
        if i >= n_batches:
            break
        yield norm(batch.images.to(device)).float()


def qat_finetune(
    spec: Spec, student_path: Path, bit_config: Mapping[str, int], cfg: TrainConfig, *, device: torch.device,
    seed: int, teacher: Any = None, ckpt_path: Path | None = None, bundle: Any = None, progress: bool = False,
    desc: str = "QAT", on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_quantized: Callable[[nn.Module], None] | None = None, resume_key: str | None = None,
    fresh_views: bool = True, train: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """QAT(+KD) of `bit_config` from the float student at `student_path` for `cfg.epochs`, under run seed `seed`.

    Returns the quantized model and {val_acc, history, epochs_run, bn_reestimated, val_acc_before_bn}.
    `train=False` is post-training quantization: quantize, calibrate and re-estimate BN, no training. The loader is the
    seed's student stream (`recipes.train_loader`): with `fresh_views` a cache must cover every epoch
    (finalize), without it a search trial may replay cached epochs. `on_quantized` sees the model right after
    calibration (the search checks its size model there, before any training is paid for). `resume_key` is
    the caller's key of every input (see `train.fit`).
    """
    from .data import EvalLoader, Normalizer, load_data
    from .distill import KDLoss
    from .quant import BitConfig, calibrate, quantize, reestimate_bn, strict_fp32
    from .recipes import train_loader
    from .runtime import seed_everything
    from .train import FitRun, evaluate, fit

    bundle = bundle if bundle is not None else load_data(spec.data)
    seed_everything(seed)
    model, _ = load_model(student_path)
    model.to(device)
    if spec.quant.bn_batches > 0:
        # PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", sec. 3) before the ranges are
        # calibrated: calibration runs in eval mode, so it sees the running statistics, and those must describe
        # the student's own final weights. A converged student barely moves. One whose running statistics lag its
        # weights (torchvision's MobileNetV3 averages them with momentum 0.01, so a short or fine-tuned training
        # leaves them near their initial values) otherwise gets 8-bit ranges of 1e-6 in eval mode while training
        # mode's batch statistics give O(1) activations: 93-97% of them clipped, a near-zero batch variance in
        # the next BatchNorm, and a first QAT gradient norm of 2.6e6 (2.2 after re-estimation:
        # benchmarks/results/precise_bn.md). tests/test_qat.py holds this.
        with strict_fp32():
            reestimate_bn(model, augmented_train_batches(spec, bundle, spec.quant.bn_batches, cfg.batch_size, device,
                                                         seed + 104729))
    quantize(model, BitConfig(dict(bit_config)).validate(model), act_bits=spec.quant.act_bits)
    with strict_fp32():
        calibrate(model, clean_train_batches(bundle, spec.quant.calib_batches, cfg.batch_size, device, seed))
    if on_quantized is not None:
        on_quantized(model)
    val = EvalLoader(bundle.val, batch_size=spec.data.eval_batch_size, device=device)
    norm = Normalizer.from_bundle(bundle)
    history: list[dict[str, float]] = []
    epochs_run = 0
    if train:
        loader = train_loader(spec, bundle, seed, batch_size=cfg.batch_size, device=device, teacher=teacher,
                              epochs=cfg.epochs if fresh_views else None)
        kd = KDLoss.from_config(spec.distill, label_smoothing=cfg.label_smoothing) if teacher is not None else None
        result = fit(model, loader, val, FitRun(cfg, normalizer=norm, device=device, ckpt_path=ckpt_path,
                     teacher=teacher, kd_loss=kd, progress=progress, desc=desc, on_epoch=on_epoch,
                     resume_key=resume_key))
        history, epochs_run = result.history, result.epochs_run
        before_bn = float(result.final["val_acc"])
    else:
        before_bn = float(evaluate(model, val, norm, device, cfg)["acc"])
    # PTQ gets the same BN re-estimation as QAT: it is calibration, not training, and "what QAT added" must
    # compare models that differ in the training alone
    val_acc, n_bn = before_bn, 0
    if spec.quant.bn_batches > 0:
        with strict_fp32():
            n_bn = reestimate_bn(model, augmented_train_batches(spec, bundle, spec.quant.bn_batches, cfg.batch_size,
                                                                device, seed + 7919))
        val_acc = float(evaluate(model, val, norm, device, cfg)["acc"])
    return model, {"val_acc": val_acc, "history": history, "epochs_run": epochs_run, "bn_reestimated": n_bn,
                   "val_acc_before_bn": before_bn}
