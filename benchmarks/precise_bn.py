"""Why QAT re-estimates BatchNorm before calibrating: stale running statistics and 8-bit activation ranges.

    python benchmarks/precise_bn.py [--steps 4 40]

torchvision's MobileNetV3-Small (BatchNorm momentum 0.01) is trained in float for a few SGD steps on the smoke
spec's synthetic data (256 images), so that its running statistics still lag its weights, as after a short or
fine-tuning run. It is then quantized at 8 bits (weights and activations) and its activation ranges calibrated in
eval mode (`kdsearch.quant.calibrate`, 8 clean training batches), once as they are and once after PreciseBN
(`kdsearch.quant.reestimate_bn` on 16 augmented training batches: what `kdsearch.qat.qat_finetune` does first).
For each: the smallest calibrated activation step, the largest fraction of a quantizer's inputs clipped in
training mode, and the gradient norm of one training-mode step. Writes benchmarks/results/precise_bn.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdsearch.io import atomic_write_json, atomic_write_text  # noqa: E402

CPU = torch.device("cpu")


def measure(steps: int, precise: bool) -> dict[str, Any]:
    from kdsearch.data import Normalizer, TrainLoader, load_data
    from kdsearch.models import create_model
    from kdsearch.qat import augmented_train_batches, clean_train_batches
    from kdsearch.quant import BitConfig, calibrate, quantize, reestimate_bn
    from kdsearch.quant.quantizers import LsqActQuantizer
    from kdsearch.runtime import seed_everything
    from kdsearch.spec import load_spec

    spec = load_spec("smoke", {"data.train_size": 256, "data.test_size": 128})
    bundle = load_data(spec.data)
    seed_everything(0)
    model = create_model("torchvision.models:mobilenet_v3_small", num_classes=10)
    norm = Normalizer.from_bundle(bundle)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = TrainLoader(bundle, spec.data, batch_size=64, seed=0, device=CPU)
    model.train()
    done, epoch = 0, 0
    while done < steps:
        for batch in loader.epoch(epoch):
            loss = torch.nn.functional.cross_entropy(model(norm(batch.images)), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
        epoch += 1
    quantize(model, BitConfig.uniform(model, 8), act_bits=8)
    if precise:
        reestimate_bn(model, augmented_train_batches(spec, bundle, 16, 64, CPU, 7))
    calibrate(model, clean_train_batches(bundle, 8, 64, CPU, 0))
    quantizers = {n: q for n, q in model.named_modules() if isinstance(q, LsqActQuantizer)}
    clipped: dict[str, float] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(mod: LsqActQuantizer, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x, s = inp[0].detach(), float(mod.effective_step())
            qn, qp = mod.qrange
            clipped[name] = float(((x / s > qp) | (x / s < -qn)).float().mean())
        return fn

    handles = [q.register_forward_hook(hook(n)) for n, q in quantizers.items()]
    model.train()
    batch = next(iter(loader.epoch(epoch + 1)))
    torch.nn.functional.cross_entropy(model(norm(batch.images)), batch.labels).backward()
    for h in handles:
        h.remove()
    grad = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    worst = max(clipped, key=clipped.get)  # type: ignore[arg-type]
    return {"float_steps": steps, "precise_bn": precise,
            "smallest_act_step": min(float(q.effective_step()) for q in quantizers.values()),
            "max_clipped_fraction": clipped[worst], "most_clipped": worst, "grad_norm": grad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 40])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "precise_bn"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = [measure(s, p) for s in a.steps for p in (False, True)]
    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    atomic_write_json(Path(a.out + ".json"), {"rows": rows, "machine": machine})
    lines = ["# Stale BatchNorm statistics and 8-bit activation ranges (torchvision MobileNetV3-Small)", "",
             f"Command: `python benchmarks/precise_bn.py --steps {' '.join(map(str, a.steps))}`. See the script's "
             "docstring for the setup.", "",
             "| float SGD steps | PreciseBN before calibration | smallest act. step | max clipped (train mode) | "
             "gradient norm |", "|---|---|---|---|---|"]
    lines += [f"| {r['float_steps']} | {'yes' if r['precise_bn'] else 'no'} | {r['smallest_act_step']:.2e} | "
              f"{100 * r['max_clipped_fraction']:.1f}% | {r['grad_norm']:.3g} |" for r in rows]
    lines += ["", f"Machine: {machine}."]
    atomic_write_text(Path(a.out + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
