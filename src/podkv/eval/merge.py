"""Merge compare runs made separately (e.g. methods run in parallel processes) into one result.

Runs must share every setting that defines the prompts (tasks, lengths, depths, haystack, seed, ...),
so all methods were scored on the same prompts; each method keeps the model and plan it ran with.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from podkv.errors import PodError

SAME = ("tasks", "lengths", "depths", "depths_long", "long_from", "haystack", "samples", "needles", "seed",
        "max_new_tokens", "files", "data", "subset")


def _read(directory) -> tuple[dict, dict]:
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise PodError(f"--merge {directory}: no results.json there")
    timings = Path(directory) / "timings.json"
    return json.loads(path.read_text()), json.loads(timings.read_text()) if timings.is_file() else {}


def merge_runs(dirs) -> tuple[dict, dict]:
    """(results, timings) combining the methods of every run in ``dirs``.

    A method name met again (another model) is kept as ``"name [model]"``.
    """
    if not dirs:
        raise PodError("--merge needs at least one results directory")
    runs = [_read(d) for d in dirs]
    base = copy.deepcopy(runs[0][0])
    merged, timings = {}, {}
    for d, (res, tim) in zip(dirs, runs):
        for key in SAME:
            if res["settings"].get(key) != base["settings"].get(key):
                raise PodError(f"--merge {d}: setting {key!r} = {res['settings'].get(key)!r} differs from "
                               f"{base['settings'].get(key)!r} in {dirs[0]}: the prompts would not be the same")
        for name, entry in res["methods"].items():
            entry = copy.deepcopy(entry)
            entry.setdefault("model", res["model"])
            entry.setdefault("plan_source", res["plan_source"])
            if name in merged:  # the same method on another model (e.g. pod on smollm2-pod): keep both
                name = f"{name} [{entry['model']}]"
            merged[name] = entry
            timings.update({f"{name}/{k.split('/', 1)[1]}": v for k, v in tim.items()
                            if k.split("/")[0] == entry["method"]["name"]})
    base["methods"] = merged
    base["settings"]["methods"] = list(merged)
    base["merged_from"] = [str(d) for d in dirs]
    return base, timings
