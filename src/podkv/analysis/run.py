"""`analyze`: the offline exploration of paper §2.1 as one library call.

One full pass per sample records the last Q queries' distant-token attention in every layer
(similarity) and, for the first ``proximal_samples`` samples, the full model's logits; one
masked pass per proximal size then measures observation 1. With ``retrieval_samples`` (default
for ``kind="retrieval"``) lookup prompts score every (layer, KV head) as a retrieval head
(:mod:`podkv.analysis.retrieval`). The planner turns the similarity (and retrieval scores) into a
:class:`SharingPlan` of the chosen ``kind``; :mod:`podkv.analysis.report` writes the files.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from podkv import __version__
from podkv.analysis import planner, report
from podkv.analysis.data import load_corpus, make_samples
from podkv.analysis.probe import DistantProbe, active, probed
from podkv.analysis.proximal import ProximalStudy
from podkv.analysis.retrieval import head_scores
from podkv.analysis.similarity import SimilarityAccumulator
from podkv.errors import PodError
from podkv.models import loading
from podkv.plan import SharingPlan

# Defaults sized so the default model finishes on 2 shared CPU cores in < 15 min (docs/analysis.md).
DEFAULT_SIZES = (64, 128, 256, 512, 1024)
DEFAULT_MODEL_NAME = "smollm2 (embedded SmolLM2-135M-Instruct)"


@dataclass
class AnalysisConfig:
    """Settings of `podkv analyze`; validated here, model-dependent checks in :meth:`check_model`."""

    model: str | None = None
    data: list[str] = field(default_factory=list)
    samples: int = 8
    length: int = 2048
    last_q: int = 64
    delta: float = 0.5
    target_saving: float | None = None
    granularity: str = "head"
    ns: int = 16
    nr: int = 240
    seed: int = 0
    context: int = 4096
    proximal_sizes: tuple[int, ...] = DEFAULT_SIZES
    proximal_samples: int = 2
    kind: str | None = None  # None: "similarity" with target_saving, else "greedy"
    retrieval_weight: float = 4.0
    retrieval_samples: int | None = None  # None: 16 for kind "retrieval", else 0 (not measured)
    block_size: int | None = None
    window_pairs: int = 0  # window-only pairs (issue 21), chosen by measured distant need

    def __post_init__(self):
        self._check_kind()
        for name in ("samples", "length", "last_q", "ns", "nr", "context"):
            if int(getattr(self, name)) < 1:
                raise PodError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.proximal_samples < 0:
            raise PodError(f"--proximal-samples must be >= 0, got {self.proximal_samples}")
        if not 0.0 <= self.delta <= 1.0:
            raise PodError(f"--delta must be in [0, 1] (similarity is 1 - JS divergence in bits), got {self.delta}")
        if self.target_saving is not None and not 0.0 < self.target_saving < 1.0:
            raise PodError(f"--target-saving must be in (0, 1), got {self.target_saving}")
        if self.granularity not in planner.GRANULARITIES:
            raise PodError(f"--granularity must be one of {planner.GRANULARITIES}, got {self.granularity!r}")
        self.proximal_sizes = tuple(sorted(set(int(s) for s in self.proximal_sizes)))
        if any(s <= self.ns for s in self.proximal_sizes):
            raise PodError(f"--proximal-sizes must all exceed ns={self.ns} (size = ns sinks + recent window), "
                           f"got {list(self.proximal_sizes)}")
        if self.length < self.ns + self.nr + self.last_q:
            raise PodError(f"--length {self.length} leaves no distant tokens for the last {self.last_q} queries: "
                           f"it must be >= ns + nr + last_q = {self.ns + self.nr + self.last_q}")

    def _check_kind(self) -> None:
        """Resolve the default kind and refuse a kind without (or with a foreign) option, before any model work."""
        if self.kind is None:
            self.kind = "similarity" if self.target_saving is not None else "greedy"
        if self.kind not in planner.KINDS:
            raise PodError(f"--kind must be one of {planner.KINDS}, got {self.kind!r}")
        needs_saving = self.kind in ("similarity", "retrieval")
        if needs_saving and self.target_saving is None:
            raise PodError(f"--kind {self.kind} needs --target-saving (the KV saving at --context to reach)")
        if not needs_saving and self.target_saving is not None:
            raise PodError(f"--target-saving applies to --kind similarity or retrieval, not {self.kind}")
        if (self.kind == "uniform") != (self.block_size is not None):
            raise PodError("--kind uniform needs --block-size" if self.kind == "uniform"
                           else f"--block-size applies to --kind uniform, not {self.kind}")
        if self.block_size is not None and int(self.block_size) < 1:
            raise PodError(f"--block-size must be >= 1, got {self.block_size}")
        if not self.retrieval_weight >= 0:
            raise PodError(f"--retrieval-weight must be >= 0, got {self.retrieval_weight}")
        scored = self.kind == "retrieval" or self.window_pairs
        if self.window_pairs and not needs_saving:
            raise PodError(f"--window-pairs applies to --kind similarity or retrieval (with --target-saving), "
                           f"not {self.kind}")
        if self.window_pairs < 0:
            raise PodError(f"--window-pairs must be >= 0, got {self.window_pairs}")
        if self.retrieval_samples is None:
            self.retrieval_samples = 16 if scored else 0
        if self.retrieval_samples < (1 if scored else 0):
            raise PodError(f"--retrieval-samples must be >= 1 for --kind {self.kind}"
                           f"{' with --window-pairs' if self.window_pairs else ''}, got {self.retrieval_samples}")

    def sizes_below_length(self) -> list[int]:
        return [s for s in self.proximal_sizes if s < self.length - 1]

    def check_model(self, config) -> None:
        max_pos = getattr(config, "max_position_embeddings", None)
        if max_pos is not None and self.length > max_pos:
            raise PodError(f"--length {self.length} is beyond the model's {max_pos} positions")
        if self.target_saving is not None:
            heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            planner.pairs_for_saving(self.target_saving, config.num_hidden_layers, heads, self.context,
                                     self.ns, self.nr)


def analyze(cfg: AnalysisConfig, out_dir: str | Path, model=None, tokenizer=None, progress: bool = True) -> dict:
    """Run the exploration, make the plan and write plan.json, analysis.json/.md and the PNGs to ``out_dir``.

    Returns the analysis dict (what analysis.json holds) with the plan under ``"plan_object"``.
    """
    from podkv.models.enable import check_supported, disable_pod  # startup: transformers

    started = time.perf_counter()
    corpus = load_corpus(cfg.data)  # fail on bad data before the model loads
    name = cfg.model or DEFAULT_MODEL_NAME
    if model is None:
        model, tokenizer = loading.load_model(cfg.model, progress=progress)
    elif tokenizer is None:
        raise PodError("analyze(model=...) also needs the model's tokenizer")
    elif cfg.model is None:
        name = getattr(model.config, "_name_or_path", "") or model.config.model_type
    if getattr(model, "_pod_saved", None) is not None:
        disable_pod(model)  # the exploration looks at the model's own attention
    check_supported(model.config)
    cfg.check_model(model.config)
    torch.manual_seed(cfg.seed)
    samples = make_samples(tokenizer, corpus.text, cfg.samples, cfg.length, cfg.seed)
    scores = None
    if cfg.retrieval_samples:  # first: a prompt too short for a lookup fails before the long passes
        scores = head_scores(model, tokenizer, cfg.retrieval_samples, cfg.length, cfg.ns, cfg.nr, cfg.last_q,
                             cfg.seed, progress)
    sim, study = _collect(model, samples, cfg, progress)
    sim_kv = sim.kv_heads_sim()
    plan = make_plan(cfg, sim_kv, meta=_meta(cfg, name, model, corpus), scores=scores)
    result = {
        **_meta(cfg, name, model, corpus),
        "data": {"source": corpus.source, "sha256": corpus.sha256, "samples_used": int(samples.shape[0])},
        "proximal": study.result() if study is not None else None,
        "similarity": report.similarity_summary(sim.query_heads(), sim_kv),
        "retrieval": report.retrieval_summary(scores, cfg) if scores is not None else None,
        "plan": report.plan_summary(plan, sim_kv, cfg.context, None if scores is None else scores["retrieval"]),
        "runtime": {"seconds": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads()},
    }
    report.write_all(Path(out_dir), result, plan, sim.query_heads(), sim_kv, scores)
    result["plan_object"] = plan
    return result


def make_plan(cfg: AnalysisConfig, sim_kv: torch.Tensor, meta: dict | None = None, scores: dict | None = None):
    """Similarity (Hkv, L, L) [+ head scores ``{"distant_mass", "retrieval"}``, (L, Hkv) each] -> the plan of
    ``cfg.kind``.

    greedy: threshold ``delta``; similarity: the most similar plan at ``target_saving``; retrieval:
    the same with sharing priced at ``retrieval_weight * retrieval``; uniform: blocks of ``block_size``.
    With ``window_pairs`` N, the N pairs of least distant mass + retrieval score are window-only.
    """
    retrieval = None if scores is None else scores["retrieval"]
    meta = dict(meta or {})
    meta["kind"] = cfg.kind
    kw = dict(ns=cfg.ns, nr=cfg.nr, meta=meta)
    if cfg.kind == "uniform":
        meta["block_size"] = cfg.block_size
        plan = SharingPlan.uniform(sim_kv.shape[1], sim_kv.shape[0], int(cfg.block_size), **kw)
    elif cfg.kind == "greedy":
        plan = planner.plan_by_threshold(sim_kv, cfg.delta, cfg.granularity, **kw)
    else:
        cost = None
        if cfg.kind == "retrieval":
            if retrieval is None:
                raise PodError("--kind retrieval needs retrieval scores: run `podkv analyze` with --retrieval-samples")
            meta["retrieval_weight"] = cfg.retrieval_weight
            cost = cfg.retrieval_weight * retrieval.to(sim_kv.dtype)
        window = set()
        if cfg.window_pairs:
            if scores is None:
                raise PodError("--window-pairs needs head scores: run `podkv analyze` with --retrieval-samples")
            meta["window_pairs"] = {"n": cfg.window_pairs, "importance": "distant_mass + retrieval"}
            window = planner.window_pairs(scores["distant_mass"] + scores["retrieval"], cfg.window_pairs)
        plan = planner.plan_for_saving(sim_kv, cfg.target_saving, cfg.context, cfg.granularity, cost=cost,
                                       window=window, **kw)
    if cfg.target_saving is not None:
        plan.meta["target_saving"] = cfg.target_saving
    if retrieval is not None:
        plan.meta["retrieval_shared"] = round(planner.retrieval_shared(plan, retrieval), 4)
    plan.meta["kv_saving"] = {"context": cfg.context, "saving": round(plan.kv_saving(cfg.context), 6)}
    return plan


def replan(data: dict, source: str = "analysis.json", **changes):
    """A plan from an ``analysis.json`` dict with settings ``changes`` (kind, target_saving, ...): no model run."""
    try:
        sim_kv = torch.tensor(data["similarity"]["kv_heads"], dtype=torch.float64)
        settings = dict(data["settings"])
    except (KeyError, TypeError) as exc:
        raise PodError(f"{source} is not an analysis.json from `podkv analyze` (missing {exc})") from None
    scores = data.get("retrieval")
    settings.update(changes)
    settings["retrieval_samples"] = scores["samples"] if scores else 0
    if (settings.get("kind") == "retrieval" or settings.get("window_pairs")) and not scores:
        raise PodError(f"{source} has no retrieval scores: re-run `podkv analyze` with --kind retrieval "
                       "or --retrieval-samples N")
    cfg = AnalysisConfig(**settings)
    meta = {k: data[k] for k in ("model", "model_type", "data_sha256", "seed", "podkv_version", "versions")
            if k in data}
    meta["settings"] = {**asdict(cfg), "proximal_sizes": list(cfg.proximal_sizes), "from_analysis": source}
    scores = {k: torch.tensor(scores[k], dtype=torch.float64) for k in ("distant_mass", "retrieval")} if scores else None
    return make_plan(cfg, sim_kv, meta=meta, scores=scores), cfg


def _collect(model, samples: torch.Tensor, cfg: AnalysisConfig, progress: bool):
    c = model.config
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    sim = SimilarityAccumulator(c.num_hidden_layers, c.num_attention_heads, kv)
    sizes = cfg.sizes_below_length()
    n_prox = min(cfg.proximal_samples, samples.shape[0]) if sizes else 0
    study = ProximalStudy(sizes=sizes, ns=cfg.ns) if n_prox else None
    bar = tqdm(total=samples.shape[0] + n_prox * len(sizes), desc="podkv analyze", unit="pass",
               disable=not progress)
    with torch.inference_mode(), probed(model):
        for i, row in enumerate(samples):
            ids = row[None]  # (1, T)
            probe = DistantProbe(last_q=cfg.last_q, ns=cfg.ns, nr=cfg.nr)
            keep = cfg.length - study.start if (study and i < n_prox) else 1
            with active(probe):
                logits = model(ids, use_cache=False, logits_to_keep=keep).logits
            sim.add(probe.attn)
            del probe
            bar.update(1)
            if study and i < n_prox:
                greedy = study.add_full(ids, logits)
                for size in sizes:
                    study.add_size(model, ids, size, greedy)
                    bar.update(1)
    bar.close()
    return sim, study


def _meta(cfg: AnalysisConfig, name: str, model, corpus) -> dict:
    import transformers  # startup: transformers

    settings = asdict(cfg)
    settings["proximal_sizes"] = list(cfg.proximal_sizes)
    return {"model": name,
            "model_type": model.config.model_type, "data_sha256": corpus.sha256, "settings": settings,
            "seed": cfg.seed, "podkv_version": __version__,
            "versions": {"podkv": __version__, "torch": torch.__version__, "transformers": transformers.__version__}}
