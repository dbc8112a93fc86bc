"""The cluster launcher configs validate against Ray's own cluster-config schema."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTERS = Path(__file__).resolve().parent.parent / "clusters"


def _validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
def test_cluster_config_validates(name):
    cfg = yaml.safe_load((CLUSTERS / name).read_text())
    prepared = _validate(cfg)
    assert any("kdsearch" in cmd for cmd in prepared["setup_commands"])  # the nodes install kdsearch


def test_gpu_cluster_has_cpu_head_and_gpu_workers():
    cfg = yaml.safe_load((CLUSTERS / "gpu.yaml").read_text())
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["node_config"]["InstanceType"].startswith(("m", "c"))
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)


def test_schema_rejects_a_typo():
    cfg = yaml.safe_load((CLUSTERS / "gpu.yaml").read_text())
    cfg["max_wrkers"] = 3
    with pytest.raises(jsonschema.ValidationError):
        _validate(cfg)


def test_every_key_is_commented():
    """Each top-level key of gpu.yaml is explained by a comment line right above it (or its block)."""
    lines = (CLUSTERS / "gpu.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith((" ", "#", "-")) and ":" in line:
            assert lines[i - 1].startswith("#"), f"top-level key without a comment: {line}"
