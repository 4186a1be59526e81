import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model():
    """The real embedded default model (downloaded and converted once into PODKV_HOME)."""
    import podkv

    model, tok = podkv.load_model(progress=False)
    return model, tok
