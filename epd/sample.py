"""Sampling: seeds → images with any solver (baseline at an NFE, or an EPD table), saved as PNGs or one grid."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import distributed
from .backbones import Backbone
from .solvers.plan import Configured


def parse_seeds(spec: str) -> list[int]:
    """``"0-63"``, ``"1,5,9"`` or ``"0-3,10,20-21"`` → a list of seeds in the given order (ranges inclusive)."""
    seeds: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                seeds.extend(range(a, b + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise ValueError(f"bad seed spec {part!r} in {spec!r}; use e.g. '0-63' or '1,5,9'") from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"seed spec {spec!r} must name at least one seed, none negative")
    return seeds


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a .txt file (one per line) or a .csv with a ``text`` column."""
    p = Path(path)
    if p.suffix == ".csv":
        import csv

        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "text" not in reader.fieldnames:
                raise ValueError(f"{p}: a prompt CSV needs a 'text' column, found {reader.fieldnames}")
            return [row["text"] for row in reader]
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


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
    conds = labels if labels is not None else prompts
    if conds is not None and len(conds) == 0:
        raise ValueError("empty label/prompt list")
    batches = range(0, len(seeds), batch_size)
    for start in tqdm(batches, desc=f"sample {solver.name} nfe={solver.nfe}", unit="batch", disable=not progress):
        batch = list(seeds[start:start + batch_size])
        picked = None if conds is None else [conds[(start + j) % len(conds)] for j in range(len(batch))]
        cond = (backbone.encode(labels=picked) if labels is not None
                else backbone.encode(prompts=picked) if prompts is not None else None)
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


def write_manifest(outdir: Path, seeds: Sequence[int], *, labels: Sequence[int] | None = None,
                   prompts: Sequence[str] | None = None, subdirs: bool = True) -> Path:
    """``outdir/samples.csv``: seed, label, prompt, path (relative to outdir) per PNG, what ``epd evaluate`` reads.
    Labels / prompts are cycled over the seeds as :func:`generate` does; the other column stays empty."""
    import csv
    import io

    from .io import atomic_write

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["seed", "label", "prompt", "path"])
    for i, seed in enumerate(seeds):
        label = labels[i % len(labels)] if labels else ""
        prompt = prompts[i % len(prompts)] if prompts else ""
        w.writerow([seed, label, prompt, png_path(seed, subdirs)])
    outdir.mkdir(parents=True, exist_ok=True)
    atomic_write(outdir / "samples.csv", buf.getvalue().encode())
    return outdir / "samples.csv"


def sample_folder(backbone: Backbone, solver: Configured, seeds: Sequence[int], outdir: str | os.PathLike, *,
                  labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None, batch_size: int = 64,
                  subdirs: bool = True, progress: bool = True) -> Path:
    """Write a sample folder: one PNG per seed (:func:`png_path`) and ``samples.csv`` (:func:`write_manifest`),
    labels / prompts cycled over the seeds as :func:`generate` does; returns the manifest's path.

    Under ``torchrun --nproc-per-node N`` the batches one process would form (``batch_size`` consecutive seeds) go
    round-robin to the N processes, each writing its PNGs; rank 0 writes ``samples.csv`` once every PNG exists, so
    a folder with a manifest is complete. Each image is computed in the same batch as in one process, so the files
    are the same bytes for any N. The process group is joined if it is not yet (:func:`epd.distributed.init`);
    every rank returns once the folder is complete.
    """
    outdir = Path(outdir)
    if labels is not None and prompts is not None:
        raise ValueError("give labels or prompts, not both")
    conds = labels if labels is not None else prompts
    if conds is not None and len(conds) == 0:
        raise ValueError("empty label/prompt list")
    if not seeds:
        raise ValueError("no seeds to sample")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seen: set[int] = set()
    for seed in seeds:
        if seed in seen:   # two rows for one PNG, which two processes might write at once
            raise ValueError(f"seed {seed} appears more than once: each seed names one PNG")
        seen.add(seed)
    distributed.init()
    rank, ranks = distributed.rank(), distributed.world_size()
    starts = range(rank * batch_size, len(seeds), ranks * batch_size)   # this rank's batches
    mine = [i for start in starts for i in range(start, min(start + batch_size, len(seeds)))]
    # each seed's own label / prompt, so that generate's cycling (by position in its list) is the identity
    picked = None if conds is None else [conds[i % len(conds)] for i in mine]
    if mine:
        for batch_seeds, images in generate(
                backbone, solver, [seeds[i] for i in mine], labels=picked if labels is not None else None,
                prompts=picked if prompts is not None else None, batch_size=batch_size,
                progress=progress and rank == 0):
            save_pngs(images, batch_seeds, outdir, subdirs=subdirs)
    distributed.barrier()
    if rank == 0:
        write_manifest(outdir, seeds, labels=labels, prompts=prompts, subdirs=subdirs)
    distributed.barrier()
    return outdir / "samples.csv"


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
