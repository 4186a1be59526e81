"""Text for the offline exploration (paper §2.1): load, hash, tokenize and cut into samples.

The default corpus is long English prose that ships with every CPython: the topic help of
``pydoc_data.topics`` (values joined in sorted key order), so ``podkv analyze`` needs no download.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from podkv import texts
from podkv.errors import PodError

DEFAULT_SOURCE = "pydoc_data.topics"


@dataclass
class Corpus:
    """Joined text plus its provenance (``sha256`` of the UTF-8 text actually used)."""

    text: str
    source: list[str]
    sha256: str


def default_text() -> str:
    """The ``plan`` split of :mod:`podkv.texts` (one loader for the help topics)."""
    return texts.text("plan")


def read_file(path: Path) -> list[str]:
    """Texts of a ``.txt`` file (one text) or a ``.jsonl`` file (field ``"text"`` of every line)."""
    if not path.is_file():
        raise PodError(f"--data file {path} does not exist")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".txt":
        texts = [raw]
    elif path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PodError(f"--data file {path} line {number} is not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise PodError(f"--data file {path} line {number} has no string field 'text'")
            texts.append(record["text"])
    else:
        raise PodError(f"--data file {path} must end in .txt or .jsonl, got {path.suffix!r}")
    if not any(t.strip() for t in texts):
        raise PodError(f"--data file {path} is empty: it holds no text to analyse")
    return texts


def load_corpus(paths: list[str | Path] | None = None) -> Corpus:
    """The default corpus, or the texts of ``paths`` joined by blank lines."""
    if not paths:
        texts, source = [default_text()], [DEFAULT_SOURCE]
    else:
        texts, source = [], []
        for p in paths:
            texts.extend(read_file(Path(p)))
            source.append(str(p))
    text = "\n\n".join(t for t in texts if t.strip())
    return Corpus(text=text, source=source, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


def make_samples(tokenizer, text: str, num: int, length: int, seed: int) -> torch.Tensor:
    """Cut the token stream into non-overlapping windows of ``length`` and draw ``num`` of them.

    Returns
    -------
    torch.LongTensor
        (N, length) with N = min(num, available windows); windows keep corpus order.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    windows = len(ids) // length
    if windows == 0:
        raise PodError(f"the data has {len(ids)} tokens, fewer than --length {length}: give more text or a "
                       "smaller --length")
    gen = torch.Generator().manual_seed(seed)
    chosen = sorted(torch.randperm(windows, generator=gen)[:num].tolist())
    stream = torch.tensor(ids[: windows * length], dtype=torch.long).view(windows, length)
    return stream[chosen]
