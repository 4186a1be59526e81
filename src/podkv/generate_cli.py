"""`podkv generate`: stream an answer from a model, optionally with a PoD plan and its KV figures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from podkv.cache.memory import dense_kv_bytes
from podkv.cache.quant import BITS
from podkv.cli_args import Int
from podkv.errors import PodError
from podkv.models import loading
from podkv.plan import SharingPlan

DEFAULT_PROMPT = "What is the capital of France?"


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text (streams); with --plan, through PoD and a PodCache")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct; a directory, .gguf "
                                                 "file, hub id, or 'smollm2-pod'")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    src.add_argument("--prompt-file", type=Path, default=None, help="read the prompt from a file")
    p.add_argument("--max-new-tokens", action=Int, default=64)
    p.add_argument("--chat", action=argparse_bool(), default=True, help="wrap the prompt in the chat template")
    p.add_argument("--plan", type=Path, default=None, help="PoD sharing plan (JSON) to run with")
    p.add_argument("--kv-bits", type=int, default=None, choices=BITS,
                   help="8, 4 or 2: hold the PodCache's token-long values and anchor keys in that many bits (a PoD model "
                        "or --plan)")
    p.add_argument("--key-quant", choices=("token", "channel"), default="token",
                   help="with --kv-bits: group the anchor keys per token as the values, or per channel over 64 tokens "
                        "(KIVI)")
    p.add_argument("--kv-keep-proximal", action="store_true",
                   help="with --kv-bits: keep the first ns and last nr tokens in the model's dtype (KIVI's residual)")
    p.set_defaults(func=run)


def argparse_bool():
    return argparse.BooleanOptionalAction


def run(args) -> int:
    if args.max_new_tokens < 1:
        raise PodError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.kv_bits and (args.key_quant != "token" or args.kv_keep_proximal):
        raise PodError("--key-quant channel and --kv-keep-proximal set how quantized tensors are held: they need "
                       f"--kv-bits {' or '.join(map(str, BITS))}")
    prompt = read_prompt(args.prompt, args.prompt_file)
    model, tok = loading.load_model(args.model)
    plan = None
    if args.plan is not None:
        from podkv.models.enable import enable_pod  # startup: transformers

        plan = SharingPlan.load(args.plan)
        enable_pod(model, plan)
    ids = encode_prompt(tok, prompt, args.chat)
    cache = None
    if getattr(model.config, "pod_plan", None) is not None:
        from podkv.cache.pod_cache import pod_cache_for  # startup: transformers
        from podkv.plan import plan_from_config

        cache = pod_cache_for(model.config, plan_from_config(model.config), args.kv_bits, args.key_quant,
                              args.kv_keep_proximal)
    elif args.kv_bits:
        raise PodError("--kv-bits needs a PoD model (e.g. --model smollm2-pod) or --plan: it sets the PodCache's storage")
    from transformers import TextStreamer  # startup: transformers

    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer,
                             past_key_values=cache, pad_token_id=tok.pad_token_id)
    if cache is not None:
        dense = dense_kv_bytes(model.config, out.shape[1], dtype=model.dtype)
        held = cache.kv_bytes()
        print(f"[podkv] KV held: {held / 2**20:.2f} MiB vs dense {dense / 2**20:.2f} MiB "
              f"({100 * (1 - held / dense):.1f}% saved) at {out.shape[1]} tokens", file=sys.stderr)
    return 0


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise PodError(f"--prompt-file {prompt_file} does not exist")
        prompt = prompt_file.read_text()
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    if not prompt.strip():
        raise PodError("the prompt is empty")
    return prompt


def encode_prompt(tok, prompt: str, chat: bool):
    """Token ids (and mask) for ``prompt``, wrapped in the chat template when the tokenizer has one."""
    if chat and getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
    return tok(prompt, return_tensors="pt")
