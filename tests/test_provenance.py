"""Results files record the machine they were produced on, through one helper (podkv.provenance)."""

import importlib.util
import json
import os
from pathlib import Path

import torch

from podkv.plan import SharingPlan
from podkv.provenance import machine, versions

ROOT = Path(__file__).resolve().parent.parent


def test_machine_is_read_from_this_process():
    info = machine()
    assert info["cpu_count"] == os.cpu_count() and info["threads"] == torch.get_num_threads()
    assert info["torch"] == torch.__version__ and info["cpu"]
    assert ("gpu" in info) == torch.cuda.is_available()
    assert set(versions()) >= {"podkv", "python", "torch", "transformers"}


def test_bench_and_eval_record_the_same_machine_facts():
    from podkv.bench.common import machine_info
    from podkv.eval.config import EvalConfig
    from podkv.eval.runner import provenance

    assert machine().items() <= machine_info("cpu").items()
    from tiny import tiny_model

    model = tiny_model("llama")
    record = provenance(EvalConfig(), model, SharingPlan.uniform(4, 2, 2, ns=4, nr=8), "test")
    assert record["machine"] == machine("cpu") and record["versions"] == versions()
    assert record["identity"]["plan"]["block_lengths"] == [2] and record["identity"]["model"]["weights_sha256"]


def test_ship_writes_the_real_machine_into_recipe(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("ship", ROOT / "benchmarks" / "training" / "ship.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    monkeypatch.setattr(ship, "ASSET_DIR", tmp_path / "asset")
    run = tmp_path / "run"
    run.mkdir()
    (run / ship.DELTA_FILE).write_bytes(b"deltas")
    SharingPlan.uniform(4, 2, 2, ns=4, nr=8).save(run / "pod_plan.json")
    (run / "train_result.json").write_text(json.dumps({
        "tokens": 10, "steps": 1, "wall_s": 1.0, "config": {"eval_tokens": 8}, "dense_heldout_nll": 2.0,
        "heldout": [{"nll": 3.0}, {"nll": 2.1}]}))
    ship.main(str(run), "podkv train ...")
    recipe = json.loads((tmp_path / "asset" / ship.RECIPE_FILE).read_text())
    assert recipe["hardware"] == {**machine(), "dtype": "float32"}
    assert recipe["versions"]["podkv"] == versions()["podkv"]


def test_identity_names_what_was_measured():
    """Issue 20: a results file carries its argv, the weights it measured (hash) and the plan (hash, block lengths)."""
    import torch

    from podkv import SharingPlan
    from podkv.provenance import identity
    from tiny import tiny_model

    model = tiny_model("llama")
    plan = SharingPlan.uniform(model.config.num_hidden_layers, model.config.num_key_value_heads, 2, ns=4, nr=28)
    a = identity(model, plan)
    assert a["argv"] and a["plan"]["block_lengths"] == [2] and a["plan"]["mode"] == plan.mode
    assert identity(model, plan) == a  # deterministic
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    b = identity(model, SharingPlan.identity(model.config.num_hidden_layers, model.config.num_key_value_heads, ns=4, nr=28))
    assert b["model"]["weights_sha256"] != a["model"]["weights_sha256"]
    assert b["plan"]["sha256"] != a["plan"]["sha256"] and b["plan"]["block_lengths"] == [1]
