"""Long-range training documents and the anchor initialisations (podkv.training.longrange / .init)."""

from __future__ import annotations

import random
import re

import pytest
import torch
from tiny import tiny_model

import podkv
from podkv.errors import PodError
from podkv.models.anchor_init import init_from_anchor
from podkv.training.longrange import (
    CHAIN_QUESTIONS,
    CHAIN_WORDINGS,
    CHAT_OPENINGS,
    MULTI_QUESTIONS,
    MULTI_WORDINGS,
    TRACK_FILLER,
    TRACK_QUESTIONS,
    TRACK_WORDINGS,
    chain_document,
    long_range_blocks,
    lookup_document,
    multilookup_document,
    repeat_document,
    track_document,
    track_texts,
)


class WordTok:
    """Whitespace tokenizer over a growing vocabulary: enough to count and decode tokens exactly."""

    eos_token_id = 0

    def __init__(self):
        self.vocab, self.words = {"<eos>": 0}, ["<eos>"]

    def encode(self, text, add_special_tokens=False):
        out = []
        for w in text.split(" "):
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            out.append(self.vocab[w])
        return out

    def decode(self, ids):
        return " ".join(self.words[i] if i < len(self.words) else f"x{i}" for i in ids)


STREAM = list(range(100_000, 105_000))  # token ids that never collide with WordTok's small vocabulary


def test_repeat_document_repeats_its_passage_beyond_the_gap():
    doc = repeat_document(STREAM, 1023, random.Random(0), min_gap=256)
    assert len(doc) == 1023
    for p in range(1023 // 8, (1023 - 256) // 2 + 1):  # find the passage length used
        if doc[:p] == doc[-p:] and 1023 - 2 * p >= 256:
            break
    else:
        pytest.fail("the document does not end with a copy of its beginning")


def test_lookup_document_is_exact_length_and_answers_from_its_records():
    tok = WordTok()
    doc = lookup_document(tok, STREAM, 700, random.Random(1))
    assert len(doc) == 700
    text = tok.decode(doc)
    questions = text.split("Which access code belongs to ")[1:]
    assert len(questions) == 3
    for q in questions:
        name, code = q.split("? ")[0], q.split("? ")[1].split(".")[0]
        assert f"the access code of {name} is {code}." in text


def template_regex(template: str) -> re.Pattern:
    """A template with {fields} as a regex with one named group per field."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+?)" for i, p in enumerate(parts)) + "$")


def test_multilookup_document_lists_all_numbers_of_its_name_in_order():
    tok = WordTok()
    for seed in range(8):
        doc = multilookup_document(tok, STREAM, 900, random.Random(seed))
        assert len(doc) == 900
        text = tok.decode(doc)
        last = text.rsplit("\n\n", 1)[1]
        record, final = next(w for w in MULTI_WORDINGS if template_regex(w[1]).match(last))
        m = template_regex(final).match(last)
        listed = m["values"].split(", ")
        assert len(listed) == 4
        positions = [text.index(record.format(name=m["name"], value=v)) for v in listed]
        assert positions == sorted(positions)


def test_chain_document_names_every_holder_in_chain_order():
    tok = WordTok()
    for seed in range(6):
        text = tok.decode(chain_document(tok, STREAM, 900, random.Random(seed)))
        last = text.rsplit("\n\n", 1)[1]
        first, copy, final = next(w for w in CHAIN_WORDINGS if template_regex(w[2]).match(last))
        m = template_regex(final).match(last)
        names = m["names"].split(" ")
        assert len(names) == 5
        steps = [text.index(first.format(a=names[0], value=m["value"]))]
        steps += [text.index(copy.format(a=a, b=b)) for a, b in zip(names, names[1:])]
        assert steps == sorted(steps)


def test_training_wordings_never_use_the_evaluation_templates():
    """The RULER-style tasks must stay unseen: no magic numbers, no ``VAR X = Y`` chains, no passkey."""
    groups = (MULTI_WORDINGS, CHAIN_WORDINGS, TRACK_WORDINGS, TRACK_QUESTIONS, [MULTI_QUESTIONS, CHAIN_QUESTIONS],
              [CHAT_OPENINGS])
    wordings = " ".join(w for group in groups for t in group for w in t).lower() + " " + TRACK_FILLER.lower()
    for phrase in ("magic number", "var ", "pass key", "passkey", "memorize", "variable assignment",
                   "grass is green", "sky is blue", "there and back"):
        assert phrase not in wordings


def test_track_texts_hold_two_ordered_chains_and_answer_the_asked_one():
    questions = set()
    for seed in range(24):
        texts, tail, asked = track_texts(random.Random(seed))
        def assignment(first, t):
            m = template_regex(first).match(t)
            return m if m and m["value"].isdigit() and " " not in m["a"] else None

        first, copy = next(w for w in TRACK_WORDINGS if sum(assignment(w[0], t) is not None for t in texts) == 2)
        starts = [assignment(first, t) for t in texts]  # the two chains' first statements
        values = {m["value"] for m in starts if m}
        assert len(values) == 2
        copies = [template_regex(copy).match(t) for t in texts]
        start = next(i for i, m in enumerate(starts) if m and m["a"] == asked[0])
        hops = [next(i for i, m in enumerate(copies) if m and (m["a"], m["b"]) == ab) for ab in zip(asked, asked[1:])]
        assert [start] + hops == sorted([start] + hops)  # the asked chain, in order
        assert tail[1].endswith(" ".join(asked) + ".")
        questions.add(next(q for q, _ in TRACK_QUESTIONS if q.split("{value}")[0] in tail[0]))
    assert len(questions) == len(TRACK_QUESTIONS)


def test_track_document_is_exact_length_in_prose_or_filler():
    tok = WordTok()
    filler = set(tok.encode(TRACK_FILLER))
    in_filler = 0
    for seed in range(12):
        ids = track_document(tok, STREAM, 900, random.Random(seed))
        assert len(ids) == 900
        in_filler += len(filler & set(ids)) > 0 and not any(i >= 100_000 for i in ids)
    assert 0 < in_filler < 12  # both haystacks occur


def test_long_range_kinds_cycle_and_unknown_kind_is_refused():
    rows = long_range_blocks(WordTok(), STREAM, 1024, 4, kinds=("multilookup", "chain"))
    assert [len(r) for r in rows] == [1024] * 4
    with pytest.raises(PodError, match="--long-range-kinds: unknown kind 'recall'"):
        long_range_blocks(WordTok(), STREAM, 1024, 2, kinds=("chain", "recall"))


class ChatTok(WordTok):
    """WordTok with a chat template: turns as ``<role> text <end>``."""

    chat_template = "role/text/end"

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(f"<{m['role']}> {m['content']} <end> " for m in messages)


def test_chat_framed_documents_put_the_haystack_and_question_in_a_user_turn_and_the_answer_in_the_assistants():
    tok = ChatTok()
    kinds = ("lookup", "multilookup", "chain", "track")
    rows = long_range_blocks(tok, STREAM, 1024, 8, seed=3, kinds=kinds, chat_share=1.0)
    for kind, row in zip(kinds * 2, rows):
        assert len(row) == 1024 and row[-1] == 0
        text = tok.decode(row[:-1])
        assert text.startswith("<user> ") and any(i >= 100_000 for i in row)  # the haystack is in the first turn
        turns = text.split("<assistant> ")[1:]
        assert len(turns) == (3 if kind == "lookup" else 1)
        if kind == "lookup":  # each answer is the code its record gave the asked name
            asked = re.findall(r"Which access code belongs to (\w+)\?", text)
            for name, turn in zip(asked, turns):
                assert f"the access code of {name} is {turn.split(' <end>')[0]}." in text
    # the same documents in plain text are those of a run without chat: the chat draws have their own generator
    plain = long_range_blocks(tok, STREAM, 1024, 8, seed=3, kinds=kinds)
    assert plain == long_range_blocks(tok, STREAM, 1024, 8, seed=3, kinds=kinds, chat_share=0.0)
    assert all("<user>" not in tok.decode(r) for r in plain)
    mixed = long_range_blocks(tok, STREAM, 1024, 40, seed=3, kinds=("repeat", "chain"), chat_share=0.5)
    framed = ["<user>" in tok.decode(r) for r in mixed]
    assert not any(framed[0::2]) and 0 < sum(framed[1::2]) < 20  # repeat never, chain about half


def test_chat_framing_is_refused_without_a_template_and_outside_0_1():
    with pytest.raises(PodError, match="--long-range-chat needs a tokenizer with a chat template"):
        long_range_blocks(WordTok(), STREAM, 1024, 2, kinds=("chain",), chat_share=1.0)
    for bad in (-0.1, 1.5, True):
        with pytest.raises(PodError, match="--long-range-chat must be a share in \\[0, 1\\]"):
            long_range_blocks(ChatTok(), STREAM, 1024, 2, chat_share=bad)


def test_answer_weights_fall_on_the_positions_that_predict_a_question_documents_tail():
    from podkv.training.data import PackedDataset, answer_weights

    tok = WordTok()
    rows = long_range_blocks(tok, STREAM, 1024, 4, seed=2, kinds=("repeat", "lookup", "chain", "multilookup"))
    assert rows[0].answer_start == 1023  # repeat: no tail
    for row in rows[1:]:
        tail = tok.decode(row[row.answer_start:-1])
        assert tail.startswith("\n\n") and not any(i >= 100_000 for i in row[row.answer_start:])
        assert row[row.answer_start - 1] >= 100_000 or tok.decode([row[row.answer_start - 1]]).endswith("\n\n")
    w = answer_weights(rows, 1024, 8.0)
    assert torch.equal(w[0], torch.ones(1024))
    for row, wr in zip(rows[1:], w[1:]):
        s = row.answer_start
        assert (wr[s - 1:1022] == 8).all() and (wr[:s - 1] == 1).all() and (wr[1022:] == 1).all()
    item = PackedDataset(torch.tensor(rows), w)[2]
    assert torch.equal(item["loss_weights"], w[2]) and "loss_weights" not in PackedDataset(torch.tensor(rows))[2]


def test_long_range_blocks_are_seq_len_rows_ending_in_eos():
    rows = long_range_blocks(WordTok(), STREAM, 1024, 4, seed=0)
    assert [len(r) for r in rows] == [1024] * 4 and all(r[-1] == 0 for r in rows)
    with pytest.raises(PodError, match="--seq-len 512 is too short"):
        long_range_blocks(WordTok(), STREAM, 512, 1)


def test_anchor_q_init_copies_the_anchor_rows_of_shared_heads_only():
    model = tiny_model("llama")
    plan = podkv.SharingPlan(anchors=[[0, 0], [0, 1], [2, 1], [2, 3]], ns=4, nr=8)
    layers = model.model.layers
    for layer in layers:  # distinct norm gains, so the rescaling is exercised
        layer.input_layernorm.weight.data.uniform_(0.5, 1.5)
    before = [l.self_attn.q_proj.weight.clone() for l in layers]
    k_before = [l.self_attn.k_proj.weight.clone() for l in layers]
    assert init_from_anchor(model, plan, "anchor-q") == 3  # (1, 0), (2, 1), (3, 0)
    attn = layers[0].self_attn
    d, group = attn.head_dim, model.config.num_attention_heads // 2
    for l, row in enumerate(plan.anchors):
        for h, a in enumerate(row):
            rows = slice(h * group * d, (h + 1) * group * d)
            got = layers[l].self_attn.q_proj.weight[rows]
            if a == l:
                torch.testing.assert_close(got, before[l][rows], rtol=0, atol=0)
            else:
                ratio = layers[a].input_layernorm.weight / layers[l].input_layernorm.weight
                torch.testing.assert_close(got, before[a][rows] * ratio, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layers[l].self_attn.k_proj.weight, k_before[l], rtol=0, atol=0)


def test_anchor_qk_init_makes_a_shared_head_score_like_its_anchor():
    """With equal norm gains and the same input, a shared head's q and k equal its anchor's after anchor-qk."""
    model = tiny_model("llama")
    plan = podkv.SharingPlan.uniform(4, 2, 2, ns=4, nr=8)
    init_from_anchor(model, plan, "anchor-qk")
    x = torch.randn(3, model.config.hidden_size)
    a1, a0 = model.model.layers[1].self_attn, model.model.layers[0].self_attn
    torch.testing.assert_close(a1.q_proj(x), a0.q_proj(x))
    torch.testing.assert_close(a1.k_proj(x), a0.k_proj(x))


def test_init_none_changes_nothing_and_a_bad_name_is_refused():
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert init_from_anchor(model, podkv.SharingPlan.uniform(4, 2, 2, ns=4, nr=8), "none") == 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(PodError, match="--init must be one of"):
        init_from_anchor(model, podkv.SharingPlan.uniform(4, 2, 2, ns=4, nr=8), "anchor")


def test_train_config_refuses_bad_long_range_and_init():
    from podkv.training.config import TrainConfig

    with pytest.raises(PodError, match="--long-range must be >= 0"):
        TrainConfig(plan="p.json", out="o", max_steps=1, long_range=-1)
    with pytest.raises(PodError, match="--init must be one of"):
        TrainConfig(plan="p.json", out="o", max_steps=1, init="anchor-v")
    with pytest.raises(PodError, match="--long-range-chat must be a share in \\[0, 1\\], got 2"):
        TrainConfig(plan="p.json", out="o", max_steps=1, long_range_chat=2)
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(PodError, match="--answer-weight must be a finite number > 0"):
            TrainConfig(plan="p.json", out="o", max_steps=1, answer_weight=bad)
    with pytest.raises(PodError, match="--answer-weight 4 needs --objective distill and --long-range"):
        TrainConfig(plan="p.json", out="o", max_steps=1, answer_weight=4, long_range=8)
    assert TrainConfig(plan="p.json", out="o", max_steps=1, objective="distill", long_range=8,
                       answer_weight=4).answer_weight == 4


def test_train_config_refuses_an_unknown_long_range_kind_before_compute():
    from podkv.training.config import TrainConfig

    with pytest.raises(PodError, match="--long-range-kinds: unknown kind 'chains'"):
        TrainConfig(plan="p.json", out="o", max_steps=1, long_range=4, long_range_kinds=("chain", "chains"))
