"""Reading other projects' pickles without running anything from them: epd's one audited unpickler.

Two layouts occur in the checkpoints epd reads:

- a module saved whole in torch's zip format (``torch.save(model)``; MPS ships its checkpoint that way), read by
  :func:`pickled_module_state_dict`;
- a plain pickle of ``torch_utils.persistence`` objects (EDM / StyleGAN style; the EPD authors' solver tables), read
  by :func:`read_pickle`. Each persistent object pickles as ``_reconstruct_persistent_obj(meta)``, where ``meta``
  holds the Python source of the object's module, its class name and its state; the original loader ``exec``s that
  source. Here the call becomes a :class:`PersistentObject` that keeps the source as text and never runs it.

``torch.load(weights_only=True)`` refuses both (they name the model's classes), and ``weights_only=False`` would
execute whatever the pickle says. This reader resolves only torch's tensor rebuilders, dtypes, storage types and
plain containers; every other name the pickle mentions becomes an inert class that accepts any arguments and
records them, so ``__reduce__`` callables, hooks, functions and code objects never run. Tensors pickled inside a
plain pickle carry their storage as a legacy ``torch.save`` blob (``torch.storage._load_from_bytes``), which goes
through ``torch.load(weights_only=True)``, torch's restricted reader. Module trees are then walked through the
recorded ``_parameters`` / ``_buffers`` / ``_modules``.
"""
from __future__ import annotations

import importlib
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["Inert", "PersistentObject", "module_tensors", "pickled_module_state_dict", "read_pickle"]

_SAFE = {("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"), ("builtins", "set"),
         ("builtins", "frozenset"), ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple")}
_PERSISTENT = ("torch_utils.persistence", "_reconstruct_persistent_obj")


class Inert:
    """Stands in for every class or function the pickle names: accepts any construction, records what it gets.

    ``_name`` is the dotted name the pickle gave; ``_args`` the construction (or call) arguments; ``_state`` what
    ``BUILD`` set; ``_items`` / ``_list`` what dict or list subclasses received.
    """

    _name = "?"

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("_list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("_list", []).extend(values)

    def __repr__(self) -> str:
        return f"<inert {self._name}>"


@dataclass
class PersistentObject:
    """A ``torch_utils.persistence`` object as recorded in its pickle, not rebuilt: ``module_src`` is the source the
    original loader would execute (kept as text only), ``state`` the instance ``__dict__`` it would restore."""

    class_name: str
    state: dict[str, Any]
    module_src: str
    version: Any
    kind: Any


def _persistent(meta: Any = None, *rest: Any) -> PersistentObject | Inert:
    if rest or not isinstance(meta, dict):
        out = _inert_class("torch_utils.persistence", "_reconstruct_persistent_obj")(meta, *rest)
        return out
    state = meta.get("state")
    src = meta.get("module_src")
    return PersistentObject(class_name=str(meta.get("class_name")), state=state if isinstance(state, dict) else {},
                            module_src=src if isinstance(src, str) else "", version=meta.get("version"),
                            kind=meta.get("type"))


def _storage_from_bytes(blob: bytes):
    # The legacy torch.save format of one storage; torch's restricted reader rebuilds it without running code.
    if not isinstance(blob, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"a pickled storage should be bytes, got {type(blob).__name__}")
    return torch.load(io.BytesIO(bytes(blob)), map_location="cpu", weights_only=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _inert_class(module: str, name: str) -> type:
    return type(name, (Inert,), {"__module__": f"inert.{module}", "_name": f"{module}.{name}"})


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol-2 names
        if (module, name) in _SAFE:
            return getattr(importlib.import_module(module), name)
        if module == "torch._utils" and name.startswith("_rebuild_parameter"):
            return _rebuild_parameter
        if module == "copyreg" and name == "_reconstructor":
            return lambda cls, base, state: cls.__new__(cls)
        if module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        return _inert_class(module, name)


class _PlainUnpickler(_InertUnpickler):
    """A plain pickle stream: persistence objects recorded, storages from their embedded legacy blobs."""

    def find_class(self, module, name):
        if (module, name) == _PERSISTENT:
            return _persistent
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in a plain pickle")


class _ZipUnpickler(_InertUnpickler):
    """``data.pkl`` of a torch zip archive: storages are the archive's ``data/<key>`` entries."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self.archive, self.prefix = archive, prefix

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        dtype = storage_type if isinstance(storage_type, torch.dtype) else storage_type.dtype
        data = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        untyped = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def read_pickle(path: str | Path) -> Any:
    """The object a plain pickle file (``pickle.dump`` of dicts, tensors and ``torch_utils.persistence`` objects)
    describes, built without running any of its code: persistence objects become :class:`PersistentObject`, other
    named classes and functions :class:`Inert` records, tensors real tensors. Raises ``ValueError`` naming the file
    if it is not such a pickle (e.g. a torch zip archive, or truncated)."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        raise ValueError(f"{path} is a torch zip archive (torch.save format), not a plain pickle")
    with open(path, "rb") as f:
        return _load_plain(f, path)


def _load_plain(f: BinaryIO, path: Path) -> Any:
    head = f.read(1)
    if head != b"\x80":
        raise ValueError(f"{path} is not a pickle (protocol >= 2 starts with byte 0x80, got {head!r})")
    f.seek(0)
    try:
        return _PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError, AttributeError, KeyError,
            IndexError) as e:
        raise ValueError(f"{path} is not a readable pickle: {type(e).__name__}: {e}") from None


def _module_state(obj: Any) -> dict | None:
    if isinstance(obj, PersistentObject):
        return obj.state
    state = obj.__dict__.get("_state") if isinstance(obj, Inert) else None
    state = state[0] if isinstance(state, tuple) else state
    return state if isinstance(state, dict) else None


def module_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``state_dict()`` tensors of a recorded ``torch.nn.Module`` (an :class:`Inert` or a
    :class:`PersistentObject`): its persistent parameters and buffers and those of its submodules, by dotted key."""
    out: dict[str, torch.Tensor] = {}
    state = _module_state(obj)
    if state is None:
        return out
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if isinstance(t, torch.Tensor) and not (group == "_buffers" and name in skip):
                out[prefix + name] = t
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out


def pickled_module_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict (the keys ``module.state_dict()`` gave) of a module saved whole in torch's zip format."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a torch zip archive (torch.save format); cannot read it safely")
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {pkl}")
        root = _ZipUnpickler(archive, pkl[0][:-len("/data.pkl")]).load()
    out = module_tensors(root)
    if not out:
        raise ValueError(f"{path} holds no module tensors")
    return {k: v.clone() for k, v in out.items()}
