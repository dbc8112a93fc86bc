"""Layer sensitivity: the omegas rank a deliberately fragile layer first, Hutchinson matches the exact
trace, byte costs agree with the size model, and the stage writes its table, priors and plot."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

from kdsearch.checkpoints import save_model
from kdsearch.context import RunContext
from kdsearch.models import create_model
from kdsearch.quant import BitConfig, model_size, quantize
from kdsearch.sensitivity import (
    budget_grid,
    check_costs,
    excluded_choices,
    fake_quant_weight,
    hutchinson_mean_traces,
    layer_byte_costs,
    layer_names,
    omega_kl,
    resolve_pins,
    sensitivity_table,
    warm_starts,
)
from kdsearch.spec import parse_spec
from kdsearch.stages.sensitivity import sensitivity_stage


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = create_model("tiny_cnn", num_classes=10).eval()
    with torch.no_grad():
        m.fc.weight.mul_(4)  # non-trivial logits at initialisation
    return m


def _kill_channel(m: nn.Module) -> None:
    """bn1 channel 0 gets gamma = beta = 0, so conv2's input channel 0 is always 0 (eval mode)."""
    with torch.no_grad():
        m.bn1.weight[0] = 0.0
        m.bn1.bias[0] = 0.0


def _make_fragile(m: nn.Module) -> None:
    """conv2 gets huge weights on its dead input channel: the float function is unchanged, but every
    per-channel step of conv2 must now span the huge weights, so any quantization wipes out its live
    weights: the most sensitive layer by construction."""
    with torch.no_grad():
        m.conv2.weight[:, 0] = 1000.0 * m.conv2.weight[:, 0].sign()


def test_fragile_layer_ranks_most_sensitive():
    m = _tiny()
    x = torch.randn(32, 3, 12, 12)
    y = torch.randint(0, 10, (32,))
    _kill_channel(m)
    with torch.no_grad():
        before = m(x)
        _make_fragile(m)
        assert torch.allclose(m(x), before, atol=1e-5)  # same float function
    names = layer_names(m)
    table, timings = sensitivity_table(m, x, y, {n: [8, 4, 2] for n in names}, hutchinson_samples=8, batch_size=32)
    assert len(table) == 3 * len(names) and timings.to_dict()["total"] > 0
    # KL at every width; the Hessian proxy at 8 and 4 bits. At 2 bits the proxy sees conv2's damage only
    # through its mean curvature, diluted by the dead weights' zero curvature, and puts it level with fc.
    for col, widths in (("omega_kl", (8, 4, 2)), ("omega_hessian", (8, 4))):
        for bits in widths:
            rows = table[table["bits"] == bits]
            top = rows.sort_values(col, ascending=False)["layer"].iloc[0]
            assert top == "conv2", (col, bits, rows[["layer", col]].to_dict("records"))
    # sensitivity grows as bits shrink (per layer, KL)
    for _, rows in table[table["layer"] != "conv2"].groupby("layer"):
        kl = rows.sort_values("bits", ascending=False)["omega_kl"].tolist()
        assert kl[0] <= kl[1] <= kl[2]


def test_omega_kl_restores_weights_and_is_zero_at_float():
    m = _tiny()
    x = torch.randn(16, 3, 16, 16)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    out = omega_kl(m, x, {"conv1": [32, 2], "fc": [32]}, batch_size=8)
    assert out[("conv1", 32)] == 0.0 and out[("fc", 32)] == 0.0 and out[("conv1", 2)] > 0
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_fake_quant_weight_is_what_qat_starts_from():
    m = _tiny()
    ref = {n: fake_quant_weight(m.get_submodule(n).weight, b) for n, b in (("conv2", 4), ("fc", 16), ("conv3", 2))}
    quantize(m, BitConfig({"conv1": 32, "conv2": 4, "conv3": 2, "fc": 16}), act_bits=8)
    for name, w in ref.items():
        assert torch.allclose(m.get_submodule(name).quantized_weight(), w), name


def _tiny_mlp_hessian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    w0, w2 = net[0].weight, net[2].weight

    def loss_of(flat):
        a, b = flat[: w0.numel()].view_as(w0), flat[w0.numel():].view_as(w2)
        return nn.functional.cross_entropy(torch.func.functional_call(net, {"0.weight": a, "2.weight": b}, (x,)), y)

    flat = torch.cat([w0.detach().flatten(), w2.detach().flatten()])
    return net, x, y, torch.autograd.functional.hessian(loss_of, flat), w0.numel()


def test_hutchinson_is_the_mean_of_v_hv_per_layer():
    """With the estimator's own Rademacher vectors, the estimate equals the exact (1/S) sum v_l^T (H v)_l / n_l."""
    from kdsearch.sensitivity.measure import _rademacher

    net, x, y, h, n0 = _tiny_mlp_hessian()
    samples, seed = 6, 3
    est = hutchinson_mean_traces(net, x, y, ["0", "2"], samples=samples, seed=seed, batch_size=12)  # 3 batches
    want = torch.zeros(2, dtype=torch.float64)
    for k in range(samples):
        v = _rademacher([net[0].weight.shape, net[2].weight.shape],
                        torch.Generator().manual_seed(seed * 1_000_003 + k), torch.device("cpu"))
        flat = torch.cat([t.flatten() for t in v])
        hv = h @ flat
        want += torch.stack([(hv[:n0] * flat[:n0]).sum(), (hv[n0:] * flat[n0:]).sum()]).double()
    want = want / samples / torch.tensor([n0, h.shape[0] - n0])
    assert [est["0"], est["2"]] == pytest.approx(want.tolist(), rel=1e-4)
    assert hutchinson_mean_traces(net, x, y, ["0", "2"], samples=samples, seed=seed, batch_size=12) == est  # seeded
    assert all(p.requires_grad for p in net.parameters())


def test_hutchinson_converges_to_the_trace():
    net, x, y, h, n0 = _tiny_mlp_hessian()
    est = hutchinson_mean_traces(net, x, y, ["0", "2"], samples=300, seed=0, batch_size=32)
    exact = [float(h.diagonal()[:n0].mean()), float(h.diagonal()[n0:].mean())]
    assert [est["0"], est["2"]] == pytest.approx(exact, rel=0.25)


@pytest.mark.parametrize("act_bits", [8, "same"])
def test_byte_costs_add_up_to_model_size(act_bits):
    m = create_model("resnet8", num_classes=10)
    names = layer_names(m)
    bits = [32, 16, 8, 6, 4, 2]
    fixed, costs = layer_byte_costs(m, {n: bits for n in names}, act_bits)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        cfg = BitConfig({n: bits[int(torch.randint(len(bits), (1,), generator=g))] for n in names})
        assert check_costs(m, cfg, fixed, costs, act_bits) == model_size(m, cfg, act_bits=act_bits).total_bytes
    assert costs[(names[1], 4)] < costs[(names[1], 8)] < costs[(names[1], 16)] < costs[(names[1], 32)]


def test_excluded_choices_and_warm_starts():
    rows = [
        {"layer": "a", "bits": 8, "bytes": 100, "omega_kl": 0.01},
        {"layer": "a", "bits": 4, "bytes": 50, "omega_kl": 0.5},
        {"layer": "a", "bits": 2, "bytes": 25, "omega_kl": 3.0},
        {"layer": "b", "bits": 8, "bytes": 80, "omega_kl": 5.0},  # even 8 bits is above the threshold
        {"layer": "b", "bits": 4, "bytes": 40, "omega_kl": 6.0},
        {"layer": "c", "bits": 8, "bytes": 8, "omega_kl": 9.0},
    ]
    t = pd.DataFrame(rows)
    ex = excluded_choices(t, 1.0, "kl", pinned={"c": 8})
    assert ex == {"a": [2], "b": [4]}  # b keeps its safest width; pinned c is not touched
    assert excluded_choices(t, None) == {}
    assert budget_grid([1e-4], [0.8, 1.2]) == [
        {"base_budget_mb": 1e-4, "multiple": 1.0, "budget_bytes": 100},
        {"base_budget_mb": 1e-4, "multiple": 0.8, "budget_bytes": 80},
        {"base_budget_mb": 1e-4, "multiple": 1.2, "budget_bytes": 120},
    ]
    starts = warm_starts(t, 10, [1e-4, 2e-4], [0.8, 1.2], pinned={"c": 8}, excluded=ex)
    feasible = [s for s in starts if s["feasible"]]
    # the smallest allowed allocation is a@4 + b@8 + c@8 + fixed = 148 bytes
    assert [s["budget_bytes"] for s in starts if not s["feasible"]] == [100, 80, 120]
    assert [(s["budget_bytes"], s["bit_config"]["a"], s["total_bytes"]) for s in feasible] == [
        (200, 8, 198), (160, 4, 148), (240, 8, 198)]
    assert all(s["bit_config"]["a"] != 2 and s["bit_config"]["b"] == 8 for s in feasible)
    assert resolve_pins(["x", "y", "z"], {"first": 8, "last": 4}) == {"x": 8, "z": 4}
    with pytest.raises(ValueError, match="quant.pin"):
        resolve_pins(["x"], {"nope": 8})


def test_every_spec_budget_keeps_its_own_solver_start_when_budgets_share_bytes():
    """Budget 1.2e-4 MB is also budget 1e-4 MB times 1.2: both give 120 bytes. The spec budget must keep its
    own (multiple 1.0) record, which is where the report and finalize look up a budget's solver start; only
    ``around`` multiples that repeat a size already in the grid are dropped."""
    t = pd.DataFrame([{"layer": "a", "bits": b, "bytes": b * 10, "omega_kl": 1.0 / b} for b in (2, 4, 8)])
    grid = budget_grid([1e-4, 1.2e-4], [0.8, 1.2, 1 / 1.2])
    assert [(g["base_budget_mb"], g["multiple"], g["budget_bytes"]) for g in grid] == [
        (1e-4, 1.0, 100), (1e-4, 0.8, 80), (1e-4, 1 / 1.2, 83),  # 1e-4 x 1.2 = 120 B: the second spec budget
        (1.2e-4, 1.0, 120), (1.2e-4, 0.8, 96), (1.2e-4, 1.2, 144),  # 1.2e-4 / 1.2 = 100 B is the first
    ]
    assert budget_grid([1e-4, 1e-4], [0.8]) == budget_grid([1e-4], [0.8])  # a repeated budget: one set of rows
    starts = warm_starts(t, 0, [1e-4, 1.2e-4, 1.0000001e-4], [1.2])  # the third rounds to 100 B as well
    for budget in (1e-4, 1.2e-4, 1.0000001e-4):
        (own,) = [s for s in starts if s["base_budget_mb"] == budget and s["multiple"] == 1.0]
        assert own["feasible"] and own["bit_config"] == {"a": 8} and own["budget_bytes"] <= 120


def _spec(budget_mb: float = 0.02, **sens) -> object:
    return parse_spec({
        "name": "sens", "device": "cpu",
        "data": {"dataset": "synthetic", "num_classes": 10, "train_size": 64, "test_size": 32, "num_workers": 0},
        "teachers": {"models": ["resnet8"]},
        "student": {"arch": "tiny_cnn", "gpus": 0},
        "quant": {"bits": [8, 4, 2], "pin": {"first": 8, "last": 8}},
        "sensitivity": {"calib_size": 32, "hutchinson_samples": 2, **sens},
        "search": {"budgets_mb": [budget_mb]},
    })  # fmt: skip


def test_stage_writes_table_priors_plot_and_reuses(tmp_path, ray_session):
    from kdsearch.errors import StageFailed
    from kdsearch.rundir import RunDir

    spec = _spec(exclude_above=0.5)
    ctx = RunContext.create(tmp_path / "runs" / "sens", device="cpu", progress=False)
    with pytest.raises(StageFailed, match="stage sensitivity: .* failed .*no float student"):
        sensitivity_stage(spec, ctx)
    m = _tiny()
    save_model(RunDir(ctx.run_dir).student("scratch", 0), m, arch="tiny_cnn", num_classes=10)
    out = sensitivity_stage(spec, ctx)
    assert out["node"]["node_id"]  # measured in a Ray task, which says where
    d = ctx.run_dir / "sensitivity"
    table = pd.read_parquet(d / "sensitivity.parquet")
    names = layer_names(m)
    assert out["rows"] == len(table) == 3 * len(names) and not out["reused"]
    assert set(table.columns) >= {"layer", "bits", "params", "bytes", "omega_kl", "omega_hessian", "pinned"}
    assert table.loc[table["pinned"], "layer"].unique().tolist() == [names[0], names[-1]]
    assert (d / "sensitivity.png").stat().st_size > 1000
    priors = json.loads((d / "priors.json").read_text())
    assert priors["pinned"] == {names[0]: 8, names[-1]: 8}
    assert priors["choices"][names[0]] == [8] and priors["layers"] == names
    for n, bad in priors["excluded"].items():
        assert priors["choices"][n] == [b for b in (8, 4, 2) if b not in bad]
    for s in priors["warm_starts"]:
        if s["feasible"]:
            cfg = BitConfig(s["bit_config"])
            assert model_size(m, cfg, act_bits=8).total_bytes == s["total_bytes"] <= s["budget_bytes"]
            assert cfg[names[0]] == 8 and cfg[names[-1]] == 8
            assert all(cfg[n] not in bad for n, bad in priors["excluded"].items())
    assert [s["multiple"] for s in priors["warm_starts"]] == [1.0, 0.8, 0.9, 1.1, 1.2]
    # a rerun with only the priors' settings changed reuses the table
    again = sensitivity_stage(_spec(budget_mb=0.03, metric="hessian"), ctx)
    assert again["reused"] and again["metric"] == "omega_hessian"


def test_students_stage_ranks_candidates_and_caches(tmp_path, ray_session):
    """Student selection (kdsearch/stages/students.py): float, PTQ and short-QAT accuracy at 8 and 4 bits."""
    from kdsearch.stages.students import selection_markdown, students_stage

    spec = parse_spec({
        "name": "st", "device": "cpu",
        "data": {"dataset": "synthetic", "num_classes": 4, "train_size": 32, "test_size": 16, "num_workers": 0},
        "teachers": {"models": ["resnet8"]},
        "student": {"arch": "tiny_cnn", "candidates": ["tiny_cnn"], "train": {"epochs": 1, "batch_size": 16},
                    "gpus": 0},
        "search": {"budgets_mb": [0.02], "trial_epochs": 1, "trial": {"batch_size": 16}},
    })  # fmt: skip
    ctx = RunContext.create(tmp_path / "runs" / "st", device="cpu", progress=False)
    df = students_stage(spec, ctx)
    assert (ctx.run_dir / "students" / "s0" / "scratch.pt").is_file()  # the spec's student shares the baselines' file
    row = df.iloc[0]
    assert row["arch"] == "tiny_cnn" and row["rank"] == 1
    for b in (8, 4):
        assert 0 <= row[f"qat_acc_w{b}"] <= 100
        assert row[f"drop_w{b}"] == pytest.approx(row["float_acc"] - row[f"qat_acc_w{b}"])
    assert row["size_mb_w4"] < row["size_mb_w8"] < row["fp32_mb"]
    assert pd.read_parquet(ctx.run_dir / "students" / "selection.parquet")["arch"].tolist() == ["tiny_cnn"]
    assert "| 1 | tiny_cnn |" in (ctx.run_dir / "students" / "selection.md").read_text()
    assert not list((ctx.run_dir / "students" / "selection").glob("*.ckpt"))
    cached = students_stage(spec, ctx)  # second call reuses the cached row
    assert cached.equals(df)
    assert selection_markdown(df).count("\n|") >= 2


def test_bops_warm_starts_are_the_exact_optimum_on_the_bops_column():
    from kdsearch.sensitivity.priors import warm_starts_bops

    t = pd.DataFrame([  # bytes and BOPs disagree: layer a holds the bytes, layer b does the compute
        {"layer": "a", "bits": 8, "bytes": 800, "bops": 8_000, "omega_kl": 0.1},
        {"layer": "a", "bits": 4, "bytes": 400, "bops": 4_000, "omega_kl": 1.0},
        {"layer": "b", "bits": 8, "bytes": 80, "bops": 80_000, "omega_kl": 0.2},
        {"layer": "b", "bits": 4, "bytes": 40, "bops": 40_000, "omega_kl": 3.0},
    ])
    starts = warm_starts_bops(t, [50e-6, 85e-6, 1e-6], [1.2])
    by = {(s["base_budget_gbops"], s["multiple"]): s for s in starts}
    assert by[(50e-6, 1.0)]["budget_bops"] == 50_000 and by[(50e-6, 1.0)]["bit_config"] == {"a": 8, "b": 4}
    assert by[(50e-6, 1.2)]["budget_bops"] == 60_000 and by[(50e-6, 1.2)]["total_bops"] == 48_000
    # 85,000 BOPs: b at 8 bits fits only with a at 4, although a holds the bytes (a size solve would differ)
    assert by[(85e-6, 1.0)]["bit_config"] == {"a": 4, "b": 8} and by[(85e-6, 1.0)]["total_bops"] == 84_000
    assert by[(85e-6, 1.0)]["gbops"] == pytest.approx(84e-6)
    assert not by[(1e-6, 1.0)]["feasible"] and "44000 BOPs" in by[(1e-6, 1.0)]["reason"]


def test_priors_add_bops_starts_that_the_search_keeps_within_both_budgets():
    from kdsearch.quant import layer_inventory, model_bops
    from kdsearch.search.space import build_space, prior_candidates, warm_start_points
    from kdsearch.sensitivity import build_priors

    m = _tiny()
    names = layer_names(m)
    fixed, costs = layer_byte_costs(m, {n: [8, 4, 2] for n in names}, 8)
    t = pd.DataFrame([{"layer": n, "bits": b, "bytes": costs[(n, b)], "omega_kl": (i + 1) / b}
                      for i, n in enumerate(names) for b in (8, 4, 2)])
    assert "warm_starts_bops" not in build_priors(_spec(0.02), t, fixed, m)  # a size-only run: priors as before
    inv = layer_inventory(m, input_size=(3, 32, 32))
    w8 = model_bops(m, BitConfig.uniform(inv, 8), act_bits=8).gbops
    spec = parse_spec({**_spec(0.02).to_dict(), "search": {"budgets_mb": [0.02], "budgets_gbops": [0.6 * w8]}})
    priors = build_priors(spec, t, fixed, m)
    bops_starts = [s for s in priors["warm_starts_bops"] if s["feasible"]]
    assert [s["multiple"] for s in priors["warm_starts_bops"]] == [1.0, 0.8, 0.9, 1.1, 1.2] and bops_starts
    for s in bops_starts:
        cfg = BitConfig(s["bit_config"])
        assert model_bops(m, cfg, act_bits=8).total_bops == s["total_bops"] <= s["budget_bops"]
        assert cfg[names[0]] == 8 and cfg[names[-1]] == 8
    space = build_space(m, spec.quant, 0.02, budget_gbops=0.6 * w8)
    starts, _ = prior_candidates(priors)
    assert len(starts) == len([s for key in ("warm_starts", "warm_starts_bops") for s in priors[key] if s["feasible"]])
    points, dropped = warm_start_points(space, starts)
    assert points and dropped  # starts solved for one budget that break the other are dropped
    assert all(space.feasible(space.complete(p)) for p in points)
