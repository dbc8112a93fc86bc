"""How long the `kdsearch` commands take to answer, side by side with `import torch` and an empty interpreter.

    python benchmarks/cli_startup.py                       # 5 fresh processes per command, ~1-2 min on 2 cores
    python benchmarks/cli_startup.py --repeats 9 --compare-rev c3f76c1   # also the code of another commit

Every command runs in a fresh interpreter (`python -m kdsearch ...`), the commands round-robin (one run of each per
round) so that load drifting on a shared machine hits all of them alike, and the table shows per command the median
and the best wall-clock time, the median CPU time of the child (user + system: robust to other processes' load),
and whether the command imported torch or Ray (one extra run with `python -X importtime`). `--compare-rev` adds the
same commands on the code of another commit (`git archive` into a temporary folder), timed in the same rounds.

`status`, `pareto` and `report` read a run directory made of the files they read (tests/test_cli.py's
`make_run_dir`: spec, manifest, search results; no training), or `--run-dir` a real one.
Results: benchmarks/results/cli_startup.json, with the machine named.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from kdsearch.io import atomic_write_json  # noqa: E402  (torch-free)

GOAL_S = 1.5  # the answer-at-once goal for the commands that need neither torch nor Ray


def commands(run_dir: Path, bad_spec: Path, scratch: Path) -> dict[str, list[str]]:
    """label -> argv after `python`; the two baselines first."""
    cli = ["-m", "kdsearch"]
    return {
        "python -c pass": ["-c", "pass"],
        "python -c 'import torch'": ["-c", "import torch"],
        "kdsearch --help": [*cli, "--help"],
        "kdsearch specs": [*cli, "specs"],
        "kdsearch validate BAD.yaml": [*cli, "validate", str(bad_spec)],
        "kdsearch validate smoke": [*cli, "validate", "smoke", "--run-dir", str(scratch / "run")],
        "kdsearch status RUN": [*cli, "status", str(run_dir)],
        "kdsearch pareto RUN": [*cli, "pareto", str(run_dir)],
        "kdsearch report RUN": [*cli, "report", str(run_dir)],
    }


def run_once(argv: list[str], code_root: Path, importtime: bool = False) -> tuple[float, float, int, str]:
    """(wall s, child CPU s, exit code, stderr) of one fresh `python argv` using the kdsearch under `code_root`."""
    env = {**os.environ, "PYTHONPATH": str(code_root), "COLUMNS": "120"}
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), *argv]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=code_root)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode, err


def heavy_imports(argv: list[str], code_root: Path) -> list[str]:
    """The top-level packages among torch, torchvision, ray that the command imported (python -X importtime)."""
    err = run_once(argv, code_root, importtime=True)[3]
    names = {line.rsplit("|", 1)[1].strip() for line in err.splitlines() if line.startswith("import time:")}
    return sorted(names & {"torch", "torchvision", "ray"})


def export_rev(rev: str, dest: Path) -> Path:
    """The repository's files at `rev`, unpacked into `dest` (read-only use of git: no checkout)."""
    archive = dest / "src.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "archive", rev], cwd=ROOT, stdout=f, check=True)
    with tarfile.open(archive) as tf:
        tf.extractall(dest / "src", filter="data")
    return dest / "src"


def machine() -> dict[str, object]:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": version("torch"),
            "ray": version("ray"), "pandas": version("pandas"), "load_avg_1m_at_start": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per command (default 5)")
    ap.add_argument("--run-dir", type=Path, help="a real run directory for status/pareto/report")
    ap.add_argument("--compare-rev", help="also time the code of this git commit, in the same rounds")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cli_startup.json")
    args = ap.parse_args()

    info = machine()
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        if args.run_dir is None:
            from test_cli import make_run_dir  # the files status/pareto read, written as a search writes them

            (tmp / "rundir").mkdir()
            run_dir = make_run_dir(tmp / "rundir")
        else:
            run_dir = args.run_dir.resolve()
        bad = tmp / "bad.yaml"
        bad.write_text("- a spec must be a mapping, not a list\n")
        cmds = commands(run_dir, bad, tmp)
        codes = {"this tree": ROOT}
        if args.compare_rev:
            codes[args.compare_rev] = export_rev(args.compare_rev, tmp)
        cases = [(label, code) for label in cmds for code in codes
                 if code == "this tree" or label.startswith("kdsearch")]

        heavy = {(label, code): heavy_imports(cmds[label], codes[code]) for label, code in cases}
        walls: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
        cpus: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
        rcs: dict[tuple[str, str], int] = {}
        for _ in range(args.repeats):
            for label, code in cases:
                wall, cpu, rc, _ = run_once(cmds[label], codes[code])
                walls[(label, code)].append(wall)
                cpus[(label, code)].append(cpu)
                rcs[(label, code)] = rc
    info["load_avg_1m_at_end"] = os.getloadavg()[0]

    rows = []
    for label, code in cases:
        w, c = walls[(label, code)], cpus[(label, code)]
        rows.append({"command": label, "code": code, "median_s": statistics.median(w), "min_s": min(w),
                     "cpu_median_s": statistics.median(c), "exit_code": rcs[(label, code)],
                     "imports": heavy[(label, code)], "walls_s": w})
    print(f"{info['platform']}, {info['cpu_count']} CPUs, load {info['load_avg_1m_at_start']:.2f} -> "
          f"{info['load_avg_1m_at_end']:.2f}; {args.repeats} fresh processes per command, round-robin\n")
    print("| command | code | median s | min s | CPU s | exit | imports torch/Ray |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['command']} | {r['code']} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['cpu_median_s']:.2f} | "
              f"{r['exit_code']} | {', '.join(r['imports']) or 'no'} |")

    atomic_write_json(args.out, {"command": "python " + " ".join(sys.argv), "goal_s": GOAL_S, "repeats": args.repeats,
                                 "machine": info, "rows": rows, "date": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
