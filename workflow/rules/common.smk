# Names, paths and flag formatting shared by the rules: config -> command-line flags, nothing else.
import json
import shlex

CONFIGFILE = ([str(f) for f in workflow.overwrite_configfiles] or ["config/config.yaml"])[-1]
RESULTS = f"results/{config['experiment']}"
PARENT_RUN = f"{RESULTS}/pipeline-run.json"  # the MLflow pipeline run every stage run nests under
REPORT = f"{RESULTS}/report"
TABLE_SOLVERS = ["epd", "rdpo"]  # distilled table, and the same after RDPO
SAMPLED = [f"{s}-nfe{n}" for s in TABLE_SOLVERS for n in config["distill"]["nfe"]] + [
    f"{s}-nfe{n}" for s in config["baselines"]["solvers"] for n in config["baselines"]["nfe"]
]
# Diffusers backbones run on a GPU; the embedded ones on a CPU (the slurm executor reads the `gpu` resource).
GPU = 1 if config["backbone"]["name"] in ("sd15", "sd3") else 0

wildcard_constraints:
    nfe=r"\d+",
    kind="|".join(TABLE_SOLVERS),
    solver="|".join(config["baselines"]["solvers"]) or "(?!)",
    name=r"[a-z0-9_]+-nfe\d+",


def flags(options):
    """{"max_batch": 4, "cpu_offload": True, "dtype": None} -> "--max-batch 4 --cpu-offload" (None/False dropped)."""
    out = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not None and value is not False:
            out.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(out)


BACKBONE = f"--backbone {config['backbone']['name']} {flags(config['backbone'].get('options', {}))}".strip()
SCHEDULE = f"--schedule {config['schedule']['name']} --rho {config['schedule']['rho']}"


def tracking(run_name):
    """Params function: the tracking flags of one stage run, nested under the pipeline run (contract 5); the run
    name is a pattern over the job's wildcards, e.g. "sample-{solver}-nfe{nfe}"."""

    def track(wildcards):
        name = run_name.format(**wildcards)
        return (f"--tracking-uri {shlex.quote(config['tracking']['uri'])} --experiment {config['experiment']} "
                f"--parent-run {PARENT_RUN} --run-name {name}")

    return track


rule pipeline_run:
    output:
        PARENT_RUN,
    params:
        config=CONFIGFILE,
    localrule: True
    shell:
        "epd pipeline-run start --out {output} --config {params.config} --tracking-uri {config[tracking][uri]:q} "
        "--experiment {config[experiment]}"
