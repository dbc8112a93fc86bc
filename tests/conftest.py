"""Shared fixtures: one real local Ray per test session (not a mock), tiny specs, the offline data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 2 CPUs, started once for the whole session."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cifar_jpeg_archive() -> Path:
    p = SHARED_DATA / "cifar10-jpeg.tar.gz"
    if not p.is_file():
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz is not present")
    return p


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep test runs from writing into ~/.cache: one cache dir per session."""
    cache = tmp_path_factory.getbasetemp() / "kdsearch-cache"
    monkeypatch.setenv("KDSEARCH_CACHE", str(cache))
    monkeypatch.setenv("KDSEARCH_DATA", str(cache / "data"))
