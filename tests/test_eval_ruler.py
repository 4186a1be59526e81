"""RULER-style tasks: exact prompt lengths, needles where the record says, fresh draws per sample, the
too-few-samples refusal, teacher-forced retrieval log-probs, and a tiny end-to-end run with intervals."""

import json
import math
import re

import pytest
import torch

from podkv import SharingPlan
from podkv.cli import main
from podkv.errors import PodError
from podkv.eval.config import EvalConfig
from podkv.eval.generation import continuation_nll
from podkv.eval.methods import make_method
from podkv.eval.report import markdown, write_results
from podkv.eval.runner import evaluate
from podkv.eval.scoring import string_match_all
from podkv.eval.stats import bootstrap, wilson
from podkv.eval.tasks import make_task
from test_eval_prompts import CharTokenizer
from tolerances import SCALAR

from eval_fixtures import _one_thread, model, no_model_load, real_tokenizer  # noqa: F401  (pytest fixtures)

PLAN = SharingPlan.uniform(4, 2, 2, ns=4, nr=28)
RULER = ("niah_single_noise", "niah_single_prose", "niah_multikey", "niah_multivalue", "vt")
ALL = RULER + ("retrieval_logprob",)
HAYSTACK = {"niah_single_noise": "filler", "vt": "filler"}


def _cfg(**kw):
    return EvalConfig(**{**dict(tasks=ALL, lengths=(2000, 3000), samples=10, out="unused"), **kw})


def _needle_texts(task, case):
    """What must stand at each of the case's needle positions, written out from RULER's templates."""
    key, answer, value = case.info["key"], case.answer, case.info["value"]
    magic = " One of the special magic numbers for {} is: {}."
    if task in ("niah_single_noise", "niah_single_prose", "retrieval_logprob", "niah_multikey"):
        return [magic.format(key, answer[0])]  # multikey: the distractors' keys are not recorded
    if task == "niah_multivalue":
        return [magic.format(key, v) for v in answer]
    return [f"\nVAR {answer[0]} = {value}\n"] + [f"\nVAR {b} = VAR {a}\n" for a, b in zip(answer, answer[1:])]


@pytest.mark.parametrize("task", ALL)
def test_prompts_exact_length_and_needles_at_the_recorded_positions(task):
    tok = CharTokenizer()
    cases = make_task(task).cases(tok, _cfg(), PLAN)
    assert [c.info["length"] for c in cases] == [2000] * 10 + [3000] * 10
    for c in cases:
        assert len(c.input_ids) == c.info["length"]
        expected = _needle_texts(task, c)
        for pos, text in zip(c.info["needle_positions"], expected):
            assert tok.decode(c.input_ids[pos:pos + len(text)]) == text
        assert c.info["needle_pos"] == c.info["needle_positions"][0]
        assert len(c.info["needle_positions"]) == {"niah_multikey": 4, "niah_multivalue": 4, "vt": 5}.get(task, 1)
        # The asked needle sits at its depth, to within one haystack unit (units are <= 301 characters: half of one).
        assert abs(c.info["actual_depth"] - c.info["depth"]) * c.info["hay_tokens"] <= 151
        assert c.info["haystack"] == HAYSTACK.get(task, "prose")


@pytest.mark.parametrize("task", RULER)
def test_every_sample_draws_its_own_key_value_depth_and_haystack(task):
    cases = [c for c in make_task(task).cases(CharTokenizer(), _cfg(), PLAN) if c.info["length"] == 2000]
    keys = [c.info["key"] for c in cases]
    values = [v for c in cases for v in ([c.info["value"]] if task == "vt" else c.answer)]
    depths = [c.info["depth"] for c in cases]
    assert len(set(keys)) == len(values) // (4 if task == "niah_multivalue" else 1) == 10
    assert len(set(values)) == len(values)
    assert len(set(depths)) == 10 and all(0.0 <= d <= 1.0 for d in depths)
    starts = {c.info["haystack_start"] for c in cases}
    assert len(starts) == (5 if HAYSTACK.get(task) == "filler" else 10)  # the noise has 5 sentences
    # Seeded: the same settings give the same prompts, another seed others.
    again = [c.input_ids for c in make_task(task).cases(CharTokenizer(), _cfg(), PLAN) if c.info["length"] == 2000]
    other = make_task(task).cases(CharTokenizer(), _cfg(seed=1), PLAN)
    assert again == [c.input_ids for c in cases] and other[0].input_ids != cases[0].input_ids


def test_given_depths_replace_the_random_ones():
    cases = make_task("niah_single_prose").cases(CharTokenizer(), _cfg(depths=(0.25, 0.75), lengths=(2000,)), PLAN)
    assert [c.info["depth"] for c in cases] == [0.25] * 10 + [0.75] * 10
    assert [c.info["depth_bin"] for c in cases] == [0.25] * 10 + [0.75] * 10
    random_bins = {c.info["depth_bin"] for c in make_task("niah_single_prose").cases(CharTokenizer(), _cfg(), PLAN)}
    assert random_bins <= {0.1, 0.3, 0.5, 0.7, 0.9}


def test_multivalue_and_vt_ask_for_all_answers():
    tok = CharTokenizer()
    mv = make_task("niah_multivalue").cases(tok, _cfg(lengths=(2000,)), PLAN)[0]
    key = mv.info["key"]
    assert tok.decode(mv.input_ids).endswith(
        f"What are all the special magic numbers for {key} mentioned in the provided text?\n"
        f"Answer: The special magic numbers for {key} mentioned in the provided text are")
    vt = make_task("vt").cases(tok, _cfg(lengths=(2000,)), PLAN)[0]
    value = vt.info["value"]
    text = tok.decode(vt.input_ids)
    assert text.startswith("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
    assert text.endswith(f"Question: Find all variables that are assigned the value {value} in the text above.\n"
                         "Answer: According to the chain(s) of variable assignment in the text above, 5 variables "
                         f"are assigned the value {value}, they are:")
    # RULER's answered example comes first: its own chain of 3-letter names, listed after "they are:".
    example = re.search(r"they are: ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3})\n\n", text)
    assert example is not None and text.count("Memorize and track the chain(s)") == 2
    assert all(f"VAR {n} = " in text[:example.start()] for n in example.groups())
    assert text.index(f"\nVAR {vt.answer[0]} = {value}\n") > example.end()
    # The chain is in reading order: every hop after the variable it copies.
    assert vt.info["needle_positions"] == sorted(vt.info["needle_positions"])
    assert len(value) == 5 and all(len(n) == 5 and n.isupper() for n in vt.answer)


def test_retrieval_logprob_reuses_the_niah_single_prose_prompts():
    cfg = _cfg(tasks=("niah_single_prose", "retrieval_logprob"))
    a = make_task("niah_single_prose").cases(CharTokenizer(), cfg, PLAN)
    b = make_task("retrieval_logprob").cases(CharTokenizer(), cfg, PLAN)
    assert [c.input_ids for c in a] == [c.input_ids for c in b] and [c.answer for c in a] == [c.answer for c in b]


def test_retrieval_logprob_is_the_teacher_forced_log_probability(model):
    tok = CharTokenizer()
    task = make_task("retrieval_logprob")
    case = task.cases(tok, _cfg(lengths=(420,)), PLAN)[0]
    method = make_method("dense")
    with method.attached(model):
        rec = task.run_case(model, tok, method, case, _cfg())
    # By hand: one forward over prompt + " " + digits; the space is context, the 7 digits are scored.
    ids = torch.tensor([case.input_ids + tok.encode(" " + case.answer[0])])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    T = len(case.input_ids) + 1
    digits = ids[0, T:]
    total = float(logp[T - 1:-1].gather(1, digits[:, None]).sum())
    assert rec["answer_tokens"] == 7
    assert rec["logprob_per_token"] == pytest.approx(total / 7, abs=SCALAR)
    assert rec["p_answer"] == pytest.approx(math.exp(total), rel=SCALAR)
    nll, n, _ = continuation_nll(model, method, ids[:, :T], ids[:, T:])
    assert n == 7 and -nll / n == pytest.approx(rec["logprob_per_token"], abs=SCALAR)


@pytest.mark.parametrize("task", ALL)
def test_too_few_samples_is_refused(task):
    with pytest.raises(PodError, match="too few samples for a CI") as err:
        _cfg(tasks=(task,), samples=9)
    assert "\n" not in str(err.value) and ">= 10 prompts per length" in str(err.value) and "got 9" in str(err.value)
    with pytest.raises(PodError, match="got 6"):
        _cfg(tasks=(task,), samples=2, depths=(0.2, 0.5, 0.8))  # 2 per depth x 3 depths
    _cfg(tasks=(task,), samples=2, depths=(0.1, 0.3, 0.5, 0.7, 0.9))  # 10 per length
    _cfg(tasks=(task,), samples=10)  # the minimum itself is fine
    EvalConfig(tasks=("niah",), samples=1)  # the grid tasks keep one prompt per cell


def test_too_few_samples_fails_before_any_model_loads(no_model_load, capsys, tmp_path):
    assert main(["eval", "compare", "--methods", "dense", "--tasks", "niah_single_noise,vt", "--samples", "5",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "too few samples for a CI" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def long_model():
    """The eval tiny Llama with room for vt's character-level prompts (its answered example is ~700 characters)."""
    from tiny import tiny_model

    return tiny_model("llama", layers=4, heads=4, kv_heads=2, head_dim=16, max_pos=2048)


def test_end_to_end_two_tasks_with_intervals(long_model, tmp_path):
    cfg = EvalConfig(tasks=("niah_single_noise", "vt"), methods=("dense", "pod"), lengths=(1400,), samples=10,
                     max_new_tokens=4, out=str(tmp_path))
    methods = evaluate(long_model, CharTokenizer(), cfg, PLAN, progress=False)
    results = {"model": "tiny", "model_type": "llama", "plan_source": "test", "plan_summary": "", "seed": 0,
               "versions": {}, "settings": cfg.to_dict(), "methods": methods}
    write_results(results, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    assert md == markdown(data)
    for mname in ("dense", "pod"):
        for tname in ("niah_single_noise", "vt"):
            task = data["methods"][mname]["tasks"][tname]
            recs, s = task["records"], task["summary"]
            assert task["metric"] == "string_match_all" and len(recs) == 10
            scores = [string_match_all(r["generated"], r["answer"]) for r in recs]
            assert [r["score"] for r in recs] == scores
            assert s["n"] == 10 and s["mean"] == pytest.approx(sum(scores) / 10)
            # 0/1 scores (one answer): Wilson; fractional (5 variables): bootstrap.
            ci = list(wilson(int(sum(scores)), 10)) if tname == "niah_single_noise" else list(bootstrap(scores))
            assert s["ci95"] == pytest.approx(ci) and s["by_length"]["1400"]["ci95"] == pytest.approx(ci)
            cell = f"{100 * s['mean']:.0f}% [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}] n=10"
            row = next(line for line in md.splitlines() if line.startswith(f"| {mname} "))
            assert row.count(cell) >= 2  # overall and @1400
    same = [[r["needle_positions"] for r in data["methods"][m]["tasks"]["vt"]["records"]] for m in ("dense", "pod")]
    assert same[0] == same[1]
    assert (tmp_path / "niah_single_noise_heatmap.png").stat().st_size > 1000


def test_cli_runs_new_tasks_on_a_saved_tiny_model(tiny_lm_dir, tmp_path, capsys):
    assert main(["eval", "compare", "--model", str(tiny_lm_dir), "--methods", "dense", "--tasks",
                 "niah_single_noise,retrieval_logprob", "--lengths", "420", "--samples", "10", "--max-new-tokens", "2",
                 "--threads", "1", "--quiet", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    s = data["methods"]["dense"]["tasks"]["retrieval_logprob"]["summary"]
    assert s["n"] == 10 and s["ci95"][0] <= s["mean"] <= s["ci95"][1] < 0
    assert set(s["also"]["p(answer)"]) == {"metric", "mean", "ci95", "n", "by_length"}
    assert "retrieval_logprob p(answer)" in capsys.readouterr().out


def test_real_tokenizer_prompts_are_exact(real_tokenizer):
    tok = real_tokenizer
    for task in RULER:
        for c in make_task(task).cases(tok, _cfg(lengths=(1024,)), PLAN):
            assert len(c.input_ids) == 1024
            for pos, text in zip(c.info["needle_positions"], _needle_texts(task, c)):
                n = len(tok.encode(text, add_special_tokens=False))
                assert tok.decode(c.input_ids[pos:pos + n]) == text
