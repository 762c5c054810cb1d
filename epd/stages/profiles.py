"""``epd profiles``: make ``snakemake --profile default`` / ``--profile slurm`` work by name.

Snakemake finds a profile given by name in the working directory, in the user's config folder
(``~/.config/snakemake/NAME``, i.e. ``$XDG_CONFIG_HOME/snakemake``) and in the site's (``/etc/xdg/snakemake``). The
profiles live in this repository (``workflow/profiles/NAME``); this command links them into the user's folder, so
they stay the repository's files (edit them there) and the command line is the same on every machine."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "link the Snakemake profiles (default, slurm) where `snakemake --profile NAME` finds them"
SECTIONS = None
PROFILES = Path(__file__).resolve().parents[2] / "workflow" / "profiles"


def user_profile_dir() -> Path:
    """Where Snakemake looks for profiles by name in the user's folders (platformdirs, as Snakemake uses it)."""
    from platformdirs import user_config_dir

    return Path(user_config_dir("snakemake", "snakemake"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dest", help="folder to link them into (default: the user's Snakemake profile folder)")
    p.add_argument("--source", default=str(PROFILES), help="folder holding the profiles, one subfolder each")


def install(source: Path, dest: Path) -> list[str]:
    """Link every ``source/NAME`` to ``dest/NAME``; a link to another epd checkout is replaced, anything else that
    is already there is refused (named). Returns one line per profile saying what was done."""
    names = sorted(p.name for p in source.iterdir() if (p / "config.yaml").is_file())
    if not names:
        raise ValueError(f"{source} holds no profiles (NAME/config.yaml)")
    for name in names:   # check everything before writing anything
        target = dest / name
        if (target.exists() or target.is_symlink()) and not _ours(target):
            raise ValueError(f"{target} exists and is not a link to an epd profile: move it away, or run snakemake "
                             f"with --profile {source / name}")
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    for name in names:
        target = dest / name
        if target.is_symlink() and target.resolve() == (source / name).resolve():
            done.append(f"{target} -> {source / name} (already there)")
            continue
        if target.is_symlink():
            target.unlink()
        os.symlink(source / name, target, target_is_directory=True)
        done.append(f"{target} -> {source / name}")
    return done


def _ours(path: Path) -> bool:
    return path.is_symlink() and Path(os.readlink(path)).parent.parts[-2:] == ("workflow", "profiles")


def run(args: argparse.Namespace, cfg: None) -> int:
    dest = Path(args.dest) if args.dest else user_profile_dir()
    for line in install(Path(args.source), dest):
        print(f"linked {line}")
    print("snakemake --profile default | --profile slurm now work from the repository root")
    return 0
