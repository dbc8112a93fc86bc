"""What the shipped models cost and do in ONNX Runtime's CPU provider: the bodies of `kdsearch bench`'s Ray tasks.

Latency: batch 1, one intra-op and one inter-op thread, sequential execution, ``runs`` timed runs after
``warmup`` untimed ones, median and p90 in milliseconds. The FP32 baseline is the KD student of the same seed
exported as plain float ONNX (ORT folds its BatchNorms and picks its own float kernels), so the speed-up is
int8 against the float model a user would otherwise ship; each integer model is timed round-robin with that
FP32 model in the same task (blocks of 50 runs), and its speed-up is the ratio of those two medians. Each model's
runs are spread over three ORT sessions (pooled; each session's median is recorded too). Agreement: the top-1 class of the integer ONNX model
against the reloaded ``.kdq`` model (PyTorch), on the test split, after both were chosen; the ONNX export's
requantization scales are calibrated on validation images (`calibration_images`), never test.
"""

from __future__ import annotations

import copy
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CALIBRATION_IMAGES = 512
WARMUP_RUNS = 50
BENCH_SESSIONS = 3  # ORT sessions per model, runs spread over them (see `latency`)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_tile")


def cpu_info() -> dict[str, Any]:
    """The CPU model and the flags that decide integer speed (VNNI: int8 dot products in one instruction)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    found = [f for f in CPU_FLAGS if f in flags]
    return {"model": model, "flags": found, "vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
            "logical_cpus": os.cpu_count()}


def _session(path: str | os.PathLike[str], threads: int = 1):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency(paths: str | os.PathLike[str] | dict[str, Any], input_shape: tuple[int, ...], runs: int,
            warmup: int = WARMUP_RUNS, threads: int = 1, block: int = 50, sessions: int = 1) -> dict[str, Any]:
    """Median and p90 milliseconds of one batch-1 inference over ``runs`` timed runs (after ``warmup``).

    Given several models (``{name: path}``), they are timed round-robin in blocks of ``block`` runs, so that
    load drifting on a shared machine hits all of them alike (their ratio is then the number to read); the
    result maps each name to its statistics. Given one path, its statistics. ``sessions`` > 1 spreads each
    model's runs over that many ORT sessions (pooled statistics, and each session's median): one session in
    a Ray worker was seen running 1.6x slower than another of the same model for its whole life.
    """
    named = dict(paths) if isinstance(paths, dict) else {"": paths}
    pool = [(k, i, _session(p, threads)) for k, p in named.items() for i in range(sessions)]
    x = {"input": np.random.default_rng(0).standard_normal((1, *input_shape)).astype(np.float32)}
    target = {(k, i): runs // sessions + (i < runs % sessions) for k, i, _ in pool}
    times: dict[tuple[str, int], list[float]] = {key: [] for key in target}
    for *_, sess in pool:
        for _ in range(warmup):
            sess.run(None, x)
    while any(len(times[key]) < n for key, n in target.items()):
        for k, i, sess in pool:
            for _ in range(min(block, target[(k, i)] - len(times[(k, i)]))):
                t0 = time.perf_counter_ns()
                sess.run(None, x)
                times[(k, i)].append((time.perf_counter_ns() - t0) / 1e6)
    out = {}
    for k in named:
        t = np.concatenate([times[(k, i)] for i in range(sessions)])
        out[k] = {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "runs": int(t.size),
                  "warmup": warmup, "threads": threads}
        if sessions > 1:
            out[k]["session_medians_ms"] = [float(np.median(times[(k, i)])) for i in range(sessions) if times[(k, i)]]
    return out[""] if "" in out else out


def _normalized(bundle: Any, split: Any, idx: torch.Tensor | None = None) -> torch.Tensor:
    from .data import Normalizer

    images = split.images if idx is None else split.images[idx]
    with torch.no_grad():
        return Normalizer.from_bundle(bundle)(images.float())


def calibration_images(bundle: Any, n: int = CALIBRATION_IMAGES) -> torch.Tensor:
    """``n`` validation images spread over the split, normalized as the model sees them (never test images)."""
    total = len(bundle.val)
    if total == 0:
        raise ValueError("the run's validation split is empty: no images to calibrate the ONNX export on")
    idx = torch.linspace(0, total - 1, min(n, total)).round().long().unique()
    return _normalized(bundle, bundle.val, idx)


def _chunks(bundle: Any, split: Any, size: int = 500):  # type: ignore[no-untyped-def]
    for start in range(0, len(split), size):
        idx = torch.arange(start, min(start + size, len(split)))
        yield _normalized(bundle, split, idx), split.labels[idx].numpy()


def export_float_onnx(model: nn.Module, path: str | os.PathLike[str], input_shape: tuple[int, ...]) -> None:
    """A float model as plain ONNX (opset 13, dynamic batch), the FP32 baseline."""
    from .io import atomic_path

    m = copy.deepcopy(model).cpu().eval()
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(m, (torch.zeros(1, *input_shape),), str(tmp), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def _setup(spec_dict: dict[str, Any]):  # type: ignore[no-untyped-def]
    from .context import setup_logging
    from .data import load_data
    from .runtime import set_cpu_threads
    from .spec import parse_spec

    setup_logging()
    set_cpu_threads(1)
    spec = parse_spec(spec_dict)
    return spec, load_data(spec.data)


def bench_fp32_task(spec_dict: dict[str, Any], run_dir: str, seed: int, runs: int, *_deps: Any) -> dict[str, Any]:
    """Ray task body: the seed's FP32 KD student exported as float ONNX, its latency and test accuracy in ORT."""
    from .checkpoints import load_model
    from .raycluster import where
    from .rundir import RunDir

    _, bundle = _setup(spec_dict)
    rd = RunDir(run_dir)
    model, _ = load_model(rd.student("kd", seed))
    path = rd.bench_onnx("fp32", seed)
    export_float_onnx(model, path, bundle.image_shape)
    sess = _session(path)
    correct = sum(int((sess.run(None, {"input": x.numpy()})[0].argmax(1) == y).sum())
                  for x, y in _chunks(bundle, bundle.test))
    return {"seed": seed, "onnx": str(path.relative_to(rd.root)),
            "test_acc_ort": 100.0 * correct / max(1, len(bundle.test)),
            **latency(path, bundle.image_shape, runs, sessions=BENCH_SESSIONS), "node": where()}


def bench_final_task(spec_dict: dict[str, Any], run_dir: str, model_id: str, seed: int, runs: int,
                     *_deps: Any) -> dict[str, Any]:
    """Ray task body: one finalized model exported as integer ONNX (fusion checked), its latency, and the top-1
    agreement of ORT with the reloaded ``.kdq`` model on the test split."""
    from .quant import export_onnx, load_quantized
    from .raycluster import where
    from .rundir import RunDir

    _, bundle = _setup(spec_dict)
    rd = RunDir(run_dir)
    model = load_quantized(rd.final_model(model_id, seed))
    path = rd.bench_onnx(model_id, seed)
    fusion = export_onnx(model, path, calib=calibration_images(bundle))
    sess = _session(path)
    same = ort_correct = torch_correct = 0
    for x, y in _chunks(bundle, bundle.test):
        ort_top1 = sess.run(None, {"input": x.numpy()})[0].argmax(1)
        with torch.no_grad():
            torch_top1 = model(x).argmax(1).numpy()
        same += int((ort_top1 == torch_top1).sum())
        ort_correct += int((ort_top1 == y).sum())
        torch_correct += int((torch_top1 == y).sum())
    n = max(1, len(bundle.test))
    timed = latency({"int8": path, "fp32": rd.bench_onnx("fp32", seed)}, bundle.image_shape, runs,
                    sessions=BENCH_SESSIONS)
    return {"id": model_id, "seed": seed, "onnx": str(path.relative_to(rd.root)), "fusion": fusion.to_dict(),
            "agreement": 100.0 * same / n, "requantized": fusion.requantized, "test_images": len(bundle.test), "test_acc_ort": 100.0 * ort_correct / n,
            "test_acc_kdq": 100.0 * torch_correct / n, **timed["int8"], "fp32_alongside": timed["fp32"],
            "speedup_vs_fp32": timed["fp32"]["median_ms"] / timed["int8"]["median_ms"], "node": where()}
