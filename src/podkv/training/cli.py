"""`podkv train`: post-training adaptation of a model to a PoD plan (thin: builds a TrainConfig)."""

from __future__ import annotations

import argparse

from podkv.cli_args import Int
from podkv.training.config import OBJECTIVES, TrainConfig


def register(sub) -> None:
    p = sub.add_parser("train", help="adapt a model to a PoD plan (transformers Trainer; LoRA optional)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model name or path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--plan", required=True, help="sharing plan JSON")
    p.add_argument("--data", nargs="*", default=[], help="UTF-8 text files, one document each "
                                                         "(default: Python's pydoc_data.topics)")
    p.add_argument("--seq-len", action=Int, default=1024, help="tokens per packed sequence")
    p.add_argument("--long-range", type=int, default=0,
                   help="generated long-range documents (passage repeats, lookups) added to the training text")
    p.add_argument("--long-range-kinds", default="repeat,lookup",
                   help="comma-separated kinds the long-range documents cycle through: "
                        "repeat, lookup, multilookup, chain, track (podkv.training.longrange)")
    p.add_argument("--long-range-chat", type=float, default=0.0,
                   help="share of the question documents (every kind but repeat) framed in the model's chat "
                        "template: haystack and question in a user turn, the answer in the assistant's")
    p.add_argument("--answer-weight", type=float, default=1.0,
                   help="distill: weight of the answer tails of question documents (the tokens after the "
                        "haystack) in the loss, against 1 for every other position")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-steps", type=int, help="optimizer steps")
    budget.add_argument("--max-tokens", action=Int, help="training tokens (rounded up to whole steps)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (cosine decay after warm-up)")
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--objective", choices=OBJECTIVES, default="lm",
                   help="lm: next-token loss; distill: KL to the same model with dense attention; "
                        "local: each layer's attention output matched to the dense teacher's, on its inputs")
    p.add_argument("--trainable", choices=("qk", "attention", "all"), default="qk")
    p.add_argument("--init", choices=("none", "anchor-q", "anchor-qk"), default="none",
                   help="start shared heads from their anchor's q (and k) projections: score sharing at step 0")
    p.add_argument("--lora-rank", type=int, default=0, help="0: train weights directly; R > 0: LoRA (peft)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per device per micro-step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps (for --resume)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out perplexity every N steps (0: start/end)")
    p.add_argument("--eval-tokens", action=Int, default=4096, help="held-out tokens per measurement")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 where the GPU supports it, else fp32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in <out>.tmp-train")
    p.add_argument("--out", required=True, help="output directory (written atomically at the end; refused if it "
                                                "exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out when the run finishes")
    p.set_defaults(func=run)


def run(args) -> int:
    from podkv.training.runner import train  # startup: transformers

    cfg = TrainConfig(
        plan=args.plan, out=args.out, model=args.model, data=args.data, seq_len=args.seq_len,
        max_steps=args.max_steps, max_tokens=args.max_tokens, lr=args.lr, warmup_ratio=args.warmup_ratio,
        objective=args.objective, trainable=args.trainable, lora_rank=args.lora_rank, batch_size=args.batch_size,
        grad_accum=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing, save_steps=args.save_steps,
        eval_every=args.eval_every, eval_tokens=args.eval_tokens, precision=args.precision, threads=args.threads,
        seed=args.seed, resume=args.resume, force=args.force, long_range=args.long_range, init=args.init,
        long_range_chat=args.long_range_chat, answer_weight=args.answer_weight,
        long_range_kinds=tuple(k.strip() for k in args.long_range_kinds.split(",") if k.strip()),
    )
    result = train(cfg)
    if result:
        last = result["heldout"][-1] if result["heldout"] else None
        gap = f", held-out NLL gap to dense {last['nll_gap']:+.4f}" if last else ""
        print(f"trained {result['steps']} steps ({result['tokens']} tokens) in {result['wall_s']} s{gap}; "
              f"saved {args.out}")
    return 0
