# The checked config, the results layout and the stamps each rule depends on. Every rule's command reads its
# values from the config file itself (`epd <stage> --config FILE`): the rules only name files.
import os

from epd.backbones import BACKBONES
from epd.config import STAGE_SECTIONS, check_inputs, from_mapping, read_yaml, stamp
from epd.data import seed_count

# relative to the working folder when inside it (a profile makes it absolute), as the commands in dvc.yaml read it
CONFIGFILE = ([str(f) for f in workflow.overwrite_configfiles] or ["config/config.yaml"])[-1]
if not os.path.relpath(CONFIGFILE).startswith(".."):
    CONFIGFILE = os.path.relpath(CONFIGFILE)
if config != read_yaml(CONFIGFILE):
    raise ValueError(f"the stages read {CONFIGFILE} itself: put changes in a config file (--configfile), not "
                     f"--config KEY=VALUE")
CFG = from_mapping(config)  # checked before any job starts: a bad value stops here, naming its key
check_inputs(CFG)  # and the prompt files it names
RESULTS = str(CFG.results)
REPORT = f"{RESULTS}/report"
PARENT_RUN = f"{RESULTS}/pipeline-run.json"  # the MLflow run of this invocation (epd pipeline-run start)
TRACK = f"--parent-run {PARENT_RUN} --no-progress"
GPU = int(BACKBONES[CFG.backbone.name].gpu)  # the slurm executor reads the `gpu` resource
TABLE_SOLVERS = ["epd", "rdpo"] + CFG.pipeline.peers  # the distilled table, the same after RDPO, learned peers
SAMPLED = [f"{s}-nfe{n}" for s in TABLE_SOLVERS for n in CFG.pipeline.nfe] + [
    f"{s}-nfe{n}" for s in CFG.pipeline.baselines for n in CFG.pipeline.baseline_nfe
] + ["reference"]

# Sharded stages: one job per shard of seeds (each a SLURM job with its own GPU), then a gather job.
TEACHER_SHARDS = -(-seed_count(CFG.teacher.seeds) // (CFG.teacher.shard_size or seed_count(CFG.teacher.seeds)))
SAMPLE_SHARDS = -(-seed_count(CFG.sample.seeds) // (CFG.sample.shard_size or seed_count(CFG.sample.seeds)))

stamp(CFG)  # results/<experiment>/config/<section>.json, rewritten only when a section's content changed


def stamps(stage):
    """The stamps of the config sections a stage reads: an edited value reruns exactly those stages."""
    return [f"{RESULTS}/config/{name}.json" for name in STAGE_SECTIONS[stage]]


def files(*paths):
    """Input files named by the config (a prompt file), when it names one."""
    return [p for p in paths if p]


wildcard_constraints:
    nfe=r"\d+",
    kind="|".join(TABLE_SOLVERS),
    solver="|".join(CFG.pipeline.baselines) or "(?!)",
    name=r"[a-z0-9_]+-nfe\d+|reference",
    shard=r"\d+",
