"""Run methods x tasks on one model with the same prompts, and collect one results dict.

No method- or task-specific branches: both come from their registries.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from podkv.errors import PodError
from podkv.eval.config import EvalConfig
from podkv.eval.methods import METHODS, make_method
from podkv.eval.report import write_results
from podkv.eval.tasks import make_task
from podkv.models import loading
from podkv.models.default_plan import default_plan
from podkv.plan import SharingPlan
from podkv.provenance import identity, machine, versions


def default_budget(plan: SharingPlan, lengths) -> float:
    """PoD's KV fraction at the shortest length (its worst), rounded up to 0.01: every method gets that much."""
    return math.ceil(100 * max(1.0 - plan.kv_saving(T) for T in lengths) - 1e-9) / 100


def check_lengths(config, lengths, flag: str = "--lengths") -> None:
    """Refuse prompt lengths beyond the model's positions before any prompt is built or run: they were never
    trained, and a 100K-token run of an 8K model would take many minutes before failing."""
    limit = getattr(config, "max_position_embeddings", None)
    too_long = [T for T in lengths if limit is not None and T > limit]
    if too_long:
        raise PodError(f"{flag}: {too_long[0]} tokens exceed the model's max_position_embeddings={limit}; "
                       f"use lengths up to {limit} (answer tokens need a little room too)")


def build_methods(cfg: EvalConfig, plan: SharingPlan, model) -> dict:
    """Instantiate and check every method.

    The budget binds the compressing methods; dense is the reference of a comparison and is held
    to an explicit ``--budget`` only outside ``compare`` (where it then cannot meet one below 1).
    """
    check_lengths(model.config, cfg.lengths)
    budget = cfg.budget if cfg.budget is not None else default_budget(plan, cfg.lengths)
    alone = cfg.budget is not None and not cfg.compare
    out = {}
    for name in cfg.methods:
        applies = METHODS[name].budgeted or alone
        method = make_method(name, plan=plan, budget=budget if applies else None)
        method.check(model.config, cfg.lengths)
        out[name] = method
    return out


def evaluate(model, tok, cfg: EvalConfig, plan: SharingPlan, progress: bool = True, log=None, models=None,
             interleave: bool = False) -> dict:
    """Every method on every task; cases are built once per task so all methods see the same prompts.

    ``log``: optional path of a JSON-lines file that gets each record as soon as it is scored
    (long CPU runs can be watched, and are not all lost if interrupted). ``models``: {method name: model} for
    methods that run on other weights (the demo's baselines on the original ones); the rest run on ``model``.
    ``interleave``: the methods take turns case by case (the order rotating) instead of one after the other, so
    a slow spell of a shared CPU falls on all of them and their ``seconds`` compare. Each entry's ``seconds``:
    wall time of its cases.
    """
    methods = build_methods(cfg, plan, model)
    tasks = {name: make_task(name) for name in cfg.tasks}
    cases = {name: task.cases(tok, cfg, plan) for name, task in tasks.items()}
    runners = {name: (models or {}).get(name, model) for name in methods}
    records = {(m, t): [] for m in methods for t in tasks}
    seconds = dict.fromkeys(methods, 0.0)
    order = list(_schedule(list(methods), cases, interleave))
    bar = tqdm(order, disable=not progress, leave=False)
    with contextlib.ExitStack() as attached:
        current = None
        for mname, tname, case in bar:
            method, runner = methods[mname], runners[mname]
            if mname != current:  # attach once per run of the same method
                attached.close()
                attached.enter_context(method.attached(runner))
                current = mname
            bar.set_description(f"{mname}/{tname}")
            start = time.perf_counter()
            records[mname, tname].append(tasks[tname].run_case(runner, tok, method, case, cfg))
            seconds[mname] += time.perf_counter() - start
            _log(log, {"method": mname, "task": tname, **records[mname, tname][-1]})
    return {m: {"method": method.describe(), "seconds": seconds[m],
                "tasks": {t: {"metric": task.metric, "summary": task.summarize(records[m, t]), "records": records[m, t]}
                          for t, task in tasks.items()}} for m, method in methods.items()}


def _schedule(methods: list[str], cases: dict, interleave: bool):
    """(method, task, case) in run order: method by method, or case by case with the methods rotating."""
    if not interleave:
        return ((m, t, c) for m in methods for t, cs in cases.items() for c in cs)
    turns = [(t, c) for t, cs in cases.items() for c in cs]
    return ((m, t, c) for i, (t, c) in enumerate(turns)
            for m in methods[i % len(methods):] + methods[:i % len(methods)])


def _log(path, record: dict) -> None:
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def provenance(cfg: EvalConfig, model, plan: SharingPlan, plan_source: str) -> dict:
    """Everything a rerun needs: model, plan, settings, seed, package versions and the machine."""
    return {"identity": identity(model, plan), "model": cfg.model or "smollm2 (embedded default)",
            "model_type": model.config.model_type,
            "plan_source": plan_source, "plan": plan.to_dict(), "plan_summary": plan.summary(max(cfg.lengths)),
            "settings": cfg.to_dict(), "seed": cfg.seed, "versions": versions(),
            "machine": machine(str(model.device))}


def load(cfg: EvalConfig):
    """(model, tokenizer, plan, plan_source) for ``cfg``; quiet loading."""
    try:
        import transformers  # startup: transformers

        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    torch.manual_seed(cfg.seed)
    try:
        model, tok = loading.load_model(cfg.model, progress=False)
    except ModuleNotFoundError as exc:
        raise PodError(f"--model {cfg.model}: not available in this install ({exc})") from None
    plan, source = default_plan(model.config, cfg.plan)
    return model, tok, plan, source


def run(cfg: EvalConfig, progress: bool = True) -> dict:
    """Load, evaluate, write results.json / results.md / figures into ``cfg.out``; return the results."""
    model, tok, plan, source = load(cfg)
    results = {**provenance(cfg, model, plan, source), "methods": evaluate(model, tok, cfg, plan, progress,
                                                                      log=cfg.out_dir / "records.jsonl")}
    write_results(results, cfg.out_dir)
    return results
