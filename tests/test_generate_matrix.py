"""generate features x architectures: every cached path == the same PoD model recomputed without a cache.

The oracle is ``generate(..., use_cache=False)``: each step runs the whole sequence through PoD's
exact full-keys path, so any error in how PodCache holds, rolls, crops or reorders keys shows up as a
different token. Sequences are longer than ns+nr, so the ring and the sharing matter.
"""

import copy

import pytest
import torch
from transformers import DynamicCache, pipeline

from podkv import PodCache, PodError, SharingPlan, enable_pod
from podkv.compat import cache_kwargs, output_cache
from tiny import tiny_model
from tolerances import assert_close
from eval_fixtures import _one_thread  # noqa: F401  (pytest fixture: one thread per module)

ARCHS = ("llama", "qwen2", "mistral")
PLAN = dict(anchors=[[0, 0], [0, 1], [0, 1], [3, 1]], ns=2, nr=4)  # both heads share somewhere
NEW = 12
KW = dict(max_new_tokens=NEW, pad_token_id=0, eos_token_id=None)


def pod_model(arch, dtype=torch.float32):
    return enable_pod(tiny_model(arch).to(dtype), SharingPlan(**PLAN))


def prompt(T=11, seed=0, batch=1):
    return torch.randint(3, 100, (batch, T), generator=torch.Generator().manual_seed(seed))


def no_cache(model, ids, **kw):
    return model.generate(ids, use_cache=False, **{**KW, **kw})


def left_padded(lengths, seed=0):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:], mask[i, width - n:] = prompt(n, seed + i)[0], 1
    return ids, mask


def check(cached, reference, what):
    assert torch.equal(cached, reference), f"{what}:\n{cached}\nvs no-cache\n{reference}"


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_and_left_padded_batch(arch):
    model = pod_model(arch)
    with torch.no_grad():
        ids = prompt()
        check(model.generate(ids, do_sample=False, **KW), no_cache(model, ids, do_sample=False), "greedy")
        ids, mask = left_padded([13, 7, 10])
        check(model.generate(ids, attention_mask=mask, do_sample=False, **KW),
              no_cache(model, ids, attention_mask=mask, do_sample=False), "left-padded batch")


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search(arch):
    model = pod_model(arch)
    ids, mask = left_padded([12, 8])
    with torch.no_grad():
        kw = dict(attention_mask=mask, num_beams=3, num_return_sequences=2, do_sample=False)
        check(model.generate(ids, **kw, **KW), no_cache(model, ids, **kw), "beam search")


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_with_fixed_seed(arch):
    model = pod_model(arch)
    ids = prompt(batch=2)

    def sample(**kw):
        torch.manual_seed(7)
        return model.generate(ids, do_sample=True, top_k=0, **{**KW, **kw})

    with torch.no_grad():
        check(sample(), sample(use_cache=False), "sampling")


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_turn_reuses_the_cache(arch):
    model = pod_model(arch)
    with torch.no_grad():
        first = model.generate(prompt(), do_sample=False, return_dict_in_generate=True, **KW)
        assert isinstance(output_cache(first), PodCache)
        turn = torch.cat([first.sequences, prompt(5, seed=3)], dim=1)
        again = model.generate(turn, **cache_kwargs(output_cache(first)), do_sample=False, **KW)
        check(again, no_cache(model, turn, do_sample=False), "second turn on the same cache")


@pytest.mark.parametrize("arch", ARCHS)
def test_assisted_decoding(arch):
    """Rejected candidates are cropped from both caches; the output is the main model's greedy output."""
    model = pod_model(arch)
    assistant = enable_pod(tiny_model(arch, layers=2, seed=1), SharingPlan(anchors=[[0, 0], [0, 1]], ns=2, nr=3))
    assistant.generation_config.num_assistant_tokens = 3
    ids = prompt()
    with torch.no_grad():
        check(model.generate(ids, assistant_model=assistant, do_sample=False, **KW),
              no_cache(model, ids, do_sample=False), "assisted decoding")


def test_early_exit_assistant_is_refused_before_the_first_token():
    """Self-speculative early exit truncates config.num_hidden_layers; PoD refuses it up front, config intact."""
    model = pod_model("llama")
    with torch.no_grad(), pytest.raises(PodError, match=r"assistant_early_exit=2\) is not supported"):
        model.generate(prompt(), assistant_early_exit=2, do_sample=False, **KW)
    assert model.config.num_hidden_layers == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_lookup_decoding(arch):
    model = pod_model(arch)
    ids = prompt(6).repeat(1, 3)  # repeated n-grams: some candidates are found, most are rejected
    kw = dict(do_sample=False, eos_token_id=1)  # transformers 5.2's prompt lookup needs an eos id
    with torch.no_grad():
        out = model.generate(ids, prompt_lookup_num_tokens=3, return_dict_in_generate=True, **{**KW, **kw})
        check(out.sequences, no_cache(model, ids, **kw), "prompt lookup decoding")
    assert output_cache(out).crop_margin == 2  # a round verifies <= 3 candidates; crop(M+1) is exact


@pytest.mark.parametrize("arch", ARCHS)
def test_dynamic_cache_is_exact_and_static_is_an_error(arch):
    """A DynamicCache hands attention every key (PoD's full-keys path: exact, no saving); a StaticCache
    hands max-length zero-padded buffers, which PoD cannot place: a clear error."""
    model = pod_model(arch)
    ids = prompt()
    with torch.no_grad():
        reference = no_cache(model, ids, do_sample=False)
        check(model.generate(ids, **cache_kwargs(DynamicCache()), do_sample=False, **KW), reference, "DynamicCache")
        check(model.generate(ids, cache_implementation="dynamic", do_sample=False, **KW), reference, "dynamic")
        with pytest.raises(PodError, match="StaticCache"):
            model.generate(ids, cache_implementation="static", do_sample=False, **KW)


@pytest.mark.parametrize("arch", ARCHS)
def test_text_generation_pipeline(arch):
    from conftest import _char_tokenizer

    model, tok = pod_model(arch), _char_tokenizer()
    texts = ["the cat sat on the mat", "a dog ran"]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = no_cache(model, enc.input_ids, attention_mask=enc.attention_mask, do_sample=False)

    def run_pipeline():
        out = pipeline("text-generation", model=model, tokenizer=tok)(
            texts, batch_size=2, do_sample=False, return_tensors=True, **KW)
        for i, row in enumerate(out):
            generated = torch.as_tensor(row[0]["generated_token_ids"])[-NEW:]
            check(generated, reference[i, -NEW:], f"pipeline row {i} (padding_side={tok.padding_side})")

    run_pipeline()
    tok.padding_side = "right"  # transformers 5.2 pads on the right here; later releases pad left anyway
    try:
        run_pipeline()
    except PodError as exc:
        assert "padding_side = 'left'" in str(exc)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16(arch):
    """bf16 rounds differently along the cached and the recomputed path (different kernels and
    summation order), so token equality is not a property of the method here. What is: the logits
    of every cached step equal, within bf16 tolerance, the no-cache recomputation on those tokens."""
    model = pod_model(arch, torch.bfloat16)
    ids = prompt(batch=2)
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, output_logits=True, return_dict_in_generate=True, **KW)
        recomputed = model(out.sequences[:, :-1], use_cache=False).logits[:, ids.shape[1] - 1:]
    assert_close(torch.stack(out.logits, dim=1), recomputed, torch.bfloat16, what=f"{arch} bf16 cached vs no-cache")


def test_copied_model_generates_on_its_own():
    """copy.deepcopy of a PoD model: its hooks and generate use the copy's runtime, not the original's."""
    model = pod_model("llama")
    twin = copy.deepcopy(model)
    assert twin.pod_runtime is not model.pod_runtime
    ids = prompt()
    with torch.no_grad():
        check(twin.generate(ids, do_sample=False, **KW), model.generate(ids, do_sample=False, **KW), "deep copy")
    assert not model.pod_runtime.caches and not twin.pod_runtime.caches
