"""The runner on a tiny model: registries, same prompts for every method, reproducible results, bad input."""

import json

import pytest
import torch

from podkv import SharingPlan
from podkv.cli import main
from podkv.errors import PodError
from podkv.eval.config import EvalConfig
from podkv.eval.report import write_results
from podkv.eval.runner import default_budget, evaluate
from podkv.eval.tasks import TASKS, make_task
from test_eval_prompts import CharTokenizer
from tiny import tiny_model

PLAN = SharingPlan.uniform(4, 2, 2, ns=4, nr=28)


from eval_fixtures import _one_thread, model  # noqa: F401  (pytest fixtures)


def _cfg(tmp_path, **kw):
    base = dict(tasks=("niah", "passkey", "multikey", "ppl"), methods=("dense", "pod"), lengths=(420, 500),
                depths=(0.0, 1.0), max_new_tokens=3, needles=2, out=str(tmp_path))
    return EvalConfig(**{**base, **kw})


def test_compare_writes_reproducible_results(model, tmp_path):
    cfg = _cfg(tmp_path, depths=(0.5,))
    runs = []
    for out in ("a", "b"):
        results = {"model": "tiny", "model_type": "llama", "plan_source": "test", "plan_summary": PLAN.summary(),
                   "seed": 0, "versions": {}, "settings": cfg.to_dict(),
                   "methods": evaluate(model, CharTokenizer(), cfg, PLAN, progress=False)}
        write_results(results, tmp_path / out)
        runs.append(json.loads((tmp_path / out / "results.json").read_text()))
    # Wall-clock seconds are the one field two identical runs cannot share; everything else must match exactly.
    for run in runs:
        for entry in run["methods"].values():
            assert entry.pop("seconds") >= 0
    assert runs[0] == runs[1]
    data = runs[0]
    for task in ("niah", "passkey", "multikey"):
        recs = {m: data["methods"][m]["tasks"][task]["records"] for m in ("dense", "pod")}
        assert [r["needle_pos"] for r in recs["dense"]] == [r["needle_pos"] for r in recs["pod"]]
        assert {r["length"] for r in recs["pod"]} == {420, 500}
    ppl = data["methods"]["pod"]["tasks"]["ppl"]["summary"]
    assert ppl["ppl"] > 1 and set(ppl["by_length"]) == {"420", "500"}
    # PoD held less KV than dense on every prompt; dense held all of it.
    assert all(r["kv_fraction"] < 1 for r in data["methods"]["pod"]["tasks"]["niah"]["records"])
    assert all(r["kv_fraction"] == 1 for r in data["methods"]["dense"]["tasks"]["niah"]["records"])
    md = (tmp_path / "a" / "results.md").read_text()
    assert "| dense |" in md and "| pod (budget" in md
    assert (tmp_path / "a" / "niah_heatmap.png").stat().st_size > 1000
    assert (tmp_path / "a" / "accuracy_vs_kv_saving.png").is_file()


def test_default_budget_is_pods_own(model, tmp_path):
    held = 1 - PLAN.kv_saving(420)  # the shorter length holds the larger fraction
    budget = default_budget(PLAN, [420, 500])
    assert held <= budget < held + 0.01 and round(100 * budget) == pytest.approx(100 * budget)  # rounded up to 0.01
    cfg = _cfg(tmp_path, tasks=("passkey",), methods=("pod",), lengths=(420,), depths=(0.5,))
    rec = evaluate(model, CharTokenizer(), cfg, PLAN, progress=False)["pod"]["tasks"]["passkey"]["records"][0]
    assert rec["kv_fraction"] <= default_budget(PLAN, [420])


@pytest.mark.parametrize("kw,match", [
    (dict(methods=("magic",)), "unknown method"),
    (dict(tasks=("trivia",)), "unknown task"),
    (dict(depths=(0.5, 1.2)), "deeper than the haystack"),
    (dict(budget=0.0), "budget"),
    (dict(lengths=(4,)), "lengths"),
])
def test_bad_config_is_poderror(tmp_path, kw, match):
    with pytest.raises(PodError, match=match):
        _cfg(tmp_path, **kw)


def test_unmeetable_budget_is_poderror(model, tmp_path):
    cfg = _cfg(tmp_path, methods=("pod",), budget=0.5)
    with pytest.raises(PodError, match="cannot meet --budget 0.5"):
        evaluate(model, CharTokenizer(), cfg, PLAN, progress=False)


def test_lengths_beyond_the_models_positions_are_refused_before_any_prompt(model, tmp_path, monkeypatch):
    """Issue 20: `podkv demo --length 100k` on an 8K model ran 12 minutes before failing; now nothing runs."""
    limit = model.config.max_position_embeddings
    monkeypatch.setattr("podkv.eval.runner.make_task", lambda *a, **k: pytest.fail("a prompt was built"))
    with pytest.raises(PodError, match=f"--lengths: {limit + 1} tokens exceed .*max_position_embeddings={limit}"):
        evaluate(model, CharTokenizer(), _cfg(tmp_path, lengths=(256, limit + 1)), PLAN, progress=False)


def test_length_shorter_than_proximal_window_for_ppl(model, tmp_path):
    with pytest.raises(PodError, match="too short for ppl"):
        make_task("ppl").cases(CharTokenizer(), _cfg(tmp_path, lengths=(20,)), PLAN)


def test_dataset_tasks_need_local_data(tmp_path):
    for name in ("longbench", "ruler"):
        with pytest.raises(PodError, match="--data"):
            TASKS[name]().cases(CharTokenizer(), _cfg(tmp_path, tasks=(name,)), PLAN)




def test_cli_bad_input_exits_2(capsys, tmp_path):
    assert main(["eval", "niah", "--method", "magic", "--out", str(tmp_path)]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err
    assert main(["eval", "compare", "--methods", "dense", "--depths", "0,2", "--out", str(tmp_path)]) == 2
    assert "deeper than the haystack" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "trivia", "--method", "dense", "--out", str(tmp_path)])


def _write_run(model, cfg, out):
    results = {"model": "tiny", "model_type": "llama", "plan_source": "test", "plan_summary": "", "seed": cfg.seed,
               "versions": {}, "settings": cfg.to_dict(),
               "methods": evaluate(model, CharTokenizer(), cfg, PLAN, progress=False)}
    write_results(results, out)


def test_merge_separate_runs(model, tmp_path, capsys):
    small = dict(tasks=("passkey",), lengths=(420,), depths=(0.5,))
    _write_run(model, _cfg(tmp_path, methods=("dense",), **small), tmp_path / "a")
    _write_run(model, _cfg(tmp_path, methods=("pod",), **small), tmp_path / "b")
    _write_run(model, _cfg(tmp_path, methods=("pod",), seed=1, **small), tmp_path / "c")
    assert main(["eval", "compare", "--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                 str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert list(merged["methods"]) == ["dense", "pod"]
    assert "| pod (budget" in (tmp_path / "m" / "results.md").read_text()
    # The same method run on another model is kept under its model's name.
    assert main(["eval", "compare", "--merge", str(tmp_path / "b"), str(tmp_path / "b"), "--out",
                 str(tmp_path / "m3")]) == 0
    assert list(json.loads((tmp_path / "m3" / "results.json").read_text())["methods"]) == ["pod", "pod [tiny]"]
    assert main(["eval", "compare", "--merge", str(tmp_path / "a"), str(tmp_path / "c"), "--out",
                 str(tmp_path / "m2")]) == 2
    assert "'seed'" in capsys.readouterr().err


def test_longbench_loader_reads_local_jsonl(tmp_path):
    rows = [{"context": "x" * 900, "input": "who?", "answers": ["Ann"]}, {"context": "short", "input": "q", "answers": ["b"]}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _cfg(tmp_path, tasks=("longbench",), data=str(tmp_path), subset="qa", lengths=(300,))
    task = TASKS["longbench"]()
    cases = task.cases(CharTokenizer(), cfg, PLAN)
    assert [len(c.input_ids) for c in cases][0] == 300  # cut in the middle to the largest length
    assert task.score(" It was Ann.", cases[0].answer) and not task.score("Bob", cases[0].answer)


def test_ppl_reads_user_files(tmp_path):
    (tmp_path / "doc.txt").write_text("hello world. " * 100)
    cases = make_task("ppl").cases(CharTokenizer(), _cfg(tmp_path, files=(str(tmp_path / "doc.txt"),),
                                                         lengths=(400,), samples=2), PLAN)
    assert len(cases) == 2 and all(len(c.input_ids) == 400 and c.split == 200 for c in cases)
    with pytest.raises(PodError, match="does not exist"):
        make_task("ppl").cases(CharTokenizer(), _cfg(tmp_path, files=("/nope.txt",)), PLAN)
