"""Issue 20: one --out rule for every command (refuse an existing output unless --force; results appear whole)."""

import pytest

from podkv.cli import build_parser, main
from podkv.errors import PodError
from podkv.outputs import refuse_existing, staged_dir


def test_existing_output_is_refused_unless_forced(tmp_path):
    (tmp_path / "empty").mkdir()
    assert refuse_existing(tmp_path / "empty", force=False)  # an empty folder is free
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(PodError, match=r"--out .*full already exists: pass --force"):
        refuse_existing(tmp_path / "full", force=False)
    assert refuse_existing(tmp_path / "full", force=True)


def test_staged_dir_replaces_whole_or_leaves_the_old_one(tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "old.json").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(out, force=True) as stage:
            (stage / "new.json").write_text("half")
            raise RuntimeError("run failed")
    assert [p.name for p in out.iterdir()] == ["old.json"]  # untouched
    assert (tmp_path / ".res.partial" / "new.json").read_text() == "half"  # kept for the user
    with staged_dir(out, force=True) as stage:
        (stage / "new.json").write_text("whole")
    assert [p.name for p in out.iterdir()] == ["new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]  # no staging or replaced folders left


def test_every_command_with_an_output_takes_force():
    parser = build_parser()
    for argv in (["analyze", "--out", "x"], ["plan", "--analysis", "a", "--out", "x"], ["demo"],
                 ["eval", "compare", "--out", "x"], ["eval", "niah", "--method", "pod", "--out", "x"],
                 ["train", "--plan", "p", "--max-steps", "1", "--out", "x"], ["bench", "memory"]):
        assert parser.parse_args([*argv, "--force"]).force is True, argv


def test_plan_refuses_to_overwrite(tmp_path, capsys):
    target = tmp_path / "plan.json"
    target.write_text("{}")
    assert main(["plan", "--analysis", str(tmp_path / "missing.json"), "--out", str(target)]) != 0
    assert "already exists" in capsys.readouterr().err
    assert target.read_text() == "{}"
