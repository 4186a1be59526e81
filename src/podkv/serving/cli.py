"""`podkv serve-check`: check that a model and a plan can be served with vLLM, optionally write a
servable checkpoint and run a short greedy generation through vLLM."""

from __future__ import annotations

import tempfile
from pathlib import Path

from podkv.cli_args import Int
from podkv.errors import PodError
from podkv.models.default_model import ensure_default_model
from podkv.outputs import refuse_existing, staged_dir
from podkv.plan import SharingPlan, plan_from_config
from podkv.serving.capacity import main as capacity_main
from podkv.serving.checkpoint import (check_adapted_servable, check_new_dir, is_adapted_dir, load_hf_config,
                                      write_adapted_checkpoint, write_pod_checkpoint)
from podkv.serving.checks import check_plan_servable
from podkv.serving.engine import make_llm


def register(sub) -> None:
    p = sub.add_parser("serve-check", help="check a model + PoD plan for vLLM serving (layer-granularity plans)")
    p.add_argument("--model", type=Path, default=None,
                   help="local HF checkpoint directory (default: the embedded SmolLM2-135M-Instruct), or an adapted "
                        "model stored as deltas ('smollm2-pod', or a folder with pod_plan.json + "
                        "pod_deltas.safetensors): --write-checkpoint merges the deltas into --base")
    p.add_argument("--base", type=Path, default=None,
                   help="base checkpoint of an adapted --model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--plan", type=Path, default=None,
                   help="PoD plan JSON (default: the plan in the checkpoint's config.json)")
    p.add_argument("--write-checkpoint", type=Path, default=None, metavar="OUT",
                   help="write a checkpoint with the plan in config.json (merged weights for an adapted model), "
                        "servable with python -m vllm.entrypoints.openai.api_server --model OUT")
    p.add_argument("--force", action="store_true", help="replace an existing --write-checkpoint folder")
    p.add_argument("--run", action="store_true", help="also start vLLM and generate greedily (needs vllm installed)")
    p.add_argument("--capacity", action=Int, default=None, metavar="T",
                   help="also start dense and PoD engines (same VLLM_CPU_KVCACHE_SPACE, block size 16, 32-token "
                        "prefill chunks) and compare vLLM's reported KV capacity at max_model_len T with "
                        "plan.kv_saving(T) (needs vllm; see python -m podkv.serving.capacity for all options)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", action=Int, default=16)
    p.set_defaults(func=run)


def run(args) -> int:
    adapted = _adapted_dir(args.model)
    if adapted is not None:
        return _run_adapted(adapted, args)
    model_dir = args.model or _default_model_dir()
    config = load_hf_config(model_dir)
    plan = SharingPlan.load(args.plan) if args.plan is not None else plan_from_config(config)
    if plan is None:
        raise PodError(f"--plan is required: {model_dir}/config.json has no 'pod_plan'")
    check_plan_servable(plan, config)
    print(f"ok: {model_dir} ({config.model_type}) can be served with vLLM")
    print(plan.summary())
    if args.write_checkpoint is not None:
        _check_out(args, model_dir)
        with staged_dir(args.write_checkpoint, args.force, "--write-checkpoint") as stage:
            write_pod_checkpoint(model_dir, plan, stage)
        _wrote(args.write_checkpoint)
    _exercise(model_dir, plan, args)
    return 0


def _run_adapted(adapted: Path, args) -> int:
    """An adapted model stored as deltas: vLLM loads plain weights, so serving needs a merged checkpoint."""
    if args.plan is not None:
        raise PodError(f"--plan: the adapted model {args.model} was trained for its own plan "
                       f"({adapted}/pod_plan.json); drop --plan")
    base = args.base or _default_model_dir()
    if args.write_checkpoint is not None:
        _check_out(args, base)
    plan = check_adapted_servable(adapted, base)
    print(f"ok: the adapted model {args.model} (base {base}) can be served with vLLM once merged")
    print(plan.summary())
    if args.write_checkpoint is None:
        if args.run or args.capacity is not None:
            raise PodError("--run/--capacity on an adapted model need --write-checkpoint OUT (the merged weights)")
        print("add --write-checkpoint OUT to write the merged checkpoint")
        return 0
    with staged_dir(args.write_checkpoint, args.force, "--write-checkpoint") as stage:
        write_adapted_checkpoint(adapted, stage, base)
    _wrote(args.write_checkpoint)
    _exercise(args.write_checkpoint, plan, args)
    return 0


def _check_out(args, source: Path) -> None:
    """The --out rule of every command (podkv.outputs), before any work: refuse an existing folder unless
    --force, and never the checkpoint being read."""
    check_new_dir(source, args.write_checkpoint, "--write-checkpoint")
    refuse_existing(args.write_checkpoint, args.force, "--write-checkpoint")


def _adapted_dir(model: Path | None) -> Path | None:
    """The deltas folder when ``--model`` names an adapted model ('smollm2-pod' or such a folder)."""
    if model is not None and str(model) == "smollm2-pod" and not model.exists():
        from podkv.models.adapted import ASSET_DIR  # startup: transformers

        return ASSET_DIR
    return model if model is not None and model.is_dir() and is_adapted_dir(model) else None


def _wrote(out: Path) -> None:
    # vllm-cpu 0.32.0's `vllm` command fails to read its own version (the dist is named vllm-cpu).
    print(f"wrote {out}: serve with `python -m vllm.entrypoints.openai.api_server --model {out} --enforce-eager "
          "--dtype float32` (docs/serving.md)")


def _exercise(model_dir: Path, plan, args) -> None:
    if args.run:
        _generate(model_dir, plan, args.prompt, args.max_new_tokens)
    if args.capacity is not None:
        _capacity(model_dir, plan, args.capacity)


def _capacity(model_dir, plan, max_model_len: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plan_path = plan.save(Path(tmp) / "plan.json")
        capacity_main(["--model", str(model_dir), "--plan", str(plan_path), "--max-model-len", str(max_model_len)])


def _default_model_dir() -> Path:
    return ensure_default_model(progress=True)


def _generate(model_dir, plan, prompt: str, max_new_tokens: int) -> None:
    try:
        import vllm  # noqa: F401  # optional: vllm
    except ImportError:
        raise PodError("--run needs vLLM: pip install 'podkv[vllm]' (see docs/serving.md)") from None
    from vllm import SamplingParams  # optional: vllm

    llm = make_llm(model_dir, plan, dtype="float32", max_model_len=2048, enable_prefix_caching=False)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
    print(f"vLLM (PoD) continuation: {out[0].outputs[0].text!r}")
