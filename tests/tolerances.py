"""One table of numeric tolerances for every oracle comparison (STYLE: flash-attention tests), and of the
skips the suite allows. ``tests/test_skips.py`` fails on a tolerance above 1e-4 written as a number in a test
(it must be a name from here, with its reason) and on a skip that is not listed in :data:`SKIPS`.

Each tolerance says what it compares, the difference measured on this machine, and why it is not tighter.
"""

import torch

# (rtol, atol) by dtype for fast path vs fp32 reference. Measured: ~1e-7 (fp32) on the tiny models;
# atol 2e-5 covers outputs near zero, where rtol means nothing.
TOL = {
    torch.float32: (1e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),  # bf16 keeps 8 mantissa bits: one rounding is 2^-8 = 3.9e-3 relative
}

# A compiled flash-style pass (attention/native/pod_prefill.c) vs the reference, fp32, over up to 1000 keys with
# logits of up to ~13 nats (inputs randn x 2) and head dims 64 / 128. fp32 itself is this far off: torch's own fp32
# causal SDPA on such inputs is 1.7e-5 / 3.2e-5 from the float64 result; the kernel 2.0e-5 / 4.6e-5 (a different
# summation order over key tiles). atol 1e-4 leaves twice that.
FLASH_F32 = (1e-5, 1e-4)

# Gradients of the chunked PoD path vs the materialised reference, fp32. Measured max 4.5e-8
# (tiny llama, chunk 16, with and without checkpointing); backward re-associates the sums.
GRAD = (1e-5, 1e-6)

# Scalars computed from fp32 log-probabilities (an NLL, a log-prob per token, a perplexity) by two paths
# over the same logits (one forward vs prefill + cache; plain PoD vs the never-skipping gate path).
# Measured: 0 to 4e-8.
SCALAR = 1e-6

# Weights merged from deltas stored in bf16 vs the fp32 weights they came from: bf16 rounds a weight of
# magnitude <= 0.5 by at most 2^-9 = 2e-3 (the tiny model's weights are that small).
BF16_STORAGE_ATOL = 2e-3
# Two training stages, each merged into fp32 weights while its deltas are stored in bf16: two such roundings.
BF16_TWO_STAGES_ATOL = 2 * BF16_STORAGE_ATOL

# A percentile bootstrap interval (2000 resamples) vs the normal-approximation interval of a proportion
# (n = 100, p = 0.3): they are different estimators. The bootstrap's quantiles move by ~1/sqrt(2000) of
# the spread and the normal interval ignores the skew; 0.015 is 1/6 of the half-width (0.09).
BOOTSTRAP_VS_NORMAL = 0.015

# "These two must differ": a difference above this is far beyond fp32 noise (a cut gradient is O(1)).
DIFFERS = (1e-3, 1e-5)

# The skips the suite allows, as (file, text on the skip's line) -> why it is not a hidden failure.
# Anything podkv needs to run (transformers, the shipped plans and adapted model, the default model)
# is never skipped: its absence is a packaging bug and fails.
# 8-bit KV (method kv8) rounds each key and value to 1/255 of its group's range: on the tiny model the
# continuation NLL moves by well under 1%; a broken scale or zero moves it by far more. Also bounds pod+kv4 vs pod
# (4 bits, 1/15 of the range): measured 3e-5 relative on the tiny model (pod+kv8: 4e-6).
KV8_NLL_REL = 0.01

# PoD over an 8-bit PodCache (kv_bits=8) vs the same PodCache in fp32, logits of the tiny model. Each stored
# element moves by at most (max - min)/510 of its 64-channel group (~1e-2 for unit-scale keys); through four
# layers the logits moved by at most 0.03 (measured); a wrong scale or zero moves them by O(1).
KV8_LOGITS_ATOL = 0.1

# The same over a 4-bit PodCache (kv_bits=4): each stored element moves by at most (max - min)/30 of its group,
# 17x the 8-bit step. Measured on the tiny model (groups of 8, 40 tokens, logits up to 0.63): at most 0.045
# (keys plan; scores 0.019, window-only pairs 0.037); 0.14 is 3x that. A zero off by one step moves them by 0.37,
# nibbles unpacked in the wrong order by 0.9.
KV4_LOGITS_ATOL = 0.14

# The same at 2 bits (KIVI's layout: keys per channel, the proximal tokens exact): a step is (max - min)/3 of the
# group, 5x the 4-bit step. Measured on the tiny model (groups of 8, 40 tokens, logits up to 0.63): at most 0.093
# (keys and scores plans; window-only pairs 0.074; 2-bit per-token keys without the exact proximal tokens: 0.27);
# 0.28 is 3x the first.
KV2_LOGITS_ATOL = 0.28

# A continuation's NLL from one forward over S tokens vs S one-token forwards over the same cache: the same
# math in another reduction order (fp32). Measured: below 1e-6 relative on the tiny model; a wrong causal
# mask moves it by O(1).
STEPWISE_NLL_REL = 1e-4

SKIPS = {
    ("peers.py", "pytest.skip("): "kvpress 0.5.5 (the eval baselines, extra 'peers') requires transformers<5.3: "
                                  "the newest-transformers venv of CI has no kvpress, and says so",
    ("peers.py", "importorskip(\"kvpress\""): "kvpress is an optional peer (extra 'peers'), not a dependency",
    ("test_default_model.py", "PODKV_TEST_FRESH_HOME"): "re-downloading the default model into an empty home "
                                                        "needs the network and minutes: opt-in",
    ("test_compat.py", "pytest.skip("): "the expected values are tabled per transformers release CI runs; "
                                        "another release has no table row",
    ("test_serving_vllm.py", "importorskip(\"vllm\")"): "vLLM runs in its own venv (scripts/test_vllm.sh, opt-in): "
                                                        "the CI venvs have no vllm",
    ("test_serving_vllm.py", "no podkv reference venv"): "the reference side runs in podkv's venv; only "
                                                         "scripts/test_vllm.sh sets it up",
    ("test_block_pass.py", "no C compiler here"): "the native decode kernel builds with the system C compiler "
                                                  "where one exists; without one the PyTorch path runs, and it "
                                                  "is tested in the same test's other half",
    ("test_native_prefill.py", "no C compiler here"): "the compiled prefill builds with the system C compiler where "
                                                      "one exists; without one the two-pass PyTorch path runs, "
                                                      "which tests/test_core_attention.py checks",
    ("test_readme_commands.py", "pytest.skip("): "README commands run in the venv the README sets up (.venv); "
                                                 "the other CI venvs run the rest of the suite",
}


def assert_close(actual, expected, dtype=torch.float32, what="", tol=None):
    rtol, atol = tol if tol is not None else TOL[dtype]
    diff = (actual.float() - expected.float()).abs().max().item()
    print(f"{what} max abs diff {diff:.3g} (rtol={rtol}, atol={atol})")
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)
