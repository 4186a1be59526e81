"""`podkv bench speed`: prefill latency and decode speed, dense SDPA vs PoD, plus one layer's attention alone.

The CPU is shared, so the compared methods alternate inside every repetition (dense, PoD, then PoD,
dense, ...) and results are medians with their spread. Decode is timed on two models (the dense one
and a PoD copy) each holding its own prefilled cache, stepping in turn.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from podkv.attention.chunked import KeySources, pod_attention_chunked
from podkv.attention.decode import pod_decode
from podkv.bench.common import new_cache, stats, timed, token_ids
from podkv.bench.report import md_table, plot_lines
from podkv.cache.memory import dense_kv_bytes
from podkv.errors import PodError
from podkv.plan import SharingPlan


@dataclass
class SpeedConfig:
    prefill_lengths: tuple[int, ...] = (512, 1024, 2048)
    decode_lengths: tuple[int, ...] = (1024, 4096)
    decode_steps: int = 12
    batches: tuple[int, ...] = (1,)  # decode batch sizes (rows copied from one prefilled prompt)
    reps: int = 3
    attn_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    attn_reps: int = 5
    chunk: int = 128  # PoD prefill query chunk: smaller wastes fewer masked scores (512: ~1.6-2x dense attention)

    def __post_init__(self):
        for name in ("prefill_lengths", "decode_lengths", "attn_lengths"):
            if any(t < 1 for t in getattr(self, name)):
                raise PodError(f"bench speed field '{name}' must hold positive lengths, got {getattr(self, name)}")
        if any(b < 1 for b in self.batches):
            raise PodError(f"bench speed field 'batches' must hold batch sizes >= 1, got {self.batches}")
        if self.reps < 1 or self.decode_steps < 1 or self.attn_reps < 1 or self.chunk < 1:
            raise PodError("bench speed needs reps, decode_steps, attn_reps and chunk >= 1")


def pod_copy(model, plan, chunk: int):
    """A second model with PoD enabled, sharing nothing mutable with ``model`` (which stays dense)."""
    from podkv.models.enable import disable_pod, enable_pod  # startup: transformers

    disable_pod(model)
    return enable_pod(copy.deepcopy(model), plan, chunk=chunk)


def ratio_rows(times: dict, key: str) -> list[dict]:
    """times[(T, method)] or times[(T, batch, method)] -> list of seconds; one row per (T[, batch]) with
    median stats and the PoD/dense ratio."""
    rows = []
    for k in sorted({k[:-1] for k in times}):
        d, p = stats(times[(*k, "dense")]), stats(times[(*k, "pod")])
        rows.append({key: k[0], **({"batch": k[1]} if len(k) > 1 else {}), "dense": d, "pod": p,
                     "ratio": p["median"] / d["median"]})
    return rows


@torch.no_grad()
def time_prefill(models: dict, tok, lengths, reps) -> list[dict]:
    times = {}
    for rep in range(reps + 1):  # rep 0 warms up (allocator, kernels) and is dropped
        for T in lengths:
            ids = token_ids(tok, models["dense"].config.vocab_size, 1, T, seed=rep)
            for method in (("dense", "pod") if rep % 2 == 0 else ("pod", "dense")):
                cache = new_cache(models[method], method, models["pod"].pod_runtime.plan)
                t, _ = timed(lambda: models[method](ids, past_key_values=cache, logits_to_keep=1))
                if rep:
                    times.setdefault((T, method), []).append(t)
            if rep == 0:
                break  # one warm-up length is enough
    return ratio_rows(times, "T")


@torch.no_grad()
def time_decode(models: dict, tok, lengths, steps, batches=(1,), warmup: int = 2) -> list[dict]:
    """Decode step time per (context, batch). Each method prefills one prompt once, and its cache is copied
    into the batch's rows (``batch_repeat_interleave``): a step costs the same whatever the rows hold, and
    prefilling 8 x 8K tokens per method would take minutes on 2 cores."""
    times = {}
    plan = models["pod"].pod_runtime.plan
    room = models["dense"].config.max_position_embeddings - warmup - steps - 1  # positions the steps need
    for T in lengths:
        ids = token_ids(tok, models["dense"].config.vocab_size, 1, min(T, room))  # "8K" at an 8K model: 8192 - steps
        prompt = {}
        for method in ("dense", "pod"):
            cache = new_cache(models[method], method, plan)
            out = models[method](ids, past_key_values=cache, logits_to_keep=1)
            prompt[method] = (cache, out.logits[:, -1:].argmax(-1))
        for B in batches:
            state = {}
            for method, (cache, nxt) in prompt.items():
                cache = copy.deepcopy(cache)
                if B > 1:
                    cache.batch_repeat_interleave(B)
                state[method] = (cache, nxt.repeat(B, 1))
            for step in range(warmup + steps):
                for method in (("dense", "pod") if step % 2 == 0 else ("pod", "dense")):
                    cache, nxt = state[method]
                    t, out = timed(lambda: models[method](nxt, past_key_values=cache))
                    state[method] = (cache, out.logits[:, -1:].argmax(-1))
                    if step >= warmup:
                        times.setdefault((T, B, method), []).append(t)
            del state
        del prompt
    rows = ratio_rows(times, "T")
    for r in rows:
        r["prompt_tokens"] = min(r["T"], room)
        r["dense_tok_s"], r["pod_tok_s"] = r["batch"] / r["dense"]["median"], r["batch"] / r["pod"]["median"]
    return rows


@torch.no_grad()
def time_attention(config, plan, lengths, reps, decode: bool, chunk: int) -> list[dict]:
    """One layer's attention: SDPA (causal, GQA) vs PoD with every head reading another layer's keys.

    Prefill runs ``pod_attention_chunked``; decode runs the model's one-token path (PodCache append +
    decode.py) on a two-layer PodCache whose second layer borrows the first layer's distant keys,
    against a dense step that appends to its cache (DynamicCache's cat) and runs SDPA.
    """
    Hq, H = config.num_attention_heads, plan.num_kv_heads
    D = getattr(config, "head_dim", None) or config.hidden_size // Hq
    times = {}
    for T in lengths:
        g = torch.Generator().manual_seed(T)
        Tq = 1 if decode else T
        q = torch.randn(1, Hq, Tq, D, generator=g)
        k, v, ka = (torch.randn(1, H, T, D, generator=g) for _ in range(3))
        if decode:
            pod = _decode_step_fn(q, k, v, ka, plan, D ** -0.5)
        else:
            src = KeySources(own_keys=k, own_start=0, values=v, anchor_keys=[(ka, h) for h in range(H)])
            pad = torch.zeros(1, dtype=torch.long)
            pod = lambda: pod_attention_chunked(q, 0, src, pad=pad, ns=plan.ns, nr=plan.nr,  # noqa: E731
                                                scale=D ** -0.5, chunk=chunk)
        fns = {"dense": (lambda: _dense_decode_step(q, k, v)) if decode else
               (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)), "pod": pod}
        for rep in range(reps + 1):
            for method in (("dense", "pod") if rep % 2 == 0 else ("pod", "dense")):
                t, _ = timed(fns[method])
                if rep:
                    times.setdefault((T, method), []).append(t)
    return ratio_rows(times, "T")


def _dense_decode_step(q, k, v):
    """What a dense layer does per decode step: append the new token (DynamicCache's cat), then SDPA."""
    keys = torch.cat([k[:, :, :-1], k[:, :, -1:]], dim=2)
    values = torch.cat([v[:, :, :-1], v[:, :, -1:]], dim=2)
    return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)


def _decode_step_fn(q, k, v, ka, plan, scale):
    """A callable running PoD's decode step for query ``q`` over T cached tokens (the step's state is
    restored after each call, so repetitions time the same step)."""
    from podkv.cache.pod_cache import PodCache  # startup: transformers

    H, T = k.shape[1], k.shape[2]
    two = SharingPlan(anchors=[[0] * H, [0] * H], ns=plan.ns, nr=plan.nr)
    cache = PodCache(_TwoLayerConfig(H, q.shape[1], k.shape[-1]), two)
    cache.pad = torch.zeros(1, dtype=torch.long)
    for layer, (keys, values) in enumerate(((ka[:, :, :-1], v[:, :, :-1]), (k[:, :, :-1], v[:, :, :-1]))):
        cache.layers[layer].update(keys, values)
    store = cache.layers[1]

    def step():
        state = (store.v, store.k_prox, store.prox_idx, store.seen)
        _, values = store.update(k[:, :, -1:], v[:, :, -1:])
        out = pod_decode(values.pod_step, q, k[:, :, -1:], scale)
        store.v, store.k_prox, store.prox_idx, store.seen = state
        return out
    return step


class _TwoLayerConfig:
    """Just what ``SharingPlan.validate_for`` reads, for the two-layer decode microbenchmark."""

    def __init__(self, kv_heads, heads, head_dim):
        self.num_hidden_layers, self.num_key_value_heads, self.num_attention_heads = 2, kv_heads, heads
        self.head_dim, self.hidden_size, self.max_position_embeddings = head_dim, heads * head_dim, 1 << 20


# Issue 19's goals for the shipped model, PoD time / dense time: decode by (context, batch), prefill by context.
DECODE_GOALS = {(4096, 8): 0.85, (8192, 8): 0.85, (8192, 1): 0.95, (4096, 1): 1.0}
PREFILL_GOAL = 1.0


def run_speed(model, tok, plan, cfg: SpeedConfig) -> dict:
    """Dense and PoD on the same weights, alternating. The attention microbenchmarks time a keys-mode
    shared layer; a scores-mode plan's layers are timed only inside the model (they need their block)."""
    models = {"dense": model, "pod": pod_copy(model, plan, cfg.chunk)}
    jobs = [("prefill", lambda: time_prefill(models, tok, cfg.prefill_lengths, cfg.reps)),
            ("decode", lambda: time_decode(models, tok, cfg.decode_lengths, cfg.decode_steps, cfg.batches))]
    if plan.mode == "keys" and cfg.attn_lengths:
        jobs[:0] = [("attention_prefill", lambda: time_attention(model.config, plan, cfg.attn_lengths, cfg.attn_reps,
                                                                 decode=False, chunk=cfg.chunk)),
                    ("attention_decode", lambda: time_attention(model.config, plan, cfg.attn_lengths, cfg.attn_reps,
                                                                decode=True, chunk=cfg.chunk))]
    parts = {}
    with tqdm(total=len(jobs), desc="bench speed", leave=False) as bar:
        for name, fn in jobs:
            parts[name] = fn()
            bar.update()
    for r in parts["decode"]:
        goal = DECODE_GOALS.get((r["T"], r["batch"]))
        r["goal"], r["goal_met"] = goal, None if goal is None else r["ratio"] <= goal
        r["bytes_ratio"] = step_bytes_ratio(model, plan, r["T"], r["batch"])
    for r in parts["prefill"]:
        r["goal"], r["goal_met"] = PREFILL_GOAL, r["ratio"] <= PREFILL_GOAL
        r["pod_feed"] = prefill_feed(models["pod"], plan, r["T"])  # the PoD copy: the dense model has no runtime
    longest = max(parts["decode"], key=lambda r: (r["T"], -r["batch"]))
    goals = {"prefill_ratio_max": max(r["ratio"] for r in parts["prefill"]),
             "decode_ratio_at_longest": longest["ratio"], "decode_longest_T": longest["T"]}
    goals["prefill_goal_met"] = goals["prefill_ratio_max"] <= 1.15
    goals["decode_goal_met"] = goals["decode_ratio_at_longest"] <= 1.10
    chunk = models["pod"].pod_runtime.prefill_chunk  # None: chunked_forward.py's rule (one_forward)
    return {**parts, "goals": goals, "plan_mode": plan.mode, "prefill_chunk": chunk if plan.mode == "scores" else None}


def prefill_feed(model, plan, T: int) -> str:
    """How a T-token prompt goes through PoD (models/chunked_forward.py): one forward, or steps of N tokens."""
    from podkv.models.chunked_forward import compiled_prefill, one_forward  # startup: transformers

    runtime = getattr(model, "pod_runtime", None)
    if runtime is None:
        raise PodError("prefill_feed needs the PoD model (enable_pod), got a model without a PoD runtime")
    compiled = compiled_prefill(model, 1, "cpu")
    if plan.mode != "scores" or one_forward(runtime, T, compiled=compiled):
        return "one forward, compiled kernel" if compiled else "one forward"
    return f"{runtime.prefill_chunk or plan.nr}-token steps"


def step_bytes_ratio(model, plan, T: int, batch: int) -> float:
    """Bytes a decode step reads, PoD / dense (fp32): weights once, plus the KV each attends over. In scores
    mode a block reads its anchor's keys once, and every layer's values; dense reads every key and value.
    The limit a memory-bound step can reach."""
    weights = 4 * sum(p.numel() for p in model.parameters())  # tied embeddings are one parameter
    dense_kv = dense_kv_bytes(model.config, T, batch, torch.float32)
    pairs = plan.num_layers * plan.num_kv_heads
    anchors = sum(plan.is_anchor(l, h) for l in range(plan.num_layers) for h in range(plan.num_kv_heads))
    pod_kv = dense_kv * (0.5 + 0.5 * anchors / pairs) if plan.mode == "scores" else dense_kv
    return (weights + pod_kv) / (weights + dense_kv)


def speed_markdown(result: dict) -> str:
    out = [f"Plan mode: {result.get('plan_mode', 'keys')}; dense prefill in one forward, PoD as its row's "
           "'PoD fed' says (models/chunked_forward.py)."]
    for name, unit, scale in (("prefill", "s", 1), ("decode", "ms/step", 1e3),
                              ("attention_prefill", "ms", 1e3), ("attention_decode", "µs", 1e6)):
        if name not in result:
            continue
        rows = [{"T": r["T"], "batch": r.get("batch", 1), "dense": r["dense"]["median"] * scale,
                 "pod": r["pod"]["median"] * scale, "dense_spread": _spread(r["dense"], scale),
                 "pod_spread": _spread(r["pod"], scale), "ratio": r["ratio"], "n": r["dense"]["n"],
                 "goal": _goal(r), "limit": r.get("bytes_ratio", float("nan")), "feed": r.get("pod_feed", "–")}
                for r in result[name]]
        cols = [("T", "context"), ("batch", "batch"), ("dense", f"dense median {unit}"), ("dense_spread", "dense min–max"),
                ("pod", f"PoD median {unit}"), ("pod_spread", "PoD min–max"), ("ratio", "PoD/dense"), ("goal", "goal"),
                ("n", "reps")]
        if name == "decode":
            cols.insert(7, ("limit", "bytes-read limit"))
        if name == "prefill":
            cols.insert(4, ("feed", "PoD fed"))
        out.append(f"**{name.replace('_', ' ')}**\n\n" + md_table(rows, cols))
    return "\n\n".join(out)


def _goal(r: dict) -> str:
    if r.get("goal") is None:
        return "–"
    return f"≤ {r['goal']:.2f}: {'met' if r['goal_met'] else 'missed'}"


def _spread(s: dict, scale: float) -> str:
    return f"{s['min'] * scale:.3g}–{s['max'] * scale:.3g}"


def speed_plot(result: dict, path) -> None:
    series = {name: ([r["T"] for r in result[name]], [r["ratio"] for r in result[name]])
              for name in ("prefill", "attention_prefill", "attention_decode") if name in result}
    for B in sorted({r.get("batch", 1) for r in result["decode"]}):
        rows = [r for r in result["decode"] if r.get("batch", 1) == B]
        series[f"decode, batch {B}"] = ([r["T"] for r in rows], [r["ratio"] for r in rows])
    plot_lines(path, series, "context length (tokens)", "PoD / dense time (median)", "Speed ratio", logx=True)
