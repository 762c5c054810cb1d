"""Reading the tensors of a module saved whole (``torch.save(module)``) without running anything from the file.

MPS ships its checkpoint that way. ``torch.load(weights_only=True)`` refuses it (it names the model's classes), and
``weights_only=False`` would execute whatever the pickle says. This reader resolves only torch's tensor rebuilders,
dtypes, storage types and plain containers; every other name the pickle mentions becomes an inert class that
accepts any arguments and records its state, so ``__reduce__`` callables, hooks and code objects never run. The
module tree is then walked through the recorded ``_parameters`` / ``_buffers`` / ``_modules``.
"""
from __future__ import annotations

import importlib
import io
import pickle
import zipfile
from pathlib import Path

import torch

_SAFE = {("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"), ("builtins", "set"),
         ("builtins", "frozenset"), ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple")}


class _Inert:
    """Stands in for every class the pickle names: accepts any construction, records its state."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self.archive, self.prefix = archive, prefix

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
        return type(name, (_Inert,), {"__module__": f"inert.{module}"})

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        dtype = storage_type if isinstance(storage_type, torch.dtype) else storage_type.dtype
        data = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        untyped = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _collect(obj, prefix: str, out: dict[str, torch.Tensor]) -> None:
    state = obj.__dict__.get("_state") if isinstance(obj, _Inert) else None
    state = state[0] if isinstance(state, tuple) else state
    if not isinstance(state, dict):
        return
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if isinstance(t, torch.Tensor) and not (group == "_buffers" and name in skip):
                out[prefix + name] = t
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _collect(child, f"{prefix}{name}.", out)


def pickled_module_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict (the keys ``module.state_dict()`` gave) of a module saved whole in torch's zip format."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a torch zip archive (torch.save format); cannot read it safely")
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {pkl}")
        root = _Unpickler(archive, pkl[0][:-len("/data.pkl")]).load()
    out: dict[str, torch.Tensor] = {}
    _collect(root, "", out)
    if not out:
        raise ValueError(f"{path} holds no module tensors")
    return {k: v.clone() for k, v in out.items()}
