"""Issue 14: one perplexity (NLL over windows) and one passkey (prompts + scoring) serve eval, training and bench."""

import math
import re

import pytest
import torch

from podkv.eval.config import EvalConfig
from podkv.eval.scoring import perplexity, token_nll, window_nll
from podkv.eval.tasks import make_task, passkey_cases
from test_eval_prompts import CharTokenizer
from tolerances import assert_close

from eval_fixtures import _one_thread, model  # noqa: F401  (pytest fixtures)

IDS = torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(0))


def test_window_nll_is_the_models_own_loss(model):
    from podkv.training.evaluate import heldout_nll

    total, n = window_nll(model, IDS, 64)
    assert n == 200 - 4  # windows 64, 64, 64, 8: one unscored first token each
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss * (len(w) - 1) for w in IDS.split(64)]
    assert_close(torch.tensor(total), torch.stack(losses).sum(), what="window NLL vs transformers' loss")
    assert heldout_nll(model, IDS, 64) == total / n
    assert window_nll(model, IDS, 64, max_tokens=64) == window_nll(model, IDS[:64], 64)


def test_window_nll_skip_scores_only_late_positions(model):
    total, n = window_nll(model, IDS[:128], 64, skip=10)
    assert n == 2 * (63 - 10)
    with torch.no_grad():
        logits = model(input_ids=IDS[:128].view(2, 64)).logits  # (2, 64, V)
    expected = sum(token_nll(logits[i, 10:-1], IDS[64 * i + 11:64 * (i + 1)]) for i in range(2))
    assert_close(torch.tensor(total), torch.tensor(expected), what="window NLL with skip")
    assert perplexity(total, n) == math.exp(total / n)
    with pytest.raises(ValueError, match="skip"):
        window_nll(model, IDS, 64, skip=63)


def test_passkey_cases_are_the_eval_tasks_prompts():
    tok = CharTokenizer()
    cfg = EvalConfig(tasks=("passkey",), lengths=(420,), depths=(0.25, 0.75), out="unused")
    ours = passkey_cases(tok, 420, (0.25, 0.75))
    assert [c.input_ids for c in ours] == [c.input_ids for c in make_task("passkey").cases(tok, cfg, None)]
    assert all(len(c.input_ids) == 420 and c.answer.isdigit() for c in ours)


class _Reader:
    """A stand-in model whose ``generate`` reads the key back out of the prompt: every answer is right."""

    device = torch.device("cpu")

    def generate(self, input_ids, **kw):
        key = re.search(r"pass key is (\d+)", CharTokenizer().decode(input_ids[0].tolist())).group(1)
        return torch.cat([input_ids, torch.tensor([CharTokenizer().encode(f" {key}.")])], 1)


def test_training_passkey_scores_eval_prompts_with_eval_scoring(monkeypatch):
    import podkv.eval.tasks
    from podkv.training.evaluate import passkey_accuracy

    built = []
    real = podkv.eval.tasks.passkey_cases
    monkeypatch.setattr(podkv.eval.tasks, "passkey_cases", lambda *a, **k: built.append(a) or real(*a, **k))
    out = passkey_accuracy(_Reader(), CharTokenizer(), 300, n=2)
    assert out["accuracy"] == 1.0 and built == [(built[0][0], 300, [0.25, 0.75], 0)]


def test_bench_skip_passkey_uses_eval_prompts(model, monkeypatch):
    import podkv.eval.tasks
    from podkv import SharingPlan
    from podkv.bench.skip import DENSE, passkey

    built = []
    real = podkv.eval.tasks.passkey_cases
    monkeypatch.setattr(podkv.eval.tasks, "passkey_cases", lambda *a, **k: built.append(a[1:]) or real(*a, **k))
    plan = SharingPlan.uniform(4, 2, 2, ns=4, nr=28)
    out = passkey(model, CharTokenizer(), plan, DENSE, prompts=2, length=400)
    assert set(out) == {"dense"} and 0.0 <= out["dense"] <= 1.0
    assert built == [(400, [0.125, 0.375])]  # keys in the first half: beyond the recent window
