"""Tiny randomly initialised models built in memory: the default, fast, offline fixtures."""

from __future__ import annotations

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(arch: str = "llama", layers: int = 4, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                max_pos: int = 512):
    from transformers import AutoConfig

    kw = dict(hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=128,
              max_position_embeddings=max_pos, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch in ("qwen3",):
        kw["head_dim"] = head_dim
    if arch == "mistral":
        kw["sliding_window"] = None
    return AutoConfig.for_model(arch, **kw)


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **kw)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    # Random init gives near-uniform attention; sharper weights make PoD differ visibly from dense.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model.eval()
