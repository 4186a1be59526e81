"""`analyze`: the offline exploration of paper §2.1 as one library call.

One full pass per sample records the last Q queries' distant-token attention in every layer
(similarity) and, for the first ``proximal_samples`` samples, the full model's logits; one
masked pass per proximal size then measures observation 1. The planner turns the similarity
into a :class:`SharingPlan`; :mod:`podkv.analysis.report` writes the files.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from podkv.analysis import planner
from podkv.analysis.data import load_corpus, make_samples
from podkv.analysis.probe import DistantProbe, active, probed
from podkv.analysis.proximal import ProximalStudy
from podkv.analysis.similarity import SimilarityAccumulator
from podkv.errors import PodError

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

    def __post_init__(self):
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
    from podkv.analysis import report
    from podkv.models.enable import check_supported, disable_pod

    started = time.perf_counter()
    corpus = load_corpus(cfg.data)  # fail on bad data before the model loads
    name = cfg.model or DEFAULT_MODEL_NAME
    if model is None:
        from podkv.models.loading import load_model

        model, tokenizer = load_model(cfg.model, progress=progress)
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
    sim, study = _collect(model, samples, cfg, progress)
    sim_kv = sim.kv_heads_sim()
    plan = make_plan(cfg, sim_kv, meta=_meta(cfg, name, model, corpus))
    result = {
        **_meta(cfg, name, model, corpus),
        "data": {"source": corpus.source, "sha256": corpus.sha256, "samples_used": int(samples.shape[0])},
        "proximal": study.result() if study is not None else None,
        "similarity": report.similarity_summary(sim.query_heads(), sim_kv),
        "plan": report.plan_summary(plan, sim_kv, cfg.context),
        "runtime": {"seconds": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads()},
    }
    report.write_all(Path(out_dir), result, plan, sim.query_heads(), sim_kv)
    result["plan_object"] = plan
    return result


def make_plan(cfg: AnalysisConfig, sim_kv: torch.Tensor, meta: dict | None = None):
    """Similarity (Hkv, L, L) -> plan, by target saving when set, else by threshold delta."""
    meta = dict(meta or {})
    kw = dict(ns=cfg.ns, nr=cfg.nr)
    if cfg.target_saving is not None:
        plan = planner.plan_for_saving(sim_kv, cfg.target_saving, cfg.context, cfg.granularity, meta=meta, **kw)
    else:
        plan = planner.plan_by_threshold(sim_kv, cfg.delta, cfg.granularity, meta=meta, **kw)
    plan.meta["kv_saving"] = {"context": cfg.context, "saving": round(plan.kv_saving(cfg.context), 6)}
    return plan


def _collect(model, samples: torch.Tensor, cfg: AnalysisConfig, progress: bool):
    from tqdm.auto import tqdm

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
    import transformers

    from podkv import __version__

    settings = asdict(cfg)
    settings["proximal_sizes"] = list(cfg.proximal_sizes)
    return {"model": name,
            "model_type": model.config.model_type, "data_sha256": corpus.sha256, "settings": settings,
            "seed": cfg.seed, "podkv_version": __version__,
            "versions": {"podkv": __version__, "torch": torch.__version__, "transformers": transformers.__version__}}
