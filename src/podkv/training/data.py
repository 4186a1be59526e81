"""Training text: documents -> one token stream -> packed fixed-length sequences, held-out text apart.

Packing (documents joined by EOS, cut into ``seq_len`` blocks) keeps every position a real token,
so PoD's distant range is exercised from the first step. With the default text (the ``train``
split of :mod:`podkv.texts`) the held-out curve is measured on the ``heldout`` split, another
source; with ``--data`` files it is the stream's tail, which training never sees.
Generated long-range documents (:mod:`podkv.training.longrange`) come from the training part only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from podkv import texts
from podkv.errors import PodError
from podkv.training.longrange import long_range_blocks


def default_documents() -> list[str]:
    """The ``train`` split: the standard library's help topics (~465K characters), always offline."""
    return texts.documents("train")


def read_documents(paths: list[str]) -> list[str]:
    """One document per file; a file without any non-whitespace text is an error."""
    docs = []
    for p in map(Path, paths):
        if not p.is_file():
            raise PodError(f"--data file {p} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PodError(f"--data file {p} is not UTF-8 text") from None
        if not text.strip():
            raise PodError(f"--data file {p} has no text")
        docs.append(text)
    return docs


def token_stream(tok, docs: list[str]) -> torch.Tensor:
    """Concatenate tokenized documents with EOS separators -> (N,) long."""
    eos = tok.eos_token_id
    parts = []
    for doc in docs:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        parts.extend(ids)
        if eos is not None:
            parts.append(eos)
    return torch.tensor(parts, dtype=torch.long)


@dataclass
class Split:
    train: torch.Tensor  # (n_train, seq_len)
    heldout: torch.Tensor  # (N_heldout,) the stream's tail, evaluated in seq_len blocks
    weights: torch.Tensor | None = None  # (n_train, seq_len) per-position loss weights; None = all 1


def split_stream(stream: torch.Tensor, seq_len: int, eval_fraction: float) -> Split:
    """Hold out the last ``eval_fraction`` of the stream; pack the rest into ``seq_len`` blocks."""
    n_eval = max(seq_len, int(len(stream) * eval_fraction))
    n_train = (len(stream) - n_eval) // seq_len
    if n_train < 1:
        raise PodError(f"the training text has {len(stream)} tokens: too few for one --seq-len {seq_len} "
                       f"sequence after holding out {n_eval} for evaluation; add --data or lower --seq-len")
    train = stream[: n_train * seq_len].view(n_train, seq_len)
    return Split(train=train, heldout=stream[len(stream) - n_eval:])


def load_split(tok, paths: list[str], seq_len: int, eval_fraction: float, long_range: int = 0,
               seed: int = 0, long_range_kinds: tuple[str, ...] = ("repeat", "lookup"),
               long_range_chat: float = 0.0, answer_weight: float = 1.0) -> Split:
    """Packed training rows (``long_range`` generated documents first) and the held-out tokens; with
    ``answer_weight`` != 1, loss weights that give the answer tails of question documents that weight."""
    docs = read_documents(paths) if paths else default_documents()
    split = split_stream(token_stream(tok, docs), seq_len, eval_fraction)
    if not paths:
        split.heldout = token_stream(tok, texts.documents("heldout"))
    if long_range:
        rows = long_range_blocks(tok, split.train.flatten().tolist(), seq_len, long_range, seed=seed,
                                 kinds=long_range_kinds, chat_share=long_range_chat)
        if answer_weight != 1:
            split.weights = torch.cat([answer_weights(rows, seq_len, answer_weight), torch.ones(split.train.shape)])
        split.train = torch.cat([torch.tensor(rows, dtype=torch.long), split.train])
    return split


def answer_weights(rows, seq_len: int, weight: float) -> torch.Tensor:
    """(len(rows), seq_len) loss weights: ``weight`` at the positions whose *next* token is in a row's answer
    tail (logits at t predict t+1; the closing EOS excluded), 1 elsewhere."""
    out = torch.ones(len(rows), seq_len)
    for i, row in enumerate(rows):
        start = getattr(row, "answer_start", seq_len)
        if start < seq_len - 1:
            out[i, start - 1:seq_len - 2] = weight
    return out


class PackedDataset(torch.utils.data.Dataset):
    """Rows of a (n, seq_len) tensor as ``{"input_ids", "labels"}`` (labels are shifted inside the model), and
    ``"loss_weights"`` when ``weights`` are given."""

    def __init__(self, blocks: torch.Tensor, weights: torch.Tensor | None = None):
        self.blocks, self.weights = blocks, weights

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, i):
        row = self.blocks[i]
        item = {"input_ids": row, "labels": row.clone()}
        if self.weights is not None:
            item["loss_weights"] = self.weights[i]
        return item
