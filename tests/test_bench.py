"""Each `podkv bench` command runs on a tiny model and writes well-formed results (no timing asserts)."""

import json

import pytest

from podkv.bench.batch import BatchConfig, largest_fitting
from podkv.bench.memory import MemoryConfig
from podkv.bench.runner import run_bench
from podkv.bench.skip import SkipConfig
from podkv.bench.speed import SpeedConfig
from podkv.errors import PodError
from tiny import tiny_model
from tolerances import SCALAR

CONFIGS = {
    "memory": MemoryConfig(lengths=(40, 96), decode=2, selection_budget=0.5),
    "batch": BatchConfig(length=64, new_tokens=2, budget_requests=3.5, max_batch=8),
    "speed": SpeedConfig(prefill_lengths=(64,), decode_lengths=(48, 96), decode_steps=2, reps=1,
                         attn_lengths=(64, 128), attn_reps=1),
    "skip": SkipConfig(taus=(1.01, 0.7, 0.0), context=80, steps=2, ppl_prefix=48, ppl_tokens=3, passkeys=0),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    model = tiny_model("llama")
    return out, {name: json.loads(run_bench(name, model, None, cfg, out_dir=out).read_text())
                 for name, cfg in CONFIGS.items()}


def test_results_files(results):
    out, res = results
    md = (out / "RESULTS.md").read_text()
    for name, r in res.items():
        assert (out / f"{name}.png").stat().st_size > 0
        assert f"<!-- bench:{name} -->" in md and f"<!-- /bench:{name} -->" in md
        assert {"machine", "plan", "config", "plan_saving_4k"} <= set(r)
    # a second write replaces its own section only
    run_bench("memory", tiny_model("llama"), None, MemoryConfig(lengths=(40,), decode=1), out_dir=out)
    assert (out / "RESULTS.md").read_text().count("<!-- bench:memory -->") == 1


def test_memory_measured_equals_formula(results):
    rows = results[1]["memory"]["rows"]
    assert [r["T"] for r in rows] == [40, 96]
    assert results[1]["memory"]["all_match_formula"]
    for r in rows:
        assert r["pod_bytes"] <= r["dense_bytes"]
        assert r["saving"] == pytest.approx(r["plan_saving"], abs=1e-12)
    selected = [r for r in rows if "pod_snapkv_bytes" in r]  # PoD + SnapKV at budget 0.5
    assert selected, [r.get("pod_snapkv_note") for r in rows]
    for r in selected:
        assert r["pod_snapkv_matches_formula"] and r["pod_snapkv_saving"] >= 0.5 - 1e-9


@pytest.mark.parametrize("bits,keys", [(8, "token"), (4, "token"), (4, "channel")])
def test_memory_quantized_window_plan_measured_equals_formula(tmp_path, bits, keys):
    """`bench memory --kv-bits 8|4 [--key-quant channel]` on a plan with window-only pairs: the quantized PodCache's
    bytes = the formula (with KIVI keys, 42 tokens in groups of 16 leave 10 keys per anchor head unquantised)."""
    from test_window_policy import window_plan

    plan = window_plan(seed=5, ns=4, nr=8)
    cfg = MemoryConfig(lengths=(40,), decode=2, selection_budget=None, kv_bits=bits, key_quant=keys)
    res = json.loads(run_bench("memory", tiny_model("llama"), None, cfg, out_dir=tmp_path, plan=plan).read_text())
    row = res["rows"][0]
    assert res["all_match_formula"] and res["kv_bits"] == bits and res["key_quant"] == keys
    assert row["saving"] > plan.kv_saving(row["tokens_held"])  # 8 bits on top of the plan
    with pytest.raises(PodError, match="--selection-budget 0"):
        MemoryConfig(kv_bits=8)
    with pytest.raises(PodError, match="'kv_bits' = 3"):
        MemoryConfig(kv_bits=3, selection_budget=None)
    with pytest.raises(PodError, match="'key_quant' = 'rows': choose from token, channel"):
        MemoryConfig(kv_bits=4, key_quant="rows", selection_budget=None)
    with pytest.raises(PodError, match="--kv-keep-proximal need --kv-bits"):
        MemoryConfig(keep_proximal=True, selection_budget=None)


def test_batch_search_and_ratio(results):
    r = results[1]["batch"]
    for m, v in r["methods"].items():
        assert v["max_batch"] == v["formula_max_batch"], m  # KV bytes are exactly the formula
        assert any(p["fits"] for p in r["probes"] if p["method"] == m)
    assert r["methods"]["pod"]["max_batch"] >= r["methods"]["dense"]["max_batch"] == 3
    assert all(p["kv_bytes"] <= r["budget_bytes"] for p in r["probes"] if p["fits"])


def test_speed_and_skip_shapes(results):
    speed, skip = results[1]["speed"], results[1]["skip"]
    for part in ("prefill", "decode", "attention_prefill", "attention_decode"):
        assert all(row["ratio"] > 0 and row["dense"]["n"] >= 1 for row in speed[part])
    assert set(speed["goals"]) >= {"prefill_goal_met", "decode_goal_met"}
    by_tau = {r["tau"]: r for r in skip["rows"]}
    assert by_tau[1.01]["skip_share"] == 0 and by_tau[0.0]["skip_share"] == 1
    assert by_tau[1.01]["ppl"] == pytest.approx(by_tau[None]["ppl"], rel=SCALAR)
    assert all(r["passkey"] is None for r in skip["rows"])


def test_largest_fitting_is_exact():
    for limit in range(0, 12):
        for guess in range(0, 14):
            assert largest_fitting(lambda b: b <= limit, guess, 10) == min(limit, 10)


def test_cli_parses_and_rejects_bad_values():
    from podkv.bench.cli import build_config
    from podkv.cli import build_parser

    args = build_parser().parse_args(["bench", "memory", "--lengths", "128,256", "--out", "x"])
    assert build_config(args).lengths == (128, 256)
    args = build_parser().parse_args(["bench", "skip", "--taus", "0.7,0"])
    assert build_config(args).taus == (0.7, 0.0)
    with pytest.raises(PodError, match="lengths"):
        MemoryConfig(lengths=(0,))
    with pytest.raises(PodError, match="budget_requests"):
        BatchConfig(budget_requests=0)
