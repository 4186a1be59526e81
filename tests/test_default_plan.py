"""Issue 14: one function picks the plan when none is given, and `eval`, `demo` and `bench` all use it."""

import json

import pytest

from podkv import SharingPlan
from podkv.errors import PodError
from podkv.models.default_plan import SHIPPED_PLAN, default_plan, shipped_plan_path
from tiny import tiny_config, tiny_model


def test_order_given_then_own_then_shipped_then_uniform(tmp_path):
    config = tiny_config("llama")  # 4 layers, 2 KV heads: the shipped SmolLM2 plan does not fit
    plan, source = default_plan(config)
    assert source == "uniform(block=4, ns=4, nr=28)"  # 512 positions: a short-context model
    assert plan.anchors == SharingPlan.uniform(4, 2, 4, ns=4, nr=28).anchors
    given = SharingPlan.uniform(4, 2, 2, ns=4, nr=8)
    given.save(tmp_path / "p.json")
    assert default_plan(config, tmp_path / "p.json") == (given, str(tmp_path / "p.json"))
    config.pod_plan = given.to_dict()
    assert default_plan(config)[0] == given and "own plan" in default_plan(config)[1]
    smollm2 = tiny_config("llama", layers=30, heads=9, kv_heads=3, head_dim=64, max_pos=8192)
    plan, source = default_plan(smollm2)
    assert source == f"podkv/assets/{SHIPPED_PLAN}" and plan == SharingPlan.load(shipped_plan_path())


def test_given_plan_for_another_model_is_one_line_error(tmp_path):
    SharingPlan.uniform(6, 2, 2).save(tmp_path / "p.json")
    with pytest.raises(PodError, match="plan has 6 layers"):
        default_plan(tiny_config("llama"), tmp_path / "p.json")


def test_eval_demo_and_bench_agree(tmp_path, monkeypatch):
    """`podkv eval`/`demo` load through eval.runner.load, `podkv bench` through bench.runner: same plan."""
    import podkv.models.loading
    from podkv.bench.memory import MemoryConfig
    from podkv.bench.runner import run_bench
    from podkv.eval.config import EvalConfig
    from podkv.eval.runner import load
    from test_eval_prompts import CharTokenizer

    model = tiny_model("llama")
    monkeypatch.setattr(podkv.models.loading, "load_model", lambda name, progress=True: (model, CharTokenizer()))
    _, _, eval_plan, eval_source = load(EvalConfig(out=str(tmp_path)))
    bench = json.loads(run_bench("memory", model, None, MemoryConfig(lengths=(40,), decode=1),
                                 out_dir=tmp_path).read_text())
    assert bench["plan"] == eval_source == default_plan(model.config)[1]
    assert eval_plan == default_plan(model.config)[0]
