"""End to end through vLLM's OpenAI server with the ``openai`` client: a PoD checkpoint, then the same model
dense, each served with the same ``VLLM_CPU_KVCACHE_SPACE``, one after the other in one run.

    python benchmarks/serving/openai_check.py --model DIR --plan PLAN --out benchmarks/serving/openai_check.json

For each server (``python -m vllm.entrypoints.openai.api_server``): ``/tokenize`` of a few strings and of a
chat (with ``--reference-ids``: compared with podkv's own tokenizer, ``--reference-ids-of`` in podkv's venv),
a text completion, a chat completion,
a streamed completion (its chunks join to the non-streamed text), ``--concurrency`` completions sent at once
whose greedy texts equal the same prompts sent one by one, the KV capacity the server logs, and the generated
tokens per second of ``--concurrency`` requests in flight together (random prompts, fixed output length).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from podkv.cli_args import Int

TEXTS = ["The capital of France is", "Hello , world . It 's", "  two spaces,\ttab\nnewline", "héllo wörld 你好 🙂"]
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are",
           "Water boils at", "My favourite book is", "import numpy as np\n", "In 1969, the first",
           "The quick brown fox", "Photosynthesis is", "A haiku about the sea:", "The largest planet is",
           "SELECT * FROM", "To make a cup of tea,", "The speed of light is", "Dear Sir or Madam,"]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_args(model_dir: Path, port: int, pod: bool, args) -> list[str]:
    """The documented serving command (docs/serving.md); PoD and dense differ only in the block size (the
    plugin picks PoD's: 32 on vLLM's kernel, 16 on the gather path; dense: 32, the CPU kernel's smallest)."""
    block = [] if pod else ["--block-size", "32"]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "model", "--enforce-eager", "--dtype", "float32",
            "--max-model-len", str(args.max_model_len), *block,
            "--enable-chunked-prefill", "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--max-num-seqs", str(max(16, args.concurrency)), "--no-enable-prefix-caching", "--seed", "0",
            "--host", "127.0.0.1", "--port", str(port)]


class Server:
    """A vLLM OpenAI server in a subprocess; its log goes to a file (read for the KV capacity)."""

    def __init__(self, cmd: list[str], port: int, log: Path, timeout: float = 900):
        self.port, self.log = port, log
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        import urllib.request

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.log.read_text()[-4000:]}")

    def kv_cache_tokens(self) -> int | None:
        m = re.findall(r"KV cache size: ([\d,]+) tokens", self.log.read_text())
        return int(m[-1].replace(",", "")) if m else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def server_token_ids(port: int) -> dict[str, list[int]]:
    """The server's ``/tokenize`` of TEXTS (text prompts) and of CHAT (its chat template, generation prompt)."""
    import urllib.request

    def ask(body: dict) -> list[int]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/tokenize", data=json.dumps(
            {"model": "model", **body}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["tokens"]

    ids = {t: ask({"prompt": t}) for t in TEXTS}
    ids["<chat>"] = ask({"messages": CHAT, "add_generation_prompt": True})
    return ids


def reference_token_ids(model_dir: Path) -> dict[str, list[int]]:
    """The same token ids from podkv's own tokenizer (run in podkv's venv: ``--reference-ids-of DIR``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = {t: tok(t)["input_ids"] for t in TEXTS}
    chat = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids["<chat>"] = tok(chat, add_special_tokens=False)["input_ids"]
    return ids


def api_checks(client, port: int, max_tokens: int, concurrency: int) -> dict:
    """Completion, chat, streaming, and concurrent == one by one (greedy)."""
    greedy = dict(model="model", temperature=0.0, max_tokens=max_tokens, seed=0)
    out = {"tokenize": server_token_ids(port)}
    done = client.completions.create(prompt=PROMPTS[0], **greedy)
    out["completion"] = {"prompt": PROMPTS[0], "text": done.choices[0].text}
    chat = client.chat.completions.create(messages=CHAT, **greedy)
    out["chat"] = {"messages": CHAT, "text": chat.choices[0].message.content}
    chunks = [c.choices[0].text for c in client.completions.create(prompt=PROMPTS[0], stream=True, **greedy)]
    out["stream"] = {"chunks": len(chunks), "text": "".join(chunks), "equals_completion": "".join(chunks) ==
                     done.choices[0].text}
    prompts = (PROMPTS * (1 + concurrency // len(PROMPTS)))[:concurrency]
    single = [client.completions.create(prompt=p, **greedy).choices[0].text for p in prompts]
    with ThreadPoolExecutor(concurrency) as pool:
        together = list(pool.map(lambda p: client.completions.create(prompt=p, **greedy).choices[0].text, prompts))
    out["concurrent"] = {"requests": concurrency, "equal": sum(a == b for a, b in zip(single, together)),
                         "differing": [{"prompt": p, "single": a, "concurrent": b}
                                       for p, a, b in zip(prompts, single, together) if a != b]}
    return out


def throughput(client, concurrency: int, prompt_len: int, max_tokens: int, passes: int) -> dict:
    """Generated tokens per second with ``concurrency`` requests in flight (best of ``passes``)."""
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(prompt_len)] for _ in range(concurrency)]
    kw = dict(model="model", temperature=0.0, max_tokens=max_tokens, extra_body={"min_tokens": max_tokens,
                                                                                "ignore_eos": True})
    client.completions.create(prompt=prompts[0], **{**kw, "max_tokens": 2, "extra_body": {}})  # warm-up
    runs = []
    for _ in range(passes):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            outs = list(pool.map(lambda p: client.completions.create(prompt=p, **kw), prompts))
        wall = time.perf_counter() - t0
        tokens = sum(o.usage.completion_tokens for o in outs)
        runs.append({"wall_s": round(wall, 2), "generated_tokens": tokens, "tokens_per_s": tokens / wall})
    return {"requests": concurrency, "prompt_len": prompt_len, "max_tokens": max_tokens, "passes": runs,
            "tokens_per_s": max(r["tokens_per_s"] for r in runs)}


def check_server(model_dir: Path, pod: bool, args, workdir: Path) -> dict:
    from openai import OpenAI

    port = free_port()
    cmd = server_args(model_dir, port, pod, args)
    with Server(cmd, port, workdir / f"server_{'pod' if pod else 'dense'}.log") as server:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=1800, max_retries=0)
        result = {"command": " ".join(["python"] + cmd[1:]), "kv_cache_size_tokens": server.kv_cache_tokens()}
        result.update(api_checks(client, port, args.max_tokens, args.concurrency))
        if args.throughput_tokens:
            result["throughput"] = throughput(client, args.concurrency, args.prompt_len, args.throughput_tokens,
                                              args.passes)
    return result


def run(args) -> dict:
    from podkv.plan import SharingPlan
    from podkv.serving.checkpoint import write_dense_checkpoint, write_pod_checkpoint

    plan = SharingPlan.load(args.plan)
    with tempfile.TemporaryDirectory(prefix="podkv-openai-") as tmp:
        tmp = Path(tmp)
        pod_dir = write_pod_checkpoint(args.model, plan, tmp / "pod")
        dense_dir = write_dense_checkpoint(args.model, tmp / "dense")
        pod = check_server(pod_dir, True, args, tmp)
        dense = check_server(dense_dir, False, args, tmp) if not args.pod_only else None
    result = {"model": str(args.model), "plan": str(args.plan), "plan_summary": plan.summary(args.max_model_len),
              "analytic_saving": plan.kv_saving(args.max_model_len),
              "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
              "settings": {k: getattr(args, k) for k in ("max_model_len", "max_num_batched_tokens", "max_tokens",
                                                         "concurrency", "prompt_len", "throughput_tokens", "passes")},
              "pod": pod, "dense": dense}
    if args.reference_ids is not None:
        ref = json.loads(Path(args.reference_ids).read_text())
        result["tokenizer_matches_reference"] = {t: ids == ref.get(t) for t, ids in pod["tokenize"].items()}
    if dense is not None:
        result["capacity_ratio"] = pod["kv_cache_size_tokens"] / dense["kv_cache_size_tokens"]
        result["measured_saving"] = 1 - dense["kv_cache_size_tokens"] / pod["kv_cache_size_tokens"]
        if "throughput" in pod:
            result["dense_over_pod_throughput"] = dense["throughput"]["tokens_per_s"] / pod["throughput"]["tokens_per_s"]
    return result


def markdown(result: dict) -> str:
    """The results file people read: every check per server, then capacity and throughput, PoD vs dense."""
    pod, dense = result["pod"], result.get("dense")
    servers = [("PoD", pod)] + ([("dense", dense)] if dense else [])

    def check_row(name, fn):
        return f"| {name} | " + " | ".join(fn(s) for _, s in servers) + " |"

    conc = lambda s: f"{s['concurrent']['equal']}/{s['concurrent']['requests']} equal"  # noqa: E731
    lines = [f"# OpenAI-client check through vLLM's server: PoD vs dense", "",
             f"`{result['command']}`", "",
             f"Model `{result['model']}`, plan `{result['plan']}` ({result['plan_summary']}); both servers with "
             f"`VLLM_CPU_KVCACHE_SPACE={result['VLLM_CPU_KVCACHE_SPACE']}` GiB, fp32, greedy.", "",
             "| check | " + " | ".join(n for n, _ in servers) + " |", "|---|" + "---|" * len(servers),
             check_row("text completion", lambda s: repr(s["completion"]["text"])),
             check_row("chat completion", lambda s: repr(s["chat"]["text"])),
             check_row("streamed == non-streamed", lambda s: f"{s['stream']['equals_completion']} "
                                                            f"({s['stream']['chunks']} chunks)"),
             check_row(f"{pod['concurrent']['requests']} concurrent == one by one", conc)]
    if "tokenizer_matches_reference" in result:
        same = result["tokenizer_matches_reference"]
        lines.append(f"| `/tokenize` == podkv's tokenizer | {sum(same.values())}/{len(same)} |" +
                     " |" * (len(servers) - 1))
    if dense:
        lines += ["", "| at the same KV memory | dense | PoD | PoD / dense |", "|---|---|---|---|",
                  f"| KV capacity (tokens, vLLM's log) | {dense['kv_cache_size_tokens']:,} | "
                  f"{pod['kv_cache_size_tokens']:,} | x{result['capacity_ratio']:.3f} (saving "
                  f"{result['measured_saving']:.1%}; analytic {result['analytic_saving']:.1%}) |"]
        if "throughput" in pod:
            t = pod["throughput"]
            lines.append(f"| generated tokens/s, {t['requests']} concurrent requests, {t['prompt_len']}-token "
                         f"prompts, {t['max_tokens']} tokens each (best of {len(t['passes'])}) | "
                         f"{dense['throughput']['tokens_per_s']:.1f} | {t['tokens_per_s']:.1f} | "
                         f"x{1 / result['dense_over_pod_throughput']:.2f} (dense / PoD "
                         f"x{result['dense_over_pod_throughput']:.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="HF checkpoint directory (served dense and with --plan)")
    ap.add_argument("--plan", type=Path)
    ap.add_argument("--max-model-len", action=Int, default=4096)
    ap.add_argument("--max-num-batched-tokens", action=Int, default=256)
    ap.add_argument("--max-tokens", action=Int, default=16, help="greedy tokens of the API checks")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-len", action=Int, default=256, help="throughput: random prompt tokens")
    ap.add_argument("--throughput-tokens", action=Int, default=64, help="throughput: tokens per request (0: skip)")
    ap.add_argument("--passes", type=int, default=2, help="throughput: timed passes per server (best counts)")
    ap.add_argument("--pod-only", action="store_true", help="skip the dense server")
    ap.add_argument("--reference-ids", type=Path, default=None,
                    help="JSON {text: token ids} from podkv's own tokenizer, compared with the server's /tokenize")
    ap.add_argument("--reference-ids-of", type=Path, default=None, metavar="DIR",
                    help="only print the token ids of podkv's tokenizer for DIR (run in podkv's venv)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.reference_ids_of is not None:
        print(json.dumps(reference_token_ids(args.reference_ids_of)))
        return 0
    if args.model is None or args.plan is None:
        ap.error("--model and --plan are required")
    result = run(args)
    result["command"] = "python benchmarks/serving/openai_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(result, indent=1, ensure_ascii=False))
    if args.out is not None:
        from podkv.io import atomic_write_text, write_json

        write_json(args.out, result)
        atomic_write_text(args.out.with_suffix(".md"), markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
