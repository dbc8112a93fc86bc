"""The one place that knows the layout of a run directory (runs/<name>/).

    rd = RunDir("runs/smoke")
    rd.teacher("resnet20")            # runs/smoke/teachers/resnet20.pt
    rd.student("kd", seed=1)          # runs/smoke/students/s1/kd.pt
    rd.final_model("qat_kd_8", 1)     # runs/smoke/final/qat_kd_8.s1.kdq

Stages, views (status, report, progress) and the CLI ask a `RunDir` for paths and small readers instead of
spelling folder names themselves, so the layout can change in one file. It imports nothing heavy (no torch,
no Ray): a view over a run directory starts at once.

Layout:
    spec.yaml, manifest.json, report.md
    teachers/<arch>.pt, <arch>.json                  trained once, under spec.seeds[0]
    students/s<seed>/{scratch,kd,kd_<strategy>}.pt/.json   one FP32 student per seed and kind
    cache/logits/s<seed>/                            the teachers' logits for seed s's augmented views
    sensitivity/sensitivity.parquet, priors.json, sensitivity.png
    search/ (results.parquet, pareto.parquet, summary.json, pareto.png, trials/, tune/)
    final/<id>.s<seed>.{kdq,json}, final.parquet, progress.json
    <checkpoint stem>.eta.json                       beside a long model's checkpoint: its training estimate
    bench.json, bench/<id>.s<seed>.onnx, bench/fp32.s<seed>.onnx   `kdsearch bench`: ORT latency and agreement
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


ETA_SUFFIX = ".eta.json"  # a model's training estimate, beside its checkpoint (`kdsearch.eta`)


class RunDirError(ValueError):
    """A path that is not a kdsearch run directory; the message is one line naming the fix."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    def __fspath__(self) -> str:
        return str(self.root)

    # -- top level ---------------------------------------------------------------------------------------
    @property
    def spec_file(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def manifest_file(self) -> Path:
        return self.root / "manifest.json"

    @property
    def report_file(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    # -- teachers and students ---------------------------------------------------------------------------
    @property
    def teachers_dir(self) -> Path:
        return self.root / "teachers"

    def teacher(self, arch: str) -> Path:
        return self.teachers_dir / f"{arch.replace(':', '.')}.pt"  # an import path's colon: not in a file name

    @property
    def students_dir(self) -> Path:
        return self.root / "students"

    def student(self, kind: str, seed: int) -> Path:
        """students/s<seed>/<kind>.pt; kind is 'scratch', 'kd' (the spec's strategy) or 'kd_<strategy>'."""
        return self.students_dir / f"s{int(seed)}" / f"{kind}.pt"

    def logit_cache(self, seed: int) -> Path:
        return self.root / "cache" / "logits" / f"s{int(seed)}"

    # -- sensitivity, search, finalize -------------------------------------------------------------------
    @property
    def sensitivity_dir(self) -> Path:
        return self.root / "sensitivity"

    @property
    def priors_file(self) -> Path:
        return self.sensitivity_dir / "priors.json"

    @property
    def search_dir(self) -> Path:
        return self.root / "search"

    @property
    def final_dir(self) -> Path:
        return self.root / "final"

    @property
    def final_table(self) -> Path:
        return self.final_dir / "final.parquet"

    def final_model(self, model_id: str, seed: int, suffix: str = ".kdq") -> Path:
        return self.final_dir / f"{model_id}.s{int(seed)}{suffix}"

    def eta_files(self, stage: str) -> list[Path]:
        """The training estimates of `stage`'s models (none for a stage whose models write none)."""
        d = {"teachers": self.teachers_dir, "baselines": self.students_dir, "finalize": self.final_dir}.get(stage)
        return sorted(d.rglob(f"*{ETA_SUFFIX}")) if d is not None and d.is_dir() else []

    @property
    def bench_file(self) -> Path:
        return self.root / "bench.json"

    def bench_onnx(self, model_id: str, seed: int) -> Path:
        return self.root / "bench" / f"{model_id}.s{int(seed)}.onnx"

    # -- readers -----------------------------------------------------------------------------------------
    def check(self) -> "RunDir":
        """This run directory, or a `RunDirError` saying what is wrong and what to give instead."""
        p = self.root
        fix = "give the folder `kdsearch run SPEC` made (default runs/<spec name>)"
        if not p.exists():
            raise RunDirError(f"run directory '{p}' not found; {fix}")
        if not p.is_dir():
            raise RunDirError(f"'{p}' is a file, not a run directory; {fix}")
        if not (self.manifest_file.is_file() or self.spec_file.is_file()):
            raise RunDirError(f"'{p}' is not a kdsearch run directory (no manifest.json or spec.yaml); {fix}")
        return self

    def manifest(self) -> dict[str, Any]:
        return read_json(self.manifest_file) or {"stages": {}}

    def spec_dict(self) -> dict[str, Any]:
        """The run's frozen spec as a plain dict (spec.yaml, else the manifest's copy); {} when neither exists.

        A spec.yaml that cannot be read, or is not a mapping, is a one-line `RunDirError` (never a traceback)."""
        import yaml

        p = self.spec_file
        if p.is_file():
            try:
                spec = yaml.safe_load(p.read_text()) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
                raise unreadable(p, err) from None
            if not isinstance(spec, dict):
                raise RunDirError(f"{p} is not a spec (a YAML mapping); the run wrote it, so it was changed since: "
                                  "restore it (manifest.json holds a copy) or delete it")
            return spec
        return self.manifest().get("spec") or {}

    def seeds(self) -> list[int]:
        d = self.spec_dict()
        if "seeds" in d:
            return [int(s) for s in d["seeds"]]
        return [int(d.get("seed", 0))]


def unreadable(path: Path, err: BaseException) -> RunDirError:
    """One line for a run file that exists but cannot be read (torn by a copy, edited, no permission)."""
    why = " ".join(str(err).split())[:200]
    return RunDirError(f"cannot read {path} ({type(err).__name__}: {why}); kdsearch writes it atomically, so it "
                       "was damaged outside kdsearch: copy the run directory again or rerun the stage that writes it")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict; {} when it is missing or torn (a view must not crash on a run in progress)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, OSError):
        return {}
