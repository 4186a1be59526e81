"""`podkv train` under DDP: 2 CPU processes (gloo) launched by torchrun, 2 optimizer steps on a tiny model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import podkv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes(tiny_lm_dir, tmp_path):
    podkv.SharingPlan.uniform(4, 2, 2, ns=4, nr=8).save(tmp_path / "plan.json")
    (tmp_path / "data.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "podkv.cli", "train", "--model", str(tiny_lm_dir),
           "--plan", str(tmp_path / "plan.json"), "--data", str(tmp_path / "data.txt"), "--seq-len", "64",
           "--max-steps", "2", "--lr", "1e-3", "--eval-tokens", "64", "--threads", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "train_result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 2
    assert result["tokens"] == 2 * 2 * 64  # steps x processes x seq_len
    model, _ = podkv.load_model(str(out), progress=False)
    assert model.config.pod_plan is not None
