"""LongBench and RULER from local files, through the optional ``datasets`` package (extra ``data``).

Never run in CI: podkv downloads nothing. Point ``--data`` at the files you already have:
  * LongBench: a directory of ``<subset>.jsonl`` (fields ``context``, ``input``, ``answers``), or one file;
  * RULER: a generated ``validation.jsonl`` (fields ``input``, ``outputs``), or a directory holding it.
Prompts longer than the largest ``--lengths`` are cut in the middle (LongBench's convention).
Scoring is exact-match style (an answer appears in the output), not LongBench's per-task F1/ROUGE.
"""

from __future__ import annotations

from pathlib import Path

from podkv.errors import PodError
from podkv.eval.task_base import Case, Task


def load_jsonl(path: Path):
    try:
        import datasets  # optional: datasets
    except ImportError:
        raise PodError("the longbench/ruler tasks need the 'datasets' package: pip install 'podkv[data]'") from None
    return datasets.load_dataset("json", data_files=str(path), split="train")


def _find(data: str | None, subset: str | None, default_name: str, task: str) -> Path:
    if data is None:
        raise PodError(f"task {task!r} reads local data: pass --data PATH (podkv downloads nothing)")
    path = Path(data).expanduser()
    if path.is_dir():
        path = path / f"{subset or default_name}.jsonl"
    if not path.is_file():
        raise PodError(f"--data {path} does not exist")
    return path


class _LocalJsonl(Task):
    default_name = ""
    limit = 50  # examples per run: CPU time, not a property of the benchmark

    def fields(self, row) -> tuple[str, list[str]]:
        raise NotImplementedError

    def cases(self, tok, cfg, plan) -> list[Case]:
        rows = load_jsonl(_find(cfg.data, cfg.subset, self.default_name, self.name))
        max_len = max(cfg.lengths)
        out = []
        for i, row in enumerate(rows):
            if i >= self.limit * cfg.samples:
                break
            prompt, answers = self.fields(row)
            ids = list(tok.encode(prompt, add_special_tokens=False))
            if len(ids) > max_len:
                half = max_len // 2
                ids = ids[:half] + ids[len(ids) - (max_len - half):]
            out.append(Case(ids, {"length": len(ids), "index": i, "depth": 0.0}, answers))
        if not out:
            raise PodError(f"--data for {self.name!r} holds no examples")
        return out

    def score(self, text: str, answers) -> bool:
        text = text.lower()
        return all(a.lower() in text for a in answers) if self.name == "ruler" else \
            any(a.lower() in text for a in answers)


class LongBench(_LocalJsonl):
    """LongBench from local jsonl files (--data, --subset); needs the 'data' extra."""

    name, default_name = "longbench", "narrativeqa"

    def fields(self, row):
        return f"{row['context']}\n\nQuestion: {row['input']}\nAnswer:", list(row["answers"])


class Ruler(_LocalJsonl):
    """RULER from a local generated jsonl (--data); needs the 'data' extra."""

    name, default_name = "ruler", "validation"

    def fields(self, row):
        return row["input"], list(row["outputs"])
