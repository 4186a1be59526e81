"""Per-pair ablation: which shared (layer, KV head) pairs of a plan cost answers, measured directly.

Attention similarity and retrieval scores (``podkv analyze``) predict what sharing costs; an ablation
measures it. For every shared pair the plan's block is split there (the pair becomes an anchor and the
layers above it in the block read its keys: one more anchor, blocks stay consecutive) and the
teacher-forced answer log-prob is compared with the plan's. Why: the shipped ``smollm2-pod`` loses
variable tracking (RULER ``vt``) although its plan shares the pairs least needed by single lookups;
without training, its plan alone takes ``vt`` at 1K from 32% to 1% (issue 19).

The prompts are the training data's multi-hop ``track`` and multi-value ``multilookup`` documents in the
*plan* split's prose: no evaluation prompt is seen, so a plan chosen from the ablation can be checked on
the RULER-style tasks.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from podkv import texts
from podkv.errors import PodError
from podkv.plan import SharingPlan
from podkv.training import longrange

KINDS = ("track", "multilookup")


@dataclass
class AnswerPrompt:
    input_ids: list[int]  # the document, its final question and the teacher-forced answer
    answer_tokens: int  # the answer is the last answer_tokens ids
    kind: str


def check_prompt_count(count: int) -> None:
    """Refuse a prompt count the ablation cannot use (the CLI asks before it loads a model)."""
    if count < 2:
        raise PodError(f"--prompts must be at least 2 (one of each kind), got {count}")


def answer_prompts(tok, count: int, length: int, seed: int = 0) -> list[AnswerPrompt]:
    """``count`` prompts of exactly ``length`` tokens, ``track`` and ``multilookup`` alternating."""
    check_prompt_count(count)
    rng = random.Random(seed)
    stream = list(tok.encode(texts.text("plan"), add_special_tokens=False))
    if len(stream) < 4 * length:
        raise PodError(f"--length {length} is too long for the plan split ({len(stream)} tokens)")
    out = []
    for i in range(count):
        start = rng.randrange(0, len(stream) - 4 * length)
        piece = stream[start:start + 2 * length]
        kind = KINDS[i % 2]
        if kind == "track":
            state = rng.getstate()
            first = longrange.track_texts(rng)[2][0]  # the asked chain's first name starts the answer
            rng.setstate(state)  # track_document draws the same texts again
            ids = longrange.track_document(tok, piece, length, rng)
            n = _suffix(tok, ids, lambda s: s.strip().startswith(first))
        else:  # the answer is the trailing list of numbers
            ids = longrange.multilookup_document(tok, piece, length, rng)
            n = _suffix(tok, ids, lambda s: not re.fullmatch(r"[\d,. ]*", s)) - 1
        out.append(AnswerPrompt(ids, max(1, n), kind))
    return out


def _suffix(tok, ids: list[int], stop, limit: int = 64) -> int:
    """The shortest suffix length whose text meets ``stop`` (at most ``limit``)."""
    n = 1
    while n < limit and not stop(tok.decode(ids[-n:])):
        n += 1
    return n


@torch.no_grad()
def answer_logprobs(model, prompts: list[AnswerPrompt]) -> list[float]:
    """Mean log-prob per answer token of each prompt: one forward each, no cache, vocabulary only on answer rows."""
    out = []
    device = next(model.parameters()).device
    for p in prompts:
        x = torch.tensor([p.input_ids], device=device)
        n = p.answer_tokens
        hidden = model.model(x, use_cache=False).last_hidden_state[0, -n - 1:-1]
        logp = torch.log_softmax(model.lm_head(hidden).float(), -1)
        out.append(float(logp.gather(-1, x[0, -n:, None]).mean()))
    return out


def pair_ablation(model, plan: SharingPlan, prompts: list[AnswerPrompt], progress: bool = True) -> dict:
    """Answer log-probs under dense attention, under ``plan``, and with each shared pair's block split."""
    from podkv.eval.methods import attention_mode  # startup: transformers

    with attention_mode(model, impl="sdpa"):
        dense = answer_logprobs(model, prompts)
    with attention_mode(model, plan=plan):
        base = answer_logprobs(model, prompts)
    pairs = [(l, h) for l in range(plan.num_layers) for h in range(plan.num_kv_heads)
             if plan.policy(l, h) == "shared"]
    rows = []
    for l, h in tqdm(pairs, desc="pairs", disable=not progress):
        with attention_mode(model, plan=plan.split_block(l, h)):
            lp = answer_logprobs(model, prompts)
        delta = [a - b for a, b in zip(lp, base)]
        row = {"layer": l, "head": h, "anchor": plan.anchors[l][h], "delta": sum(delta) / len(delta)}
        for kind in KINDS:
            d = [x for x, p in zip(delta, prompts) if p.kind == kind]
            row[f"delta_{kind}"] = sum(d) / len(d)
        rows.append(row)
    return {"dense": dense, "plan": base, "kinds": [p.kind for p in prompts], "pairs": rows}


def add_anchors(plan: SharingPlan, pairs: list[dict], k: int) -> SharingPlan:
    """``plan`` with the ``k`` splits that helped answers most (largest ``delta`` first), one after another."""
    if k < 1:
        raise PodError(f"--add-anchors must be at least 1, got {k}")
    ranked = sorted(pairs, key=lambda r: -r["delta"])
    added = []
    for r in ranked:
        if len(added) == k:
            break
        l, h = int(r["layer"]), int(r["head"])
        if not (0 <= l < plan.num_layers and 0 <= h < plan.num_kv_heads):
            raise PodError(f"ablation pair (layer {l}, head {h}) is outside the plan's "
                           f"{plan.num_layers} x {plan.num_kv_heads} grid: the ablation was made for another plan")
        if plan.policy(l, h) != "shared":
            continue  # an earlier split made it an anchor already
        plan = plan.split_block(l, h)
        added.append([l, h])
    if len(added) < k:
        raise PodError(f"--add-anchors {k}: the ablation lists only {len(added)} pairs that are shared in this plan")
    plan.meta = {**plan.meta, "added_anchors": added}
    return plan


def markdown(result: dict) -> str:
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    rows = sorted(result["pairs"], key=lambda r: -r["delta"])
    lines = [f"# Per-pair ablation of `{result['model']}` with plan `{result['plan_name']}`", "",
             f"{len(result['dense'])} prompts of {result['length']} tokens (plan-split prose, seed {result['seed']}); "
             f"answer log-prob per token: dense attention {mean(result['dense']):+.4f}, the plan "
             f"{mean(result['plan']):+.4f}. Δ: splitting the pair's block there, minus the plan (higher helps).", "",
             "| layer | KV head | anchor | Δ all | Δ track | Δ multilookup |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['head']} | {r['anchor']} | {r['delta']:+.4f} | {r['delta_track']:+.4f} | "
              f"{r['delta_multilookup']:+.4f} |" for r in rows]
    return "\n".join(lines) + "\n"


def figure(result: dict, layers: int, heads: int, path) -> None:
    """Heat map of Δ answer log-prob per (layer, KV head); anchors blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from podkv.io import save_figure

    grid = torch.full((layers, heads), float("nan"))
    for r in result["pairs"]:
        grid[r["layer"], r["head"]] = r["delta"]
    fig, ax = plt.subplots(figsize=(2.4 + 0.6 * heads, 0.25 * layers + 1.5))
    lim = max(1e-6, float(grid.nan_to_num(0).abs().max()))
    im = ax.imshow(grid.numpy(), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(f"{result['model']}: Δ answer log-prob when a shared\npair gets its own keys (anchors blank)", fontsize=9)
    fig.colorbar(im, ax=ax, label="nats per answer token")
    save_figure(fig, path)
