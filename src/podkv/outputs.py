"""One rule for every command's ``--out``: an existing output is refused unless ``--force``, and a result
directory appears whole or not at all.

Why: commands used to differ (``analyze``, ``eval compare``, ``bench`` and ``demo`` overwrote, ``train``
refused), so a second run silently replaced a user's results in one place and stopped in another.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from podkv.errors import PodError


def add_out_arguments(parser, help: str, required: bool = True, default=None) -> None:
    """``--out`` and ``--force`` on a subcommand parser."""
    parser.add_argument("--out", type=Path, required=required, default=default, help=help)
    parser.add_argument("--force", action="store_true", help="replace an existing --out (default: refuse it)")


def refuse_existing(path: Path, force: bool, flag: str = "--out") -> Path:
    """``path`` when it is free (missing, or an empty directory) or ``force`` is set; else a PodError."""
    path = Path(path)
    taken = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if taken and not force:
        raise PodError(f"{flag} {path} already exists: pass --force to replace it, or choose another path")
    return path


@contextlib.contextmanager
def staged_dir(out: Path, force: bool, flag: str = "--out"):
    """Yield a fresh sibling folder to write into; on success it replaces ``out`` in one rename.

    A failed run leaves ``out`` as it was and keeps what it wrote, if anything, in ``.<name>.partial`` (long
    runs log records as they go), saying so on stderr.
    """
    out = refuse_existing(Path(out), force, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)  # our own leftover of an earlier failed run
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        if any(stage.iterdir()):
            print(f"podkv: the run failed; {out} is unchanged, what it wrote is in {stage}", file=sys.stderr)
        else:  # refused before writing anything (bad input): nothing to keep, the error stays one line
            stage.rmdir()
        raise
    replace_dir(stage, out)


def replace_dir(new: Path, out: Path) -> None:
    """Move the finished folder ``new`` to ``out``, replacing an existing one (callers checked ``--force``)."""
    old = out.parent / f".{out.name}.replaced"
    if out.is_file():
        out.unlink()
    elif out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
