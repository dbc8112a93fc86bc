"""The `kdsearch` command.

User mistakes (a bad spec, missing data, no GPU where one is demanded, an unreadable checkpoint)
print one line naming the problem and the fix and exit with code 2, before any compute starts.

Commands import what they use when they run, never at the top of this module: torch and Ray take
seconds to import, and `--help`, `specs`, `status`, `pareto` and a spec typo must answer at once
(tests/test_cli.py checks that those never import torch or Ray; benchmarks/cli_startup.py times them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .strategy_names import STRATEGY_NAMES

if TYPE_CHECKING:
    from .context import RunContext
    from .spec import Spec

EXIT_USAGE = 2


class UsageError(RuntimeError):
    """A one-line user error raised by a command (exit 2)."""


# (module, class) of the exceptions that are user mistakes: printed as one line, exit 2.
USER_ERRORS = (("kdsearch.spec", "SpecError"), ("kdsearch.checkpoints", "CheckpointError"),
               ("kdsearch.data_checks", "DataError"), ("kdsearch.runtime", "DeviceError"),
               ("kdsearch.status", "RunDirError"), ("kdsearch.imports", "ImportPathError"))


def _loaded(*classes: tuple[str, str]) -> tuple[type[BaseException], ...]:
    """The exception classes among `classes` whose module is imported.

    An exception whose module was never imported cannot have been raised, and importing the module only to
    name the class in an `except` would import torch (checkpoints, runtime, pipeline do) into every command.
    """
    return tuple(getattr(sys.modules[mod], name) for mod, name in classes if mod in sys.modules)


def _user_errors() -> tuple[type[BaseException], ...]:
    return (UsageError, *_loaded(*USER_ERRORS))


def _setup_logging(args: argparse.Namespace) -> None:
    from .context import setup_logging  # kdsearch.context imports torch: only commands that compute get here

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)


def _load(args: argparse.Namespace) -> tuple[Spec, RunContext]:
    from .spec import load_spec, parse_override

    overrides = dict(parse_override(s) for s in args.set or [])
    if getattr(args, "device", None):
        overrides["device"] = args.device  # --device is the spec's device: the Ray tasks resolve it where they run
    spec = load_spec(args.spec, overrides)
    if getattr(args, "py_modules", None):  # --py-modules adds to the spec's own list
        from .spec import parse_spec

        spec = parse_spec(spec.to_dict(), {"py_modules": [*spec.py_modules, *args.py_modules]})
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / spec.name
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"run directory '{run_dir}' is a file, not a folder; give --run-dir a folder "
                         "(new or one `kdsearch run` made; default runs/<spec name>)")
    # Everything above is torch-free, so a typo is answered at once; the checks below build the student.
    _setup_logging(args)
    from .context import RunContext
    from .data_checks import check_data
    from .raycluster import use_py_modules
    from .spec_checks import check_py_modules, check_spec

    check_py_modules(spec)
    use_py_modules(spec.py_modules)  # the driver imports the user's code as the workers will (check_spec builds it)
    check_spec(spec)
    check_data(spec.data)
    if args.address is None:  # a cluster is checked once joined (kdsearch.pipeline)
        from .raycluster import check_device

        check_device(spec.device, None)
    ctx = RunContext.create(run_dir, device=spec.device, address=args.address, py_modules=spec.py_modules)
    return spec, ctx


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    spec, ctx = _load(args)
    summaries = run_pipeline(spec, ctx)
    if args.json:  # for scripts: every stage's summary
        print(json.dumps({"run_dir": str(ctx.run_dir), "stages": _without_history(summaries)}, indent=2, default=str))
        return 0
    from .report import run_answer
    from .tables import stdout_is_terminal

    print(run_answer(ctx.run_dir, rich=stdout_is_terminal()), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .imports import is_import_path
    from .models import is_model
    from .pipeline import check_stages
    from .stages.baselines import student_units
    from .stages.tasks import gather
    from .stages.teachers import train_teachers

    spec, ctx = _load(args)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    spec.save(ctx.run_dir / "spec.yaml")
    out: dict[str, Any]
    if args.distill and args.model != "student":
        raise UsageError("--distill applies to --model student (the KD student)")
    if args.distill and is_import_path(args.distill):
        from .spec_checks import check_strategy

        check_strategy("--distill", args.distill)
    if args.model in ("teachers", "teacher"):
        check_stages(spec, ctx, ["teachers"])
        out = train_teachers(spec, ctx)
    elif args.model == "student":
        check_stages(spec, ctx, ["baselines"])
        refs, pool = student_units(spec, ctx.run_dir, strategies=(args.distill,) if args.distill else (),
                                   scratch=not args.distill)
        try:
            out = gather("train", refs)
        finally:
            if pool is not None:
                pool.shutdown()
    elif is_model(args.model) or is_import_path(args.model):
        from .fp32 import train_float_model
        from .runtime import resolve_device

        teacher = next((t for t in spec.teachers.models if t.arch == args.model), None)
        cfg = spec.teachers.train if teacher else spec.student.train
        path = ctx.run_dir / "models" / f"{args.model}.pt"
        out = train_float_model(spec, args.model, cfg, path, seed=spec.seed, device=resolve_device(ctx.device_request),
                                progress=ctx.progress)
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
    from .pipeline import check_stages
    from .stages.students import selection_markdown, students_stage

    spec, ctx = _load(args)
    if not spec.student.candidates:
        raise UsageError("the spec names no student.candidates; add e.g. candidates: [mobilenetv2, resnet18]")
    check_stages(spec, ctx, ["students"])
    print(selection_markdown(students_stage(spec, ctx)))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    spec, ctx = _load(args)
    run_pipeline(spec, ctx, only=("teachers", "baselines", "sensitivity", "search"))
    print(_front_text(ctx.run_dir, brief=False))
    return 0


def _front_text(run_dir: Path, brief: bool, cost: str | None = None) -> str:
    """The current Pareto front as a table (rich on a terminal, markdown otherwise), as `status` shows it;
    `cost` "size" or "bops" (default: the search's own)."""
    from .search.results import CostUnavailable, pareto_table
    from .status import unreadable
    from .tables import FRONT_FORMAT, render_table, stdout_is_terminal

    try:
        front = pareto_table(run_dir, cost=cost)
    except (FileNotFoundError, CostUnavailable) as err:  # its message names the file and what to do
        raise UsageError(str(err)) from None
    except (OSError, ValueError) as err:  # torn or edited (pyarrow's ArrowInvalid is a ValueError)
        raise unreadable(run_dir / "search", err) from None
    if not len(front):
        return "no completed trial on the front yet"
    return render_table(front.drop(columns=["bits"]) if brief else front, FRONT_FORMAT, rich=stdout_is_terminal())


def cmd_pareto(args: argparse.Namespace) -> int:
    from .status import check_run_dir

    print(_front_text(check_run_dir(args.run_dir), brief=args.brief, cost=args.cost))
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
    from .tables import stdout_is_terminal

    print(run_status(args.run_dir, rich=stdout_is_terminal()), end="")
    return 0


def _run_py_modules(run_dir: Path) -> Path:
    """The run's own `py_modules` (from its spec.yaml) importable here: its models may be a user's import paths."""
    from .raycluster import use_py_modules
    from .rundir import RunDir

    use_py_modules(tuple((RunDir(run_dir).spec_dict() or {}).get("py_modules") or ()))
    return run_dir


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .status import check_run_dir

    print(write_report(_run_py_modules(check_run_dir(args.run_dir))))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Ship a finalized model: the packed .kdq file, or ONNX. Default: the model with the best mean validation
    accuracy within the first budget (ties toward the smaller), and of its seeds the one best on validation."""
    import shutil

    import pandas as pd

    from .io import atomic_path
    from .rundir import RunDir
    from .report import shipped_model
    from .status import check_run_dir

    rd = RunDir(_run_py_modules(check_run_dir(args.run_dir)))
    if not rd.final_table.is_file():
        raise UsageError(f"{rd.root} has no finalized models yet; run `kdsearch run SPEC` until the finalize stage")
    df = pd.read_parquet(rd.final_table)
    if args.model:
        if args.model not in set(df["id"]):
            raise UsageError(f"--model '{args.model}' is not a finalized model; choose from "
                             f"{', '.join(dict.fromkeys(df['id']))}")
        model_id = args.model
    else:
        model_id = shipped_model(rd.root)["id"]  # type: ignore[index]
    rows = df[df["id"] == model_id]
    if args.seed is not None:
        rows = rows[rows["seed"] == args.seed]
        if rows.empty:
            raise UsageError(f"--seed {args.seed}: {model_id} was finalized for seeds "
                             f"{', '.join(map(str, df[df['id'] == model_id]['seed']))}")
    r = rows.sort_values(["val_acc", "seed"], ascending=[False, True]).iloc[0]  # validation picks the seed too
    src = rd.final_model(r["id"], int(r["seed"]))
    if args.onnx:
        from .bench import calibration_images
        from .data import load_data
        from .quant import export_onnx, load_quantized
        from .spec import parse_spec

        bundle = load_data(parse_spec(rd.spec_dict()).data)
        try:  # the input shape the file recorded; requantization scales calibrated on validation images
            report = export_onnx(load_quantized(src), args.onnx, calib=calibration_images(bundle))
        except ImportError as err:
            raise UsageError(f"{err}") from None
        print(report.summary())
        dest = Path(args.onnx)
    else:
        dest = Path(args.out or f"{r['id']}.kdq")
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
    print(f"{dest}: {r['id']} seed {int(r['seed'])} ({r['label']}), validation {r['val_acc']:.2f}%, test "
          f"{r['test_acc']:.2f}% (reloaded file), size model {r['size_mb']:.4f} MB, {dest.stat().st_size:,} bytes "
          "on disk")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """ORT latency (int8 vs the FP32 student) and agreement of every finalized model; writes RUN_DIR/bench.json."""
    from .stages.bench import bench_table, run_bench
    from .status import check_run_dir

    import importlib.util

    if args.runs < 1:
        raise UsageError(f"--runs must be at least 1 (got {args.runs})")
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        raise UsageError("kdsearch bench needs ONNX Runtime: pip install 'kdsearch[onnx]'")
    result = run_bench(str(check_run_dir(args.run_dir)), runs=args.runs, address=args.address)
    print(bench_table(result), end="")
    print(f"wrote {Path(args.run_dir) / 'bench.json'}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    spec, ctx = _load(args)
    print(f"{spec.name}: ok (run dir {ctx.run_dir}, device {ctx.device_request}, seeds {list(spec.seeds)})")
    return 0


def cmd_specs(args: argparse.Namespace) -> int:
    from .spec import list_builtin_specs

    print("\n".join(list_builtin_specs()))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import create_model, list_models, model_tags

    for name in list_models(args.tag):
        params = sum(p.numel() for p in create_model(name, num_classes=args.num_classes).parameters())
        print(f"{name:24s} {params / 1e6:8.3f} M  {','.join(model_tags(name))}")
    return 0


def _strategy_arg(text: str) -> str:
    """`--distill`: a built-in strategy or an import path (its import is checked where it is used)."""
    from .imports import check_import_path, is_import_path

    if is_import_path(text):
        try:
            return check_import_path(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    if text not in STRATEGY_NAMES:
        raise argparse.ArgumentTypeError(f"invalid choice: '{text}' (choose from {', '.join(STRATEGY_NAMES)} or an "
                                         "import path package.module:function)")
    return text


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="a built-in spec name (see `kdsearch specs`) or a YAML path")
    p.add_argument("--run-dir", help="run directory (default runs/<spec name>)")
    p.add_argument("--address", help="Ray cluster address; 'auto' joins a cluster started by `ray up`")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the spec's device")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set search.num_trials=8 (repeatable)")
    p.add_argument("--py-modules", action="append", metavar="PATH",
                   help="a package folder (or .whl) of your own code, shipped to every Ray worker (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdsearch", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run every stage that is not done yet (rerun to resume)")
    _spec_args(p)
    p.add_argument("--json", action="store_true", help="print every stage's summary as JSON instead of the table")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("train", help="train teachers or the student from scratch")
    _spec_args(p)
    p.add_argument("--model", default="student", help="'teachers', 'student' or an architecture name")
    p.add_argument("--distill", type=_strategy_arg,  # kdsearch.strategy_names, kdsearch.imports: no torch at start-up
                   help=f"train the student with ensemble KD from the trained teachers, with this strategy "
                        f"({', '.join(STRATEGY_NAMES)} or package.module:function)")
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
    p.add_argument("--cost", choices=["size", "bops"], default=None,
                   help="the front against size (MB) or BOPs (GBOPs); default: the search's own cost")
    p.set_defaults(fn=cmd_pareto, quiet=True)
    p = sub.add_parser("dashboard", help="serve a run's Optuna study with optuna-dashboard (kdsearch[dashboard])")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(fn=cmd_dashboard, quiet=True)
    p = sub.add_parser("status", help="stages done, search progress and the current front of a run")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_status, quiet=True)
    p = sub.add_parser("report", help="regenerate report.md of a run")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("export", help="write a finalized model as a packed .kdq file (or ONNX with QDQ nodes)")
    p.add_argument("run_dir")
    p.add_argument("--model", help="a finalized model id (default: the best on validation within the first size "
                   "and BOPs budgets)")
    p.add_argument("--seed", type=int, help="which seed's file (default: the one best on validation)")
    p.add_argument("--out", help="destination .kdq path (default ./<id>.kdq)")
    p.add_argument("--onnx", metavar="PATH", help="write integer ONNX (QDQ, fused by ONNX Runtime's CPU provider; "
                   "checked) instead")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("bench", help="ONNX Runtime latency (int8 vs FP32) and agreement of the finalized models")
    p.add_argument("run_dir")
    p.add_argument("--runs", type=int, default=1000, help="timed batch-1 runs per model after warm-up (default 1000)")
    p.add_argument("--address", help="Ray cluster address; 'auto' joins a cluster started by `ray up`")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("validate", help="check a spec and its data, without computing anything")
    _spec_args(p)
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("specs", help="list the built-in specs")
    p.set_defaults(fn=cmd_specs, quiet=True)
    p = sub.add_parser("models", help="list the registered architectures")
    p.add_argument("--tag", help="teacher, student or small")
    p.add_argument("--num-classes", type=int, default=10)
    p.set_defaults(fn=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .raycluster import quiet_ray_env  # torch- and ray-free

    quiet_ray_env()  # before any module imports ray
    args = build_parser().parse_args(argv)
    try:
        # Commands that only read files never log; spec commands set logging up in _load once the spec parsed.
        if not getattr(args, "quiet", False) and not hasattr(args, "spec"):
            _setup_logging(args)
        return int(args.fn(args))
    except _user_errors() as err:
        print(f"kdsearch: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except _loaded(("kdsearch.pipeline", "StageFailed"), ("kdsearch.errors", "StageFailed")) as err:
        print(f"kdsearch: stage failed: {err}", file=sys.stderr)
        return 1
    except _loaded(("kdsearch.quant.onnx_fusion", "FusionError")) as err:
        print(f"kdsearch: export refused: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kdsearch: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kdsearch specs | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
