"""Every method runs end to end on a tiny model; budgets, KV bytes and model restoration hold."""

import pytest
import torch

import podkv
from podkv import SharingPlan
from podkv.cache.memory import dense_kv_bytes
from podkv.errors import PodError
from podkv.eval.generation import continuation_nll, greedy_answer
from podkv.eval.methods import METHODS, make_method
from peers import kvpress_or_skip
from tiny import tiny_model
from tolerances import KV8_NLL_REL

RUNNABLE = [m for m in METHODS if m not in ("kv8", "pod+kv8", "pod+kv4", "pod+kivi8", "pod+kivi4", "pod+kivi8r",
                                     "pod+kivi4r", "pod+kivi2r")]  # quantized methods: their own tests below
KVPRESS = ("kvpress-streaming", "snapkv", "h2o", "pyramidkv")
T = 160


from eval_fixtures import _one_thread, model  # noqa: F401  (pytest fixtures)


@pytest.fixture(scope="module")
def plan():
    return SharingPlan.uniform(4, 2, 2, ns=4, nr=28)


def _needs(name):
    if name in KVPRESS:
        kvpress_or_skip("the token-eviction baselines")


@pytest.mark.parametrize("name", RUNNABLE)
def test_method_end_to_end(model, plan, name):
    _needs(name)
    budget = None if name == "dense" else 0.85
    method = make_method(name, plan=plan, budget=budget)
    method.check(model.config, [T])
    ids = torch.randint(3, 120, (1, T), generator=torch.Generator().manual_seed(0))
    with method.attached(model):
        out, pre = greedy_answer(model, method, ids, 4)
        nll, n, _ = continuation_nll(model, method, ids[:, :100], ids[:, 100:])
    assert len(out) == 4 and all(0 <= t < 128 for t in out)
    assert pre.dense_bytes == dense_kv_bytes(model.config, T)
    if budget is None:
        assert pre.kv_bytes == pre.dense_bytes
    else:  # the KV held after prefill meets the budget (kvpress keeps int(T * budget) tokens)
        assert pre.kv_fraction <= budget + 1e-6
        assert pre.kv_fraction > 0.5
    assert n == T - 100 and torch.isfinite(torch.tensor(nll))
    assert model.config._attn_implementation == "sdpa"  # restored after the method


def test_pod_kv_bytes_match_plan(model, plan):
    method = make_method("pod", plan=plan)
    ids = torch.randint(3, 120, (1, T))
    with method.attached(model):
        _, pre = greedy_answer(model, method, ids, 1)
    assert pre.kv_fraction == pytest.approx(1 - plan.kv_saving(T))


def test_identity_plan_pod_equals_dense(model):
    ids = torch.randint(3, 120, (1, T), generator=torch.Generator().manual_seed(1))
    outs = {}
    for name in ("dense", "pod"):
        method = make_method(name, plan=SharingPlan.identity(4, 2, ns=4, nr=28))
        with method.attached(model):
            outs[name] = greedy_answer(model, method, ids, 6)[0]
    assert outs["dense"] == outs["pod"]


def test_budget_pod_cannot_meet_is_poderror(model, plan):
    with pytest.raises(PodError, match="cannot meet --budget"):
        make_method("pod", plan=plan, budget=0.3).check(model.config, [T])
    with pytest.raises(PodError, match="cannot meet --budget"):
        make_method("dense", budget=0.5).check(model.config, [T])
    with pytest.raises(PodError, match="budget"):
        make_method("snapkv", budget=1.5)


def test_unknown_method_and_pod_snapkv_budgets(model, plan):
    with pytest.raises(PodError, match="unknown method"):
        make_method("magic")
    with pytest.raises(PodError, match="needs --budget"):
        make_method("pod+snapkv", plan=plan).check(model.config, [T])
    with pytest.raises(PodError, match="cannot meet --budget 0.05"):
        make_method("pod+snapkv", plan=plan, budget=0.05).check(model.config, [T])


def test_pod_snapkv_holds_its_budget(model, plan):
    """Far below PoD's own saving: SnapKV evicts distant tokens until the PoD cache fits."""
    from podkv.cache.memory import pod_kv_bytes
    from podkv.cache.selection import kept_tokens_for_budget

    method = make_method("pod+snapkv", plan=plan, budget=0.4)
    method.check(model.config, [T])
    ids = torch.randint(3, 120, (1, T), generator=torch.Generator().manual_seed(2))
    with method.attached(model):
        out, pre = greedy_answer(model, method, ids, 5)
    kept = kept_tokens_for_budget(model.config, plan, T, 0.4)
    assert kept < T and pre.kv_fraction <= 0.4
    assert pre.kv_bytes == pod_kv_bytes(model.config, plan, kept)  # measured == formula at the kept length
    assert len(out) == 5


def test_attached_restores_a_pod_model(model, plan):
    from podkv import disable_pod, enable_pod

    enable_pod(model, plan)
    try:
        with make_method("dense").attached(model):
            assert model.config._attn_implementation == "sdpa"
        assert model.config._attn_implementation == "pod"
    finally:
        disable_pod(model)


def test_demo_needle_comparison_on_tiny_model(model, plan):
    """Runs without kvpress: the demo's StreamingLLM row is podkv's own method."""
    from podkv.eval.demo import _figure, _row, needle_compare
    from test_eval_prompts import CharTokenizer

    entries = needle_compare(model, CharTokenizer(), plan, length=400, samples=10, seed=0)
    assert list(entries) == ["dense", "pod", "streaming"]
    rows = [_row(m, e) for m, e in entries.items()]
    assert [r["n"] for r in rows] == [10, 10, 10]
    assert rows[0]["kv_fraction"] == 1.0
    assert all(r["kv_fraction"] <= r["budget"] + 1e-6 for r in rows[1:])
    assert rows[0]["depths"] == [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]
    assert all(r["seconds_per_prompt"] > 0 for r in rows)  # each method timed on its own
    for r in rows:
        lo, hi = r["ci95"]
        assert lo <= r["found"] / r["n"] <= hi
    _figure(rows, 400)


def test_interleaved_methods_score_as_one_after_another(model, plan):
    """The demo's turn-taking (interleave) changes only the order the cases run in: the same records, and each
    method is attached around its own cases (a PoD case after a dense one runs PoD)."""
    from podkv.eval.config import EvalConfig
    from podkv.eval.runner import _schedule, evaluate
    from test_eval_prompts import CharTokenizer

    cfg = EvalConfig(methods=("dense", "pod", "streaming"), tasks=("niah_single_prose",), lengths=(400,),
                     depths=tuple(round((i + 0.5) / 10, 4) for i in range(10)), samples=1, seed=0, budget=0.8,
                     compare=True)
    runs = [evaluate(model, CharTokenizer(), cfg, plan, progress=False, interleave=flag) for flag in (False, True)]
    for name in cfg.methods:
        one, other = (r[name]["tasks"]["niah_single_prose"]["records"] for r in runs)
        assert [(a["score"], a["kv_fraction"]) for a in one] == [(b["score"], b["kv_fraction"]) for b in other]
        assert all(r[name]["seconds"] > 0 for r in runs)
    order = [m for m, _, _ in _schedule(["a", "b", "c"], {"t": [0, 1, 2]}, interleave=True)]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_pod_method_runs_the_plan_in_its_own_mode(plan):
    """An adapted model trained in "scores" mode must be evaluated in that mode, not silently in "keys"."""
    from podkv.eval.methods import make_method

    scores = podkv.SharingPlan(plan.anchors, ns=plan.ns, nr=plan.nr, mode="scores")
    assert make_method("pod", plan=scores).sharing_plan().mode == "scores"
    assert make_method("pod", plan=plan).sharing_plan().mode == plan.mode
    assert make_method("pod-scores", plan=plan).sharing_plan().mode == "scores"


def _dense_keys(model, ids):
    from podkv.eval.generation import prefill

    method = make_method("dense")
    with method.attached(model):
        return prefill(model, method, ids)


def test_own_streaming_keeps_sinks_and_recent_tokens(model):
    """Every layer holds the dense keys/values of the 4 sinks and the last int(T * budget) - 4 tokens."""
    from podkv.eval.generation import prefill

    ids = torch.randint(3, 120, (1, T), generator=torch.Generator().manual_seed(3))
    dense = _dense_keys(model, ids)
    method = make_method("streaming", budget=0.5)
    method.check(model.config, [T])
    with method.attached(model):
        pre = prefill(model, method, ids)
    keep = int(T * 0.5)
    kept = torch.cat([torch.arange(4), torch.arange(T - (keep - 4), T)])
    for full, held in zip(dense.cache.layers, pre.cache.layers):
        assert held.keys.shape[-2] == keep
        assert torch.equal(held.keys, full.keys[..., kept, :]) and torch.equal(held.values, full.values[..., kept, :])
    assert pre.kv_fraction == pytest.approx(keep / T)
    assert torch.allclose(pre.next_logits, dense.next_logits)  # prefill itself is dense
    assert make_method("streaming").describe() == {"name": "streaming", "budget": None, "n_sink": 4}


def test_own_streaming_decodes_over_the_evicted_cache(model):
    """Greedy decoding after eviction equals dense attention restricted, by a mask, to the kept tokens."""
    ids = torch.randint(3, 120, (1, T), generator=torch.Generator().manual_seed(4))
    method = make_method("streaming", budget=0.6)
    with method.attached(model):
        out, pre = greedy_answer(model, method, ids, 3)
    keep = int(T * 0.6)
    mask = torch.zeros(1, T + 2, dtype=torch.long)
    mask[:, :4] = 1
    mask[:, T - (keep - 4):] = 1  # the kept prompt tokens and every generated one
    seq = torch.cat([ids, torch.tensor([out[:2]])], dim=1)
    with make_method("dense").attached(model), torch.no_grad():
        step = model(input_ids=seq[:, T:], attention_mask=mask, position_ids=torch.arange(T, T + 2)[None],
                     past_key_values=_dense_keys(model, ids).cache)
    assert step.logits[0].argmax(-1).tolist() == out[1:]


def test_own_streaming_refuses_a_budget_below_its_sinks(model):
    with pytest.raises(PodError, match="cannot meet --budget 0.02 at 160 tokens"):
        make_method("streaming", budget=0.02).check(model.config, [T])


def test_own_streaming_matches_kvpress(model):
    """Same tokens kept as kvpress's StreamingLLMPress: same answers, same KV held (where kvpress runs)."""
    kvpress_or_skip("the kvpress StreamingLLM reference")
    ids = torch.randint(3, 120, (1, T), generator=torch.Generator().manual_seed(5))
    runs = {}
    for name in ("streaming", "kvpress-streaming"):
        method = make_method(name, budget=0.5)
        with method.attached(model):
            runs[name] = greedy_answer(model, method, ids, 6)
    (own, own_pre), (ref, ref_pre) = runs["streaming"], runs["kvpress-streaming"]
    assert own == ref and own_pre.kv_bytes == ref_pre.kv_bytes


def test_kvpress_baselines_listed_only_where_kvpress_is(monkeypatch):
    from podkv.eval import methods
    from podkv.eval.cli import COMPARE_METHODS, compare_methods

    monkeypatch.setattr(methods, "kvpress_available", lambda: False)
    assert compare_methods(COMPARE_METHODS) == ("dense", "pod", "streaming")
    assert compare_methods(("dense", "snapkv")) == ("dense", "snapkv")  # asked by name: the check explains
    monkeypatch.setattr(methods, "kvpress_available", lambda: True)
    assert compare_methods(COMPARE_METHODS) == COMPARE_METHODS


def test_kv8_holds_a_quarter_and_keeps_the_answer(model):
    """8-bit KV peer (HQQ through transformers' QuantizedCache): bytes counted from the packed tensors and their
    scales match the formula (hqq is installed by scripts/env.sh: its absence fails here); the continuation NLL stays within 1% of dense."""
    ids = torch.randint(3, 120, (1, T), generator=torch.Generator().manual_seed(0))
    nlls = {}
    for name in ("dense", "kv8"):
        method = make_method(name)
        method.check(model.config, [T])
        with method.attached(model):
            _, pre = greedy_answer(model, method, ids, 2)
            nlls[name], _, _ = continuation_nll(model, method, ids[:, :100], ids[:, 100:])
        if name == "kv8":
            # measured = formula: 8 of 32 bits per element, plus an fp32 scale and zero per group of 64
            assert pre.kv_fraction == pytest.approx(8 / 32 + 2 / METHODS["kv8"].group)
    assert nlls["kv8"] == pytest.approx(nlls["dense"], rel=KV8_NLL_REL)


@pytest.mark.parametrize("quantized, bits", [("pod+kv8", 8), ("pod+kv4", 4), ("pod+kivi8", 8), ("pod+kivi4", 4),
                                             ("pod+kivi4r", 4), ("pod+kivi2r", 2)])
def test_pod_kv8_holds_the_formula_and_tracks_pod(model, plan, quantized, bits):
    """PoD over an 8- or 4-bit PodCache: measured bytes = the formula for the plan in that many bits, NLL within 1%
    of PoD's."""
    from podkv.cache.memory import pod_kv_bytes

    ids = torch.randint(3, 120, (1, T), generator=torch.Generator().manual_seed(0))
    nlls = {}
    for name in ("pod", quantized):
        method = make_method(name, plan=plan, budget=0.5 if name == quantized else None)
        method.check(model.config, [T])
        with method.attached(model):
            _, pre = greedy_answer(model, method, ids, 2)
            nlls[name], _, _ = continuation_nll(model, method, ids[:, :100], ids[:, 100:])
    assert method.describe()["kv_bits"] == bits
    group, keys = METHODS[quantized]().group_for(model.config), METHODS[quantized].key_quant
    assert pre.kv_bytes == pod_kv_bytes(model.config, plan, T, kv_bits=bits, kv_group=group, key_quant=keys,
                                        kv_keep_proximal=METHODS[quantized].keep_proximal)
    assert nlls[quantized] == pytest.approx(nlls["pod"], rel=KV8_NLL_REL)


def test_kv8_refuses_a_budget(model):
    with pytest.raises(PodError, match="kv8"):
        make_method("kv8", budget=0.5).check(model.config, [T])


@pytest.mark.parametrize("name", ["streaming", "pod", "pod+snapkv", "snapkv", "pyramidkv"])
def test_continuation_over_a_smaller_cache_equals_token_by_token(model, plan, name):
    """The continuation's one forward over an evicting cache scores what S one-token steps score: RoPE at the
    true positions, the causal mask over the slots the cache holds (a mask built from positions let every
    target token see the later ones: streaming's NLL was +128% of dense on 4K windows before this)."""
    from podkv.eval.generation import prefill
    from podkv.eval.scoring import token_nll
    from tolerances import STEPWISE_NLL_REL

    _needs(name)
    method = make_method(name, plan=plan, budget=None if name == "pod" else 0.5)
    ids = torch.randint(3, 120, (1, T), generator=torch.Generator().manual_seed(1))
    ctx, target = ids[:, :100], ids[:, 100:]
    with method.attached(model), torch.no_grad():
        nll, n, _ = continuation_nll(model, method, ctx, target)
        pre = prefill(model, method, ctx)
        steps = [pre.next_logits[:, None]]
        for i in range(target.shape[1] - 1):
            pos = torch.tensor([[100 + i]])
            steps.append(model(input_ids=target[:, i:i + 1], past_key_values=pre.cache, position_ids=pos,
                               cache_position=pos[0], use_cache=True).logits.float())
    stepwise = token_nll(torch.cat(steps, dim=1)[0], target[0])
    assert nll == pytest.approx(stepwise, rel=STEPWISE_NLL_REL)
