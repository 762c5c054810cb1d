# epd pipeline: teacher trajectories -> distillation -> RDPO -> sampling -> evaluation -> report.
# Run from the repository root:  snakemake --profile workflow/profiles/default   (or workflow/profiles/slurm).
# Experiments: --configfile config/sd15.yaml. dvc.yaml mirrors these rules (tests/test_dvc.py checks the two agree).
from snakemake.utils import min_version, validate

min_version("9.0")


# An experiment's --configfile replaces the embedded default instead of being merged into it (merged, the default's
# backbone options would leak into another backbone's).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/rdpo.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        f"{REPORT}/summary.md",


onsuccess:
    # The summary table of a finished pipeline and where to look at the runs (also after a no-op rerun).
    if os.path.exists(f"{REPORT}/summary.md"):
        print(open(f"{REPORT}/summary.md").read())
        print(f"MLflow UI: mlflow ui --backend-store-uri {config['tracking']['uri']}  (then open http://127.0.0.1:5000)")
