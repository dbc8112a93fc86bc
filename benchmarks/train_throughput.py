"""Training throughput (images/s) of kdsearch's real training loop, per student architecture.

Measures `kdsearch.train.fit` end to end (batch augmentation, normalisation, forward, backward,
SGD step) on synthetic CIFAR-shaped data: FP32 everywhere; on a GPU also bf16 autocast and
channels_last. The first epoch is warm-up; the reported number is images / seconds of the later epochs.

    python benchmarks/train_throughput.py [--models resnet18 mobilenetv2] [--images 512] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from kdsearch.data import Normalizer, TrainLoader, load_data
from kdsearch.models import create_model
from kdsearch.spec import DataConfig, TrainConfig
from kdsearch.train import FitRun, fit


def machine() -> dict:
    info = {"platform": platform.platform(), "cpu_count": torch.get_num_threads(), "torch": torch.__version__,
            "host": platform.node()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def measure(arch: str, device: torch.device, images: int, batch: int, bf16: bool, channels_last: bool,
            epochs: int) -> float:
    data = DataConfig(dataset="synthetic", num_classes=10, train_size=images, test_size=16, num_workers=0)
    bundle = load_data(data, seed=0)
    model = create_model(arch, num_classes=10)
    cfg = TrainConfig(epochs=epochs + 1, lr=0.01, batch_size=batch, bf16=bf16, channels_last=channels_last)
    loader = TrainLoader(bundle, data, batch_size=batch, seed=0, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    res = fit(model, loader, None, FitRun(cfg, normalizer=Normalizer.from_bundle(bundle), device=device, progress=False))
    seconds = sum(h["epoch_s"] for h in res.history[1:])  # epoch 1 is warm-up
    return len(loader) * batch * epochs / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv2"])
    ap.add_argument("--images", type=int, default=None, help="images per epoch (default 512 CPU, 8192 GPU)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 64 CPU, 256 GPU)")
    ap.add_argument("--epochs", type=int, default=2, help="measured epochs after one warm-up epoch")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = args.images or (8192 if device.type == "cuda" else 512)
    batch = args.batch or (256 if device.type == "cuda" else 64)
    variants = [("fp32", False, False)]
    if device.type == "cuda":
        variants += [("fp32+channels_last", False, True), ("bf16+channels_last", True, True)]
    rows = []
    for arch in args.models:
        for name, bf16, cl in variants:
            ips = measure(arch, device, images, batch, bf16, cl, args.epochs)
            rows.append({"model": arch, "variant": name, "device": device.type, "batch": batch, "images_per_s": ips})
            print(f"{arch:14s} {name:20s} {device.type:5s} batch {batch:4d}  {ips:10.1f} img/s", flush=True)
    out = Path(args.out or Path(__file__).parent / "results" / f"train_throughput_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "train_throughput", "machine": machine(), "time": time.strftime("%F %T"),
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
