"""Confidence intervals and string_match_all against hand-computed values; summaries built from them."""

import math

import pytest

from podkv.eval.scoring import string_match_all
from podkv.eval.stats import MIN_SAMPLES, bootstrap, describe, mapped, wilson
from podkv.eval.tasks import make_task
from tolerances import BOOTSTRAP_VS_NORMAL


@pytest.mark.parametrize("k,n,lo,hi", [
    # p = k/n, z = 1.96: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    (8, 10, 0.490162, 0.943318),
    (5, 10, 0.236593, 0.763407),
    (0, 10, 0.0, 0.277533),
    (10, 10, 0.722467, 1.0),
    (1, 4, 0.045587, 0.699358),
])
def test_wilson_hand_values(k, n, lo, hi):
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-6)
    assert (got[0] == 0.0) is (k == 0) and (got[1] == 1.0) is (k == n)


def test_bootstrap_hand_values():
    # All equal: every resample has the same mean.
    assert bootstrap([0.5] * 12) == (0.5, 0.5)
    # [0, 1]: resampled means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4 -> 2.5% and 97.5% points 0 and 1.
    assert bootstrap([0, 1]) == (0.0, 1.0)
    # [0, 0, 0, 1]: mean = K/4, K ~ Bin(4, 1/4); P(K <= 2) = 0.949 < 0.975 <= P(K <= 3) = 0.996 -> (0, 0.75).
    assert bootstrap([0, 0, 0, 1]) == (0.0, 0.75)
    # Weighted: values 1 and 3 with weights 1 and 3 -> resampled means 1, 3 or (1 + 9) / 4 = 2.5.
    assert bootstrap([1, 3], weights=[1, 3]) == (1.0, 3.0)


def test_bootstrap_is_seeded_and_close_to_the_normal_interval():
    spread = [((i * 37) % 101) / 101 for i in range(50)]  # continuous values: the seed shows in the interval
    assert bootstrap(spread) == bootstrap(spread) and bootstrap(spread, seed=1) != bootstrap(spread)
    values = [1.0] * 30 + [0.0] * 70
    half = 1.96 * math.sqrt(0.3 * 0.7 / 100)  # 0.0898
    lo, hi = bootstrap(values)
    assert lo == pytest.approx(0.3 - half, abs=BOOTSTRAP_VS_NORMAL)
    assert hi == pytest.approx(0.3 + half, abs=BOOTSTRAP_VS_NORMAL)


def test_describe_picks_the_interval():
    assert describe([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], binary=True) == {"mean": 0.8, "ci95": list(wilson(8, 10)), "n": 10}
    assert describe([0, 0, 0, 1], binary=False) == {"mean": 0.25, "ci95": [0.0, 0.75], "n": 4}
    with pytest.raises(ValueError, match="0/1"):
        describe([0.5, 1.0], binary=True)
    assert mapped({"mean": 0.0, "ci95": [-1.0, 1.0], "n": 3}, math.exp) == {"mean": 1.0, "ci95": [math.exp(-1), math.e],
                                                                          "n": 3}


@pytest.mark.parametrize("generated,refs,score", [
    ("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"], 2 / 3),
    (" abcde, FGHIJ and klmno", ["ABCDE", "fghij", "KLMNO", "PQRST"], 0.75),
    (" 1234567.", ["1234567"], 1.0),
    (" 123456", ["1234567"], 0.0),
    ("", ["x"], 0.0),
    (" 42 is it", "42", 1.0),
])
def test_string_match_all(generated, refs, score):
    assert string_match_all(generated, refs) == pytest.approx(score)


def test_string_match_all_needs_references():
    with pytest.raises(ValueError):
        string_match_all("x", [])


def _rec(length, **kw):
    return {"length": length, "kv_fraction": 0.5, **kw}


def test_accuracy_summary_carries_wilson_overall_and_per_length():
    records = [_rec(100, correct=i < 8) for i in range(10)] + [_rec(200, correct=i < 5) for i in range(10)]
    s = make_task("niah").summarize(records)
    assert (s["mean"], s["accuracy"], s["n"]) == (0.65, 0.65, 20)
    assert s["ci95"] == list(wilson(13, 20))
    assert s["by_length"] == {"100": {"mean": 0.8, "ci95": list(wilson(8, 10)), "n": 10},
                              "200": {"mean": 0.5, "ci95": list(wilson(5, 10)), "n": 10}}
    assert s["kv_fraction"] == 0.5


def test_ppl_summary_is_exp_of_a_bootstrap_of_the_nll_per_token():
    # Two windows of 10 tokens with mean NLL 1 and 3: resampled means 1, 2, 3 -> ppl interval [e, e^3].
    records = [_rec(64, nll=10.0, tokens=10), _rec(64, nll=30.0, tokens=10)]
    s = make_task("ppl").summarize(records)
    assert s["ppl"] == pytest.approx(math.exp(2)) and s["mean"] == pytest.approx(math.exp(2))
    assert s["ci95"] == pytest.approx([math.e, math.exp(3)]) and s["n"] == 2
    assert s["by_length"]["64"]["ci95"] == pytest.approx([math.e, math.exp(3)])


def test_min_samples_is_ten():
    assert MIN_SAMPLES == 10
