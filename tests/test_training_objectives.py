"""The layer-local objective: taps read and feed the right tensors, zero loss where PoD is dense,
and a Trainer run on a tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_model

import podkv
from podkv.models.enable import decoder_layers
from podkv.training.objectives import LayerTaps, relative_error

PLAN = dict(ns=4, nr=8)


def _pair(plan):
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    podkv.enable_pod(student, plan)
    return teacher, student


def _taps(teacher, student, ids):
    with torch.no_grad(), LayerTaps(teacher) as t:
        teacher(input_ids=ids, use_cache=False)
    with torch.no_grad(), LayerTaps(student, feed=t.inputs) as s:
        student(input_ids=ids, use_cache=False)
    return t, s


def test_every_layer_its_own_anchor_gives_zero_local_loss():
    teacher, student = _pair(podkv.SharingPlan.uniform(4, 2, 1, **PLAN))
    t, s = _taps(teacher, student, torch.randint(3, 128, (2, 40)))
    assert len(t.outputs) == len(s.outputs) == 4
    assert relative_error(s.outputs, t.outputs).item() < 1e-10


def test_sharing_gives_positive_loss_only_in_layers_that_share():
    teacher, student = _pair(podkv.SharingPlan.uniform(4, 2, 2, **PLAN))  # layers 1 and 3 share
    t, s = _taps(teacher, student, torch.randint(3, 128, (2, 40)))
    per_layer = [relative_error([a], [b]).item() for a, b in zip(s.outputs, t.outputs)]
    assert per_layer[0] < 1e-10 and per_layer[2] < 1e-10
    assert per_layer[1] > 1e-4 and per_layer[3] > 1e-4


def test_feed_replaces_each_layer_input_by_the_teachers():
    """A student that differs from the teacher in layer 0 still sees the teacher's input at layer 1."""
    teacher, student = _pair(podkv.SharingPlan.uniform(4, 2, 1, **PLAN))
    with torch.no_grad():
        decoder_layers(student)[0].mlp.down_proj.weight.mul_(3.0)
    ids = torch.randint(3, 128, (1, 24))
    t, s = _taps(teacher, student, ids)
    with torch.no_grad(), LayerTaps(student) as seen:
        student(input_ids=ids, use_cache=False)
    assert relative_error(s.outputs[1:], t.outputs[1:]).item() < 1e-10  # fed: layers 1.. are the teacher's
    assert relative_error(seen.outputs[1:], t.outputs[1:]).item() > 1e-4  # not fed: the change propagates
    assert not any(layer._forward_pre_hooks for layer in decoder_layers(student))  # hooks removed on exit


def test_local_objective_trains_on_a_tiny_model(tiny_lm_dir, tmp_path):
    from podkv.training.config import TrainConfig
    from podkv.training.runner import train

    podkv.SharingPlan.uniform(4, 2, 2, **PLAN).save(tmp_path / "plan.json")
    from pydoc_data.topics import topics

    (tmp_path / "data.txt").write_text("\n".join(topics[k] for k in sorted(topics))[:8000])
    cfg = TrainConfig(plan=str(tmp_path / "plan.json"), out=str(tmp_path / "out"), model=str(tiny_lm_dir),
                      data=[str(tmp_path / "data.txt")], seq_len=64, max_steps=8, lr=1e-3, save_steps=8,
                      eval_tokens=128, threads=1, objective="local", trainable="qk")
    result = train(cfg)
    losses = [h["loss"] for h in result["train_loss"]]
    assert len(losses) == 8 and losses[0] > 0 and min(losses[-3:]) < losses[0]


def test_unknown_objective_is_a_pod_error():
    from podkv.errors import PodError
    from podkv.training.config import TrainConfig

    with pytest.raises(PodError, match="--objective must be one of lm, distill, local, got 'kl'"):
        TrainConfig(plan="p.json", out="o", max_steps=1, objective="kl")
