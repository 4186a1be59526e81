"""Retrieval heads (analysis/retrieval.py) and the plan kinds of `podkv analyze --kind`, on tiny models."""

import json
import random

import pytest
import torch

from analysis_helpers import CharTokenizer, tiny_cfg
from eval_fixtures import no_model_load  # noqa: F401
from podkv import PodError, SharingPlan
from podkv.analysis import planner
from podkv.analysis.retrieval import RowProbe, head_scores, lookup_prompt
from podkv.analysis.run import AnalysisConfig, analyze, replan
from podkv.cli import main
from tiny import tiny_model
from tolerances import assert_close

LENGTH = 160  # a lookup needs ~85 characters of record and question around its haystack


def test_row_probe_is_the_causal_softmax():
    """Hand-computed: 1 query head on 1 KV head, 4 tokens, rows 1 and 3."""
    q = torch.tensor([[[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 2.0]]]])  # (1, 1, 4, 2)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]]])
    probe = RowProbe([1, 3])
    probe.observe(0, q, k, 0.5)
    e = torch.exp
    row1 = torch.tensor([e(torch.tensor(0.5)), 1.0, 0.0, 0.0])  # q1.k = (1, 0), scaled; causal: tokens 0..1
    row1[:2] /= row1[:2].sum()
    s3 = torch.tensor([0.0, 2.0, 2.0, 0.0]) * 0.5
    row3 = e(s3) / e(s3).sum()
    torch.testing.assert_close(probe.attn[0][0], torch.stack([row1, row3]))
    # the value-span attention of row 3 on tokens [1, 3)
    assert abs(float(probe.attn[0][0, 1, 1:3].sum()) - float(2 * e(torch.tensor(1.0)) / e(s3).sum())) < 1e-6


def test_head_scores_match_eager_attention():
    """Retrieval score = answer rows' attention on the value span, from the model's own (eager) weights."""
    model = tiny_model("llama", layers=3, heads=4, kv_heads=2, head_dim=8)
    tok, ns, nr, last_q = CharTokenizer(), 4, 16, 8
    scores = head_scores(model, tok, samples=1, length=LENGTH, ns=ns, nr=nr, last_q=last_q, progress=False)
    for key in ("distant_mass", "retrieval"):
        assert scores[key].shape == (3, 2) and bool(((scores[key] >= 0) & (scores[key] <= 1)).all())
    from podkv import texts

    rng = random.Random(0)
    p = lookup_prompt(tok, LENGTH, 0.05 + 0.75 * rng.random(), rng, tok.encode(texts.text("plan")))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attn = model(torch.tensor([p.input_ids]), output_attentions=True).attentions  # L x (1, Hq, T, T)
    (a0, a1), (v0, v1) = p.answer_span, p.value_span
    T = len(p.input_ids)
    t = torch.arange(a0 - last_q, a0)[:, None]
    j = torch.arange(T)[None]
    distant = ((j >= ns) & (j <= t - nr)).double()
    for layer, w in enumerate(attn):
        w = w[0].double()
        retr = w[:, a0:a1, v0:v1].sum(-1).mean(-1).view(2, 2).amax(-1)
        mass = (w[:, a0 - last_q:a0] * distant).sum(-1).mean(-1).view(2, 2).amax(-1)
        assert_close(scores["retrieval"][layer].double(), retr, what=f"retrieval score, layer {layer}")
        assert_close(scores["distant_mass"][layer].double(), mass, what=f"distant mass, layer {layer}")


@pytest.fixture(scope="module")
def kinds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kinds")
    model = tiny_model("llama", layers=8, heads=4, kv_heads=2, head_dim=8)
    cfg = tiny_cfg(kind="retrieval", target_saving=0.25, context=LENGTH, length=LENGTH, retrieval_samples=2,
                   proximal_samples=0)
    result = analyze(cfg, out, model=model, tokenizer=CharTokenizer(), progress=False)
    return out, result


def test_analyze_records_retrieval_scores_and_provenance(kinds_run):
    out, result = kinds_run
    assert (out / "retrieval.png").is_file()
    data = json.loads((out / "analysis.json").read_text())
    for key in ("distant_mass", "retrieval"):
        m = torch.tensor(data["retrieval"][key])
        assert m.shape == (8, 2) and bool(((m >= 0) & (m <= 1)).all())
    plan = SharingPlan.load(out / "plan.json")
    assert plan.meta["kind"] == "retrieval" and plan.meta["retrieval_weight"] == 4.0
    assert plan.meta["kv_saving"]["saving"] >= 0.25 and plan.meta["target_saving"] == 0.25
    assert data["plan"]["kind"] == "retrieval" and "retrieval_shared" in data["plan"]
    assert "## Retrieval heads" in (out / "analysis.md").read_text()


@pytest.mark.parametrize("kind, gran, extra", [
    ("similarity", "head", {}), ("similarity", "layer", {}), ("retrieval", "head", {}),
    ("retrieval", "layer", {"retrieval_weight": 100.0}), ("greedy", "head", {"delta": 0.2}),
    ("uniform", "layer", {"block_size": 3})])
def test_each_kind_makes_a_valid_plan(kinds_run, kind, gran, extra):
    out, _ = kinds_run
    data = json.loads((out / "analysis.json").read_text())
    target = 0.25 if kind in ("similarity", "retrieval") else None
    plan, cfg = replan(data, "analysis.json", kind=kind, granularity=gran, target_saving=target, **extra)
    assert plan.meta["kind"] == kind and (plan.num_layers, plan.num_kv_heads) == (8, 2)
    step = (LENGTH - 4 - 16) / (2 * 8 * 2 * LENGTH) * (2 if gran == "layer" else 1)
    if target is not None:
        assert target <= plan.kv_saving(LENGTH) < target + step
    if gran == "layer":
        assert plan.is_layer_granular
    if kind == "uniform":
        assert plan.anchors == SharingPlan.uniform(8, 2, 3).anchors
    if kind == "retrieval":
        free, _ = replan(data, "analysis.json", kind="similarity", granularity=gran, target_saving=target)
        retr = torch.tensor(data["retrieval"]["retrieval"])
        assert planner.retrieval_shared(plan, retr) <= planner.retrieval_shared(free, retr) + 1e-9


def test_window_pairs_from_measured_scores(kinds_run, tmp_path):
    """`podkv plan --window-pairs N`: the N pairs of least distant mass + retrieval score are window-only, and the
    plan reaches its saving; the written plan loads and names them."""
    out, _ = kinds_run
    data = json.loads((out / "analysis.json").read_text())
    plan, _ = replan(data, "analysis.json", kind="retrieval", target_saving=0.3, window_pairs=3)
    need = torch.tensor(data["retrieval"]["distant_mass"]) + torch.tensor(data["retrieval"]["retrieval"])
    window = {(l, h) for l in range(8) for h in range(2) if plan.is_window(l, h)}
    assert window == planner.window_pairs(need.double(), 3)
    assert plan.kv_saving(LENGTH) >= 0.3 and plan.meta["window_pairs"]["n"] == 3
    argv = ["plan", "--analysis", str(out / "analysis.json"), "--kind", "retrieval", "--target-saving", "0.3",
            "--window-pairs", "3", "--context", str(LENGTH), "--out", str(tmp_path / "p.json")]
    assert main(argv) == 0
    assert SharingPlan.load(tmp_path / "p.json").policies == plan.policies
    base = SharingPlan.uniform(8, 2, 2, ns=4, nr=16, mode="scores").save(tmp_path / "base.json")
    argv = ["plan", "--analysis", str(out / "analysis.json"), "--base", str(base), "--window-pairs", "2",
            "--out", str(tmp_path / "w.json")]
    assert main(argv) == 0
    added = SharingPlan.load(tmp_path / "w.json")
    assert sum(added.is_window(l, h) for l in range(8) for h in range(2)) == 2 and added.mode == "scores"
    assert main(argv[:5] + ["--out", str(tmp_path / "x.json")]) == 2  # --base without --window-pairs


@pytest.mark.parametrize("argv, message", [
    (["--window-pairs", "2"], "--window-pairs applies to --kind similarity or retrieval"),
    (["--kind", "similarity", "--target-saving", "0.3", "--window-pairs", "2", "--retrieval-samples", "0"],
     "--retrieval-samples must be >= 1 for --kind similarity with --window-pairs"),
    (["--kind", "bogus"], "--kind must be one of ('greedy', 'similarity', 'retrieval', 'uniform'), got 'bogus'"),
    (["--kind", "retrieval"], "--kind retrieval needs --target-saving"),
    (["--kind", "similarity"], "--kind similarity needs --target-saving"),
    (["--kind", "uniform"], "--kind uniform needs --block-size"),
    (["--kind", "greedy", "--target-saving", "0.3"], "--target-saving applies to --kind similarity or retrieval"),
    (["--block-size", "4"], "--block-size applies to --kind uniform"),
    (["--kind", "retrieval", "--target-saving", "0.3", "--retrieval-samples", "0"], "--retrieval-samples must be >= 1"),
])
def test_cli_refuses_bad_kinds_before_loading(argv, message, tmp_path, capsys, no_model_load):  # noqa: F811
    assert main(["analyze", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_plan_subcommand_needs_retrieval_scores(tmp_path, capsys):
    analysis = tmp_path / "analysis.json"
    analysis.write_text(json.dumps({"similarity": {"kv_heads": [[[1.0, 0.5], [0.5, 1.0]]]},
                                    "settings": {"length": 96, "last_q": 8, "ns": 4, "nr": 16,
                                                 "proximal_sizes": [8]}}))
    argv = ["plan", "--analysis", str(analysis), "--kind", "retrieval", "--target-saving", "0.2", "--context", "96",
            "--out", str(tmp_path / "p.json")]
    assert main(argv) == 2
    assert "has no retrieval scores" in capsys.readouterr().err
    with pytest.raises(PodError, match="--kind retrieval needs retrieval scores"):
        from podkv.analysis.run import make_plan

        make_plan(AnalysisConfig(kind="retrieval", target_saving=0.2, length=96, last_q=8, ns=4, nr=16,
                                 proximal_sizes=(8,), context=96), torch.eye(2)[None].double())
