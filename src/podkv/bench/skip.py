"""`podkv bench skip`: gate skipping swept over tau (paper §2.3, Figure 4).

For each tau: the share of shared heads' distant passes skipped, decode step time (interleaved with
plain PoD and with the gate-skip path that never skips, tau > 1, so the saving from skipping is
separated from the two-pass kernel itself), teacher-forced perplexity of held-out text computed in
decode steps (skipping only acts there), and passkey accuracy (the eval task's prompts) with the key
beyond the recent window.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from podkv.bench.common import new_cache, stats, timed, token_ids
from podkv.bench.report import md_table, plot_lines
from podkv.errors import PodError
from podkv.eval import tasks
from podkv.eval.scoring import perplexity as ppl, token_nll

NEVER = 1.01  # tau > 1: the gate-skip path that never skips


@dataclass
class SkipConfig:
    taus: tuple[float, ...] = (NEVER, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0)
    context: int = 4096
    steps: int = 8
    ppl_prefix: int = 1024
    ppl_tokens: int = 48
    passkeys: int = 3
    passkey_length: int = 2048  # tokens of each passkey prompt
    predictor: str = "anchor_gate"

    def __post_init__(self):
        if any(t < 0 for t in self.taus):
            raise PodError(f"bench skip field 'taus' must be >= 0, got {self.taus}")
        if self.context < 2 or self.steps < 1 or self.ppl_prefix < 1 or self.ppl_tokens < 1:
            raise PodError("bench skip needs context >= 2 and steps, ppl_prefix, ppl_tokens >= 1")
        if self.passkeys < 0:
            raise PodError(f"bench skip field 'passkeys' must be >= 0, got {self.passkeys}")


def _methods(taus):
    """Label -> skip_tau: plain PoD (None) first, then the sweep."""
    return {"pod": None, **{f"tau={t:g}" if t != NEVER else "never (tau>1)": t for t in taus}}


@torch.no_grad()
def time_decode(model, tok, plan, methods: dict, T: int, steps: int, warmup: int = 2) -> dict:
    """Interleaved decode steps of every method, each on its own copy of one prefilled PodCache."""
    rt = model.pod_runtime
    ids = token_ids(tok, model.config.vocab_size, 1, T)
    rt.skip_tau = None
    base = new_cache(model, "pod", plan)
    nxt = model(ids, past_key_values=base, logits_to_keep=1).logits[:, -1:].argmax(-1)
    state = {m: (copy.deepcopy(base), nxt) for m in methods}
    del base
    times, counts = {m: [] for m in methods}, {m: [0, 0] for m in methods}
    names = list(methods)
    for step in range(warmup + steps):
        for m in names[step % len(names):] + names[:step % len(names)]:  # rotate the order every step
            cache, tokn = state[m]
            rt.skip_tau = methods[m]
            rt.skip.reset()
            t, out = timed(lambda: model(tokn, past_key_values=cache))
            state[m] = (cache, out.logits[:, -1:].argmax(-1))
            if step >= warmup:
                times[m].append(t)
                counts[m][0] += rt.skip.skipped_passes
                counts[m][1] += rt.skip.shared_passes
    rt.skip_tau = None
    return {m: {"step": stats(times[m]), "skip_share": counts[m][0] / max(1, counts[m][1])} for m in methods}


@torch.no_grad()
def perplexity(model, tok, plan, methods: dict, prefix: int, n: int) -> dict:
    """Teacher-forced next-token perplexity of ``n`` tokens after a ``prefix``-token prompt, in decode steps.

    Decode steps, not :func:`podkv.eval.scoring.window_nll`'s one forward: skipping acts only there.
    """
    ids = token_ids(tok, model.config.vocab_size, 1, prefix + n + 1, seed=1)
    base = new_cache(model, "dense" if methods == DENSE else "pod", plan)
    rt = getattr(model, "pod_runtime", None)
    _set_tau(rt, None)
    first = model(ids[:, :prefix], past_key_values=base, logits_to_keep=1).logits[:, -1]
    out = {}
    for m, tau in methods.items():
        cache, logits = copy.deepcopy(base), [first]
        _set_tau(rt, tau)
        for i in range(prefix, prefix + n - 1):
            logits.append(model(ids[:, i:i + 1], past_key_values=cache).logits[:, -1])
        out[m] = ppl(token_nll(torch.cat(logits), ids[0, prefix:prefix + n]), n)  # (n, V) against (n,)
    _set_tau(rt, None)
    return out


DENSE = {"dense": None}  # methods dict meaning: the stock model with a DynamicCache


def _set_tau(runtime, tau):
    if runtime is not None:
        runtime.skip_tau = tau


@torch.no_grad()
def passkey(model, tok, plan, methods: dict, prompts: int, length: int) -> dict | None:
    """Share of ``podkv eval passkey``'s prompts (``length`` tokens, key in the first half, so beyond the
    recent window) answered exactly in 8 greedy tokens, per method; each method decodes from one prefill."""
    if tok is None:
        return None
    task, hits = tasks.Passkey(), {m: 0 for m in methods}
    cases = tasks.passkey_cases(tok, length, [0.5 * (i + 0.5) / prompts for i in range(prompts)]) if prompts else []
    for case in cases:
        ids = torch.tensor([case.input_ids])  # (1, length)
        base = new_cache(model, "dense" if methods == DENSE else "pod", plan)
        rt = getattr(model, "pod_runtime", None)  # dense runs without PoD, PoD with it
        _set_tau(rt, None)
        first = model(ids, past_key_values=base, logits_to_keep=1).logits[:, -1:].argmax(-1)
        for m, tau in methods.items():
            _set_tau(rt, tau)
            cache, nxt, toks = copy.deepcopy(base), first, [first.item()]
            for _ in range(7):
                nxt = model(nxt, past_key_values=cache).logits[:, -1:].argmax(-1)
                toks.append(nxt.item())
            hits[m] += task.score(tok.decode(toks, skip_special_tokens=True), case.answer)
        _set_tau(rt, None)
    return {m: h / max(1, prompts) for m, h in hits.items()}


def run_skip(model, tok, plan, cfg: SkipConfig) -> dict:
    from podkv.models.enable import disable_pod  # startup: transformers

    if plan.mode != "keys":  # scores mode reuses the anchor's distant scores: there is no distant pass to skip
        raise PodError(f"bench skip: gate skipping applies to plans of mode 'keys' (a shared head's own distant "
                       f"pass over the anchor's keys); this plan has mode {plan.mode!r}, where it would skip nothing")
    dense_ppl = perplexity(model, tok, plan, DENSE, cfg.ppl_prefix, cfg.ppl_tokens)["dense"]
    dense_keys = passkey(model, tok, plan, DENSE, cfg.passkeys, cfg.passkey_length)
    new_cache(model, "pod", plan)  # enables PoD on the model
    model.pod_runtime.skip.predictor = cfg.predictor
    methods = _methods(cfg.taus)
    try:
        timing = time_decode(model, tok, plan, methods, cfg.context, cfg.steps)
        ppl = perplexity(model, tok, plan, methods, cfg.ppl_prefix, cfg.ppl_tokens)
        keys = passkey(model, tok, plan, methods, cfg.passkeys, cfg.passkey_length)
    finally:
        disable_pod(model)
    pod_ms, never_ms = timing["pod"]["step"]["median"], timing[_never_label(methods)]["step"]["median"]
    rows = [{"method": m, "tau": tau, "skip_share": timing[m]["skip_share"], "step_ms": timing[m]["step"]["median"] * 1e3,
             "step_min_ms": timing[m]["step"]["min"] * 1e3, "step_max_ms": timing[m]["step"]["max"] * 1e3,
             "vs_pod": timing[m]["step"]["median"] / pod_ms, "vs_never": timing[m]["step"]["median"] / never_ms,
             "ppl": ppl[m], "ppl_change_pct": 100 * (ppl[m] / ppl["pod"] - 1),
             "passkey": None if keys is None else keys[m]} for m, tau in methods.items()]
    rows.insert(0, {"method": "dense (reference)", "tau": None, "ppl": dense_ppl,
                    "ppl_change_pct": 100 * (dense_ppl / ppl["pod"] - 1),
                    "passkey": None if dense_keys is None else dense_keys["dense"]})
    at07 = next((r for r in rows if r["tau"] == 0.7), None)
    return {"rows": rows, "context": cfg.context, "predictor": cfg.predictor, "ppl_prefix": cfg.ppl_prefix,
            "ppl_tokens": cfg.ppl_tokens, "passkeys": cfg.passkeys,
            "goal_tau07_faster_than_pod": None if at07 is None else at07["vs_pod"] < 1.0}


def _never_label(methods):
    return next((m for m, t in methods.items() if t is not None and t > 1), "pod")


def skip_markdown(result: dict) -> str:
    cols = [("method", "method"), ("skip_share", "distant passes skipped (shared heads)"),
            ("step_ms", "decode ms/token (median)"), ("step_min_ms", "min"), ("step_max_ms", "max"),
            ("vs_pod", "vs PoD"), ("vs_never", "vs never-skip path"), ("ppl", "perplexity"),
            ("ppl_change_pct", "ppl change %"), ("passkey", "passkey acc")]
    head = (f"Decode at context {result['context']}, predictor `{result['predictor']}`; perplexity of "
            f"{result['ppl_tokens']} tokens after {result['ppl_prefix']}; passkey over {result['passkeys']} prompts. "
            f"τ = 0.7 faster than PoD: {result['goal_tau07_faster_than_pod']}.")
    return head + "\n\n" + md_table(result["rows"], cols)


def skip_plot(result: dict, path) -> None:
    rows = [r for r in result["rows"] if r["tau"] is not None and r["tau"] <= 1 and "skip_share" in r]
    taus = [r["tau"] for r in rows]
    plot_lines(path, {"share skipped": (taus, [r["skip_share"] for r in rows]),
                      "step time / PoD": (taus, [r["vs_pod"] for r in rows]),
                      "ppl / PoD": (taus, [1 + r["ppl_change_pct"] / 100 for r in rows])},
               "tau", "fraction", "Gate skipping sweep (paper Fig. 4)")
