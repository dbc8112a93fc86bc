"""Student KD steps/s with the three teacher sources side by side: in-process, Ray actor pool, logit cache.

One run, same data, same student, same teachers (at least two, of different sizes). Each source drives
`kdsearch.train.fit` for one epoch per round; a warm-up round (actor start-up, first calls, page-in) is
not counted, then `--repeats` rounds visit the sources in turn so that a shared machine's load drifts
over all of them alike, and the median epoch time gives steps/s. The cache's one-off build time is
reported apart, since a search pays it once and every trial then replays it. Results go to
benchmarks/results/teacher_serving_<host>.json with the machine described.

    python benchmarks/teacher_serving.py --teachers wrn_16_2,resnet20 --student resnet8
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdsearch.data import Normalizer, TrainLoader, load_data  # noqa: E402
from kdsearch.distill import InProcessTeachers, KDLoss, TeacherPool, build_logit_cache  # noqa: E402
from kdsearch.io import atomic_write_json  # noqa: E402
from kdsearch.models import create_model  # noqa: E402
from kdsearch.raycluster import ensure_ray  # noqa: E402
from kdsearch.runtime import resolve_device  # noqa: E402
from kdsearch.spec import DataConfig, TrainConfig  # noqa: E402
from kdsearch.train import FitRun, fit  # noqa: E402


def machine() -> dict[str, object]:
    info: dict[str, object] = {"host": platform.node(), "platform": platform.platform(),
                               "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "torch": str(torch.__version__), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teachers", default="wrn_16_2,resnet20", help="comma-separated architectures (>= 2)")
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--train-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds after the warm-up round")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--actor-cpus", type=float, default=1.0)
    ap.add_argument("--actor-gpus", type=float, default=None, help="default: 1/T of a GPU when one is present")
    ap.add_argument("--lookahead", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    archs = [a for a in args.teachers.split(",") if a]
    if len(archs) < 2:
        ap.error("--teachers needs at least two architectures")
    device = resolve_device(args.device)
    data = DataConfig(dataset="synthetic", num_classes=10, train_size=args.train_size, test_size=64, num_workers=0)
    bundle = load_data(data, seed=0)
    torch.manual_seed(0)
    teachers = {a: create_model(a, num_classes=10).eval() for a in archs}
    params = {a: sum(p.numel() for p in m.parameters()) for a, m in teachers.items()}
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=args.batch_size)
    norm = Normalizer.from_bundle(bundle)
    seed = 11

    def epoch_s(source: object | None, loader: object) -> float:
        """Wall time of one `fit` epoch with `source` (None: plain training, the student's own cost)."""
        torch.manual_seed(1)
        student = create_model(args.student, num_classes=10)
        res = fit(student, loader, None, FitRun(cfg, normalizer=norm, device=device, teacher=source,
                  kd_loss=KDLoss("dynamic") if source is not None else None, progress=False, desc="bench"))
        return res.history[-1]["epoch_s"]

    load_before = os.getloadavg()
    loader = TrainLoader(bundle, data, batch_size=args.batch_size, seed=seed, device=device)
    ensure_ray(None)
    gpus = args.actor_gpus if args.actor_gpus is not None else (1.0 / len(archs) if device.type == "cuda" else 0.0)
    pool = TeacherPool(teachers, bundle.mean, bundle.std, num_cpus=args.actor_cpus, num_gpus=gpus,
                       lookahead=args.lookahead)
    pool.wait_ready()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = build_logit_cache(InProcessTeachers(teachers, norm, device), bundle, data, Path(tmp) / "cache",
                                  key="bench", seed=seed, epochs=1, teachers=archs, device=device)
        build_s = time.perf_counter() - t0
        sources = {
            "student only (no KD)": (None, loader),
            "inprocess": (InProcessTeachers(teachers, norm, device), loader),
            "pool": (pool, loader),
            "cache": (cache, cache.train_loader(bundle, data, batch_size=args.batch_size, device=device)),
        }
        times: dict[str, list[float]] = {k: [] for k in sources}
        for rnd in range(1 + args.repeats):
            for name, (src, ld) in sources.items():
                t = epoch_s(src, ld)
                if rnd > 0:
                    times[name].append(t)
                print(f"round {rnd}{' (warm-up)' if rnd == 0 else ''} {name}: {t:.2f} s/epoch", flush=True)
    pool.shutdown()
    steps = len(loader)
    results = {k: {"steps_per_s": steps / statistics.median(v), "epoch_s": v, "steps": steps} for k, v in times.items()}
    results["cache"]["build_s"] = build_s

    base = results["inprocess"]["steps_per_s"]
    ratios = {k: v["steps_per_s"] / base for k, v in results.items()}
    out = {"benchmark": "teacher_serving", "machine": machine(), "device": str(device),
           "teachers": params, "student": args.student, "train_size": args.train_size,
           "batch_size": args.batch_size, "repeats": args.repeats, "actor_cpus": args.actor_cpus, "actor_gpus": gpus,
           "lookahead": args.lookahead, "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
           "results": results, "speedup_vs_inprocess": ratios,
           "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    print(f"{'source':24s} {'steps/s':>9s} {'x in-process':>13s}")
    for k, v in results.items():
        print(f"{k:24s} {v['steps_per_s']:9.2f} {ratios[k]:13.2f}")
    print(f"cache build (one-off, 1 epoch of {args.train_size} images): {build_s:.1f} s")
    dest = Path(args.out) if args.out else Path(__file__).parent / "results" / f"teacher_serving_{platform.node()}.json"
    atomic_write_json(dest, out)
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
