"""The measured-figures tables in README.md and docs/bench.md are what scripts/figures.py generates from
the committed results files: a hand edit, or a rerun without regenerating, fails here."""

import difflib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("figures", ROOT / "scripts" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["figures"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("figures", None)


def test_docs_tables_match_their_results_files(figures):
    for doc in figures.TABLES:
        text = (ROOT / doc).read_text()
        generated = figures.render(text, doc)
        diff = "".join(difflib.unified_diff(text.splitlines(True), generated.splitlines(True), doc, "generated"))
        assert not diff, f"{doc} differs from its results files; run `python scripts/figures.py`\n{diff}"


def test_every_row_names_an_existing_results_file(figures):
    for doc, (header, rows) in figures.TABLES.items():
        assert rows and header[-1] == "source"
        for row in rows:
            assert sorted(ROOT.glob(row.source)), f"{doc}: {row.cells.__name__} reads missing {row.source}"
            assert f"`{row.source}`" in figures.table(doc)


def test_a_new_result_changes_the_table(figures, tmp_path):
    sources = {row.source for _, rows in figures.TABLES.values() for row in rows}
    for source in sources:
        for path in ROOT.glob(source):
            dest = tmp_path / path.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    memory = json.loads((tmp_path / "benchmarks" / "memory.json").read_text())
    memory["rows"][2]["saving"] = 0.4321
    (tmp_path / "benchmarks" / "memory.json").write_text(json.dumps(memory))
    assert "**43.2%**" in figures.table("README.md", root=tmp_path)
    assert "**43.2%**" not in figures.table("README.md")


def test_render_needs_the_markers(figures):
    with pytest.raises(SystemExit, match="figures:begin"):
        figures.render("# no block here\n", "README.md")


def test_prose_plan_savings_are_the_plans_own():
    """Outside the generated tables, a shipped plan's KV saving quoted in prose (the first percentage within a
    line after the plan's file name, at 4K unless the text says 'at NK') is what the plan file computes."""
    import re

    from podkv.plan import SharingPlan

    assets = ROOT / "src" / "podkv" / "assets"
    plans = {p.name: SharingPlan.load(p) for p in assets.glob("smollm2_plan_*.json")}
    quoted = 0
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            for m in re.finditer(r"(smollm2_plan_\w+\.json)[^%|]{0,60}?(\d+\.\d)%( [^,;)]{0,20}?at (\d)K)?", line):
                tokens = 1024 * int(m.group(4) or 4)
                want = f"{100 * plans[m.group(1)].kv_saving(tokens):.1f}"
                assert m.group(2) == want, f"{doc.name}: {m.group(0)!r} — the plan saves {want}% at {tokens}"
                quoted += 1
    assert quoted >= 3
