"""Evaluation reads only the held-out split: disjoint from train/plan, and user --files that repeat it are refused."""

import pytest

from podkv import SharingPlan, texts
from podkv.cli import main
from podkv.errors import PodError
from podkv.eval.config import EvalConfig
from podkv.eval.haystack import prose_text, sentences
from podkv.eval.tasks import make_task
from test_eval_prompts import CharTokenizer

from eval_fixtures import no_model_load  # noqa: F401  (pytest fixture)

PLAN = SharingPlan.uniform(4, 2, 2, ns=4, nr=28)


def _copied_topic() -> str:
    """A paragraph of the train/plan text (pydoc help topics), as a user might paste it into a file."""
    from pydoc_data.topics import topics

    return " ".join(topics["assert"].split()[:60])


def test_heldout_is_disjoint_from_train_and_plan():
    texts.check_disjoint(texts.text("heldout"))  # does not raise
    texts.check_disjoint(texts.text("heldout"), against=("plan",))


def test_text_copied_from_pydoc_topics_is_refused_in_one_line():
    with pytest.raises(PodError, match="overlaps the 'train' text") as err:
        texts.check_disjoint("My notes.\n\n" + _copied_topic(), what="--files")
    assert "\n" not in str(err.value) and str(err.value).startswith("--files overlaps")


def test_prose_haystack_and_ppl_default_are_the_heldout_split():
    assert prose_text() == texts.text("heldout")
    texts.check_disjoint("".join(sentences("prose")))  # the haystack as built: no 12-word run of the topics
    assert max(map(len, sentences("prose"))) <= 1 + 300  # long docstring code runs are cut: depths stay exact
    cfg = EvalConfig(tasks=("ppl",), lengths=(400,), samples=2, out="unused")
    case = make_task("ppl").cases(CharTokenizer(), cfg, PLAN)[1]
    assert CharTokenizer().decode(case.input_ids) == prose_text()[400:800]


def test_user_files_repeating_the_topics_are_refused_before_any_compute(tmp_path, no_model_load, capsys):
    bad = tmp_path / "copied.txt"
    bad.write_text("Intro.\n\n" + _copied_topic())
    with pytest.raises(PodError, match="--files overlaps the 'train' text"):
        EvalConfig(tasks=("ppl",), files=(str(bad),), out="unused")
    assert main(["eval", "ppl", "--method", "dense", "--files", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--files overlaps the 'train' text" in err and len(err.splitlines()) == 1
    own = tmp_path / "own.txt"
    own.write_text("A text of my own, written for this test and nowhere else. " * 50)
    EvalConfig(tasks=("ppl",), files=(str(own),), out="unused")  # accepted
