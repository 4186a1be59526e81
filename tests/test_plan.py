"""SharingPlan: validation names the field and value; JSON round trip; analytic memory."""

import json

import pytest

from podkv import PodError, SharingPlan
from tiny import tiny_config


def test_round_trip(tmp_path):
    plan = SharingPlan(anchors=[[0, 0], [0, 1], [0, 1], [3, 1]], ns=4, nr=8, meta={"model": "x"})
    path = plan.save(tmp_path / "plan.json")
    again = SharingPlan.load(path)
    assert again == plan
    assert json.loads(path.read_text())["schema_version"] == 1


@pytest.mark.parametrize("kwargs,needle", [
    (dict(anchors=[[0], [2]]), "anchors[1][0]"),
    (dict(anchors=[[0], [0], [1]]), "anchors[2][0]"),  # 1 is not its own anchor: not consecutive
    (dict(anchors=[[0, 0], [0]]), "anchors[1]"),
    (dict(anchors=[[0]], ns=0), "'ns'"),
    (dict(anchors=[[0]], nr=-3), "'nr'"),
    (dict(anchors=[[0]], mode="bogus"), "'mode'"),
    (dict(anchors=[]), "'anchors'"),
])
def test_validation_names_field(kwargs, needle):
    with pytest.raises(PodError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        SharingPlan(**kwargs)


@pytest.mark.parametrize("data,needle", [
    ({"anchors": [[0]], "ns": "16"}, "'ns'"),
    ({"anchors": [[0]], "nr": 2.5}, "'nr'"),
    ({"anchors": [[0]], "ns": True}, "'ns'"),
    ({"anchors": [["0"]]}, "anchors[0][0]"),
    ({"anchors": [[0], [0.0]]}, "anchors[1][0]"),
    ({"anchors": [[0], [True]]}, "anchors[1][0]"),
    ({"anchors": [0, 0]}, "'anchors'"),
    ({"anchors": "0"}, "'anchors'"),
    ({"anchors": [[0]], "mode": ["keys"]}, "'mode'"),
    ({"anchors": [[0]], "meta": "x"}, "'meta'"),
])
def test_json_with_wrong_types_is_a_pod_error(tmp_path, data, needle):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PodError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        SharingPlan.load(path)


def test_validate_for_model():
    cfg = tiny_config(layers=4, kv_heads=2)
    SharingPlan.identity(4, 2).validate_for(cfg)
    with pytest.raises(PodError, match="4"):
        SharingPlan.identity(3, 2).validate_for(cfg)
    with pytest.raises(PodError, match="KV heads"):
        SharingPlan.identity(4, 1).validate_for(cfg)


def test_load_errors(tmp_path):
    with pytest.raises(PodError, match="does not exist"):
        SharingPlan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PodError, match="not valid JSON"):
        SharingPlan.load(bad)
    bad.write_text(json.dumps({"anchors": [[0]], "schema_version": 99}))
    with pytest.raises(PodError, match="schema_version"):
        SharingPlan.load(bad)


def test_saving_formula():
    plan = SharingPlan.uniform(30, 3, 4, ns=16, nr=240)
    shared = sum(len(plan.shared_heads(l)) for l in range(30))
    T = 4096
    expected = shared * (T - 256) / (2 * 30 * 3 * T)
    assert abs(plan.kv_saving(T) - expected) < 1e-12
    assert plan.kv_saving(100) == 0.0  # shorter than the window: nothing to share
    assert SharingPlan.identity(30, 3).kv_saving(T) == 0.0


def test_grid_and_blocks():
    plan = SharingPlan(anchors=[[0, 0], [0, 1], [2, 1]])
    assert plan.blocks(0) == [(0, 1), (2, 2)]
    assert plan.blocks(1) == [(0, 0), (1, 2)]
    assert "A" in plan.grid() and not plan.is_layer_granular
