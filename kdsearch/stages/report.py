"""Stage `report`: report.md (and report.html) from the run directory's files; cheap, so it runs whenever its
inputs changed. The rendering is a view (`kdsearch.report`), also used by `kdsearch report RUN_DIR`."""

from __future__ import annotations

from typing import Any

from ..context import RunContext
from ..spec import Spec


def report_stage(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    from ..report import write_report

    return {"report": str(write_report(ctx.run_dir))}
