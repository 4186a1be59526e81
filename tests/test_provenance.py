"""Results files record the machine they were produced on, through one helper (podkv.provenance)."""

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

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
    model = SimpleNamespace(config=SimpleNamespace(model_type="llama"), device=torch.device("cpu"))
    record = provenance(EvalConfig(), model, SharingPlan.uniform(4, 2, 2, ns=4, nr=8), "test")
    assert record["machine"] == machine("cpu") and record["versions"] == versions()


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
