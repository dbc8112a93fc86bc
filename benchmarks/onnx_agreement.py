"""Where the integer ONNX model and the `.kdq` model disagree: the top-1 agreement, decomposed, on validation images.

    python benchmarks/onnx_agreement.py runs/quant_evidence [--models qat_kd_8.s0 trial_00002.s0 ...]

`kdsearch bench` measures the agreement of ORT's integer model with the reloaded `.kdq` on the test split. This
script asks why it is below 100%, on the validation images that the ONNX export did not calibrate on (never test).
For each finalized model it exports the integer ONNX exactly as the product does (`export_onnx`, calibrated on
`kdsearch.bench.calibration_images`) and scores two graphs against the `.kdq`:

* **as exported**: the integer model ORT runs (every conv fused; `kdsearch bench` checks that);
* **no calibrated requantization**: the same graph without the Quantize/Dequantize pairs whose scale the export
  calibrated (none in the zoo's models since their residual adds are quantized in QAT): a probe, not a runnable
  integer model. What remains is the QAT model's own rounding computed by integer kernels: int32 sums where
  the `.kdq` sums in fp32, which moves a value on a rounding boundary by one code.

Models made before residual adds were quantized in QAT (QAT recipe < 5) were decomposed with a third column,
their adds read in float (benchmarks/results/onnx_agreement.md of commit 0b03e8a): 0.37 of their 0.83 points.
Writes benchmarks/results/onnx_agreement.{json,md} (machine named).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdsearch.bench import _normalized, _session, calibration_images  # noqa: E402
from kdsearch.io import atomic_write_json, atomic_write_text  # noqa: E402

VARIANTS = ("as exported", "no calibrated requantization")


def _producers(graph: Any) -> dict[str, Any]:
    return {o: n for n in graph.node for o in n.output}


def drop_calibrated_pairs(proto: Any) -> int:
    """Bypass the Quantize/Dequantize pairs on the tensors the export calibrated (its ``kdsearch.requantized``
    metadata names them); return how many tensors."""
    from kdsearch.quant.onnx_export import REQUANTIZED_KEY

    meta = {p.key: p.value for p in proto.metadata_props}
    tensors = {n.split(":")[0] for n in json.loads(meta.get(REQUANTIZED_KEY, "[]")) if n.endswith("calibrated scale")}
    prod, k = _producers(proto.graph), 0
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            dq = prod.get(name)
            q = prod.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in tensors:
                node.input[i] = q.input[0]
                k += 1
    return len(tensors) if k else 0


def measure(run_dir: Path, model_id: str, bundle: Any, held: torch.Tensor) -> dict[str, Any]:
    import onnx

    from kdsearch.quant import export_onnx, load_quantized

    model = load_quantized(run_dir / "final" / f"{model_id}.kdq")
    xs = _normalized(bundle, bundle.val, held)
    with torch.no_grad():
        ref = torch.cat([model(c).argmax(1) for c in xs.split(500)]).numpy()
    out: dict[str, Any] = {"id": model_id, "images": int(len(held))}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(model, path, calib=calibration_images(bundle))
        proto = onnx.load(str(path))
        for variant in VARIANTS:
            if variant == VARIANTS[1]:
                out["calibrated_tensors_bypassed"] = drop_calibrated_pairs(proto)
            p = Path(tmp) / f"{len(out)}.onnx"
            onnx.save(proto, str(p))
            sess = _session(p)
            top = np.concatenate([sess.run(None, {"input": c.numpy()})[0].argmax(1) for c in xs.split(500)])
            out[variant] = 100.0 * float((top == ref).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--models", nargs="+", help="final/<id>.kdq stems (default: every model in final.parquet)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "onnx_agreement"))
    a = ap.parse_args()
    from kdsearch.data import load_data
    from kdsearch.runtime import set_cpu_threads
    from kdsearch.spec import load_spec

    set_cpu_threads(1)
    spec = load_spec(str(a.run_dir / "spec.yaml"))
    bundle = load_data(spec.data)
    n = len(bundle.val)
    calib_idx = torch.linspace(0, n - 1, min(512, n)).round().long().unique()  # calibration_images' own indices
    keep = torch.ones(n, dtype=torch.bool)
    keep[calib_idx] = False
    held = torch.nonzero(keep).flatten()
    import pandas as pd

    # the run's finalized models (final.parquet), not every .kdq in final/: a rerun under new inputs leaves the
    # files of configurations it no longer picks
    models = a.models or [Path(f).stem for f in pd.read_parquet(a.run_dir / "final" / "final.parquet")["file"]]
    rows = []
    for mid in models:
        rows.append(measure(a.run_dir, mid, bundle, held))
        print(" | ".join([mid] + [f"{rows[-1][v]:.2f}" for v in VARIANTS]), flush=True)
    means = {v: float(np.mean([r[v] for r in rows])) for v in VARIANTS}
    machine = {"platform": platform.platform(), "python": platform.python_version()}
    atomic_write_json(Path(a.out + ".json"), {"run": a.run_dir.name, "data_version": bundle.version,
                                              "heldout_val_images": int(len(held)), "rows": rows, "means": means,
                                              "machine": machine})
    lines = [f"# Top-1 agreement of ORT's integer model with the `.kdq`, decomposed ({a.run_dir.name})", "",
             f"Command: `python benchmarks/onnx_agreement.py {a.run_dir}`. Images: the {len(held)} validation images "
             "the ONNX export did not calibrate on (never test). Column 2 is a probe, not a runnable integer model: "
             "see the script's docstring.", "",
             "| model | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|"]
    lines += [f"| {r['id']} | " + " | ".join(f"{r[v]:.2f}" for v in VARIANTS) + " |" for r in rows]
    lines += [f"| mean | " + " | ".join(f"{means[v]:.2f}" for v in VARIANTS) + " |", "", f"Machine: {machine}."]
    atomic_write_text(Path(a.out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
