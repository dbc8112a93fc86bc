"""QAT train-step overhead: FP32 vs uniform 8-bit vs mixed 8/4 QAT, side by side, on the seed's students.

    python benchmarks/qat_overhead.py                      # CPU default: ~2 min on a 2-core machine
    python benchmarks/qat_overhead.py --steps 15 --batch 64 --threads 0 --compare fused compiled reference
    python benchmarks/qat_overhead.py --device cuda        # bf16 autocast, channels_last

One train step = zero_grad, forward, cross-entropy, backward, SGD step, on a fixed synthetic batch.
Variants are measured round-robin (one step of each per round) so that load drifting on a shared machine
hits all of them alike; the table shows per variant the median wall-clock time, the median CPU time of
this process (robust to other processes' load) and each one's ratio to FP32. "impl" is the
quantizer implementation: "function" (autograd.Function with the LSQ backward written out; the CPU
default), "fused" (torch._fake_quantize_learnable_*; the CUDA default) or "reference" (LSQ's round/clamp
chain under autograd; slow, add it with --compare fused reference). Mixed 8/4 = first and last layer at 8 bits, the
largest layers at 4 until the whole file averages <= 4.8 bits per parameter (the seed's compression).

A second table compares weight-step initialisations (MSE search vs LSQ's 2 mean|w|/sqrt(Qp) vs max|w|/Qp)
by quantization error on the model's weights, for the record behind ``init_weight_step``'s default.
Results: benchmarks/results/qat_overhead_<device>.json, with the machine named.

CPU threads default to 1: on the shared 2-core machine this was developed on, two OpenMP threads competing
with other processes made step times swing 3-10x between rounds (useless ratios), while one thread gave
min and median within a few percent. ``--threads 0`` uses torch's default.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdsearch.io import atomic_write_json  # noqa: E402
from kdsearch.models import create_model  # noqa: E402
from kdsearch.quant import BitConfig, layer_inventory, model_size, quantize  # noqa: E402
from kdsearch.quant.quantizers import LsqWeightQuantizer  # noqa: E402

NUM_CLASSES = {"resnet18": 100, "mobilenetv2": 10}


def mixed_8_4(model: nn.Module, target_avg_bits: float = 4.8) -> BitConfig:
    inv = layer_inventory(model)
    cfg = BitConfig.uniform(inv, 8, pin={"first": 8, "last": 8})
    for info in sorted(inv[1:-1], key=lambda i: -i.params):
        if model_size(model, cfg).avg_bits <= target_avg_bits:
            break
        cfg = cfg.updated({info.name: 4})
    return cfg


def build_variants(
    arch: str, x: torch.Tensor, impl: str, compare: list[str], device: torch.device
) -> dict[str, nn.Module]:
    """fp32, uniform 8 and mixed 8/4 with the default impl, plus mixed 8/4 with each ``compare`` impl."""
    torch.manual_seed(0)
    base = create_model(arch, num_classes=NUM_CLASSES.get(arch, 10)).to(device)
    mixed = mixed_8_4(base)
    plan = [("uniform8", BitConfig.uniform(base, 8), impl), ("mixed8/4", mixed, impl)]
    plan += [("mixed8/4", mixed, other) for other in compare]
    variants = {"fp32": base}
    for label, cfg, which in plan:
        variants[f"{label}[{which}]"] = quantize(copy.deepcopy(base), cfg, calib=x[:8], impl=which)
    return variants


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_round_robin(
    steps: dict[str, object], warmup: int, n: int, device: torch.device
) -> dict[str, tuple[list[float], list[float]]]:
    """Per variant: (wall seconds, process CPU seconds) of each measured step.

    CPU time (all threads of this process) is the robust number on a shared machine: wall time inflates
    with other processes' load, the work this process does does not (OpenMP spin-waits aside).
    """
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in steps}
    for r in range(warmup + n):
        for name, step in steps.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step()  # type: ignore[operator]
            _sync(device)
            if r >= warmup:
                times[name][0].append(time.perf_counter() - t0)
                times[name][1].append(time.process_time() - c0)
    return times


def init_error_table(arch: str, bits_list=(2, 3, 4, 8)) -> list[dict[str, object]]:
    """Relative weight quantization error ||Q(w)-w||^2 / ||w||^2 per init method, summed over layers."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=NUM_CLASSES.get(arch, 10))
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    laplace = [torch.distributions.Laplace(0.0, 1.0).sample(w.shape) for w in weights[:8]]
    rows = []
    for source, ws in (("init weights", weights), ("laplace", laplace)):
        for bits in bits_list:
            row: dict[str, object] = {"arch": arch, "weights": source, "bits": bits}
            for method in ("mse", "lsq", "max"):
                err = norm = 0.0
                for w in ws:
                    q = LsqWeightQuantizer(bits, w.shape[0], "function")
                    q.init_from(w, method)
                    with torch.no_grad():
                        err += float((q(w) - w).pow(2).sum())
                    norm += float(w.pow(2).sum())
                row[method] = err / norm
            rows.append(row)
    return rows


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv2"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=7, help="measured rounds (median over them)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impl", default=None, help="quantizer impl of the main variants (default: what 'auto' picks)")
    ap.add_argument("--compare", nargs="*", default=None,
                    help="other impls to time on mixed 8/4 (default: fused on CPU, function on CUDA)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 0 = torch's default (see the module docstring for why 1)")  # fmt: skip
    ap.add_argument("--no-init-table", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads > 0 and device.type == "cpu":
        torch.set_num_threads(args.threads)
    amp = device.type == "cuda"
    impl = args.impl or ("fused" if device.type == "cuda" else "function")
    compare = args.compare if args.compare is not None else ["function" if impl == "fused" else "fused"]
    results = []
    for arch in args.models:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, NUM_CLASSES.get(arch, 10), (args.batch,), generator=g).to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        variants = build_variants(arch, x, impl, compare, device)
        if device.type == "cuda":
            variants = {k: v.to(memory_format=torch.channels_last) for k, v in variants.items()}
        steps = {k: make_step(v, x, y, amp) for k, v in variants.items()}
        times = time_round_robin(steps, args.warmup, args.steps, device)
        fp32_wall, fp32_cpu = (statistics.median(t) for t in times["fp32"])
        for name, (wall, cpu) in times.items():
            size = model_size(variants[name])
            results.append({
                "arch": arch, "variant": name, "wall_median_s": statistics.median(wall), "wall_min_s": min(wall),
                "cpu_median_s": statistics.median(cpu), "wall_ratio": statistics.median(wall) / fp32_wall,
                "cpu_ratio": statistics.median(cpu) / fp32_cpu, "avg_bits": size.avg_bits, "size_mb": size.total_mb,
                "wall_s": wall, "cpu_s": cpu,
            })  # fmt: skip
    machine = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "load_avg_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    print(f"\nQAT train-step time, batch {args.batch}, {args.steps} rounds (+{args.warmup} warm-up), "
          f"{machine['device']}, {machine['cpu_count']} CPUs, torch {machine['torch']}")  # fmt: skip
    print(f"{'model':<12} {'variant':<20} {'wall s':>7} {'min s':>7} {'x FP32':>7} {'cpu s':>7} {'x FP32':>7} "
          f"{'avg bits':>8} {'MB':>7}")  # fmt: skip
    for r in results:
        print(f"{r['arch']:<12} {r['variant']:<20} {r['wall_median_s']:>7.3f} {r['wall_min_s']:>7.3f} "
              f"{r['wall_ratio']:>7.2f} {r['cpu_median_s']:>7.3f} {r['cpu_ratio']:>7.2f} {r['avg_bits']:>8.2f} "
              f"{r['size_mb']:>7.3f}")  # fmt: skip
    print("wall = median wall-clock seconds per step; cpu = median CPU seconds of this process per step")
    init_rows = [] if args.no_init_table else [row for a in args.models for row in init_error_table(a)]
    if init_rows:
        print("\nweight quantization error ||Q(w)-w||^2/||w||^2 by step init")
        print(f"{'model':<12} {'weights':<13} {'bits':>4} {'mse':>10} {'lsq':>10} {'max':>10}")
        for r in init_rows:
            print(f"{r['arch']:<12} {r['weights']:<13} {r['bits']:>4} {r['mse']:>10.2e} {r['lsq']:>10.2e} {r['max']:>10.2e}")
    report = {"machine": machine, "args": vars(args), "command": " ".join(["python", *sys.argv]),
              "train_step": results, "init_error": init_rows}  # fmt: skip
    out = Path(args.out or Path(__file__).parent / "results" / f"qat_overhead_{device.type}.json")
    atomic_write_json(out, report)
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
