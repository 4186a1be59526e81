"""`train(config)`: PoD post-training adaptation on ``transformers.Trainer`` (paper §2.2).

Flow: validate everything (plan vs model, data, seq_len) -> measure the dense held-out loss ->
``enable_pod`` -> freeze all but the selected weights (or add LoRA) -> ``Trainer`` (grad
accumulation, cosine schedule with warm-up, checkpoints, resume) -> merge, save into
``<out>.tmp-train/model`` and rename to ``<out>``: an interrupted run never leaves a loadable ``out``.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments, default_data_collator

from podkv.errors import PodError
from podkv.io import write_json
from podkv.models import loading
from podkv.models.anchor_init import init_from_anchor
from podkv.models.adapted import carried_deltas
from podkv.models.deltas import compose_deltas, full_deltas, lora_factors, save_deltas
from podkv.models.enable import check_supported, disable_pod, enable_pod
from podkv.outputs import refuse_existing, replace_dir
from podkv.plan import SharingPlan
from podkv.provenance import identity, machine, versions
from podkv.training.config import TrainConfig
from podkv.training.data import PackedDataset, load_split
from podkv.training.evaluate import heldout_nll
from podkv.training.objectives import TRAINERS
from podkv.training.trainable import add_lora, count_trainable, mark_trainable

RESULT_FILE = "train_result.json"
DELTA_FILE = "pod_deltas.safetensors"


def prepare(cfg: TrainConfig):
    """Everything that can fail on bad input, before any compute: returns (model, tok, plan, split)."""
    _check_dirs(cfg)
    plan = SharingPlan.load(cfg.plan)
    model, tok = loading.load_model(cfg.model, dtype=torch.float32, progress=False)
    disable_pod(model)  # a checkpoint saved by an earlier run comes back PoD-enabled; start from dense
    check_supported(model.config)
    plan.validate_for(model.config)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.seq_len > max_pos:
        raise PodError(f"--seq-len {cfg.seq_len} exceeds the model's {max_pos} positions")
    split = load_split(tok, cfg.data, cfg.seq_len, cfg.eval_fraction, cfg.long_range, cfg.seed,
                       cfg.long_range_kinds, cfg.long_range_chat, cfg.answer_weight)
    return model, tok, plan, split


def _check_dirs(cfg: TrainConfig) -> None:
    out, work = Path(cfg.out), cfg.work_dir
    refuse_existing(out, cfg.force)
    has_ckpt = work.is_dir() and any(work.glob("checkpoint-*"))
    if cfg.resume and not has_ckpt:
        raise PodError(f"--resume: no checkpoint in {work} to resume from")
    if not cfg.resume and work.exists():
        raise PodError(f"{work} holds an interrupted run: pass --resume to continue it, or delete it")


def train(cfg: TrainConfig, callbacks=None) -> dict:
    """Run one adaptation; returns the result dict also written to ``<out>/train_result.json``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok, plan, split = prepare(cfg)
    t0 = time.time()
    dense_nll = heldout_nll(model, split.heldout, cfg.seq_len, cfg.eval_tokens)
    teacher = copy.deepcopy(model) if cfg.objective in ("distill", "local") else None  # dense attention, frozen
    if cfg.init != "none":
        init_from_anchor(model, plan, cfg.init)
        plan.meta = {**plan.meta, "init": cfg.init}  # the loader replays it before applying the deltas
    enable_pod(model, plan)
    base_state = {n: p.detach().clone() for n, p in model.named_parameters()} if not cfg.lora_rank else None
    if cfg.lora_rank:
        model = add_lora(model, plan, cfg.trainable, cfg.lora_rank, cfg.lora_alpha)
        names = None
    else:
        names = mark_trainable(model, plan, cfg.trainable)
    n_trainable = count_trainable(model)
    probe = HeldOut(split.heldout, cfg, dense_nll)
    trainer = _build_trainer(cfg, model, tok, split, teacher, [probe] + list(callbacks or []))
    trainer.train(resume_from_checkpoint=True if cfg.resume else None)
    trainer.accelerator.wait_for_everyone()
    result = {}
    if trainer.is_world_process_zero():
        world = trainer.args.world_size
        result = _finish(cfg, trainer, tok, plan, names, base_state, probe, dense_nll, time.time() - t0, world,
                         n_trainable)
    trainer.accelerator.wait_for_everyone()
    return result


def _build_trainer(cfg, model, tok, split, teacher, callbacks):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available()
                                        and torch.cuda.is_bf16_supported())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = TrainingArguments(
        output_dir=str(cfg.work_dir), max_steps=cfg.steps(world), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type="cosine",
        warmup_steps=int(cfg.warmup_ratio * cfg.steps(world)), weight_decay=0.0, max_grad_norm=1.0,
        bf16=bf16, gradient_checkpointing=cfg.gradient_checkpointing,
        # Non-reentrant checkpointing keeps the graph edge from a shared layer to its anchor's keys
        # (read through model.pod_runtime, not passed as an input); reentrant would drop it.
        gradient_checkpointing_kwargs={"use_reentrant": False}, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=2, logging_steps=1, report_to="none", seed=cfg.seed, data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, remove_unused_columns=False,
        ddp_backend="gloo" if world > 1 and not torch.cuda.is_available() else None, ddp_find_unused_parameters=False,
        disable_tqdm=False, save_only_model=False,
    )
    kwargs = {"teacher": teacher} if teacher is not None else {}
    return TRAINERS[cfg.objective](model=model, args=args, train_dataset=PackedDataset(split.train, split.weights),
                                   data_collator=default_data_collator, processing_class=tok,
                                   callbacks=callbacks, **kwargs)


def _finish(cfg, trainer, tok, plan, names, base_state, probe, dense_nll, wall, world, n_trainable) -> dict:
    model = trainer.model
    model = getattr(model, "module", model)  # unwrap DDP
    if cfg.lora_rank:
        deltas = lora_factors(model)
        model = model.merge_and_unload()
    else:
        deltas = full_deltas(model, base_state, names)
    probe.measure(model, trainer.state.global_step, force=True)
    final = cfg.work_dir / "model"
    if final.exists():
        shutil.rmtree(final)
    model.save_pretrained(final)
    tok.save_pretrained(final)
    save_deltas(compose_deltas(carried_deltas(cfg.model), deltas), final / DELTA_FILE)  # relative to the base checkpoint
    plan.save(final / "pod_plan.json")
    steps = trainer.state.global_step
    result = {
        "config": cfg.to_dict(), "steps": steps, "tokens": steps * cfg.tokens_per_step * world,
        "world_size": world, "trainable_params": n_trainable, "wall_s": round(wall, 1), "kv_saving_4096": plan.kv_saving(4096),
        "plan_mode": plan.mode,
        "dense_heldout_nll": dense_nll, "heldout": probe.curve,
        "train_loss": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
        "machine": machine(), "versions": versions(), "identity": identity(model, plan),
    }
    write_json(final / RESULT_FILE, result)
    replace_dir(final, Path(cfg.out))  # atomic: <out> appears complete or not at all
    shutil.rmtree(cfg.work_dir, ignore_errors=True)
    return result


class HeldOut(TrainerCallback):
    """Trainer callback: held-out NLL of the PoD model at the start, every ``eval_every`` steps and the end."""

    def __init__(self, heldout: torch.Tensor, cfg: TrainConfig, dense_nll: float):
        super().__init__()
        self.heldout, self.cfg, self.dense_nll = heldout, cfg, dense_nll
        # Curves are also plotted per training second: wall and process-CPU time, minus the time
        # spent in these measurements (CPU time stays honest when other jobs share the machine).
        self.start, self.start_cpu = time.time(), time.process_time()
        self.eval_wall = self.eval_cpu = 0.0
        self.curve: list[dict] = []

    def measure(self, model, step: int, force: bool = False):
        if not force and any(p["step"] == step for p in self.curve):
            return
        wall, cpu = time.time(), time.process_time()
        seconds, cpu_seconds = wall - self.start - self.eval_wall, cpu - self.start_cpu - self.eval_cpu
        nll = heldout_nll(model, self.heldout, self.cfg.seq_len, self.cfg.eval_tokens)
        self.eval_wall, self.eval_cpu = self.eval_wall + time.time() - wall, self.eval_cpu + time.process_time() - cpu
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.curve = [p for p in self.curve if p["step"] != step]
        self.curve.append({"step": step, "tokens": step * self.cfg.tokens_per_step * world, "nll": nll,
                           "nll_gap": nll - self.dense_nll, "seconds": round(seconds, 1),
                           "cpu_seconds": round(cpu_seconds, 1)})

    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.is_world_process_zero and state.global_step == 0:
            self.measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kw):
        every = self.cfg.eval_every
        if every and state.global_step % every == 0 and state.is_world_process_zero:
            self.measure(model, state.global_step)
