"""Prompt builders and scoring: exact lengths, needles where requested, exact-match rules."""

import random

import pytest

from podkv.errors import PodError
from podkv.eval import prompts
from podkv.eval.scoring import exact_match, perplexity

from eval_fixtures import real_tokenizer  # noqa: F401  (pytest fixture)


class CharTokenizer:
    """A tokenizer for tiny models: one id per ASCII character (ids 3..127), no chat template."""

    chat_template = None
    eos_token_id = 1
    pad_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [3 + (ord(c) % 125) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 3) for i in ids if i >= 3)


@pytest.mark.parametrize("haystack", ["filler", "prose"])
@pytest.mark.parametrize("length", [300, 1000, 2500])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_at_requested_depth_and_exact_length(haystack, length, depth):
    tok = CharTokenizer()
    needle = prompts.passkey_needle(random.Random(1))
    p = prompts.build_prompt(tok, length, [(needle, depth)], haystack=haystack)
    assert abs(len(p.input_ids) - length) <= 0.01 * length
    text = tok.decode(p.input_ids)
    needle_ids = tok.encode(needle.text)
    # The needle really is at needle_pos, and its depth is the requested one within one sentence.
    assert p.input_ids[p.needle_pos:p.needle_pos + len(needle_ids)] == needle_ids
    longest_sentence = 400 if haystack == "prose" else 25
    assert abs(p.actual_depth - depth) * p.hay_tokens <= longest_sentence
    assert p.hay_span[1] - p.hay_span[0] == p.hay_tokens + len(needle_ids)
    assert text.endswith("Answer: " + needle.answer_prefix)
    assert text.count(needle.answer) >= 2  # the needle states the key twice


@pytest.mark.integration
def test_real_tokenizer_length_within_one_percent(real_tokenizer):
    tok = real_tokenizer
    for length, depth in [(1024, 0.5), (4096, 0.1)]:
        p = prompts.build_prompt(tok, length, [(prompts.fact_needle(random.Random(0)), depth)], haystack="prose")
        assert abs(len(p.input_ids) - length) <= 0.01 * length
        # Decoded and re-encoded, the real prompt stays within 1% of the request.
        assert abs(len(tok.encode(tok.decode(p.input_ids), add_special_tokens=False)) - length) <= 0.01 * length
        assert abs(p.actual_depth - depth) < 0.1


def test_multiple_needles_all_present_and_asked_one_answered():
    tok = CharTokenizer()
    rng = random.Random(3)
    needles = [prompts.fact_needle(rng, key=k) for k in ("amber-onyx", "iris-jade", "dune-maple")]
    p = prompts.build_prompt(tok, 900, [(needles[0], 0.7), (needles[1], 0.1), (needles[2], 0.4)], ask=0)
    text = tok.decode(p.input_ids)
    assert all(n.text in text for n in needles)
    assert p.answer == needles[0].answer and needles[0].question in text
    assert abs(p.actual_depth - 0.7) < 0.05


@pytest.mark.parametrize("depth", [-0.1, 1.5])
def test_needle_deeper_than_haystack_is_poderror(depth):
    with pytest.raises(PodError, match="depth"):
        prompts.build_prompt(CharTokenizer(), 500, [(prompts.passkey_needle(random.Random(0)), depth)])


def test_length_too_short_is_poderror():
    with pytest.raises(PodError, match="too short"):
        prompts.build_prompt(CharTokenizer(), 50, [(prompts.passkey_needle(random.Random(0)), 0.5)])


@pytest.mark.parametrize("generated,answer,ok", [
    (" 71432. Remember it.", "71432", True),
    ("71432", "71432", True),
    ("The key is 71,432", "71432", True),
    (" 7143", "71432", False),
    ("12345 and 71432", "71432", False),
    ("714321", "71432", False),
    ("", "71432", False),
    (" Paris, of course.", "paris", True),
    ("I think Paris", "paris", False),
])
def test_exact_match(generated, answer, ok):
    assert exact_match(generated, answer) is ok


def test_perplexity():
    assert perplexity(0.0, 10) == 1.0
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
