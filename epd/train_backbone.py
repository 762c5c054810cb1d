"""Training of the embedded networks whose weights ship in ``data/weights`` (``epd train-backbone``).

- ``unet``: the ``unet-digits`` denoiser, EDM's recipe (Karras et al. 2022): ln σ ~ N(P_mean, P_std²), loss weight
  λ(σ) = (σ² + σ_d²) / (σ · σ_d)², labels dropped to the null label with probability ``label_dropout`` so one
  network gives both halves of classifier-free guidance, an EMA of the weights is what ships.
- ``classifier``: the digit feature network behind FD-digits, label accuracy and the embedded rewards.

Both train on the train split of ``epd.data`` only, from one seed: every random draw (initialisation, batches, σ,
noise, dropout, augmentation) comes from torch's global generator seeded once, so the same command with the same
thread count on the same machine writes bit-identical weights (checked by the SHA-256 in the JSON). Each writes
``NAME.safetensors``, ``NAME.json`` (architecture, training config, data split, checksum, metrics) and
``NAME.log.csv``, every file to a temporary name first.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from .backbones.unet import KIND as UNET_KIND
from .backbones.unet import EDMDenoiser, UNetConfig
from .data import digit_split
from .io import atomic_write, save_weights
from .metrics.digits import KIND as CLASSIFIER_KIND
from .metrics.digits import ClassifierConfig, DigitClassifier


@dataclass
class UNetTrainConfig:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200               # linear warm-up steps, then cosine decay to lr_final_fraction · lr
    lr_final_fraction: float = 0.05
    ema_decay: float = 0.999        # cap of decay_t = min(ema_decay, (1 + t) / (10 + t)): 0.9978 at step 4000
    p_mean: float = -1.2
    p_std: float = 1.2
    label_dropout: float = 0.15
    seed: int = 0
    threads: int = 1                # one thread: bit-identical on a machine, and no slowdown when it is shared
    log_every: int = 10


@dataclass
class ClassifierTrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 0              # random translation (pixels); off: FD-digits should see position changes
    seed: int = 0
    threads: int = 1                # one thread: bit-identical on a machine, and no slowdown when it is shared
    log_every: int = 10


def _lr(step: int, total: int, cfg) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * (cfg.lr_final_fraction + (1 - cfg.lr_final_fraction) * 0.5 * (1 + math.cos(math.pi * t)))


def _write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue().encode())


def _environment(threads: int) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": threads}


@contextlib.contextmanager
def _isolated(threads: int):
    """Run with ``threads`` torch threads and a forked global RNG, then restore the caller's of both."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(before)


def _batches(n: int, batch_size: int):
    """Endless shuffled minibatch indices, epoch after epoch (from torch's global generator)."""
    while True:
        perm = torch.randperm(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def train_unet(out: str | Path, cfg: UNetTrainConfig = UNetTrainConfig(), arch: UNetConfig | None = None,
               progress: bool = True, metrics: bool = True) -> Path:
    """Train ``unet-digits`` and write ``out/unet-digits.{safetensors,json,log.csv}``; returns the JSON path."""
    with _isolated(cfg.threads):
        return _train_unet(Path(out), cfg, arch, progress, metrics)


def _train_unet(out: Path, cfg: UNetTrainConfig, arch: UNetConfig | None, progress: bool, metrics: bool) -> Path:
    torch.manual_seed(cfg.seed)
    split = digit_split()
    data_mean = split.train_images.mean(0).float()                     # [1, 8, 8]; AFS assumes zero-mean data
    y_all = (split.train_images.float() - data_mean)
    labels_all = split.train_labels
    if arch is None:
        arch = UNetConfig(sigma_data=round(float(y_all.std()), 3))
    model = EDMDenoiser(arch).train()
    ema = EDMDenoiser(arch).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sd = arch.sigma_data
    rows, acc, t0 = [], [], time.perf_counter()
    batches = _batches(len(y_all), cfg.batch_size)
    for step in tqdm(range(cfg.steps), desc="train unet-digits", disable=not progress):
        idx = next(batches)
        y, labels = y_all[idx], labels_all[idx].clone()
        labels[torch.rand(len(idx)) < cfg.label_dropout] = -1
        sigma = (torch.randn(len(idx)) * cfg.p_std + cfg.p_mean).exp()
        x = y + sigma.view(-1, 1, 1, 1) * torch.randn_like(y)
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        loss = (weight.view(-1, 1, 1, 1) * (model(x, sigma, labels) - y) ** 2).mean()
        lr = _lr(step, cfg.steps, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        acc.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rows.append({"step": step + 1, "loss": sum(acc) / len(acc), "lr": lr, "ema_decay": decay,
                         "seconds": round(time.perf_counter() - t0, 2)})
            acc = []
    seconds = time.perf_counter() - t0
    tensors = {**ema.state_dict(), "data_mean": data_mean}
    provenance = {
        "command": f"epd train-backbone --what unet --steps {cfg.steps} --seed {cfg.seed} --threads {cfg.threads}",
        "training": asdict(cfg), "data": split.describe(), "data_mean": "mean image of the train split",
        "final_loss": rows[-1]["loss"], "train_seconds": round(seconds, 1), "environment": _environment(cfg.threads),
        "parameters": sum(p.numel() for p in model.parameters()), "weights": "EMA",
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_log(out / f"{UNET_KIND}.log.csv", rows)
    json_path = save_weights(out / UNET_KIND, tensors, kind=UNET_KIND, config=arch.to_json(), provenance=provenance)
    if metrics:
        _record(json_path, unet_metrics(json_path))
    return json_path


def train_classifier(out: str | Path, cfg: ClassifierTrainConfig = ClassifierTrainConfig(),
                     arch: ClassifierConfig = ClassifierConfig(), progress: bool = True) -> Path:
    """Train the digit classifier and write ``out/digit-classifier.{safetensors,json,log.csv}``."""
    with _isolated(cfg.threads):
        return _train_classifier(Path(out), cfg, arch, progress)


def _train_classifier(out: Path, cfg: ClassifierTrainConfig, arch: ClassifierConfig, progress: bool) -> Path:
    torch.manual_seed(cfg.seed)
    split = digit_split()
    px, labels = ((split.train_images + 1) / 2).float(), split.train_labels
    model = DigitClassifier(arch).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(px) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    rows, acc, t0, step = [], [], time.perf_counter(), 0
    batches = _batches(len(px), cfg.batch_size)
    for step in tqdm(range(total), desc="train digit-classifier", disable=not progress):
        idx = next(batches)
        x = _shift(px[idx], cfg.max_shift)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            rows.append({"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 3),
                         "loss": sum(acc) / len(acc), "lr": sched.get_last_lr()[0],
                         "seconds": round(time.perf_counter() - t0, 2)})
            acc = []
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        train_acc = float((model(px).argmax(-1) == labels).double().mean())
        held_px = ((split.held_out_images + 1) / 2).float()
        held_acc = float((model(held_px).argmax(-1) == split.held_out_labels).double().mean())
    provenance = {
        "command": f"epd train-backbone --what classifier --epochs {cfg.epochs} --seed {cfg.seed} "
                   f"--threads {cfg.threads}",
        "training": asdict(cfg), "data": split.describe(), "final_loss": rows[-1]["loss"],
        "train_seconds": round(seconds, 1), "environment": _environment(cfg.threads),
        "parameters": sum(p.numel() for p in model.parameters()),
        "metrics": {"train_accuracy": train_acc, "held_out_accuracy": held_acc},
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_log(out / f"{CLASSIFIER_KIND}.log.csv", rows)
    return save_weights(out / CLASSIFIER_KIND, model.state_dict(), kind=CLASSIFIER_KIND, config=arch.to_json(),
                        provenance=provenance)


def _shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by a random (dy, dx) in [−max_shift, max_shift]², filling with background (0)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]   # [n, h, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]   # [n, 1, w]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def unet_metrics(weights: str | Path, num_samples: int = 2000, nfe: int = 30, seed_offset: int = 0,
                 classifier_path: str | Path | None = None) -> dict:
    """FD-digits of ``unet-digits`` samples (DPM-Solver++(3M), logSNR grid) against the train split, conditional
    (labels cycling 0–9) and unconditional, beside the held-out split's own FD-digits; and label accuracy."""
    from . import schedules
    from .backbones.unet import UNetDigits
    from .metrics.digits import data_pixels, fd_digits, fd_digits_stats, label_accuracy, load_digit_classifier
    from .solvers import sample_dpmpp_3m

    clf = load_digit_classifier(classifier_path)
    backbone = UNetDigits(weights)
    train_px, _ = data_pixels("train")
    held_px, _ = data_pixels("held_out")
    train_stats = fd_digits_stats(train_px, clf)
    sigmas = schedules.logsnr(nfe + 1, backbone.sigma_min, backbone.sigma_max)
    seeds = range(seed_offset, seed_offset + num_samples)
    labels = torch.arange(num_samples) % 10
    result = {"solver": "dpmpp_3m", "schedule": "logsnr", "nfe": nfe, "num_samples": num_samples,
              "fd_digits_held_out_vs_train": fd_digits(held_px, train_stats, clf)}
    for name, cond in (("conditional", labels), ("unconditional", None)):
        with torch.no_grad():
            x = sample_dpmpp_3m(backbone, backbone.noise(seeds), sigmas, cond=cond)
        px = backbone.to_pixels(x)
        result[f"fd_digits_{name}_vs_train"] = fd_digits(px, train_stats, clf)
        if cond is not None:
            result["label_accuracy_conditional"] = label_accuracy(px, labels, clf)
    return result


def _record(json_path: Path, metrics: dict) -> None:
    """Add measured metrics to a weight file's JSON (outside the checksummed tensors)."""
    import json

    header = json.loads(json_path.read_text())
    header["provenance"]["metrics"] = metrics
    atomic_write(json_path, (json.dumps(header, indent=2) + "\n").encode())
