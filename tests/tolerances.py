"""One table of numeric tolerances for every oracle comparison (STYLE: flash-attention tests)."""

import torch

# (rtol, atol) by dtype for fast path vs fp32 reference.
TOL = {
    torch.float32: (1e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual, expected, dtype=torch.float32, what=""):
    rtol, atol = TOL[dtype]
    diff = (actual.float() - expected.float()).abs().max().item()
    print(f"{what} max abs diff {diff:.3g} (rtol={rtol}, atol={atol})")
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)
