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
