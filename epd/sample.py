"""Sampling: seeds → images with any solver (baseline at an NFE, or an EPD table), saved as PNGs or one grid."""
from __future__ import annotations

import csv
import io
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import distributed
from .backbones import Backbone
from .data import parse_labels, seed_count
from .io import atomic_write, link_or_copy, replace_dir
from .options import Field
from .solvers.plan import Configured

SEEDS = r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$"


@dataclass(frozen=True)
class SampleOptions:
    """Sampling (config section ``sample``): which seeds, conditioned how, in batches of what size."""

    seeds: Annotated[str, Field(pattern=SEEDS, description="seeds, e.g. 0-1023 or 1,5,9 (held out: never a "
                                                          "teacher or training seed)")] = "0-63"
    labels: Annotated[str | None, Field(pattern=r"^\d(,\d)*$", description="class labels cycled over the seeds, "
                                                                          "e.g. 0,1,2")] = None
    prompts: Annotated[str | None, Field(min_length=1, description="prompt file cycled over the seeds (.txt, or "
                                                                   ".csv with a text column)",
                                         json_schema_extra={"flag": "--prompt-file"})] = None
    batch: Annotated[int, Field(ge=1, description="samples per batch")] = 64
    subdirs: Annotated[bool, Field(description="group PNGs in folders of 1000 seeds")] = True
    shard_size: Annotated[int | None, Field(ge=1, description="seeds per job in the pipeline (a multiple of batch; "
                                                             "none: one job per sample set)")] = None
    reference_steps: Annotated[int | None, Field(ge=16, description="the reference solver's grid points (none: the "
                                                                   "backbone's, 512 on gmm-digits, 128 on a network)")] = None
    reference_check: Annotated[int, Field(ge=0, description="samples the reference re-solves with twice its steps, "
                                                            "to state its own error (reference.json)")] = 256

    def __post_init__(self):
        if self.labels is not None and self.prompts is not None:
            raise ValueError("give labels or prompts, not both")
        seed_count(self.seeds)
        if self.shard_size is not None and self.shard_size % self.batch:
            raise ValueError(f"shard_size ({self.shard_size}) must be a multiple of batch ({self.batch}), so that a "
                             f"sharded run computes every image in the same batch as an unsharded one")
        if self.labels is not None:
            parse_labels(self.labels)


def encode_cycled(backbone: Backbone, positions: Sequence[int], labels: Sequence[int] | None = None,
                  prompts: Sequence[str] | None = None):
    """The encoded condition of each position in a seed list: labels or prompts cycled over the positions (position
    i gets the (i mod len)-th), None if unconditional."""
    conds = labels if labels is not None else prompts
    if conds is None:
        return None
    picked = [conds[i % len(conds)] for i in positions]
    return backbone.encode(labels=picked) if labels is not None else backbone.encode(prompts=picked)


def generate(
    backbone: Backbone,
    solver: Configured,
    seeds: Sequence[int],
    *,
    labels: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(seeds, uint8 images)`` per batch. Labels/prompts are cycled over the seeds, so seed i gets the
    (i mod len)-th one; a sample depends only on its seed, its label/prompt and the solver, not on the batching."""
    if labels is not None and prompts is not None:
        raise ValueError("give labels or prompts, not both")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    conds = labels if labels is not None else prompts
    if conds is not None and len(conds) == 0:
        raise ValueError("the label/prompt list is empty")
    batches = range(0, len(seeds), batch_size)
    for start in tqdm(batches, desc=f"sample {solver.name} nfe={solver.nfe}", unit="batch", disable=not progress):
        batch = list(seeds[start:start + batch_size])
        cond = encode_cycled(backbone, range(start, start + len(batch)), labels, prompts)
        with torch.no_grad():
            x = solver(backbone, backbone.noise(batch), cond)
        yield batch, backbone.decode(x)


def _to_pil(img: torch.Tensor) -> Image.Image:
    arr = img.numpy()
    if arr.ndim == 3:  # [C, H, W] → [H, W, C]
        arr = np.moveaxis(arr, 0, -1)
    return Image.fromarray(arr)


def _save_png(img: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def png_path(seed: int, subdirs: bool = True) -> str:
    """Where seed's PNG goes, relative to the output folder: ``000000/000123.png`` (1000 seeds per folder) or flat."""
    return f"{seed - seed % 1000:06d}/{seed:06d}.png" if subdirs else f"{seed:06d}.png"


def save_pngs(images: torch.Tensor, seeds: Sequence[int], outdir: Path, subdirs: bool = True) -> None:
    """One PNG per seed at ``outdir / png_path(seed, subdirs)``."""
    for img, seed in zip(images, seeds):
        path = outdir / png_path(seed, subdirs)
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_png(_to_pil(img), path)


MANIFEST_HEADER = ["seed", "label", "prompt", "path"]


def _manifest_rows(seeds: Sequence[int], labels: Sequence[int] | None, prompts: Sequence[str] | None,
                   subdirs: bool) -> list[list]:
    return [[seed, labels[i % len(labels)] if labels else "", prompts[i % len(prompts)] if prompts else "",
             png_path(seed, subdirs)] for i, seed in enumerate(seeds)]


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_manifest(outdir: Path, seeds: Sequence[int], *, labels: Sequence[int] | None = None,
                   prompts: Sequence[str] | None = None, subdirs: bool = True) -> Path:
    """``outdir/samples.csv``: seed, label, prompt, path (relative to outdir) per PNG, what ``epd evaluate`` reads.
    Labels / prompts are cycled over the seeds as :func:`generate` does; the other column stays empty."""
    outdir.mkdir(parents=True, exist_ok=True)
    atomic_write(outdir / "samples.csv", _csv([MANIFEST_HEADER, *_manifest_rows(seeds, labels, prompts,
                                                                                   subdirs)]).encode())
    return outdir / "samples.csv"


def write_samples(backbone: Backbone, solver: Configured, seeds: Sequence[int], outdir: str | os.PathLike, *,
                  labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None, batch_size: int = 64,
                  subdirs: bool = True, overwrite: bool = False, progress: bool = True,
                  extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Sample every seed into ``outdir``: one PNG per seed (:func:`png_path`) and ``samples.csv``
    (:func:`write_manifest`, what ``epd evaluate`` reads), labels / prompts cycled over the seeds as
    :func:`generate` does; returns ``outdir``. ``extra_files`` (name → bytes) are written beside them.

    The folder is filled under a temporary name beside it and moved into place only when complete: an interrupted
    run leaves no half-written folder, an existing one (replaced only with ``overwrite``) keeps its samples until
    then, and no stale PNG of an earlier run survives.

    Under ``torchrun --nproc-per-node N`` the batches one process would form (``batch_size`` consecutive seeds) go
    round-robin to the N processes, each writing its PNGs; rank 0 writes ``samples.csv`` and moves the folder into
    place once every PNG exists. Each image is computed in the same batch as in one process, so the files are the
    same bytes for any N. Every rank returns once the folder is in place.
    """
    outdir = Path(outdir)
    if labels is not None and prompts is not None:
        raise ValueError("give labels or prompts, not both")
    conds = labels if labels is not None else prompts
    if conds is not None and len(conds) == 0:
        raise ValueError("the label/prompt list is empty")
    if not seeds:
        raise ValueError("no seeds to sample")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if len(set(seeds)) != len(seeds):   # two rows for one PNG, which two processes might write at once
        raise ValueError(f"a seed appears more than once in {list(seeds)[:20]}…: each seed names one PNG")
    check_sample_dir(outdir, overwrite)
    distributed.init()
    rank, ranks = distributed.rank(), distributed.world_size()
    tmp = outdir.with_name(f".{outdir.name}.partial")   # the same name on every rank
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    try:
        starts = range(rank * batch_size, len(seeds), ranks * batch_size)   # this rank's batches
        mine = [i for start in starts for i in range(start, min(start + batch_size, len(seeds)))]
        # each seed's own label / prompt, so that generate's cycling (by position in its list) is the identity
        picked = None if conds is None else [conds[i % len(conds)] for i in mine]
        if mine:
            for batch_seeds, images in generate(
                    backbone, solver, [seeds[i] for i in mine], labels=picked if labels is not None else None,
                    prompts=picked if prompts is not None else None, batch_size=batch_size,
                    progress=progress and rank == 0):
                save_pngs(images, batch_seeds, tmp, subdirs=subdirs)
        distributed.barrier()
        if rank == 0:
            write_manifest(tmp, seeds, labels=labels, prompts=prompts, subdirs=subdirs)
            for name, data in (extra_files or {}).items():
                (tmp / name).write_bytes(data)
            replace_dir(tmp, outdir)
        distributed.barrier()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return outdir


def shard_slices(num_seeds: int, shard_size: int | None) -> list[slice]:
    """The positions (in the seed list) of each shard: ``shard_size`` seeds each (one shard when it is None)."""
    size = shard_size or num_seeds
    return [slice(start, min(start + size, num_seeds)) for start in range(0, num_seeds, size)]


def gather_samples(shards: str | os.PathLike, outdir: str | os.PathLike, seeds: Sequence[int], *,
                   labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None, shard_size: int,
                   subdirs: bool = True, overwrite: bool = False) -> Path:
    """The sample folder of ``seeds`` from the shard folders ``shards/0``, ``shards/1``, … (each written by
    :func:`write_samples` for its slice of the seeds, conditions cycled by position in the whole list): every shard
    must be there with exactly its seeds, conditions and readable PNGs. The result is the same folder as an
    unsharded run, its PNGs hard-linked from the shards (no bytes copied, where the file system allows)."""
    shards, outdir = Path(shards), Path(outdir)
    check_sample_dir(outdir, overwrite)
    expected = _manifest_rows(seeds, labels, prompts, subdirs)
    pieces = shard_slices(len(seeds), shard_size)
    for i, part in enumerate(pieces):
        folder = shards / str(i)
        manifest = folder / "samples.csv"
        if not manifest.is_file():
            raise FileNotFoundError(f"sample shard {i} of {len(pieces)} missing: {manifest} does not exist")
        if manifest.read_text() != _csv([MANIFEST_HEADER, *expected[part]]):
            raise ValueError(f"{manifest} does not list shard {i}'s seeds {seeds[part.start]}…"
                             f"{seeds[part.stop - 1]} with their conditions (made for another config?)")
        for row in expected[part]:
            try:
                with Image.open(folder / row[3]) as img:
                    img.load()   # a truncated PNG fails here, not in the evaluation
            except (OSError, SyntaxError) as e:
                raise ValueError(f"sample shard {i}: {folder / row[3]} is missing or unreadable ({e})") from None
    tmp = outdir.with_name(f".{outdir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for i, part in enumerate(pieces):
            for row in expected[part]:
                (tmp / row[3]).parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(shards / str(i) / row[3], tmp / row[3])
        if (shards / "0" / "reference.json").is_file():   # the reference solver's own error, from its first shard
            link_or_copy(shards / "0" / "reference.json", tmp / "reference.json")
        write_manifest(tmp, seeds, labels=labels, prompts=prompts, subdirs=subdirs)
        replace_dir(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return outdir


def check_sample_dir(outdir: Path, overwrite: bool) -> None:
    """Refuse, before any work, a folder that cannot take a sample set: a file, an unwritable place, or a folder
    that already holds files (unless ``overwrite``)."""
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"output folder {outdir} is a file")
    parent = next(a for a in (outdir.parent, *outdir.parent.parents) if a.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {outdir}: {parent} is not writable")
    if outdir.is_dir() and any(outdir.iterdir()) and not overwrite:
        raise ValueError(f"output folder {outdir} is not empty; pass --overwrite to replace what it holds")


def save_grid(images: torch.Tensor, path: Path, zoom: int | None = None) -> None:
    """All images tiled in a near-square grid (nearest-neighbour zoom keeps small digits legible; by default 4 for
    images under 64 pixels, none for text-to-image sizes)."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tiles = [_to_pil(img) for img in images]
    w, h = tiles[0].size
    zoom = (4 if max(w, h) < 64 else 1) if zoom is None else zoom
    pad = 1  # a grey line between tiles: digits on black backgrounds otherwise run into each other
    fill = 96 if tiles[0].mode == "L" else (96, 96, 96)
    grid = Image.new(tiles[0].mode, (cols * (w + pad) - pad, rows * (h + pad) - pad), fill)
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    if zoom > 1:
        grid = grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_png(grid, path)
