"""The search space: one categorical bit-width per quantizable layer, and the exact size of any choice.

The size model (``kdsearch.quant.model_size``) is additive over layers, so it is measured once per model
as a small table (``kdsearch.sensitivity.layer_byte_costs``: fixed bytes + bytes per (layer, bits)) and the
budget check becomes integer arithmetic. That keeps the define-by-run function (``define_space``) cheap
and side-effect free, as Tune needs: it runs on the driver for every sample, and Tune pickles it by
reference (a top-level function bound with ``functools.partial``; no lambdas, no closures).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..quant import layer_inventory
from ..sensitivity.costs import layer_byte_costs, resolve_pins
from ..sensitivity.priors import layer_choices
from ..spec import QuantConfig

CONSTRAINT = "size_over_budget_mb"  # Optuna constraint name: > 0 means infeasible


@dataclass(frozen=True)
class SearchSpace:
    """Allowed bit-widths per layer (model order) with their exact byte costs, and the size budget.

    ``choices[i]`` and ``costs[i]`` are aligned; a layer with one choice (pinned, or every other width
    excluded) is fixed and never shown to the sampler.
    """

    layers: tuple[str, ...]
    choices: tuple[tuple[int, ...], ...]
    costs: tuple[tuple[int, ...], ...]
    fixed_bytes: int
    num_params: int  # the float model's parameters: avg_bits = 8 * bytes / num_params (SizeReport's rule)
    budget_mb: float

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("SearchSpace.layers: the model has no quantizable layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("SearchSpace.layers: layer names must be unique")
        if len(self.choices) != len(self.layers) or len(self.costs) != len(self.layers):
            raise ValueError("SearchSpace.choices/costs: one entry per layer is required")
        for name, ch, co in zip(self.layers, self.choices, self.costs):
            if not ch or len(ch) != len(co) or len(set(ch)) != len(ch):
                raise ValueError(f"SearchSpace.choices[{name!r}]: non-empty, unique, one cost per choice")
        if self.budget_mb <= 0 or self.num_params < 1:
            raise ValueError("SearchSpace.budget_mb and num_params must be positive")

    # -- sizes (pure arithmetic) ------------------------------------------------------------------------
    @property
    def budget_bytes(self) -> int:
        return int(math.floor(self.budget_mb * 1e6 + 1e-6))

    @functools.cached_property
    def _cost_of(self) -> dict[str, dict[int, int]]:
        return {n: dict(zip(ch, co)) for n, ch, co in zip(self.layers, self.choices, self.costs)}

    def size_bytes(self, bits: Mapping[str, int]) -> int:
        """Exactly ``model_size(model, bits).total_bytes`` (tested), for any allowed configuration."""
        try:
            return self.fixed_bytes + sum(self._cost_of[n][int(bits[n])] for n in self.layers)
        except KeyError as err:
            raise ValueError(f"bit config {dict(bits)} is outside the search space ({err})") from None

    def size_mb(self, bits: Mapping[str, int]) -> float:
        return self.size_bytes(bits) / 1e6

    def avg_bits(self, bits: Mapping[str, int]) -> float:
        return 8.0 * self.size_bytes(bits) / self.num_params

    def feasible(self, bits: Mapping[str, int]) -> bool:
        return self.size_bytes(bits) <= self.budget_bytes

    @property
    def min_bytes(self) -> int:
        return self.fixed_bytes + sum(min(c) for c in self.costs)

    # -- structure ---------------------------------------------------------------------------------------
    @property
    def fixed(self) -> dict[str, int]:
        """Layers with a single allowed width (pinned or reduced by exclusions)."""
        return {n: ch[0] for n, ch in zip(self.layers, self.choices) if len(ch) == 1}

    @property
    def searchable(self) -> tuple[str, ...]:
        return tuple(n for n, ch in zip(self.layers, self.choices) if len(ch) > 1)

    @property
    def cardinality(self) -> int:
        return math.prod(len(ch) for ch in self.choices)

    def complete(self, params: Mapping[str, Any]) -> dict[str, int]:
        """The full {layer: bits} from sampled params (fixed layers filled in), in model order."""
        fixed = self.fixed
        return {n: int(fixed[n]) if n in fixed else int(params[n]) for n in self.layers}

    def snap(self, bits: Mapping[str, int]) -> dict[str, int]:
        """Map a configuration into the space: each layer to the narrowest allowed width >= its own
        (a width is excluded for being too sensitive, so round up), else the widest allowed below.

        A warm start computed under other exclusions would otherwise raise at suggest time.
        """
        out = {}
        for n, ch in zip(self.layers, self.choices):
            want = int(bits.get(n, max(ch)))
            up = [b for b in ch if b >= want]
            out[n] = min(up) if up else max(ch)
        return out

    def _draw(self, rng: Any, n: int) -> tuple[Any, Any]:
        """``n`` configurations drawn uniformly from the whole space: (choice indices [n, L], sizes in bytes [n])."""
        import numpy as np

        idx = np.stack([rng.integers(0, len(ch), size=n) for ch in self.choices], axis=1)
        costs = [np.asarray(co, dtype=np.int64) for co in self.costs]
        size = self.fixed_bytes + sum(costs[j][idx[:, j]] for j in range(len(self.layers)))
        return idx, size

    def feasible_fraction(self, samples: int = 200_000, seed: int = 0) -> float:
        """The fraction of the whole space (uniform over every layer's choices) that fits the budget, by sampling."""
        import numpy as np

        _, size = self._draw(np.random.default_rng(seed), samples)
        return float((size <= self.budget_bytes).mean())

    def sample_feasible(self, n: int, seed: int = 0, batch: int = 100_000,
                        max_draws: int = 50_000_000) -> list[dict[str, int]]:
        """``n`` configurations drawn uniformly from the feasible ones (rejection sampling over the whole space).

        What a user's random search under a hard budget does: draw, discard what does not fit, keep drawing.
        Raises ValueError when ``max_draws`` draws found fewer than ``n`` (a space almost nothing of fits).
        """
        import numpy as np

        rng = np.random.default_rng(seed)
        out: list[dict[str, int]] = []
        drawn = 0
        while len(out) < n:
            if drawn >= max_draws:
                raise ValueError(f"sample_feasible: {drawn} draws found {len(out)} of {n} configurations that fit "
                                 f"{self.budget_mb:g} MB")
            idx, size = self._draw(rng, batch)
            drawn += batch
            for row in idx[size <= self.budget_bytes][: n - len(out)]:
                out.append({name: int(self.choices[j][k]) for j, (name, k) in enumerate(zip(self.layers, row))})
        return out

    def enumerate(self) -> Iterable[dict[str, int]]:
        """Every configuration (small spaces only: tests and exhaustive baselines)."""
        import itertools

        for combo in itertools.product(*self.choices):
            yield dict(zip(self.layers, combo))


def build_space(model: nn.Module, quant: QuantConfig, budget_mb: float,
                excluded: Mapping[str, Sequence[int]] | None = None) -> SearchSpace:
    """The space for `model` under the spec's `quant` settings, minus the sensitivity prior's exclusions.

    Pinned layers ("first"/"last"/names) keep their pinned width; every other layer offers
    ``quant.bits`` minus its excluded widths (a layer never loses all of them: the prior keeps each
    layer's least sensitive width, and this function keeps the widest if an outside list removes all).
    """
    names = [info.name for info in layer_inventory(model)]
    pins = resolve_pins(names, quant.pin)
    excluded = {k: [int(b) for b in v] for k, v in (excluded or {}).items()}
    unknown = sorted(set(excluded) - set(names))
    if unknown:
        raise ValueError(f"excluded choices name unknown layers {unknown}; the model's layers are {names}")
    choices = {n: tuple(ch) or (max(quant.bits),) for n, ch in layer_choices(names, quant.bits, pins, excluded).items()}
    fixed, costs = layer_byte_costs(model, choices, quant.act_bits)
    num_params = sum(p.numel() for p in model.parameters())
    space = SearchSpace(tuple(names), tuple(choices[n] for n in names),
                        tuple(tuple(costs[(n, b)] for b in choices[n]) for n in names),
                        int(fixed), int(num_params), float(budget_mb))
    if space.min_bytes > space.budget_bytes:
        raise ValueError(f"search.budgets_mb: {budget_mb} MB is below the smallest reachable size "
                         f"{space.min_bytes / 1e6:.6f} MB for these layers, pins and bit-widths")
    return space


def define_space(trial: Any, space: SearchSpace) -> dict[str, int]:
    """Optuna define-by-run space: one categorical per searchable layer, and the size constraint.

    `trial.set_constraint` stores ``size - budget`` (MB) on the Optuna trial, where constraint-aware
    samplers (TPE's c-TPE, NSGA-II's constrained domination) read it: <= 0 is feasible. Returns the
    full configuration (fixed layers included).
    """
    params = {n: trial.suggest_categorical(n, list(ch)) for n, ch in zip(space.layers, space.choices) if len(ch) > 1}
    bits = space.complete(params)
    trial.set_constraint(CONSTRAINT, (space.size_bytes(bits) - space.budget_bytes) / 1e6)
    return bits


def space_function(space: SearchSpace) -> functools.partial:
    """`define_space` bound to `space`: picklable by reference, as Tune's experiment snapshot needs."""
    return functools.partial(define_space, space=space)


def uniform_configs(space: SearchSpace, widths: Iterable[int]) -> list[dict[str, int]]:
    """Uniform baselines in the space: every free layer at `b` (snapped to what the layer allows)."""
    return [space.snap({n: int(b) for n in space.layers}) for b in widths]


def warm_start_points(space: SearchSpace, candidates: Iterable[Mapping[str, int]]) -> tuple[list[dict[str, int]], int]:
    """Warm starts as sampler params: snapped into the space, de-duplicated, within budget.

    Returns (points, dropped) where `dropped` counts candidates over the budget. The points hold only
    the searchable layers (the ones `define_space` suggests).
    """
    points, seen, dropped = [], set(), 0
    for cand in candidates:
        bits = space.snap(cand)
        if not space.feasible(bits):
            dropped += 1
            continue
        key = tuple(bits[n] for n in space.layers)
        if key in seen:
            continue
        seen.add(key)
        points.append({n: bits[n] for n in space.searchable})
    return points, dropped


def prior_candidates(priors: Mapping[str, Any] | None) -> tuple[list[dict[str, int]], dict[str, list[int]]]:
    """(warm-start bit configs, excluded choices) from a sensitivity stage's priors.json (None: no priors)."""
    if not priors:
        return [], {}
    starts = [dict(r["bit_config"]) for r in priors.get("warm_starts", []) if r.get("bit_config")]
    excluded = {str(k): [int(b) for b in v] for k, v in (priors.get("excluded") or {}).items()}
    return starts, excluded
