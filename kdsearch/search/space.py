"""The search space: one categorical bit-width per quantizable layer, and the exact size and BOPs of any choice.

The size model (``kdsearch.quant.model_size``) is additive over layers, so it is measured once per model
as a small table (``kdsearch.sensitivity.layer_byte_costs``: fixed bytes + bytes per (layer, bits)) and the
budget check becomes integer arithmetic. BOPs (``kdsearch.quant.bops``: MACs x b_w x b_a) are a sum over
layers too, with no fixed part: a BOPs budget is the same integer check on a second table, and when both
budgets are given a configuration must meet both. That keeps the define-by-run function (``define_space``) cheap
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

from ..quant import bops_costs, layer_inventory
from ..sensitivity.costs import layer_byte_costs, residual_add_bytes, resolve_pins
from ..sensitivity.priors import layer_choices
from ..spec import QuantConfig

CONSTRAINT = "size_over_budget_mb"  # Optuna constraint names: > 0 means infeasible
BOPS_CONSTRAINT = "bops_over_budget_gbops"


@dataclass(frozen=True)
class SearchSpace:
    """Allowed bit-widths per layer (model order) with their exact byte and BOPs costs, and the budgets.

    ``choices[i]``, ``costs[i]`` and ``bops[i]`` are aligned; a layer with one choice (pinned, or every other
    width excluded) is fixed and never shown to the sampler. At least one of ``budget_mb`` and ``budget_gbops``
    is given; the search's second objective (``cost``) is size when a size budget is given, else BOPs.
    ``bops`` may be empty (no BOPs known) only without a BOPs budget.
    """

    layers: tuple[str, ...]
    choices: tuple[tuple[int, ...], ...]
    costs: tuple[tuple[int, ...], ...]
    fixed_bytes: int
    num_params: int  # the float model's parameters: avg_bits = 8 * bytes / num_params (SizeReport's rule)
    budget_mb: float | None
    # defaults as class attributes: a space pickled before BOPs existed restores as a size-only space
    bops: tuple[tuple[int, ...], ...] = ()
    budget_gbops: float | None = None
    # the quantized residual adds' steps, in fixed_bytes; a configuration with no integer (<= 8-bit) layer has none
    add_bytes: int = 0

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
        if self.budget_mb is None and self.budget_gbops is None:
            raise ValueError("SearchSpace: give budget_mb, budget_gbops or both")
        if any(b is not None and not b > 0 for b in (self.budget_mb, self.budget_gbops)) or self.num_params < 1:
            raise ValueError("SearchSpace.budget_mb, budget_gbops and num_params must be positive")
        if self.bops and (len(self.bops) != len(self.layers)
                          or any(len(b) != len(ch) for b, ch in zip(self.bops, self.choices))):
            raise ValueError("SearchSpace.bops: one BOPs cost per choice of every layer")
        if self.budget_gbops is not None and not self.bops:
            raise ValueError("SearchSpace.budget_gbops needs the layers' BOPs (bops)")

    # -- sizes (pure arithmetic) ------------------------------------------------------------------------
    @property
    def budget_bytes(self) -> int | None:
        return None if self.budget_mb is None else int(math.floor(self.budget_mb * 1e6 + 1e-6))

    @property
    def budget_bops(self) -> int | None:
        return None if self.budget_gbops is None else int(math.floor(self.budget_gbops * 1e9 + 1e-3))

    @property
    def cost(self) -> str:
        """The search's second objective: "size" (MB) when a size budget is given, else "bops" (GBOPs)."""
        return "size" if self.budget_mb is not None else "bops"

    @property
    def budget(self) -> float:
        """The budget of ``cost``, in its unit (MB or GBOPs)."""
        return float(self.budget_mb if self.cost == "size" else self.budget_gbops)  # type: ignore[arg-type]

    def cost_of(self, bits: Mapping[str, int]) -> float:
        """``bits``' value of the second objective: size in MB or GBOPs."""
        return self.size_mb(bits) if self.cost == "size" else self.gbops(bits)

    @functools.cached_property
    def _cost_of(self) -> dict[str, dict[int, int]]:
        return {n: dict(zip(ch, co)) for n, ch, co in zip(self.layers, self.choices, self.costs)}

    def size_bytes(self, bits: Mapping[str, int]) -> int:
        """Exactly ``model_size(model, bits).total_bytes`` (tested), for any allowed configuration."""
        try:
            total = self.fixed_bytes + sum(self._cost_of[n][int(bits[n])] for n in self.layers)
            return total - (self.add_bytes if all(int(bits[n]) > 8 for n in self.layers) else 0)
        except KeyError as err:
            raise ValueError(f"bit config {dict(bits)} is outside the search space ({err})") from None

    def size_mb(self, bits: Mapping[str, int]) -> float:
        return self.size_bytes(bits) / 1e6

    @functools.cached_property
    def _bops_of(self) -> dict[str, dict[int, int]]:
        return {n: dict(zip(ch, bo)) for n, ch, bo in zip(self.layers, self.choices, self.bops)}

    def bops_total(self, bits: Mapping[str, int]) -> int | None:
        """Exactly ``model_bops(model, bits).total_bops`` (tested); None when the space holds no BOPs."""
        if not self.bops:
            return None
        try:
            return sum(self._bops_of[n][int(bits[n])] for n in self.layers)
        except KeyError as err:
            raise ValueError(f"bit config {dict(bits)} is outside the search space ({err})") from None

    def gbops(self, bits: Mapping[str, int]) -> float:
        total = self.bops_total(bits)
        return math.nan if total is None else total / 1e9

    def avg_bits(self, bits: Mapping[str, int]) -> float:
        return 8.0 * self.size_bytes(bits) / self.num_params

    def violations(self, bits: Mapping[str, int]) -> dict[str, float]:
        """{Optuna constraint name: amount over budget (MB or GBOPs; <= 0 is within)} for each given budget."""
        out = {}
        if self.budget_bytes is not None:
            out[CONSTRAINT] = (self.size_bytes(bits) - self.budget_bytes) / 1e6
        if self.budget_bops is not None:
            out[BOPS_CONSTRAINT] = (self.bops_total(bits) - self.budget_bops) / 1e9  # type: ignore[operator]
        return out

    def feasible(self, bits: Mapping[str, int]) -> bool:
        return (self.budget_bytes is None or self.size_bytes(bits) <= self.budget_bytes) and \
            (self.budget_bops is None or self.bops_total(bits) <= self.budget_bops)  # type: ignore[operator]

    @property
    def min_bytes(self) -> int:
        return self.fixed_bytes + sum(min(c) for c in self.costs)

    @property
    def min_bops(self) -> int | None:
        return sum(min(b) for b in self.bops) if self.bops else None

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


def build_space(model: nn.Module, quant: QuantConfig, budget_mb: float | None,
                excluded: Mapping[str, Sequence[int]] | None = None, *, budget_gbops: float | None = None,
                input_size: Sequence[int] = (3, 32, 32)) -> SearchSpace:
    """The space for `model` under the spec's `quant` settings, minus the sensitivity prior's exclusions.

    Pinned layers ("first"/"last"/names) keep their pinned width; every other layer offers
    ``quant.bits`` minus its excluded widths (a layer never loses all of them: the prior keeps each
    layer's least sensitive width, and this function keeps the widest if an outside list removes all).
    BOPs are counted on one input of ``input_size``, the data's image shape.
    """
    inventory = layer_inventory(model, input_size=input_size)
    names = [info.name for info in inventory]
    pins = resolve_pins(names, quant.pin)
    excluded = {k: [int(b) for b in v] for k, v in (excluded or {}).items()}
    unknown = sorted(set(excluded) - set(names))
    if unknown:
        raise ValueError(f"excluded choices name unknown layers {unknown}; the model's layers are {names}")
    choices = {n: tuple(ch) or (max(quant.bits),) for n, ch in layer_choices(names, quant.bits, pins, excluded).items()}
    fixed, costs = layer_byte_costs(model, choices, quant.act_bits)
    bops = bops_costs(inventory, choices, quant.act_bits)
    num_params = sum(p.numel() for p in model.parameters())
    space = SearchSpace(tuple(names), tuple(choices[n] for n in names),
                        tuple(tuple(costs[(n, b)] for b in choices[n]) for n in names),
                        int(fixed), int(num_params), None if budget_mb is None else float(budget_mb),
                        tuple(tuple(bops[(n, b)] for b in choices[n]) for n in names),
                        None if budget_gbops is None else float(budget_gbops),
                        residual_add_bytes(model, quant.act_bits))
    if space.budget_bytes is not None and space.min_bytes > space.budget_bytes:
        raise ValueError(f"search.budgets_mb: {budget_mb} MB is below the smallest reachable size "
                         f"{space.min_bytes / 1e6:.6f} MB for these layers, pins and bit-widths")
    least = space.min_bops or 0
    if space.budget_bops is not None and least > space.budget_bops:
        raise ValueError(f"search.budgets_gbops: {budget_gbops} GBOPs is below the smallest reachable BOPs "
                         f"{least / 1e9:.6f} GBOPs for these layers, pins, bit-widths and "
                         f"{'x'.join(map(str, input_size))} images")
    return space


def define_space(trial: Any, space: SearchSpace) -> dict[str, int]:
    """Optuna define-by-run space: one categorical per searchable layer, and one constraint per budget.

    `trial.set_constraint` stores ``size - budget`` (MB) and/or ``BOPs - budget`` (GBOPs) on the Optuna trial,
    where constraint-aware samplers (TPE's c-TPE, NSGA-II's constrained domination) read them: a trial is
    feasible when all are <= 0. Returns the full configuration (fixed layers included).
    """
    params = {n: trial.suggest_categorical(n, list(ch)) for n, ch in zip(space.layers, space.choices) if len(ch) > 1}
    bits = space.complete(params)
    for name, over in space.violations(bits).items():
        trial.set_constraint(name, over)
    return bits


def space_function(space: SearchSpace) -> functools.partial:
    """`define_space` bound to `space`: picklable by reference, as Tune's experiment snapshot needs."""
    return functools.partial(define_space, space=space)


def uniform_configs(space: SearchSpace, widths: Iterable[int]) -> list[dict[str, int]]:
    """Uniform baselines in the space: every free layer at `b` (snapped to what the layer allows)."""
    return [space.snap({n: int(b) for n in space.layers}) for b in widths]


def warm_start_points(space: SearchSpace, candidates: Iterable[Mapping[str, int]]) -> tuple[list[dict[str, int]], int]:
    """Warm starts as sampler params: snapped into the space, de-duplicated, within budget.

    Returns (points, dropped) where `dropped` counts candidates over a budget (size or BOPs: a warm start
    solved for one budget kind is dropped here when it breaks the other). The points hold only
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
    """(warm-start bit configs, excluded choices) from a sensitivity stage's priors.json (None: no priors): the
    solver's starts for the size budgets, then for the BOPs budgets."""
    if not priors:
        return [], {}
    starts = [dict(r["bit_config"]) for key in ("warm_starts", "warm_starts_bops")
              for r in priors.get(key, []) if r.get("bit_config")]
    excluded = {str(k): [int(b) for b in v] for k, v in (priors.get("excluded") or {}).items()}
    return starts, excluded
