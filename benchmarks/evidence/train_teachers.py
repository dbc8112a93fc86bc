"""Train the evidence teachers on the CIFAR-10 JPEG copy and keep them as benchmark assets.

    python benchmarks/evidence/train_teachers.py [--threads 1] [--arch resnet20 ...]

Run from the repo root. Each teacher trains with the project's own loop (`kdsearch.train.fit`) on the train split
minus the validation split, is checked on validation every epoch (the test split is read once, at the end, to
report), resumes from its per-epoch checkpoint if interrupted, and is written as a weights-only kdsearch model file
to benchmarks/assets/cifar10_jpeg/<arch>.pt with its metrics, the data version and this command in its metadata.
The evidence spec imports these files through `teachers.models[].checkpoint`, so no later run retrains them.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from kdsearch.checkpoints import provenance, save_model
from kdsearch.data import EvalLoader, Normalizer, TrainLoader, load_data
from kdsearch.models import create_model
from kdsearch.runtime import seed_everything
from kdsearch.spec import load_spec
from kdsearch.recipes import model_seed
from kdsearch.train import FitRun, evaluate, fit

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parent / "assets" / "cifar10_jpeg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(HERE / "teachers.yaml"))
    ap.add_argument("--arch", nargs="*", help="default: every teacher of the spec")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    bundle = load_data(spec.data)
    device = torch.device("cpu")
    norm = Normalizer.from_bundle(bundle)
    val = EvalLoader(bundle.val, batch_size=spec.data.eval_batch_size)
    test = EvalLoader(bundle.test, batch_size=spec.data.eval_batch_size)
    cfg = spec.teachers.train
    for t in spec.teachers.models:
        if args.arch and t.arch not in args.arch:
            continue
        out = ASSETS / f"{t.arch}.pt"
        if out.is_file():
            print(f"{out} exists; delete it to retrain")
            continue
        seed = model_seed(t.arch, spec.seed)
        seed_everything(seed)
        model = create_model(t.arch, num_classes=bundle.num_classes)
        train = TrainLoader(bundle, spec.data, batch_size=cfg.batch_size, seed=seed, device=device)
        t0 = time.time()
        res = fit(model, train, val, FitRun(cfg, normalizer=norm, device=device,
                  ckpt_path=Path("/tmp") / f"kdsearch-evidence-{t.arch}.ckpt", desc=t.arch))
        test_acc = evaluate(model, test, norm, device)["acc"]
        metrics = {"arch": t.arch, "val_acc": res.final["val_acc"], "test_acc": test_acc, "epochs": cfg.epochs,
                   "params": sum(p.numel() for p in model.parameters()), "history": res.history,
                   "train_s_this_call": round(time.time() - t0, 1), "threads": args.threads}
        meta = provenance(spec.to_dict(), data_version=bundle.version, seed=seed, machine=platform.processor() or
                          platform.machine(), command=" ".join(["python", *sys.argv]))
        save_model(out, model, arch=t.arch, num_classes=bundle.num_classes, metrics=metrics, meta=meta)
        (out.with_suffix(".json")).write_text(json.dumps({k: v for k, v in metrics.items()} | {"meta": meta}, indent=1))
        print(f"{t.arch}: val {metrics['val_acc']:.2f}% test {test_acc:.2f}% -> {out}")


if __name__ == "__main__":
    main()
