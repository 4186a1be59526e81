"""Run one benchmark by name and write its JSON, RESULTS.md section and plot. A registry, no branches."""

from __future__ import annotations

from pathlib import Path

from podkv.bench import batch, batch_rss, memory, skip, speed
from podkv.bench.common import machine_info
from podkv.bench.report import machine_line, write_results
from podkv.models.default_plan import default_plan
from podkv.plan import SharingPlan
from podkv.provenance import identity

# name -> (run(model, tok, plan, cfg) -> dict, markdown(result) -> str, plot(result, path), title)
BENCHES = {
    "memory": (memory.run_memory, memory.memory_markdown, memory.memory_plot, "KV memory"),
    "batch": (batch.run_batch, batch.batch_markdown, batch.batch_plot, "Max batch at a fixed KV budget"),
    "batch_rss": (batch_rss.run_batch_rss, batch_rss.batch_rss_markdown, batch_rss.batch_rss_plot,
                  "Max batch under a process-memory budget (peak RSS measured)"),
    "speed": (speed.run_speed, speed.speed_markdown, speed.speed_plot, "Prefill and decode speed"),
    "skip": (skip.run_skip, skip.skip_markdown, skip.skip_plot, "Gate skipping (paper §2.3, Fig. 4)"),
}
COMMANDS = {"batch_rss": "batch --rss-budget"}  # the command line of a benchmark, where it is not its name


def run_bench(name: str, model, tok, cfg, out_dir: str | Path = "benchmarks", plan_path: str | Path | None = None,
              plan: SharingPlan | None = None) -> Path:
    """Run benchmark ``name`` on ``model`` and write ``<out_dir>/<name>.json``, ``<name>.png`` and RESULTS.md."""
    run = BENCHES[name][0]
    if plan is not None:
        plan_name = "given"
        plan.validate_for(model.config)
    else:
        plan, plan_name = default_plan(model.config, plan_path)
    info = machine_info(str(model.device))
    measured = identity(model, plan)  # before the run: a benchmark may switch the model's attention
    result = run(model, tok, plan, cfg)
    result.update(machine=info, plan=plan_name, plan_saving_4k=plan.kv_saving(4096),
                  model=getattr(model.config, "_name_or_path", "") or model.config.model_type,
                  config={k: v for k, v in vars(cfg).items()}, identity=measured)
    return write_bench(name, result, out_dir)


def write_bench(name: str, result: dict, out_dir: str | Path) -> Path:
    """``<out_dir>/<name>.json``, ``<name>.png`` and the RESULTS.md section of a finished ``result``."""
    _, markdown, plot, title = BENCHES[name]
    out_dir = Path(out_dir)
    plot(result, out_dir / f"{name}.png")
    command = COMMANDS.get(name, name)
    bits = result.get("kv_bits")
    storage = "" if not bits else f"; PoD's PodCache in {bits} bits" + (
        ", KIVI keys (per channel)" if result.get("key_quant") == "channel" else ", per-token groups") + (
        ", proximal tokens exact" if result.get("keep_proximal") else "")
    section = (f"## {title}\n\n`podkv bench {command}` — model {result['model']}, plan {result['plan']} "
               f"(analytic KV saving at 4K: {100 * result['plan_saving_4k']:.1f}%){storage}.\n"
               f"{machine_line(result['machine'])}"
               f"\n\n{markdown(result)}\n\n![{name}]({name}.png)")
    return write_results(out_dir, name, result, section)
