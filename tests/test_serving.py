"""podkv.serving without vLLM: plan checks, hf_overrides, servable checkpoints, `podkv serve-check`."""

import json
import re

import pytest
from tiny import tiny_model

from podkv.cli import main
from podkv.errors import PodError
from podkv.plan import SharingPlan
from podkv.serving.checks import (anchor_layer_name, check_plan_servable, layer_anchors, plan_for_serving,
                                  pod_architecture)
from podkv.serving.engine import pod_hf_overrides, write_pod_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama", layers=4, heads=4, kv_heads=2, head_dim=32).save_pretrained(path)
    return path


def cfg(arch="llama", **kw):
    return tiny_model(arch, layers=4, heads=4, kv_heads=2, head_dim=16, **kw).config


def test_layer_plan_is_servable():
    plan = SharingPlan.uniform(4, 2, 2, ns=4, nr=8)
    assert check_plan_servable(plan, cfg()) is plan
    assert layer_anchors(plan) == [0, 0, 2, 2]
    assert pod_architecture(cfg()) == "PodLlamaForCausalLM"
    assert anchor_layer_name("model.layers.13.self_attn", 13, 12) == "model.layers.12.self_attn.attn"


@pytest.mark.parametrize("plan, field", [
    (SharingPlan(anchors=[[0, 0], [0, 1], [2, 2], [2, 2]], ns=4, nr=8), "anchors[1]"),  # head-wise
    (SharingPlan.uniform(6, 2, 2, ns=4, nr=8), "layers"),  # wrong depth
    (SharingPlan.uniform(4, 3, 2, ns=4, nr=8), "KV heads"),  # wrong width
    (SharingPlan.uniform(4, 2, 2, ns=4, nr=8, mode="scores"), "mode"),
    (SharingPlan.uniform(4, 2, 2, ns=16, nr=1000), "positions"),
])
def test_bad_plans_are_refused(plan, field):
    with pytest.raises(PodError, match=re.escape(field)):
        check_plan_servable(plan, cfg())


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_unsupported_architecture_is_refused(arch):
    with pytest.raises(PodError, match="unsupported architecture"):
        check_plan_servable(SharingPlan.uniform(4, 2, 2, ns=4, nr=8), cfg(arch))


def test_missing_plan_is_refused():
    with pytest.raises(PodError, match="pod_plan"):
        plan_for_serving(cfg())


def test_hf_overrides_round_trip():
    config, plan = cfg(), SharingPlan.uniform(4, 2, 2, ns=4, nr=8)
    over = pod_hf_overrides(plan, config)
    assert over["architectures"] == ["PodLlamaForCausalLM"]
    config.update(over)  # what vLLM does with hf_overrides
    assert plan_for_serving(config).anchors == plan.anchors


def test_write_checkpoint(tiny_dir, tmp_path):
    plan = SharingPlan.uniform(4, 2, 2, ns=4, nr=8)
    out = write_pod_checkpoint(tiny_dir, plan, tmp_path / "pod")
    data = json.loads((out / "config.json").read_text())
    assert data["architectures"] == ["PodLlamaForCausalLM"] and data["pod_plan"]["anchors"] == plan.anchors
    assert (out / "model.safetensors").stat().st_size == (tiny_dir / "model.safetensors").stat().st_size


def test_cli_serve_check(tiny_dir, tmp_path, capsys):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    SharingPlan.uniform(4, 2, 2, ns=4, nr=8).save(good)
    SharingPlan(anchors=[[0, 0], [0, 1], [2, 2], [2, 2]], ns=4, nr=8).save(bad)
    assert main(["serve-check", "--model", str(tiny_dir), "--plan", str(good)]) == 0
    assert "can be served" in capsys.readouterr().out
    assert main(["serve-check", "--model", str(tiny_dir), "--plan", str(bad)]) == 2
    assert "head-wise" in capsys.readouterr().err
    assert main(["serve-check", "--model", str(tmp_path / "nope"), "--plan", str(good)]) == 2


def test_kv_layout_field():
    from types import SimpleNamespace

    from podkv.serving.checks import kv_layout

    assert kv_layout(SimpleNamespace()) == "shared"  # stage 2 is the default
    assert kv_layout(SimpleNamespace(pod_kv_layout="full")) == "full"
    with pytest.raises(PodError, match="pod_kv_layout"):
        kv_layout(SimpleNamespace(pod_kv_layout="paged"))
