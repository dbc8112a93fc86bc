"""A search's console output (no library noise, no ANSI codes) and where its TensorBoard files go."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _search_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


# ---- a search's console output -------------------------------------------------------------------------------

NOISE = ("Configuration for experiment", "View detailed results here", "To visualize your results with TensorBoard",
         "Checkpoint successfully created", "Restored on", "Token authentication is enabled",
         "A new study created", "Trial status:")


def test_search_console_is_ours_and_tensorboard_files_are_in_the_run_dir(tmp_path) -> None:
    """A small search in a subprocess (output to pipes, not a terminal), with Ray's default token auth."""
    out = tmp_path / "search"
    env = _search_env()
    env.pop("RAY_AUTH_MODE", None)  # Ray's default: token auth, which logs its banner at every ray.init
    env.pop("RAY_COLOR_PREFIX", None)
    env["HOME"] = str(tmp_path / "home")  # Ray keeps the token it generates in ~/.ray
    (tmp_path / "home").mkdir()
    driver = (  # Ray as `kdsearch run` starts it, one line printed by a worker (Ray prefixes it), then the search
        "import ray; from kdsearch.raycluster import ensure_ray; from kdsearch.search.synthetic import main\n"
        "ensure_ray('local', num_cpus=2)\n"
        "ray.get(ray.remote(lambda: print('hello from a worker', flush=True)).remote())\n"
        f"main([{str(out)!r}, '--trials', '3', '--epochs', '2', '--epoch-s', '0.05', '--no-asha'])\n")
    r = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
                       start_new_session=True)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    assert re.search(r"^\(<lambda> pid=\d+\) hello from a worker$", text, re.M), text[-3000:]
    assert "\x1b[" not in text
    assert [n for n in NOISE if n in text] == []
    assert len(re.findall(r"kdsearch\.search: search: trial \d+ \(\w+\) completed", text)) == 3
    assert f"tensorboard --logdir {out}" in text
    events = list((out / "tune").glob("trial_*/events.out.tfevents.*"))
    assert len(events) == 3  # one per launched trial, in the run directory (not Ray's session folder)
