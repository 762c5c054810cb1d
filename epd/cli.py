"""``epd`` command line: one subcommand per stage (``epd sample``, ``epd benchmark``, …)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import schedules, tracking
from .solvers import BASELINES


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="gmm-digits", help="backbone name (default: gmm-digits)")
    p.add_argument("--component-std", type=float, default=0.1,
                   help="gmm-digits: isotropic std of each mixture component, in [-1, 1] pixel units")
    p.add_argument("--resolution", type=int,
                   help="image side: gmm-digits (multiple of 8, default 8); sd15/sd3 (default: the model's own)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale (1 = none; default 1, sd15 7.5, sd3 4.5)")
    p.add_argument("--model-path", help="sd15/sd3: diffusers pipeline folder or hub id")
    p.add_argument("--dtype", help="sd15/sd3: network dtype, e.g. float16 (default float32)")
    p.add_argument("--device", help="sd15/sd3: device (default cuda if there is one, else cpu)")
    p.add_argument("--cpu-offload", action="store_true", help="sd15/sd3: keep each network on the CPU until it runs")
    p.add_argument("--max-batch", type=int, help="sd15/sd3: most rows in one network call (memory)")
    p.add_argument("--weights", help="unet-digits: weight file (default: data/weights/unet-digits)")


def _backbone_options(args) -> dict:
    if args.backbone in ("sd15", "sd3"):
        given = {"guidance": args.guidance, "resolution": args.resolution}
        return {"model_path": args.model_path, "dtype": args.dtype, "device": args.device,
                "cpu_offload": args.cpu_offload, "max_batch": args.max_batch,
                **{k: v for k, v in given.items() if v is not None}}
    guidance = 1.0 if args.guidance is None else args.guidance
    if args.backbone == "unet-digits":
        return {"guidance": guidance, **({"weights": args.weights} if args.weights else {})}
    return {"component_std": args.component_std, "resolution": args.resolution or 8, "guidance": guidance}


def _json_arg(value: str | None, flag: str) -> dict:
    """A JSON object given inline or as a path to a .json file (``--backend-config``)."""
    import json

    if not value:
        return {}
    text = Path(value).read_text() if value.strip().endswith(".json") else value
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: not valid JSON ({e}): {value!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{flag} must be a JSON object of backbone options, got {value!r}")
    return data


def _schedule_args(backbone, schedule: str) -> dict:
    """Grid arguments the backbone fixes: SD3's flow-match shift (the other schedules take the σ range)."""
    return dict(getattr(backbone, "schedule_args", {})) if schedule == "flow_match" else {}


def _cmd_sample(args) -> int:
    from .backbones import load_backbone
    from .sample import generate, parse_seeds, read_prompts, save_grid, save_pngs, write_manifest
    from .solvers import load_table
    from .solvers.plan import configure

    options = {**_backbone_options(args), **_json_arg(args.backend_config, "--backend-config")}  # JSON overrides
    backbone = load_backbone(args.backbone, **options)
    table = load_table(args.table) if args.table else None
    solver = args.solver
    if table is not None:
        if table.meta.backbone not in ("", backbone.name):
            raise ValueError(f"{args.table} was made for backbone {table.meta.backbone!r}, not {backbone.name!r}")
        solver = "epd_plugin" if table.meta.plugin else "epd"
    schedule_args = _schedule_args(backbone, args.schedule)
    run = configure(solver, None if table is not None else args.nfe, schedule=args.schedule,
                    sigma_min=backbone.sigma_min, sigma_max=backbone.sigma_max, rho=args.rho, table=table,
                    num_points=args.num_points, backbone=backbone.name, schedule_args=schedule_args)
    seeds = parse_seeds(args.seeds)
    labels = [int(v) for v in args.labels.split(",")] if args.labels else None
    prompts = [args.prompt] if args.prompt else read_prompts(args.prompt_file) if args.prompt_file else None
    outdir = Path(args.outdir)
    collected = []
    for batch_seeds, images in generate(backbone, run, seeds, labels=labels, prompts=prompts,
                                        batch_size=args.batch, progress=not args.no_progress):
        if args.grid:
            collected.append(images)
        else:
            save_pngs(images, batch_seeds, outdir, subdirs=args.subdirs)
    if args.grid:
        import torch

        save_grid(torch.cat(collected), outdir / "grid.png")
        tracking.log_artifact(outdir / "grid.png")
    else:
        write_manifest(outdir, seeds, labels=labels, prompts=prompts, subdirs=args.subdirs)
    tracking.set_tags({"solver": solver, "nfe": run.nfe, "backbone": backbone.name,
                       "schedule": table.meta.schedule if table is not None else args.schedule})
    tracking.log_metrics({"num_samples": len(seeds)})
    print(f"{len(seeds)} samples, solver={solver} nfe={run.nfe} -> {outdir / 'grid.png' if args.grid else outdir}")
    return 0


def _cmd_benchmark(args) -> int:
    from .benchmark import BenchConfig, main

    cfg = BenchConfig(
        backbone=args.backbone, backbone_options=_backbone_options(args), solvers=args.solvers,
        schedules=args.schedules, nfes=args.nfes, tables=args.tables, num_samples=args.num_samples,
        seed_sets=args.seed_sets, batch_size=args.batch, reference_steps=args.reference_steps,
        reference_check=args.reference_check, labels=None if args.unconditional else BenchConfig().labels,
    )
    print(main(cfg, Path(args.outdir), progress=not args.no_progress))
    print(f"wrote {Path(args.outdir) / 'benchmark.csv'} and {Path(args.outdir) / 'benchmark.md'}")
    return 0


def _cmd_teacher(args) -> int:
    from .solvers.plan import plan_for_nfe
    from .sample import parse_seeds
    from .teacher import TeacherConfig, write_teacher

    from .backbones import load_backbone
    from .sample import read_prompts

    num_steps = args.num_steps or plan_for_nfe("epd", args.nfe).num_steps
    labels = [int(v) for v in args.labels.split(",")] if args.labels else None
    prompts = read_prompts(args.prompt_file) if args.prompt_file else None
    options = _backbone_options(args)
    backbone = load_backbone(args.backbone, **options)   # it fixes the grid's σ range (and SD3's shift)
    cfg = TeacherConfig(backbone=args.backbone, backbone_options=options, schedule=args.schedule,
                        num_steps=num_steps, sigma_min=backbone.sigma_min, sigma_max=backbone.sigma_max,
                        rho=args.rho, schedule_args=_schedule_args(backbone, args.schedule), solver=args.solver,
                        inserted_steps=args.inserted_steps, seeds=args.seeds, labels=labels, prompts=prompts,
                        batch_size=args.batch, shard_size=args.shard_size)
    tracking.log_params({"teacher": cfg.to_json(), "teacher.config_hash": cfg.hash})
    wrote = write_teacher(cfg, args.out, progress=not args.no_progress, backbone=backbone)
    tracking.log_metrics({"num_samples": len(parse_seeds(cfg.seeds)), "wrote": int(wrote)})
    tracking.log_artifact(Path(args.out) / "manifest.json")
    print(f"{'wrote' if wrote else 'up to date, nothing written:'} {args.out} (config {cfg.hash})")
    return 0


def _cmd_distill(args) -> int:
    from .distill import DistillConfig, distill

    cfg = DistillConfig(nfe=args.nfe, num_points=args.num_points, plugin=args.plugin, iterations=args.iterations,
                        batch_size=args.batch, lr=args.lr, seed=args.seed, checkpoint_every=args.checkpoint_every,
                        scale_bound=args.scale_bound, final_weight=args.final_weight)
    expect = {k: v for k, v in (("backbone", args.backbone), ("schedule", args.schedule)) if v is not None}
    tracking.log_params({"distill": cfg.to_json()})
    table = distill(args.teacher, args.out, cfg, expect=expect, progress=not args.no_progress)
    meta = table.meta
    tracking.set_tags({"solver": "epd_plugin" if meta.plugin else "epd", "nfe": meta.nfe, "backbone": meta.backbone,
                       "schedule": meta.schedule})
    for suffix in (".json", ".safetensors", ".loss.csv", ".loss.png"):
        tracking.log_artifact(f"{args.out}{suffix}", "table")
    print(f"wrote {args.out}.json (nfe={table.meta.nfe}, K={table.meta.num_points}, plugin={table.meta.plugin})")
    return 0


def _cmd_train_backbone(args) -> int:
    from .data import WEIGHTS_DIR
    from .train_backbone import ClassifierTrainConfig, UNetTrainConfig, train_classifier, train_unet

    out = Path(args.out) if args.out else WEIGHTS_DIR
    if args.what == "unet":
        cfg = UNetTrainConfig(seed=args.seed, threads=args.threads, **({"steps": args.steps} if args.steps else {}))
        path = train_unet(out, cfg, progress=not args.no_progress, metrics=not args.no_metrics)
    else:
        cfg = ClassifierTrainConfig(seed=args.seed, threads=args.threads,
                                    **({"epochs": args.epochs} if args.epochs else {}))
        path = train_classifier(out, cfg, progress=not args.no_progress)
    print(f"wrote {path}, {path.with_suffix('.safetensors').name} and {path.with_suffix('.log.csv').name}")
    return 0


def _cmd_rdpo(args) -> int:
    import dataclasses
    import json

    from .backbones import load_backbone
    from .rdpo import RDPOConfig, rdpo
    from .rdpo.heldout import evaluate_table, flat_metrics, format_comparison
    from .rewards import load_reward
    from .sample import read_prompts
    from .solvers import load_table

    try:
        weights = json.loads(args.reward)
    except json.JSONDecodeError:
        weights = args.reward  # a bare reward name
    fields = {f.name for f in dataclasses.fields(RDPOConfig)}
    cfg = RDPOConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    options = _backbone_options(args)
    backbone = load_backbone(args.backbone, **options)
    scorer_weights = _key_paths(args.scorer_weights, "--scorer-weights")
    reward = load_reward(weights, **({"weights": scorer_weights} if scorer_weights else {}))
    table = rdpo(args.table, args.out, cfg, backbone=backbone, reward=reward, prompts=read_prompts(args.prompt_file),
                 backbone_options=options, progress=not args.no_progress)
    print(f"wrote {args.out}.json (policy mean after {cfg.steps} steps), {args.out}.metrics.csv/.png")
    if args.eval_samples:
        from .io import atomic_write

        seeds, prompts = list(range(args.eval_samples)), read_prompts(args.eval_prompt_file or args.prompt_file)
        before, after = (evaluate_table(t, backbone, reward, seeds, prompts, args.batch)
                         for t in (load_table(args.table), table))
        names = (Path(args.table).name.removesuffix(".json"), Path(args.out).name)
        print(format_comparison(before, after, names, title=f"held-out seeds 0-{args.eval_samples - 1}, "
                                                             f"NFE {table.meta.nfe}"))
        metrics = flat_metrics(before, after)
        tracking.log_metrics(metrics)
        path = Path(f"{args.out}.eval.json")
        atomic_write(path, (json.dumps({"tables": names, "seeds": f"0-{args.eval_samples - 1}", **metrics},
                                       indent=2) + "\n").encode())
        tracking.log_artifact(path)
    return 0


def _key_paths(items: list[str], flag: str) -> dict[str, str]:
    """["hpsv2=models/HPS_v2.1_compressed.pt", …] -> {"hpsv2": "models/HPS_v2.1_compressed.pt", …}."""
    out = {}
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise ValueError(f"{flag} takes KEY=PATH (e.g. hpsv2=models/HPS_v2.1_compressed.pt), got {item!r}")
        out[key] = path
    return out


def _cmd_evaluate(args) -> int:
    from .evaluate import evaluate

    weights = _key_paths(args.weights, "--weights")
    if not args.metrics and not args.write_reference_stats:
        raise ValueError("give --metrics (and/or --write-reference-stats)")
    summary = evaluate(args.samples, args.metrics or [], args.out, weights=weights,
                       reference_stats=args.reference_stats, write_reference_stats=args.write_reference_stats,
                       batch_size=args.batch, device=args.device, progress=not args.no_progress)
    for metric, s in summary.items():
        print(f"{metric}: " + (f"{s['value']:.4f}" if "value" in s else
                               "n/a" if s["mean"] is None else f"{s['mean']:.4f} ± {s['std']:.4f} (n={s['n']})"))
    wrote = [f"{args.out}/per_image.csv, summary.json"] if args.out and args.metrics else []
    wrote += [args.write_reference_stats] if args.write_reference_stats else []
    print(f"wrote {' and '.join(wrote)}")
    return 0


def _cmd_report(args) -> int:
    from .report import write_report

    print(write_report(args.results, args.out), end="")
    print(f"wrote {Path(args.out)}/summary.md, summary.csv, quality_vs_nfe.png, curves.png, grids.png")
    return 0


def _add_tracking_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tracking (MLflow; off unless a store is given)")
    g.add_argument("--tracking-uri", dest="tracking_uri", metavar="URI",
                   help="MLflow store, e.g. sqlite:///mlruns/mlflow.db (default: $MLFLOW_TRACKING_URI, or the "
                        "--parent-run file's)")
    g.add_argument("--experiment", dest="tracking_experiment", metavar="NAME",
                   help="MLflow experiment (default: the parent run's, $MLFLOW_EXPERIMENT_NAME, or epd)")
    g.add_argument("--parent-run", dest="tracking_parent", metavar="FILE",
                   help="file written by `epd pipeline-run start`: nest this stage's run under that pipeline run")
    g.add_argument("--run-name", dest="tracking_run_name", metavar="NAME",
                   help="MLflow run name (default: stage and output name)")


def _stage_run(args, argv: list[str]):
    """The MLflow run around one stage: params are its resolved arguments, tags what runs are compared by."""
    if not hasattr(args, "tracking_parent"):   # `epd pipeline-run` itself
        import contextlib

        return contextlib.nullcontext()
    import shlex

    params = {k: v for k, v in vars(args).items() if k not in ("func", "command") and not k.startswith("tracking_")}
    out = next((getattr(args, k) for k in ("out", "outdir") if getattr(args, k, None)), None)
    name = args.tracking_run_name or (f"{args.command} {Path(out).name}" if out else args.command)
    tags = {k: getattr(args, k, None) for k in ("backbone", "solver", "schedule", "nfe")}
    return tracking.stage_run(args.command, uri=args.tracking_uri, experiment=args.tracking_experiment,
                              parent=args.tracking_parent, run_name=name, params=params, tags=tags,
                              command=shlex.join(["epd", *argv]))


def _cmd_pipeline_run(args) -> int:
    if args.action == "end":
        info = tracking.end_pipeline_run(args.file, status=args.status)
    else:
        config = None
        if args.config:
            import yaml

            config = yaml.safe_load(Path(args.config).read_text())
            if not isinstance(config, dict):
                raise ValueError(f"{args.config} is not a YAML mapping (expected the layout of config/config.yaml)")
        info = tracking.start_pipeline_run(args.out, uri=args.tracking_uri, experiment=args.tracking_experiment,
                                           run_name=args.tracking_run_name, config=config, config_path=args.config)
    where = f"run {info['run_id']} in {info['tracking_uri']}" if info["tracking_uri"] else "untracked (no store)"
    print(f"pipeline run {'ended' if args.action == 'end' else 'started'}: {info['experiment']}, {where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    solvers = [*BASELINES, "epd", "epd_plugin"]

    p = sub.add_parser("sample", help="generate images with a baseline solver or an EPD table")
    _add_backbone_args(p)
    p.add_argument("--solver", choices=solvers, default="epd",
                   help="solver (default epd: a hand-set table unless --table is given)")
    p.add_argument("--nfe", type=int, default=5, help="denoiser calls per sample (ignored with --table)")
    p.add_argument("--table", help="EPD table (NAME.json / NAME.safetensors); fixes grid and NFE")
    p.add_argument("--num-points", type=int, default=2, help="K for a hand-set EPD table")
    p.add_argument("--schedule", choices=sorted(schedules.SCHEDULES), default="polynomial")
    p.add_argument("--rho", type=float, default=7.0, help="polynomial schedule exponent")
    p.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-63 or 1,5,9")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--labels", help="comma-separated class labels, cycled over the seeds")
    cond.add_argument("--prompt", help='one prompt for all seeds, e.g. "a handwritten 3"')
    cond.add_argument("--prompt-file", help="prompts, .txt (one per line) or .csv with a text column")
    p.add_argument("--batch", type=int, default=64, help="samples per batch")
    p.add_argument("--outdir", default="outputs/samples")
    p.add_argument("--grid", action="store_true", help="write one grid.png instead of one PNG per seed")
    p.add_argument("--subdirs", action=argparse.BooleanOptionalAction, default=True,
                   help="group PNGs in folders of 1000 seeds (default on)")
    p.add_argument("--backend-config",
                   help='backbone options as a JSON object (inline or a .json file), overriding the flags, e.g. '
                        '\'{"max_batch": 8, "load_options": {"variant": "fp16"}}\'')
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_sample)

    from .benchmark import BenchConfig
    from .distill import DistillConfig
    from .teacher import TEACHERS, TeacherConfig

    # Defaults come from the config dataclasses, the one place each lives.
    bench, teacher, dist = BenchConfig(), TeacherConfig(), DistillConfig()

    p = sub.add_parser("teacher", help="write an accurate solver's states at the student grid (safetensors shards)")
    _add_backbone_args(p)
    p.add_argument("--out", required=True, help="output directory (manifest.json + shard-*.safetensors)")
    p.add_argument("--schedule", choices=sorted(schedules.SCHEDULES), default=teacher.schedule)
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--nfe", type=int, default=5, help="student NFE; fixes the grid length as EPD spends it")
    grid.add_argument("--num-steps", type=int, help="student grid points (instead of --nfe)")
    p.add_argument("--rho", type=float, default=teacher.rho)
    p.add_argument("--solver", choices=sorted(TEACHERS), default=teacher.solver)
    p.add_argument("--inserted-steps", type=int, default=teacher.inserted_steps,
                   help="M teacher steps inserted in each student interval")
    p.add_argument("--seeds", default=teacher.seeds, help="training seeds (keep them apart from evaluation seeds)")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--labels", help="comma-separated labels cycled over the seeds (default unconditional)")
    cond.add_argument("--prompt-file", help="prompts cycled over the seeds, .txt or .csv with a text column "
                                            "(text-to-image backbones; sample with prompts like them)")
    p.add_argument("--batch", type=int, default=teacher.batch_size)
    p.add_argument("--shard-size", type=int, default=teacher.shard_size)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_teacher)

    p = sub.add_parser("distill", help="fit an EPD table to teacher trajectories")
    p.add_argument("--teacher", required=True, help="teacher directory written by `epd teacher`")
    p.add_argument("--out", required=True, help="table path stem: writes OUT.json/.safetensors/.loss.csv/.loss.png")
    p.add_argument("--nfe", type=int, default=dist.nfe)
    p.add_argument("--num-points", type=int, default=dist.num_points, help="K")
    p.add_argument("--plugin", action="store_true", help="EPD-Plugin (iPNDM direction for the K points)")
    p.add_argument("--iterations", type=int, default=dist.iterations)
    p.add_argument("--batch", type=int, default=dist.batch_size)
    p.add_argument("--lr", type=float, default=dist.lr)
    p.add_argument("--scale-bound", type=float, default=dist.scale_bound)
    p.add_argument("--final-weight", type=float, default=dist.final_weight)
    p.add_argument("--seed", type=int, default=dist.seed)
    p.add_argument("--checkpoint-every", type=int, default=dist.checkpoint_every)
    p.add_argument("--backbone", help="refuse a teacher made for another backbone")
    p.add_argument("--schedule", help="refuse a teacher made on another schedule")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_distill)
    p = sub.add_parser("benchmark", help="every solver x grid x NFE against a converged solve on an embedded backbone")
    _add_backbone_args(p)
    p.add_argument("--solvers", nargs="+", choices=solvers, default=bench.solvers)
    p.add_argument("--schedules", nargs="+", choices=sorted(schedules.SCHEDULES), default=bench.schedules)
    p.add_argument("--nfes", nargs="+", type=int, default=bench.nfes)
    p.add_argument("--tables", nargs="*", default=[],
                   help="EPD tables to measure beside the solvers, as PATH or LABEL=PATH (same label: one row)")
    p.add_argument("--num-samples", type=int, default=bench.num_samples, help="samples per seed set")
    p.add_argument("--seed-sets", type=int, default=bench.seed_sets,
                   help="disjoint seed sets (their spread is the noise)")
    p.add_argument("--reference-steps", type=int, default=bench.reference_steps,
                   help="steps of the reference DPM-Solver++(3M) (default: gmm-digits 512, unet-digits 128)")
    p.add_argument("--reference-check", type=int, default=bench.reference_check,
                   help="samples re-solved with twice the reference steps to estimate its error")
    p.add_argument("--unconditional", action="store_true",
                   help="sample without labels (default: labels 0-9 cycled over the seeds)")
    p.add_argument("--batch", type=int, default=bench.batch_size)
    p.add_argument("--outdir", default="outputs/benchmark")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser("train-backbone", help="train an embedded network whose weights ship in data/weights")
    p.add_argument("--what", choices=["unet", "classifier"], required=True,
                   help="unet: the unet-digits denoiser; classifier: the digit feature network (FD-digits, rewards)")
    p.add_argument("--out", help="output folder (default: data/weights, where loading looks)")
    p.add_argument("--steps", type=int, help="unet: optimiser steps (default 4000)")
    p.add_argument("--epochs", type=int, help="classifier: epochs (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1, as the shipped weights); bit-identical weights need the same count")
    p.add_argument("--no-metrics", action="store_true", help="unet: skip the FD-digits measurement after training")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train_backbone)

    from .rdpo import RDPOConfig

    rd = RDPOConfig()
    p = sub.add_parser("rdpo", help="fine-tune an EPD table against a reward (Dirichlet policy, PPO + RLOO)")
    _add_backbone_args(p)
    p.add_argument("--table", required=True, help="start table (the distilled one), NAME.json")
    p.add_argument("--out", required=True,
                   help="stem: writes OUT.json/.safetensors (policy mean), OUT.metrics.csv/.png, OUT.ckpt.safetensors")
    p.add_argument("--reward", default='{"label_logprob": 1, "realism": 0.5}',
                   help='reward name or JSON {name: weight} (default: {"label_logprob": 1, "realism": 0.5})')
    p.add_argument("--scorer-weights", nargs="+", action="extend", default=[], metavar="KEY=PATH",
                   help="local weights of text-to-image reward scorers, keys as `epd evaluate --weights`")
    p.add_argument("--prompt-file", default="data/prompts/digits.txt", help="training prompts (.txt or .csv)")
    for name in ("steps", "rollout_batch_size", "rloo_k", "ppo_epochs", "minibatch_size", "save_interval", "seed",
                 "hidden_dim", "num_layers"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(rd, name))
    for name in ("learning_rate", "clip_range", "kl_coef", "entropy_coef", "max_grad_norm",
                 "dirichlet_concentration", "scale_std", "weight_decay"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(rd, name))
    p.add_argument("--rloo-grouping", choices=["prompt", "strided"], default=rd.rloo_grouping,
                   help="RLOO groups: a prompt's k samples (default), or upstream's strided groups of k prompts")
    p.add_argument("--shared-noise", action=argparse.BooleanOptionalAction, default=rd.shared_noise,
                   help="a prompt's k samples start from the same noise (default on)")
    p.add_argument("--normalize-advantages", action=argparse.BooleanOptionalAction, default=rd.normalize_advantages)
    p.add_argument("--scales", action=argparse.BooleanOptionalAction, default=rd.scales,
                   help="also learn scale_dir/scale_time (log-normal); default: keep the table's")
    p.add_argument("--eval-samples", type=int, default=0,
                   help="after training, compare start and tuned table on held-out seeds 0..N-1 (prints a table)")
    p.add_argument("--eval-prompt-file",
                   help="prompts for the comparison, cycled over the seeds (default: --prompt-file)")
    p.add_argument("--batch", type=int, default=256, help="samples per batch in the comparison")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_rdpo)

    p = sub.add_parser("evaluate", help="score a sample folder (samples.csv + PNGs): per-image CSV and summary JSON")
    p.add_argument("--samples", required=True, help="folder written by `epd sample` (samples.csv + PNGs)")
    p.add_argument("--metrics", nargs="+", metavar="M",
                   help="fd_digits label_accuracy label_logprob realism (digits); hpsv2 pickscore imagereward clip "
                        "aesthetic mps fid (text-to-image)")
    p.add_argument("--out", help="output folder: per_image.csv and summary.json")
    p.add_argument("--weights", nargs="+", action="extend", default=[], metavar="KEY=PATH",
                   help="local weights by key: hpsv2, pickscore, imagereward, clip, aesthetic, mps, clip_h (CLIP-H "
                        "processor folder for pickscore/mps), inception (FID)")
    p.add_argument("--reference-stats", help="fid: .npz with mu and sigma of the reference Inception features")
    p.add_argument("--write-reference-stats", metavar="FILE",
                   help="save this sample set's Inception statistics as an FID reference (.npz)")
    p.add_argument("--batch", type=int, default=32, help="images per scoring batch")
    p.add_argument("--device", help="scorers' device (default cuda if there is one, else cpu)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("report", help="summary table (solver x NFE x metrics) and plots of a pipeline's results")
    p.add_argument("--results", required=True,
                   help="pipeline results folder: eval/<solver>-nfe<N>/summary.json, samples/<solver>-nfe<N>/, "
                        "tables/*.loss.csv and *.metrics.csv")
    p.add_argument("--out", required=True, help="output folder: summary.md/.csv, quality_vs_nfe.png, curves.png, grids.png")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("pipeline-run", help="open or close the MLflow pipeline run that stage runs nest under")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("start", help="create the pipeline run; write FILE for the stages' --parent-run")
    a.add_argument("--out", required=True, metavar="FILE", help="pipeline-run file (JSON) to write")
    a.add_argument("--config", metavar="YAML", help="workflow config: its experiment and tracking.uri; logged as params + artifact")
    a.add_argument("--tracking-uri", dest="tracking_uri", metavar="URI",
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else the config's tracking.uri; none: untracked)")
    a.add_argument("--experiment", dest="tracking_experiment", metavar="NAME",
                   help="MLflow experiment (default: the config's)")
    a.add_argument("--run-name", dest="tracking_run_name", metavar="NAME", help="default: '<experiment> pipeline'")
    a = actions.add_parser("end", help="close the pipeline run recorded in FILE")
    a.add_argument("file", help="pipeline-run file written by `epd pipeline-run start`")
    a.add_argument("--status", choices=tracking.STATUSES, default="FINISHED")
    p.set_defaults(func=_cmd_pipeline_run)

    # Contract 5: the tracking flags on every stage, added once here. Keep this loop after the last add_parser.
    for name, stage in sub.choices.items():
        if name != "pipeline-run":
            _add_tracking_args(stage)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        with _stage_run(args, argv):
            return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # TableError is a ValueError
        print(f"epd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
