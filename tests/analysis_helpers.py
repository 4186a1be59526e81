"""Shared bits of the analysis tests: a character tokenizer and a tiny analysis config."""

from podkv.analysis.run import AnalysisConfig


class CharTokenizer:
    """Enough of a tokenizer for `make_samples` and lookup prompts: one id per character, inside a 128 vocab."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": self.encode(text)}

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(c) % 125 for c in text]


def tiny_cfg(**kw) -> AnalysisConfig:
    base = dict(samples=2, length=96, last_q=8, ns=4, nr=16, proximal_sizes=(8, 16, 32), proximal_samples=1,
                context=256)
    base.update(kw)
    return AnalysisConfig(**base)
