import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def native_kernel_dir(tmp_path_factory):
    """The compiled decode kernel (podkv.attention.native) builds into a temporary folder, not the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PODKV_NATIVE_DIR", str(tmp_path_factory.mktemp("native")))
        yield


@pytest.fixture(scope="session")
def default_model():
    """The real embedded default model (downloaded and converted once into PODKV_HOME)."""
    import podkv

    model, tok = podkv.load_model(progress=False)
    return model, tok


def _char_tokenizer():
    """A 100-symbol character tokenizer (ASCII), so tiny models can be saved and loaded like real ones."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A saved tiny llama (4 layers, 2 KV heads, 512 positions) with a character tokenizer: a model
    directory that `podkv.load_model` and `podkv train --model DIR` accept."""
    from tiny import tiny_model

    path = tmp_path_factory.mktemp("tiny_lm") / "model"
    tiny_model("llama").save_pretrained(path)
    _char_tokenizer().save_pretrained(path)
    return path
