"""Issue 14: batch capacity under a process-memory budget, each try's peak RSS measured in its own process."""

import json

import pytest

import podkv.bench.batch_rss as batch_rss
from podkv.bench.batch_rss import RssBatchConfig, run_batch_rss
from podkv.errors import PodError
from podkv.models.default_plan import default_plan
from tiny import tiny_model

MIB = 2**20


def _fake_measure(base, per):
    """Peak RSS = base + batch * per[method], as a child would report it; records every try."""
    calls = []

    def measure(cfg, plan_path, method, batch):
        calls.append((method, batch))
        return {"batch": batch, "peak_rss": base + batch * per[method], "loaded_rss": base, "kv_bytes": batch}

    return measure, calls


def test_search_finds_the_largest_batch_under_the_budget_in_few_tries(monkeypatch):
    model = tiny_model("llama")
    plan = default_plan(model.config)[0]
    measure, calls = _fake_measure(500 * MIB, {"dense": 40 * MIB, "pod": 30 * MIB})
    monkeypatch.setattr(batch_rss, "measure", measure)
    r = run_batch_rss(model, None, plan, RssBatchConfig(rss_budget_gib=1.0, max_batch=64))
    # (1024 - 500) / 40 = 13.1 and / 30 = 17.5: the line through batch 1 and 2 lands on it, one more try confirms
    assert r["methods"]["dense"]["max_batch"] == 13 and r["methods"]["pod"]["max_batch"] == 17
    assert r["ratio"] == pytest.approx(17 / 13)
    assert r["methods"]["dense"]["runs"] == len([c for c in calls if c[0] == "dense"]) <= 4
    assert all(p["peak_rss"] <= r["rss_budget_bytes"] for p in r["probes"]
               if p["batch"] <= r["methods"][p["method"]]["max_batch"])


def test_nothing_fits_and_a_failed_child_does_not_fit(monkeypatch):
    model = tiny_model("llama")
    plan = default_plan(model.config)[0]
    monkeypatch.setattr(batch_rss, "measure", lambda cfg, path, method, b: {
        "batch": b, "peak_rss": None, "loaded_rss": None, "kv_bytes": None, "error": "MemoryError"})
    r = run_batch_rss(model, None, plan, RssBatchConfig(rss_budget_gib=0.5))
    assert r["methods"]["dense"]["max_batch"] == 0 and r["ratio"] is None


def test_one_real_child_reports_its_peak(tiny_lm_dir, tmp_path):
    """A real child process on a saved tiny model: its peak covers the model it loaded and the KV it held."""
    model = tiny_model("llama")
    plan = default_plan(model.config)[0]
    cfg = RssBatchConfig(rss_budget_gib=4, length=64, new_tokens=2, model=str(tiny_lm_dir), threads=1)
    probe = batch_rss.measure(cfg, plan.save(tmp_path / "plan.json"), "pod", 2)
    assert probe["peak_rss"] >= probe["loaded_rss"] > 50 * MIB  # python + torch + the model, in bytes
    from podkv.cache.memory import pod_kv_bytes

    assert probe["kv_bytes"] == pod_kv_bytes(model.config, plan, 66, 2)
    small = RssBatchConfig(rss_budget_gib=0.05, length=64, new_tokens=2, model=str(tiny_lm_dir), threads=1)
    over = batch_rss.measure(small, tmp_path / "plan.json", "pod", 2)  # python + torch alone pass 50 MiB
    assert over["over_budget"] and over["peak_rss"] > 0.05 * 2**30 and over["kv_bytes"] is None


def test_cli_routes_rss_budget_to_the_measured_benchmark():
    from podkv.bench.cli import bench_name, build_config
    from podkv.cli import build_parser

    args = build_parser().parse_args(["bench", "batch", "--rss-budget", "1.5", "--length", "512"])
    cfg = build_config(args)
    assert bench_name(args) == "batch_rss" and cfg.rss_budget_gib == 1.5 and cfg.length == 512
    assert bench_name(build_parser().parse_args(["bench", "batch"])) == "batch"
    with pytest.raises(PodError, match="rss_budget"):
        RssBatchConfig(rss_budget_gib=0)
    json.dumps(vars(cfg))  # the config goes into the results file
