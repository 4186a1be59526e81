"""Fixtures shared by the eval tests: one thread, one tiny Llama per module."""

import pytest
import torch

from tiny import tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls: one thread avoids oversubscribing the shared cores (40x faster under load).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=4, heads=4, kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def real_tokenizer():
    """The default model's tokenizer (no weights), fetched and converted once like the default model itself."""
    from podkv.compat import load_tokenizer
    from podkv.models import default_model

    path = default_model.ensure_default_model(progress=False)
    return load_tokenizer(path)  # the cached copy may name a class newer transformers misapplies


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything loads a model: for errors that must come before any compute."""
    import podkv.models.loading

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(podkv.models.loading, "load_model", no_load)
