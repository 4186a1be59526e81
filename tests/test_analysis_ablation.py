"""Per-pair ablation (analysis/ablation.py), SharingPlan.split_block and `podkv ablate` / `podkv plan --ablation`."""

import json
import re

import pytest
import torch

from conftest import _char_tokenizer
from podkv import PodError, SharingPlan
from podkv.analysis.ablation import add_anchors, answer_logprobs, answer_prompts, pair_ablation
from podkv.cli import main
from tiny import tiny_model
from tolerances import assert_close

LENGTH = 900  # characters: a track document's statements and question need ~600


def _plan(**kw) -> SharingPlan:
    return SharingPlan.uniform(6, 2, 3, ns=4, nr=16, mode="scores", **kw)


def test_split_block_makes_the_pair_an_anchor_read_by_the_rest_of_its_block():
    plan = _plan()
    split = plan.split_block(1, 0)
    assert [row[0] for row in split.anchors] == [0, 1, 1, 3, 3, 3]
    assert [row[1] for row in split.anchors] == [row[1] for row in plan.anchors]  # other head untouched
    assert split.mode == "scores" and (split.ns, split.nr) == (4, 16)
    one_pair = (256 - 20) / (2 * 6 * 2 * 256)  # a shared pair's distant keys at 256 tokens
    assert split.kv_saving(256) == pytest.approx(plan.kv_saving(256) - one_pair)
    assert [row[0] for row in plan.split_block(2, 0).anchors] == [0, 0, 2, 3, 3, 3]  # a block's last pair


def test_split_block_refuses_anchors_and_pairs_outside_the_grid():
    plan = _plan()
    with pytest.raises(PodError, match=r"pair \(layer 3, head 1\) is 'anchor', not shared"):
        plan.split_block(3, 1)
    with pytest.raises(PodError, match=r"outside the plan's 6 x 2 grid"):
        plan.split_block(6, 0)


def test_split_block_keeps_window_pairs():
    anchors = [[0, 0], [0, 1], [0, 1], [3, 3], [3, 3], [5, 5]]
    policies = [["anchor", "anchor"], ["shared", "window"], ["shared", "anchor"], ["anchor", "anchor"],
                ["shared", "shared"], ["anchor", "anchor"]]
    anchors[2][1] = 2
    plan = SharingPlan(anchors, ns=4, nr=16, policies=policies)
    split = plan.split_block(1, 0)
    assert split.is_window(1, 1) and split.anchors[2][0] == 1 and split.policy(1, 0) == "anchor"


def test_add_anchors_takes_the_most_helpful_splits_in_turn():
    plan = _plan()
    rows = [{"layer": 1, "head": 0, "delta": 0.5}, {"layer": 2, "head": 0, "delta": 0.4},
            {"layer": 4, "head": 1, "delta": -0.2}, {"layer": 5, "head": 1, "delta": 0.1}]
    two = add_anchors(plan, rows, 2)
    assert two.meta["added_anchors"] == [[1, 0], [2, 0]]
    assert [row[0] for row in two.anchors] == [0, 1, 2, 3, 3, 3]
    three = add_anchors(plan, rows, 3)
    assert three.meta["added_anchors"][-1] == [5, 1] and three.anchors[5][1] == 5
    with pytest.raises(PodError, match="lists only 4 pairs"):
        add_anchors(plan, rows, 5)
    with pytest.raises(PodError, match="outside the plan's 6 x 2 grid"):
        add_anchors(plan, [{"layer": 9, "head": 0, "delta": 1.0}], 1)


def test_answer_prompts_end_with_the_answer_of_their_kind():
    tok = _char_tokenizer()
    prompts = answer_prompts(tok, 4, LENGTH, seed=3)
    assert [p.kind for p in prompts] == ["track", "multilookup"] * 2
    for p in prompts:
        assert len(p.input_ids) == LENGTH
        answer = tok.decode(p.input_ids[-p.answer_tokens:])
        before = tok.decode(p.input_ids[-p.answer_tokens - 1:-p.answer_tokens])
        if p.kind == "multilookup":  # every number of the list, nothing of the words before it
            assert re.fullmatch(r"[\d, ]+\.", answer) and not re.fullmatch(r"[\d,. ]", before), (answer, before)
        else:  # the asked chain's names, from the first one on
            assert re.match(r"\s*\w", answer) and answer.endswith("."), answer


def test_pair_ablation_rows_and_dense_baseline():
    """With every pair its own anchor PoD is dense attention; a split plan is what the ablation runs."""
    torch.manual_seed(0)
    model = tiny_model("llama", layers=4, heads=4, kv_heads=2, max_pos=1024)
    tok = _char_tokenizer()
    prompts = answer_prompts(tok, 2, LENGTH, seed=0)
    identity = pair_ablation(model, SharingPlan.identity(4, 2, ns=4, nr=16, mode="scores"), prompts, progress=False)
    assert identity["pairs"] == []
    assert_close(torch.tensor(identity["plan"]), torch.tensor(identity["dense"]), what="identity plan vs dense")
    plan = SharingPlan.uniform(4, 2, 2, ns=4, nr=16, mode="scores")
    result = pair_ablation(model, plan, prompts, progress=False)
    assert [(r["layer"], r["head"]) for r in result["pairs"]] == [(1, 0), (1, 1), (3, 0), (3, 1)]
    from podkv.eval.methods import attention_mode

    with attention_mode(model, plan=plan.split_block(3, 1)):
        lp = answer_logprobs(model, prompts)
    expect = sum(a - b for a, b in zip(lp, result["plan"])) / 2
    assert result["pairs"][3]["delta"] == pytest.approx(expect, abs=1e-6)
    assert result["kinds"] == ["track", "multilookup"]


@pytest.fixture(scope="module")
def long_tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_long") / "model"
    tiny_model("llama", layers=4, heads=4, kv_heads=2, max_pos=1024).save_pretrained(path)
    _char_tokenizer().save_pretrained(path)
    return path


def test_ablate_and_plan_commands(long_tiny_dir, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    SharingPlan.uniform(4, 2, 2, ns=4, nr=16, mode="scores").save(plan_path)
    out = tmp_path / "abl"
    assert main(["ablate", "--model", str(long_tiny_dir), "--plan", str(plan_path), "--prompts", "2",
                 "--length", str(LENGTH), "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "ablation.json").read_text())
    assert len(data["pairs"]) == 4 and (out / "ablation.md").is_file() and (out / "ablation.png").is_file()
    assert "| layer | KV head |" in (out / "ablation.md").read_text()
    new = tmp_path / "new.json"
    assert main(["plan", "--base", str(plan_path), "--ablation", str(out / "ablation.json"), "--add-anchors", "1",
                 "--out", str(new)]) == 0
    made = SharingPlan.load(new)
    best = max(data["pairs"], key=lambda r: r["delta"])
    assert made.meta["added_anchors"] == [[best["layer"], best["head"]]] and made.is_anchor(best["layer"], best["head"])


def test_plan_ablation_bad_input_is_one_line(tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    _plan().save(plan_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cases = [
        (["--ablation", str(bad), "--add-anchors", "1"], "--ablation needs --base PLAN and --add-anchors K"),
        (["--base", str(plan_path), "--ablation", str(bad), "--add-anchors", "1"], "is not an ablation.json"),
        (["--base", str(plan_path), "--ablation", str(tmp_path / "none.json"), "--add-anchors", "1"], "does not exist"),
    ]
    for extra, message in cases:
        assert main(["plan", *extra, "--out", str(tmp_path / "p.json")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "p.json").exists()


def test_ablate_refuses_a_bad_prompt_count_before_loading(tmp_path, capsys, monkeypatch):
    import podkv

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --prompts was checked")

    monkeypatch.setattr(podkv, "load_model", no_load)
    out = tmp_path / "abl"
    assert main(["ablate", "--model", "smollm2", "--prompts", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--prompts must be at least 2" in err and err.count("\n") == 1 and not out.exists()
