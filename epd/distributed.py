"""Several processes on torch.distributed, as ``torchrun --nproc-per-node N`` launches them.

torchrun gives each process RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. :func:`init` joins the
process group they describe (gloo on the CPU; nccl with this process on cuda:LOCAL_RANK when there is CUDA); the
library's multi-process functions call it themselves. A program wraps its work in :func:`session`, which leaves the
group when the work ends or raises (else the group is left at exit). A process joins the group once: torch's
env:// rendezvous cannot be repeated after leaving (a second group finds the first one's addresses and hangs), so
:func:`init` refuses that. Without torchrun (or with one process) nothing is initialised: :func:`rank` is 0,
:func:`world_size` 1, and the collectives hand back their input.

The collectives take CPU or CUDA tensors and return them on the device they came from (nccl only moves CUDA
tensors, so CPU ones travel through the process's GPU). Objects are never pickled across ranks: bytes travel as
uint8 tensors (:func:`broadcast_bytes`).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_owned = False   # whether this module initialised the process group (and so destroys it)
_left = False    # whether it has destroyed it already


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank, 0 … world_size() − 1: the group's, else torchrun's RANK (so that rank 0 is known before
    the group is joined and after it is left); 0 in a single process."""
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    """The number of processes: the group's, else torchrun's WORLD_SIZE; 1 in a single process. (Collectives with
    more than one process need the group: outside it they fail instead of silently doing nothing.)"""
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def is_main() -> bool:
    """Rank 0: the process that writes shared outputs (checkpoints, manifests, metric files, tracking)."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 in a single process)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() or launched() else 0


def device() -> torch.device:
    """The device this process computes on: cuda:LOCAL_RANK when there is CUDA, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def init() -> bool:
    """Join the process group torchrun's environment describes; True if this process is one of several.

    Does nothing (False) without torchrun or with WORLD_SIZE 1, and nothing but return True when a process group
    exists already (whoever made it keeps it). A group made here is destroyed by :func:`shutdown`, at the latest
    when the interpreter exits.
    """
    global _owned
    if is_initialized():
        return world_size() > 1
    if not launched():
        return False
    if _left:
        raise ValueError("this process has left its torchrun process group already and cannot join it again: "
                         "initialise once (wrap the whole program in epd.distributed.session())")
    missing = [k for k in _TORCHRUN_VARS if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset: launch the "
                         f"processes with torchrun (or set all of {', '.join(_TORCHRUN_VARS)})")
    cuda = torch.cuda.is_available()
    if cuda:
        local, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= count:
            raise ValueError(f"LOCAL_RANK={local} but this node has {count} CUDA device(s): start at most {count} "
                             f"processes per node (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)   # a bare "cuda" then means this process's GPU
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                            device_id=torch.device("cuda", local) if cuda else None)
    _owned = True
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    """Destroy the process group :func:`init` made (no-op otherwise, and when called again)."""
    global _owned, _left
    if _owned and is_initialized():
        dist.destroy_process_group()
        _left = True
    _owned = False


@contextlib.contextmanager
def session() -> Iterator[bool]:
    """``with session() as several:`` the body runs inside the torchrun process group (``several`` is True) or in a
    single process (False). The session that initialised the group destroys it, on success and on error alike (a
    failing rank then releases the others instead of leaving them to time out); a nested one leaves it alone."""
    made = not is_initialized() and init()
    try:
        yield world_size() > 1
    finally:
        if made:
            shutdown()


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier(device_ids=[local_rank()] if dist.get_backend() == "nccl" else None)


def _comm(t: torch.Tensor) -> torch.Tensor:
    """``t`` where the backend can move it: nccl wants CUDA tensors, gloo takes CPU ones."""
    return t.to(device()).contiguous() if dist.get_backend() == "nccl" else t.cpu().contiguous()


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order (the same shape on every rank); ``t`` itself in a
    single process."""
    if world_size() == 1:
        return t
    x = _comm(t)
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts).to(t.device)


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise sums over ranks of ``tensors`` (one dtype), in one collective call; new tensors, on the
    devices the inputs were on. In a single process, the inputs."""
    if world_size() == 1:
        return list(tensors)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"all_reduce_sum takes tensors of one dtype, got {sorted(map(str, dtypes))}")
    flat = _comm(torch.cat([t.detach().reshape(-1) for t in tensors]))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    chunks = flat.split([t.numel() for t in tensors])
    return [c.view(t.shape).to(t.device) for c, t in zip(chunks, tensors)]


def broadcast_bytes(data: bytes | None, src: int = 0) -> bytes:
    """``data`` of rank ``src`` on every rank (the other ranks pass None); ``data`` itself in a single process."""
    if world_size() == 1:
        return b"" if data is None else data
    mine = rank() == src
    if mine and data is None:
        raise ValueError(f"broadcast_bytes: rank {src} is the source and must pass the bytes")
    size = _comm(torch.tensor([len(data) if mine else 0], dtype=torch.int64))
    dist.broadcast(size, src)
    n = int(size.item())
    if n == 0:
        return b""
    buf = _comm(torch.frombuffer(bytearray(data), dtype=torch.uint8) if mine else torch.empty(n, dtype=torch.uint8))
    dist.broadcast(buf, src)
    return data if mine else buf.cpu().numpy().tobytes()


__all__ = ["all_gather", "all_reduce_sum", "barrier", "broadcast_bytes", "device", "init", "is_initialized",
           "is_main", "launched", "local_rank", "rank", "session", "shutdown", "world_size"]


def relaunch(processes: int, args: list[str]) -> int:
    """Run ``python ARGS`` as ``processes`` processes under torchrun on this node (``--standalone``: a free port of its
    own, so jobs sharing a node do not clash); returns its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]
    return subprocess.call(cmd)
