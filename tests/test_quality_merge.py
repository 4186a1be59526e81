"""benchmarks/quality/merge_records.py: a run replaces the committed records of the (task, length) pairs it covers."""

import json

from bench_scripts import load_script


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_run_replaces_its_pairs_and_keeps_the_rest(tmp_path):
    merge = load_script("benchmarks/quality/merge_records.py").merge
    dest, run = tmp_path / "pod.jsonl", tmp_path / "records.jsonl"
    old = [{"task": "vt", "length": 1024, "sample": 0, "score": 1.0},
           {"task": "vt", "length": 2048, "sample": 0, "score": 0.0}]
    _write(dest, old)
    _write(run, [{"task": "vt", "length": 2048, "sample": s, "score": 1.0} for s in range(2)])
    assert merge(run, dest) == (1, 2)
    assert merge(run, dest) == (1, 2)  # merging again changes nothing: no duplicated prompts
    got = [json.loads(line) for line in dest.read_text().splitlines()]
    assert got == old[:1] + [{"task": "vt", "length": 2048, "sample": s, "score": 1.0} for s in range(2)]
