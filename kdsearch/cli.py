"""The `kdsearch` command.

User mistakes (a bad spec, missing data, no GPU where one is demanded, an unreadable checkpoint)
print one line naming the problem and the fix and exit with code 2, before any compute starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .context import RunContext, setup_logging
from .pipeline import StageFailed
from .spec import Spec, SpecError, list_builtin_specs, load_spec, parse_override

EXIT_USAGE = 2


class UsageError(RuntimeError):
    """A one-line user error raised by a command (exit 2)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoints import CheckpointError
    from .data import DataError
    from .runtime import DeviceError
    from .status import RunDirError

    return (SpecError, UsageError, CheckpointError, DataError, DeviceError, RunDirError)


def _load(args: argparse.Namespace) -> tuple[Spec, RunContext]:
    overrides = dict(parse_override(s) for s in args.set or [])
    spec = load_spec(args.spec, overrides)
    from .data import check_data
    from .spec_checks import check_spec

    check_spec(spec)
    check_data(spec.data)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / spec.name
    ctx = RunContext.create(run_dir, device=args.device or spec.device, address=args.address)
    return spec, ctx


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    spec, ctx = _load(args)
    summaries = run_pipeline(spec, ctx)
    print(json.dumps({"run_dir": str(ctx.run_dir), "stages": summaries}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .models import is_model
    from .stages.train_models import train_float_model, train_scratch_student, train_teachers

    spec, ctx = _load(args)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    spec.save(ctx.run_dir / "spec.yaml")
    out: dict[str, Any]
    if args.distill and args.model != "student":
        raise UsageError("--distill applies to --model student (the KD student)")
    if args.model in ("teachers", "teacher"):
        out = train_teachers(spec, ctx)
    elif args.model == "student" and args.distill:
        from .stages.baselines import train_kd_student

        out = train_kd_student(spec, ctx, strategy=args.distill)
    elif args.model == "student":
        out = train_scratch_student(spec, ctx)
    elif is_model(args.model):
        teacher = next((t for t in spec.teachers.models if t.arch == args.model), None)
        cfg = spec.teachers.train if teacher else spec.student.train
        path = ctx.run_dir / "models" / f"{args.model}.pt"
        out = train_float_model(spec, args.model, cfg, path, device=ctx.device, progress=ctx.progress)
    else:
        raise UsageError(f"--model '{args.model}' is neither 'teachers', 'student' nor a known architecture "
                         "(see `kdsearch models`)")
    print(json.dumps(_without_history(out), indent=2, default=str))
    return 0


def _without_history(obj: Any) -> Any:
    """Per-epoch histories stay in the metrics JSON files; the terminal gets the summary."""
    if isinstance(obj, dict):
        return {k: _without_history(v) for k, v in obj.items() if k != "history"}
    return obj


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    spec, ctx = _load(args)
    out = run_pipeline(spec, ctx, only=("teachers", "baselines", "sensitivity"))["sensitivity"]
    print(json.dumps(_without_history(out), indent=2, default=str))
    return 0


def cmd_students(args: argparse.Namespace) -> int:
    from .stages.students import selection_markdown, students_stage

    spec, ctx = _load(args)
    if not spec.student.candidates:
        raise UsageError("the spec names no student.candidates; add e.g. candidates: [mobilenetv2, resnet18]")
    print(selection_markdown(students_stage(spec, ctx)))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline
    from .search import pareto_table

    spec, ctx = _load(args)
    run_pipeline(spec, ctx, only=("teachers", "baselines", "sensitivity", "search"))
    print(pareto_table(ctx.run_dir).to_string(index=False))
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    from .search import pareto_table
    from .status import check_run_dir

    front = pareto_table(check_run_dir(args.run_dir))
    cols = [c for c in front.columns if not c.startswith("bits.")] + ([] if args.brief else
                                                                      [c for c in front.columns if c.startswith("bits.")])
    print(front[cols].to_string(index=False) if len(front) else "no completed trial on the front yet")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .search.dashboard import INSTALL_HINT, have_dashboard, serve_dashboard, study_journal
    from .status import check_run_dir

    journal = study_journal(check_run_dir(args.run_dir))
    if not have_dashboard():
        raise UsageError(INSTALL_HINT)
    serve_dashboard(journal, host=args.host, port=args.port)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .status import run_status

    print(run_status(args.run_dir), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .status import check_run_dir

    print(write_report(check_run_dir(args.run_dir)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Ship a finalized model: the packed .kdq file (default: the best one under the first budget), or ONNX."""
    import shutil

    import pandas as pd

    from .io import atomic_path
    from .status import check_run_dir

    run_dir = check_run_dir(args.run_dir)
    table = run_dir / "final" / "final.parquet"
    if not table.is_file():
        raise UsageError(f"{run_dir} has no finalized models yet; run `kdsearch run SPEC` until the finalize stage")
    df = pd.read_parquet(table)
    if args.model:
        row = df[df["id"] == args.model]
        if row.empty:
            raise UsageError(f"--model '{args.model}' is not a finalized model; choose from {', '.join(df['id'])}")
    else:
        best = df[df["roles"].str.contains("best <=", regex=False)]
        row = (best if len(best) else df).sort_values("acc", ascending=False).head(1)
    r = row.iloc[0]
    src = run_dir / "final" / f"{r['id']}.kdq"
    if args.onnx:
        import torch

        from .quant import export_onnx, load_quantized

        try:
            export_onnx(load_quantized(src), args.onnx, torch.zeros(1, 3, 32, 32))
        except ImportError as err:
            raise UsageError(f"{err}") from None
        dest = Path(args.onnx)
    else:
        dest = Path(args.out or f"{r['id']}.kdq")
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
    print(f"{dest}: {r['id']} ({r['label']}), accuracy {r['acc']:.2f}%, size model {r['size_mb']:.4f} MB, "
          f"{dest.stat().st_size:,} bytes on disk")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    spec, ctx = _load(args)
    print(f"{spec.name}: ok (run dir {ctx.run_dir}, device {ctx.device})")
    return 0


def cmd_specs(args: argparse.Namespace) -> int:
    print("\n".join(list_builtin_specs()))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import create_model, list_models, model_tags

    for name in list_models(args.tag):
        params = sum(p.numel() for p in create_model(name, num_classes=args.num_classes).parameters())
        print(f"{name:24s} {params / 1e6:8.3f} M  {','.join(model_tags(name))}")
    return 0


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="a built-in spec name (see `kdsearch specs`) or a YAML path")
    p.add_argument("--run-dir", help="run directory (default runs/<spec name>)")
    p.add_argument("--address", help="Ray cluster address; 'auto' joins a cluster started by `ray up`")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the spec's device")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set search.num_trials=8 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdsearch", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run every stage that is not done yet (rerun to resume)")
    _spec_args(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("train", help="train teachers or the student from scratch")
    _spec_args(p)
    p.add_argument("--model", default="student", help="'teachers', 'student' or an architecture name")
    p.add_argument("--distill", choices=("average", "vote", "dynamic", "entropy"),
                   help="train the student with ensemble KD from the trained teachers, with this strategy")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("sensitivity", help="layer-wise sensitivity table and bit-allocation priors "
                       "(runs the stages before it if needed)")
    _spec_args(p)
    p.set_defaults(fn=cmd_sensitivity)
    p = sub.add_parser("students", help="rank the spec's candidate students by float and quantized accuracy")
    _spec_args(p)
    p.set_defaults(fn=cmd_students)
    p = sub.add_parser("search", help="Ray Tune + Optuna bit-width search (runs the stages before it if needed)")
    _spec_args(p)
    p.set_defaults(fn=cmd_search)
    p = sub.add_parser("pareto", help="print the current Pareto front of a run (works while it searches)")
    p.add_argument("run_dir")
    p.add_argument("--brief", action="store_true", help="leave out the per-layer bit columns")
    p.set_defaults(fn=cmd_pareto)
    p = sub.add_parser("dashboard", help="serve a run's Optuna study with optuna-dashboard (kdsearch[dashboard])")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(fn=cmd_dashboard)
    p = sub.add_parser("status", help="stages done, search progress and the current front of a run")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("report", help="regenerate report.md of a run")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("export", help="write a finalized model as a packed .kdq file (or ONNX with QDQ nodes)")
    p.add_argument("run_dir")
    p.add_argument("--model", help="a finalized model id (default: the best under the first budget)")
    p.add_argument("--out", help="destination .kdq path (default ./<id>.kdq)")
    p.add_argument("--onnx", metavar="PATH", help="write ONNX with QuantizeLinear/DequantizeLinear nodes instead")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("validate", help="check a spec and its data, without computing anything")
    _spec_args(p)
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("specs", help="list the built-in specs")
    p.set_defaults(fn=cmd_specs)
    p = sub.add_parser("models", help="list the registered architectures")
    p.add_argument("--tag", help="teacher, student or small")
    p.add_argument("--num-classes", type=int, default=10)
    p.set_defaults(fn=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Per-epoch log lines from teacher tasks look alike; Ray must not fold them ("repeated 2x"). Set before
    # any module imports ray.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.fn(args))
    except _user_errors() as err:
        print(f"kdsearch: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except StageFailed as err:
        print(f"kdsearch: stage failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kdsearch: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kdsearch specs | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
