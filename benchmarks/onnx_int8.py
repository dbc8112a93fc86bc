"""Integer ONNX vs FP32 ONNX in ONNX Runtime's CPU provider, on the zoo's small CIFAR nets (random weights).

    python benchmarks/onnx_int8.py                          # resnet8 resnet20 wrn_16_2 mobilenetv2_x0_5 tiny_cnn
    python benchmarks/onnx_int8.py --archs resnet20 --runs 3000

For each architecture: the float model exported as plain ONNX, and the same weights quantized (W8A8, and W4A8 with
the first and last layer at 8 bits; activation steps from a random calibration batch) and exported by
``export_onnx``. Reports ORT's fused operator counts (every conv must be ``QLinearConv``), batch-1 one-thread
latency (median, p90 over ``--runs`` runs after 50 warm-up, FP32 and int8 round-robin in blocks of 50,
`kdsearch.bench.latency`), int8/FP32 ratio, and the
top-1 agreement of the ONNX model with the PyTorch QAT model on random inputs (untrained nets have close logits,
so this is a sanity check; `kdsearch bench` measures agreement on the test split of a real run).
Results: benchmarks/results/onnx_int8.json and .md, with the machine (CPU flags: VNNI or not) named.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdsearch.bench import cpu_info, export_float_onnx, latency  # noqa: E402
from kdsearch.io import atomic_write_json, atomic_write_text  # noqa: E402
from kdsearch.models import create_model  # noqa: E402
from kdsearch.quant import BitConfig, export_onnx, layer_inventory, quantize  # noqa: E402

SHAPE = (3, 32, 32)


def measure(arch: str, weight_bits: int, runs: int, tmp: Path) -> dict:
    import onnxruntime as ort

    torch.manual_seed(0)
    float_model = create_model(arch, num_classes=10).eval()
    model = create_model(arch, num_classes=10).eval()
    model.load_state_dict(float_model.state_dict())
    inv = layer_inventory(model)
    cfg = BitConfig.uniform(inv, weight_bits, pin={inv[0].name: 8, inv[-1].name: 8})
    calib = torch.randn(64, *SHAPE)
    quantize(model, cfg, act_bits=8, calib=calib).eval()
    q_path, f_path = tmp / f"{arch}_w{weight_bits}.onnx", tmp / f"{arch}_fp32.onnx"
    fusion = export_onnx(model, q_path, calib=calib, input_shape=SHAPE)
    export_float_onnx(float_model, f_path, SHAPE)
    timed = latency({"fp32": f_path, "int8": q_path}, SHAPE, runs)  # round-robin: drifting load hits both
    fp32, int8 = timed["fp32"], timed["int8"]
    x = torch.randn(256, *SHAPE)
    y = ort.InferenceSession(str(q_path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        agree = float((y.argmax(1) == model(x).argmax(1).numpy()).mean() * 100)
    return {"arch": arch, "scheme": f"W{weight_bits}A8" + (" (first/last W8)" if weight_bits < 8 else ""),
            "fusion": fusion.to_dict(), "fp32": fp32, "int8": int8, "ratio": int8["median_ms"] / fp32["median_ms"],
            "agreement_random_inputs": agree}


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["resnet8", "resnet20", "wrn_16_2", "mobilenetv2_x0_5", "tiny_cnn"])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "onnx_int8"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            for bits in (8, 4):
                rows.append(measure(arch, bits, args.runs, Path(tmp)))
                r = rows[-1]
                print(f"{arch:18s} {r['scheme']:22s} {r['fusion']['integer_ops']} unfused "
                      f"{len(r['fusion']['float_unfused'])}  fp32 {r['fp32']['median_ms']:.3f} ms  int8 "
                      f"{r['int8']['median_ms']:.3f} ms  ratio {r['ratio']:.2f}", flush=True)
    result = {"machine": cpu_info(), "onnxruntime": ort.__version__, "torch": torch.__version__, "batch": 1,
              "intra_op_num_threads": 1, "runs": args.runs, "rows": rows}
    m = result["machine"]
    md = [f"# Integer ONNX vs FP32 ONNX, ONNX Runtime {ort.__version__} CPU provider", "",
          f"{m['model']}, {'VNNI' if m['vnni'] else 'no VNNI'} ({', '.join(m['flags'])}); batch 1, 1 thread, "
          f"{args.runs} runs after 50 warm-up; random weights (`python benchmarks/onnx_int8.py`).", "",
          "| arch | scheme | QLinearConv | other integer ops | float convs left | FP32 median / p90 ms | "
          "int8 median / p90 ms | int8 / FP32 | agreement, random inputs (%) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ops = {**r["fusion"]["integer_ops"], **r["fusion"]["other_integer_ops"]}
        conv = ops.pop("QLinearConv", 0)
        md.append(f"| {r['arch']} | {r['scheme']} | {conv} | {', '.join(f'{v} {k}' for k, v in ops.items())} | "
                  f"{len(r['fusion']['float_unfused'])} | {r['fp32']['median_ms']:.3f} / {r['fp32']['p90_ms']:.3f} | "
                  f"{r['int8']['median_ms']:.3f} / {r['int8']['p90_ms']:.3f} | {r['ratio']:.2f} | "
                  f"{r['agreement_random_inputs']:.1f} |")
    atomic_write_json(f"{args.out}.json", result)
    atomic_write_text(f"{args.out}.md", "\n".join(md) + "\n")
    print(f"wrote {args.out}.json and .md; mean int8/FP32 ratio {np.mean([r['ratio'] for r in rows]):.2f}")


if __name__ == "__main__":
    main()
