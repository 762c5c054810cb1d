"""Pickles in the layout of the EPD authors' ``torch_utils.persistence`` snapshots, written without their code.

A persistent object pickles as a call ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` whose ``meta``
holds ``type="class"``, ``version=6``, the source of the object's module, its class name and its state (the
instance ``__dict__``); tensors inside pickle as ``torch._utils._rebuild_parameter`` / ``_rebuild_tensor_v2`` over
``torch.storage._load_from_bytes`` blobs. The snapshot is ``pickle.dump(dict(model=predictor, loss_fn=loss))``.
Here a stand-in module named ``torch_utils.persistence`` exists only while pickling, so that ``pickle`` writes that
global; the ``module_src`` given is stored as text, exactly where the original loader would ``exec`` it.
"""
from __future__ import annotations

import contextlib
import pickle
import sys
import types
from pathlib import Path
from typing import Any

import torch

PERSISTENCE = "torch_utils.persistence"


def _reconstruct_persistent_obj(meta):  # never called: only its name is pickled
    raise AssertionError("the test stand-in of upstream's loader must never run")


_reconstruct_persistent_obj.__module__ = PERSISTENCE


class Persistent:
    """Pickles as upstream's persistent objects do: ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, class_name: str, state: dict[str, Any], module_src: str = ""):
        self.meta = {"type": "class", "version": 6, "module_src": module_src, "class_name": class_name,
                     "state": state}

    def __reduce__(self):
        return _reconstruct_persistent_obj, (self.meta,)


@contextlib.contextmanager
def _persistence_module():
    names = ("torch_utils", PERSISTENCE)
    saved = {n: sys.modules.get(n) for n in names}
    module = types.ModuleType(PERSISTENCE)
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    sys.modules["torch_utils"], sys.modules[PERSISTENCE] = types.ModuleType("torch_utils"), module
    try:
        yield
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def dump(obj: Any, path: Path) -> Path:
    """``pickle.dump`` with protocol 4 (as upstream's snapshots), persistent objects under their upstream name."""
    with _persistence_module(), open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    return path


def module_state(params: dict[str, torch.Tensor], **attrs: Any) -> dict[str, Any]:
    """The ``__dict__`` of an ``nn.Module`` with these parameters, upstream's two submodules and attributes."""
    m = torch.nn.Module()
    for name, t in params.items():
        setattr(m, name, torch.nn.Parameter(t.detach().clone().float()))
    m.sigmoid = torch.nn.Sigmoid()
    m.softmax = torch.nn.Softmax(dim=-1)
    m.train(False)
    state = dict(m.__dict__)
    state.update(attrs)
    state["_init_args"], state["_init_kwargs"] = (), dict(attrs)
    return state


# The EPD_predictor attributes of the published tables (branch EPD-Solver: CIFAR-10 NFE 3, EPD).
PIXEL_ATTRS = dict(dataset_name="cifar10", img_resolution=32, num_steps=3, sampler_stu="epd", sampler_tea="heun", M=3,
                   guidance_type=None, guidance_rate=0.0, schedule_type="time_uniform", schedule_rho=1.0, afs=True,
                   scale_dir=0.05, scale_time=0.05, max_order=3, predict_x0=True, lower_order_final=True,
                   num_points=2, fcn=False, alpha=10.0)
# Branch EPD-Solver++: what sd15-best.pkl, sd3-1024-best.pkl and flux-best.pkl record besides PIXEL_ATTRS' keys.
PLUSPLUS_ATTRS = {
    "sd15": dict(dataset_name="ms_coco", img_resolution=1024, num_steps=11, sampler_stu="epd", sampler_tea="dpm",
                 M=1, guidance_type="cfg", guidance_rate=7.5, schedule_type="discrete", schedule_rho=1.0, afs=False,
                 scale_dir=0.0, scale_time=0.0, max_order=2, predict_x0=False, num_points=2,
                 backend="ldm", backend_config={"resolution": 1024}),
    "sd3": dict(dataset_name="ms_coco", img_resolution=1024, num_steps=11, sampler_stu="epd", sampler_tea="dpm", M=1,
                guidance_type="cfg", guidance_rate=4.5, schedule_type="flowmatch", schedule_rho=1.0, afs=False,
                scale_dir=0.0, scale_time=0.0, max_order=2, predict_x0=False, num_points=2, backend="sd3",
                backend_config={"model_name_or_path": "stabilityai/stable-diffusion-3-medium-diffusers",
                                "sigma_min": 0.0029940119760479044, "sigma_max": 1.0, "resolution": 1024}),
    "flux": dict(dataset_name="ms_coco", img_resolution=1024, num_steps=9, sampler_stu="epd", sampler_tea="dpm", M=1,
                 guidance_type="cfg", guidance_rate=3.5, schedule_type="flowmatch", schedule_rho=1.0, afs=False,
                 scale_dir=0.0, scale_time=0.0, max_order=2, predict_x0=False, num_points=2, backend="flux",
                 backend_config={"model_name_or_path": "black-forest-labs/FLUX.1-dev", "torch_dtype": "bfloat16",
                                 "resolution": 1024, "latent_resolution": 128, "sigma_min": 0.001,
                                 "sigma_max": 1.0, "flowmatch_mu": 1.15, "flowmatch_shift": 3.0},
                 sigma_min=0.001, sigma_max=1.0, flowmatch_mu=1.15, flowmatch_shift=3.0),
}


def raw_params(num_steps: int, num_points: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random raw parameters of upstream's scale (|r_params| up to ~3, so positions are often unsorted)."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_steps - 1, num_points)
    return {"r_params": 1.5 * torch.randn(shape, generator=g), "scale_dir_params": torch.randn(shape, generator=g),
            "scale_time_params": torch.randn(shape, generator=g), "weight_s": torch.randn(shape, generator=g)}


def write_snapshot(path: Path, attrs: dict[str, Any], params: dict[str, torch.Tensor] | None = None, *,
                   t_steps: torch.Tensor | None = None, module_src: str = "", class_name: str = "EPD_predictor",
                   extra_state: dict[str, Any] | None = None) -> Path:
    """An upstream snapshot: ``dict(model=EPD_predictor)``, plus ``loss_fn=EPD_loss`` holding ``t_steps`` if given."""
    attrs = {**{k: v for k, v in PIXEL_ATTRS.items()}, **attrs}
    params = raw_params(attrs["num_steps"], attrs["num_points"]) if params is None else params
    state = module_state(params, **attrs)
    state.update(extra_state or {})
    top: dict[str, Any] = {"model": Persistent(class_name, state, module_src)}
    if t_steps is not None:
        loss = {"num_steps": attrs["num_steps"], "sigma_min": float(t_steps[-1]), "sigma_max": float(t_steps[0]),
                "num_steps_teacher": 9, "t_steps": t_steps.float(), "buffer_model": [], "buffer_t": []}
        top["loss_fn"] = Persistent("EPD_loss", loss, module_src)
    return dump(top, path)
