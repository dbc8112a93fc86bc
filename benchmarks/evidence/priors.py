"""Do the sensitivity priors pay? Hypervolume against trials on a real-image student with 22 quantizable layers.

    python benchmarks/evidence/priors.py [--trials 20] [--seeds 0 1 2] [--settings 6.6:16/8/4 10:8/4/2] [--arms ...]
    python benchmarks/evidence/priors.py --merge runs/pri_a runs/pri_b ...   # the table from runs made apart

On two cores the study runs fastest as one process per seed or setting (each trial is one thread), each with its
own --run-dir; --merge then writes the one table from their runs.json, with each dir's recipe key and a check that
every configuration scored in more than one dir got the same score (a trial is deterministic).

Run from the repo root (CIFAR-10 (JPEG q75 copy) from ../shared/data, the evidence spec's 45k/5k split).

The problem. The student is the committed real-image resnet20 (benchmarks/assets/cifar10_jpeg/resnet20.pt,
22 quantizable layers, first and last pinned at 8 bits, 20 searched). Two settings (compression:bit choices):
  * 6.6:16/8/4, the seed's compression and widths: between uniform 8-bit (4x) and uniform 4-bit (8x), so every
    feasible configuration is mostly 4-bit, a needle in {16, 8, 4}^20 for a sampler that does not know sizes;
  * 10:8/4/2: a mix of 4 and 2 bits, where (unlike 4 bits) a 2-bit layer costs accuracy that short QAT does
    not win back, so which layers keep 4 or 8 bits matters, and a sensitivity table has something to rank.
The teacher for
the trials' KD is the committed wrn_16_2 (val 84.5%). The sensitivity table and priors are kdsearch's own
(`sensitivity.compute_table` on 512 calibration images of the train split, `build_priors`).

The trial. kdsearch's search trial (`kdsearch.qat.qat_finetune`, the recipe of the search and finalize:
calibrated activations, fixed 8-bit and learned sub-8-bit steps, QAT+KD with the spec's KD loss, T=4,
alpha=0.9, BN re-estimation) made short enough for 2 CPU cores x 5 arms x 3 seeds x N trials: one pass over a
fixed, seeded 768-image subset of the train split, scored on a fixed, seeded 1,000-image subset of the
validation split. Nothing reads test. A trial is deterministic
in its configuration (one thread, fixed seeds), so its score is memoised (runs/evidence_priors/trials.json,
kept only while the trial recipe's key, `Problem.recipe`, is unchanged)
and shared by every arm and seed that proposes the same configuration: an arm is charged for each trial it
launches, whether or not another arm paid for it first.

The search. The arms differ only in the sampler and what seeds it, with kdsearch's own `BudgetSearch`
(Optuna under Ray Tune's Searcher API, the hard budget as a constraint, infeasible and repeated samples
skipped without a trial), driven here one trial at a time without Tune (concurrency only adds noise to
a comparison of samplers):
  * random: configurations drawn uniformly from those that fit the budget (`SearchSpace.sample_feasible`:
    rejection sampling over the whole space, as a user's random search under a hard budget would);
  * plain TPE: multivariate TPE, no warm starts;
  * TPE + uniform warm starts: the uniform 16/8/4 configurations the budget admits (only 4-bit here);
  * TPE + sensitivity warm starts: the solver's configurations at 0.8-1.2 x budget, plus the uniform ones;
  * TPE + sensitivity warm starts + exclusions: also never samples a (layer, bits) whose KL exceeds
    `--exclude-above`.
Hypervolume is kdsearch's (`pareto.hypervolume`, reference (0 %, 1.1 x budget)) over the trials completed
so far. Writes benchmarks/results/priors_hypervolume.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ASSETS = ROOT / "benchmarks" / "assets" / "cifar10_jpeg"
TRAIN_IMAGES, VAL_IMAGES = 768, 1000

ARMS = {  # name -> (sampler, sensitivity warm starts, uniform warm starts, exclusions)
    "random": ("random", False, False, False),
    "plain TPE": ("tpe", False, False, False),
    "TPE + uniform warm starts": ("tpe", False, True, False),
    "TPE + sensitivity warm starts": ("tpe", True, True, False),
    "TPE + sensitivity warm starts + exclusions": ("tpe", True, True, True),
}


def problem_spec(exclude_above: float | None):
    from kdsearch.spec import load_spec

    return load_spec(str(HERE / "evidence.yaml"), {
        "name": "evidence_priors", "seeds": [0], "student.arch": "resnet20",
        "teachers.models": [{"arch": "wrn_16_2", "checkpoint": str(ASSETS / "wrn_16_2.pt")}],
        "search.budgets_mb": [1.0], "sensitivity.exclude_above": exclude_above})


class Problem:
    """The student, its data subsets, the teacher and the memoised trial."""

    def __init__(self, run_dir: Path, exclude_above: float | None) -> None:
        from kdsearch.checkpoints import load_model
        from kdsearch.data import Normalizer, load_data
        from kdsearch.distill import InProcessTeachers
        from kdsearch.quant import model_size

        self.spec = problem_spec(exclude_above)
        self.bundle = load_data(self.spec.data)
        gen = torch.Generator().manual_seed(1234)
        train = self.bundle.train.subset(torch.randperm(len(self.bundle.train), generator=gen)[:TRAIN_IMAGES])
        val = self.bundle.val.subset(torch.randperm(len(self.bundle.val), generator=gen)[:VAL_IMAGES])
        self.sub = dataclasses.replace(self.bundle, train=train, val=val)
        self.student, _ = load_model(ASSETS / "resnet20.pt", arch="resnet20")
        self.student.eval()
        teacher, _ = load_model(ASSETS / "wrn_16_2.pt", arch="wrn_16_2")
        self.norm = Normalizer.from_bundle(self.bundle)
        self.teacher = InProcessTeachers({"wrn_16_2": teacher}, self.norm, torch.device("cpu"))
        self.fp32_mb = model_size(self.student).total_mb
        from kdsearch.io import file_digest, stable_hash

        # Everything a trial's score depends on besides its bits: stored scores and finished runs count only
        # under the same key (an edited subset size or trial recipe starts over instead of mixing recipes).
        from kdsearch.qat import recipe_key

        self.recipe = stable_hash({"train_images": TRAIN_IMAGES, "val_images": VAL_IMAGES, "subset_seed": 1234,
                                   "qat_recipe": recipe_key(self.spec),
                                   "data": self.bundle.version, "trial": self.spec.search.trial.model_dump(mode="json"),
                                   "distill": self.spec.distill.model_dump(mode="json"),
                                   "act_bits": self.spec.quant.act_bits, "student": file_digest(ASSETS / "resnet20.pt"),
                                   "teacher": file_digest(ASSETS / "wrn_16_2.pt")})
        self.memo_path = run_dir / "trials.json"
        stored = json.loads(self.memo_path.read_text()) if self.memo_path.is_file() else {}
        self.memo: dict[str, float] = stored.get("trials", {}) if stored.get("recipe") == self.recipe else {}
        self.paid = 0

    def at_budget(self, compression: float, bits: tuple[int, ...]) -> Any:
        """The problem's spec with the search budget FP32 / `compression` (the priors' budget too) and bit choices."""
        from kdsearch.spec import parse_spec

        d = self.spec.to_dict()
        return parse_spec(d | {"search": d["search"] | {"budgets_mb": [round(self.fp32_mb / compression, 6)]},
                               "quant": d["quant"] | {"bits": list(bits)}})

    def accuracy(self, bits: dict[str, int]) -> float:
        """Validation accuracy (%, on the 1,000-image subset) after the search trial's own QAT+KD of `bits`
        (`kdsearch.qat.qat_finetune`: calibration, QAT+KD for one pass over the subset, BN re-estimation)."""
        from kdsearch.io import atomic_write_json
        from kdsearch.qat import qat_finetune

        key = ",".join(f"{n}={bits[n]}" for n in sorted(bits))
        if key not in self.memo:
            cfg = self.spec.search.trial.model_copy(update={"epochs": 1})
            _, res = qat_finetune(self.spec, ASSETS / "resnet20.pt", bits, cfg, device=torch.device("cpu"), seed=0,
                                  teacher=self.teacher, bundle=self.sub, fresh_views=False, desc="priors trial")
            self.memo[key] = float(res["val_acc"])
            self.paid += 1
            atomic_write_json(self.memo_path, {"recipe": self.recipe, "trials": self.memo})
        return self.memo[key]


def sensitivity_priors(problem: Problem, run_dir: Path, spec: Any) -> dict[str, Any]:
    """kdsearch's sensitivity table (measured once, kept in run_dir) and the priors built from it."""
    import pandas as pd

    from kdsearch.io import atomic_to_parquet, atomic_write_json
    from kdsearch.sensitivity import build_priors, compute_table

    tag = "-".join(map(str, spec.quant.bits))
    table_path, meta_path = run_dir / f"sensitivity_{tag}.parquet", run_dir / f"sensitivity_{tag}.json"
    if table_path.is_file() and meta_path.is_file():
        table, meta = pd.read_parquet(table_path), json.loads(meta_path.read_text())
    else:
        table, meta = compute_table(spec, problem.student, torch.device("cpu"))
        atomic_to_parquet(table, table_path)
        atomic_write_json(meta_path, meta)
    return build_priors(spec, table, int(meta["fixed_bytes"]), problem.student)


def run_arm(problem: Problem, spec: Any, priors: dict[str, Any], arm: str, seed: int, trials: int) -> dict[str, Any]:
    """One search of `trials` launched trials; the HV curve is padded with its last value where the searcher
    stopped early (200 over-budget or repeated samples in a row: kdsearch's own give-up rule; the random arm
    draws feasible configurations only, so it never stops early)."""
    from kdsearch.pareto import ACC, SIZE, hypervolume_history, reference_point
    from kdsearch.search import BudgetSearch, make_sampler
    from kdsearch.search.space import build_space, prior_candidates, uniform_configs, warm_start_points

    sampler, sens, uniform, exclude = ARMS[arm]
    starts, excluded = prior_candidates(priors)
    budget = spec.search.budgets_mb[0]
    space = build_space(problem.student, spec.quant, budget, excluded if exclude else None)
    warm = (starts if sens else []) + (uniform_configs(space, spec.quant.bits) if uniform else [])
    points, _ = warm_start_points(space, warm)
    accs, sizes, t0 = [], [], time.perf_counter()
    skipped = 0
    if sampler == "random":
        # A user's random search under a hard budget: configurations drawn uniformly from those that fit
        # (rejection sampling over the whole space), each trained once, in the order drawn.
        for bits in space.sample_feasible(trials, seed=seed):
            accs.append(problem.accuracy(bits))
            sizes.append(space.size_mb(bits))
    else:
        search = BudgetSearch(space, sampler=make_sampler(sampler, seed, trials), trial_epochs=1,
                              points_to_evaluate=points or None)
        for i in range(trials):
            s = search.suggest(f"t{i}")
            if not isinstance(s, dict):
                break
            bits = s["bits"]
            res = {"epoch": 1, ACC: problem.accuracy(bits), SIZE: space.size_mb(bits),
                   "avg_bits": space.avg_bits(bits)}
            search.on_trial_result(f"t{i}", res)
            search.on_trial_complete(f"t{i}", res)
            accs.append(res[ACC])
            sizes.append(res[SIZE])
        skipped = search.skipped["infeasible"]
    hv = hypervolume_history(list(zip(accs, sizes)), reference_point(budget)) if accs else []
    hv += [hv[-1] if hv else 0.0] * (trials - len(hv))
    return {"arm": arm, "seed": seed, "budget_mb": budget, "bits": list(spec.quant.bits), "warm_starts": len(points),
            "val_acc": accs,
            "size_mb": sizes, "launched": len(accs), "hypervolume": hv,
            "infeasible_skipped": skipped, "feasible_fraction": space.feasible_fraction(),
            "seconds": time.perf_counter() - t0}


def summarize(runs: list[dict[str, Any]], trials: int) -> dict[str, Any]:
    at = max(1, round(0.3 * trials))
    out = {}
    for arm in ARMS:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        final = [r["hypervolume"][-1] for r in rs]
        early = [r["hypervolume"][at - 1] for r in rs]
        frac = [e / f if f > 0 else 0.0 for e, f in zip(early, final)]
        best = [max(r["val_acc"], default=float("nan")) for r in rs]
        out[arm] = {"n": len(rs), "final_hv": final, "hv_at_30pct": early, "fraction_at_30pct": frac,
                    "best_val_acc": best, "launched": [r["launched"] for r in rs],
                    "infeasible_skipped": [r["infeasible_skipped"] for r in rs], "curve_mean": [statistics.mean(c) for c in zip(*(r["hypervolume"] for r in rs))]}
    return {"at_trial": at, "arms": out}


def _ms(xs: list[float], nd: int = 3) -> str:
    """mean ± sample sd of the finite values ("-" when none: an arm that launched no trial has no best)."""
    xs = [float(x) for x in xs if x == x]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.{nd}f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.{nd}f}"


def table(summary: dict[str, Any], meta: dict[str, Any], compression: float, budget: float, bits: str) -> str:
    arms = summary["arms"]
    ref = arms.get("random", {}).get("final_hv")
    lines = [f"### Bits {bits}, budget FP32 / {compression:g} = {budget:.4f} MB (resnet20 FP32 {meta['fp32_mb']:.4f} MB), "
             f"{meta['trials']} trials per run, seeds {meta['seeds']}; hypervolume of (val acc %, size MB), "
             "reference (0, 1.1 x budget).", "",
             f"| arm | final HV | HV at trial {summary['at_trial']} (30%) | fraction of final HV at 30% | "
             "best val acc (%) | trials launched | over-budget samples skipped | n |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, a in arms.items():
        lines.append(f"| {arm} | {_ms(a['final_hv'])} | {_ms(a['hv_at_30pct'])} | {_ms(a['fraction_at_30pct'])} | "
                     f"{_ms(a['best_val_acc'], 2)} | {_ms(a['launched'], 1)} | {_ms(a['infeasible_skipped'], 0)} | "
                     f"{a['n']} |")
    if ref:
        lines += ["", "Paired by sampler seed, HV at 30% of the trials minus random's (mean ± sd):"]
        for arm, a in arms.items():
            if arm != "random":
                d = [x - y for x, y in zip(a["hv_at_30pct"], arms["random"]["hv_at_30pct"])]
                sd = statistics.stdev(d) if len(d) > 1 else 0.0
                verdict = "inside the spread" if abs(statistics.mean(d)) <= sd else "beyond the spread"
                lines.append(f"- {arm}: {statistics.mean(d):+.3f} ± {sd:.3f} ({verdict})")
    return "\n".join(lines)


def plot_curves(meta: dict[str, Any], path: Path) -> None:
    """Mean hypervolume against launched trials, one panel per setting, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = meta["budgets"]
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, (setting, b) in zip(axes[0], settings.items()):
        for arm, s in b["arms"].items():
            ax.plot(range(1, len(s["curve_mean"]) + 1), s["curve_mean"], label=f"{arm} (n={s['n']})")
        ax.axvline(b["at_trial"], color="grey", ls=":", lw=1)
        ax.set(title=f"bits {setting.split(':')[1]}, budget FP32/{setting.split(':')[0]}", xlabel="trials launched",
               ylabel="hypervolume (mean over seeds)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merged_runs(dirs: list[Path]) -> dict[str, Any]:
    """The runs of several run dirs, each dir's recipe key, and the check that memoised scores agree across them."""
    runs: list[dict[str, Any]] = []
    keys: dict[str, str] = {}
    scores: dict[str, dict[str, float]] = {}
    for d in dirs:
        memo = json.loads((d / "trials.json").read_text())
        keys[d.name] = memo["recipe"]
        runs += [r for r in json.loads((d / "runs.json").read_text()) if r.get("recipe") == memo["recipe"]]
        for cfg, acc in memo["trials"].items():
            scores.setdefault(cfg, {})[d.name] = float(acc)
    shared = {c: v for c, v in scores.items() if len(v) > 1}
    differing = [{"widths": "/".join(map(str, sorted({int(kv.split("=")[1]) for kv in c.split(",")}, reverse=True))),
                  "scores": v} for c, v in shared.items() if len(set(v.values())) > 1]
    return {"runs": runs, "dirs": keys,
            "memo_check": {"common": len(shared), "equal": len(shared) - len(differing), "differing": differing,
                           "max_abs_diff": max((max(d["scores"].values()) - min(d["scores"].values())
                                                for d in differing), default=0.0)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--settings", nargs="+", default=["6.6:16/8/4", "10:8/4/2"],
                    help="compression:bit choices, e.g. 6.6:16/8/4")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--exclude-above", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "evidence_priors")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "priors_hypervolume"))
    ap.add_argument("--time-one-trial", action="store_true", help="time one uniform 8/4 trial and stop")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="RUN_DIR",
                    help="run no trial: write the table from these run dirs' runs.json (runs made as separate "
                         "processes, e.g. one per seed), listing each one's recipe key and checking that every "
                         "configuration scored in several dirs got the same score")
    a = ap.parse_args()
    from kdsearch.context import setup_logging
    from kdsearch.io import atomic_write_json

    setup_logging()
    torch.set_num_threads(a.threads)
    a.run_dir.mkdir(parents=True, exist_ok=True)
    problem = Problem(a.run_dir, a.exclude_above)
    if a.time_one_trial:
        from kdsearch.quant import BitConfig

        t0 = time.perf_counter()
        acc = problem.accuracy(dict(BitConfig.uniform(problem.student, 4, pin=dict(problem.spec.quant.pin))))
        print(f"uniform 4-bit trial: val {acc:.2f}% in {time.perf_counter() - t0:.1f}s")
        return
    runs_path = a.run_dir / "runs.json"
    runs: list[dict[str, Any]] = json.loads(runs_path.read_text()) if runs_path.is_file() else []
    runs = [r for r in runs if r.get("recipe") == problem.recipe]
    merged = merged_runs(a.merge) if a.merge else None
    if merged is not None:
        runs = merged["runs"]
    meta = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": a.threads},
            "command": " ".join(["python", *sys.argv]), "seeds": a.seeds, "trials": a.trials,
            "data_version": problem.bundle.version, "fp32_mb": problem.fp32_mb, "exclude_above": a.exclude_above,
            "train_images": TRAIN_IMAGES, "val_images": VAL_IMAGES, "budgets": {}}
    texts = ["Priors study: resnet20 student on CIFAR-10 (JPEG q75 copy), 22 quantizable layers (20 searched over "
             "16/8/4, first and last pinned at 8); trial = QAT+KD (wrn_16_2 teacher) for one pass over "
             f"{TRAIN_IMAGES} train images, scored on {VAL_IMAGES} validation images (the same images for every trial)."]
    for setting in a.settings:
        comp_s, bits_s = setting.split(":")
        comp, bits = float(comp_s), tuple(int(b) for b in bits_s.split("/"))
        spec = problem.at_budget(comp, bits)
        budget = spec.search.budgets_mb[0]
        priors = sensitivity_priors(problem, a.run_dir, spec)
        for seed in a.seeds:
            for arm in a.arms:
                if any(r["arm"] == arm and r["seed"] == seed and r.get("budget_mb") == budget
                       and len(r["hypervolume"]) == a.trials for r in runs):
                    continue
                if merged is not None:
                    raise SystemExit(f"--merge: no run of {arm!r}, seed {seed}, budget {budget} MB in {a.merge}")
                r = run_arm(problem, spec, priors, arm, seed, a.trials) | {"recipe": problem.recipe}
                runs = [x for x in runs if not (x["arm"] == arm and x["seed"] == seed
                                                and x.get("budget_mb") == budget)] + [r]
                atomic_write_json(runs_path, runs)
                print(f"1/{comp:g} {arm} s{seed}: {r['launched']} trials, final HV {r['hypervolume'][-1]:.4f} "
                      f"({r['seconds']:.0f}s, {problem.paid} trials paid so far)", flush=True)
        mine = [r for r in runs if r["seed"] in a.seeds and r["arm"] in a.arms and r.get("budget_mb") == budget]
        summary = summarize(mine, a.trials)
        meta["budgets"][setting] = {"budget_mb": budget, **summary, "excluded": priors["excluded"],
                                        "warm_starts": [w["bit_config"] for w in priors["warm_starts"]]}
        texts.append(table(summary, meta, comp, budget, bits_s))
    if merged is not None:
        meta["merged_from"] = merged["dirs"]
        meta["memo_check"] = merged["memo_check"]
        texts.append(f"Merged from {len(merged['dirs'])} run dirs ({', '.join(merged['dirs'])}), recipe keys "
                     f"{sorted(set(merged['dirs'].values()))}; {merged['memo_check']['common']} configurations were "
                     f"scored in more than one of them, {merged['memo_check']['equal']} with the same score"
                     + (f"; the others ({', '.join(d['widths'] for d in merged['memo_check']['differing'])}) differ "
                        f"by at most {merged['memo_check']['max_abs_diff']:.1f} points."
                        if merged["memo_check"]["differing"] else "."))
    plot_curves(meta, Path(a.out + ".png"))
    text = "\n\n".join(texts + [f"Mean hypervolume curves: `{Path(a.out).name}.png`."])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(a.out + ".json"), {**meta, "runs": runs})
    Path(a.out + ".md").write_text(text + f"\n\nMachine: {meta['machine']}; command: `{meta['command']}`; "
                                          f"data version `{meta['data_version']}`.\n")
    print(text)


if __name__ == "__main__":
    main()
