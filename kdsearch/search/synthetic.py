"""Synthetic trials: the search machinery (Tune + Optuna + records + restore) without training a network.

Used by the tests (ASHA pruning, infeasible samples, SIGKILL + restore) and by the overhead benchmark
(zero-work trials). The accuracy of a configuration is a fixed function of its bits: each layer loses
`weight x penalty(bits)` points, and earlier epochs are a little worse, so ASHA has something to prune.

    python -m kdsearch.search.synthetic OUT_DIR --trials 8 --epochs 3 --epoch-s 0.2   # a search in its own Ray
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import atomic_torch_save
from ..pareto import ACC
from .space import SearchSpace
from .trial import run_trial


def synthetic_accuracy(bits: dict[str, int], epoch: int, epochs: int, seed: int = 0) -> float:
    """90 % minus a per-layer penalty that grows as bits shrink, minus a deficit for unfinished training."""
    loss = 0.0
    for name, b in bits.items():
        weight = 0.5 + (zlib.crc32(f"{seed}:{name}".encode()) % 1000) / 1000.0  # fixed per layer and seed
        loss += weight * 2.0 ** (4 - b) if b < 16 else 0.0
    return 90.0 - loss - 5.0 * (1.0 - epoch / epochs)


@dataclass(frozen=True)
class SyntheticPayload:
    trials_dir: str
    space: SearchSpace
    epochs: int
    epoch_s: float = 0.0  # seconds of sleep per epoch (0: zero-work trials)
    seed: int = 0
    fail_at: int = 0  # > 0: the first trial to reach this epoch raises once (FailureConfig retries + resume)


def _synthetic_work(bits: dict[str, int], ckpt_path: Path, on_epoch: Callable[[dict[str, float]], None], *,
                    payload: SyntheticPayload) -> list[dict[str, float]]:
    import torch

    state = torch.load(ckpt_path, weights_only=True) if ckpt_path.is_file() else {"history": []}
    history = list(state["history"])
    for epoch in range(len(history), payload.epochs):
        t0 = time.perf_counter()
        if payload.epoch_s > 0:
            time.sleep(payload.epoch_s)
        if epoch + 1 == payload.fail_at and _first_to_fail(Path(payload.trials_dir) / "failed_once"):
            raise RuntimeError(f"injected failure in epoch {epoch + 1}")
        m = {"epoch": epoch + 1, ACC: synthetic_accuracy(bits, epoch + 1, payload.epochs, payload.seed),
             "epoch_s": time.perf_counter() - t0}
        history.append(m)
        atomic_torch_save({"history": history}, ckpt_path)  # like fit: checkpoint first, then report
        on_epoch(m)
    return history


def _first_to_fail(marker: Path) -> bool:
    """True for exactly one caller across processes (O_EXCL creation of `marker`)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def synthetic_trial(config: dict[str, Any], payload: SyntheticPayload) -> None:
    """Tune function trainable with the same bookkeeping as the QAT trial (top-level, picklable)."""
    run_trial(config, payload.trials_dir, payload.space, functools.partial(_synthetic_work, payload=payload),
              epochs=payload.epochs)


def toy_space(layers: int = 6, budget_fraction: float | None = 0.6, bits: tuple[int, ...] = (8, 4, 2),
              gbops_fraction: float | None = None) -> SearchSpace:
    """A model-free space: layer i holds 1000 * (i + 1) weights and 50,000 * (layers - i) MACs (early layers
    compute most, late layers hold most: size and BOPs disagree), activations at 8 bits; a size budget at
    `budget_fraction` of all-max-bits and/or a BOPs budget at `gbops_fraction` of it (None: no such budget)."""
    names = tuple(f"layer{i}" for i in range(layers))
    costs = tuple(tuple(math.ceil(1000 * (i + 1) * b / 8) + 4 * (i + 1) for b in bits) for i in range(layers))
    bops = tuple(tuple(50_000 * (layers - i) * b * 8 for b in bits) for i in range(layers))
    fixed = 400
    full = fixed + sum(c[0] for c in costs)
    params = sum(1000 * (i + 1) for i in range(layers)) + 100
    return SearchSpace(names, tuple(bits for _ in names), costs, fixed, params,
                       None if budget_fraction is None else budget_fraction * full / 1e6, bops,
                       None if gbops_fraction is None else gbops_fraction * sum(b[0] for b in bops) / 1e9)


def main(argv: list[str] | None = None) -> None:
    """Run a synthetic search in a fresh local Ray (restoring OUT_DIR's experiment when there is one)."""
    import ray

    from ..context import setup_logging
    from ..raycluster import ensure_ray
    from ..spec import SearchConfig
    from .runner import run_search

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--epoch-s", type=float, default=0.2)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--budget-fraction", type=float, default=0.6)
    p.add_argument("--sampler", default="tpe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--no-asha", action="store_true")
    a = p.parse_args(argv)
    setup_logging(logging.INFO)
    ensure_ray("local", num_cpus=a.cpus)  # as `kdsearch run` does: worker output reaches this console
    space = toy_space(a.layers, a.budget_fraction)
    cfg = SearchConfig(budgets_mb=(space.budget_mb,), num_trials=a.trials, trial_epochs=a.epochs, sampler=a.sampler,
                       asha=not a.no_asha, cpus_per_trial=1)
    payload = SyntheticPayload(str(a.out_dir / "trials"), space, a.epochs, a.epoch_s, a.seed)
    summary = run_search(space, cfg, out_dir=a.out_dir, trainable=synthetic_trial, payload=payload, seed=a.seed)
    print({k: summary[k] for k in ("launched", "counts", "hypervolume")}, flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
