"""Safe artifact I/O shared by every stage: atomic writes, checksums, pickle detection, trained-weight files, and
third-party checkpoints (found by path, read without running code).

A weight file is two files side by side, like a solver table: ``NAME.safetensors`` (the tensors) and ``NAME.json``
(``format``, ``kind`` — which network it is —, the architecture ``config`` that fixes every tensor's shape, the
SHA-256 of the tensor file, and free-form provenance: training config, data split, metrics). Nothing is unpickled.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

WEIGHTS_FORMAT = "epd-weights"
WEIGHTS_FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin")


class WeightsError(ValueError):
    """A weight file is missing, corrupt, or not the network it is loaded as."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a hidden temporary name in the same folder, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@functools.cache
def code_version() -> str:
    """A hash of epd's version and the source of its package: a checkpoint made by other code is not resumed."""
    from importlib.metadata import PackageNotFoundError, version

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    try:
        h.update(version("epd").encode())
    except PackageNotFoundError:
        pass
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def set_aside(path: Path, tag: str) -> Path | None:
    """Rename ``path`` (if it exists) to ``NAME.<tag>.SUFFIX`` beside it, keeping it; returns the new path."""
    if not path.exists():
        return None
    kept = path.with_name(f"{path.name.split('.')[0]}.{tag}{path.suffix}")
    os.replace(path, kept)
    return kept


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (no bytes copied), or a copy where the file system cannot link."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``; an older ``out`` is removed only after the new one is in place."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (safetensors reads it only from a file): the format is an 8-byte
    little-endian header length, then the JSON header."""
    n = int.from_bytes(blob[:8], "little")
    try:
        header = json.loads(blob[8:8 + n]) if len(blob) >= 8 + n else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError("not safetensors bytes: the header is truncated or not a JSON object")
    return header.get("__metadata__") or {}


def looks_like_pickle(path: Path, head: bytes) -> bool:
    """A pickle stream (protocol ≥ 2 starts with 0x80), a torch.save zip, or a pickle suffix."""
    return head[:1] == b"\x80" or head[:4] == b"PK\x03\x04" or path.suffix in PICKLE_SUFFIXES


def read_json_header(path: Path, fmt: str, error: type[Exception], what: str) -> dict[str, Any]:
    """Parse a JSON sidecar and check its ``format``: the errors name the file and what is wrong with it."""
    try:
        header = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON (truncated or corrupt?): {e}") from None
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise error(f"{path} is not {what} (format != {fmt!r})")
    return header


def weight_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``X``, ``X.json`` or ``X.safetensors`` → (``X.safetensors``, ``X.json``)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_weights(path: str | os.PathLike, tensors: dict[str, torch.Tensor], *, kind: str, config: dict[str, Any],
                 provenance: dict[str, Any] | None = None) -> Path:
    """Write ``PATH.safetensors`` + ``PATH.json`` (each atomically); returns the JSON path."""
    st_path, json_path = weight_paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    blob = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    header = {"format": WEIGHTS_FORMAT, "format_version": WEIGHTS_FORMAT_VERSION, "kind": kind,
              "tensors_file": st_path.name, "tensors_sha256": sha256(blob), "config": config,
              "provenance": provenance or {}}
    atomic_write(st_path, blob)
    atomic_write(json_path, (json.dumps(header, indent=2) + "\n").encode())
    return json_path


def load_weights(path: str | os.PathLike, *, kind: str, make: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a weight file written by :func:`save_weights` for network ``kind``; returns (tensors, JSON header).

    ``make`` is the command that writes the file, quoted when it is missing. Shapes against ``config`` are the
    caller's check (only the network knows them).
    """
    st_path, json_path = weight_paths(path)
    for f in (json_path, st_path):
        if not f.is_file():
            raise WeightsError(f"weights file missing: {f}. Make it with `{make}`.")
    for f in (json_path, st_path):
        if looks_like_pickle(f, f.read_bytes()[:8]):
            raise WeightsError(f"{f} is a pickle (torch.save / pickle.dump). epd never unpickles: loading a pickle "
                               f"runs arbitrary code. Weights are NAME.safetensors + NAME.json; `{make}` writes them.")
    header = read_json_header(json_path, WEIGHTS_FORMAT, WeightsError, "an epd weight file")
    if header.get("format_version") != WEIGHTS_FORMAT_VERSION:
        raise WeightsError(f"{json_path}: unsupported format_version {header.get('format_version')!r}")
    if header.get("kind") != kind:
        raise WeightsError(f"{json_path} holds weights of a {header.get('kind')!r} network, not {kind!r}: "
                           f"wrong file for this model (`{make}` writes the right one)")
    if not isinstance(header.get("config"), dict):
        raise WeightsError(f"{json_path} lacks the architecture config")
    blob = st_path.read_bytes()
    if sha256(blob) != header.get("tensors_sha256"):
        raise WeightsError(f"{st_path} does not match the checksum in {json_path.name} (truncated, corrupt or "
                           f"replaced); rewrite both with `{make}`")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError) as e:
        raise WeightsError(f"{st_path} is not a readable safetensors file: {e}") from None
    return tensors, header


def check_state_dict(tensors: dict[str, torch.Tensor], module: torch.nn.Module, source: Path) -> None:
    """Names and shapes of ``tensors`` must be exactly the module's state dict (built from the JSON config)."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise WeightsError(f"{source}: tensors do not match the architecture in its JSON config: missing "
                           f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected "
                           f"{extra[:5]}{'…' if len(extra) > 5 else ''}")
    wrong = [f"{k} {have[k]} != {want[k]}" for k in want if have[k] != want[k]]
    if wrong:
        raise WeightsError(f"{source}: tensor shapes do not match the architecture in its JSON config: "
                           f"{'; '.join(wrong[:3])}")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(f"{source}: tensors {bad[:5]} contain NaN or inf")


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimiser's state as flat tensors ``opt.<param>.<key>`` (for safetensors) and its param groups (for JSON)."""
    state = opt.state_dict()
    tensors = {f"opt.{idx}.{key}": torch.as_tensor(value).clone()
               for idx, s in state["state"].items() for key, value in s.items()}
    return tensors, state["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   param_groups: list[dict[str, Any]]) -> None:
    """Restore what :func:`optimizer_tensors` saved (other keys in ``tensors`` are ignored)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": param_groups})


# -- third-party checkpoints (the text-to-image scorers, Inception) -------------------------------------------------

class MissingWeightsError(FileNotFoundError):
    """A scorer's weight file is not where the config says; the message names the file and where it comes from."""


def require(path: str | os.PathLike | None, what: str, source: str) -> Path:
    """``path`` as an existing Path, or an error naming the file, the scorer and where the file comes from."""
    if path is None or str(path) == "":
        raise MissingWeightsError(f"{what}: no weights path given (`weights` in the config, or "
                                  f"--weights METRIC=PATH); get it from {source}")
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingWeightsError(f"{what}: weights file missing: {p} (get it from {source})")
    return p


def require_hf_folder(path: str | os.PathLike | None, what: str, source: str,
                      files: Sequence[str] = ("config.json",)) -> Path:
    """A transformers ``save_pretrained`` folder holding ``files`` (and a weights file), else a naming error."""
    folder = require(path, what, source)
    if not folder.is_dir():
        raise MissingWeightsError(f"{what}: {folder} must be a folder written by save_pretrained (from {source})")
    for name in files:
        require(folder / name, what, source)
    if not any((folder / w).exists() for w in ("model.safetensors", "model.safetensors.index.json",
                                               "pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise MissingWeightsError(f"{what}: weights file missing: {folder / 'model.safetensors'} "
                                  f"(or pytorch_model.bin; get it from {source})")
    return folder


def load_checkpoint(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch checkpoint read with ``weights_only=True`` (no code runs).

    A checkpoint that nests its state dict under ``state_dict`` or ``model`` (HPSv2, BLIP) is unwrapped, and a
    DataParallel ``module.`` prefix is dropped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError and friends: the message says which global was refused
            raise ValueError(f"{what}: {path} is not a plain state-dict checkpoint (torch.load with "
                             f"weights_only=True refused it: {str(e).splitlines()[0]}). Save its state_dict, or "
                             f"convert it to .safetensors") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what}: {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
