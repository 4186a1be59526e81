"""List flags: one convention (comma-separated, 1k = 1024) and bad values reported as one PodError line."""

import pytest

from eval_fixtures import no_model_load  # noqa: F401  (pytest fixture)
from podkv.cli import build_parser, main
from podkv.cli_args import parse_floats, parse_int, parse_ints, parse_names
from podkv.errors import PodError


def test_parsers_accept_the_convention():
    assert parse_ints("1k,2048,4K") == (1024, 2048, 4096)
    assert parse_ints("512 1k") == (512, 1024)  # spaces count as commas
    assert parse_int("8k") == 8192
    assert parse_floats("0,0.5,1") == (0.0, 0.5, 1.0)
    assert parse_names("dense,pod,") == ("dense", "pod")


@pytest.mark.parametrize("parse, text, bad", [(parse_ints, "1x,2k", "'1x'"), (parse_ints, "1.5k", "'1.5k'"),
                                              (parse_floats, "0,half", "'half'"), (parse_names, ",", "empty")])
def test_parsers_name_flag_and_bad_item(parse, text, bad):
    with pytest.raises(PodError, match="--flag") as info:
        parse(text, "--flag")
    assert bad in str(info.value)


def test_every_command_parses_lists_the_same_way(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["eval", "compare", "--lengths", "1k,2k", "--depths", "0,0.5", "--methods",
                              "dense,pod", "--long-from", "4k", "--out", str(tmp_path)])
    assert (args.lengths, args.depths, args.methods, args.long_from) == ((1024, 2048), (0.0, 0.5), ("dense", "pod"),
                                                                          4096)
    args = parser.parse_args(["bench", "speed", "--prefill-lengths", "512,1k", "--decode-lengths", "4K"])
    assert (args.prefill_lengths, args.decode_lengths) == ((512, 1024), (4096,))
    args = parser.parse_args(["eval", "compare", "--out", str(tmp_path)])
    assert args.lengths == (1024, 2048, 4096) and args.methods[0] == "dense"  # defaults untouched
    args = parser.parse_args(["train", "--plan", "p.json", "--max-tokens", "16k", "--seq-len", "1k",
                              "--eval-tokens", "1k", "--out", str(tmp_path)])
    assert (args.max_tokens, args.seq_len, args.eval_tokens) == (16384, 1024, 1024)
    args = parser.parse_args(["generate", "--max-new-tokens", "1K"])
    assert args.max_new_tokens == 1024


@pytest.mark.parametrize("argv, flag, value", [
    (["eval", "compare", "--lengths", "1x,2k"], "--lengths", "'1x'"),
    (["eval", "niah", "--method", "pod", "--depths", "0,deep"], "--depths", "'deep'"),
    (["eval", "compare", "--methods", ","], "--methods", "empty"),
    (["eval", "compare", "--long-from", "eight"], "--long-from", "'eight'"),
    (["demo", "--length", "2kb"], "--length", "'2kb'"),
    (["bench", "memory", "--lengths", "1024,two"], "--lengths", "'two'"),
    (["bench", "skip", "--taus", "0.7,x"], "--taus", "'x'"),
    (["bench", "batch", "--length", "1e3"], "--length", "'1e3'"),
    (["train", "--plan", "p.json", "--max-steps", "1", "--eval-tokens", "1m"], "--eval-tokens", "'1m'"),
])
def test_bad_list_value_is_one_podError_line(argv, flag, value, tmp_path, capsys, no_model_load):  # noqa: F811
    if argv[0] == "eval":
        argv = argv + ["--out", str(tmp_path)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("podkv: error: "), captured.err
    assert flag in lines[0] and value in lines[0] and "invalid" not in lines[0]
    assert not captured.out


def test_generate_refuses_a_quantization_layout_without_bits(capsys):
    """--key-quant / --kv-keep-proximal only shape a quantized PodCache: alone they are a one-line error, before any
    model is loaded."""
    from podkv.cli import main

    for flags in (["--key-quant", "channel"], ["--kv-keep-proximal"]):
        assert main(["generate", *flags]) == 2
        assert "need --kv-bits 8 or 4 or 2" in capsys.readouterr().err
