"""podkv.training: gradients of PoD vs the reference, Trainer runs on a tiny model, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_model
from tolerances import BF16_STORAGE_ATOL, BF16_TWO_STAGES_ATOL, DIFFERS, GRAD

import podkv
from podkv.errors import PodError
from podkv.training.config import TrainConfig

PLAN = dict(ns=4, nr=8)


def _plan(layers=4, heads=2, block=2):
    return podkv.SharingPlan.uniform(layers, heads, block, **PLAN)


def _grads(model, ids):
    model.zero_grad()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_pod_gradients_match_reference(checkpointing):
    """Chunked PoD attention (SDPA per query chunk) backpropagates exactly like the materialised oracle,
    also when layers are recomputed by (non-reentrant) gradient checkpointing."""
    ids = torch.randint(4, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = podkv.enable_pod(tiny_model("llama").train(), _plan(), reference=True)
    fast = podkv.enable_pod(tiny_model("llama").train(), _plan(), chunk=16)  # several chunks per sequence
    if checkpointing:
        fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g_ref, g_fast = _grads(ref, ids), _grads(fast, ids)
    assert g_ref.keys() == g_fast.keys()
    worst = max((g_ref[n] - g_fast[n]).abs().max().item() for n in g_ref)
    print(f"max |grad diff| = {worst:.2e}")
    for n in g_ref:
        torch.testing.assert_close(g_fast[n], g_ref[n], rtol=GRAD[0], atol=GRAD[1], msg=n)
    # the anchor's k_proj receives gradient from the layer that reads its keys
    assert g_fast["model.layers.0.self_attn.k_proj.weight"].abs().sum() > 0


def test_reentrant_checkpointing_would_cut_the_anchor_gradient():
    """Why runner.py forces use_reentrant=False: reentrant checkpointing runs the first forward without
    grad, so the anchor keys that shared layers read from model.pod_runtime carry no graph."""
    ids = torch.randint(4, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = _grads(podkv.enable_pod(tiny_model("llama").train(), _plan(), reference=True), ids)
    fast = podkv.enable_pod(tiny_model("llama").train(), _plan(), chunk=16)
    fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    name = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.allclose(_grads(fast, ids)[name], ref[name], rtol=DIFFERS[0], atol=DIFFERS[1])


def test_qk_selection_follows_the_plan():
    from podkv.training.trainable import mark_trainable

    model = tiny_model("llama")
    names = mark_trainable(model, _plan(), "qk")  # blocks {0,1}, {2,3}: 1 and 3 read anchors 0 and 2
    assert sorted(names) == sorted([
        "model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight", "model.layers.2.self_attn.k_proj.weight",
        "model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight"])
    assert sum(p.requires_grad for p in model.parameters()) == 6
    with pytest.raises(PodError, match="selects nothing"):
        mark_trainable(model, podkv.SharingPlan.identity(4, 2), "qk")


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    from podkv.training.objectives import kl_per_token

    a = torch.randn(2, 5, 11)
    assert kl_per_token(a, a).abs().item() < 1e-6
    assert kl_per_token(a, torch.randn(2, 5, 11)).item() > 0


def test_weighted_kl_is_the_weighted_mean_of_the_per_token_kl():
    from podkv.training.objectives import kl_per_token

    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    per_token = torch.stack([kl_per_token(s[b, i][None, None], t[b, i][None, None])
                             for b in range(2) for i in range(5)]).view(2, 5)
    torch.testing.assert_close(kl_per_token(s, t, torch.ones(2, 5)), kl_per_token(s, t))
    w = torch.tensor([[1.0, 1, 10, 10, 1], [1, 1, 1, 1, 0]])
    torch.testing.assert_close(kl_per_token(s, t, w), (per_token * w).sum() / w.sum())


# ------------------------------------------------------------------ Trainer runs on a tiny model
@pytest.fixture(scope="module")
def setup(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    _plan().save(root / "plan.json")
    from pydoc_data.topics import topics

    (root / "data.txt").write_text("\n".join(topics[k] for k in sorted(topics))[:12000])
    return root, tiny_lm_dir


def _cfg(setup, out, **kw):
    root, model = setup
    base = dict(plan=str(root / "plan.json"), out=str(root / out), model=str(model), data=[str(root / "data.txt")],
                seq_len=64, max_steps=6, lr=1e-3, save_steps=3, eval_tokens=128, threads=1)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(setup):
    from podkv.training.runner import train

    cfg = _cfg(setup, "full", trainable="all", max_steps=30, lr=3e-3)
    return cfg, train(cfg)


def test_training_loss_falls_and_output_loads(trained):
    cfg, result = trained
    losses = [h["loss"] for h in result["train_loss"]]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert result["heldout"][-1]["nll"] < result["heldout"][0]["nll"]
    model, tok = podkv.load_model(cfg.out, progress=False)
    assert model.config._attn_implementation == "pod"
    assert podkv.SharingPlan.from_dict(model.config.pod_plan).anchors == _plan().anchors
    assert not cfg.work_dir.exists()  # checkpoints are removed once <out> is complete
    assert json.loads((cfg.work_dir.parent / "full" / "train_result.json").read_text())["steps"] == 30


def test_generate_cli_runs_on_trained_dir(trained, capsys):
    from podkv.cli import main

    assert main(["generate", "--model", trained[0].out, "--prompt", "def f", "--max-new-tokens", "4",
                 "--no-chat"]) == 0


def test_resume_continues_from_the_same_step_and_optimizer_state(setup):
    """Interrupt after the checkpoint at step 3, resume to 6: same weights and losses as one run."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from podkv.training.runner import train

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt

    once = train(_cfg(setup, "once"))
    cut = _cfg(setup, "cut")
    with pytest.raises(KeyboardInterrupt):
        train(cut, callbacks=[Interrupt()])
    assert not cut.work_dir.with_name("cut").exists()  # never a half-written <out>
    assert (cut.work_dir / "checkpoint-3").is_dir()
    with pytest.raises(PodError, match="--resume"):
        train(cut)
    resumed = train(_cfg(setup, "cut", resume=True))
    assert resumed["steps"] == once["steps"] == 6
    tail = lambda r: [h["loss"] for h in r["train_loss"] if h["step"] > 3]  # noqa: E731
    assert tail(resumed) == pytest.approx(tail(once), rel=1e-5)
    a, b = load_file(f"{setup[0]}/once/model.safetensors"), load_file(f"{setup[0]}/cut/model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_lora_distill_deltas_reproduce_the_merged_model(setup):
    from safetensors.torch import load_file

    from podkv.models.deltas import apply_deltas
    from podkv.training.runner import train

    cfg = _cfg(setup, "lora", objective="distill", lora_rank=4, max_steps=3)
    result = train(cfg)
    assert result["trainable_params"] > 0 and result["train_loss"][0]["loss"] >= 0
    base = podkv.load_model(str(setup[1]), progress=False)[0]
    assert apply_deltas(base, f"{cfg.out}/pod_deltas.safetensors") == 6
    merged = load_file(f"{cfg.out}/model.safetensors")
    for name, p in base.named_parameters():
        torch.testing.assert_close(p.detach(), merged[name], rtol=0, atol=BF16_STORAGE_ATOL)  # deltas are stored in bf16


def test_training_on_an_adapted_model_saves_deltas_relative_to_the_base(setup):
    """Stage 2 trains on stage 1's folder: its deltas file carries both stages (LoRA ranks stacked), so the
    base checkpoint + that one file is stage 2's merged model; composing is exact."""
    from safetensors.torch import load_file

    from podkv.models.deltas import apply_deltas, compose_deltas
    from podkv.training.runner import train

    first = _cfg(setup, "stage1", objective="distill", lora_rank=4, max_steps=2)
    train(first)
    second = _cfg(setup, "stage2", model=first.out, objective="distill", lora_rank=4, max_steps=2, seed=1)
    train(second)
    entries = load_file(f"{second.out}/pod_deltas.safetensors")
    assert all(v.shape[0 if k.endswith("lora_A") else 1] == 8 for k, v in entries.items())  # rank 4 + 4
    base = podkv.load_model(str(setup[1]), progress=False)[0]
    apply_deltas(base, f"{second.out}/pod_deltas.safetensors")
    merged = load_file(f"{second.out}/model.safetensors")
    for name, p in base.named_parameters():
        torch.testing.assert_close(p.detach(), merged[name], rtol=0, atol=BF16_TWO_STAGES_ATOL)
    a = {"w::lora_A": torch.randn(2, 5), "w::lora_B": torch.randn(3, 2), "u::delta": torch.randn(3, 5)}
    b = {"w::delta": torch.randn(3, 5), "u::lora_A": torch.randn(1, 5), "u::lora_B": torch.randn(3, 1)}
    both = compose_deltas(a, b)
    torch.testing.assert_close(both["w::delta"], a["w::lora_B"] @ a["w::lora_A"] + b["w::delta"])
    torch.testing.assert_close(both["u::delta"], a["u::delta"] + b["u::lora_B"] @ b["u::lora_A"])


def test_scaled_deltas_move_weights_along_the_update(tmp_path):
    """``apply_deltas(scale=a)`` adds a times each update (LoRA or full): 0 is the base, 1 the trained model."""
    from podkv.models.deltas import apply_deltas, save_deltas

    torch.manual_seed(0)
    entries = {"0.weight::lora_A": torch.randn(2, 5), "0.weight::lora_B": torch.randn(3, 2), "1.weight::delta": torch.randn(4, 3)}
    path = save_deltas(entries, tmp_path / "d.safetensors", dtype=torch.float32)
    for scale in (0.0, 0.5, 1.0, 1.5):
        model = torch.nn.Sequential(torch.nn.Linear(5, 3, bias=False), torch.nn.Linear(3, 4, bias=False))
        w0, w1 = model[0].weight.detach().clone(), model[1].weight.detach().clone()
        assert apply_deltas(model, path, scale=scale) == 2
        torch.testing.assert_close(model[0].weight.detach(), w0 + scale * entries["0.weight::lora_B"] @ entries["0.weight::lora_A"])
        torch.testing.assert_close(model[1].weight.detach(), w1 + scale * entries["1.weight::delta"])
    model = torch.nn.Sequential(torch.nn.Linear(5, 3, bias=False), torch.nn.Linear(3, 4, bias=False))
    w0, w1 = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    assert apply_deltas(model, path, modules=("1",)) == 1  # only module "1": the other keeps its weights
    torch.testing.assert_close(model[0].weight.detach(), w0)
    torch.testing.assert_close(model[1].weight.detach(), w1 + entries["1.weight::delta"])


# ------------------------------------------------------------------ bad input fails before compute
@pytest.mark.parametrize("change, match", [
    (dict(plan="plan6"), "layers"),
    (dict(data="empty"), "has no text"),
    (dict(seq_len=1000), "exceeds the model's 512 positions"),
    (dict(data="tiny"), "too few"),
])
def test_bad_input_raises_pod_error(setup, change, match):
    from podkv.training.runner import prepare

    root = setup[0]
    _plan(layers=6).save(root / "plan6.json")
    (root / "empty.txt").write_text("  \n\t")
    (root / "tiny.txt").write_text("abc")
    kw = dict(change)
    if "plan" in kw:
        kw["plan"] = str(root / f"{kw['plan']}.json")
    if "data" in kw:
        kw["data"] = [str(root / f"{kw['data']}.txt")]
    with pytest.raises(PodError, match=match):
        prepare(_cfg(setup, "bad", **kw))


def test_config_rejects_inconsistent_budget():
    with pytest.raises(PodError, match="exactly one budget"):
        TrainConfig(plan="p", out="o", max_steps=3, max_tokens=100)
    with pytest.raises(PodError, match="--objective"):
        TrainConfig(plan="p", out="o", max_steps=3, objective="rl")
    assert TrainConfig(plan="p", out="o", max_tokens=1000, seq_len=64, grad_accum=2).steps() == 8


def test_out_dir_that_exists_is_refused(setup):
    from podkv.training.runner import prepare

    (setup[0] / "exists").mkdir(exist_ok=True)
    (setup[0] / "exists" / "model.safetensors").write_text("a user's earlier model")
    with pytest.raises(PodError, match="already exists: pass --force"):
        prepare(_cfg(setup, "exists"))


@pytest.mark.integration
def test_adapted_default_model_loads():
    from podkv.models.adapted import ASSET_DIR

    assert (ASSET_DIR / "pod_deltas.safetensors").is_file(), "the shipped smollm2-pod deltas are missing"
    model, tok = podkv.load_model("smollm2-pod", progress=False)
    plan = podkv.SharingPlan.from_dict(model.config.pod_plan)
    assert plan.kv_saving(4096) >= 0.30
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
