"""`analyze` on the real default model with small settings (integration: loads SmolLM2-135M)."""

import pytest
import torch

from podkv.analysis.run import AnalysisConfig, analyze


@pytest.mark.integration
def test_default_model_small_analysis(default_model, tmp_path):
    model, tok = default_model
    cfg = AnalysisConfig(samples=1, length=640, last_q=16, proximal_sizes=(32, 128, 384), proximal_samples=1)
    result = analyze(cfg, tmp_path, model=model, tokenizer=tok, progress=False)
    assert model.config._attn_implementation == "sdpa"  # the probe is undone
    rows = result["proximal"]["rows"]
    print([(r["size"], round(r["agreement"], 3), round(r["nll_delta"], 3)) for r in rows])
    assert rows[-1]["agreement"] > rows[0]["agreement"] and rows[-1]["nll_delta"] < rows[0]["nll_delta"]
    sims = torch.tensor(result["similarity"]["kv_heads"])
    assert sims.shape == (3, 30, 30)
    torch.testing.assert_close(sims, sims.transpose(1, 2))
    assert result["plan_object"].num_layers == 30
