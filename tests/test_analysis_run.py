"""`analyze` end to end on tiny models, the CLI's error paths, and the shipped plans."""

import json
from importlib.resources import files

import pytest
import torch

from analysis_helpers import CharTokenizer, tiny_cfg
from podkv import PodCache, PodError, SharingPlan, disable_pod, enable_pod
from podkv.analysis.run import AnalysisConfig, analyze
from podkv.cache.memory import dense_kv_bytes
from podkv.cli import main
from tiny import tiny_model

OUTPUTS = ("plan.json", "analysis.json", "analysis.md", "proximal.png", "similarity.png")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One analysis of a 16-layer tiny model with a target saving (shared by several tests)."""
    out = tmp_path_factory.mktemp("analysis")
    model = tiny_model("llama", layers=16, heads=4, kv_heads=4, head_dim=8)
    cfg = tiny_cfg(target_saving=0.3, context=96)
    result = analyze(cfg, out, model=model, tokenizer=CharTokenizer(), progress=False)
    return out, model, result


def test_outputs_and_similarity_invariants(tiny_run):
    out, _, result = tiny_run
    assert all((out / name).is_file() for name in OUTPUTS)
    data = json.loads((out / "analysis.json").read_text())
    for key in ("model", "data_sha256", "settings", "versions", "seed", "podkv_version"):
        assert key in data
    sims = torch.tensor(data["similarity"]["kv_heads"])  # (Hkv, L, L)
    assert sims.shape == (4, 16, 16) and len(data["similarity"]["query_heads"]) == 4
    torch.testing.assert_close(sims, sims.transpose(1, 2))
    torch.testing.assert_close(torch.diagonal(sims, dim1=1, dim2=2), torch.ones(4, 16))
    assert bool(((sims >= 0) & (sims <= 1)).all())
    rows = data["proximal"]["rows"]
    assert [r["size"] for r in rows] == [8, 16, 32] and all(0 <= r["agreement"] <= 1 for r in rows)
    plan = SharingPlan.load(out / "plan.json")
    assert plan.meta["data_sha256"] == data["data_sha256"] and plan.meta["seed"] == 0


def test_target_saving_plan_measured_in_a_pod_cache(tiny_run):
    """1 - kv_bytes / dense bytes after T tokens through a PodCache matches the target within 1 point."""
    _, model, result = tiny_run
    plan = result["plan_object"]
    T = 96
    ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(0))
    enable_pod(model, plan)
    try:
        cache = PodCache(model.config, plan)
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
    finally:
        disable_pod(model)
    measured = 1 - cache.kv_bytes() / dense_kv_bytes(model.config, T)
    print(f"target 0.30, measured {measured:.4f}, analytic {plan.kv_saving(T):.4f}")
    assert abs(measured - 0.3) <= 0.01 and abs(measured - plan.kv_saving(T)) < 1e-9


def test_deterministic_and_layer_plans(tmp_path):
    model = tiny_model("qwen3", layers=4, heads=4, kv_heads=2)
    runs = [analyze(tiny_cfg(granularity="layer", proximal_samples=0, seed=3), tmp_path / str(i), model=model,
                    tokenizer=CharTokenizer(), progress=False) for i in range(2)]
    strip = [{k: v for k, v in json.loads((tmp_path / str(i) / "analysis.json").read_text()).items()
              if k != "runtime"} for i in range(2)]
    assert strip[0] == strip[1]
    assert runs[0]["plan_object"].is_layer_granular and strip[0]["proximal"] is None


def test_plan_subcommand_replans_from_analysis_json(tiny_run, tmp_path, capsys):
    out, _, _ = tiny_run
    target = tmp_path / "p.json"
    assert main(["plan", "--analysis", str(out / "analysis.json"), "--target-saving", "0.2", "--context", "96",
                 "--granularity", "layer", "--out", str(target)]) == 0
    plan = SharingPlan.load(target)
    assert plan.is_layer_granular and plan.kv_saving(96) >= 0.2
    assert "layer" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--delta", "1.5"], "--delta must be in"),
    (["--delta", "-0.1"], "--delta must be in"),
    (["--target-saving", "1.2"], "--target-saving must be in"),
    (["--length", "100", "--last-q", "64"], "--length 100 leaves no distant tokens"),
])
def test_cli_rejects_bad_settings_before_loading(argv, message, tmp_path, capsys):
    assert main(["analyze", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_empty_and_malformed_data(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["analyze", "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "is empty" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert main(["analyze", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "line 2 has no string field 'text'" in capsys.readouterr().err


def test_library_errors_need_the_model(tmp_path):
    model = tiny_model("llama", layers=4, max_pos=128)
    with pytest.raises(PodError, match="beyond the model's 128 positions"):
        analyze(tiny_cfg(length=256), tmp_path, model=model, tokenizer=CharTokenizer(), progress=False)
    with pytest.raises(PodError, match="--target-saving 0.45 is outside"):
        analyze(tiny_cfg(target_saving=0.45), tmp_path, model=model, tokenizer=CharTokenizer(), progress=False)
    text = tmp_path / "short.txt"
    text.write_text("too short")
    with pytest.raises(PodError, match="fewer than --length"):
        analyze(AnalysisConfig(**{**vars(tiny_cfg()), "data": [str(text)]}), tmp_path, model=model,
                tokenizer=CharTokenizer(), progress=False)


def test_jsonl_data_is_read(tmp_path):
    from podkv.analysis.data import load_corpus

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "alpha"}\n\n{"text": "beta"}\n')
    corpus = load_corpus([path])
    assert corpus.text == "alpha\n\nbeta" and corpus.source == [str(path)] and len(corpus.sha256) == 64


@pytest.mark.parametrize("name, layer_granular", [("smollm2_plan_35.json", False),
                                                  ("smollm2_plan_layer_35.json", True)])
def test_shipped_plans(name, layer_granular):
    path = files("podkv") / "assets" / name
    assert path.is_file(), f"the shipped plan {name} is missing from the package"
    plan = SharingPlan.load(path)
    assert (plan.num_layers, plan.num_kv_heads, plan.ns, plan.nr) == (30, 3, 16, 240)
    assert plan.kv_saving(4096) >= 0.35 and plan.is_layer_granular == layer_granular
    assert plan.meta["settings"]["target_saving"] == 0.35
