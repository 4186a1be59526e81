"""kvpress, the peer library behind the eval baselines, lives only in the oldest-transformers venv."""

import pytest
import transformers

from podkv.compat import TRANSFORMERS_VERSION


def kvpress_or_skip(what: str):
    """Import kvpress, or skip ``what`` saying why it is absent here."""
    if TRANSFORMERS_VERSION >= (5, 3):
        pytest.skip(f"{what}: kvpress 0.5.5 requires transformers<5.3, and this is the transformers "
                    f"{transformers.__version__} venv; the baselines run in the oldest one (scripts/env.sh)")
    return pytest.importorskip("kvpress", reason=f"{what}: kvpress is not installed (extra 'peers')")
